//! `decide`, case by case.

use super::support::*;
use crate::spec::ScalingRulesRaw;
use crate::*;

fn rules(window: &str, max_step: u32, period: &str) -> Option<ScalingRulesRaw> {
    Some(ScalingRulesRaw {
        stabilization_window: Some(window.to_owned()),
        max_step: Some(max_step),
        period: Some(period.to_owned()),
    })
}

#[test]
fn feed_forward_sizes_a_unified_pool_on_its_busiest_dimension() {
    // Prefill needs 2 (16000 / 8000), sequences 2 (100 / 64), output tokens 3 (6000 / 2000).
    let spec = spec(UNIFIED);
    let d = decide_unified(
        &spec,
        telemetry(Load::tokens(16_000.0, 6_000.0, 100)),
        state(2, 2),
        &mut memory(),
        T0,
    );
    assert_eq!((d.from, d.to, d.action), (2, 3, Action::ScaleUp));
    assert_eq!(d.rule, Rule::FeedForward);
    assert_eq!(d.reason.feed_forward_replicas, Some(3));
    let cap = d.reason.capacity.decode_tokens_per_s.unwrap();
    assert_eq!(
        (cap.per_replica, cap.source),
        (2000.0, CapacitySource::Hint)
    );
}

#[test]
fn a_ttft_breach_adds_replicas_in_proportion_to_the_error() {
    let spec = spec_with(UNIFIED, without_hints);
    // The stable window still shows a breach the short one has recovered from (no panic).
    let recovering = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(450));
    let slow = recovering.ttft(ms(750));
    let d = decide_unified(
        &spec,
        windows(recovering, slow),
        state(4, 4),
        &mut memory(),
        T0,
    );
    // 750 ms against 500 ms is a 50% error: 4 ready replicas become 6.
    assert!(!d.reason.panic);
    assert_eq!((d.to, d.rule), (6, Rule::SloFeedback));
    let ttft = d.reason.ttft.unwrap();
    assert!((ttft.error - 0.5).abs() < 1e-9, "{ttft:?}");
}

#[test]
fn without_any_capacity_the_reason_says_slo_feedback_alone() {
    let spec = spec_with(UNIFIED, without_hints);
    let recovering = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(450));
    let slow = recovering.ttft(ms(750));
    let d = decide_unified(
        &spec,
        windows(recovering, slow),
        state(4, 4),
        &mut memory(),
        T0,
    );
    assert_eq!(d.reason.feed_forward_replicas, None);
    assert!(d.text().contains("SLO feedback alone"), "{}", d.text());
}

#[test]
fn slo_feedback_error_is_capped_so_one_bad_window_cannot_ask_for_everything() {
    let spec = spec_with(UNIFIED, |raw| {
        without_hints(raw);
        raw.behavior.scale_up = rules("0s", 100, "1s");
        if let Some(pool) = raw.pools.unified.as_mut() {
            pool.max_replicas = 100;
        }
    });
    let load = Load::tokens(1_000.0, 100.0, 4).ttft(secs(50));
    let d = decide_unified(&spec, telemetry(load), state(2, 2), &mut memory(), T0);
    assert_eq!(
        d.to, 8,
        "at most (1 + MAX_SLO_ERROR) times the ready replicas"
    );
}

#[test]
fn latency_near_its_objective_keeps_the_ready_replicas_though_feed_forward_wants_fewer() {
    let spec = spec(UNIFIED);
    let load = Load::tokens(1_000.0, 100.0, 4).ttft(ms(450));
    let d = decide_unified(&spec, telemetry(load), state(4, 4), &mut memory(), T0);
    assert_eq!(d.reason.feed_forward_replicas, Some(1));
    assert_eq!(d.reason.slo_feedback_replicas, Some(4));
    assert_eq!((d.to, d.rule), (4, Rule::NoChange));
}

#[test]
fn latency_well_below_its_objective_lets_feed_forward_scale_down() {
    let spec = spec(UNIFIED);
    let load = Load::tokens(1_000.0, 100.0, 4).ttft(ms(100));
    let d = decide_unified(&spec, telemetry(load), state(4, 4), &mut memory(), T0);
    assert_eq!(d.reason.slo_feedback_replicas, None);
    assert_eq!((d.to, d.action), (3, Action::ScaleDown));
}

#[test]
fn a_short_window_breach_panics_and_scales_up_past_cooldown_and_the_up_window() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_up = rules("60s", 4, "1s");
        raw.behavior.cooldown = Some("30s".into());
    });
    let calm = Load::tokens(8_000.0, 1_000.0, 20);
    let burst = calm.ttft(ms(1_000)).requests(20.0);
    let mut s = state(2, 2);
    s.last_scale_change_at = Some(T0 - secs(5));
    let d = decide_unified(&spec, windows(burst, calm), s, &mut memory(), T0);
    assert!(d.reason.panic);
    assert_eq!(d.reason.ttft.unwrap().window, Window::Short);
    // TTFT at twice the objective in the short window: 2 ready become 4.
    assert_eq!((d.to, d.rule), (4, Rule::Panic));
}

#[test]
fn a_short_window_breach_on_a_handful_of_requests_is_not_panic() {
    let spec = spec(UNIFIED);
    let calm = Load::tokens(8_000.0, 1_000.0, 20);
    let few = calm.ttft(ms(1_000)).requests(0.5);
    let d = decide_unified(&spec, windows(few, calm), state(2, 2), &mut memory(), T0);
    assert!(!d.reason.panic);
}

#[test]
fn load_at_the_panic_threshold_panics() {
    let spec = spec(UNIFIED);
    let calm = Load::tokens(8_000.0, 1_000.0, 20);
    // Twice what 2 ready replicas prefill (2 x 8000 tok/s).
    let surge = Load::tokens(32_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, windows(surge, calm), state(2, 2), &mut memory(), T0);
    assert!(d.reason.panic);
    assert_eq!((d.to, d.rule), (4, Rule::Panic));
}

#[test]
fn panic_mode_never_scales_down_until_a_stable_window_has_passed() {
    let spec = spec(UNIFIED);
    let mut mem = memory();
    let calm = Load::tokens(8_000.0, 1_000.0, 20);
    let burst = calm.ttft(ms(1_000)).requests(20.0);
    let first = decide_unified(&spec, windows(burst, calm), state(4, 4), &mut mem, T0);
    assert_eq!(first.action, Action::ScaleUp);

    // Load gone 30 s later: feed-forward wants 1, panic holds.
    let idle = Load::tokens(100.0, 10.0, 1);
    let mut s = state(first.to, first.to);
    s.last_scale_change_at = Some(T0);
    let held = decide_unified(&spec, telemetry(idle), s, &mut mem, T0 + secs(30));
    assert_eq!((held.action, held.rule), (Action::Hold, Rule::Panic));
    assert_eq!(held.reason.hold_until, Some(T0 + STABLE));

    let later = decide_unified(&spec, telemetry(idle), s, &mut mem, T0 + STABLE + secs(1));
    assert_eq!(later.action, Action::ScaleDown);
}

#[test]
fn scale_down_follows_the_highest_recommendation_of_its_window() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_down = rules("300s", 1, "1s");
    });
    let mut mem = memory();
    let busy = Load::tokens(64_000.0, 1_000.0, 20);
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, telemetry(busy), state(8, 8), &mut mem, T0);
    assert_eq!((d.to, d.rule), (8, Rule::NoChange));

    for at in [T0 + secs(100), T0 + secs(300)] {
        let d = decide_unified(&spec, telemetry(quiet), state(8, 8), &mut mem, at);
        assert_eq!(d.reason.recommended_replicas, 1);
        assert_eq!((d.to, d.rule), (8, Rule::StabilizedDown), "at {at:?}");
    }
    let d = decide_unified(
        &spec,
        telemetry(quiet),
        state(8, 8),
        &mut mem,
        T0 + secs(301),
    );
    assert_eq!((d.to, d.action), (7, Action::ScaleDown));
}

#[test]
fn a_controller_started_at_zero_still_waits_its_whole_scale_down_window() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_down = rules("300s", 1, "1s");
    });
    // The trace simulator's clock starts at 0; the window must still count from the start.
    let mut mem = PolicyMemory::new(std::time::Duration::ZERO);
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, telemetry(quiet), state(8, 8), &mut mem, secs(120));
    assert_eq!(d.reason.recommended_replicas, 1, "{d}");
    assert_eq!((d.to, d.rule), (8, Rule::StabilizedDown), "{d}");
    let d = decide_unified(&spec, telemetry(quiet), state(8, 8), &mut mem, secs(301));
    assert_eq!((d.to, d.action), (7, Action::ScaleDown), "{d}");
}

