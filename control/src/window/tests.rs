#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::*;
use proptest::prelude::*;

fn at(base: Instant, ms: u64) -> Instant {
    base + Duration::from_millis(ms)
}

fn requests(ok: u64, errors: u64) -> Delta {
    Delta {
        requests: RequestOutcomes {
            ok,
            server_error: errors,
            ..Default::default()
        },
        tokens: TokenUsage {
            input: 10 * ok,
            output: 100 * ok,
            ..Default::default()
        },
        latency: ReportedLatencies::default(),
    }
}

fn ttft(values_us: &[f64]) -> Delta {
    let mut sketch = Sketch::new();
    for v in values_us {
        sketch.record(*v);
    }
    let mut delta = Delta::default();
    delta.latency.ttft_us = SparseSketch::from(&sketch);
    delta
}

#[test]
fn counts_leave_the_short_window_then_the_stable_window() {
    let base = Instant::now();
    let mut window = Window::new(&WindowConfig::default(), base);
    window.record(at(base, 500), &requests(7, 0));

    let short = Duration::from_secs(10);
    let stable = Duration::from_secs(60);
    assert_eq!(window.summary(at(base, 9_900), short).requests.ok, 7);
    assert_eq!(window.summary(at(base, 10_000), short).requests.ok, 0);
    assert_eq!(window.summary(at(base, 59_999), stable).requests.ok, 7);
    assert_eq!(window.summary(at(base, 60_000), stable).requests.ok, 0);
}

#[test]
fn rates_divide_by_the_time_the_buckets_cover() {
    let base = Instant::now();
    let mut window = Window::new(&WindowConfig::default(), base);
    for s in 0..20 {
        window.record(at(base, s * 1000 + 500), &requests(100, 5));
    }
    // Buckets 11..=20 at t = 20 s: nine full buckets of data over nine seconds.
    let summary = window.summary(at(base, 20_000), Duration::from_secs(10));
    assert_eq!(summary.covered, Duration::from_secs(9));
    assert_eq!(summary.requests.total(), 9 * 105);
    assert!((summary.requests_per_s() - 105.0).abs() < 1e-9);
    assert!((summary.errors_per_s() - 5.0).abs() < 1e-9);
    assert!((summary.output_tokens_per_s() - 10_000.0).abs() < 1e-9);
}

#[test]
fn just_after_start_rates_cover_one_bucket_at_least() {
    let base = Instant::now();
    let mut window = Window::new(&WindowConfig::default(), base);
    window.record(at(base, 10), &requests(50, 0));
    let summary = window.summary(at(base, 20), Duration::from_secs(10));
    assert_eq!(summary.covered, Duration::from_secs(1));
    assert!((summary.requests_per_s() - 50.0).abs() < 1e-9);
    let later = window.summary(at(base, 4_000), Duration::from_secs(10));
    assert_eq!(later.covered, Duration::from_secs(4));
}

#[test]
fn quantiles_come_from_the_merged_sketches_of_the_window() {
    let base = Instant::now();
    let mut window = Window::new(&WindowConfig::default(), base);
    window.record(at(base, 100), &ttft(&[1_000.0, 2_000.0]));
    window.record(at(base, 3_100), &ttft(&[3_000.0]));
    window.record(at(base, 3_200), &ttft(&[400_000.0]));

    let mut expected = Sketch::new();
    for v in [1_000.0, 2_000.0, 3_000.0, 400_000.0] {
        expected.record(v);
    }
    let summary = window.summary(at(base, 5_000), Duration::from_secs(10));
    assert_eq!(summary.latency.ttft_us, expected);
    assert_eq!(summary.latency.ttft_us.count(), 4);
    assert_eq!(summary.latency.tpot_us.count(), 0);
}

