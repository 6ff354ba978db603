//! What the policy carries between evaluations of one autoscaler. The caller owns it (one per
//! autoscaler), passes it to every `decide` call and may serialize it.
//!
//! Its size is bounded whatever the inputs: the stabilization windows are monotonic queues (a
//! recommendation leaves as soon as a newer one dominates it), and scale events are pruned to the
//! longest period that reads them and capped at [`MAX_SCALE_EVENTS`].

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decision::{Action, Rule};
use crate::inputs::PoolState;
use crate::pools::Role;
use crate::spec::AutoscalerSpec;

/// Scale events kept per pool; far above what any step limit reads (a period holds a handful).
pub const MAX_SCALE_EVENTS: usize = 64;

/// Samples kept per stabilization window. A monotonic queue holds at most one sample per distinct
/// replica count, so this bound is only reached with absurd `maxReplicas`; then the oldest go.
pub const MAX_WINDOW_SAMPLES: usize = 1024;

/// Memory of one autoscaler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyMemory {
    started_at: Duration,
    unified: PoolMemory,
    prefill: PoolMemory,
    decode: PoolMemory,
}

/// Memory of one pool.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PoolMemory {
    /// Lowest recommendations of the scale-up window (increasing from front to back).
    up_window: VecDeque<Sample>,
    /// Highest recommendations of the scale-down window (decreasing from front to back).
    down_window: VecDeque<Sample>,
    learned: LearnedCapacity,
    /// `desired_replicas` at the previous evaluation, to notice changes (ours or anyone's).
    observed_desired: Option<u32>,
    /// Ready replicas and since when that count has held.
    ready_since: Option<(u32, Duration)>,
    /// The ready counts that held before that, each with when it ended (oldest first), kept for
    /// the longest telemetry window: latency measured over a window reaching back past a change
    /// was served by the fewest of them, however many changes the window holds.
    #[serde(default)]
    earlier_ready: VecDeque<EndedReady>,
    scale_events: VecDeque<ScaleEvent>,
    /// When `desired_replicas` last changed. Kept apart from `scale_events`, which are pruned to
    /// the step-limit periods (a minute by default): the starting-replicas grace reads it for
    /// 1.5 x time-to-ready (minutes), and a caller that does not know the change time relies on it.
    #[serde(default)]
    last_change_at: Option<Duration>,
    last_panic_at: Option<Duration>,
    last_decision: Option<LastDecision>,
    /// When learning last saw the short window's load stray from the stable window's: a miss
    /// teaches capacity only once a whole stable window has passed since (see `learn`).
    #[serde(default)]
    unsteady_load_at: Option<Duration>,
    /// Forgotten while the controller ran (its replicas changed): its history starts at the next
    /// evaluation, which [`PoolMemory::observe`] notes in `restarted_at`.
    #[serde(default)]
    forgotten: bool,
    /// When this pool's history restarted after it was forgotten: like a controller start, the
    /// scale-down window and the restart hold count from then.
    #[serde(default)]
    restarted_at: Option<Duration>,
}

/// Per-replica capacity learned from what ready replicas sustained (`None`: nothing learned).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LearnedCapacity {
    pub prefill_tokens_per_s: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
    pub concurrent_sequences: Option<f64>,
    /// When learning last looked at a steady pool (the EWMA's clock).
    pub updated_at: Option<Duration>,
    /// Which of these a miss has set or lowered. The others were only ever raised by windows
    /// within the objective: the least capacity proven, a lower bound that may lie far below the
    /// truth (a quiet night's), so feed-forward extrapolates from it only so far.
    #[serde(default)]
    pub lowered_by_miss: CapacityFlags,
}

/// One flag per capacity dimension of [`LearnedCapacity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CapacityFlags {
    pub prefill_tokens_per_s: bool,
    pub decode_tokens_per_s: bool,
    pub concurrent_sequences: bool,
}

/// The previous decision for a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastDecision {
    pub at: Duration,
    pub from: u32,
    pub to: u32,
    pub action: Action,
    pub rule: Rule,
}

/// One recommendation in a stabilization window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Sample {
    at: Duration,
    replicas: u32,
}

/// A ready count that held until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct EndedReady {
    ready: u32,
    until: Duration,
}

/// An observed change of `desired_replicas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ScaleEvent {
    at: Duration,
    from: u32,
    to: u32,
}

// === impl PolicyMemory ===

impl PolicyMemory {
    /// Memory for a controller that started (or became leader) at `started_at`: scale-down waits
    /// for a full stable window from then (the restart hold).
    pub fn new(started_at: Duration) -> Self {
        Self {
            started_at,
            unified: PoolMemory::default(),
            prefill: PoolMemory::default(),
            decode: PoolMemory::default(),
        }
    }

    pub fn started_at(&self) -> Duration {
        self.started_at
    }

    /// Leadership regained at `at`: another leader may have acted meanwhile, so what this memory
    /// saw is forgotten and the restart hold starts again. Learned capacity is kept: it describes
    /// the replicas, not the controller.
    pub fn restart(&mut self, at: Duration) {
        self.started_at = at;
        for role in [Role::Unified, Role::Prefill, Role::Decode] {
            let pool = self.pool_mut(role);
            *pool = PoolMemory {
                learned: pool.learned,
                ..PoolMemory::default()
            };
        }
    }

