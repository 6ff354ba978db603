#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The budget shared by all autoscalers, driven share by share with explicit instants: what is
//! granted together never exceeds it, whatever order evaluations begin and share in.

use std::time::Duration;

use flyball_policy::decision::{Action, AutoscalerDecision, PoolDecision, Rule};
use flyball_policy::pools::{Pools, Role};
use proptest::prelude::*;
use tokio::time::Instant;

use super::tests::sample_reason;
use super::{BudgetSeat, SharedBudget};

fn key(name: &str) -> (String, String) {
    ("default".to_string(), name.to_string())
}

/// A budget of 4 GPUs that waits `max_wait` at most, with llama and qwen taking part.
fn llama_and_qwen_sharing_four(max_wait: Duration) -> (SharedBudget, BudgetSeat, BudgetSeat) {
    let budget = SharedBudget::new(4, max_wait);
    let llama = budget.register(&key("llama"));
    let qwen = budget.register(&key("qwen"));
    (budget, llama, qwen)
}

/// One pool of a simulated autoscaler: GPUs per replica and `minReplicas`.
#[derive(Debug, Clone, Copy)]
struct PoolShape {
    gpus_per_replica: u32,
    min_replicas: u32,
}

const ONE_GPU: PoolShape = PoolShape {
    gpus_per_replica: 1,
    min_replicas: 0,
};

fn pool_decision(role: Role, shape: PoolShape, from: u32, to: u32) -> PoolDecision {
    PoolDecision {
        role,
        from,
        to,
        action: Action::between(from, to),
        rule: if to == from {
            Rule::NoChange
        } else {
            Rule::FeedForward
        },
        min_replicas: shape.min_replicas,
        gpus_per_replica: shape.gpus_per_replica,
        reason: sample_reason(),
    }
}

/// What the policy decided for pools shaped `shapes` (one: unified; two: prefill and decode),
/// each asking `to` from `from`.
fn decision(shapes: &[PoolShape], from: &[u32], to: &[u32]) -> AutoscalerDecision {
    let pools = match shapes {
        [unified] => Pools::Unified(pool_decision(Role::Unified, *unified, from[0], to[0])),
        [prefill, decode] => Pools::Disaggregated {
            prefill: pool_decision(Role::Prefill, *prefill, from[0], to[0]),
            decode: pool_decision(Role::Decode, *decode, from[1], to[1]),
        },
        _ => unreachable!("an autoscaler has one or two pools"),
    };
    AutoscalerDecision {
        at: Duration::ZERO,
        dry_run: false,
        pools,
    }
}

/// A unified one-GPU pool asking `to` replicas from `from`.
fn unified(from: u32, to: u32) -> AutoscalerDecision {
    decision(&[ONE_GPU], &[from], &[to])
}

fn replicas_granted(decision: &AutoscalerDecision) -> Vec<u32> {
    decision.pools.iter().map(|(_, pool)| pool.to).collect()
}

fn gpus_granted(decision: &AutoscalerDecision) -> u64 {
    decision
        .pools
        .iter()
        .map(|(_, pool)| u64::from(pool.to) * u64::from(pool.gpus_per_replica))
        .sum()
}

fn unified_pool(decision: &AutoscalerDecision) -> &PoolDecision {
    match &decision.pools {
        Pools::Unified(pool) => pool,
        Pools::Disaggregated { .. } => panic!("unified expected: {decision:?}"),
    }
}