#[test]
fn a_recycled_slot_forgets_what_it_held_a_ring_ago() {
    let base = Instant::now();
    let config = WindowConfig::try_new(
        Duration::from_secs(1),
        Duration::from_secs(2),
        Duration::from_secs(4),
    )
    .unwrap();
    let mut window = Window::new(&config, base);
    window.record(at(base, 500), &requests(1, 0));
    // Bucket 4 shares bucket 0's slot.
    window.record(at(base, 4_500), &requests(2, 0));
    let summary = window.summary(at(base, 4_600), Duration::from_secs(4));
    assert_eq!(summary.requests.ok, 2);
}

#[test]
fn a_late_record_for_a_recycled_bucket_is_dropped_not_mixed_in() {
    let base = Instant::now();
    let config = WindowConfig::try_new(
        Duration::from_secs(1),
        Duration::from_secs(2),
        Duration::from_secs(4),
    )
    .unwrap();
    let mut window = Window::new(&config, base);
    window.record(at(base, 4_500), &requests(2, 0));
    window.record(at(base, 500), &requests(1, 0));
    assert_eq!(
        window
            .summary(at(base, 4_600), Duration::from_secs(4))
            .requests
            .ok,
        2
    );
}

#[test]
fn window_config_names_the_rule_it_breaks() {
    let s = Duration::from_secs;
    assert_eq!(
        WindowConfig::try_new(s(1), s(10), s(5))
            .unwrap_err()
            .to_string(),
        "--stable-window = 5s: must be at least --short-window (10s)"
    );
    assert!(WindowConfig::try_new(Duration::from_millis(1), s(1), s(1)).is_err());
    assert!(WindowConfig::try_new(s(1), Duration::from_millis(500), s(1)).is_err());
    assert!(WindowConfig::try_new(Duration::from_millis(10), s(1), s(3600)).is_err());
    assert!(WindowConfig::try_new(Duration::from_millis(100), s(1), s(60)).is_ok());
}

fn selector(backend: Option<&str>, model: Option<&str>) -> Selector {
    Selector {
        backend: backend.map(str::to_owned),
        model: model.map(str::to_owned),
    }
}

#[test]
fn a_pool_sums_the_keys_its_selector_matches() {
    let base = Instant::now();
    let mut windows = Windows::new(WindowConfig::default(), base, 100);
    windows.set_pools(vec![
        selector(Some("vllm"), None),
        selector(None, Some("llama")),
    ]);
    let a = windows.key("vllm", "llama").unwrap();
    let b = windows.key("vllm", "qwen").unwrap();
    let c = windows.key("sglang", "llama").unwrap();
    assert_eq!(windows.pools_of(a), &[PoolId(0), PoolId(1)]);
    assert_eq!(windows.pools_of(b), &[PoolId(0)]);
    assert_eq!(windows.pools_of(c), &[PoolId(1)]);

    let now = at(base, 1_500);
    windows.record(a, None, now, &requests(1, 0));
    windows.record(b, None, now, &requests(2, 1));
    windows.record(c, None, now, &requests(4, 0));
    let busy = InFlight {
        waiting_first_token: 3,
        decoding: 5,
    };
    windows.replace_in_flight(b, InFlight::default(), busy, now);
    windows.replace_in_flight(c, InFlight::default(), busy, now);

    let vllm = windows.pool(PoolId(0), now).unwrap();
    assert_eq!(vllm.totals.requests, 4);
    assert_eq!(vllm.totals.errors, 1);
    assert_eq!(vllm.totals.output_tokens, 300);
    assert_eq!(vllm.in_flight, busy);
    assert_eq!(vllm.last_update, Some(now));
    let llama = windows.pool(PoolId(1), now).unwrap();
    assert_eq!(llama.short.requests.total(), 5);
    assert_eq!(llama.in_flight.total(), 8);

    windows.replace_in_flight(c, busy, InFlight::default(), now);
    assert_eq!(windows.pool(PoolId(1), now).unwrap().in_flight.total(), 0);
}

