//! Reports as the control service reads them: [`ReportRequest`] is `flyball.v1.ReportRequest`
//! with each sketch's buckets left as the packed varints they arrived as, in the report's bytes,
//! until they are read once into the sketch that is merged. The reader walks the report in
//! place; each sketch shares one slice of its bytes, its packed fields places within it.
//!
//! prost decodes a packed repeated field into a `Vec` it grows one element at a time, and a
//! report carries up to 32 of them (four sketches per key, two fields each when sparse); each
//! sketch was then copied twice more on its way to a dense [`Sketch`], a few KiB zeroed for the
//! few buckets a second of traffic fills, added bucket by bucket into every window it joined.
//! Read here, each varint is decoded into the one list of occupied buckets that ingest merges
//! from ([`SparseSketch`]). Ingest's own code, without gRPC (`cargo bench -p flyball-control
//! --bench ingest -- --merge-only`, alternating with the commit before, 3 runs each): 6.4 us per
//! report against 7.95 with the filter's compact sketches, 7.9 against 8.9 all dense; with the
//! report read in place and one slice per sketch instead of one per field and per key, 5.3
//! against 6.3 and 6.9 against 7.9.
//!
//! The reader handles the encoding prost (so the filter and every control replica) writes: each
//! sketch field once, each packed field in one run. Protobuf also allows a field repeated (the
//! last one wins, or sub-messages merge) and repeated scalars sent unpacked or in several runs;
//! a report written so, or holding a (proto2) group, or not decoding at all, is decoded by prost
//! instead ([`v1::ReportRequest`]) and converted: it means the same either way, and fails where
//! prost fails with prost's error (`tests/packed_reports.rs`). Fields are read one by one and unknown
//! ones skipped, as prost does; a field added to these messages in the .proto must be read here
//! too, which that test checks against the .proto itself.

use bytes::{Buf, Bytes};
use flyball_sketch::{SketchError, SketchParts};
use prost::DecodeError;
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};

use crate::{Sketch, SparseSketch, v1};

/// `flyball.v1.ReportRequest`, its sketches packed ([`PackedSketch`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportRequest {
    pub reporter: Option<v1::Reporter>,
    pub sequence: u64,
    pub sent_at_unix_ms: u64,
    pub keys: Vec<KeyTelemetry>,
    pub dropped: Option<v1::DroppedTelemetry>,
    pub held_ms: u64,
    pub connections_closed: bool,
}

/// `flyball.v1.KeyTelemetry`, its sketches packed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyTelemetry {
    pub backend: String,
    pub model: String,
    pub requests: Option<v1::RequestOutcomes>,
    pub tokens: Option<v1::TokenUsage>,
    pub ttft_us: Option<PackedSketch>,
    pub tpot_us: Option<PackedSketch>,
    pub itl_us: Option<PackedSketch>,
    pub e2e_us: Option<PackedSketch>,
    pub in_flight: Option<v1::InFlight>,
}

/// `flyball.v1.Sketch` with `counts`, `sparse_gaps` and `sparse_counts` as they arrived: places
/// in the sketch's bytes, shared with the report's.
#[derive(Debug, Clone, Default)]
pub struct PackedSketch {
    pub relative_accuracy: f64,
    pub offset: i32,
    pub zero_count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    counts: Varints,
    sparse_gaps: Varints,
    sparse_counts: Varints,
    /// The sketch's encoded message, which the fields above point into: one shared slice of the
    /// report's bytes per sketch rather than one per field (each a reference count to raise and
    /// drop).
    bytes: Bytes,
}

/// A packed repeated varint field of a [`PackedSketch`]: where its bytes lie in the sketch's,
/// known to hold `len` well-formed varints.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Varints {
    start: usize,
    end: usize,
    len: usize,
}

/// The varints of a [`Varints`], in order.
#[derive(Debug, Clone)]
struct VarintIter<'a> {
    bytes: &'a [u8],
    left: usize,
}

