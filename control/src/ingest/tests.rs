#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::*;
use crate::window::WindowConfig;
use flyball_sketch::Sketch;

fn telemetry(base: Instant) -> Telemetry {
    telemetry_of(base, &["vllm"])
}

/// One pool per backend, `PoolId(i)` selecting `backends[i]`.
fn telemetry_of(base: Instant, backends: &[&str]) -> Telemetry {
    telemetry_configured(IngestConfig::default(), base, backends)
}

/// Pools selecting `backends`, one each, over `config`.
fn telemetry_configured(config: IngestConfig, base: Instant, backends: &[&str]) -> Telemetry {
    let pools = backends
        .iter()
        .map(|backend| Selector {
            backend: Some((*backend).into()),
            model: None,
        })
        .collect();
    Telemetry::new(config, WindowConfig::default(), pools, base)
}

fn report(
    gateway: &str,
    start_ms: u64,
    sequence: u64,
    ok: u64,
    in_flight: u64,
) -> v1::ReportRequest {
    v1::ReportRequest {
        reporter: Some(v1::Reporter {
            gateway: gateway.into(),
            process_start_unix_ms: start_ms,
            filter_version: "test".into(),
        }),
        sequence,
        sent_at_unix_ms: 0,
        keys: vec![v1::KeyTelemetry {
            backend: "vllm".into(),
            model: "llama".into(),
            requests: Some(v1::RequestOutcomes {
                ok,
                ..Default::default()
            }),
            in_flight: Some(v1::InFlight {
                waiting_first_token: 0,
                decoding: in_flight,
            }),
            ..Default::default()
        }],
        dropped: None,
        held_ms: 0,
        connections_closed: false,
    }
}

/// `report` as ingest reads it off the wire.
fn packed(report: v1::ReportRequest) -> flyball_proto::packed::ReportRequest {
    flyball_proto::packed::ReportRequest::from(&report)
}

fn at(base: Instant, ms: u64) -> Instant {
    base + Duration::from_millis(ms)
}

#[test]
fn a_resent_or_older_report_is_acknowledged_and_merged_once() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("gw", 1, 1, 5, 0), at(base, 0)).unwrap();
    t.ingest(report("gw", 1, 2, 5, 0), at(base, 1000)).unwrap();
    let resent = t.ingest(report("gw", 1, 2, 5, 0), at(base, 1010)).unwrap();
    assert_eq!(resent.admission, Admission::Duplicate);
    let older = t.ingest(report("gw", 1, 1, 5, 0), at(base, 1020)).unwrap();
    assert_eq!(older.admission, Admission::Duplicate);
    assert_eq!(
        t.pool(PoolId(0), at(base, 1030)).unwrap().totals.requests,
        10
    );
    assert_eq!(t.counters().duplicates.get(), 2);
    assert_eq!(t.counters().reports.get(), 2);
}

#[test]
fn a_sequence_jump_counts_one_gap_and_every_missing_report() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("gw", 1, 1, 1, 0), at(base, 0)).unwrap();
    let jumped = t.ingest(report("gw", 1, 5, 1, 0), at(base, 1000)).unwrap();
    assert_eq!(
        jumped.admission,
        Admission::Fresh {
            missing: 3,
            restart: false,
            revived: false
        }
    );
    assert_eq!(t.counters().gaps.get(), 1);
    assert_eq!(t.counters().missing_reports.get(), 3);
}

#[test]
fn the_first_report_seen_is_no_gap_whatever_its_sequence() {
    let base = Instant::now();
    let t = telemetry(base);
    let first = t.ingest(report("gw", 1, 42, 1, 0), at(base, 0)).unwrap();
    assert_eq!(
        first.admission,
        Admission::Fresh {
            missing: 0,
            restart: false,
            revived: false
        }
    );
    assert_eq!(t.counters().gaps.get(), 0);
}

#[test]
fn a_new_process_start_for_a_known_gateway_is_a_restart_with_its_own_sequence() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("gw", 100, 1, 1, 0), at(base, 0)).unwrap();
    t.ingest(report("gw", 100, 2, 1, 0), at(base, 1000))
        .unwrap();
    let restarted = t
        .ingest(report("gw", 200, 1, 1, 0), at(base, 2000))
        .unwrap();
    assert_eq!(
        restarted.admission,
        Admission::Fresh {
            missing: 0,
            restart: true,
            revived: false
        }
    );
    assert_eq!(t.counters().restarts.get(), 1);
    // A late report of the old process is its own reporter, not another restart.
    let late = t
        .ingest(report("gw", 100, 3, 1, 0), at(base, 2100))
        .unwrap();
    assert!(matches!(
        late.admission,
        Admission::Fresh { restart: false, .. }
    ));
    assert_eq!(t.counters().restarts.get(), 1);
    assert_eq!(
        t.pool(PoolId(0), at(base, 2200)).unwrap().totals.requests,
        4
    );
}

#[test]
fn in_flight_is_the_sum_of_each_live_gateways_latest_gauge() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("a", 1, 1, 0, 4), at(base, 0)).unwrap();
    t.ingest(report("b", 1, 1, 0, 3), at(base, 0)).unwrap();
    t.ingest(report("a", 1, 2, 0, 1), at(base, 1000)).unwrap();
    assert_eq!(
        t.pool(PoolId(0), at(base, 1000))
            .unwrap()
            .in_flight
            .decoding,
        4
    );
    // A key absent from a report has nothing in flight at that gateway.
    let mut empty = report("b", 1, 2, 0, 0);
    empty.keys.clear();
    t.ingest(empty, at(base, 1000)).unwrap();
    assert_eq!(
        t.pool(PoolId(0), at(base, 1100))
            .unwrap()
            .in_flight
            .decoding,
        1
    );
}

/// Just after the service starts, a pool's mean in flight counts from the first report heard: a
/// gateway first heard 0.9 s in, 10 decoding, reads as 10 at 1 s, not as the tenth of it that
/// the time before the report, counted as nothing in flight, made it.
#[test]
fn requests_in_flight_are_averaged_from_the_first_report_not_the_start() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("a", 1, 1, 0, 10), at(base, 900)).unwrap();
    let pool = t.pool(PoolId(0), at(base, 1_000)).unwrap();
    assert!((pool.short.mean_decoding() - 10.0).abs() < 1e-9, "{pool:?}");
    assert!(
        (pool.stable.mean_decoding() - 10.0).abs() < 1e-9,
        "{pool:?}"
    );
}

#[test]
fn a_silent_reporter_goes_stale_and_its_gauge_drops_out_until_it_reports_again() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("quiet", 1, 1, 0, 5), at(base, 0)).unwrap();
    t.ingest(report("quiet", 1, 2, 0, 5), at(base, 1000))
        .unwrap();
    for s in 0..=4 {
        t.ingest(report("busy", 1, s + 1, 0, 2), at(base, s * 1000))
            .unwrap();
    }
    assert_eq!(t.reporters(at(base, 3_900)).live, 2);
    assert_eq!(
        t.pool(PoolId(0), at(base, 3_900))
            .unwrap()
            .in_flight
            .decoding,
        7
    );
    // Silent for just over 3 s (3 s bound; 3 x its 1 s interval is no longer), seen at the
    // next sweep (every 300 ms: a tenth of the bound).
    assert_eq!(
        t.pool(PoolId(0), at(base, 4_200))
            .unwrap()
            .in_flight
            .decoding,
        2
    );
    assert_eq!(
        t.reporters(at(base, 4_300)),
        ReporterCounts { live: 1, stale: 1 }
    );

    let back = t
        .ingest(report("quiet", 1, 3, 0, 6), at(base, 5_000))
        .unwrap();
    assert!(matches!(
        back.admission,
        Admission::Fresh { revived: true, .. }
    ));
    assert_eq!(t.counters().revived.get(), 1);
    assert_eq!(
        t.pool(PoolId(0), at(base, 5_000))
            .unwrap()
            .in_flight
            .decoding,
        8
    );
}