/// What a latency over a window answers to: the requests in flight over that window, not at its
/// end. Gateways' gauges are held from one report to the next.
#[test]
fn a_window_knows_the_mean_in_flight_over_its_span_not_only_the_last_gauge() {
    let base = Instant::now();
    let mut windows = Windows::new(WindowConfig::default(), base, 100);
    windows.set_pools(vec![selector(Some("vllm"), None)]);
    let key = windows.key("vllm", "llama").unwrap();
    let decoding = |n| InFlight {
        waiting_first_token: 1,
        decoding: n,
    };
    // Two gateways: one reports 40 decoding from 0 to 30 s then none; the other 10 throughout,
    // each once a second (its old gauge out, its new one in, as ingest does).
    let mut first = InFlight::default();
    let mut second = InFlight::default();
    for s in 0..60 {
        let now = at(base, s * 1000 + 250);
        let next = decoding(if s < 30 { 40 } else { 0 });
        windows.replace_in_flight(key, first, next, now);
        first = next;
        let now = at(base, s * 1000 + 750);
        windows.replace_in_flight(key, second, decoding(10), now);
        second = decoding(10);
    }
    let now = at(base, 60_000);
    let pool = windows.pool(PoolId(0), now).unwrap();
    // At the end: 10 decoding (and 2 waiting), while the minute's mean was 10 + 40 / 2.
    assert_eq!(pool.in_flight.decoding, 10);
    assert!((pool.stable.mean_decoding() - 30.0).abs() < 0.5, "{pool:?}");
    assert!((pool.stable.mean_waiting() - 2.0).abs() < 0.05, "{pool:?}");
    // The last ten seconds: the 10 alone (the first gateway's 0s held since 30 s).
    assert!((pool.short.mean_decoding() - 10.0).abs() < 0.05, "{pool:?}");
    // The key's own windows hold the same.
    let keys = windows.keys(now);
    assert!((keys[0].view.stable.mean_decoding() - 30.0).abs() < 0.5);
    // A gauge held without a report since counts up to `now`, not to its last report: a minute
    // later, the 10 decoding alone fill the whole stable window.
    let later = windows.pool(PoolId(0), at(base, 120_000)).unwrap();
    assert!(
        (later.stable.mean_decoding() - 10.0).abs() < 0.05,
        "{later:?}"
    );
}

/// A span longer than the ring keeps only what the ring covers, even a ring of one bucket.
#[test]
fn in_flight_time_older_than_the_kept_buckets_is_not_kept() {
    let base = Instant::now();
    let ten = Duration::from_secs(10);
    for config in [
        WindowConfig::try_new(ten, ten, ten).unwrap(),
        WindowConfig::default(),
    ] {
        let mut window = Window::new(&config, base);
        let one = InFlight {
            waiting_first_token: 0,
            decoding: 1,
        };
        // One request decoding from 0 to 95 s.
        window.accrue_in_flight(base, at(base, 95_000), one);
        let now = at(base, 95_000);
        let summary = window.summary(now, config.stable());
        // The ring holds 90..95 s of it in one bucket of 10 s, or 36..95 s in 60 of 1 s.
        assert_eq!(
            Duration::from_micros(summary.in_flight.decoding_us),
            summary.spanned,
            "{config:?}"
        );
        assert!((summary.mean_decoding() - 1.0).abs() < 1e-9, "{config:?}");
    }
    // Its open stretch, not yet in the buckets, counts the same way.
    let config = WindowConfig::try_new(ten, ten, ten).unwrap();
    let mut windows = Windows::new(config, base, 10);
    windows.set_pools(vec![selector(None, None)]);
    let key = windows.key("b", "m").unwrap();
    let one = InFlight {
        waiting_first_token: 1,
        decoding: 1,
    };
    windows.replace_in_flight(key, InFlight::default(), one, base);
    let view = windows.pool(PoolId(0), at(base, 95_000)).unwrap();
    assert_eq!(view.stable.spanned, Duration::from_secs(5));
    assert!((view.stable.mean_decoding() - 1.0).abs() < 1e-9, "{view:?}");
    assert!((view.stable.mean_waiting() - 1.0).abs() < 1e-9, "{view:?}");
}