/// The reader leaves this report to prost: it does not decode (prost says why), or it is written
/// in a way the reader does not take itself.
struct LeftToProst;

type Read<T> = Result<T, LeftToProst>;

impl From<DecodeError> for LeftToProst {
    fn from(_: DecodeError) -> Self {
        LeftToProst
    }
}

// === impl ReportRequest ===

impl ReportRequest {
    /// Reads an encoded `flyball.v1.ReportRequest`. Fails where prost's decoding of it fails,
    /// with prost's error: whatever the reader does not take itself, prost decodes.
    pub fn decode(encoded: &Bytes) -> Result<Self, DecodeError> {
        match Self::read(encoded) {
            Ok(report) => Ok(report),
            Err(LeftToProst) => {
                let report = v1::ReportRequest::decode(encoded.as_ref())?;
                Ok(ReportRequest::from(&report))
            }
        }
    }

    fn read(encoded: &Bytes) -> Read<Self> {
        let mut report = ReportRequest::default();
        let mut buf: &[u8] = encoded;
        let ctx = DecodeContext::default;
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            let uint64 = prost::encoding::uint64::merge;
            match tag {
                1 => {
                    let reporter = report.reporter.get_or_insert_with(Default::default);
                    merge_small(wire_type, reporter, &mut buf)?;
                }
                2 => uint64(wire_type, &mut report.sequence, &mut buf, ctx())?,
                3 => uint64(wire_type, &mut report.sent_at_unix_ms, &mut buf, ctx())?,
                4 => {
                    let body = length_delimited(wire_type, &mut buf)?;
                    // Read in place: a key is a few hundred bytes to move.
                    report.keys.push(KeyTelemetry::default());
                    if let Some(key) = report.keys.last_mut() {
                        key.read(body, encoded)?;
                    }
                }
                5 => {
                    let d = report.dropped.get_or_insert_with(Default::default);
                    read_uint64s(wire_type, &mut buf, [&mut d.reports, &mut d.requests])?;
                }
                6 => uint64(wire_type, &mut report.held_ms, &mut buf, ctx())?,
                7 => {
                    let closed = &mut report.connections_closed;
                    prost::encoding::bool::merge(wire_type, closed, &mut buf, ctx())?;
                }
                _ => skip_unknown(wire_type, tag, &mut buf)?,
            }
        }
        Ok(report)
    }
}

impl From<&v1::ReportRequest> for ReportRequest {
    fn from(report: &v1::ReportRequest) -> Self {
        ReportRequest {
            reporter: report.reporter.clone(),
            sequence: report.sequence,
            sent_at_unix_ms: report.sent_at_unix_ms,
            keys: report.keys.iter().map(KeyTelemetry::from).collect(),
            dropped: report.dropped,
            held_ms: report.held_ms,
            connections_closed: report.connections_closed,
        }
    }
}

// === impl KeyTelemetry ===

impl KeyTelemetry {
    /// Reads the key encoded in `buf`, a slice of `report`.
    fn read(&mut self, mut buf: &[u8], report: &Bytes) -> Read<()> {
        let key = self;
        let ctx = DecodeContext::default;
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            match tag {
                1 => prost::encoding::string::merge(wire_type, &mut key.backend, &mut buf, ctx())?,
                2 => prost::encoding::string::merge(wire_type, &mut key.model, &mut buf, ctx())?,
                3 => {
                    let r = key.requests.get_or_insert_with(Default::default);
                    let fields = [
                        &mut r.ok,
                        &mut r.client_error,
                        &mut r.server_error,
                        &mut r.upstream_reset,
                        &mut r.client_cancel,
                    ];
                    read_uint64s(wire_type, &mut buf, fields)?;
                }
                4 => {
                    let t = key.tokens.get_or_insert_with(Default::default);
                    let fields = [
                        &mut t.input,
                        &mut t.output,
                        &mut t.input_estimated,
                        &mut t.output_estimated,
                        &mut t.requests_estimated,
                        &mut t.requests_unmeasured,
                    ];
                    read_uint64s(wire_type, &mut buf, fields)?;
                }
                5..=8 => {
                    let sketch = match tag {
                        5 => &mut key.ttft_us,
                        6 => &mut key.tpot_us,
                        7 => &mut key.itl_us,
                        _ => &mut key.e2e_us,
                    };
                    read_sketch(sketch, wire_type, &mut buf, report)?;
                }
                9 => {
                    let f = key.in_flight.get_or_insert_with(Default::default);
                    let fields = [&mut f.waiting_first_token, &mut f.decoding];
                    read_uint64s(wire_type, &mut buf, fields)?;
                }
                _ => skip_unknown(wire_type, tag, &mut buf)?,
            }
        }
        Ok(())
    }
}

