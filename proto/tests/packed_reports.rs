//! `packed::ReportRequest` reads every report as prost decodes it: the same fields, the same
//! sketches (or the same refusal of a forged one), and an error exactly where prost has one,
//! whichever legal protobuf encoding the report arrives in.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use flyball_proto::{Sketch, packed, v1};
use proptest::prelude::*;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};

fn sketch_strategy() -> impl Strategy<Value = Option<v1::Sketch>> {
    // Mostly real sketches in either form; sometimes forged fields, which both readers must
    // refuse alike.
    let recorded = (
        proptest::collection::vec(1.0f64..1.0e7, 0..40),
        any::<bool>(),
    )
        .prop_map(|(values, compact)| {
            let mut sketch = Sketch::new();
            for v in values {
                sketch.record(v);
            }
            if compact {
                v1::Sketch::compact(&sketch)
            } else {
                v1::Sketch::from(&sketch)
            }
        });
    let forged = (
        -5i32..700,
        proptest::collection::vec(0u64..5, 0..6),
        proptest::collection::vec(0u32..300, 0..6),
        proptest::collection::vec(0u64..5, 0..6),
        prop_oneof![Just(0.02), Just(0.0), Just(0.05)],
        0.0f64..1.0e6,
    )
        .prop_map(
            |(offset, counts, sparse_gaps, sparse_counts, accuracy, max)| v1::Sketch {
                relative_accuracy: accuracy,
                offset,
                counts,
                zero_count: 0,
                sum: max,
                min: 1.0,
                max,
                sparse_gaps,
                sparse_counts,
            },
        );
    prop_oneof![
        1 => Just(None),
        4 => recorded.prop_map(Some),
        2 => forged.prop_map(Some),
    ]
}

fn report_strategy() -> impl Strategy<Value = v1::ReportRequest> {
    let key = (
        "[a-z]{0,6}",
        "[a-z]{0,6}",
        proptest::option::of((0u64..50, 0u64..5).prop_map(|(ok, server_error)| {
            v1::RequestOutcomes {
                ok,
                server_error,
                ..Default::default()
            }
        })),
        proptest::option::of((0u64..9_999, 0u64..9_999).prop_map(|(input, output)| {
            v1::TokenUsage {
                input,
                output,
                ..Default::default()
            }
        })),
        [
            sketch_strategy(),
            sketch_strategy(),
            sketch_strategy(),
            sketch_strategy(),
        ],
        proptest::option::of(
            (0u64..9, 0u64..9).prop_map(|(waiting_first_token, decoding)| v1::InFlight {
                waiting_first_token,
                decoding,
            }),
        ),
    )
        .prop_map(
            |(backend, model, requests, tokens, [ttft, tpot, itl, e2e], in_flight)| {
                v1::KeyTelemetry {
                    backend,
                    model,
                    requests,
                    tokens,
                    ttft_us: ttft,
                    tpot_us: tpot,
                    itl_us: itl,
                    e2e_us: e2e,
                    in_flight,
                }
            },
        );
    (
        "[a-z0-9-]{0,12}",
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(key, 0..5),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(gateway, sequence, sent_at_unix_ms, keys, held_ms, connections_closed)| {
                v1::ReportRequest {
                    reporter: Some(v1::Reporter {
                        gateway,
                        process_start_unix_ms: 7,
                        filter_version: "0.1.0".to_string(),
                    }),
                    sequence,
                    sent_at_unix_ms,
                    keys,
                    dropped: (held_ms % 3 == 0).then_some(v1::DroppedTelemetry {
                        reports: 1,
                        requests: 2,
                    }),
                    held_ms,
                    connections_closed,
                }
            },
        )
}