#[test]
fn a_partial_view_does_not_hold_back_the_scale_up_the_whole_load_calls_for() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_up = rules("30s", 4, "1s");
    });
    let mut mem = memory();
    // Three gateways silent: a quarter of the load is seen.
    let mut seen = telemetry(Load::tokens(12_000.0, 1_000.0, 20));
    seen.freshness = Freshness::Partial {
        silent_reporters: 3,
        keys_over_limit: false,
    };
    let d = decide_unified(&spec, seen, state(4, 4), &mut mem, T0);
    assert_eq!(d.to, 4, "{d}");
    // They are back: 48,000 tok/s needs 6.
    let whole = telemetry(Load::tokens(48_000.0, 1_000.0, 20));
    let d = decide_unified(&spec, whole, state(4, 4), &mut mem, T0 + secs(10));
    assert_eq!((d.to, d.action), (6, Action::ScaleUp), "{d}");
}

/// A stable window of light load (100 prefill tok/s) on 2 replicas: the capacity learned is the
/// least they proved, under 100 tok/s each. Returns the load and the memory.
fn learned_at_a_quiet_hour(spec: &AutoscalerSpec) -> (Load, PolicyMemory) {
    let mut mem = memory();
    let light = Load::tokens(100.0, 20.0, 2);
    for at in [T0, T0 + STABLE] {
        decide_unified(spec, telemetry(light), state(2, 2), &mut mem, at);
    }
    let learned = mem.pool(Role::Unified).learned().prefill_tokens_per_s;
    assert!(learned.is_some_and(|c| c < 100.0), "{learned:?}");
    (light, mem)
}

#[test]
fn past_a_learned_capacity_more_completed_requests_never_yield_fewer_replicas() {
    // Either side of the 10 completed requests that let a short window's percentile trigger
    // panic: with 9, as with 11, every request got its first token (no queue) and latency is
    // well within the objective. More load must not ask for fewer replicas.
    let spec = spec_with(UNIFIED, without_hints);
    let (light, mem) = learned_at_a_quiet_hour(&spec);
    let at = T0 + STABLE + secs(1);
    let burst = |requests_per_s: f64, tokens: f64| {
        Load::tokens(tokens, tokens / 50.0, 2)
            .ttft(ms(300))
            .requests(requests_per_s)
    };
    let fewer = decide_unified(
        &spec,
        windows(burst(0.9, 1_000.0), light),
        state(2, 2),
        &mut mem.clone(),
        at,
    );
    let more = decide_unified(
        &spec,
        windows(burst(1.1, 1_100.0), light),
        state(2, 2),
        &mut mem.clone(),
        at,
    );
    assert!(more.to >= fewer.to, "fewer requests: {fewer}\nmore: {more}");
}

#[test]
fn load_past_a_learned_capacity_with_latency_well_within_the_objective_is_carried_not_scaled() {
    let spec = spec_with(UNIFIED, without_hints);
    let (light, mut mem) = learned_at_a_quiet_hour(&spec);
    let quiet_hour = mem.clone();
    // Ten times the load in the short window, TTFT at 60% of its objective: the replicas carry
    // it; the capacity learned was only the least they had proved. Neither an overload nor a
    // reason for more replicas (sized on the quiet hour's capacity it asked 2 -> 20).
    let burst = Load::tokens(1_000.0, 20.0, 2).ttft(ms(300));
    let d = decide_unified(
        &spec,
        windows(burst, light),
        state(2, 2),
        &mut mem,
        T0 + STABLE + secs(1),
    );
    assert!(!d.reason.panic, "{d}");
    assert_eq!((d.to, d.action), (2, Action::Hold), "{d}");
    let carried = d.reason.capacity.prefill_tokens_per_s.unwrap();
    assert_eq!(
        (carried.per_replica, carried.source),
        (500.0, CapacitySource::Carried),
        "{d}"
    );
    // For this decision only: tokens count as requests finish, and one short window may show a
    // batch of completions rather than a throughput.
    let kept = mem.pool(Role::Unified).learned().prefill_tokens_per_s;
    assert!(kept.is_some_and(|c| c < 100.0), "{kept:?}");
    // Nor once the burst is over and only the stable window still holds it.
    let d = decide_unified(
        &spec,
        windows(light, burst),
        state(2, 2),
        &mut mem,
        T0 + STABLE + secs(20),
    );
    assert_eq!((d.to, d.action), (2, Action::Hold), "{d}");

    // With a queue, the few completed requests do not speak for the burst: overload.
    let queued = burst.waiting(8);
    let d = decide_unified(
        &spec,
        windows(queued, light),
        state(2, 2),
        &mut quiet_hour.clone(),
        T0 + STABLE + secs(1),
    );
    assert!(d.reason.panic, "{d}");
    // Near the objective it is an overload again.
    let strained = burst.ttft(ms(450));
    let d = decide_unified(
        &spec,
        windows(strained, light),
        state(2, 2),
        &mut quiet_hour.clone(),
        T0 + STABLE + secs(1),
    );
    assert!(d.reason.panic, "{d}");
}

#[test]
fn sequences_a_unified_pool_carries_well_within_the_objective_are_not_an_overload() {
    // Without hints the quiet hour taught one sequence a replica: a snapshot, the least proved.
    let spec = spec_with(UNIFIED, without_hints);
    let (_, mut mem) = learned_at_a_quiet_hour(&spec);
    let learned = mem.pool(Role::Unified).learned().concurrent_sequences;
    assert!(learned.is_some_and(|c| c <= 1.0), "{learned:?}");
    let at = T0 + STABLE + secs(1);
    // Ten a replica with nothing waiting and TPOT at 40% of its objective: carried, not an
    // overload calling for 20 replicas.
    let busy = Load::tokens(1_000.0, 200.0, 20);
    let d = decide_unified(&spec, telemetry(busy), state(2, 2), &mut mem.clone(), at);
    assert_eq!((d.to, d.action), (2, Action::Hold), "{d}");
    let sequences = d.reason.capacity.concurrent_sequences.unwrap();
    assert_eq!(
        (sequences.per_replica, sequences.source),
        (10.0, CapacitySource::Carried),
        "{d}"
    );
    // A burst still waiting for its first tokens is judged by nothing yet: sized on the learned.
    let queued = busy.waiting(4);
    let d = decide_unified(&spec, telemetry(queued), state(2, 2), &mut mem.clone(), at);
    assert_eq!(
        d.reason.capacity.concurrent_sequences.unwrap().source,
        CapacitySource::Learned,
        "{d}"
    );
    assert_eq!(d.action, Action::ScaleUp, "{d}");
    // Nor near the objective.
    let strained = busy.tpot(ms(45));
    let d = decide_unified(&spec, telemetry(strained), state(2, 2), &mut mem, at);
    assert_eq!(d.action, Action::ScaleUp, "{d}");
}

#[test]
fn what_replicas_carried_counts_from_either_window_so_more_short_load_never_asks_fewer() {
    let spec = spec_with(UNIFIED, without_hints);
    let (_, mem) = learned_at_a_quiet_hour(&spec);
    // The stable window shows 1,200 tok/s carried on the same 2 replicas, its TTFT within the
    // objective, but covers too little of its length to learn from. Whatever the short window
    // adds, those replicas carry the stable load: sizing it on the short window's evidence
    // alone asked 2 -> 16 at 150 tok/s and held 2 at 1,200.
    let carried = Load::tokens(1_200.0, 20.0, 2).ttft(ms(300));
    let mut asked = Vec::new();
    for short in [150.0, 600.0, 1_200.0] {
        let mut t = windows(Load::tokens(short, 20.0, 2).ttft(ms(300)), carried);
        t.stable.coverage = t.stable.length / 2;
        let d = decide_unified(
            &spec,
            t,
            state(2, 2),
            &mut mem.clone(),
            T0 + STABLE + secs(1),
        );
        let capacity = d.reason.capacity.prefill_tokens_per_s.unwrap();
        assert_eq!(
            (capacity.per_replica, capacity.source),
            (600.0, CapacitySource::Carried),
            "short {short}: {d}"
        );
        asked.push(d.to);
    }
    assert_eq!(asked, [2, 2, 2]);

    // A stable window where 30% of the requests failed is no proof of what was carried: sized
    // on what was learned (it held 2 on a burst refused in part).
    let mut refusing = windows(Load::tokens(150.0, 20.0, 2).ttft(ms(300)), carried);
    refusing.stable.error_rate_per_s = 3.0;
    let d = decide_unified(
        &spec,
        refusing,
        state(2, 2),
        &mut mem.clone(),
        T0 + STABLE + secs(1),
    );
    let capacity = d.reason.capacity.prefill_tokens_per_s.unwrap();
    assert_eq!(capacity.source, CapacitySource::Learned, "{d}");
    assert!(d.to > 2, "{d}");
}