/// Reads a sketch field of `buf`, a slice of `report`, into `sketch`. A sketch sent in parts
/// merges them: prost's to do.
fn read_sketch(
    sketch: &mut Option<PackedSketch>,
    wire_type: WireType,
    buf: &mut &[u8],
    report: &Bytes,
) -> Read<()> {
    let body = length_delimited(wire_type, buf)?;
    if sketch.is_some() {
        return Err(LeftToProst);
    }
    // `body` lies in `report`, as `buf` does.
    *sketch = Some(PackedSketch::read(report.slice_ref(body))?);
    Ok(())
}

impl From<&v1::KeyTelemetry> for KeyTelemetry {
    fn from(key: &v1::KeyTelemetry) -> Self {
        let packed = |sketch: &Option<v1::Sketch>| sketch.as_ref().map(PackedSketch::from);
        KeyTelemetry {
            backend: key.backend.clone(),
            model: key.model.clone(),
            requests: key.requests,
            tokens: key.tokens,
            ttft_us: packed(&key.ttft_us),
            tpot_us: packed(&key.tpot_us),
            itl_us: packed(&key.itl_us),
            e2e_us: packed(&key.e2e_us),
            in_flight: key.in_flight,
        }
    }
}

// === impl PackedSketch ===

impl PackedSketch {
    fn read(bytes: Bytes) -> Read<Self> {
        let mut sketch = PackedSketch::default();
        let mut buf: &[u8] = &bytes;
        let ctx = DecodeContext::default;
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            let double = prost::encoding::double::merge;
            match tag {
                1 => double(wire_type, &mut sketch.relative_accuracy, &mut buf, ctx())?,
                2 => {
                    prost::encoding::sint32::merge(wire_type, &mut sketch.offset, &mut buf, ctx())?
                }
                3 | 8 | 9 => {
                    let varints = match tag {
                        3 => &mut sketch.counts,
                        8 => &mut sketch.sparse_gaps,
                        _ => &mut sketch.sparse_counts,
                    };
                    read_packed(varints, wire_type, &mut buf, &bytes)?;
                }
                4 => prost::encoding::uint64::merge(
                    wire_type,
                    &mut sketch.zero_count,
                    &mut buf,
                    ctx(),
                )?,
                5 => double(wire_type, &mut sketch.sum, &mut buf, ctx())?,
                6 => double(wire_type, &mut sketch.min, &mut buf, ctx())?,
                7 => double(wire_type, &mut sketch.max, &mut buf, ctx())?,
                _ => skip_unknown(wire_type, tag, &mut buf)?,
            }
        }
        sketch.bytes = bytes;
        Ok(sketch)
    }

    fn varints(&self, varints: Varints) -> VarintIter<'_> {
        VarintIter {
            bytes: self
                .bytes
                .get(varints.start..varints.end)
                .unwrap_or_default(),
            left: varints.len,
        }
    }
}

impl PartialEq for PackedSketch {
    /// The same sketch, whatever bytes each was read from.
    fn eq(&self, other: &Self) -> bool {
        let fields = |s: &Self| {
            (
                s.relative_accuracy,
                s.offset,
                s.zero_count,
                s.sum,
                s.min,
                s.max,
            )
        };
        let packed = |s: &Self| [s.counts, s.sparse_gaps, s.sparse_counts];
        fields(self) == fields(other)
            && packed(self)
                .into_iter()
                .zip(packed(other))
                .all(|(mine, theirs)| self.varints(mine).eq(other.varints(theirs)))
    }
}