/// `packed` holds what `report` does: the same fields, and each sketch reads as the matching one
/// of `report` does (the same sketch, or the same refusal). Its packed bytes may differ: a varint
/// may be written longer than it need be.
fn assert_same_report(packed: &packed::ReportRequest, report: &v1::ReportRequest) {
    assert_eq!(packed.reporter, report.reporter);
    assert_eq!(
        (packed.sequence, packed.sent_at_unix_ms, packed.held_ms),
        (report.sequence, report.sent_at_unix_ms, report.held_ms)
    );
    assert_eq!(packed.dropped, report.dropped);
    assert_eq!(packed.connections_closed, report.connections_closed);
    assert_eq!(packed.keys.len(), report.keys.len());
    for (mine, theirs) in packed.keys.iter().zip(&report.keys) {
        assert_eq!(
            (&mine.backend, &mine.model),
            (&theirs.backend, &theirs.model)
        );
        assert_eq!(mine.requests, theirs.requests);
        assert_eq!(mine.tokens, theirs.tokens);
        assert_eq!(mine.in_flight, theirs.in_flight);
        let pairs = [
            (&mine.ttft_us, &theirs.ttft_us),
            (&mine.tpot_us, &theirs.tpot_us),
            (&mine.itl_us, &theirs.itl_us),
            (&mine.e2e_us, &theirs.e2e_us),
        ];
        for (mine, theirs) in pairs {
            assert_eq!(mine.is_some(), theirs.is_some());
            if let (Some(mine), Some(theirs)) = (mine, theirs) {
                assert_eq!(Sketch::try_from(mine), Sketch::try_from(theirs));
                assert_eq!(
                    (mine.offset, mine.zero_count, mine.sum.to_bits()),
                    (theirs.offset, theirs.zero_count, theirs.sum.to_bits())
                );
            }
        }
    }
}

fn assert_reads_as(encoded: Vec<u8>, report: &v1::ReportRequest) {
    let decoded = v1::ReportRequest::decode(encoded.as_slice()).expect("prost decodes it");
    assert_eq!(&decoded, report, "the forged encoding means the report");
    let packed = packed::ReportRequest::decode(&Bytes::from(encoded)).expect("it reads");
    assert_same_report(&packed, report);
}