#[test]
fn a_telemetry_gap_does_not_shorten_the_scale_down_window() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_down = rules("300s", 1, "1s");
    });
    let busy = Load::tokens(64_000.0, 1_000.0, 20);
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    let stale = Freshness::Stale { age: secs(30) };
    // Gateways partitioned (the load seen is a quarter of the truth) is a gap too.
    let partial = Freshness::Partial {
        silent_reporters: 3,
        keys_over_limit: false,
    };
    for (gap, seen) in [(stale, busy), (partial, quiet)] {
        let mut mem = memory();
        let d = decide_unified(&spec, telemetry(busy), state(8, 8), &mut mem, T0);
        assert_eq!((d.to, d.rule), (8, Rule::NoChange));
        // 400 s without (full) data: longer than the window, so the busy sample is evicted.
        let mut t = telemetry(seen);
        t.freshness = gap;
        for i in 1..=40 {
            let d = decide_unified(&spec, t.clone(), state(8, 8), &mut mem, T0 + secs(i * 10));
            assert_eq!(d.to, 8, "{d}");
        }
        // Data back at +410 s, quiet. The window must be full of data before a scale-down:
        // from the end of the gap, as from a restart.
        for after in [465, 600, 700] {
            let d = decide_unified(
                &spec,
                telemetry(quiet),
                state(8, 8),
                &mut mem,
                T0 + secs(after),
            );
            assert_eq!(
                (d.to, d.rule),
                (8, Rule::StabilizedDown),
                "{gap:?}, {after} s: {d}"
            );
        }
        let d = decide_unified(
            &spec,
            telemetry(quiet),
            state(8, 8),
            &mut mem,
            T0 + secs(701),
        );
        assert_eq!((d.to, d.action), (7, Action::ScaleDown), "{gap:?}: {d}");
    }
}

#[test]
fn scale_up_follows_the_lowest_recommendation_of_its_window() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_up = rules("60s", 4, "1s");
    });
    let mut mem = memory();
    let steady = Load::tokens(16_000.0, 1_000.0, 20);
    // 1.5x capacity: more needed, yet below the panic threshold. No latency samples, so the
    // minute at 2 replicas teaches nothing that would move capacity off the hint.
    let more = Load {
        ttft: None,
        tpot: None,
        ..Load::tokens(24_000.0, 1_000.0, 20)
    };
    decide_unified(&spec, telemetry(steady), state(2, 2), &mut mem, T0);
    let d = decide_unified(&spec, telemetry(more), state(2, 2), &mut mem, T0 + secs(30));
    assert_eq!((d.to, d.rule), (2, Rule::StabilizedUp));
    let d = decide_unified(&spec, telemetry(more), state(2, 2), &mut mem, T0 + secs(61));
    assert_eq!((d.to, d.rule), (3, Rule::FeedForward));
}

#[test]
fn scale_down_steps_are_limited_per_period() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_down = rules("0s", 1, "60s");
    });
    let mut mem = memory();
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, telemetry(quiet), state(8, 8), &mut mem, T0);
    assert_eq!((d.to, d.action), (7, Action::ScaleDown));

    let mut s = state(7, 7);
    s.last_scale_change_at = Some(T0);
    let d = decide_unified(&spec, telemetry(quiet), s, &mut mem, T0 + secs(30));
    assert_eq!((d.to, d.rule), (7, Rule::StepLimited));
    let d = decide_unified(&spec, telemetry(quiet), s, &mut mem, T0 + secs(61));
    assert_eq!((d.to, d.action), (6, Action::ScaleDown));
}

#[test]
fn scale_up_steps_are_limited_per_period() {
    let spec = spec(UNIFIED);
    let mut mem = memory();
    // 12 replicas' worth of prefill at 1.5x the current capacity: no panic, plain steps.
    let load = Load::tokens(96_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, telemetry(load), state(8, 8), &mut mem, T0);
    assert_eq!((d.to, d.rule), (12, Rule::FeedForward));

    let big = Load::tokens(120_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, telemetry(big), state(2, 2), &mut memory(), T0);
    assert_eq!((d.to, d.rule), (6, Rule::StepLimited));
}

#[test]
fn max_replicas_caps_the_recommendation_and_says_so() {
    let spec = spec(UNIFIED);
    let load = Load::tokens(400_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, telemetry(load), state(14, 14), &mut memory(), T0);
    assert_eq!((d.to, d.rule), (16, Rule::MaxReplicas));
    let d = decide_unified(&spec, telemetry(load), state(16, 16), &mut memory(), T0);
    assert_eq!(
        (d.to, d.action, d.rule),
        (16, Action::Hold, Rule::MaxReplicas)
    );
}

#[test]
fn a_lowered_max_replicas_applies_at_once_on_fresh_data() {
    let spec = spec(UNIFIED);
    let load = Load::tokens(400_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, telemetry(load), state(20, 20), &mut memory(), T0);
    assert_eq!((d.to, d.rule), (16, Rule::MaxReplicas));
}

#[test]
fn min_replicas_holds_even_when_idle() {
    let spec = spec(UNIFIED);
    let d = decide_unified(
        &spec,
        telemetry(Load::idle()),
        state(1, 1),
        &mut memory(),
        T0,
    );
    assert_eq!((d.to, d.rule), (1, Rule::NoChange));
    assert_eq!(d.reason.driver, Rule::MinReplicas);
    let d = decide_unified(
        &spec,
        telemetry(Load::idle()),
        state(0, 0),
        &mut memory(),
        T0,
    );
    assert_eq!((d.to, d.rule), (1, Rule::MinReplicas));
}

#[test]
fn stale_telemetry_holds_and_never_scales_down() {
    let spec = spec(UNIFIED);
    let mut t = telemetry(Load::idle());
    t.freshness = Freshness::Stale { age: secs(45) };
    let d = decide_unified(&spec, t, state(8, 8), &mut memory(), T0);
    assert_eq!(
        (d.to, d.action, d.rule),
        (8, Action::Hold, Rule::StaleTelemetryHold)
    );
    assert!(d.text().contains("45s old"), "{}", d.text());
}

#[test]
fn stale_telemetry_holds_even_a_scale_up() {
    let spec = spec(UNIFIED);
    let mut t = telemetry(Load::tokens(400_000.0, 1_000.0, 20).ttft(secs(3)));
    t.freshness = Freshness::Stale { age: secs(45) };
    let d = decide_unified(&spec, t, state(2, 2), &mut memory(), T0);
    assert_eq!((d.to, d.rule), (2, Rule::StaleTelemetryHold));
}

#[test]
fn missing_telemetry_holds_and_never_scales_down() {
    let spec = spec(UNIFIED);
    let mut t = telemetry(Load::idle());
    t.freshness = Freshness::Missing;
    let d = decide_unified(&spec, t, state(8, 8), &mut memory(), T0);
    assert_eq!((d.to, d.rule), (8, Rule::MissingTelemetryHold));
}

#[test]
fn a_quiet_gateway_holds_scale_down_but_not_scale_up() {
    let spec = spec(UNIFIED);
    let partial = Freshness::Partial {
        silent_reporters: 2,
        keys_over_limit: false,
    };
    let mut t = telemetry(Load::idle());
    t.freshness = partial;
    let d = decide_unified(&spec, t, state(8, 8), &mut memory(), T0);
    assert_eq!(
        (d.to, d.action, d.rule),
        (8, Action::Hold, Rule::SilentReporterHold)
    );
    assert!(d.text().contains("2 gateway(s)"), "{}", d.text());

    // What the live gateways see already needs more replicas: that much is certain.
    let mut t = telemetry(Load::tokens(400_000.0, 1_000.0, 20).ttft(secs(3)));
    t.freshness = partial;
    let d = decide_unified(&spec, t, state(2, 2), &mut memory(), T0);
    assert!(d.to > 2, "{}", d.text());
}

#[test]
fn keys_dropped_over_the_key_limit_hold_scale_down_and_say_so() {
    let spec = spec(UNIFIED);
    let mut t = telemetry(Load::idle());
    t.freshness = Freshness::Partial {
        silent_reporters: 0,
        keys_over_limit: true,
    };
    let d = decide_unified(&spec, t, state(8, 8), &mut memory(), T0);
    assert_eq!(
        (d.to, d.action, d.rule),
        (8, Action::Hold, Rule::KeysOverLimitHold)
    );
    assert!(d.text().contains("--max-keys"), "{}", d.text());
}

#[test]
fn stale_telemetry_still_honours_min_replicas() {
    let spec = spec(UNIFIED);
    let mut t = telemetry(Load::idle());
    t.freshness = Freshness::Stale { age: secs(45) };
    let d = decide_unified(&spec, t, state(0, 0), &mut memory(), T0);
    assert_eq!((d.to, d.rule), (1, Rule::MinReplicas));
}