/// Reads a packed repeated varint field of `buf`, the tail of `sketch`, into `varints`.
/// Unpacked, or packed in several runs, it is prost's to do.
fn read_packed(
    varints: &mut Varints,
    wire_type: WireType,
    buf: &mut &[u8],
    sketch: &[u8],
) -> Read<()> {
    if wire_type != WireType::LengthDelimited || varints.end > varints.start {
        return Err(LeftToProst);
    }
    let body = length_delimited(wire_type, buf)?;
    let start = sketch.len() - buf.len() - body.len();
    *varints = Varints::read(body, start)?;
    Ok(())
}

impl From<&v1::Sketch> for PackedSketch {
    fn from(sketch: &v1::Sketch) -> Self {
        let mut bytes = Vec::new();
        let mut pack = |values: &mut dyn ExactSizeIterator<Item = u64>| {
            let (start, len) = (bytes.len(), values.len());
            values.for_each(|value| prost::encoding::encode_varint(value, &mut bytes));
            Varints {
                start,
                end: bytes.len(),
                len,
            }
        };
        let counts = pack(&mut sketch.counts.iter().copied());
        let sparse_gaps = pack(&mut sketch.sparse_gaps.iter().map(|&gap| u64::from(gap)));
        let sparse_counts = pack(&mut sketch.sparse_counts.iter().copied());
        PackedSketch {
            relative_accuracy: sketch.relative_accuracy,
            offset: sketch.offset,
            zero_count: sketch.zero_count,
            sum: sketch.sum,
            min: sketch.min,
            max: sketch.max,
            counts,
            sparse_gaps,
            sparse_counts,
            bytes: bytes.into(),
        }
    }
}

impl TryFrom<&PackedSketch> for SparseSketch {
    type Error = SketchError;

    /// As `TryFrom<&v1::Sketch> for Sketch`, refusing the same sketches with the same errors;
    /// each varint is decoded once, into the sketch's own list of buckets.
    fn try_from(packed: &PackedSketch) -> Result<Self, Self::Error> {
        let parts = SketchParts {
            relative_accuracy: packed.relative_accuracy,
            offset: packed.offset,
            counts: &[],
            zero_count: packed.zero_count,
            sum: packed.sum,
            min: packed.min,
            max: packed.max,
        };
        if packed.sparse_gaps.len == 0 && packed.sparse_counts.len == 0 {
            let mut buckets = Vec::with_capacity(packed.counts.len);
            buckets.extend(flyball_sketch::dense_buckets(
                packed.offset,
                packed.varints(packed.counts),
            ));
            return SparseSketch::from_buckets(parts, buckets);
        }
        if packed.counts.len > 0 {
            return Err(SketchError::DenseAndSparse);
        }
        let mut buckets = Vec::with_capacity(packed.sparse_counts.len);
        // As prost reads a uint32: the low 32 bits.
        let gaps = packed.varints(packed.sparse_gaps).map(|gap| gap as u32);
        let counts = packed.varints(packed.sparse_counts);
        flyball_sketch::sparse_buckets(packed.offset, gaps, counts, &mut buckets)?;
        SparseSketch::from_buckets(parts, buckets)
    }
}

impl TryFrom<&PackedSketch> for Sketch {
    type Error = SketchError;

    fn try_from(packed: &PackedSketch) -> Result<Self, Self::Error> {
        SparseSketch::try_from(packed).map(|sparse| Sketch::from(&sparse))
    }
}

// === impl Varints ===