#[test]
fn a_slow_reporter_gets_three_of_its_own_intervals_before_going_stale() {
    let base = Instant::now();
    let t = telemetry(base);
    // Its first 5 s gap is past the 3 s bound, so it counts only up to it (3 s, a 9 s bound);
    // the next one fits and is its interval.
    for s in 0..3 {
        t.ingest(report("slow", 1, s + 1, 0, 1), at(base, s * 5_000))
            .unwrap();
    }
    assert_eq!(t.reporters(at(base, 24_000)).live, 1);
    assert_eq!(t.reporters(at(base, 25_200)).stale, 1);
}

#[test]
fn a_reporter_that_comes_after_a_sweep_still_goes_stale_on_time() {
    // Sweeps skip until the soonest reporter is due; one that comes later, due sooner, must
    // bring that forward.
    let base = Instant::now();
    let t = telemetry(base);
    // Every 20 s: its limit grows to 3 x 20 s (9 s, then 27 s, then 60 s; see above).
    for s in 0..4 {
        t.ingest(report("slow", 1, s + 1, 0, 1), at(base, s * 20_000))
            .unwrap();
    }
    // A sweep: nothing is due before 120 s.
    assert_eq!(t.reporters(at(base, 60_500)).live, 1);
    t.ingest(report("fast", 1, 1, 0, 1), at(base, 61_000))
        .unwrap();
    assert_eq!(
        t.reporters(at(base, 64_500)),
        ReporterCounts { live: 1, stale: 1 }
    );
    assert_eq!(t.reporters(at(base, 119_000)).live, 1);
    assert_eq!(
        t.reporters(at(base, 120_500)),
        ReporterCounts { live: 0, stale: 2 }
    );
}

#[test]
fn a_reporter_back_from_a_long_silence_goes_stale_at_its_usual_bound_if_it_dies_again() {
    let base = Instant::now();
    let t = telemetry(base);
    for s in 0..5 {
        t.ingest(report("gw", 1, s + 1, 1, 0), at(base, s * 1_000))
            .unwrap();
    }
    // Back after 240 s with 50 in flight, then gone: the 240 s silence is not its cadence, so
    // its gauge leaves the sums within a few seconds, not after 3 x 240 s (past forget_after).
    t.ingest(report("gw", 1, 6, 1, 50), at(base, 244_000))
        .unwrap();
    let in_flight = |ms| t.pool(PoolId(0), at(base, ms)).unwrap().in_flight.decoding;
    assert_eq!(in_flight(244_000), 50);
    assert_eq!(in_flight(264_000), 0);
    assert_eq!(
        t.reporters(at(base, 264_000)),
        ReporterCounts { live: 0, stale: 1 }
    );
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
}

#[test]
fn a_long_silent_reporter_is_forgotten() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("gone", 1, 7, 0, 1), at(base, 0)).unwrap();
    assert_eq!(t.reporters(at(base, 10_000)).stale, 1);
    assert_eq!(
        t.reporters(at(base, 601_000)),
        ReporterCounts { live: 0, stale: 0 }
    );
    // Forgotten: an old sequence is new data again, and no gap.
    let again = t
        .ingest(report("gone", 1, 3, 0, 1), at(base, 602_000))
        .unwrap();
    assert!(matches!(
        again.admission,
        Admission::Fresh { missing: 0, .. }
    ));
}

#[test]
fn dropped_reports_count_what_the_reporter_newly_gave_up_on() {
    let base = Instant::now();
    let t = telemetry(base);
    let mut r = report("gw", 1, 1, 0, 0);
    r.dropped = Some(v1::DroppedTelemetry {
        reports: 2,
        requests: 10,
    });
    t.ingest(r.clone(), at(base, 0)).unwrap();
    r.sequence = 2;
    r.dropped = Some(v1::DroppedTelemetry {
        reports: 5,
        requests: 30,
    });
    t.ingest(r, at(base, 1000)).unwrap();
    assert_eq!(t.counters().reporter_dropped_reports.get(), 5);
}

#[test]
fn malformed_reports_are_refused_with_the_reason() {
    let base = Instant::now();
    let t = telemetry(base);
    let mut no_gateway = report("", 1, 1, 1, 0);
    assert_eq!(
        t.ingest(no_gateway.clone(), base).unwrap_err(),
        Refusal::NoGateway
    );
    no_gateway.reporter = None;
    assert_eq!(t.ingest(no_gateway, base).unwrap_err(), Refusal::NoGateway);

    let zero = report("gw", 1, 0, 1, 0);
    assert_eq!(
        t.ingest(zero, base).unwrap_err().to_string(),
        "sequence = 0: sequences start at 1"
    );

    let long = "g".repeat(MAX_NAME_BYTES + 1);
    assert_eq!(
        t.ingest(report(&long, 1, 1, 1, 0), base)
            .unwrap_err()
            .to_string(),
        "reporter.gateway: 1025 bytes, at most 1024"
    );
    let mut long_model = report("gw", 1, 1, 1, 0);
    long_model.keys[0].model = long.clone();
    assert_eq!(
        t.ingest(long_model, base).unwrap_err().reason(),
        "name_too_long"
    );

    let mut no_model = report("gw", 1, 1, 1, 0);
    no_model.keys[0].model.clear();
    assert_eq!(
        t.ingest(no_model, base).unwrap_err().to_string(),
        "keys[0].model is empty"
    );

    let mut bad = report("gw", 1, 1, 1, 0);
    let mut sketch = v1::Sketch::from(&Sketch::new());
    sketch.relative_accuracy = 0.01;
    bad.keys[0].tpot_us = Some(sketch);
    let refusal = t.ingest(bad, base).unwrap_err();
    assert_eq!(refusal.reason(), "bad_sketch");
    assert!(
        refusal
            .to_string()
            .starts_with("keys[0].tpot_us: relative_accuracy = 0.01")
    );
    assert_eq!(refusal.to_status().code(), tonic::Code::InvalidArgument);

    let mut many = report("gw", 1, 1, 1, 0);
    many.keys = vec![many.keys[0].clone(); 16_771];
    let refusal = t.ingest(many, base).unwrap_err();
    assert_eq!(
        refusal.to_string(),
        "keys: 16771 entries, at most 16770 per report"
    );
    assert_eq!(refusal.to_status().code(), tonic::Code::ResourceExhausted);

    // One bad or forged gauge would otherwise saturate the pool's sums and scale it to its max.
    let refusal = t.ingest(report("gw", 1, 1, 1, u64::MAX), base).unwrap_err();
    assert_eq!(
        refusal.to_string(),
        format!(
            "keys[0].in_flight.decoding = {}: above 1000000, not a figure one gateway reports",
            u64::MAX
        )
    );
    let mut tokens = report("gw", 1, 1, 1, 0);
    tokens.keys[0].tokens = Some(v1::TokenUsage {
        output: 1 << 50,
        ..Default::default()
    });
    let refusal = t.ingest(tokens, base).unwrap_err();
    assert!(refusal.to_string().starts_with("keys[0].tokens.output = "));
    // Nor may one sketch's count set a window's quantiles.
    let mut counts = report("gw", 1, 1, 1, 0);
    let mut forged = Sketch::new();
    forged.record_n(5_000.0, 1 << 50);
    counts.keys[0].ttft_us = Some(v1::Sketch::from(&forged));
    let refusal = t.ingest(counts, base).unwrap_err();
    assert_eq!(
        refusal.to_string(),
        format!(
            "keys[0].ttft_us.count = {}: above 1000000000000, not a figure one gateway reports",
            1u64 << 50
        )
    );

    // Nothing of the refused reports was merged, and each refusal was counted by reason.
    assert_eq!(t.pool(PoolId(0), base).unwrap().totals.requests, 0);
    let refused = |reason| {
        t.counters()
            .refused
            .get_or_create(&RefusedLabels { reason })
            .get()
    };
    assert_eq!(refused("no_gateway"), 2);
    assert_eq!(refused("zero_sequence"), 1);
    assert_eq!(refused("empty_key"), 1);
    assert_eq!(refused("bad_sketch"), 1);
    assert_eq!(refused("name_too_long"), 2);
    // At the bound, taken.
    let mut longest = report(&long[1..], 1, 1, 1, 0);
    longest.keys[0].model = long[1..].to_string();
    t.ingest(longest, base).unwrap();
    assert_eq!(refused("too_many_keys"), 1);
    assert_eq!(refused("implausible"), 3);
}