fn decoding(n: u64) -> InFlight {
    InFlight {
        waiting_first_token: 0,
        decoding: n,
    }
}

/// Just after the service starts, requests in flight are known only from the first report it
/// heard: the mean is taken over the time since, not over the time before anything was known,
/// which would count as none in flight.
#[test]
fn requests_in_flight_are_averaged_from_the_first_report_heard() {
    let base = Instant::now();
    let mut windows = Windows::new(WindowConfig::default(), base, 10);
    windows.set_pools(vec![selector(None, None)]);
    let key = windows.key("b", "m").unwrap();
    // A gateway reporting each second, first heard 0.9 s after the start, 10 decoding.
    let first = at(base, 900);
    windows.note_heard(first);
    windows.replace_in_flight(key, InFlight::default(), decoding(10), first);
    let view = windows.pool(PoolId(0), at(base, 1_000)).unwrap();
    assert_eq!(view.short.spanned, Duration::from_millis(100));
    assert!((view.short.mean_decoding() - 10.0).abs() < 1e-9, "{view:?}");
    assert!(
        (view.stable.mean_decoding() - 10.0).abs() < 1e-9,
        "{view:?}"
    );
    let keys = windows.keys(at(base, 1_000));
    assert!((keys[0].view.short.mean_decoding() - 10.0).abs() < 1e-9);
    // Once the window reaches past the first report, it spans the window again.
    let later = windows.pool(PoolId(0), at(base, 20_500)).unwrap();
    assert_eq!(later.short.spanned, Duration::from_millis(9_500));
    assert!(
        (later.short.mean_decoding() - 10.0).abs() < 1e-9,
        "{later:?}"
    );
}

/// A key absent from the reports has none in flight: once the service hears reports, the time
/// before a key first appears counts, as zeros, in its mean and its pool's.
#[test]
fn time_before_a_key_appears_counts_as_nothing_in_flight_once_reports_are_heard() {
    let base = Instant::now();
    let mut windows = Windows::new(WindowConfig::default(), base, 10);
    windows.set_pools(vec![selector(Some("b"), None)]);
    // Another backend's gateway reports from 0.5 s on; backend b's key appears at 5.5 s, with
    // 10 decoding until 10.5 s.
    windows.note_heard(at(base, 500));
    let key = windows.key("b", "m").unwrap();
    windows.note_heard(at(base, 5_500));
    windows.replace_in_flight(key, InFlight::default(), decoding(10), at(base, 5_500));
    let now = at(base, 10_500);
    let view = windows.pool(PoolId(0), now).unwrap();
    assert_eq!(view.stable.spanned, Duration::from_secs(10));
    assert!((view.stable.mean_decoding() - 5.0).abs() < 1e-9, "{view:?}");
    let keys = windows.keys(now);
    assert!((keys[0].view.stable.mean_decoding() - 5.0).abs() < 1e-9);
}

#[test]
fn keys_beyond_the_limit_are_not_registered() {
    let mut windows = Windows::new(WindowConfig::default(), Instant::now(), 2);
    assert!(windows.key("a", "m").is_some());
    assert!(windows.key("b", "m").is_some());
    assert!(windows.key("c", "m").is_none());
    assert!(windows.key("a", "m").is_some());
    assert_eq!(windows.key_count(), 2);
}