#[test]
fn a_pool_asleep_at_zero_is_not_woken_by_missing_or_stale_telemetry() {
    let to_zero = spec_with(UNIFIED, |raw| raw.scale_to_zero = true);
    for freshness in [Freshness::Missing, Freshness::Stale { age: secs(40) }] {
        let mut t = telemetry(Load::idle());
        t.freshness = freshness;
        // A controller just started (Missing until the first report) and one long running.
        for mut mem in [PolicyMemory::new(T0), memory()] {
            let d = decide_unified(&to_zero, t.clone(), state(0, 0), &mut mem, T0);
            assert_eq!((d.to, d.action), (0, Action::Hold), "{d}");
            assert_ne!(d.rule, Rule::MinReplicas, "{d}");
            assert!(d.text().contains("not woken without data"), "{d}");
        }
    }
    // Without scaleToZero, zero is below the minimum: minReplicas still applies on no data.
    let mut t = telemetry(Load::idle());
    t.freshness = Freshness::Missing;
    let d = decide_unified(&spec(UNIFIED), t, state(0, 0), &mut memory(), T0);
    assert_eq!((d.to, d.rule), (1, Rule::MinReplicas));
}

#[test]
fn a_long_prompt_burst_grows_prefill_and_leaves_decode_alone() {
    let spec = spec(DISAGGREGATED);
    let base = Load::tokens(16_000.0, 4_000.0, 100);
    let burst = Load::tokens(48_000.0, 4_000.0, 100).ttft(ms(900));
    let inputs = disaggregated(
        (telemetry(burst), state(2, 2)),
        (telemetry(burst), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    let (prefill, decode) = (pool(&d, Role::Prefill), pool(&d, Role::Decode));
    assert_eq!((prefill.from, prefill.to), (2, 6), "{prefill}");
    assert_eq!((decode.to, decode.action), (2, Action::Hold), "{decode}");

    // And the calm baseline moves neither.
    let inputs = disaggregated(
        (telemetry(base), state(2, 2)),
        (telemetry(base), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    assert_eq!(pool(&d, Role::Prefill).action, Action::Hold);
    assert_eq!(pool(&d, Role::Decode).action, Action::Hold);
}

#[test]
fn a_long_output_burst_grows_decode_and_leaves_prefill_alone() {
    let spec = spec(DISAGGREGATED);
    let burst = Load::tokens(16_000.0, 12_000.0, 300).tpot(ms(80));
    let inputs = disaggregated(
        (telemetry(burst), state(2, 2)),
        (telemetry(burst), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    let (prefill, decode) = (pool(&d, Role::Prefill), pool(&d, Role::Decode));
    assert_eq!((prefill.to, prefill.action), (2, Action::Hold), "{prefill}");
    // 12000 / 2000 = 6 by tokens, 300 / 64 = 5 by sequences, TPOT +60% on 2 = 4: 6, in one step of 4.
    assert_eq!((decode.from, decode.to), (2, 6), "{decode}");
}

#[test]
fn requests_waiting_for_their_first_token_need_sequences_of_a_unified_pool_not_of_decode() {
    // 8000 input and 2000 output tokens/s fit 1 replica, but 200 requests are in flight, all
    // before their first token: a unified replica holds 64, so they need 4. The in-flight split
    // between waiting and decoding changes from one report to the next; the need does not.
    let queued = Load::tokens(8_000.0, 2_000.0, 0).waiting(200);
    let d = decide_unified(
        &spec(UNIFIED),
        telemetry(queued),
        state(2, 2),
        &mut memory(),
        T0,
    );
    assert_eq!((d.to, d.rule), (4, Rule::FeedForward), "{d}");
    let decoding = Load::tokens(8_000.0, 2_000.0, 200);
    let d = decide_unified(
        &spec(UNIFIED),
        telemetry(decoding),
        state(2, 2),
        &mut memory(),
        T0,
    );
    assert_eq!((d.to, d.rule), (4, Rule::FeedForward), "{d}");

    // Disaggregated, those requests are at the prefill pool: decode sizes on its tokens alone
    // (2000 / 2000 = 1).
    let inputs = disaggregated(
        (telemetry(queued), state(2, 2)),
        (telemetry(queued), state(2, 2)),
    );
    let d = run(&spec(DISAGGREGATED), &inputs, &mut memory(), T0);
    let decode = pool(&d, Role::Decode);
    assert_eq!(decode.reason.feed_forward_replicas, Some(1), "{decode}");
}

#[test]
fn a_queue_is_not_learned_as_sequences_a_unified_replica_serves() {
    // 128 decoding and 200 queued on 2 replicas at 40% of the TPOT objective: the queue does not
    // touch TPOT, so it proves nothing of how many sequences a replica serves.
    let spec = spec(UNIFIED);
    let mut mem = memory();
    let queued = Load::tokens(8_000.0, 2_000.0, 128).waiting(200);
    for windows_in in 0..4 {
        decide_unified(
            &spec,
            telemetry(queued),
            state(2, 2),
            &mut mem,
            T0 + STABLE * windows_in,
        );
    }
    assert_eq!(mem.pool(Role::Unified).learned().concurrent_sequences, None);
}

#[test]
fn starting_replicas_prevent_a_second_scale_up_for_the_same_shortfall() {
    let spec = spec_with(UNIFIED, without_hints);
    let mut mem = memory();
    let slow = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(1_000));
    let d = decide_unified(&spec, telemetry(slow), state(4, 4), &mut mem, T0);
    assert_eq!((d.to, d.action), (8, Action::ScaleUp));

    // Applied: 8 asked for, 4 ready, 4 loading; latency unchanged while they load.
    let mut s = state(8, 4);
    s.last_scale_change_at = Some(T0);
    s.time_to_ready = Some(secs(120));
    for after in [5, 60, 175] {
        let d = decide_unified(&spec, telemetry(slow), s, &mut mem, T0 + secs(after));
        assert_eq!(
            (d.to, d.rule),
            (8, Rule::WaitingForStartingReplicas),
            "{after} s after the scale-up: {d}"
        );
        assert!(d.reason.starting_counted);
    }
}

#[test]
fn replicas_that_just_became_ready_do_not_scale_the_breach_they_answer() {
    let spec = spec_with(UNIFIED, without_hints);
    let mut mem = memory();
    // Stable-window TTFT 2x the objective on 4 ready: ask for 8.
    let slow = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(1_000));
    let d = decide_unified(&spec, telemetry(slow), state(4, 4), &mut mem, T0);
    assert_eq!((d.to, d.action), (8, Action::ScaleUp), "{d}");
    let mut s = state(8, 4);
    s.last_scale_change_at = Some(T0);
    s.time_to_ready = Some(secs(120));
    let d = decide_unified(&spec, telemetry(slow), s, &mut mem, T0 + secs(60));
    assert_eq!((d.to, d.rule), (8, Rule::WaitingForStartingReplicas), "{d}");
    // The 4 new replicas are ready at +120 s. The short window has recovered; the stable one
    // (60 s) still holds the slow minute, measured on 4 replicas, not 8.
    let recovering = slow.ttft(ms(400));
    let mut s = state(8, 8);
    s.last_scale_change_at = Some(T0);
    s.time_to_ready = Some(secs(120));
    for after in [125, 175] {
        let d = decide_unified(
            &spec,
            windows(recovering, slow),
            s,
            &mut mem,
            T0 + secs(after),
        );
        assert_eq!((d.to, d.action), (8, Action::Hold), "+{after} s: {d}");
        assert_eq!(d.reason.slo_feedback_replicas, Some(8), "+{after} s: {d}");
    }
    // A breach still there a whole window after they became ready is theirs: 8 x 2.
    let d = decide_unified(&spec, windows(slow, slow), s, &mut mem, T0 + secs(186));
    assert_eq!(d.reason.slo_feedback_replicas, Some(16), "{d}");
}

#[test]
fn a_breach_spanning_two_ready_changes_is_scaled_by_the_fewest_that_served() {
    let spec = spec_with(UNIFIED, without_hints);
    let mut mem = memory();
    let slow = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(1_000));
    let d = decide_unified(&spec, telemetry(slow), state(4, 4), &mut mem, T0);
    assert_eq!((d.to, d.action), (8, Action::ScaleUp), "{d}");
    // The new replicas come up in two steps: 6 ready at +100 s, 8 at +130 s.
    let recovering = slow.ttft(ms(400));
    for (after, ready) in [(100, 6), (130, 8)] {
        let mut s = state(8, ready);
        s.last_scale_change_at = Some(T0);
        s.time_to_ready = Some(secs(120));
        decide_unified(
            &spec,
            windows(recovering, slow),
            s,
            &mut mem,
            T0 + secs(after),
        );
    }
    // At +150 s the stable window (60 s) reaches back to +90 s: its 2x TTFT was measured while
    // 4 served, then 6, then 8. 4 x 2 is what it asks for, not 6 x 2.
    let mut s = state(8, 8);
    s.last_scale_change_at = Some(T0);
    s.time_to_ready = Some(secs(120));
    let d = decide_unified(
        &spec,
        windows(recovering, slow),
        s,
        &mut mem,
        T0 + secs(150),
    );
    assert_eq!(d.reason.slo_feedback_replicas, Some(8), "{d}");
    assert_eq!((d.to, d.action), (8, Action::Hold), "{d}");
}

#[test]
fn a_growing_shortfall_scales_up_again_while_replicas_start() {
    let spec = spec_with(UNIFIED, without_hints);
    let mut mem = memory();
    let mut s = state(8, 4);
    s.last_scale_change_at = Some(T0 - secs(5));
    s.time_to_ready = Some(secs(120));
    // TTFT at 3x the objective: 4 ready need 12, more than the 8 on the way.
    let worse = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(1_500));
    let d = decide_unified(&spec, telemetry(worse), s, &mut mem, T0);
    assert_eq!((d.to, d.action), (12, Action::ScaleUp), "{d}");
}

#[test]
fn starting_replicas_past_their_expected_time_to_ready_no_longer_count() {
    let spec = spec_with(UNIFIED, without_hints);
    let mut s = state(8, 4);
    s.last_scale_change_at = Some(T0);
    s.time_to_ready = Some(secs(120));
    let slow = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(1_000));
    // 1.5 x 120 s later the 4 starting replicas are overdue: ask for the shortfall on top of them.
    let d = decide_unified(&spec, telemetry(slow), s, &mut memory(), T0 + secs(181));
    assert!(!d.reason.starting_counted);
    assert_eq!((d.to, d.action), (12, Action::ScaleUp), "{d}");
}

#[test]
fn starting_replicas_count_for_the_whole_grace_when_the_caller_does_not_know_the_change_time() {
    // The spec's step-limit periods are 1 s, so the scale event is pruned from the step-limit
    // memory long before the 450 s grace (1.5 x 300 s) ends.
    let spec = spec_with(UNIFIED, without_hints);
    let mut mem = memory();
    let slow = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(1_000));
    let d = decide_unified(&spec, telemetry(slow), state(4, 4), &mut mem, T0);
    assert_eq!((d.to, d.action), (8, Action::ScaleUp), "{d}");
    // Applied by a caller that does not report when (`last_scale_change_at: None`): the policy
    // sees the change at its next evaluation, T0 + 1 s.
    let mut s = state(8, 4);
    s.time_to_ready = Some(secs(300));
    for after in [1, 30, 61, 300, 451] {
        let d = decide_unified(&spec, telemetry(slow), s, &mut mem, T0 + secs(after));
        assert_eq!(
            (d.to, d.rule),
            (8, Rule::WaitingForStartingReplicas),
            "{after} s after the scale-up: {d}"
        );
    }
    let d = decide_unified(&spec, telemetry(slow), s, &mut mem, T0 + secs(452));
    assert!(!d.reason.starting_counted, "{d}");
    assert_eq!((d.to, d.action), (12, Action::ScaleUp), "{d}");
}