proptest! {
    #[test]
    fn a_report_reads_as_prost_decodes_it(report in report_strategy()) {
        let encoded = Bytes::from(report.encode_to_vec());
        let packed = packed::ReportRequest::decode(&encoded).unwrap();
        // prost's own encoding: the very bytes, too.
        prop_assert_eq!(&packed, &packed::ReportRequest::from(&report));
        assert_same_report(&packed, &report);
    }

    /// Cut short or with a byte changed, a report fails to read exactly when prost fails to
    /// decode it; when both read it, they agree.
    #[test]
    fn damaged_bytes_fail_where_prost_fails(
        report in report_strategy(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut encoded = report.encode_to_vec();
        prop_assume!(!encoded.is_empty());
        let at = at.index(encoded.len());
        encoded[at] = byte;
        encoded.truncate(cut.index(encoded.len() + 1));
        let theirs = v1::ReportRequest::decode(encoded.as_slice());
        let mine = packed::ReportRequest::decode(&Bytes::from(encoded));
        match (mine, theirs) {
            (Ok(mine), Ok(theirs)) => assert_same_report(&mine, &theirs),
            (Err(mine), Err(theirs)) => prop_assert_eq!(mine.to_string(), theirs.to_string()),
            (mine, theirs) => prop_assert!(false, "{:?} / {:?}", mine, theirs),
        }
    }
}

fn recorded(values: &[f64]) -> v1::Sketch {
    let mut sketch = Sketch::new();
    for &v in values {
        sketch.record(v);
    }
    v1::Sketch::from(&sketch)
}

/// A report of one key whose TTFT sketch is encoded by `sketch_bytes`.
fn report_with_sketch_bytes(sketch_bytes: &[u8]) -> Vec<u8> {
    let mut key = Vec::new();
    prost::encoding::string::encode(1, &"vllm".to_string(), &mut key);
    prost::encoding::string::encode(2, &"llama".to_string(), &mut key);
    encode_key(5, WireType::LengthDelimited, &mut key);
    encode_varint(sketch_bytes.len() as u64, &mut key);
    key.extend_from_slice(sketch_bytes);
    let mut report = Vec::new();
    prost::encoding::uint64::encode(2, &3, &mut report);
    encode_key(4, WireType::LengthDelimited, &mut report);
    encode_varint(key.len() as u64, &mut report);
    report.extend_from_slice(&key);
    report
}

fn report_of(sketch: v1::Sketch) -> v1::ReportRequest {
    v1::ReportRequest {
        sequence: 3,
        keys: vec![v1::KeyTelemetry {
            backend: "vllm".to_string(),
            model: "llama".to_string(),
            ttft_us: Some(sketch),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn counts_sent_unpacked_or_in_several_runs_read_as_the_same_sketch() {
    let sketch = recorded(&[900.0, 1_000.0, 1_100.0, 1_300.0]);
    assert!(sketch.counts.len() > 2);
    let mut head = sketch.clone();
    head.counts.clear();
    let head_bytes = head.encode_to_vec();

    let mut unpacked = head_bytes.clone();
    prost::encoding::uint64::encode_repeated(3, &sketch.counts, &mut unpacked);
    assert_reads_as(
        report_with_sketch_bytes(&unpacked),
        &report_of(sketch.clone()),
    );

    let mut two_runs = head_bytes;
    let (first, second) = sketch.counts.split_at(2);
    prost::encoding::uint64::encode_packed(3, first, &mut two_runs);
    prost::encoding::uint64::encode_packed(3, second, &mut two_runs);
    assert_reads_as(report_with_sketch_bytes(&two_runs), &report_of(sketch));
}

#[test]
fn a_sketch_sent_in_two_parts_merges_as_protobuf_says() {
    let whole = recorded(&[900.0, 1_000.0]);
    let mut summary = whole.clone();
    summary.counts.clear();
    let buckets = v1::Sketch {
        offset: whole.offset,
        counts: whole.counts.clone(),
        ..Default::default()
    };
    // Two TTFT fields in the one key: the second's fields merge into the first's.
    let mut two_parts = Vec::new();
    prost::encoding::message::encode(5, &summary, &mut two_parts);
    let first_part = two_parts.len();
    prost::encoding::message::encode(5, &buckets, &mut two_parts);
    // `report_with_sketch_bytes` writes the first field's tag and length itself.
    let first = v1::Sketch::decode(&two_parts[2..first_part]).unwrap();
    assert_eq!(first, summary);
    let mut report = report_with_sketch_bytes(&summary.encode_to_vec());
    append_to_first_key(&mut report, &two_parts[first_part..]);
    assert_reads_as(report, &report_of(whole));
}

/// Re-frames `report` (one key, as `report_with_sketch_bytes` writes it) with `extra` appended
/// to its key.
fn append_to_first_key(report: &mut Vec<u8>, extra: &[u8]) {
    let decoded = v1::ReportRequest::decode(report.as_slice()).unwrap();
    let mut key = decoded.keys[0].encode_to_vec();
    key.extend_from_slice(extra);
    report.clear();
    prost::encoding::uint64::encode(2, &decoded.sequence, report);
    encode_key(4, WireType::LengthDelimited, report);
    encode_varint(key.len() as u64, report);
    report.extend_from_slice(&key);
}

#[test]
fn a_forged_packed_sketch_is_refused_as_the_decoded_one_is() {
    let compact = recorded(&[10.0, 1_000.0]).compacted();
    assert!(compact.counts.is_empty());
    let mut far = compact.clone();
    far.sparse_gaps[1] = u32::MAX;
    let mut lengths = compact.clone();
    lengths.sparse_counts.push(1);
    let mut both = compact;
    both.counts = vec![1];
    for forged in [far, lengths, both] {
        let report = report_of(forged.clone());
        let packed = packed::ReportRequest::decode(&Bytes::from(report.encode_to_vec())).unwrap();
        let refusal = Sketch::try_from(packed.keys[0].ttft_us.as_ref().unwrap());
        assert!(refusal.is_err());
        assert_eq!(refusal, Sketch::try_from(&forged));
    }
}

proptest! {
    /// Packed counts made of varints of 1 to 12 bytes, any last byte, and maybe one that does not
    /// end: both ways of reading them (with fewer than 9 bytes of 0x80 or more in the field, and
    /// with more) meet varints that end, that do not, and that run past 10 bytes or 64 bits.
    #[test]
    fn packed_varints_of_any_bytes_read_as_prost_reads_them(
        varints in proptest::collection::vec((0usize..=11, 0u8..0x80), 0..5),
        unended in 0usize..3,
    ) {
        let mut counts = Vec::new();
        for (continued, last) in varints {
            counts.extend((0..continued).map(|at| 0x80 | at as u8));
            counts.push(last);
        }
        counts.extend(std::iter::repeat_n(0xff, unended));
        assert_packed_counts_read_as_prost_reads_them(&counts);
    }
}

/// Sends `counts` as a sketch's packed `counts` field and checks that the reader takes or
/// refuses it as prost does.
fn assert_packed_counts_read_as_prost_reads_them(counts: &[u8]) {
    let mut summary = recorded(&[5.0]);
    summary.counts.clear();
    let mut sketch = summary.encode_to_vec();
    encode_key(3, WireType::LengthDelimited, &mut sketch);
    encode_varint(counts.len() as u64, &mut sketch);
    sketch.extend_from_slice(counts);
    let encoded = report_with_sketch_bytes(&sketch);
    let theirs = v1::ReportRequest::decode(encoded.as_slice());
    let mine = packed::ReportRequest::decode(&Bytes::from(encoded));
    assert_eq!(
        mine.is_ok(),
        theirs.is_ok(),
        "{counts:x?}: {mine:?} / {theirs:?}"
    );
    if let (Ok(mine), Ok(theirs)) = (mine, theirs) {
        assert_same_report(&mine, &theirs);
    }
}

#[test]
fn packed_varints_fail_where_prost_fails() {
    let longest = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
    let mut over_64_bits = longest;
    over_64_bits[9] = 0x02;
    let cases: [&[u8]; 6] = [
        &[0x05],
        &[0x80, 0x00],
        &longest,
        &over_64_bits,
        &[
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
        &[0x05, 0x80],
    ];
    for counts in cases {
        assert_packed_counts_read_as_prost_reads_them(counts);
    }
}

/// `packed.rs` reads the fields of these messages one by one (of `RequestOutcomes`, `TokenUsage`,
/// `InFlight` and `DroppedTelemetry` too, all uint64s) and skips any other: a field added
/// to the .proto would pass ingest by unseen. This fails until it is read there too (or listed
/// here as one ingest does not need).
#[test]
fn the_packed_reader_knows_every_field_of_the_messages_it_reads() {
    let descriptors =
        protox::compile(["flyball/v1/telemetry.proto"], [env!("CARGO_MANIFEST_DIR")]).unwrap();
    let read_by_packed: [(&str, &[i32]); 7] = [
        ("ReportRequest", &[1, 2, 3, 4, 5, 6, 7]),
        ("KeyTelemetry", &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("Sketch", &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("RequestOutcomes", &[1, 2, 3, 4, 5]),
        ("TokenUsage", &[1, 2, 3, 4, 5, 6]),
        ("InFlight", &[1, 2]),
        ("DroppedTelemetry", &[1, 2]),
    ];
    for (message, read) in read_by_packed {
        let descriptor = descriptors
            .file
            .iter()
            .flat_map(|file| &file.message_type)
            .find(|m| m.name() == message)
            .unwrap();
        let mut in_proto: Vec<i32> = descriptor.field.iter().map(|f| f.number()).collect();
        in_proto.sort_unstable();
        assert_eq!(
            in_proto, read,
            "flyball.v1.{message}: read each field in src/packed.rs"
        );
    }
}

/// Groups (proto2's; no flyball.v1 sender writes one) nest against prost's recursion limit: a
/// report holding them is refused or read exactly as prost does, at any depth and wherever it is.
#[test]
fn nested_groups_are_refused_where_prost_refuses_them() {
    let nested = |depth: usize, field: u32| {
        let mut bytes = Vec::new();
        for _ in 0..depth {
            encode_key(field, WireType::StartGroup, &mut bytes);
        }
        for _ in 0..depth {
            encode_key(field, WireType::EndGroup, &mut bytes);
        }
        bytes
    };
    let base = report_with_sketch_bytes(&recorded(&[5.0]).encode_to_vec());
    for depth in [1, 97, 98, 99, 100, 101] {
        // In the report, in its key, in the key's request counts and in a sketch.
        let mut in_report = base.clone();
        in_report.extend_from_slice(&nested(depth, 20));
        let mut in_key = base.clone();
        append_to_first_key(&mut in_key, &nested(depth, 20));
        let mut in_requests = base.clone();
        let mut requests = Vec::new();
        encode_key(3, WireType::LengthDelimited, &mut requests);
        let groups = nested(depth, 20);
        encode_varint(groups.len() as u64, &mut requests);
        requests.extend_from_slice(&groups);
        append_to_first_key(&mut in_requests, &requests);
        let mut sketch = recorded(&[5.0]).encode_to_vec();
        sketch.extend_from_slice(&nested(depth, 20));
        let in_sketch = report_with_sketch_bytes(&sketch);
        for encoded in [in_report, in_key, in_requests, in_sketch] {
            let theirs = v1::ReportRequest::decode(encoded.as_slice());
            let mine = packed::ReportRequest::decode(&Bytes::from(encoded));
            match (mine, theirs) {
                (Ok(mine), Ok(theirs)) => assert_same_report(&mine, &theirs),
                (Err(mine), Err(theirs)) => assert_eq!(mine.to_string(), theirs.to_string()),
                (mine, theirs) => panic!("depth {depth}: {mine:?} / {theirs:?}"),
            }
        }
    }
}