/// The reviewer's race: evaluations read replicas (an await) between taking `now` and sharing,
/// so qwen's evaluation, begun first, shares after llama's. llama, sharing against qwen's want
/// from before the load, is granted 3 of 4 GPUs; qwen's cut then finds llama's want more recent
/// than its own and took its split of 2 (llama's want still counted llama at 1): 5 GPUs.
#[test]
fn an_evaluation_that_began_first_but_shares_last_gets_only_what_the_others_left() {
    let (budget, llama, qwen) = llama_and_qwen_sharing_four(Duration::from_secs(10));
    let t0 = Instant::now();
    budget.share(&llama, unified(1, 1), t0);
    budget.share(&qwen, unified(1, 1), t0);

    let qwen_began = t0 + Duration::from_millis(1_000);
    let llama_began = t0 + Duration::from_millis(1_050);
    let llama_granted = budget.share(&llama, unified(1, 3), llama_began);
    let qwen_granted = budget.share(&qwen, unified(1, 3), qwen_began);

    assert_eq!(unified_pool(&llama_granted).to, 3, "{llama_granted:?}");
    let qwen_pool = unified_pool(&qwen_granted);
    assert!(
        gpus_granted(&llama_granted) + gpus_granted(&qwen_granted) <= 4,
        "llama granted {}, qwen {}, budget 4",
        unified_pool(&llama_granted).to,
        qwen_pool.to
    );
    // qwen holds and says why: the budget, and what it wanted.
    assert_eq!(
        (qwen_pool.to, qwen_pool.action, qwen_pool.rule),
        (1, Action::Hold, Rule::GpuBudget)
    );
    assert_eq!(qwen_pool.reason.before_budget, Some(3));

    // llama's next evaluation starts from the 3 it set, which the budget never takes back; once
    // it has evaluated, qwen's fair share is what is left.
    let llama_granted = budget.share(&llama, unified(3, 3), t0 + Duration::from_millis(1_100));
    let qwen_granted = budget.share(&qwen, unified(1, 3), t0 + Duration::from_millis(1_150));
    assert_eq!(
        (
            unified_pool(&llama_granted).to,
            unified_pool(&qwen_granted).to
        ),
        (3, 1)
    );
    // When llama's load falls, what it gives back is qwen's at qwen's next evaluation.
    let llama_granted = budget.share(&llama, unified(3, 2), t0 + Duration::from_millis(1_200));
    let qwen_granted = budget.share(&qwen, unified(1, 3), t0 + Duration::from_millis(1_250));
    assert_eq!(
        (
            unified_pool(&llama_granted).to,
            unified_pool(&qwen_granted).to
        ),
        (2, 2)
    );
}

/// A cut autoscaler stops waiting for the others' wants after `max_wait` (one may be stuck in a
/// write retried for tens of seconds) and then takes its split of the wants known: that split
/// still counted llama at the 1 replica its want started from, not the 3 it was granted.
#[test]
fn a_cut_autoscaler_done_waiting_takes_only_what_the_others_grants_leave() {
    let max_wait = Duration::from_secs(10);
    let (budget, llama, qwen) = llama_and_qwen_sharing_four(max_wait);
    let t0 = Instant::now();
    budget.share(&llama, unified(1, 1), t0);
    budget.share(&qwen, unified(1, 1), t0);

    // llama's load comes first: all of it fits. Its write is then retried for a long while.
    let llama_granted = budget.share(&llama, unified(1, 3), t0 + Duration::from_secs(1));
    assert_eq!(unified_pool(&llama_granted).to, 3);
    // qwen's load comes next: cut (llama's want counts 2 of its 3), it waits for llama.
    let cut_began = t0 + Duration::from_secs(2);
    let waiting = budget.share(&qwen, unified(1, 3), cut_began);
    assert_eq!(unified_pool(&waiting).to, 1);
    let done_waiting = budget.share(&qwen, unified(1, 3), cut_began + max_wait);

    let qwen_pool = unified_pool(&done_waiting);
    assert!(
        gpus_granted(&llama_granted) + gpus_granted(&done_waiting) <= 4,
        "llama granted 3, qwen {}, budget 4",
        qwen_pool.to
    );
    assert_eq!((qwen_pool.to, qwen_pool.rule), (1, Rule::GpuBudget));
    assert_eq!(qwen_pool.reason.before_budget, Some(3));
}

/// What the others' grants leave free limits growth only: replicas an autoscaler already has it
/// keeps, as under any budget cut, and a pool asleep at zero keeps its minimum reserved.
#[test]
fn what_is_free_never_takes_replicas_back_and_keeps_a_sleeping_minimum() {
    let (budget, llama, qwen) = llama_and_qwen_sharing_four(Duration::from_secs(10));
    let t0 = Instant::now();
    // llama's replicas were set before the budget: 5 of 4 GPUs.
    let llama_granted = budget.share(&llama, unified(5, 6), t0);
    assert_eq!(unified_pool(&llama_granted).to, 5);
    let qwen_granted = budget.share(&qwen, unified(1, 3), t0);
    let qwen_pool = unified_pool(&qwen_granted);
    assert_eq!((qwen_pool.to, qwen_pool.rule), (1, Rule::GpuBudget));

    // qwen scales to zero with a minimum of 1: llama may not take the replica it wakes to.
    let sleeping = PoolShape {
        gpus_per_replica: 1,
        min_replicas: 1,
    };
    let later = t0 + Duration::from_secs(1);
    budget.share(&llama, unified(5, 1), later);
    budget.share(&qwen, decision(&[sleeping], &[1], &[0]), later);
    // Cut, llama first waits for qwen's next want.
    let llama_granted = budget.share(&llama, unified(1, 6), later + Duration::from_secs(1));
    assert_eq!(unified_pool(&llama_granted).to, 1, "{llama_granted:?}");
    budget.share(
        &qwen,
        decision(&[sleeping], &[0], &[0]),
        later + Duration::from_secs(2),
    );
    let llama_granted = budget.share(&llama, unified(1, 6), later + Duration::from_secs(3));
    assert_eq!(unified_pool(&llama_granted).to, 3, "{llama_granted:?}");
    // Woken, qwen has its minimum: 4 GPUs in all.
    let qwen_granted = budget.share(
        &qwen,
        decision(&[sleeping], &[0], &[2]),
        later + Duration::from_secs(4),
    );
    assert_eq!(unified_pool(&qwen_granted).to, 1, "{qwen_granted:?}");
}
/// A simulated autoscaler: its pools, the replicas set on them, and the evaluation in flight
/// (when it began, the replicas it read, what it wants).
#[derive(Debug, Clone)]
struct Simulated {
    shapes: Vec<PoolShape>,
    replicas: Vec<u32>,
    in_flight: Option<(Instant, Vec<u32>, Vec<u32>)>,
    granted: Option<AutoscalerDecision>,
}

