//! GPU budgets: when the pools' growth would exceed a budget, the growth is split by need.
//!
//! A budget only limits growth. Each pool keeps `max(from, minReplicas)` (or its lower `to` when it
//! shrinks), and a pool asleep at zero keeps `minReplicas` reserved for its waking; what is left
//! of the budget goes to the growing pools in proportion to their shortfall
//! in GPUs, whole replicas only, leftovers to the largest unmet shortfall. A budget lowered below
//! what pools already use stops growth but never removes replicas: that would be a scale-down
//! decided without looking at the load.

use crate::decision::{Action, AutoscalerDecision, PoolDecision, Rule};

/// Splits one budget across the pools of several autoscalers (e.g. all the autoscalers of a
/// cluster sharing one GPU quota). Call it after `decide` has run for each of them.
///
/// Dry-run autoscalers take no part: they change nothing, so only the GPUs they already use
/// (`from`) count against the budget.
pub fn apply_global_gpu_budget(decisions: &mut [AutoscalerDecision], budget_gpus: u32) {
    let mut reserved: u64 = 0;
    let mut pools: Vec<&mut PoolDecision> = Vec::new();
    for decision in decisions.iter_mut() {
        if decision.dry_run {
            for (_, pool) in decision.pools.iter() {
                reserved += u64::from(pool.from) * u64::from(pool.gpus_per_replica);
            }
        } else {
            pools.extend(decision.pools.iter_mut());
        }
    }
    let budget = u64::from(budget_gpus).saturating_sub(reserved);
    split_budget(&mut pools, u32::try_from(budget).unwrap_or(u32::MAX));
}

/// What a pool keeps whatever the budget.
fn base(pool: &PoolDecision) -> u32 {
    if pool.to > pool.from {
        pool.from.max(pool.min_replicas).min(pool.to)
    } else {
        pool.to
    }
}

/// Cuts the pools' growth to fit `budget_gpus`; see the module documentation. Allocates only when
/// the budget is exceeded.
pub(crate) fn split_budget(pools: &mut [&mut PoolDecision], budget_gpus: u32) {
    let mut base_gpus: u64 = 0;
    let mut growth_gpus: u64 = 0;
    for pool in pools.iter() {
        let gpus = u64::from(pool.gpus_per_replica);
        // A pool asleep at zero wakes to its minimum whatever the budget: what that takes stays
        // reserved, or a sibling grown into it would leave the woken pool over the budget.
        let base = base(pool).max(if pool.to == 0 { pool.min_replicas } else { 0 });
        base_gpus += u64::from(base) * gpus;
        growth_gpus += u64::from(pool.to.saturating_sub(base)) * gpus;
    }
    let headroom = u64::from(budget_gpus).saturating_sub(base_gpus);
    if growth_gpus <= headroom {
        return;
    }

    let wanted: Vec<u32> = pools.iter().map(|p| p.to).collect();
    let mut used: u64 = 0;
    for pool in pools.iter_mut() {
        let gpus = u64::from(pool.gpus_per_replica);
        if gpus == 0 {
            // Uses no GPUs: the budget does not concern it.
            continue;
        }
        let base = base(pool);
        let growth = u64::from(pool.to - base) * gpus;
        // growth_gpus > headroom >= 0, so the division is defined; u128 keeps the product exact.
        let share = u128::from(headroom) * u128::from(growth) / u128::from(growth_gpus);
        let replicas = u64::try_from(share).unwrap_or(u64::MAX) / gpus;
        let replicas = u32::try_from(replicas).unwrap_or(u32::MAX);
        pool.to = base.saturating_add(replicas);
        used += u64::from(replicas) * gpus;
    }

    // Whole replicas leave some GPUs over; give them, a replica at a time, to the largest unmet
    // shortfall that still fits (ties to the first pool, for determinism).
    let mut left = headroom.saturating_sub(used);
    loop {
        let mut best: Option<(usize, u64)> = None;
        for (i, pool) in pools.iter().enumerate() {
            let gpus = u64::from(pool.gpus_per_replica);
            if gpus == 0 || gpus > left || pool.to >= wanted[i] {
                continue;
            }
            let unmet = u64::from(wanted[i] - pool.to) * gpus;
            if best.is_none_or(|(_, b)| unmet > b) {
                best = Some((i, unmet));
            }
        }
        let Some((i, _)) = best else {
            break;
        };
        let pool = &mut pools[i];
        pool.to += 1;
        left -= u64::from(pool.gpus_per_replica);
    }

    for (pool, &wanted) in pools.iter_mut().zip(&wanted) {
        if pool.to < wanted {
            pool.action = Action::between(pool.from, pool.to);
            pool.rule = Rule::GpuBudget;
            pool.reason.before_budget.get_or_insert(wanted);
        }
    }
}