    pub fn pool(&self, role: Role) -> &PoolMemory {
        match role {
            Role::Unified => &self.unified,
            Role::Prefill => &self.prefill,
            Role::Decode => &self.decode,
        }
    }

    pub(crate) fn pool_mut(&mut self, role: Role) -> &mut PoolMemory {
        match role {
            Role::Unified => &mut self.unified,
            Role::Prefill => &mut self.prefill,
            Role::Decode => &mut self.decode,
        }
    }

    /// Forgets one pool entirely (e.g. its scale target changed to other hardware).
    pub fn forget_pool(&mut self, role: Role) {
        *self.pool_mut(role) = PoolMemory {
            forgotten: true,
            ..PoolMemory::default()
        };
    }

    /// The autoscaler's spec was edited from `old` to `new` while it ran: what still describes
    /// the same replicas is kept, so an edit (a higher `maxReplicas` mid-incident) neither
    /// restarts the scale-down hold nor throws away what was learned. A pool gone, or moved to
    /// another scale target or GPU count, is forgotten; capacity learned against other SLO
    /// targets, or overridden by new hints from the user, is forgotten.
    pub fn carry_over(&mut self, old: &AutoscalerSpec, new: &AutoscalerSpec) -> CarriedOver {
        let mut carried = CarriedOver::default();
        let slo_changed = old.slo() != new.slo();
        for role in [Role::Unified, Role::Prefill, Role::Decode] {
            let (Some(before), Some(after)) = (old.pools().get(role), new.pools().get(role)) else {
                if *self.pool(role) != PoolMemory::default() {
                    carried.forgotten.push(role);
                }
                if new.pools().get(role).is_some() {
                    // A pool the edit adds: nothing is known of what its replicas served.
                    self.forget_pool(role);
                } else {
                    *self.pool_mut(role) = PoolMemory::default();
                }
                continue;
            };
            if before.scale_target_ref != after.scale_target_ref
                || before.gpus_per_replica != after.gpus_per_replica
            {
                self.forget_pool(role);
                carried.forgotten.push(role);
            } else if slo_changed || before.capacity != after.capacity {
                self.pool_mut(role).learned = LearnedCapacity::default();
                carried.unlearned.push(role);
            } else {
                carried.kept.push(role);
            }
        }
        carried
    }
}

/// What [`PolicyMemory::carry_over`] did with each pool of the edited spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CarriedOver {
    /// Kept whole.
    pub kept: Vec<Role>,
    /// Kept, but for the capacity learned.
    pub unlearned: Vec<Role>,
    /// Forgotten (gone, or other replicas now).
    pub forgotten: Vec<Role>,
}

// === impl PoolMemory ===

impl PoolMemory {
    pub fn learned(&self) -> &LearnedCapacity {
        &self.learned
    }

    pub fn last_decision(&self) -> Option<&LastDecision> {
        self.last_decision.as_ref()
    }

    pub fn last_panic_at(&self) -> Option<Duration> {
        self.last_panic_at
    }

    pub(crate) fn learned_mut(&mut self) -> &mut LearnedCapacity {
        &mut self.learned
    }

    pub(crate) fn set_last_decision(&mut self, last: LastDecision) {
        self.last_decision = Some(last);
    }

    /// Notes whether the load looked steady at `now`; returns whether it has for the whole
    /// `window` before `now`, as far as this memory saw.
    pub(crate) fn note_load_steadiness(
        &mut self,
        steady_now: bool,
        now: Duration,
        window: Duration,
    ) -> bool {
        // A clock that went back leaves no way to tell how long ago the last unsteady look was.
        if !steady_now || self.unsteady_load_at.is_some_and(|at| at > now) {
            self.unsteady_load_at = Some(now);
        }
        self.unsteady_load_at
            .is_none_or(|at| now.saturating_sub(at) >= window)
    }

    pub(crate) fn set_last_panic_at(&mut self, at: Duration) {
        self.last_panic_at = Some(at);
    }

    /// Notes the pool state: a changed `desired_replicas` is a scale event (at the state's change
    /// time when given), a changed ready count restarts the steadiness clock. Events older than
    /// `horizon`, and ready counts that ended longer than `ready_horizon` ago, are dropped.
    pub(crate) fn observe(
        &mut self,
        state: &PoolState,
        now: Duration,
        horizon: Duration,
        ready_horizon: Duration,
    ) {
        if std::mem::take(&mut self.forgotten) {
            self.restarted_at = Some(now);
        }
        if let Some(previous) = self.observed_desired
            && previous != state.desired_replicas
        {
            if self.scale_events.len() >= MAX_SCALE_EVENTS {
                self.scale_events.pop_front();
            }
            let at = state.last_scale_change_at.unwrap_or(now).min(now);
            self.scale_events.push_back(ScaleEvent {
                at,
                from: previous,
                to: state.desired_replicas,
            });
            self.last_change_at = Some(at);
        }
        self.observed_desired = Some(state.desired_replicas);
        match self.ready_since {
            Some((ready, _)) if ready == state.ready_replicas => {}
            previous => {
                if let Some((ready, _)) = previous {
                    if self.earlier_ready.len() >= MAX_SCALE_EVENTS {
                        self.earlier_ready.pop_front();
                    }
                    self.earlier_ready
                        .push_back(EndedReady { ready, until: now });
                }
                self.ready_since = Some((state.ready_replicas, now));
            }
        }
        while self
            .earlier_ready
            .front()
            .is_some_and(|e| now.saturating_sub(e.until) > ready_horizon)
        {
            self.earlier_ready.pop_front();
        }
        while let Some(first) = self.scale_events.front() {
            if now.saturating_sub(first.at) > horizon {
                self.scale_events.pop_front();
            } else {
                break;
            }
        }
    }