impl Varints {
    /// `body`'s varints, `body` lying at `start` in its sketch.
    fn read(body: &[u8], start: usize) -> Read<Self> {
        // A varint ends at its first byte below 0x80; one of more than 10 bytes, or whose tenth
        // takes it past 64 bits, or that does not end, is prost's to refuse. With fewer than 9
        // bytes of 0x80 or more in the whole field, no varint in it is longer than 9 bytes: only
        // the last one's end is left to check. A second of traffic seldom counts past 127 in a
        // bucket, so this is the common case, and counted so, the bytes are read many at a
        // time (the loop below took ~15% of reading a report, byte by byte).
        let ends = body.iter().filter(|&&byte| byte < 0x80).count();
        if body.len() - ends < 9 {
            if body.last().is_some_and(|&last| last >= 0x80) {
                return Err(LeftToProst);
            }
            return Ok(Varints {
                start,
                end: start + body.len(),
                len: ends,
            });
        }
        let (mut len, mut run) = (0, 0);
        for &byte in body {
            run += 1;
            if byte < 0x80 {
                if run == 10 && byte > 1 {
                    break;
                }
                (len, run) = (len + 1, 0);
            } else if run == 10 {
                break;
            }
        }
        if run > 0 {
            return Err(LeftToProst);
        }
        Ok(Varints {
            start,
            end: start + body.len(),
            len,
        })
    }
}

impl Iterator for VarintIter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        self.left = self.left.checked_sub(1)?;
        // Most counts and gaps are below 128: one byte.
        if let Some((&byte, rest)) = self.bytes.split_first()
            && byte < 0x80
        {
            self.bytes = rest;
            return Some(u64::from(byte));
        }
        // Checked when read, so this fails only if `len` were wrong: then the iterator ends.
        decode_varint(&mut self.bytes).ok().or_else(|| {
            self.left = 0;
            None
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for VarintIter<'_> {}

/// Skips a field none of these messages has. A group (proto2's, which no flyball.v1 sender
/// writes) is prost's: nested groups count against a recursion limit the reader does not track.
fn skip_unknown(wire_type: WireType, tag: u32, buf: &mut impl Buf) -> Read<()> {
    if wire_type == WireType::StartGroup {
        return Err(LeftToProst);
    }
    skip_field(wire_type, tag, buf, DecodeContext::default())?;
    Ok(())
}

/// Merges `Reporter` with prost, after checking that it holds no group (see [`skip_unknown`]).
fn merge_small(wire_type: WireType, message: &mut impl Message, buf: &mut &[u8]) -> Read<()> {
    let body = length_delimited(wire_type, buf)?;
    let mut fields = body;
    while fields.has_remaining() {
        let (tag, wire_type) = decode_key(&mut fields)?;
        skip_unknown(wire_type, tag, &mut fields)?;
    }
    message.merge(body)?;
    Ok(())
}

/// Reads a message of uint64 fields numbered from 1 (`RequestOutcomes`, `TokenUsage`...) into
/// `fields`, merging as prost does: the last value of a field wins, others are skipped.
fn read_uint64s<const N: usize>(
    wire_type: WireType,
    buf: &mut &[u8],
    mut fields: [&mut u64; N],
) -> Read<()> {
    let mut body = length_delimited(wire_type, buf)?;
    while body.has_remaining() {
        let (tag, wire_type) = decode_key(&mut body)?;
        let at = usize::try_from(tag).ok().and_then(|tag| tag.checked_sub(1));
        match at.and_then(|at| fields.get_mut(at)) {
            Some(field) => {
                let ctx = DecodeContext::default();
                prost::encoding::uint64::merge(wire_type, field, &mut body, ctx)?;
            }
            None => skip_unknown(wire_type, tag, &mut body)?,
        }
    }
    Ok(())
}

/// A length-delimited field's bytes, in place.
fn length_delimited<'a>(wire_type: WireType, buf: &mut &'a [u8]) -> Read<&'a [u8]> {
    prost::encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
    let len = usize::try_from(decode_varint(buf)?).map_err(|_| LeftToProst)?;
    let (body, rest) = buf.split_at_checked(len).ok_or(LeftToProst)?;
    *buf = rest;
    Ok(body)
}