#[test]
fn idle_keys_are_evicted_and_their_ids_reused_but_not_keys_with_requests_in_flight() {
    let base = Instant::now();
    let mut windows = Windows::new(WindowConfig::default(), base, 2);
    windows.set_pools(vec![selector(None, Some("llama"))]);
    let idle = windows.key("a", "llama").unwrap();
    let busy = windows.key("b", "llama").unwrap();
    windows.record(idle, None, base, &requests(3, 0));
    windows.record(busy, None, base, &requests(5, 0));
    let gauge = InFlight {
        waiting_first_token: 0,
        decoding: 2,
    };
    windows.replace_in_flight(busy, InFlight::default(), gauge, base);

    let idle_for = Duration::from_secs(600);
    assert_eq!(windows.evict_idle(at(base, 599_999), idle_for), vec![]);
    assert_eq!(windows.evict_idle(at(base, 600_000), idle_for), vec![idle]);
    assert_eq!(windows.key_count(), 1);
    assert_eq!(windows.keys(base).len(), 1);
    // The pool keeps its totals and the in-flight of the key that stays.
    let pool = windows.pool(PoolId(0), at(base, 600_000)).unwrap();
    assert_eq!((pool.totals.requests, pool.in_flight.total()), (8, 2));

    // A new key takes the free id, with nothing of the old one's.
    let next = windows.key("c", "llama").unwrap();
    assert_eq!(next, idle);
    assert_eq!(windows.pools_of(next), &[PoolId(0)]);
    assert_eq!(
        windows
            .keys(base)
            .iter()
            .map(|k| k.view.totals.requests)
            .sum::<u64>(),
        5
    );
    // The old name is a new key again, over the limit now.
    assert!(windows.key("a", "llama").is_none());
}

#[test]
fn replacing_pools_keeps_unchanged_pools_and_builds_new_ones_from_their_keys() {
    let base = Instant::now();
    let mut windows = Windows::new(WindowConfig::default(), base, 100);
    windows.set_pools(vec![selector(Some("vllm"), None)]);
    let key = windows.key("vllm", "llama").unwrap();
    let other = windows.key("sglang", "qwen").unwrap();
    windows.record(key, None, at(base, 100), &requests(3, 0));
    windows.record(other, None, at(base, 100), &requests(5, 0));

    windows.set_pools(vec![
        selector(Some("vllm"), None),
        selector(None, Some("llama")),
    ]);
    assert_eq!(windows.pools_of(key), &[PoolId(0), PoolId(1)]);
    assert_eq!(windows.pools_of(other), &[] as &[PoolId]);
    let totals = |w: &Windows, id| w.pool(id, at(base, 200)).unwrap().totals.requests;
    assert_eq!(totals(&windows, PoolId(0)), 3);
    // The new pool already holds what its key saw before it existed.
    assert_eq!(totals(&windows, PoolId(1)), 3);
}

#[test]
fn a_pool_built_from_its_keys_equals_one_that_was_there_all_along() {
    let base = Instant::now();
    let config = WindowConfig::try_new(
        Duration::from_millis(100),
        Duration::from_secs(1),
        Duration::from_secs(3),
    )
    .unwrap();
    let mut windows = Windows::new(config, base, 100);
    windows.set_pools(vec![selector(None, Some("llama"))]);
    let a = windows.key("vllm", "llama").unwrap();
    let b = windows.key("sglang", "llama").unwrap();
    // Six seconds of traffic: older buckets have been recycled in the ring.
    for ms in (0..6_000).step_by(70) {
        windows.record(a, None, at(base, ms), &requests(1 + ms % 3, ms % 2));
        windows.record(b, None, at(base, ms), &ttft(&[1_000.0 + ms as f64]));
    }
    let now = at(base, 6_050);
    let before = windows.pool(PoolId(0), now).unwrap();

    // The same selector under a new id, and the old id dropped.
    windows.assign_pools(vec![(PoolId(3), selector(None, Some("llama")))]);
    assert_eq!(windows.pool(PoolId(0), now), None);
    assert_eq!(windows.pool_count(), 1);
    let rebuilt = windows.pool(PoolId(3), now).unwrap();
    assert_eq!(rebuilt, before);
    assert_eq!(windows.pools_of(a), &[PoolId(3)]);
}