    /// When this pool's history started: the controller's start, or later if the pool was
    /// forgotten since.
    pub(crate) fn history_since(&self, controller_started_at: Duration) -> Duration {
        self.restarted_at
            .map_or(controller_started_at, |at| at.max(controller_started_at))
    }

    /// Since when the ready count has been what it is now.
    pub(crate) fn ready_since(&self) -> Option<Duration> {
        self.ready_since.map(|(_, since)| since)
    }

    /// The fewest replicas that served within `window` before `now`, as far as this memory saw:
    /// the lowest of the ready counts that held at any time in the window.
    pub(crate) fn ready_within(&self, now: Duration, window: Duration) -> Option<u32> {
        let (ready, _) = self.ready_since?;
        Some(
            self.earlier_ready
                .iter()
                .filter(|e| now.saturating_sub(e.until) < window)
                .map(|e| e.ready)
                .fold(ready, u32::min),
        )
    }

    /// The latest observed change of `desired_replicas`, however long ago.
    pub(crate) fn last_event_at(&self) -> Option<Duration> {
        self.last_change_at
    }

    /// Replicas added (`up`) or removed by observed events within `period` before `now`.
    pub(crate) fn moved_within(&self, now: Duration, period: Duration, up: bool) -> u32 {
        self.scale_events
            .iter()
            .rev()
            .take_while(|e| now.saturating_sub(e.at) < period)
            .map(|e| {
                if up {
                    e.to.saturating_sub(e.from)
                } else {
                    e.from.saturating_sub(e.to)
                }
            })
            .fold(0u32, u32::saturating_add)
    }

    /// Records a recommendation in both stabilization windows.
    pub(crate) fn record(&mut self, now: Duration, replicas: u32) {
        self.clear_if_clock_went_back(now);
        let sample = Sample { at: now, replicas };
        while self
            .up_window
            .back()
            .is_some_and(|s| s.replicas >= replicas)
        {
            self.up_window.pop_back();
        }
        if self.up_window.len() >= MAX_WINDOW_SAMPLES {
            self.up_window.pop_front();
        }
        self.up_window.push_back(sample);
        self.push_down(sample);
    }

    /// Records a count held while the load was unknown (or known short) in the scale-down window
    /// only: a data gap is an unknown like a restart, so scale-down waits a whole window of data
    /// after it rather than trusting the few samples that survived it. The scale-up window is
    /// left alone, as after a restart, so load found after a gap is answered at once.
    pub(crate) fn record_held(&mut self, now: Duration, replicas: u32) {
        self.clear_if_clock_went_back(now);
        self.push_down(Sample { at: now, replicas });
    }

    fn push_down(&mut self, sample: Sample) {
        while self
            .down_window
            .back()
            .is_some_and(|s| s.replicas <= sample.replicas)
        {
            self.down_window.pop_back();
        }
        if self.down_window.len() >= MAX_WINDOW_SAMPLES {
            self.down_window.pop_front();
        }
        self.down_window.push_back(sample);
    }

    fn clear_if_clock_went_back(&mut self, now: Duration) {
        // A clock that went backwards (a replayed trace, a bad caller) would break the queues'
        // order; start them afresh rather than answer from a mixed history.
        let went_back = |q: &VecDeque<Sample>| q.back().is_some_and(|s| s.at > now);
        if went_back(&self.up_window) || went_back(&self.down_window) {
            self.up_window.clear();
            self.down_window.clear();
        }
    }

    /// Lowest recommendation within `window` before `now` (after [`Self::record`], never `None`).
    pub(crate) fn lowest_within(&mut self, now: Duration, window: Duration) -> Option<u32> {
        evict(&mut self.up_window, now, window);
        self.up_window.front().map(|s| s.replicas)
    }

    /// Highest recommendation within `window` before `now`.
    pub(crate) fn highest_within(&mut self, now: Duration, window: Duration) -> Option<u32> {
        evict(&mut self.down_window, now, window);
        self.down_window.front().map(|s| s.replicas)
    }
}

fn evict(queue: &mut VecDeque<Sample>, now: Duration, window: Duration) {
    // The sample recorded at `now` is never older than the window, so the current
    // recommendation always stays.
    while queue
        .front()
        .is_some_and(|s| now.saturating_sub(s.at) > window)
    {
        queue.pop_front();
    }
}