#[test]
fn latency_sketches_merge_into_the_pool_window() {
    let base = Instant::now();
    let t = telemetry(base);
    let mut expected = Sketch::new();
    for (i, values) in [[1_000.0, 90_000.0], [2_500.0, 400.0]].iter().enumerate() {
        let mut sketch = Sketch::new();
        for v in values {
            sketch.record(*v);
            expected.record(*v);
        }
        let mut r = report(&format!("gw{i}"), 1, 1, 2, 0);
        r.keys[0].ttft_us = Some(v1::Sketch::from(&sketch));
        t.ingest(r, at(base, 100)).unwrap();
    }
    let view = t.pool(PoolId(0), at(base, 200)).unwrap();
    assert_eq!(view.short.latency.ttft_us, expected);
}

#[test]
fn a_report_marks_only_the_pools_it_feeds_dirty() {
    let base = Instant::now();
    let t = telemetry_of(base, &["vllm", "other"]);
    let merged = t.ingest(report("gw", 1, 1, 1, 0), base).unwrap();
    assert_eq!(merged.pools, vec![PoolId(0)]);
}

#[test]
fn a_restart_retires_the_old_process_gauge_until_it_reports_again() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("gw", 100, 1, 0, 4), at(base, 0)).unwrap();
    t.ingest(report("gw", 200, 1, 0, 1), at(base, 500)).unwrap();
    assert_eq!(
        t.pool(PoolId(0), at(base, 600)).unwrap().in_flight.decoding,
        1
    );
    // The old process is not known to be gone: live until it goes quiet.
    assert_eq!(
        t.reporters(at(base, 700)),
        ReporterCounts { live: 2, stale: 0 }
    );
    // Still draining after a hot restart: counted again from its next report.
    t.ingest(report("gw", 100, 2, 0, 2), at(base, 1000))
        .unwrap();
    assert_eq!(
        t.pool(PoolId(0), at(base, 1100))
            .unwrap()
            .in_flight
            .decoding,
        3
    );
    assert_eq!(
        t.reporters(at(base, 1200)),
        ReporterCounts { live: 2, stale: 0 }
    );
    // A third process, then all silent, none with a connection seen to close: each is missing
    // (stale), then forgotten.
    t.ingest(report("gw", 300, 1, 0, 1), at(base, 2000))
        .unwrap();
    assert_eq!(
        t.pool(PoolId(0), at(base, 2100))
            .unwrap()
            .in_flight
            .decoding,
        1
    );
    assert_eq!(
        t.reporters(at(base, 2100)),
        ReporterCounts { live: 3, stale: 0 }
    );
    assert_eq!(
        t.reporters(at(base, 10_000)),
        ReporterCounts { live: 0, stale: 3 }
    );
    assert_eq!(recounted(&t), ReporterCounts { live: 0, stale: 3 });
    assert_eq!(
        t.reporters(at(base, 700_000)),
        ReporterCounts { live: 0, stale: 0 }
    );
}

/// The live and stale counts, recounted from the processes: a live process is not stale; a
/// stale one counts as stale unless gone with its connections closed.
fn recounted(t: &Telemetry) -> ReporterCounts {
    let state = t.lock();
    let processes = state.reporters.gateways.values().flat_map(|g| &g.processes);
    let mut counts = ReporterCounts::default();
    let mut total = 0;
    for p in processes {
        total += 1;
        match (p.stale, p.quiet_is_explained()) {
            (false, _) => counts.live += 1,
            (true, false) => counts.stale += 1,
            (true, true) => {}
        }
    }
    assert_eq!(state.reporters.processes, total, "processes remembered");
    counts
}

#[test]
fn after_a_hot_restart_the_old_process_that_drains_then_exits_is_not_a_silent_reporter() {
    let base = Instant::now();
    let t = telemetry(base);
    for s in 1..=5 {
        t.ingest(report("gw", 100, s, 1, 1), at(base, s * 1_000))
            .unwrap();
    }
    let old = t.connection_opened("gw", 100).unwrap();
    // Hot restart: the new process reports while the old one drains (and reports) for 5 s.
    for s in 6..=10 {
        t.ingest(report("gw", 200, s - 5, 1, 1), at(base, s * 1_000 - 500))
            .unwrap();
        t.ingest(report("gw", 100, s, 1, 1), at(base, s * 1_000))
            .unwrap();
    }
    assert_eq!(
        t.reporters(at(base, 10_000)),
        ReporterCounts { live: 2, stale: 0 }
    );
    assert_eq!(
        t.pool(PoolId(0), at(base, 10_000))
            .unwrap()
            .in_flight
            .decoding,
        2
    );
    // The old process exits, closing its connection; the new one goes on.
    assert_eq!(
        t.connection_closed("gw", 100, old, true, at(base, 10_100)),
        Some(10)
    );
    for s in 6..=30 {
        t.ingest(report("gw", 200, s, 1, 1), at(base, 5_500 + s * 1_000))
            .unwrap();
    }
    let now = at(base, 35_500);
    assert_eq!(t.reporters(now), ReporterCounts { live: 1, stale: 0 });
    assert_eq!(recounted(&t), ReporterCounts { live: 1, stale: 0 });
    assert_eq!(t.silent_feeders(PoolId(0)), 0);
    assert_eq!(t.pool(PoolId(0), now).unwrap().in_flight.decoding, 1);
    // Forgotten later without the counts going wrong.
    let mut ms = 35_500;
    let mut s = 31;
    while ms < 700_000 {
        ms += 1_000;
        t.ingest(report("gw", 200, s, 1, 1), at(base, ms)).unwrap();
        s += 1;
    }
    assert_eq!(
        t.reporters(at(base, ms)),
        ReporterCounts { live: 1, stale: 0 }
    );
    assert_eq!(recounted(&t), ReporterCounts { live: 1, stale: 0 });
    assert_eq!(t.lock().reporters.gateways["gw"].processes.len(), 1);
}

