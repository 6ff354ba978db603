//! Feed-forward on a capacity that is only a lower bound (`lower_bound_reach`): more load and
//! more evidence never lower the limit, and the reason says what was held.

use super::support::*;
use crate::spec::CapacityHintsRaw;
use crate::*;

/// Two replicas that served 100 prefill tokens/s for two stable windows, no hints: a lower
/// bound of about 50 tokens/s a replica, never lowered by a miss.
fn quiet_hour(spec: &AutoscalerSpec) -> PolicyMemory {
    let mut mem = memory();
    let light = Load::tokens(100.0, 20.0, 2);
    for at in [T0, T0 + STABLE] {
        decide_unified(spec, telemetry(light), state(2, 2), &mut mem, at);
    }
    assert_eq!(
        mem.pool(Role::Unified).learned().lowered_by_miss,
        CapacityFlags::default()
    );
    mem
}

/// `t` with its stable window covered for half its length (a gap, or a controller that started
/// 30 s ago): nothing is learned from it, so the decision sizes on the quiet hour's bound.
fn half_covered(mut t: PoolTelemetry) -> PoolTelemetry {
    t.stable.coverage = t.stable.length / 2;
    t
}

#[test]
fn completed_requests_appearing_in_the_short_window_never_yield_fewer_replicas() {
    // The stable window carries 4,000 prefill tokens/s (80 times the lower bound) within its
    // objectives. Light: the last 10 s completed nothing (no latency sample yet). Heavy: the same
    // 10 s completed the load too, at 90% of the TTFT objective. Only the short window differs,
    // and the heavy one is strictly busier: more load must not ask for fewer replicas.
    let spec = spec_with(UNIFIED, without_hints);
    let mem = quiet_hour(&spec);
    let at = T0 + STABLE + secs(1);
    let stable = Load::tokens(4_000.0, 80.0, 4);
    let light = half_covered(windows(Load::idle(), stable));
    let heavy = half_covered(windows(stable.ttft(ms(450)), stable));
    let l = decide_unified(&spec, light, state(2, 2), &mut mem.clone(), at);
    let h = decide_unified(&spec, heavy, state(2, 2), &mut mem.clone(), at);
    assert!(
        h.to >= l.to,
        "more short-window load gave fewer replicas\nlight: {l}\nheavy: {h}"
    );
}

#[test]
fn held_from_is_never_below_the_feed_forward_it_was_held_to() {
    // A prefill hint (1,000 tokens/s a replica) but none for sequences: sequences learned at the
    // quiet hour are only a lower bound and held; prefill, on its hint, asks for more than the
    // held dimension ever wanted. The reason then reads "feed-forward 10 (held from 8: ...)":
    // feed-forward was not held from 8 to 10.
    let spec = spec_with(UNIFIED, |raw| {
        raw.pools.unified.as_mut().unwrap().capacity = Some(CapacityHintsRaw {
            prefill_tokens_per_second: Some(1_000.0),
            ..CapacityHintsRaw::default()
        });
    });
    let mem = quiet_hour(&spec);
    let at = T0 + STABLE + secs(1);
    let step = Load::tokens(10_000.0, 80.0, 8).ttft(ms(450)).tpot(ms(45));
    let d = decide_unified(
        &spec,
        half_covered(telemetry(step)),
        state(2, 2),
        &mut mem.clone(),
        at,
    );
    let ff = d.reason.feed_forward_replicas.unwrap();
    if let Some(held_from) = d.reason.feed_forward_on_lower_bound {
        assert!(
            held_from > ff,
            "the reason says feed-forward {ff} was held from {held_from}: {d}"
        );
    }
}

#[test]
fn waking_from_zero_on_a_lower_bound_asks_for_four_replicas_then_latency_grows_them() {
    // A scaleToZero pool free to add 16 replicas a second, its capacity learned at a quiet hour
    // (a lower bound), asleep at zero. A load 80 times that bound arrives: nothing is ready, so
    // nothing shows how far past the bound one replica goes. It asks for what SLO feedback
    // would ask of one replica at its worst, 4, not for the 80 the bound extrapolates to (a
    // design call: 4 wastes at most 3 GPUs a cold start on a load one replica carries; a load
    // worth more grows by 4x per answer once the 4 serve and show their latency).
    let spec = spec_with(UNIFIED, |raw| {
        without_hints(raw);
        raw.scale_to_zero = true;
        raw.behavior.scale_up = Some(crate::spec::ScalingRulesRaw {
            stabilization_window: Some("0s".to_owned()),
            max_step: Some(16),
            period: Some("1s".to_owned()),
        });
    });
    let mut mem = quiet_hour(&spec);
    let asleep = T0 + 10 * STABLE;
    decide_unified(
        &spec,
        telemetry(Load::idle()),
        state(0, 0),
        &mut mem,
        asleep,
    );
    let step = Load::tokens(4_000.0, 80.0, 40);
    let mut t = windows(step, step);
    (t.short.ttft, t.short.tpot, t.stable.ttft, t.stable.tpot) = (None, None, None, None);
    let d = decide_unified(&spec, t, state(0, 0), &mut mem, asleep + secs(1));
    assert_eq!(d.to, 4, "{d}");
    assert_eq!(d.reason.feed_forward_on_lower_bound, Some(80), "{d}");
}