#[test]
fn replicas_stuck_pending_are_asked_for_again_once_not_at_every_grace() {
    let spec = spec_with(UNIFIED, |raw| {
        without_hints(raw);
        raw.pools.unified.as_mut().unwrap().max_replicas = 64;
        raw.behavior.scale_down = rules("300s", 1, "60s");
        raw.behavior.cooldown = Some("5s".into());
    });
    let mut mem = memory();
    // TTFT 2x the objective on 4 ready replicas; no node for a new pod, so 4 stay ready for
    // 40 minutes while the desired count follows the decisions.
    let slow = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(1_000));
    let (mut desired, mut changed) = (4, None);
    let mut trace = Vec::new();
    for i in 0..240u64 {
        let now = T0 + secs(i * 10);
        let mut s = state(desired, 4);
        s.last_scale_change_at = changed;
        s.time_to_ready = Some(secs(120));
        let d = decide_unified(&spec, telemetry(slow), s, &mut mem, now);
        if d.to != desired {
            trace.push((i * 10, desired, d.to));
            desired = d.to;
            changed = Some(now);
        }
    }
    // 4 -> 8 for the shortfall, then 8 -> 12 once the 4 are overdue (180 s): the shortfall asked
    // for again. Nothing more while it stays the same.
    assert_eq!(trace, [(0, 4, 8), (190, 8, 12)]);
}

#[test]
fn replicas_starting_before_a_restart_count_for_one_grace_from_the_start() {
    let spec = spec_with(UNIFIED, without_hints);
    let slow = Load::tokens(16_000.0, 1_000.0, 10).ttft(ms(1_000));
    // 8 asked for before this controller started, 4 ready: when is unknown.
    let mut s = state(8, 4);
    s.time_to_ready = Some(secs(120));
    let mut mem = PolicyMemory::new(T0);
    let d = decide_unified(&spec, telemetry(slow), s, &mut mem, T0 + secs(60));
    assert_eq!((d.to, d.rule), (8, Rule::WaitingForStartingReplicas), "{d}");
    // 1.5 x 120 s after the start they are overdue (stuck Pending, say): the shortfall is
    // asked for on top of them.
    let d = decide_unified(&spec, telemetry(slow), s, &mut mem, T0 + secs(181));
    assert!(!d.reason.starting_counted);
    assert_eq!((d.to, d.action), (12, Action::ScaleUp), "{d}");
}

#[test]
fn restart_hold_blocks_scale_down_until_the_stable_window_is_full() {
    let spec = spec(UNIFIED);
    let mut mem = PolicyMemory::new(T0);
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    let d = decide_unified(
        &spec,
        telemetry(quiet),
        state(8, 8),
        &mut mem,
        T0 + secs(30),
    );
    assert_eq!((d.to, d.rule), (8, Rule::RestartHold));
    assert_eq!(d.reason.hold_until, Some(T0 + STABLE));
    let d = decide_unified(&spec, telemetry(quiet), state(8, 8), &mut mem, T0 + STABLE);
    assert_eq!((d.to, d.action), (7, Action::ScaleDown));
}

#[test]
fn restart_hold_does_not_hold_a_scale_up() {
    let spec = spec(UNIFIED);
    let mut mem = PolicyMemory::new(T0);
    let busy = Load::tokens(24_000.0, 1_000.0, 20);
    let d = decide_unified(&spec, telemetry(busy), state(2, 2), &mut mem, T0 + secs(1));
    assert_eq!((d.to, d.action), (3, Action::ScaleUp));
}

#[test]
fn after_a_restart_the_scale_down_window_assumes_the_current_count_before_start() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_down = rules("300s", 1, "1s");
    });
    let mut mem = PolicyMemory::new(T0);
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    let d = decide_unified(
        &spec,
        telemetry(quiet),
        state(8, 8),
        &mut mem,
        T0 + secs(120),
    );
    assert_eq!((d.to, d.rule), (8, Rule::StabilizedDown));
    let d = decide_unified(
        &spec,
        telemetry(quiet),
        state(8, 8),
        &mut mem,
        T0 + secs(300),
    );
    assert_eq!(d.action, Action::ScaleDown);
}

#[test]
fn regaining_leadership_restarts_the_hold() {
    let spec = spec(UNIFIED);
    let mut mem = memory();
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    mem.restart(T0);
    let d = decide_unified(
        &spec,
        telemetry(quiet),
        state(8, 8),
        &mut mem,
        T0 + secs(10),
    );
    assert_eq!(d.rule, Rule::RestartHold);
}

#[test]
fn n_minus_one_check_keeps_replicas_while_the_short_window_breaches() {
    let spec = spec(UNIFIED);
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    // Too few requests to panic on, but a breach all the same: do not remove capacity now.
    let blip = quiet.ttft(ms(700)).requests(0.5);
    let d = decide_unified(&spec, windows(blip, quiet), state(4, 4), &mut memory(), T0);
    assert!(!d.reason.panic);
    assert_eq!(d.reason.recommended_replicas, 1);
    assert_eq!((d.to, d.rule), (4, Rule::WouldNotFit));
}

