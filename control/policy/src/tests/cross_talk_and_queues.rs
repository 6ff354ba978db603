//! Found by review: the pools of a disaggregated pair must not answer each other's bursts (the
//! gateway's figures are the pair's, not one pool's), a queue for the first token forbids removing
//! a replica, and a data hold still keeps the bounds. Each test failed before its fix.

use super::support::*;
use crate::*;

/// P/D sizing: requests queued for their first token wait at the prefill pool. The control
/// service gives both pools the same figures, so the decode pool sees them too, and reads them
/// as "latency cannot be judged": its learned decode capacity (a lower bound) is then taken as
/// an overload and the decode pool panics and grows, though its load and TPOT did not move.
#[test]
fn a_long_prompt_burst_queued_at_prefill_does_not_grow_a_decode_pool_sized_on_learned_capacity() {
    let spec = spec_with(DISAGGREGATED, without_hints);
    let mut mem = memory();
    // A quiet hour teaches both pools a capacity (a lower bound: no hint, no miss).
    let quiet = Load::tokens(400.0, 20.0, 2);
    for at in [T0, T0 + STABLE] {
        let inputs = disaggregated(
            (telemetry(quiet), state(2, 2)),
            (telemetry(quiet), state(2, 2)),
        );
        run(&spec, &inputs, &mut mem, at);
    }
    let at = T0 + STABLE + secs(1);
    // The day's decode load: 6 sequences decoding on 2 replicas, TPOT at 40% of its objective.
    let day = Load::tokens(400.0, 20.0, 6);
    let inputs = disaggregated((telemetry(day), state(2, 2)), (telemetry(day), state(2, 2)));
    let d = run(&spec, &inputs, &mut mem.clone(), at);
    let decode = pool(&d, Role::Decode);
    assert_eq!((decode.to, decode.action), (2, Action::Hold), "{decode}");

    // A long-prompt burst: 10x the input tokens, TTFT 3x its objective, 40 requests waiting for
    // their first token (at the prefill pool). Output tokens, decoding sequences and TPOT are
    // those of the day.
    let burst = Load::tokens(4_000.0, 20.0, 6).ttft(ms(1_500)).waiting(40);
    let inputs = disaggregated(
        (windows(burst, day), state(2, 2)),
        (windows(burst, day), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut mem.clone(), at);
    let (prefill, decode) = (pool(&d, Role::Prefill), pool(&d, Role::Decode));
    assert_eq!(prefill.action, Action::ScaleUp, "{prefill}");
    assert_eq!(
        (decode.to, decode.action),
        (2, Action::Hold),
        "a prefill burst grew the decode pool: {decode}"
    );
}

/// P/D sizing: a long-output burst the decode pool cannot keep up with (TPOT 3x its objective,
/// 30% of requests refused) grows the prefill pool as much as the decode pool, though prefill
/// carries its load with TTFT at 40% of the objective and nothing waiting for a first token.
/// The failures, shared by both pools' figures, turn off the prefill pool's "carried now"
/// capacity and give its learned lower bound the whole growth factor.
#[test]
fn a_long_output_burst_that_decode_refuses_requests_under_does_not_grow_prefill() {
    let spec = spec_with(DISAGGREGATED, without_hints);
    let mut mem = memory();
    // A quiet hour teaches both pools a capacity (a lower bound: no hint, no miss).
    let quiet = Load::tokens(400.0, 200.0, 20);
    for at in [T0, T0 + STABLE] {
        let inputs = disaggregated(
            (telemetry(quiet), state(2, 2)),
            (telemetry(quiet), state(2, 2)),
        );
        run(&spec, &inputs, &mut mem, at);
    }
    let at = T0 + STABLE + secs(1);
    // Four times the prompt tokens, TTFT at 40%: prefill carries it (hold).
    let day = Load::tokens(1_600.0, 200.0, 20);
    let inputs = disaggregated(
        (windows(day, quiet), state(2, 2)),
        (windows(day, quiet), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut mem.clone(), at);
    let prefill = pool(&d, Role::Prefill);
    assert_eq!((prefill.to, prefill.action), (2, Action::Hold), "{prefill}");

    // Same prompts, ten times the output: decode is overwhelmed and refuses 3 of 10 requests/s.
    let mut burst = Load::tokens(1_600.0, 2_000.0, 200).tpot(ms(150));
    burst.errors_per_s = 3.0;
    let inputs = disaggregated(
        (windows(burst, quiet), state(2, 2)),
        (windows(burst, quiet), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut mem.clone(), at);
    let (prefill, decode) = (pool(&d, Role::Prefill), pool(&d, Role::Decode));
    assert_eq!(decode.action, Action::ScaleUp, "{decode}");
    assert_eq!(
        (prefill.to, prefill.action),
        (2, Action::Hold),
        "a long-output burst grew the prefill pool: {prefill}"
    );
}

/// N-1 check: a pool without hints, before it has learned a capacity (its ready count changed
/// less than a stable window ago), is sized on latency alone, and latency is only judged while
/// nothing queues (`latency_judged`, which panic, carried load and the lower-bound reach all
/// respect). The "give up one replica" feedback and `fits` do not: with 100 requests waiting for
/// their first token on 4 replicas (the start of a burst, before its requests complete) the
/// latency of the few completed ones, well within the objectives, takes a replica away.
#[test]
fn a_queue_of_requests_waiting_for_their_first_token_forbids_removing_a_replica() {
    let spec = spec_with(UNIFIED, without_hints);
    let mut mem = memory();
    let calm = Load::tokens(2_000.0, 400.0, 20).ttft(ms(150)).tpot(ms(10));
    // The fourth replica became ready 20 s ago: nothing learned for 4 ready replicas yet.
    let mut before = state(4, 3);
    before.last_scale_change_at = Some(T0 - secs(100));
    decide_unified(&spec, telemetry(calm), before, &mut mem, T0);
    let queued = calm.waiting(100);
    let d = decide_unified(
        &spec,
        telemetry(queued),
        state(4, 4),
        &mut mem,
        T0 + secs(20),
    );
    assert_ne!(
        d.action,
        Action::ScaleDown,
        "removed a replica with 25 requests a replica waiting: {d}"
    );
}

/// N-1 check, the same gap on a prefill pool with its hint: token rates count requests as they
/// finish, so a queue forming at the start of a burst is not in them; 100 requests waiting for
/// their first token on 4 prefill replicas do not stop feed-forward's 4 -> 3, and `fits` checks
/// only the finished tokens against the hint.
#[test]
fn a_prefill_pool_with_a_queue_waiting_for_first_tokens_is_not_scaled_down() {
    let spec = spec(DISAGGREGATED);
    let queued = Load::tokens(2_000.0, 400.0, 20).waiting(100);
    let inputs = disaggregated(
        (telemetry(queued), state(4, 4)),
        (telemetry(queued), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    let prefill = pool(&d, Role::Prefill);
    assert_ne!(
        prefill.action,
        Action::ScaleDown,
        "removed a prefill replica with 25 requests a replica waiting: {prefill}"
    );
}

/// Bounds: a maxReplicas lowered under the current count is "configuration, not data: apply it
/// at once" on fresh and partial telemetry, and a data hold honours minReplicas, but a data hold
/// does not honour maxReplicas: with telemetry stale or missing (as it is for every pool from a
/// control-service start until the first report) the decision stays above maxReplicas.
#[test]
fn a_data_hold_still_honours_a_lowered_max_replicas() {
    let spec = spec(UNIFIED); // maxReplicas 16
    for freshness in [Freshness::Stale { age: secs(45) }, Freshness::Missing] {
        let mut t = telemetry(Load::tokens(400_000.0, 1_000.0, 20));
        t.freshness = freshness;
        let d = decide_unified(&spec, t, state(20, 20), &mut memory(), T0);
        assert!(
            d.to <= 16,
            "{freshness:?}: a decision above maxReplicas 16: {d}"
        );
    }
}

/// P/D sizing: the failures exemption lets each pool of a pair ignore the
/// pair's failures while its own objective is well met. When the pool refusing requests is one
/// whose served requests look fine (a prefill pool at its concurrency limit answering 429 to 3 of
/// 10 requests/s, the admitted ones at 40% of the TTFT objective), and decode is fine too, both
/// pools exempt themselves: the failures are ignored altogether and neither pool grows, for as
/// long as they last. Before 59eec5b the prefill pool grew on exactly this input.
#[test]
fn failures_no_pool_of_a_pair_owns_are_not_ignored_by_both() {
    let spec = spec_with(DISAGGREGATED, without_hints);
    let mut mem = memory();
    // A quiet hour teaches both pools a capacity (a lower bound: no hint, no miss).
    let quiet = Load::tokens(400.0, 200.0, 20);
    for at in [T0, T0 + STABLE] {
        let inputs = disaggregated(
            (telemetry(quiet), state(2, 2)),
            (telemetry(quiet), state(2, 2)),
        );
        run(&spec, &inputs, &mut mem, at);
    }
    let at = T0 + STABLE + secs(1);
    // The day: four times the prompts, and 30% of requests refused, in both windows (not a
    // burst). Every served request is at 40% of each objective; nothing waits.
    let mut day = Load::tokens(1_600.0, 200.0, 20);
    day.errors_per_s = 3.0;
    let inputs = disaggregated((telemetry(day), state(2, 2)), (telemetry(day), state(2, 2)));
    let d = run(&spec, &inputs, &mut mem.clone(), at);
    let (prefill, decode) = (pool(&d, Role::Prefill), pool(&d, Role::Decode));
    assert!(
        prefill.action == Action::ScaleUp || decode.action == Action::ScaleUp,
        "30% of requests fail and no pool of the pair grows:\n  {prefill}\n  {decode}"
    );
}

/// N-1 check on a decode pool: 200 requests waiting for their first token all decode there once
/// their prompts are done, so no decode replica is removed while they wait (it went 4 -> 3:
/// 220 sequences are 55 a replica on 4, hint 64, and 73 on 3).
#[test]
fn a_decode_pool_is_not_scaled_down_while_a_burst_queues_for_its_first_tokens() {
    let spec = spec(DISAGGREGATED);
    let queued = Load::tokens(2_000.0, 400.0, 20).waiting(200);
    let inputs = disaggregated(
        (telemetry(queued), state(4, 4)),
        (telemetry(queued), state(4, 4)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    let decode = pool(&d, Role::Decode);
    assert_ne!(
        decode.action,
        Action::ScaleDown,
        "removed a decode replica with 200 requests waiting for their first token: {decode}"
    );
}

/// A decode pool without hints learns the sequences a replica serves from a TPOT miss. The miss
/// is the window's, so the sequences it is set against include the window's mean: taking the
/// count at the window's end alone, a lull of a few seconds (8 decoding where the minute
/// averaged 80) taught 1.8 sequences a replica, ten times too few, and the pool's next busy
/// minute asked for 45 replicas where 5 would do.
#[test]
fn a_decode_pool_without_hints_learns_from_the_sequences_its_latency_answered_to() {
    let spec = spec_with(DISAGGREGATED, without_hints);
    let learn = |mean_known: bool| {
        let mut mem = memory();
        // TPOT at twice its objective over a minute of 80 sequences decoding on 4 replicas.
        let missed = Load::tokens(400.0, 800.0, 80).tpot(ms(100));
        let mut decode = telemetry(missed);
        decode.in_flight_decoding = 8;
        if !mean_known {
            decode.stable.mean_decoding = None;
            decode.short.mean_decoding = None;
        }
        let mut last = None;
        for at in [T0, T0 + STABLE] {
            let inputs = disaggregated(
                (telemetry(missed), state(4, 4)),
                (decode.clone(), state(4, 4)),
            );
            last = Some(run(&spec, &inputs, &mut mem, at));
        }
        let decision = last.unwrap();
        let decode = pool(&decision, Role::Decode).clone();
        let learned = mem.pool(Role::Decode).learned().concurrent_sequences;
        // The next minute: the same 80 sequences, TPOT met.
        let busy = Load::tokens(400.0, 800.0, 80).tpot(ms(45));
        let inputs = disaggregated(
            (telemetry(busy), state(4, 4)),
            (telemetry(busy), state(4, 4)),
        );
        let next = run(&spec, &inputs, &mut mem, T0 + STABLE + secs(1));
        let sized = pool(&next, Role::Decode).reason.feed_forward_replicas;
        (learned.unwrap_or(0.0), sized, decode)
    };
    let (learned, sized, decode) = learn(true);
    assert!((learned - 18.0).abs() < 1e-9, "{learned}: {decode}");
    // The reason shows both counts.
    assert_eq!(
        (
            decode.reason.load.decoding_sequences,
            decode.reason.load.decoding_sequences_mean
        ),
        (8, Some(80.0))
    );
    assert!(
        decode
            .to_string()
            .contains("8 decoding, 0 waiting (80.0 decoding on average over the stable window)"),
        "{decode}"
    );
    assert_eq!(sized, Some(5));
    // Where the mean is not known (an older caller), the count at the end is all there is.
    let (from_the_end, sized, _) = learn(false);
    assert!((from_the_end - 1.8).abs() < 1e-9, "{from_the_end}");
    assert_eq!(sized, Some(45));
}

/// A queue is never learned as sequences a unified replica serves, whether it shows at the
/// window's end or only over the window: one that lasted most of the minute and drained by its
/// end was counted in the mean and learned (15 a replica where 10 were served). Found by review.
#[test]
fn a_queue_that_drained_by_the_windows_end_is_not_learned_as_served_sequences() {
    let spec = spec_with(UNIFIED, without_hints);
    let learned = |mean_waiting: f64| {
        // 40 decoding on 4 replicas, TPOT met, nothing waiting at the end.
        let mut t = telemetry(Load::tokens(400.0, 800.0, 40).tpot(ms(40)));
        t.stable.mean_waiting = Some(mean_waiting);
        t.short.mean_waiting = Some(mean_waiting);
        let mut mem = memory();
        for at in [T0, T0 + STABLE] {
            decide_unified(&spec, t.clone(), state(4, 4), &mut mem, at);
        }
        mem.pool(Role::Unified).learned().concurrent_sequences
    };
    assert_eq!(learned(0.0), Some(10.0));
    // 5 waiting a replica on average: a queue. Nothing is learned from the window.
    assert_eq!(learned(20.0), None);
}