#[test]
fn an_old_process_first_seen_after_its_gateways_newer_one_is_gone_once_its_connection_closed() {
    for closes in [true, false] {
        let base = Instant::now();
        let t = telemetry(base);
        // This service restarted during a hot restart's drain: the new process reports first.
        t.ingest(report("gw", 200, 7, 1, 0), at(base, 0)).unwrap();
        t.ingest(report("gw", 100, 40, 1, 3), at(base, 500))
            .unwrap();
        let old = t.connection_opened("gw", 100).unwrap();
        assert_eq!(
            t.reporters(at(base, 600)),
            ReporterCounts { live: 2, stale: 0 }
        );
        if closes {
            assert_eq!(
                t.connection_closed("gw", 100, old, true, at(base, 700)),
                Some(40)
            );
        }
        for s in 8..=12 {
            t.ingest(report("gw", 200, s, 1, 0), at(base, (s - 7) * 1_000))
                .unwrap();
        }
        // Drained and exited: gone. Quiet with its connection open: missing, held for.
        let (stale, silent) = if closes { (0, 0) } else { (1, 1) };
        assert_eq!(
            t.reporters(at(base, 5_000)),
            ReporterCounts { live: 1, stale },
            "closes: {closes}"
        );
        assert_eq!(t.silent_feeders(PoolId(0)), silent, "closes: {closes}");
    }
}

#[test]
fn gateways_sharing_a_name_are_each_held_for_when_one_is_cut_off() {
    let base = Instant::now();
    let t = telemetry(base);
    // Two Envoys of one Deployment with one static node id, both reporting.
    for s in 1..=5 {
        t.ingest(report("envoy", 100, s, 1, 1), at(base, s * 1_000))
            .unwrap();
        t.ingest(report("envoy", 200, s, 1, 1), at(base, s * 1_000 + 500))
            .unwrap();
    }
    // The older one is cut off: it is missing, not taken as drained by the newer one's start.
    for s in 6..=12 {
        t.ingest(report("envoy", 200, s, 1, 1), at(base, s * 1_000 + 500))
            .unwrap();
    }
    assert_eq!(
        t.reporters(at(base, 12_600)),
        ReporterCounts { live: 1, stale: 1 }
    );
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
}

/// A report of `gateway` on one key of `backend`.
fn report_on(backend: &str, gateway: &str, start_ms: u64, sequence: u64) -> v1::ReportRequest {
    let mut report = report(gateway, start_ms, sequence, 1, 0);
    report.keys[0].backend = backend.into();
    report
}

#[test]
fn a_gateway_gone_quiet_leaves_only_the_pools_it_fed_with_silent_feeders() {
    let base = Instant::now();
    let t = telemetry_of(base, &["a", "b"]);
    let (pool_a, pool_b) = (PoolId(0), PoolId(1));
    for s in 0..=9 {
        t.ingest(report_on("a", "gw-a", 1, s + 1), at(base, s * 1000))
            .unwrap();
        if s < 2 {
            t.ingest(report_on("b", "gw-b", 1, s + 1), at(base, s * 1000))
                .unwrap();
        }
    }
    // gw-b went quiet after 1 s: stale past 3 s, seen at the next sweep.
    let stale = t.reporters(at(base, 9_000));
    assert_eq!(stale, ReporterCounts { live: 1, stale: 1 });
    assert_eq!(t.silent_feeders(pool_b), 1);
    assert_eq!(t.silent_feeders(pool_a), 0);

    // A new process reports under its name. That does not prove the old one gone (names may
    // be shared, clocks step): its load stays missing until its connections close or it is
    // forgotten.
    t.ingest(report_on("b", "gw-b", 2, 1), at(base, 10_000))
        .unwrap();
    t.reporters(at(base, 10_400));
    assert_eq!(t.silent_feeders(pool_b), 1);
    assert_eq!(t.silent_feeders(pool_a), 0);
}