#[test]
fn without_capacity_one_replica_goes_only_while_latency_on_the_rest_stays_well_below() {
    let spec = spec_with(UNIFIED, |raw| {
        without_hints(raw);
        raw.behavior.scale_down = rules("0s", 4, "1s");
    });
    // SLO feedback alone: TTFT at 30% of the objective on 6 ready. One fewer projects to 36%.
    let load = Load::tokens(8_000.0, 1_000.0, 20)
        .ttft(ms(150))
        .tpot(ms(10));
    let d = decide_unified(&spec, telemetry(load), state(6, 6), &mut memory(), T0);
    assert_eq!((d.to, d.action), (5, Action::ScaleDown), "{d}");

    // Near the line: 55% on 4 projects to 73% on 3 (fits) ...
    let near = Load::tokens(8_000.0, 1_000.0, 20)
        .ttft(ms(275))
        .tpot(ms(10));
    let d = decide_unified(&spec, telemetry(near), state(4, 4), &mut memory(), T0);
    assert_eq!(d.to, 3, "{d}");
    // ... 65% on 4 projects to 87% on 3 (does not).
    let over = Load::tokens(8_000.0, 1_000.0, 20)
        .ttft(ms(325))
        .tpot(ms(10));
    let d = decide_unified(&spec, telemetry(over), state(4, 4), &mut memory(), T0);
    assert_eq!((d.to, d.action), (4, Action::Hold), "{d}");
}

#[test]
fn cooldown_holds_a_change_made_too_soon_after_the_last() {
    let spec = spec_with(UNIFIED, |raw| raw.behavior.cooldown = Some("30s".into()));
    let busy = Load::tokens(24_000.0, 1_000.0, 20);
    let mut s = state(2, 2);
    s.last_scale_change_at = Some(T0 - secs(10));
    let d = decide_unified(&spec, telemetry(busy), s, &mut memory(), T0);
    assert_eq!((d.to, d.rule), (2, Rule::Cooldown));
    assert_eq!(d.reason.hold_until, Some(T0 + secs(20)));
    let d = decide_unified(&spec, telemetry(busy), s, &mut memory(), T0 + secs(20));
    assert_eq!((d.to, d.action), (3, Action::ScaleUp));
}

#[test]
fn scale_to_zero_needs_permission_fresh_data_and_a_whole_idle_window() {
    let forbidden = spec(UNIFIED);
    let d = decide_unified(
        &forbidden,
        telemetry(Load::idle()),
        state(1, 1),
        &mut memory(),
        T0,
    );
    assert_eq!(d.to, 1);

    let allowed = spec_with(UNIFIED, |raw| raw.scale_to_zero = true);
    let d = decide_unified(
        &allowed,
        telemetry(Load::idle()),
        state(1, 1),
        &mut memory(),
        T0,
    );
    assert_eq!((d.to, d.rule), (0, Rule::ScaleToZero));

    let mut partial = telemetry(Load::idle());
    partial.stable.coverage = secs(30);
    let d = decide_unified(&allowed, partial, state(1, 1), &mut memory(), T0);
    assert_eq!(d.to, 1, "half a window of silence is not a whole one");

    let mut stale = telemetry(Load::idle());
    stale.freshness = Freshness::Stale { age: secs(90) };
    let d = decide_unified(&allowed, stale, state(1, 1), &mut memory(), T0);
    assert_eq!(d.to, 1);

    let one_waiting = telemetry(Load::idle().waiting(1));
    let d = decide_unified(&allowed, one_waiting, state(1, 1), &mut memory(), T0);
    assert_eq!(d.to, 1);
}

#[test]
fn any_load_wakes_a_pool_at_zero_at_once() {
    let spec = spec_with(UNIFIED, |raw| {
        raw.scale_to_zero = true;
        raw.behavior.cooldown = Some("60s".into());
    });
    let mut s = state(0, 0);
    s.last_scale_change_at = Some(T0 - secs(5));
    let d = decide_unified(&spec, telemetry(Load::idle()), s, &mut memory(), T0);
    assert_eq!((d.to, d.action), (0, Action::Hold));

    // Requests refused at the gateway for lack of replicas are load too.
    let mut refused = Load::idle();
    refused.errors_per_s = 2.0;
    let d = decide_unified(&spec, telemetry(refused), s, &mut memory(), T0);
    assert_eq!((d.to, d.action), (1, Action::ScaleUp), "{d}");
}

#[test]
fn capacity_is_learned_upwards_when_the_slo_is_met_above_the_hint() {
    let spec = spec_with(UNIFIED, |raw| {
        if let Some(pool) = raw.pools.unified.as_mut() {
            pool.capacity = Some(crate::spec::CapacityHintsRaw {
                prefill_tokens_per_second: Some(1_000.0),
                ..Default::default()
            });
        }
    });
    let mut mem = memory();
    // 4 ready replicas prefill 8000 tok/s within the TTFT objective: 2000 each, twice the hint.
    let load = Load::tokens(8_000.0, 1_000.0, 20).ttft(ms(300));
    let d = decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0);
    assert_eq!(
        d.reason.feed_forward_replicas,
        Some(8),
        "the hint alone says 8"
    );
    let d = decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0 + STABLE);
    let learned = mem.pool(Role::Unified).learned().prefill_tokens_per_s;
    assert_eq!(learned, Some(2_000.0));
    let cap = d.reason.capacity.prefill_tokens_per_s.unwrap();
    assert_eq!(cap.source, CapacitySource::Learned);
    assert_eq!((d.to, d.action), (4, Action::Hold), "{d}");
}

/// `input` and `output` tokens/s on 4 replicas, TTFT missing its objective with requests queueing.
fn missing_with_a_queue(input: f64, output: f64) -> Load {
    Load::tokens(input, output, 20).ttft(ms(600)).waiting(12)
}

/// The prefill capacity 4 steady replicas teach, from fresh memory, over one stable window of `t`.
fn prefill_learned_over_a_stable_window(spec: &AutoscalerSpec, t: PoolTelemetry) -> Option<f64> {
    let mut mem = memory();
    decide_unified(spec, t.clone(), state(4, 4), &mut mem, T0);
    decide_unified(spec, t, state(4, 4), &mut mem, T0 + STABLE);
    mem.pool(Role::Unified).learned().prefill_tokens_per_s
}

#[test]
fn capacity_is_learned_downwards_when_the_slo_is_missed_below_the_hint() {
    let spec = spec(UNIFIED);
    let mut mem = memory();
    // 4000 tok/s per replica is half the 8000 hint, yet TTFT misses with requests queueing.
    let load = missing_with_a_queue(16_000.0, 1_000.0);
    decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0);
    let d = decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0 + STABLE);
    let learned = mem
        .pool(Role::Unified)
        .learned()
        .prefill_tokens_per_s
        .unwrap();
    // One stable window of EWMA from 8000 towards 3600 (0.9 x 4000): 8000 - (1 - 1/e) x 4400.
    assert!((learned - 5_218.7).abs() < 1.0, "learned {learned}");
    // The hint alone asked for 2; the learned capacity asks for 4.
    assert_eq!(d.reason.feed_forward_replicas, Some(4), "{d}");
}

#[test]
fn a_miss_in_a_window_whose_load_came_in_bursts_teaches_nothing_about_capacity() {
    let spec = spec(UNIFIED);
    // The stable window's mean is the 16,000 tok/s of the test above, and its percentile misses
    // with a queue; but the short window shows the load was not steady: a burst at twice the mean
    // (in progress), or a lull after one (passed). Either way the miss is the burst's, at a load
    // the mean does not show.
    let stable = missing_with_a_queue(16_000.0, 1_000.0);
    let learned_with = |short_input: f64, short_output: f64| {
        let short = missing_with_a_queue(short_input, short_output);
        prefill_learned_over_a_stable_window(&spec, windows(short, stable))
    };
    assert_eq!(learned_with(32_000.0, 2_000.0), None, "a burst in progress");
    assert_eq!(learned_with(4_000.0, 250.0), None, "a burst passed");
    assert_eq!(learned_with(16_000.0, 2_000.0), None, "longer outputs only");
    // Within a third of the mean, the load was steady enough: the miss teaches.
    assert!(learned_with(20_000.0, 1_300.0).is_some());
}

#[test]
fn at_a_few_requests_a_second_the_short_windows_noise_is_not_taken_for_a_burst() {
    let spec = spec(UNIFIED);
    let learned_with = |requests_per_s: f64| {
        let stable = missing_with_a_queue(16_000.0, 1_000.0).requests(requests_per_s);
        // Twice the mean in the short window.
        let short = missing_with_a_queue(32_000.0, 2_000.0).requests(requests_per_s * 2.0);
        prefill_learned_over_a_stable_window(&spec, windows(short, stable))
    };
    // At 1 request a second the short window holds about 10: twice the mean is within three
    // standard errors of it (long prompts alone do that), so the miss teaches.
    assert!(learned_with(1.0).is_some());
    // At 10 a second, about 100: twice the mean is a burst.
    assert_eq!(learned_with(10.0), None);
}

