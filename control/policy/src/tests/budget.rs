//! GPU budgets, per autoscaler and across autoscalers.

use super::support::*;
use crate::spec::ScalingRulesRaw;
use crate::*;

fn fast_up(raw: &mut AutoscalerSpecRaw) {
    raw.behavior.scale_up = Some(ScalingRulesRaw {
        stabilization_window: Some("0s".into()),
        max_step: Some(10),
        period: Some("1s".into()),
    });
}

#[test]
fn a_gpu_budget_splits_growth_by_need_between_prefill_and_decode() {
    let spec = spec_with(DISAGGREGATED, |raw| {
        fast_up(raw);
        raw.gpu_budget = Some(10);
    });
    // Prefill wants 2 -> 8 (64000 / 8000), decode 2 -> 4 (8000 / 2000): 12 GPUs for a budget of 10.
    let load = Load::tokens(64_000.0, 8_000.0, 100);
    let inputs = disaggregated(
        (telemetry(load), state(2, 2)),
        (telemetry(load), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    let (prefill, decode) = (pool(&d, Role::Prefill), pool(&d, Role::Decode));
    // 6 spare GPUs, shortfalls 6 and 2: 4.5 and 1.5 round down to 4 and 1, the spare one goes to
    // the larger unmet shortfall.
    assert_eq!((prefill.to, decode.to), (7, 3));
    assert_eq!(
        (prefill.rule, decode.rule),
        (Rule::GpuBudget, Rule::GpuBudget)
    );
    assert_eq!(prefill.reason.before_budget, Some(8));
    assert_eq!(decode.reason.before_budget, Some(4));
    assert!(
        prefill.text().contains("GPU budget (wanted 8)"),
        "{prefill}"
    );
}

#[test]
fn growth_within_the_budget_is_untouched() {
    let spec = spec_with(DISAGGREGATED, |raw| {
        fast_up(raw);
        raw.gpu_budget = Some(12);
    });
    let load = Load::tokens(64_000.0, 8_000.0, 100);
    let inputs = disaggregated(
        (telemetry(load), state(2, 2)),
        (telemetry(load), state(2, 2)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    assert_eq!(pool(&d, Role::Prefill).to, 8);
    assert_eq!(pool(&d, Role::Decode).to, 4);
    assert_eq!(pool(&d, Role::Prefill).reason.before_budget, None);
}

#[test]
fn a_budget_below_current_use_stops_growth_but_removes_nothing() {
    let spec = spec_with(DISAGGREGATED, |raw| {
        fast_up(raw);
        raw.gpu_budget = Some(4);
    });
    let grow = Load::tokens(40_000.0, 6_000.0, 100);
    let inputs = disaggregated(
        (telemetry(grow), state(3, 3)),
        (telemetry(grow), state(3, 3)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    let (prefill, decode) = (pool(&d, Role::Prefill), pool(&d, Role::Decode));
    assert_eq!((prefill.to, prefill.rule), (3, Rule::GpuBudget));
    assert_eq!(decode.to, 3);
}

#[test]
fn a_budget_never_takes_a_pool_below_min_replicas() {
    let spec = spec_with(DISAGGREGATED, |raw| {
        fast_up(raw);
        raw.gpu_budget = Some(4);
        if let Some(decode) = raw.pools.decode.as_mut() {
            decode.min_replicas = 2;
        }
    });
    // Decode is below its minimum (someone scaled it by hand); prefill wants to grow.
    let grow = Load::tokens(40_000.0, 100.0, 4);
    let inputs = disaggregated(
        (telemetry(grow), state(2, 2)),
        (telemetry(grow), state(0, 0)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    assert_eq!(pool(&d, Role::Decode).to, 2);
    assert_eq!(pool(&d, Role::Prefill).to, 2);
}

#[test]
fn a_global_budget_is_split_across_autoscalers_by_need() {
    let one_gpu = spec_with(UNIFIED, fast_up);
    let two_gpus = spec_with(UNIFIED, |raw| {
        fast_up(raw);
        if let Some(pool) = raw.pools.unified.as_mut() {
            pool.gpus_per_replica = 2;
        }
    });
    let six = unified(telemetry(Load::tokens(48_000.0, 100.0, 4)), state(2, 2));
    let four = unified(telemetry(Load::tokens(32_000.0, 100.0, 4)), state(2, 2));
    let mut decisions = [
        run(&one_gpu, &six, &mut memory(), T0),
        run(&two_gpus, &four, &mut memory(), T0),
    ];
    apply_global_gpu_budget(&mut decisions, 12);
    let a = pool(&decisions[0], Role::Unified);
    let b = pool(&decisions[1], Role::Unified);
    // Base 2 x 1 + 2 x 2 = 6 GPUs; 6 spare against shortfalls of 4 and 4 GPUs: 3 GPUs each, which
    // is 3 replicas for the first and 1 for the second; the spare GPU fits only the first.
    assert_eq!((a.to, b.to), (6, 3));
    assert_eq!(b.rule, Rule::GpuBudget);
    assert_ne!(a.rule, Rule::GpuBudget, "the first got all it wanted");
    assert!(a.to + 2 * b.to <= 12);
}

#[test]
fn dry_run_autoscalers_only_reserve_what_they_already_use_in_a_global_budget() {
    let live = spec_with(UNIFIED, fast_up);
    let dry = spec_with(UNIFIED, |raw| {
        fast_up(raw);
        raw.dry_run = true;
    });
    let grow = unified(telemetry(Load::tokens(48_000.0, 100.0, 4)), state(2, 2));
    let mut decisions = [
        run(&live, &grow, &mut memory(), T0),
        run(&dry, &grow, &mut memory(), T0),
    ];
    apply_global_gpu_budget(&mut decisions, 6);
    // The dry run keeps its 2 GPUs and wants 6 it will never get; the live one gets the other 4.
    assert_eq!(pool(&decisions[0], Role::Unified).to, 4);
    assert_eq!(pool(&decisions[1], Role::Unified).to, 6);
}

#[test]
fn a_pool_asleep_at_zero_keeps_its_minimum_reserved_in_the_budget() {
    let spec = spec_with(DISAGGREGATED, |raw| {
        fast_up(raw);
        raw.gpu_budget = Some(4);
    });
    let load = Load::tokens(8_000.0, 2_000.0, 10);
    let inputs = disaggregated(
        (telemetry(load), state(1, 1)),
        (telemetry(load), state(1, 1)),
    );
    let d = run(&spec, &inputs, &mut memory(), T0);
    let (mut prefill, mut decode) = (
        pool(&d, Role::Prefill).clone(),
        pool(&d, Role::Decode).clone(),
    );
    // Decode asleep at zero (minReplicas 1, scaleToZero) while prefill wants 1 -> 4.
    (prefill.from, prefill.to, prefill.min_replicas) = (1, 4, 1);
    (decode.from, decode.to, decode.min_replicas) = (0, 0, 1);
    crate::budget::split_budget(&mut [&mut prefill, &mut decode], 4);
    assert_eq!((prefill.to, decode.to), (3, 0), "{prefill}");
    assert_eq!(prefill.rule, Rule::GpuBudget);
    // Load arrives for decode: it wakes to its minimum within the budget.
    (prefill.from, decode.to) = (prefill.to, 1);
    crate::budget::split_budget(&mut [&mut prefill, &mut decode], 4);
    assert_eq!((prefill.to, decode.to), (3, 1));
}