#[test]
fn a_quiet_gateway_counts_until_it_reports_again_or_is_forgotten() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("gw", 1, 1, 1, 0), at(base, 0)).unwrap();
    let mut nothing = report("other", 1, 1, 0, 0);
    nothing.keys.clear();
    t.ingest(nothing, at(base, 0)).unwrap();
    t.reporters(at(base, 4_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    // Quiet for longer than the stable window: its load is still unaccounted for.
    t.reporters(at(base, 120_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    t.ingest(report("gw", 1, 2, 1, 0), at(base, 121_000))
        .unwrap();
    t.reporters(at(base, 121_400));
    assert_eq!(t.silent_feeders(PoolId(0)), 0);

    // Quiet again: stale soon (the 121 s silence is not its interval), forgotten 10 minutes
    // after its last report.
    t.reporters(at(base, 131_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1, "gw is quiet again");
    t.reporters(at(base, 722_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 0, "forgotten after 10 minutes");
}

#[test]
fn a_report_after_a_silence_is_shared_out_over_it_not_taken_as_a_burst() {
    let base = Instant::now();
    let t = telemetry(base);
    for s in 0..5 {
        t.ingest(report("gw", 1, s + 1, 10, 0), at(base, s * 1000))
            .unwrap();
    }
    // Cut off for 30 s, the gateway kept counting: 300 requests at the usual 10 a second.
    t.ingest(report("gw", 1, 6, 300, 0), at(base, 34_000))
        .unwrap();
    let view = t.pool(PoolId(0), at(base, 34_000)).unwrap();
    let rate = view.short.requests_per_s();
    assert!((9.0..12.0).contains(&rate), "short-window rate {rate}");
    assert_eq!(view.totals.requests, 350);
}

/// `report`, built at `sent_ms` by the reporter's clock.
fn report_sent(sequence: u64, ok: u64, sent_ms: u64) -> v1::ReportRequest {
    v1::ReportRequest {
        sent_at_unix_ms: sent_ms,
        ..report("gw", 1, sequence, ok, 0)
    }
}

#[test]
fn a_backlog_in_the_report_after_the_one_resent_is_shared_out_over_the_silence() {
    let base = Instant::now();
    let t = telemetry(base);
    // The reporter's clock is an hour off this service's: only its differences count.
    let clock = 3_600_000;
    for s in 1..=20 {
        t.ingest(report_sent(s, 10, clock + s * 1000), at(base, s * 1000))
            .unwrap();
    }
    // Cut off for 30 s. Report 21, built at 21 s and in flight when the link dropped, arrives
    // first, resent unchanged; 22, built once 21 was acknowledged, carries the 30 s backlog at
    // the usual 10 a second.
    t.ingest(report_sent(21, 10, clock + 21_000), at(base, 51_000))
        .unwrap();
    t.ingest(report_sent(22, 300, clock + 51_000), at(base, 52_000))
        .unwrap();
    let view = t.pool(PoolId(0), at(base, 52_100)).unwrap();
    let rate = view.short.requests_per_s();
    assert!((9.0..12.0).contains(&rate), "short-window rate {rate}");
    assert_eq!(view.totals.requests, 510);
}

#[test]
fn a_step_of_the_reporters_clock_does_not_stretch_its_report() {
    let base = Instant::now();
    let (stepped, steady) = (telemetry(base), telemetry(base));
    for s in 1..=20 {
        let sent = s * 1000;
        stepped
            .ingest(report_sent(s, 100, sent), at(base, s * 1000))
            .unwrap();
        steady
            .ingest(report_sent(s, 100, sent), at(base, s * 1000))
            .unwrap();
    }
    // One clock jumps an hour ahead between two reports a second apart.
    stepped
        .ingest(report_sent(21, 100, 21_000 + 3_600_000), at(base, 21_000))
        .unwrap();
    steady
        .ingest(report_sent(21, 100, 21_000), at(base, 21_000))
        .unwrap();
    let rate = |t: &Telemetry| {
        t.pool(PoolId(0), at(base, 21_100))
            .unwrap()
            .short
            .requests_per_s()
    };
    assert_eq!(rate(&stepped), rate(&steady));
}

/// Pools on backends "a" and "b"; room for one key.
fn telemetry_with_one_key(base: Instant) -> Telemetry {
    let selector = |backend: &str| Selector {
        backend: Some(backend.into()),
        model: None,
    };
    let config = IngestConfig {
        max_keys: 1,
        ..IngestConfig::default()
    };
    Telemetry::new(
        config,
        WindowConfig::default(),
        vec![selector("a"), selector("b")],
        base,
    )
}

#[test]
fn a_key_dropped_over_the_limit_marks_the_pools_it_would_feed_for_a_stable_window() {
    let base = Instant::now();
    let t = telemetry_with_one_key(base);
    let (pool_a, pool_b) = (PoolId(0), PoolId(1));
    t.ingest(report_on("a", "gw", 1, 1), at(base, 0)).unwrap();
    let merged = t
        .ingest(report_on("b", "gw", 1, 2), at(base, 1_000))
        .unwrap();
    assert_eq!(merged.keys_over_limit, 1);
    // Its pool is evaluated at once, and knows its load is short.
    assert_eq!(merged.pools, vec![pool_b]);
    assert!(t.keys_dropped_recently(pool_b, at(base, 1_000)));
    assert!(!t.keys_dropped_recently(pool_a, at(base, 1_000)));
    assert!(t.keys_dropped_recently(pool_b, at(base, 60_999)));
    assert!(!t.keys_dropped_recently(pool_b, at(base, 61_000)));
}

#[test]
fn a_key_idle_past_forget_after_and_the_stable_window_frees_its_place() {
    let base = Instant::now();
    let t = telemetry_with_one_key(base);
    let (pool_a, pool_b) = (PoolId(0), PoolId(1));
    t.ingest(report_on("a", "gw-a", 1, 1), at(base, 0)).unwrap();
    // Its gateway goes on reporting, without key a: a's model is gone.
    let mut sequence = 1;
    let mut keep_reporting = |until_ms: u64| {
        let mut ms = sequence * 1_000;
        while ms <= until_ms {
            sequence += 1;
            let mut nothing = report_on("a", "gw-a", 1, sequence);
            nothing.keys.clear();
            t.ingest(nothing, at(base, ms)).unwrap();
            ms += 1_000;
        }
    };
    keep_reporting(659_000);
    let refused = t.ingest(report_on("b", "gw-b", 1, 1), at(base, 659_000));
    assert_eq!(
        refused.unwrap().keys_over_limit,
        1,
        "a still holds the place"
    );

    keep_reporting(661_000);
    // Keys are evicted as reporters are swept, at most a second apart.
    t.reporters(at(base, 661_000));
    let merged = t
        .ingest(report_on("b", "gw-b", 1, 2), at(base, 661_000))
        .unwrap();
    assert_eq!(
        merged.keys_over_limit, 0,
        "a was evicted; b takes its place"
    );
    assert_eq!(merged.pools, vec![pool_b]);
    assert_eq!(t.lock().windows.key_count(), 1);
    // Pool a keeps what it counted; pool b counts only what merged.
    let total = |pool| t.pool(pool, at(base, 661_000)).unwrap().totals.requests;
    assert_eq!((total(pool_a), total(pool_b)), (1, 1));
}

#[test]
fn a_report_held_through_a_hand_over_lands_where_it_was_taken() {
    let base = Instant::now();
    let t = telemetry(base);
    let now = at(base, 100_000);
    // A follower held 15 s of one gateway's reports for the next leader: 15 of them arrive
    // together, each saying how long it waited.
    for sequence in 1..=15 {
        let mut held = report("gw", 1, sequence, 10, 0);
        held.held_ms = (15 - sequence) * 1_000;
        t.ingest(held, now).unwrap();
    }
    let view = t.pool(PoolId(0), now).unwrap();
    assert_eq!(view.totals.requests, 150);
    assert_eq!(view.stable.requests.total(), 150);
    // The 10 s short window holds the last 10 of them, not all 15 in one burst.
    assert_eq!(view.short.requests.total(), 100);
    assert_eq!(view.last_update, Some(now));
}

/// `gw` (process 1) reports every second from 1 s to 5 s on one connection; returns the number
/// ingest gave the process.
fn connected_reports(t: &Telemetry, base: Instant) -> u64 {
    let mut number = None;
    for s in 1..=5 {
        t.ingest(report("gw", 1, s, 1, 2), at(base, s * 1_000))
            .unwrap();
        if s == 1 {
            number = t.connection_opened("gw", 1);
        }
    }
    number.unwrap()
}

fn departed(t: &Telemetry) -> u64 {
    t.counters().departed.get()
}

#[test]
fn a_reporter_whose_connection_closed_while_it_was_live_is_gone_when_quiet_not_missing() {
    let base = Instant::now();
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    // Envoy exits: its connection closes right after its last report.
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
        Some(5)
    );
    let now = at(base, 9_000);
    assert_eq!(t.reporters(now), ReporterCounts { live: 0, stale: 0 });
    assert_eq!(recounted(&t), ReporterCounts { live: 0, stale: 0 });
    assert_eq!(t.silent_feeders(PoolId(0)), 0);
    assert_eq!(departed(&t), 1);
    // Forgotten later, the counts still right.
    assert_eq!(
        t.reporters(at(base, 700_000)),
        ReporterCounts { live: 0, stale: 0 }
    );
    assert_eq!(departed(&t), 1);
}

#[test]
fn a_close_that_overtakes_the_last_report_still_counts() {
    let base = Instant::now();
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
        Some(5)
    );
    // Report 6 was sent before Envoy exited, and merged after the close was seen.
    t.ingest(report("gw", 1, 6, 1, 2), at(base, 5_010)).unwrap();
    t.reporters(at(base, 9_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 0);
    assert_eq!(departed(&t), 1);
}

#[test]
fn a_connection_reaped_once_the_reporter_is_quiet_leaves_it_missing() {
    let base = Instant::now();
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    // Cut off: nothing closes until keepalive reaps the dead connection, long after.
    assert_eq!(
        t.reporters(at(base, 9_000)),
        ReporterCounts { live: 0, stale: 1 }
    );
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
        None
    );
    t.reporters(at(base, 90_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    assert_eq!(recounted(&t), ReporterCounts { live: 0, stale: 1 });
    assert_eq!(departed(&t), 0);
}

#[test]
fn a_reporter_with_a_connection_still_open_is_missing_when_quiet() {
    let base = Instant::now();
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    // Two connections (a hot restart's, or a pooling proxy's); one closes.
    assert_eq!(t.connection_opened("gw", 1), Some(gw));
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
        None
    );
    t.reporters(at(base, 9_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
}

#[test]
fn a_reporter_back_after_its_connection_closed_is_held_for_if_it_then_goes_quiet() {
    let base = Instant::now();
    // Back on a new connection.
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
        Some(5)
    );
    t.ingest(report("gw", 1, 6, 1, 2), at(base, 6_000)).unwrap();
    assert_eq!(t.connection_opened("gw", 1), Some(gw));
    t.reporters(at(base, 10_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    assert_eq!(recounted(&t), ReporterCounts { live: 0, stale: 1 });
    assert_eq!(departed(&t), 0);

    // Back with only a resend, on a new connection.
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
        Some(5)
    );
    let resent = t.ingest(report("gw", 1, 5, 1, 2), at(base, 5_500)).unwrap();
    assert_eq!(resent.admission, Admission::Duplicate);
    assert_eq!(t.connection_opened("gw", 1), Some(gw));
    t.reporters(at(base, 10_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);

    // Back through another replica (its reports forwarded here): past the one report a close
    // may overtake, it is there.
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
        Some(5)
    );
    t.ingest(report("gw", 1, 6, 1, 2), at(base, 6_000)).unwrap();
    t.ingest(report("gw", 1, 7, 1, 2), at(base, 7_000)).unwrap();
    t.reporters(at(base, 11_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    assert_eq!(departed(&t), 0);

    // Gone after all: counted departed, then a new connection carries a resend of it.
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
        Some(5)
    );
    t.reporters(at(base, 9_000));
    assert_eq!(recounted(&t), ReporterCounts { live: 0, stale: 0 });
    assert_eq!(t.connection_opened("gw", 1), Some(gw));
    assert_eq!(
        t.reporters(at(base, 9_100)),
        ReporterCounts { live: 0, stale: 1 }
    );
    assert_eq!(recounted(&t), ReporterCounts { live: 0, stale: 1 });
}

/// The forwarding replica's word that `gw` (process 1) closed its connections after `sequence`.
fn connections_closed(sequence: u64) -> v1::ReportRequest {
    let mut word = report("gw", 1, sequence, 0, 0);
    word.keys.clear();
    word.connections_closed = true;
    word
}

/// `gw` (process 1) reporting every second from 1 s to 5 s, forwarded by another replica.
fn forwarded_reports(base: Instant) -> Telemetry {
    let t = telemetry(base);
    for s in 1..=5 {
        t.ingest(report("gw", 1, s, 1, 2), at(base, s * 1_000))
            .unwrap();
    }
    t
}

#[test]
fn a_followers_word_that_a_reporters_connections_closed_counts_as_if_seen_here() {
    let base = Instant::now();
    let t = forwarded_reports(base);
    let word = t.ingest(connections_closed(5), at(base, 5_100)).unwrap();
    assert_eq!(word.admission, Admission::ConnectionsClosed);
    assert!(word.pools.is_empty());
    assert_eq!(t.counters().reports.get(), 5, "the word is not a report");
    t.reporters(at(base, 9_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 0);
    assert_eq!(departed(&t), 1);

    // A word that comes once the reporter is already quiet releases the hold then.
    let t = forwarded_reports(base);
    assert_eq!(
        t.reporters(at(base, 9_000)),
        ReporterCounts { live: 0, stale: 1 }
    );
    t.ingest(connections_closed(5), at(base, 9_100)).unwrap();
    assert_eq!(
        t.reporters(at(base, 10_000)),
        ReporterCounts { live: 0, stale: 0 }
    );
    assert_eq!(t.silent_feeders(PoolId(0)), 0);
    assert_eq!(recounted(&t), ReporterCounts { live: 0, stale: 0 });
    assert_eq!(departed(&t), 1);

    // The word may overtake one report, not two.
    let t = forwarded_reports(base);
    t.ingest(connections_closed(4), at(base, 5_100)).unwrap();
    t.reporters(at(base, 9_000));
    assert_eq!(departed(&t), 1);
    let t = forwarded_reports(base);
    t.ingest(connections_closed(3), at(base, 5_100)).unwrap();
    t.reporters(at(base, 9_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    assert_eq!(departed(&t), 0);

    // A connection of its own still open here outweighs the word.
    let t = forwarded_reports(base);
    assert!(t.connection_opened("gw", 1).is_some());
    t.ingest(connections_closed(5), at(base, 5_100)).unwrap();
    t.reporters(at(base, 9_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    assert_eq!(departed(&t), 0);
}

#[test]
fn a_connection_that_closes_after_its_reporter_was_forgotten_and_came_back_does_not_count() {
    let base = Instant::now();
    let t = telemetry(base);
    let old = connected_reports(&t, base);
    // Cut off for longer than `--forget-after`, its old connection still open: forgotten.
    t.reporters(at(base, 700_000));
    // Back on a new connection.
    t.ingest(report("gw", 1, 6, 1, 2), at(base, 700_100))
        .unwrap();
    let new = t.connection_opened("gw", 1).unwrap();
    assert_ne!(new, old);
    // Keepalive reaps the old connection at last: nothing to do with the process now.
    assert_eq!(
        t.connection_closed("gw", 1, old, true, at(base, 5_500)),
        None
    );
    // It is cut off again, its new connection open: missing, not gone.
    t.reporters(at(base, 705_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    assert_eq!(departed(&t), 0);
}

#[test]
fn a_shared_connection_closing_says_nothing_of_its_gateways() {
    let base = Instant::now();
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    // A proxy's connection, carrying other gateways too, closes (the proxy restarted).
    assert_eq!(
        t.connection_closed("gw", 1, gw, false, at(base, 5_500)),
        None
    );
    t.reporters(at(base, 9_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
    assert_eq!(departed(&t), 0);
}

#[test]
fn a_close_seen_after_the_reporter_went_quiet_does_not_count_even_before_the_sweep() {
    let base = Instant::now();
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    // Past the stale limit (3 s), though no sweep has marked it yet.
    assert_eq!(
        t.connection_closed("gw", 1, gw, true, at(base, 8_100)),
        None
    );
    t.reporters(at(base, 9_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 1);
}

#[test]
fn a_new_process_over_max_reporters_is_refused_and_its_pools_hold() {
    let base = Instant::now();
    let selector = |backend: &str| Selector {
        backend: Some(backend.into()),
        model: None,
    };
    let config = IngestConfig {
        max_reporters: 2,
        ..IngestConfig::default()
    };
    let t = Telemetry::new(
        config,
        WindowConfig::default(),
        vec![selector("a"), selector("b")],
        base,
    );
    let (pool_a, pool_b) = (PoolId(0), PoolId(1));
    t.ingest(report_on("a", "gw-1", 1, 1), at(base, 0)).unwrap();
    t.ingest(report_on("a", "gw-2", 1, 1), at(base, 0)).unwrap();
    let refusal = t
        .ingest(report_on("b", "gw-3", 1, 1), at(base, 500))
        .unwrap_err();
    assert_eq!(refusal.reason(), "too_many_reporters");
    assert_eq!(refusal.to_status().code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        t.counters()
            .refused
            .get_or_create(&RefusedLabels {
                reason: "too_many_reporters"
            })
            .get(),
        1
    );
    // The load it carried is unseen: its pool must not scale down on what is left.
    assert!(t.keys_dropped_recently(pool_b, at(base, 500)));
    assert!(!t.keys_dropped_recently(pool_a, at(base, 500)));
    // Known processes go on, and a restart of one is a new process too.
    t.ingest(report_on("a", "gw-1", 1, 2), at(base, 1_000))
        .unwrap();
    assert_eq!(
        t.ingest(report_on("a", "gw-2", 2, 1), at(base, 1_000))
            .unwrap_err()
            .reason(),
        "too_many_reporters"
    );
    assert_eq!(recounted(&t), ReporterCounts { live: 2, stale: 0 });
    // Once one is forgotten, there is room again.
    for s in 3..=700 {
        t.ingest(report_on("a", "gw-1", 1, s), at(base, s * 1_000))
            .unwrap();
    }
    t.reporters(at(base, 700_000));
    t.ingest(report_on("b", "gw-3", 1, 1), at(base, 700_000))
        .unwrap();
    assert_eq!(recounted(&t), ReporterCounts { live: 2, stale: 0 });
}

#[test]
fn a_report_forwarded_after_its_connection_here_closed_shows_the_gateway_running() {
    for (resend, late) in [(false, false), (true, false), (false, true)] {
        let base = Instant::now();
        let t = telemetry(base);
        let gw = connected_reports(&t, base);
        // Its connection here closes (a reset on the way, not an exit); it reconnects through a
        // follower, whose forwarding then stalls: one report, or a resend of the last, gets here.
        assert_eq!(
            t.connection_closed("gw", 1, gw, true, at(base, 5_500)),
            Some(5)
        );
        let sequence = if resend { 5 } else { 6 };
        let arrives = if late { 9_000 } else { 6_000 };
        if late {
            // Quiet past the stale limit first: counted gone, then the forwarded one comes.
            t.reporters(at(base, 8_900));
            assert_eq!(departed(&t), 1);
        }
        t.ingest_from(
            packed(report("gw", 1, sequence, 1, 2)),
            at(base, arrives),
            true,
        )
        .unwrap();
        // Quiet again, past any stale limit it learned.
        t.reporters(at(base, arrives + 12_000));
        assert_eq!(
            t.silent_feeders(PoolId(0)),
            1,
            "resend {resend}, late {late}: missing, held for"
        );
        recounted(&t);
    }
    // Straight from the gateway, report 6 may be the one its close overtook: still gone.
    let base = Instant::now();
    let t = telemetry(base);
    let gw = connected_reports(&t, base);
    t.connection_closed("gw", 1, gw, true, at(base, 5_500));
    t.ingest(report("gw", 1, 6, 1, 2), at(base, 6_000)).unwrap();
    t.reporters(at(base, 12_000));
    assert_eq!(t.silent_feeders(PoolId(0)), 0);
}

/// A leader failover (or a gateway reconnecting to another replica): this replica has run for a
/// minute but never saw `gw`, whose connection to the old leader broke at 21 s. Back 30 s
/// later, its report 21 (in flight when the link dropped) comes first, resent; report 22
/// carries the 30 s backlog at the usual 10 a second. It must be shared out, not one burst
/// (34 a second in the short window when its build time was discarded): 100 of it in the short
/// window, with report 21's 10, which lands where it arrives (nothing here tells its interval).
#[test]
fn a_backlog_from_a_gateway_first_seen_here_is_shared_out_over_the_silence() {
    let base = Instant::now();
    let t = telemetry(base);
    let clock = 3_600_000;
    t.ingest(report_sent(21, 10, clock + 21_000), at(base, 51_000))
        .unwrap();
    t.ingest(report_sent(22, 300, clock + 51_000), at(base, 52_000))
        .unwrap();
    let view = t.pool(PoolId(0), at(base, 52_100)).unwrap();
    assert_eq!(view.totals.requests, 310);
    let rate = view.short.requests_per_s();
    assert!((9.0..13.0).contains(&rate), "short-window rate {rate}");
}

/// A follower forwards reports 2 and 3 of a gateway whose connection then moves to this replica:
/// its report 4, sent directly, arrives first. 2 and 3 are merged when they come (late, their
/// gauges older than 4's), a resend of any is still a duplicate, and the totals are exact.
#[test]
fn a_forwarded_report_overtaken_by_a_newer_direct_one_is_merged_late_once() {
    let base = Instant::now();
    let t = telemetry(base);
    t.ingest(report("gw", 1, 1, 5, 0), at(base, 0)).unwrap();
    let newer = t.ingest(report("gw", 1, 4, 5, 1), at(base, 3000)).unwrap();
    assert!(matches!(
        newer.admission,
        Admission::Fresh { missing: 2, .. }
    ));
    for sequence in [3, 2] {
        let late = t
            .ingest_from(
                packed(report("gw", 1, sequence, 5, 7)),
                at(base, 3100),
                true,
            )
            .unwrap();
        assert_eq!(late.admission, Admission::Late, "report {sequence}");
    }
    for sequence in [1, 2, 3, 4] {
        let again = t
            .ingest_from(
                packed(report("gw", 1, sequence, 5, 7)),
                at(base, 3200),
                true,
            )
            .unwrap();
        assert_eq!(again.admission, Admission::Duplicate, "report {sequence}");
    }
    let view = t.pool(PoolId(0), at(base, 3300)).unwrap();
    assert_eq!(view.totals.requests, 20);
    assert_eq!(
        view.in_flight.total(),
        1,
        "report 4's gauge, not a late one's"
    );
    assert_eq!(t.counters().late_reports.get(), 2);
    assert_eq!(t.counters().reports.get(), 4);
    assert_eq!(t.counters().duplicates.get(), 4);

    // Beyond LATE_WITHIN behind, a report is taken for a resend, as before.
    t.ingest(report("gw", 1, 200, 5, 0), at(base, 4000))
        .unwrap();
    let far = t
        .ingest(report("gw", 1, 100, 5, 0), at(base, 4100))
        .unwrap();
    assert_eq!(far.admission, Admission::Duplicate);
    let near = t
        .ingest(report("gw", 1, 200 - LATE_WITHIN, 5, 0), at(base, 4100))
        .unwrap();
    assert_eq!(near.admission, Admission::Late);
}

/// A gateway process this replica first hears of through its direct report 5 (its connection
/// moved here; reports 3 and 4 still queued at a follower): nothing is known before a first
/// report, so no gap is counted, and 3 and 4 are merged late when they come.
#[test]
fn late_reports_of_a_process_first_seen_here_are_merged_without_a_gap() {
    let base = Instant::now();
    let t = telemetry(base);
    let first = t.ingest(report("gw", 1, 5, 5, 0), at(base, 0)).unwrap();
    assert!(matches!(
        first.admission,
        Admission::Fresh { missing: 0, .. }
    ));
    for sequence in [3, 4] {
        let late = t
            .ingest_from(packed(report("gw", 1, sequence, 5, 0)), at(base, 100), true)
            .unwrap();
        assert_eq!(late.admission, Admission::Late, "report {sequence}");
    }
    assert_eq!(t.counters().missing_reports.get(), 0);
    assert_eq!(t.counters().late_reports.get(), 2);
    assert_eq!(
        t.pool(PoolId(0), at(base, 200)).unwrap().totals.requests,
        15
    );
}

/// README: keys over `--max-keys` hold their pools' scale-down "for a stable window", and
/// "while a gateway that fed a pool in the stable window is quiet (and not yet forgotten), that
/// pool's load may be short, so it ... does not scale down (`silent_reporter_hold`)". A gateway
/// whose telemetry for a pool was all over the key limit fed that pool too: once it goes quiet
/// (cut off, not gone: its connection never closed), nothing of its load is known. Yet ingest
/// notes a process as a pool's feeder only through keys it admitted, so a stable window after the
/// quiet gateway's last dropped key the pool reads fresh and complete, and may scale down (to
/// zero, with scaleToZero) on the other gateways' load alone.
#[test]
fn a_quiet_gateway_whose_keys_were_over_the_limit_still_holds_its_pool() {
    use flyball_policy::inputs::Freshness;
    let base = Instant::now();
    let t = telemetry_with_one_key(base);
    let pool_b = PoolId(1);
    let freshness_of_b = |now: Instant| {
        crate::controller::freshness(
            t.reporters(now).live,
            t.last_report(),
            t.silent_feeders(pool_b),
            t.keys_dropped_recently(pool_b, now),
            t.fresh_until(),
            now,
        )
    };
    // gw-a takes the one place with key a and reports every second throughout.
    // gw-b reports pool b's key for 5 s, all of it over the limit, then is cut off.
    for s in 0..=120 {
        t.ingest(report_on("a", "gw-a", 1, s + 1), at(base, s * 1_000))
            .unwrap();
        if s < 5 {
            let merged = t
                .ingest(report_on("b", "gw-b", 1, s + 1), at(base, s * 1_000))
                .unwrap();
            assert_eq!(merged.keys_over_limit, 1);
        }
        if s == 30 {
            assert!(
                matches!(freshness_of_b(at(base, 30_000)), Freshness::Partial { .. }),
                "within a stable window of the drop, pool b holds"
            );
        }
    }
    let now = at(base, 120_500);
    assert_eq!(t.reporters(now), ReporterCounts { live: 1, stale: 1 });
    let fresh = freshness_of_b(now);
    assert!(
        matches!(fresh, Freshness::Partial { .. }),
        "gw-b, which sent pool b's only telemetry, is quiet and not forgotten: pool b's load is \
         unknown, yet it reads {fresh:?}"
    );
}

/// README: telemetry "turned away for want of room" holds the pools it would feed
/// (`keys_over_limit_hold`, for keys over `--max-keys` and for a reporter over
/// `--max-reporters`, refused `RESOURCE_EXHAUSTED`). A report with more keys than
/// `--max-keys-per-report` (a gateway whose label caps were raised past the defaults) is
/// refused `RESOURCE_EXHAUSTED` too, every key of it lost, and the pools its keys select are
/// held as well: pool b, whose whole load is in such reports, does not read fresh and idle
/// while the other gateway reports.
#[test]
fn a_report_refused_for_too_many_keys_holds_the_pools_it_would_feed() {
    use flyball_policy::inputs::Freshness;
    let base = Instant::now();
    let config = IngestConfig {
        max_keys_per_report: 8,
        ..IngestConfig::default()
    };
    let t = telemetry_configured(config, base, &["a", "b"]);
    let pool_b = PoolId(1);
    let max = t.config().max_keys_per_report;
    let crowded = |sequence: u64| {
        let mut report = report_on("b", "gw-crowded", 1, sequence);
        let key = report.keys[0].clone();
        for i in 0..max {
            report.keys.push(v1::KeyTelemetry {
                backend: "c".into(),
                model: format!("lora-{i}"),
                ..key.clone()
            });
        }
        report
    };
    for s in 0..30 {
        t.ingest(report_on("a", "gw-a", 1, s + 1), at(base, s * 1_000))
            .unwrap();
        let refusal = t.ingest(crowded(s + 1), at(base, s * 1_000)).unwrap_err();
        assert_eq!(refusal.reason(), "too_many_keys");
        assert_eq!(refusal.to_status().code(), tonic::Code::ResourceExhausted);
    }
    let now = at(base, 29_500);
    let fresh = crate::controller::freshness(
        t.reporters(now).live,
        t.last_report(),
        t.silent_feeders(pool_b),
        t.keys_dropped_recently(pool_b, now),
        t.fresh_until(),
        now,
    );
    assert!(
        matches!(fresh, Freshness::Partial { .. }),
        "pool b's every report was turned away for want of room, yet it reads {fresh:?}"
    );
}

/// A replica that is stopping steps down before its servers have drained, and its followers'
/// streams end: a report it took and acknowledged then would reach no other replica. It refuses
/// it instead (`UNAVAILABLE`), from a gateway or a follower alike, and counts the refusal; the
/// sender goes to another replica.
#[tokio::test]
async fn a_stopping_replica_refuses_reports_so_they_go_elsewhere() {
    let base = Instant::now();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let service = IngestService::new(Arc::new(telemetry(base)), stopping);
    let forwarder: Arc<str> = Arc::from("b#1");
    assert!(
        service
            .merge(ReceivedReport::new(report("gw", 1, 1, 1, 2)), None)
            .is_ok()
    );
    stop.send(true).unwrap();
    for forwarded_by in [None, Some(&forwarder)] {
        let refused = service
            .merge(ReceivedReport::new(report("gw", 1, 2, 1, 2)), forwarded_by)
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused.message().contains("shutting down"), "{refused}");
    }
    let counters = service.telemetry.counters();
    assert_eq!(
        counters
            .refused
            .get_or_create(&RefusedLabels { reason: STOPPING })
            .get(),
        2
    );
    assert_eq!(counters.reports.get(), 1);
}

/// A stream's task may first look for the stop with its budget spent (much other work in the
/// same poll); the stop must still wake it once it comes.
#[tokio::test]
async fn a_stop_wakes_a_stream_that_first_looked_for_it_out_of_budget() {
    let (stop, signal) = tokio::sync::watch::channel(false);
    let mut watch = StopWatch::new(&signal);
    let mut first = true;
    let waiting = tokio::spawn(std::future::poll_fn(move |cx| {
        if std::mem::take(&mut first) {
            while let std::task::Poll::Ready(spent) = tokio::task::coop::poll_proceed(cx) {
                spent.made_progress();
            }
        }
        if watch.stopped(cx) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }));
    // Let it poll, out of budget, and again (the budget's own wake-up) until it waits.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!waiting.is_finished(), "nothing stopped yet");
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the stop woke the stream's task")
        .unwrap();
}