#[test]
fn a_miss_teaches_only_after_a_whole_stable_window_of_steady_load() {
    let spec = spec(UNIFIED);
    let mut mem = memory();
    let steady = missing_with_a_queue(16_000.0, 1_000.0);
    let burst = missing_with_a_queue(48_000.0, 3_000.0);
    let learned = |mem: &PolicyMemory| mem.pool(Role::Unified).learned().prefill_tokens_per_s;
    decide_unified(&spec, telemetry(steady), state(4, 4), &mut mem, T0);
    // A burst ten seconds before the end of the first stable window; when the window ends the
    // short window looks like the stable one again, by chance between bursts.
    let burst_at = T0 + STABLE - secs(10);
    decide_unified(
        &spec,
        windows(burst, steady),
        state(4, 4),
        &mut mem,
        burst_at,
    );
    decide_unified(&spec, telemetry(steady), state(4, 4), &mut mem, T0 + STABLE);
    assert_eq!(learned(&mem), None, "a burst within the window");
    // A whole stable window after the burst, every look steady: the miss teaches.
    decide_unified(
        &spec,
        telemetry(steady),
        state(4, 4),
        &mut mem,
        burst_at + STABLE,
    );
    assert!(learned(&mem).is_some());
}

#[test]
fn a_window_with_more_than_five_percent_failures_teaches_nothing() {
    let spec = spec(UNIFIED);
    let learned_with = |errors_per_s: f64| {
        // As in the test above: replicas shown to sustain less than their hint.
        let mut load = missing_with_a_queue(16_000.0, 1_000.0);
        // Of the requests completed (failed ones included), this many a second failed.
        load.errors_per_s = errors_per_s;
        prefill_learned_over_a_stable_window(&spec, telemetry(load))
    };
    let requests = Load::tokens(16_000.0, 1_000.0, 20).requests_per_s;
    assert!(learned_with(0.04 * requests).is_some());
    assert_eq!(learned_with(0.052 * requests), None);
}

#[test]
fn a_ttft_miss_without_a_queue_teaches_nothing_about_capacity() {
    let spec = spec(UNIFIED);
    let load = Load::tokens(16_000.0, 1_000.0, 20).ttft(ms(600));
    assert_eq!(
        prefill_learned_over_a_stable_window(&spec, telemetry(load)),
        None
    );
}

#[test]
fn partial_telemetry_teaches_nothing_about_capacity() {
    let spec = spec(UNIFIED);
    let mut mem = memory();
    // Three gateways silent: 8000 of the 16000 tok/s served are seen. TTFT misses with a queue,
    // which on Fresh data would pull the capacity towards 0.9 x 8000 / 4.
    let seen = Load::tokens(8_000.0, 1_000.0, 20).ttft(ms(600)).waiting(12);
    let mut t = telemetry(seen);
    t.freshness = Freshness::Partial {
        silent_reporters: 3,
        keys_over_limit: false,
    };
    for i in 0..=10 {
        decide_unified(&spec, t.clone(), state(4, 4), &mut mem, T0 + secs(i * 60));
    }
    assert_eq!(
        mem.pool(Role::Unified).learned(),
        &LearnedCapacity::default()
    );
    // The same windows once the gateways are back do teach (the guard is the freshness).
    t.freshness = Freshness::Fresh;
    decide_unified(&spec, t, state(4, 4), &mut mem, T0 + secs(11 * 60));
    assert!(
        mem.pool(Role::Unified)
            .learned()
            .prefill_tokens_per_s
            .is_some()
    );
}

#[test]
fn without_hints_a_steady_window_within_the_slo_teaches_a_capacity() {
    let spec = spec_with(UNIFIED, without_hints);
    let mut mem = memory();
    let load = Load::tokens(8_000.0, 1_000.0, 20).ttft(ms(300));
    decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0);
    let d = decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0 + STABLE);
    let learned = mem.pool(Role::Unified).learned();
    assert_eq!(learned.prefill_tokens_per_s, Some(2_000.0));
    assert_eq!(learned.decode_tokens_per_s, Some(250.0));
    assert_eq!(learned.concurrent_sequences, Some(5.0));
    assert_eq!(d.reason.feed_forward_replicas, Some(4));
}

#[test]
fn without_hints_feed_forward_on_a_lower_bound_grows_the_pool_only_as_far_as_latency_shows() {
    // The quiet hour proved 50 prefill tokens/s a replica: a lower bound.
    let spec = spec_with(UNIFIED, without_hints);
    let (_, mem) = learned_at_a_quiet_hour(&spec);
    assert_eq!(
        mem.pool(Role::Unified).learned().lowered_by_miss,
        CapacityFlags::default()
    );
    let at = T0 + STABLE + secs(1);
    // Forty times the load with TTFT at twice its objective: on the bound, 80 replicas (16, the
    // maximum); latency shows the 2 replicas short by 2.5 times what is well within.
    let step = Load::tokens(4_000.0, 80.0, 40).ttft(ms(1_000));
    let d = decide_unified(&spec, telemetry(step), state(2, 2), &mut mem.clone(), at);
    assert_eq!(d.reason.feed_forward_replicas, Some(5), "{d}");
    assert_eq!(d.reason.slo_feedback_replicas, Some(4), "{d}");
    assert_eq!((d.to, d.action), (5, Action::ScaleUp), "{d}");
    // The reason says what the bound alone asked for, and why it was not.
    assert_eq!(d.reason.feed_forward_on_lower_bound, Some(80), "{d}");
    assert!(
        d.to_string()
            .contains("feed-forward 5 (held from 80: capacity only the least proven"),
        "{d}"
    );
    // Requests queueing show nothing of how short they are: at most four times.
    let queued = step.waiting(4);
    let d = decide_unified(&spec, telemetry(queued), state(2, 2), &mut mem.clone(), at);
    assert_eq!(d.reason.feed_forward_replicas, Some(8), "{d}");
    // Meeting the objectives with room to spare, they are not multiplied at all.
    let carried_fine = Load::tokens(4_000.0, 80.0, 40).ttft(ms(200)).tpot(ms(45));
    let d = decide_unified(
        &spec,
        telemetry(carried_fine),
        state(2, 2),
        &mut mem.clone(),
        at,
    );
    assert!(
        d.reason.feed_forward_replicas.is_some_and(|n| n <= 3),
        "{d}"
    );
}

#[test]
fn a_steady_miss_marks_the_capacity_it_lowers_as_more_than_a_lower_bound() {
    let spec = spec_with(UNIFIED, without_hints);
    let (light, mut mem) = learned_at_a_quiet_hour(&spec);
    // The same load for a stable window, TPOT over its objective: decode capacity and sequences
    // are lowered towards what was missed at, and known from above now; prefill is not.
    let missed = light.tpot(ms(60));
    for at in [T0 + 2 * STABLE, T0 + 3 * STABLE] {
        decide_unified(&spec, telemetry(missed), state(2, 2), &mut mem, at);
    }
    let learned = mem.pool(Role::Unified).learned();
    assert_eq!(
        learned.lowered_by_miss,
        CapacityFlags {
            prefill_tokens_per_s: false,
            decode_tokens_per_s: true,
            concurrent_sequences: true,
        },
        "{learned:?}"
    );
    // Memory saved before the flags existed loads with none set.
    let mut json = serde_json::to_value(&mem).unwrap();
    let learned_json = json["unified"]["learned"].as_object_mut().unwrap();
    assert!(learned_json.remove("lowered_by_miss").is_some());
    let back: PolicyMemory = serde_json::from_value(json).unwrap();
    assert_eq!(
        back.pool(Role::Unified).learned().lowered_by_miss,
        CapacityFlags::default()
    );
}

#[test]
fn a_changing_ready_count_teaches_nothing_until_it_has_held_a_stable_window() {
    let spec = spec_with(UNIFIED, without_hints);
    let mut mem = memory();
    let load = Load::tokens(8_000.0, 1_000.0, 20).ttft(ms(300));
    decide_unified(&spec, telemetry(load), state(4, 3), &mut mem, T0);
    decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0 + secs(30));
    decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0 + secs(80));
    assert_eq!(mem.pool(Role::Unified).learned().prefill_tokens_per_s, None);
    decide_unified(&spec, telemetry(load), state(4, 4), &mut mem, T0 + secs(90));
    assert!(
        mem.pool(Role::Unified)
            .learned()
            .prefill_tokens_per_s
            .is_some()
    );
}

#[test]
fn dry_run_decides_the_same_and_is_flagged() {
    let live = spec(UNIFIED);
    let dry = spec_with(UNIFIED, |raw| raw.dry_run = true);
    let inputs = unified(telemetry(Load::tokens(24_000.0, 1_000.0, 20)), state(2, 2));
    let a = run(&live, &inputs, &mut memory(), T0);
    let b = run(&dry, &inputs, &mut memory(), T0);
    assert!(!a.dry_run && b.dry_run);
    assert_eq!(a.pools, b.pools);
}