proptest! {
    /// The ring agrees with a plain list of every record, filtered by time.
    #[test]
    fn window_sums_equal_the_records_inside_the_span(
        steps in proptest::collection::vec((0u64..3_000, 0u64..1_000), 1..200),
        span_s in 1u64..60,
    ) {
        let base = Instant::now();
        let config = WindowConfig::default();
        let mut window = Window::new(&config, base);
        let mut log = Vec::new();
        let mut t = 0;
        for (advance_ms, ok) in steps {
            t += advance_ms;
            window.record(at(base, t), &requests(ok, 0));
            log.push((t, ok));
        }
        let span = Duration::from_secs(span_s);
        let current_bucket = t / 1000;
        let oldest = current_bucket.saturating_sub(span_s - 1);
        let expected: u64 = log
            .iter()
            .filter(|(time, _)| time / 1000 >= oldest)
            .map(|(_, ok)| ok)
            .sum();
        prop_assert_eq!(window.summary(at(base, t), span).requests.ok, expected);
    }
}

#[test]
fn a_backlog_is_shared_out_over_the_silence_it_built_up_in() {
    let base = Instant::now();
    let mut window = Window::new(&WindowConfig::default(), base);
    let mut delta = requests(301, 7);
    delta.latency = ttft(&[250_000.0]).latency;
    // 30 s of a gateway's requests, reported at once when it could reach the control again.
    window.record_over(at(base, 30_500), at(base, 60_500), &delta);

    let short = window.summary(at(base, 60_500), Duration::from_secs(10));
    // 31 buckets (30..=60) share each count: 301 ok are 9 or 10 a bucket (the 22 left over
    // on the newest), the 7 errors one each in the newest 7; the short window has the last 10.
    assert_eq!(short.requests.ok, 10 * 10);
    assert_eq!(short.requests.server_error, 7);
    // About the 10 a second they came at; at once, they would read as 308 / 9.5 s = 32.
    assert!(short.requests_per_s() < 12.0, "{}", short.requests_per_s());
    assert_eq!(short.latency.ttft_us.count(), 1);
    let stable = window.summary(at(base, 60_500), Duration::from_secs(60));
    assert_eq!(stable.requests.ok, 301);
    assert_eq!(stable.requests.server_error, 7);
    assert_eq!(stable.tokens.output, 30_100);

    // A silence longer than the window: what is kept goes into the buckets there are.
    let mut window = Window::new(&WindowConfig::default(), base);
    window.record_over(base, at(base, 600_000), &requests(1_000, 0));
    let stable = window.summary(at(base, 600_000), Duration::from_secs(60));
    assert!(stable.requests.ok <= 1_000 && stable.requests.ok > 0);
}

/// `/v1/pools` totals since start: a pool given a new id on the same selector (its autoscaler
/// renamed or re-created under another name, its target renamed, its role changed) keeps the
/// old pool's totals. Rebuilt from its keys' totals, it lost every key evicted as idle (past
/// `--forget-after` plus the stable window): requests since start went 9 -> 6.
#[test]
fn a_pool_rebuilt_after_a_key_was_evicted_keeps_its_totals_since_start() {
    let base = Instant::now();
    let mut windows = Windows::new(WindowConfig::default(), base, 100);
    windows.set_pools(vec![selector(Some("vllm"), None)]);
    let idle = windows.key("vllm", "llama").unwrap();
    let busy = windows.key("vllm", "qwen").unwrap();
    windows.record(idle, None, base, &requests(3, 0));
    windows.record(busy, None, base, &requests(5, 0));
    windows.record(busy, None, at(base, 600_000), &requests(1, 0));
    let now = at(base, 660_000);
    assert_eq!(
        windows.evict_idle(now, Duration::from_secs(660)),
        vec![idle]
    );
    let before = windows.pool(PoolId(0), now).unwrap().totals;
    assert_eq!(before.requests, 9);

    // The same selector under a new id, the old id dropped.
    windows.assign_pools(vec![(PoolId(1), selector(Some("vllm"), None))]);
    let after = windows.pool(PoolId(1), now).unwrap().totals;
    assert_eq!(
        after, before,
        "totals since start after the pool was rebuilt"
    );
}