fn pool_shape() -> impl Strategy<Value = PoolShape> {
    (1u32..=3, 0u32..=1).prop_map(|(gpus_per_replica, min_replicas)| PoolShape {
        gpus_per_replica,
        min_replicas,
    })
}

/// A want for `shape` from a raw 0..=8: at least its minimum unless zero (scale to zero).
fn want(shape: PoolShape, raw: u32) -> u32 {
    if raw == 0 {
        0
    } else {
        raw.max(shape.min_replicas)
    }
}

fn total_granted(autoscalers: &[Simulated]) -> u64 {
    autoscalers
        .iter()
        .filter_map(|a| a.granted.as_ref())
        .map(gpus_granted)
        .sum()
}

/// The replicas `want` keeps whatever the budget (`flyball_policy::budget`'s base): all it has
/// when it grows, at least its minimum; what it asks for when it shrinks.
fn kept_whatever_the_budget(want: &AutoscalerDecision) -> Vec<u32> {
    want.pools
        .iter()
        .map(|(_, pool)| {
            if pool.to > pool.from {
                pool.from.max(pool.min_replicas).min(pool.to)
            } else {
                pool.to
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Several autoscalers with random wants, whose evaluations begin and share in random
    /// interleavings (each begins, reads and decides, and shares later): after every share what
    /// is granted in all fits the budget, and no grant is below what the autoscaler keeps
    /// whatever the budget. Then, wants steady, rounds in which each evaluates once in a random
    /// order: an autoscaler cut at its previous evaluation gets its share of the split by need
    /// of what all hold and want as soon as every other has evaluated since and holds what it
    /// was granted (no wait, and nothing withheld that the others do not hold).
    #[test]
    fn grants_never_exceed_the_budget_and_reach_the_split_by_need(
        shapes in proptest::collection::vec(proptest::collection::vec(pool_shape(), 1..=2), 2..=4),
        spare_gpus in 0u32..=12,
        max_wait_ms in 200u64..=3_000,
        events in proptest::collection::vec(
            (0usize..4, proptest::collection::vec(0u32..=8, 2), 0u64..=400),
            0..80,
        ),
        steady_wants in proptest::collection::vec(proptest::collection::vec(0u32..=8, 2), 4),
        rounds in proptest::collection::vec(proptest::collection::vec(any::<u32>(), 4), 6),
    ) {
        let minimum: u32 = shapes
            .iter()
            .flatten()
            .map(|s| s.min_replicas * s.gpus_per_replica)
            .sum();
        let gpus = minimum + spare_gpus;
        let budget = SharedBudget::new(gpus, Duration::from_millis(max_wait_ms));
        let seats: Vec<_> = (0..shapes.len())
            .map(|i| budget.register(&key(&format!("autoscaler-{i}"))))
            .collect();
        let mut clock = Instant::now();
        let mut autoscalers: Vec<Simulated> = shapes
            .iter()
            .map(|shapes| Simulated {
                shapes: shapes.clone(),
                replicas: vec![0; shapes.len()],
                in_flight: None,
                granted: None,
            })
            .collect();
        // Each starts asleep and says so.
        for (i, autoscaler) in autoscalers.iter_mut().enumerate() {
            let zero = vec![0; autoscaler.shapes.len()];
            autoscaler.granted =
                Some(budget.share(&seats[i], decision(&autoscaler.shapes, &zero, &zero), clock));
        }

        // Shares the evaluation in flight and sets its grant; returns what it wanted.
        let finish = |autoscalers: &mut Vec<Simulated>, i: usize| {
            let a = &mut autoscalers[i];
            let (began, from, to) = a.in_flight.take().expect("in flight");
            let want = decision(&a.shapes, &from, &to);
            let granted = budget.share(&seats[i], want.clone(), began);
            prop_assert!(
                replicas_granted(&granted)
                    .iter()
                    .zip(kept_whatever_the_budget(&want))
                    .all(|(granted, kept)| *granted >= kept),
                "granted {:?} below what {:?} keeps",
                granted,
                want
            );
            a.replicas = replicas_granted(&granted);
            a.granted = Some(granted);
            let total = total_granted(autoscalers);
            prop_assert!(
                total <= u64::from(gpus),
                "{total} GPUs granted of {gpus}: {autoscalers:#?}"
            );
            Ok(want)
        };
        for (which, raw_wants, step_ms) in &events {
            let i = which % autoscalers.len();
            clock += Duration::from_millis(*step_ms);
            if autoscalers[i].in_flight.is_some() {
                finish(&mut autoscalers, i)?;
            } else {
                let a = &mut autoscalers[i];
                let wants = a.shapes.iter().zip(raw_wants).map(|(s, raw)| want(*s, *raw)).collect();
                a.in_flight = Some((clock, a.replicas.clone(), wants));
            }
        }
        for i in 0..autoscalers.len() {
            if autoscalers[i].in_flight.is_some() {
                clock += Duration::from_millis(50);
                finish(&mut autoscalers, i)?;
            }
        }

        let wants: Vec<Vec<u32>> = autoscalers
            .iter()
            .zip(&steady_wants)
            .map(|(a, raw)| a.shapes.iter().zip(raw).map(|(s, raw)| want(*s, *raw)).collect())
            .collect();
        // Per autoscaler, in the steady rounds: whether its last evaluation was cut, and which
        // others have evaluated since, their grant unchanged.
        let mut cut_last_time = vec![false; autoscalers.len()];
        let mut settled_since_mine = vec![vec![false; autoscalers.len()]; autoscalers.len()];
        for order_keys in &rounds {
            let mut order: Vec<usize> = (0..autoscalers.len()).collect();
            order.sort_by_key(|&i| order_keys[i]);
            for i in order {
                clock += Duration::from_millis(100);
                let mut split: Vec<AutoscalerDecision> = autoscalers
                    .iter()
                    .zip(&wants)
                    .map(|(a, want)| decision(&a.shapes, &a.replicas, want))
                    .collect();
                flyball_policy::apply_global_gpu_budget(&mut split, gpus);
                let held_before = autoscalers[i].replicas.clone();
                autoscalers[i].in_flight = Some((clock, held_before.clone(), wants[i].clone()));
                finish(&mut autoscalers, i)?;
                let granted = autoscalers[i].replicas.clone();
                let others_evaluated_and_settled = settled_since_mine[i]
                    .iter()
                    .enumerate()
                    .all(|(other, settled)| other == i || *settled);
                if cut_last_time[i] && others_evaluated_and_settled {
                    prop_assert_eq!(
                        &granted,
                        &replicas_granted(&split[i]),
                        "autoscaler {} wants {:?}, holding {:?}: {:#?}",
                        i,
                        &wants[i],
                        &held_before,
                        &autoscalers
                    );
                }
                cut_last_time[i] = granted.iter().zip(&wants[i]).any(|(got, want)| got < want);
                settled_since_mine[i].fill(false);
                for (other, settled) in settled_since_mine.iter_mut().enumerate() {
                    if other != i {
                        settled[i] = granted == held_before;
                    }
                }
            }
        }
    }
}

/// llama is granted 1 -> 3 of 4 GPUs, then its Deployment is deleted: its reads find nothing
/// and it decides nothing again, so its grant would keep qwen at 1 for good. Told the target is
/// gone, the budget lets qwen grow into the GPUs no pod holds any more.
#[test]
fn a_grant_whose_target_was_deleted_is_given_back() {
    let max_wait = Duration::from_secs(10);
    let (budget, llama, qwen) = llama_and_qwen_sharing_four(max_wait);
    let t0 = Instant::now();
    budget.share(&llama, unified(1, 1), t0);
    budget.share(&qwen, unified(1, 1), t0);
    let llama_granted = budget.share(&llama, unified(1, 3), t0 + Duration::from_secs(1));
    assert_eq!(unified_pool(&llama_granted).to, 3);
    let cut = budget.share(&qwen, unified(1, 3), t0 + Duration::from_secs(2));
    assert_eq!(unified_pool(&cut).to, 1);

    budget.release_gone(&llama, Role::Unified);
    // qwen's split still counts llama's last want (1 -> 3, 2 GPUs of it) until llama decides
    // again; what was granted no longer stands in the way.
    let after = budget.share(&qwen, unified(1, 3), t0 + Duration::from_secs(3) + max_wait);
    assert!(
        unified_pool(&after).to >= 2,
        "qwen still held at {} after llama's target was deleted: {after:?}",
        unified_pool(&after).to
    );
}