#[test]
fn inputs_shaped_unlike_the_spec_are_an_error() {
    let spec = spec(DISAGGREGATED);
    let inputs = unified(telemetry(Load::idle()), state(1, 1));
    let err = decide(&spec, &inputs, &mut memory(), T0).unwrap_err();
    assert_eq!(
        err,
        DecideError::TopologyMismatch {
            spec: Topology::Disaggregated,
            inputs: Topology::Unified
        }
    );
    assert_eq!(err.as_str(), "topology_mismatch");
}

#[test]
fn the_last_decision_is_remembered_per_pool() {
    let spec = spec(UNIFIED);
    let mut mem = memory();
    let d = decide_unified(
        &spec,
        telemetry(Load::tokens(24_000.0, 1_000.0, 20)),
        state(2, 2),
        &mut mem,
        T0,
    );
    let last = mem.pool(Role::Unified).last_decision().unwrap();
    assert_eq!(
        (last.at, last.from, last.to, last.rule),
        (T0, 2, d.to, d.rule)
    );
}

#[test]
fn memory_survives_serialization() {
    let spec = spec(UNIFIED);
    let mut mem = memory();
    let load = Load::tokens(8_000.0, 1_000.0, 20).ttft(ms(300));
    for step in 0..5 {
        decide_unified(
            &spec,
            telemetry(load),
            state(4, 4),
            &mut mem,
            T0 + secs(step * 30),
        );
    }
    let json = serde_json::to_string(&mem).unwrap();
    let back: PolicyMemory = serde_json::from_str(&json).unwrap();
    assert_eq!(mem, back);
}

#[test]
fn rule_labels_are_distinct_snake_case() {
    let mut seen = std::collections::HashSet::new();
    for rule in Rule::ALL {
        let label = rule.as_str();
        assert!(
            label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{label}"
        );
        assert!(seen.insert(label), "duplicate label {label}");
        assert_eq!(rule.to_string(), label);
    }
}

#[test]
fn the_decision_text_gives_the_rule_and_the_figures() {
    let spec = spec(UNIFIED);
    let load = Load::tokens(24_000.0, 1_000.0, 20).ttft(ms(300));
    let d = decide_unified(&spec, telemetry(load), state(2, 2), &mut memory(), T0);
    let text = d.text();
    assert!(
        text.starts_with("unified: 2 -> 3 (scale_up, feed_forward): "),
        "{text}"
    );
    assert!(text.contains("feed-forward 3"), "{text}");
    assert!(
        text.contains("TTFT 300.0ms vs 500ms (-40%, stable window)"),
        "{text}"
    );
    assert!(
        text.contains("capacity 8000 prefill tok/s/replica (hint)"),
        "{text}"
    );
}

/// Memory with capacity learned for the unified pool (2,000 prefill tokens/s a replica) and a
/// decision on record, after a full stable window at 4 ready replicas.
fn memory_with_learned_capacity(spec: &AutoscalerSpec) -> PolicyMemory {
    let mut mem = memory();
    let load = Load::tokens(8_000.0, 1_000.0, 20).ttft(ms(300));
    decide_unified(spec, telemetry(load), state(4, 4), &mut mem, T0);
    decide_unified(spec, telemetry(load), state(4, 4), &mut mem, T0 + STABLE);
    assert!(
        mem.pool(Role::Unified)
            .learned()
            .prefill_tokens_per_s
            .is_some()
    );
    mem
}

#[test]
fn an_edit_keeps_what_still_describes_the_same_replicas() {
    let low_hint = |raw: &mut crate::spec::AutoscalerSpecRaw| {
        if let Some(pool) = raw.pools.unified.as_mut() {
            pool.capacity = Some(crate::spec::CapacityHintsRaw {
                prefill_tokens_per_second: Some(1_000.0),
                ..Default::default()
            });
        }
    };
    let before = spec_with(UNIFIED, low_hint);
    let learned = memory_with_learned_capacity(&before);

    // A higher maxReplicas: everything kept, the start too (no new restart hold).
    let more_replicas = spec_with(UNIFIED, |raw| {
        low_hint(raw);
        if let Some(pool) = raw.pools.unified.as_mut() {
            pool.max_replicas = 32;
        }
    });
    let mut mem = learned.clone();
    let carried = mem.carry_over(&before, &more_replicas);
    assert_eq!(carried.kept, [Role::Unified]);
    assert_eq!(mem, learned);

    // Another TTFT target: capacity was learned against the old one.
    let tighter = spec_with(UNIFIED, |raw| {
        low_hint(raw);
        raw.slo.ttft = Some("200ms".into());
    });
    let mut mem = learned.clone();
    assert_eq!(mem.carry_over(&before, &tighter).unlearned, [Role::Unified]);
    assert_eq!(mem.pool(Role::Unified).learned(), &Default::default());
    assert_eq!(
        mem.pool(Role::Unified).last_decision(),
        learned.pool(Role::Unified).last_decision(),
        "the rest is kept"
    );

    // New hints: the user's word replaces what was learned.
    let mut mem = learned.clone();
    assert_eq!(
        mem.carry_over(&before, &spec(UNIFIED)).unlearned,
        [Role::Unified]
    );

    // Another scale target: other replicas, nothing carried.
    let moved = spec_with(UNIFIED, |raw| {
        low_hint(raw);
        if let Some(pool) = raw.pools.unified.as_mut() {
            pool.scale_target_ref.name = "llama-h100".into();
        }
    });
    let mut mem = learned.clone();
    assert_eq!(mem.carry_over(&before, &moved).forgotten, [Role::Unified]);
    let mut forgotten = memory();
    forgotten.forget_pool(Role::Unified);
    assert_eq!(mem.pool(Role::Unified), forgotten.pool(Role::Unified));
    assert_eq!(mem.pool(Role::Unified).learned(), &Default::default());
    assert_eq!(mem.started_at(), learned.started_at());
}

#[test]
fn a_pool_forgotten_on_an_edit_waits_a_whole_scale_down_window_again() {
    let before = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_down = rules("300s", 1, "60s");
    });
    let mut mem = memory();
    let busy = Load::tokens(64_000.0, 1_000.0, 20);
    let d = decide_unified(&before, telemetry(busy), state(8, 8), &mut mem, T0);
    assert_eq!(d.to, 8, "{d}");
    // Two GPUs a replica now: other replicas, so the pool's history is forgotten.
    let after = spec_with(UNIFIED, |raw| {
        raw.behavior.scale_down = rules("300s", 1, "60s");
        if let Some(pool) = raw.pools.unified.as_mut() {
            pool.gpus_per_replica = 2;
        }
    });
    assert_eq!(mem.carry_over(&before, &after).forgotten, [Role::Unified]);
    // Quiet at once: what came before the edit is unknown, as after a restart.
    let quiet = Load::tokens(8_000.0, 1_000.0, 20);
    let d = decide_unified(
        &after,
        telemetry(quiet),
        state(8, 8),
        &mut mem,
        T0 + secs(10),
    );
    assert_eq!((d.to, d.action), (8, Action::Hold), "{d}");
    assert_eq!(d.rule, Rule::RestartHold, "{d}");
    let d = decide_unified(
        &after,
        telemetry(quiet),
        state(8, 8),
        &mut mem,
        T0 + secs(200),
    );
    assert_eq!((d.to, d.rule), (8, Rule::StabilizedDown), "{d}");
    let d = decide_unified(
        &after,
        telemetry(quiet),
        state(8, 8),
        &mut mem,
        T0 + secs(311),
    );
    assert_eq!((d.to, d.action), (7, Action::ScaleDown), "{d}");
}

#[test]
fn a_burst_of_decoding_sequences_is_not_learned_as_capacity() {
    let spec = spec(DISAGGREGATED);
    let mut mem = memory();
    let calm = Load::tokens(8_000.0, 2_000.0, 120).tpot(ms(30));
    let steady = disaggregated(
        (telemetry(calm), state(4, 4)),
        (telemetry(calm), state(4, 4)),
    );
    run(&spec, &steady, &mut mem, T0);
    // After a steady window, 400 sequences in flight; TPOT has not moved yet (the burst is
    // seconds old), output tokens neither.
    let burst = Load::tokens(8_000.0, 2_000.0, 400).tpot(ms(30));
    let inputs = disaggregated(
        (telemetry(burst), state(4, 4)),
        (telemetry(burst), state(4, 4)),
    );
    let d = run(&spec, &inputs, &mut mem, T0 + STABLE);
    let decode = pool(&d, Role::Decode);
    assert!(decode.to > 4, "{decode}");
    let learned = mem.pool(Role::Decode).learned().concurrent_sequences;
    assert!(learned.is_some_and(|n| n < 100.0), "{learned:?}");
}
