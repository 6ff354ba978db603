//! The control loop: windows -> `flyball_policy::decide` -> [`Actuator`].
//!
//! One task per autoscaler (the policy decides an autoscaler's pools together, so a prefill
//! decision can see the decode pool). Ingest marks pools dirty after each merge; the task wakes on
//! that, but evaluates at most once per `min_interval` (100 ms) so a burst of reports costs one
//! evaluation, and at least once per `idle_interval` (1 s) so that time alone (cooldowns,
//! stabilization windows, reporters going stale) is acted on without traffic.
//!
//! Each evaluation reads the pools' replicas from the actuator, builds the policy's inputs from
//! the windows, decides, applies changes (unless dry-run) and publishes the pool status that
//! `/v1/pools`, `/metrics` and the KEDA scaler read. It never scales on telemetry it cannot read:
//! without replica counts it skips the evaluation; stale or missing telemetry is the policy's to
//! judge (it holds). A read refused for a reason only a person can change (forbidden, not found)
//! is still told to the actuator while leading ([`Evaluation::unreadable`]), so the autoscaler's
//! status and Events say why nothing happens.
//!
//! Every replica of the service decides; only the leader sets replicas and tells the actuator
//! what it did ([`Actuator::record`]: Events, the autoscaler's status). A write still being
//! retried when leadership goes gets no further attempt, which could land after the next
//! leader's (one already sent may still land; the next leader reads what did). Followers
//! decide dry, so their decision logs and windows stay warm, and a replica that becomes leader
//! forgets what its policy memory saw ([`PolicyMemory::restart`]): another leader acted
//! meanwhile, and scale-down waits a full stable window again. Autoscalers come and go with the
//! configuration: a task per autoscaler is started when it appears and stopped when it goes; an
//! edit is handed to the running task, which applies it at once and keeps the policy memory that
//! still describes the same replicas ([`PolicyMemory::carry_over`]), so raising `maxReplicas`
//! mid-incident neither forgets learned capacity nor restarts the scale-down hold. A resource
//! deleted and created again (a new uid) starts afresh.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use flyball_policy::decision::{Action, AutoscalerDecision, PoolDecision, Rule};
use flyball_policy::inputs::{Freshness, PoolInputs, PoolState, PoolTelemetry, WindowStats};
use flyball_policy::memory::PolicyMemory;
use flyball_policy::pools::{Pools, Role};
use flyball_sketch::Sketch;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Autoscaler, ControlConfig, LiveConfig, PoolDef, ScaleTarget};
use crate::ingest::Telemetry;
use crate::window::{PoolId, View, WindowSummary};

/// Replica counts of one scale target as the actuator observes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolReplicas {
    /// Replicas asked for (`spec.replicas` of the `/scale` subresource).
    pub desired: u32,
    /// Replicas that exist (`status.replicas`).
    pub current: u32,
    /// Replicas ready to serve.
    pub ready: u32,
}

/// Why an actuator call failed. `kind` is a stable snake_case name, usable as a metric label.
#[derive(Debug, thiserror::Error)]
#[error("{target}: {kind}: {source}")]
pub struct ActuatorError {
    pub target: String,
    pub kind: &'static str,
    /// Waiting may fix it (a 5xx, a timeout, a conflict), as opposed to an answer only a person
    /// can change (forbidden, not found, a kind not served).
    pub transient: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The `kind` of a write dropped because this replica stopped leading while it was being tried.
pub const WRITE_ABANDONED: &str = "abandoned";

/// The `kind` of a call whose scale target does not exist (Kubernetes' 404).
pub const TARGET_NOT_FOUND: &str = "not_found";

/// Where replica counts are read and set: Kubernetes `/scale` ([`crate::actuator`]), local
/// processes, or nowhere ([`DryRunActuator`]).
pub trait Actuator: Send + Sync + 'static {
    fn current(
        &self,
        target: &ScaleTarget,
    ) -> impl Future<Output = Result<PoolReplicas, ActuatorError>> + Send;

    fn set(
        &self,
        target: &ScaleTarget,
        replicas: u32,
    ) -> impl Future<Output = Result<(), ActuatorError>> + Send;

    /// Told after each evaluation made while this replica leads: what was decided and done.
    /// The Kubernetes actuator writes Events and the autoscaler's status from it. Default:
    /// nothing.
    fn record(&self, evaluation: &Evaluation<'_>) -> impl Future<Output = ()> + Send {
        let _ = evaluation;
        async {}
    }

    /// What an operator should know about `target` (another autoscaler scaling it), shown in
    /// `/v1/pools`. Default: nothing.
    fn warnings(&self, target: &ScaleTarget) -> Vec<String> {
        let _ = target;
        Vec::new()
    }
}

/// One evaluation of one autoscaler, as [`Actuator::record`] sees it.
#[derive(Debug)]
pub struct Evaluation<'a> {
    pub autoscaler: &'a Autoscaler,
    /// Wall-clock time of the evaluation.
    pub at: SystemTime,
    /// Nothing was to be set: `--dry-run` or the spec's `dryRun`.
    pub dry_run: bool,
    pub pools: Vec<PoolOutcome<'a>>,
    /// Pools whose replicas could not be read, for a reason only a person can change: nothing
    /// was decided, so `pools` is empty.
    pub unreadable: Vec<UnreadableTarget<'a>>,
}

/// A pool of an [`Evaluation`] whose target refused to be read.
#[derive(Debug)]
pub struct UnreadableTarget<'a> {
    pub pool: &'a PoolDef,
    pub error: &'a ActuatorError,
}

/// One pool's part of an [`Evaluation`].
#[derive(Debug)]
pub struct PoolOutcome<'a> {
    pub pool: &'a PoolDef,
    /// As read before deciding.
    pub replicas: PoolReplicas,
    pub decision: &'a PoolDecision,
    /// The change was set.
    pub applied: bool,
    /// Setting it failed: the actuator's error, whose kind and answer the status and Events
    /// are written from.
    pub error: Option<&'a ActuatorError>,
}

/// Records what would be set and pretends it happened at once: every replica asked for is
/// instantly ready. Targets start at their pool's `minReplicas`.
#[derive(Debug, Default)]
pub struct DryRunActuator {
    replicas: Mutex<HashMap<ScaleTarget, u32>>,
    recommendations: Mutex<Vec<(ScaleTarget, u32)>>,
}

/// Timing of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopConfig {
    /// Evaluations of one autoscaler are at least this far apart.
    pub min_interval: Duration,
    /// And at most this far apart, traffic or not.
    pub idle_interval: Duration,
    /// Decisions kept per pool.
    pub decision_log: usize,
    /// Decide and publish, never set replicas.
    pub dry_run: bool,
    /// A pool's telemetry is stale after this much silence from every reporter.
    pub stale_after: Duration,
    /// GPUs shared by every autoscaler's pools (`--gpu-budget`), on top of each autoscaler's own
    /// `gpuBudget`.
    pub gpu_budget: Option<u32>,
}

/// The budget all autoscalers share: each evaluation puts its autoscaler's latest decision
/// beside the others' and takes back its own, its growth cut to its share when together they
/// want more GPUs than there are (split by need: `flyball_policy::apply_global_gpu_budget`).
///
/// Autoscalers evaluate on their own schedules, so when load comes to two at once the first to
/// evaluate would see the other's want from before the load and take all the headroom (and a
/// budget never takes replicas back). So an autoscaler the budget cuts grows only on a split in
/// which every other autoscaler's want is at least as recent as the moment the cut began;
/// until then it holds. Every loop evaluates at least every `--max-evaluation-interval`, but
/// one may not decide at all (its target unreadable, a write being retried): the wait is
/// therefore bounded by `max_wait`, after which the split uses the wants known.
///
/// The split is by want, and a want is only as recent as its autoscaler's last evaluation: its
/// `from` does not show what that evaluation was granted (and may have set), and an evaluation
/// that began before another's may share after it. So no grant is ever more than what the
/// others' latest grants leave of the budget: growth beyond that waits for their next
/// evaluations, whose wants then start from what they hold. A budget never takes replicas back,
/// so what an autoscaler already has it keeps even then.
///
/// An autoscaler takes part through the [`BudgetSeat`] it was given when it started. A stopped
/// autoscaler's want leaves at once ([`SharedBudget::forget`]), and its task, which may still be
/// finishing an evaluation on another thread when it is aborted, shares through a seat that is
/// no longer its autoscaler's: that late want is not recorded, or it would stay in every split
/// for good, with nothing left to replace or remove it.
#[derive(Debug)]
pub struct SharedBudget {
    gpus: u32,
    max_wait: Duration,
    state: Mutex<BudgetState>,
}

type AutoscalerKey = (String, String);

/// One running autoscaler's place in a [`SharedBudget`]; a task shares only through its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetSeat {
    autoscaler: AutoscalerKey,
    /// Tells this task's seat from that of an earlier task of the same (namespace, name): one
    /// deleted and created again, or restarted after a panic.
    id: u64,
}

#[derive(Debug, Default)]
struct BudgetState {
    /// Each running autoscaler's seat and latest decision (before the budget) and when it was
    /// made; `None` before its first.
    members: BTreeMap<AutoscalerKey, Member>,
    /// Since when the budget has been cutting each autoscaler's growth.
    cut_since: HashMap<AutoscalerKey, Instant>,
    next_seat: u64,
}

#[derive(Debug)]
struct Member {
    seat: u64,
    latest: Option<(AutoscalerDecision, Instant)>,
    /// GPUs its latest share granted each pool, which it may have set: the budget's part no
    /// other autoscaler may be granted. None before its first share.
    granted: Vec<(Role, u64)>,
}

impl SharedBudget {
    pub fn new(gpus: u32, max_wait: Duration) -> Self {
        SharedBudget {
            gpus,
            max_wait,
            state: Mutex::new(BudgetState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An autoscaler starts: until it has decided, the others' growth under a cut waits for it.
    /// One restarted after a panic keeps its last want meanwhile: its replicas and load are
    /// those it decided on.
    pub fn register(&self, autoscaler: &AutoscalerKey) -> BudgetSeat {
        let mut state = self.lock();
        let id = state.next_seat;
        state.next_seat += 1;
        state
            .members
            .entry(autoscaler.clone())
            .and_modify(|member| member.seat = id)
            .or_insert(Member {
                seat: id,
                latest: None,
                granted: Vec::new(),
            });
        BudgetSeat {
            autoscaler: autoscaler.clone(),
            id,
        }
    }

    /// Records `decision`, made at `now`, as what the seat's autoscaler wants and returns it
    /// within its share of the budget and within what the others' latest grants leave. Through a
    /// seat no longer in the budget (its autoscaler stopped), nothing is recorded and nothing
    /// grows.
    pub fn share(
        &self,
        seat: &BudgetSeat,
        decision: AutoscalerDecision,
        now: Instant,
    ) -> AutoscalerDecision {
        let mut state = self.lock();
        let state = &mut *state;
        let autoscaler = &seat.autoscaler;
        match state.members.get_mut(autoscaler) {
            Some(member) if member.seat == seat.id => {
                member.latest = Some((decision.clone(), now));
            }
            _ => return held(decision),
        }
        let decided: Vec<(&AutoscalerKey, &AutoscalerDecision)> = state
            .members
            .iter()
            .filter_map(|(key, member)| member.latest.as_ref().map(|(d, _)| (key, d)))
            .collect();
        let Some(mine) = decided.iter().position(|(key, _)| *key == autoscaler) else {
            return decision;
        };
        let mut all: Vec<AutoscalerDecision> = decided.iter().map(|(_, d)| (*d).clone()).collect();
        flyball_policy::apply_global_gpu_budget(&mut all, self.gpus);
        let shared = all.swap_remove(mine);
        let cut_by_split = grows_less(&shared, &decision);
        let granted_to_others: u64 = state
            .members
            .iter()
            .filter(|(key, _)| *key != autoscaler)
            .flat_map(|(_, member)| member.granted.iter().map(|(_, gpus)| gpus))
            .sum();
        let free = u64::from(self.gpus).saturating_sub(granted_to_others);
        let mut granted = [shared];
        flyball_policy::apply_global_gpu_budget(
            &mut granted,
            u32::try_from(free).unwrap_or(u32::MAX),
        );
        let [mut granted] = granted;
        if grows_less(&granted, &decision) {
            // A cut by what is free starts the wait too: once the others have evaluated again,
            // a split that then cuts need not wait for them a second time.
            let since = *state.cut_since.entry(autoscaler.clone()).or_insert(now);
            let others_current = state.members.iter().all(|(key, member)| {
                key == autoscaler || member.latest.as_ref().is_some_and(|(_, at)| *at >= since)
            });
            let waited_enough = now.saturating_duration_since(since) >= self.max_wait;
            if cut_by_split && !others_current && !waited_enough {
                granted = held(decision);
            }
        } else {
            state.cut_since.remove(autoscaler);
        }
        if let Some(member) = state.members.get_mut(autoscaler) {
            member.granted = gpus_held(&granted);
        }
        granted
    }

    /// The seat's pool in `role` was found gone (its scale target deleted): the replicas its
    /// grant allowed hold no GPUs any more, and the others may be granted them. Its autoscaler
    /// decides nothing while the target is gone, so nothing else would ever give them back.
    pub fn release_gone(&self, seat: &BudgetSeat, role: Role) {
        let mut state = self.lock();
        if let Some(member) = state.members.get_mut(&seat.autoscaler)
            && member.seat == seat.id
        {
            for (pool, gpus) in &mut member.granted {
                if *pool == role {
                    *gpus = 0;
                }
            }
            // The split counts what its last want started from, too.
            if let Some(pool) = member
                .latest
                .as_mut()
                .and_then(|(decision, _)| decision.pools.get_mut(role))
            {
                (pool.from, pool.to, pool.min_replicas) = (0, 0, 0);
            }
        }
    }

    /// An autoscaler that stopped wants nothing any more.
    pub fn forget(&self, autoscaler: &AutoscalerKey) {
        let mut state = self.lock();
        state.members.remove(autoscaler);
        state.cut_since.remove(autoscaler);
    }

    /// Forgets every autoscaler for which `running` is false: one whose task ended (a panic)
    /// and that was removed before it could be started again has no stop to forget it at.
    pub fn retain(&self, running: impl Fn(&AutoscalerKey) -> bool) {
        let mut state = self.lock();
        state.members.retain(|key, _| running(key));
        state.cut_since.retain(|key, _| running(key));
    }
}

/// `decision` with no pool grown: a budget of nothing keeps every pool at what it has.
fn held(decision: AutoscalerDecision) -> AutoscalerDecision {
    let mut held = [decision];
    flyball_policy::apply_global_gpu_budget(&mut held, 0);
    let [held] = held;
    held
}

/// Whether any pool of `granted` has fewer replicas than `wanted` asked for.
fn grows_less(granted: &AutoscalerDecision, wanted: &AutoscalerDecision) -> bool {
    granted
        .pools
        .iter()
        .zip(wanted.pools.iter())
        .any(|((_, got), (_, wanted))| got.to < wanted.to)
}

/// GPUs that `decision`, once set, keeps from the budget, counted as the split counts them: a
/// dry run sets nothing and keeps what it has; a pool asleep at zero keeps its `minReplicas`,
/// which it wakes to whatever the budget.
fn gpus_held(decision: &AutoscalerDecision) -> Vec<(Role, u64)> {
    decision
        .pools
        .iter()
        .map(|(role, pool)| {
            let replicas = if decision.dry_run {
                pool.from
            } else if pool.to == 0 {
                pool.min_replicas
            } else {
                pool.to
            };
            (role, u64::from(replicas) * u64::from(pool.gpus_per_replica))
        })
        .collect()
}

/// One entry of a pool's decision log. Consecutive identical decisions (same from, to, rule) are
/// folded into one entry whose `repeats` grows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionRecord {
    /// RFC 3339, UTC: when this decision was first reached.
    pub at: String,
    /// When it was last reached again (see `repeats`).
    pub last_at: String,
    #[serde(skip)]
    pub at_instant: Instant,
    pub from: u32,
    pub to: u32,
    pub action: Action,
    pub rule: Rule,
    /// The policy's explanation, one line.
    pub reason: String,
    /// The figures behind it, as the policy returned them.
    pub details: flyball_policy::decision::Reason,
    /// Whether the change was sent to the actuator (false for holds and dry runs).
    pub applied: bool,
    pub error: Option<String>,
    /// Later evaluations that reached the same decision.
    pub repeats: u64,
}

/// What the controller knows of one pool; published on a watch channel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStatus {
    /// Replicas as last read from the actuator; `None` before the first read.
    pub replicas: Option<PoolReplicas>,
    /// Replicas the last decision asked for.
    pub desired: Option<u32>,
    /// The pool has load or wants replicas (KEDA's activation); `None` while unknown (before
    /// the first read of replicas, or with replicas unreadable and no telemetry): KEDA scales
    /// to zero on a false, and flyball never does on missing data.
    pub active: Option<bool>,
    pub decisions: VecDeque<DecisionRecord>,
    pub last_error: Option<String>,
    /// From the actuator: e.g. an HPA scales the same target.
    pub warnings: Vec<String>,
}

/// Every pool's status, by pool id.
#[derive(Debug)]
pub struct Status {
    /// Indexed by [`PoolId`]; `None` for ids of pools that are gone.
    pools: RwLock<Vec<Option<watch::Sender<PoolStatus>>>>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub actuator_errors: Family<ActuatorErrorLabels, Counter>,
    /// The series each autoscaler (namespace, name) counted under, removed when it goes: an
    /// autoscaler deleted must not be exported for ever, nor its series pile up with churn.
    series: Mutex<HashMap<(String, String), AutoscalerSeries>>,
}

#[derive(Debug, Default)]
struct AutoscalerSeries {
    decisions: HashSet<DecisionLabels>,
    actuator_errors: HashSet<ActuatorErrorLabels>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    pub autoscaler: String,
    pub namespace: String,
    pub pool: String,
    pub role: &'static str,
    pub action: &'static str,
    pub rule: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ActuatorErrorLabels {
    pub namespace: String,
    pub pool: String,
    pub kind: &'static str,
}

/// Maps the service's instants to wall-clock times and to the policy's clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub epoch: Instant,
    pub epoch_wall: SystemTime,
}

// === impl DryRunActuator ===

impl DryRunActuator {
    /// Targets start at their pool's `minReplicas`.
    pub fn for_config(config: &ControlConfig) -> Self {
        let mut replicas = HashMap::new();
        for pool in config.pools() {
            let min = config
                .autoscalers()
                .get(pool.autoscaler)
                .and_then(|a| a.spec.pools().get(pool.role))
                .map(|spec| spec.replicas.min());
            if let Some(min) = min {
                replicas.insert(pool.target.clone(), min);
            }
        }
        DryRunActuator {
            replicas: Mutex::new(replicas),
            recommendations: Mutex::new(Vec::new()),
        }
    }

    /// Starts the target named `name` at `replicas` instead of its minReplicas.
    pub fn preset(&self, name: &str, replicas: u32) {
        let mut all = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        for (target, n) in all.iter_mut() {
            if target.name == name {
                *n = replicas;
            }
        }
    }

    /// Every replica count set, in order.
    pub fn recommendations(&self) -> Vec<(ScaleTarget, u32)> {
        self.recommendations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Actuator for DryRunActuator {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        let replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        let n = replicas.get(target).copied().unwrap_or(1);
        Ok(PoolReplicas {
            desired: n,
            current: n,
            ready: n,
        })
    }

    async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.clone(), replicas);
        self.recommendations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((target.clone(), replicas));
        Ok(())
    }
}

// === impl Status ===

impl Status {
    pub fn new(pools: usize) -> Self {
        Status {
            pools: RwLock::new(
                (0..pools)
                    .map(|_| Some(watch::Sender::new(PoolStatus::default())))
                    .collect(),
            ),
            decisions: Family::default(),
            actuator_errors: Family::default(),
            series: Mutex::default(),
        }
    }

    fn series_of<T>(
        &self,
        autoscaler: &(String, String),
        f: impl FnOnce(&mut AutoscalerSeries) -> T,
    ) -> T {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        f(series.entry(autoscaler.clone()).or_default())
    }

    /// Counts a decision of `autoscaler` (namespace, name).
    pub fn count_decision(&self, autoscaler: &(String, String), labels: DecisionLabels) {
        self.decisions.get_or_create(&labels).inc();
        self.series_of(autoscaler, |s| s.decisions.insert(labels));
    }

    /// Counts a failed read or write of one of `autoscaler`'s targets.
    pub fn count_actuator_error(&self, autoscaler: &(String, String), labels: ActuatorErrorLabels) {
        self.actuator_errors.get_or_create(&labels).inc();
        self.series_of(autoscaler, |s| s.actuator_errors.insert(labels));
    }

    /// `autoscaler` is gone: its series leave `/metrics`.
    pub fn forget_series(&self, autoscaler: &(String, String)) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(gone) = series.remove(autoscaler) else {
            return;
        };
        for labels in &gone.decisions {
            self.decisions.remove(labels);
        }
        for labels in &gone.actuator_errors {
            self.forget_actuator_errors_unshared(&series, labels);
        }
    }

    /// Actuator errors are labelled by target, not by autoscaler: a target moved from one
    /// autoscaler to another in one change is counted by both for a moment, and its series
    /// must not go (and come back at 1) while the other still counts it.
    fn forget_actuator_errors_unshared(
        &self,
        series: &HashMap<(String, String), AutoscalerSeries>,
        labels: &ActuatorErrorLabels,
    ) {
        if !series.values().any(|s| s.actuator_errors.contains(labels)) {
            self.actuator_errors.remove(labels);
        }
    }

    /// `autoscaler` was edited: the series of the pools it no longer has (another target,
    /// another role) leave `/metrics`. `pools` are those it has: (namespace, name, role).
    pub fn retain_series(&self, autoscaler: &(String, String), pools: &[(&str, &str, &str)]) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(own) = series.get_mut(autoscaler) else {
            return;
        };
        own.decisions.retain(|labels| {
            let kept = pools.contains(&(&labels.namespace, &labels.pool, labels.role));
            if !kept {
                self.decisions.remove(labels);
            }
            kept
        });
        let mut dropped = Vec::new();
        own.actuator_errors.retain(|labels| {
            let kept = pools.iter().any(|&(namespace, pool, _)| {
                (namespace, pool) == (&labels.namespace, &labels.pool)
            });
            if !kept {
                dropped.push(labels.clone());
            }
            kept
        });
        for labels in &dropped {
            self.forget_actuator_errors_unshared(&series, labels);
        }
    }

    fn with_sender<T>(
        &self,
        pool: PoolId,
        f: impl FnOnce(&watch::Sender<PoolStatus>) -> T,
    ) -> Option<T> {
        let pools = self.pools.read().unwrap_or_else(|p| p.into_inner());
        pools.get(pool.0).and_then(Option::as_ref).map(f)
    }

    /// A copy of the pool's status.
    pub fn get(&self, pool: PoolId) -> Option<PoolStatus> {
        self.with_sender(pool, |tx| tx.borrow().clone())
    }

    /// Changes whenever the pool's status is published; closes when the pool goes away.
    pub fn subscribe(&self, pool: PoolId) -> Option<watch::Receiver<PoolStatus>> {
        self.with_sender(pool, watch::Sender::subscribe)
    }

    fn update(&self, pool: PoolId, f: impl FnOnce(&mut PoolStatus) -> bool) {
        self.with_sender(pool, |tx| tx.send_if_modified(f));
    }

    /// Keeps the status of `pools`, starts one for each new id, and drops the rest.
    pub fn set_pools(&self, pools: &[PoolId]) {
        let mut slots = self.pools.write().unwrap_or_else(|p| p.into_inner());
        let len = pools.iter().map(|id| id.0 + 1).max().unwrap_or(0);
        if slots.len() < len {
            slots.resize_with(len, || None);
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            let wanted = pools.contains(&PoolId(i));
            match (wanted, slot.is_some()) {
                (true, false) => *slot = Some(watch::Sender::new(PoolStatus::default())),
                (false, true) => *slot = None,
                _ => {}
            }
        }
    }
}

/// Puts `next` in force: its pool ids continue those in force (see
/// [`ControlConfig::renumbered`]), status and windows are prepared for them, then it is published
/// and the control loop follows. Returns whether anything changed.
pub fn reconfigure(
    live: &LiveConfig,
    telemetry: &Telemetry,
    status: &Status,
    next: ControlConfig,
) -> bool {
    let next = next.renumbered(&live.current());
    if *live.current() == next {
        return false;
    }
    let ids: Vec<PoolId> = next.pools().iter().map(|p| p.id).collect();
    status.set_pools(&ids);
    telemetry.set_pools(next.pool_selectors());
    live.publish(next)
}

// === impl Clock ===

impl Clock {
    pub fn new(epoch: Instant) -> Self {
        Clock {
            epoch,
            epoch_wall: SystemTime::now(),
        }
    }

    /// The policy's `now`: time since the service started.
    pub fn policy_now(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch)
    }

    pub fn wall(&self, at: Instant) -> SystemTime {
        self.epoch_wall + at.saturating_duration_since(self.epoch)
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-01-31T12:00:00.250Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

// === inputs ===

/// The policy's view of one window.
pub fn window_stats(summary: &WindowSummary, length: Duration, percentile: f64) -> WindowStats {
    let q = percentile / 100.0;
    let quantile = |sketch: &Sketch| {
        sketch
            .quantile(q)
            .and_then(|us| Duration::try_from_secs_f64(us.max(0.0) / 1e6).ok())
    };
    WindowStats {
        length,
        coverage: summary.covered.min(length),
        request_rate_per_s: summary.requests_per_s(),
        input_tokens_per_s: summary.input_tokens_per_s(),
        output_tokens_per_s: summary.output_tokens_per_s(),
        error_rate_per_s: summary.errors_per_s(),
        ttft: quantile(&summary.latency.ttft_us),
        tpot: quantile(&summary.latency.tpot_us),
        mean_waiting: Some(summary.mean_waiting()),
        mean_decoding: Some(summary.mean_decoding()),
    }
}

/// Fresh while some reporter is live and `now` is before `fresh_until` (when the latest reports
/// stop keeping their reporters live, each by its own stale limit: see
/// [`crate::ingest::Telemetry::fresh_until`]); missing
/// until the first report. A pool none of whose keys are in recent reports is fresh and idle,
/// not missing: gateways leave keys without deltas or requests in flight out of their reports
/// (see `flyball.v1.ReportRequest.keys`), so silence about a key from a live gateway is a zero.
/// Silence from a gateway that fed the pool is not: while `silent_feeders` of them are quiet
/// (and not yet forgotten), the pool's telemetry is partial; so it is while `keys_over_limit`
/// (keys of the pool were dropped recently over `--max-keys`).
pub fn freshness(
    live_reporters: usize,
    last_report: Option<Instant>,
    silent_feeders: u32,
    keys_over_limit: bool,
    fresh_until: Option<Instant>,
    now: Instant,
) -> Freshness {
    match last_report {
        None => Freshness::Missing,
        Some(last) => {
            let age = now.saturating_duration_since(last);
            if live_reporters == 0 || fresh_until.is_none_or(|until| now > until) {
                Freshness::Stale { age }
            } else if silent_feeders > 0 || keys_over_limit {
                Freshness::Partial {
                    silent_reporters: silent_feeders,
                    keys_over_limit,
                }
            } else {
                Freshness::Fresh
            }
        }
    }
}

fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A pool's telemetry as the policy wants it.
pub fn pool_telemetry(
    view: &View,
    freshness: Freshness,
    short: Duration,
    stable: Duration,
    percentile: f64,
) -> PoolTelemetry {
    PoolTelemetry {
        freshness,
        short: window_stats(&view.short, short, percentile),
        stable: window_stats(&view.stable, stable, percentile),
        in_flight_waiting: saturating_u32(view.in_flight.waiting_first_token),
        in_flight_decoding: saturating_u32(view.in_flight.decoding),
    }
}

// === the loop ===

/// A running autoscaler task, as [`run`] tracks it.
/// How long an autoscaler whose task panicked waits before it starts again.
const PANIC_RESTART_DELAY: Duration = Duration::from_secs(1);

struct RunningAutoscaler {
    /// The definition it was last given.
    autoscaler: Autoscaler,
    redefine: watch::Sender<Definition>,
    handle: tokio::task::AbortHandle,
}

/// An autoscaler and its pools, as the configuration in force defines them.
#[derive(Debug, Clone)]
struct Definition {
    autoscaler: Autoscaler,
    pools: Vec<PoolDef>,
}

/// What one autoscaler's task keeps between evaluations.
struct AutoscalerLoop<A> {
    autoscaler: Autoscaler,
    pools: Vec<PoolDef>,
    /// Edits of the definition, applied before the next evaluation.
    redefined: watch::Receiver<Definition>,
    memory: PolicyMemory,
    /// Per pool: the desired count last observed and when it changed, and an ask not ready yet.
    observed: HashMap<PoolId, Observed>,
    telemetry: Arc<Telemetry>,
    status: Arc<Status>,
    actuator: Arc<A>,
    clock: Clock,
    config: LoopConfig,
    /// `--gpu-budget`, shared with every other autoscaler, and this task's seat in it.
    budget: Option<(Arc<SharedBudget>, BudgetSeat)>,
    leading: watch::Receiver<bool>,
    /// Leadership at the previous evaluation, to notice it being gained.
    was_leading: bool,
    /// False once every sender of `leading` is gone (leadership is then fixed).
    leading_open: bool,
}

#[derive(Debug, Clone, Default)]
struct Observed {
    desired: Option<u32>,
    changed_at: Option<Duration>,
    /// Replicas asked for and not yet ready, oldest ask first: a re-ask adds only the replicas
    /// above those already asked for, so each keeps the time it was first asked for.
    asks: VecDeque<Ask>,
    /// The latest time to ready measured.
    time_to_ready: Option<Duration>,
    /// The last [`TIME_TO_READY_SAMPLES`] measured, oldest first.
    ready_times: VecDeque<Duration>,
    /// The last change logged: a recommendation that is not applied (a dry run, a follower) is
    /// made again at every evaluation, up to ten times a second, and is logged once.
    logged: Option<(u32, u32, Rule)>,
    /// The last failure to read replicas, until a read succeeds.
    read_error: Option<String>,
}

/// Times to ready the policy's expectation is the median of: one replica that came up at once
/// (its image cached on the node) or one that waited for a new node does not set, on its own,
/// how long the next replicas asked for are waited for; a lasting change does within three asks.
const TIME_TO_READY_SAMPLES: usize = 5;

/// Replicas first asked for at `at` and not yet ready: those above `from`, up to `up_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ask {
    from: u32,
    up_to: u32,
    at: Duration,
    /// Replicas below it were not ready at some point while it waited (a crash, an eviction,
    /// a readiness probe failing): ready replicas are counted, not named, so a replica of this
    /// ask and one of those coming back look alike, and it is not timed.
    unclear: bool,
}

impl Observed {
    /// Notes the replicas read at `now` (the policy's clock): a change of the count asked for
    /// (by us or anyone), and the time to ready of the replicas now ready.
    fn observe(&mut self, replicas: PoolReplicas, now: Duration) {
        let desired = replicas.desired;
        if let Some(before) = self.desired
            && before != desired
        {
            self.changed_at = Some(now);
            // Asks never reach above the count asked for, so only the replicas above `before`
            // are new; those below keep their first ask. Replicas already ready above it (a
            // rolling update's surge, a status lagging a lowering) were not started by this ask:
            // timed, they would measure nothing and collapse the starting grace.
            let from = before.max(replicas.ready);
            if desired > before {
                if desired > from {
                    self.asks.push_back(Ask {
                        from,
                        up_to: desired,
                        at: now,
                        unclear: false,
                    });
                }
            } else {
                // Replicas no longer asked for are not waited for (nor timed: their wait says
                // nothing of how long starting takes); asked for again later, they are timed
                // from then.
                while self.asks.back().is_some_and(|ask| ask.from >= desired) {
                    self.asks.pop_back();
                }
                if let Some(top) = self.asks.back_mut() {
                    top.up_to = top.up_to.min(desired);
                }
            }
        }
        self.desired = Some(desired);
        // Fewer ready than every ask starts from: replicas that were ready are not now. Which
        // replica comes ready next, one of those or one asked for, cannot be told: timed as an
        // ask, a crash-looping replica back after 900 s measured 900 s for an ask whose replica
        // was ready in 120 s, and a readiness probe failing for a second measured 1 s. Such asks
        // are not timed; the time to ready measured before stays in force.
        if self
            .asks
            .front()
            .is_some_and(|ask| replicas.ready < ask.from)
        {
            for ask in &mut self.asks {
                ask.unclear = true;
            }
        }
        // Ready replicas are counted, not named: the first asked for are taken to be the first
        // ready. Those of an ask that come ready are timed then, the rest wait on; of the asks
        // that progress together, the oldest says how long it took.
        let mut oldest_progress = None;
        while let Some(ask) = self.asks.front_mut()
            && replicas.ready > ask.from
        {
            if !ask.unclear {
                oldest_progress.get_or_insert(ask.at);
            }
            if replicas.ready >= ask.up_to {
                self.asks.pop_front();
            } else {
                ask.from = replicas.ready;
                break;
            }
        }
        if let Some(at) = oldest_progress {
            let took = now.saturating_sub(at);
            self.time_to_ready = Some(took);
            if self.ready_times.len() == TIME_TO_READY_SAMPLES {
                self.ready_times.pop_front();
            }
            self.ready_times.push_back(took);
        }
    }

    /// How long replicas asked for now are expected to take to be ready: the median of the
    /// times measured lately (the longer middle one of an even count); `None` before any.
    fn expected_time_to_ready(&self) -> Option<Duration> {
        let mut times: Vec<Duration> = self.ready_times.iter().copied().collect();
        times.sort_unstable();
        times.get(times.len() / 2).copied()
    }
}

/// Runs one task per autoscaler of the configuration in force until `shutdown` resolves,
/// following the configuration as it changes. Replicas are set only while `leading` is true.
#[allow(clippy::too_many_arguments)]
pub async fn run<A: Actuator>(
    mut config: watch::Receiver<Arc<ControlConfig>>,
    telemetry: Arc<Telemetry>,
    status: Arc<Status>,
    actuator: Arc<A>,
    clock: Clock,
    loop_config: LoopConfig,
    leading: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<(String, String), RunningAutoscaler> = HashMap::new();
    // Aborted tasks until they end: one may count a last decision after it was told to stop.
    let mut stopping: HashMap<tokio::task::Id, (String, String)> = HashMap::new();
    let budget = loop_config
        .gpu_budget
        .map(|gpus| Arc::new(SharedBudget::new(gpus, loop_config.idle_interval)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let current = config.borrow_and_update().clone();
        let definition = |autoscaler: &Autoscaler| Definition {
            autoscaler: autoscaler.clone(),
            pools: autoscaler
                .pools
                .iter()
                .filter_map(|id| current.pool(*id).cloned())
                .collect(),
        };
        running.retain(|key, task| {
            let next = current
                .autoscalers()
                .iter()
                .find(|a| (&a.namespace, &a.name) == (&key.0, &key.1));
            match next {
                Some(next) if *next == task.autoscaler => true,
                // Edited: the task applies it, keeping what it knows.
                Some(next) if next.origin.same_object(&task.autoscaler.origin) => {
                    task.autoscaler = next.clone();
                    task.redefine.send_replace(definition(next));
                    true
                }
                _ => {
                    tracing::info!(autoscaler = %key.1, namespace = %key.0, "autoscaler stopped");
                    task.handle.abort();
                    status.forget_series(key);
                    stopping.insert(task.handle.id(), key.clone());
                    if let Some(budget) = &budget {
                        budget.forget(key);
                    }
                    false
                }
            }
        });
        for autoscaler in current.autoscalers() {
            let key = (autoscaler.namespace.clone(), autoscaler.name.clone());
            if running.contains_key(&key) {
                continue;
            }
            let first = definition(autoscaler);
            let (redefine, redefined) = watch::channel(first.clone());
            let seat = budget
                .as_ref()
                .map(|budget| (budget.clone(), budget.register(&key)));
            let task = AutoscalerLoop {
                autoscaler: first.autoscaler,
                pools: first.pools,
                redefined,
                memory: PolicyMemory::new(clock.policy_now(Instant::now())),
                observed: HashMap::new(),
                telemetry: telemetry.clone(),
                status: status.clone(),
                actuator: actuator.clone(),
                clock,
                config: loop_config,
                budget: seat,
                was_leading: *leading.borrow(),
                leading: leading.clone(),
                leading_open: true,
            };
            let handle = tasks.spawn(task.run());
            running.insert(
                key,
                RunningAutoscaler {
                    autoscaler: autoscaler.clone(),
                    redefine,
                    handle,
                },
            );
        }
        // Every autoscaler of the configuration now runs: any other in the budget is one whose
        // task panicked and that was removed while it waited to start again.
        if let Some(budget) = &budget {
            budget.retain(|key| running.contains_key(key));
        }
        tokio::select! {
            () = &mut shutdown => break,
            Some(ended) = tasks.join_next_with_id() => {
                // Tasks run until aborted, so one that ends by itself panicked: start it again
                // (its memory is lost, so it holds scale-down as after a restart) rather than
                // leave its pools unattended while everything else looks healthy.
                let Err(error) = ended else { continue };
                if let Some(key) = stopping.remove(&error.id())
                    && !running.contains_key(&key)
                {
                    status.forget_series(&key);
                }
                if !error.is_panic() {
                    continue;
                }
                let id = error.id();
                running.retain(|key, task| {
                    if task.handle.id() != id {
                        return true;
                    }
                    tracing::error!(
                        autoscaler = %key.1,
                        namespace = %key.0,
                        %error,
                        "autoscaler task panicked; starting it again in 1 s"
                    );
                    false
                });
                // A panic that recurs at once must not spin.
                tokio::time::sleep(PANIC_RESTART_DELAY).await;
            }
            changed = config.changed() => {
                if changed.is_err() {
                    // The configuration is final: serve it until shutdown.
                    shutdown.await;
                    break;
                }
            }
        }
    }
    tasks.shutdown().await;
}

impl<A: Actuator> AutoscalerLoop<A> {
    /// Counts a failed read or write of `pool`'s target, under this autoscaler's series.
    fn count_actuator_error(&self, pool: &PoolDef, kind: &'static str) {
        self.status.count_actuator_error(
            &self.key(),
            ActuatorErrorLabels {
                namespace: pool.target.namespace.clone(),
                pool: pool.name.clone(),
                kind,
            },
        );
    }

    /// (namespace, name), as the service's tables know autoscalers.
    fn key(&self) -> (String, String) {
        (
            self.autoscaler.namespace.clone(),
            self.autoscaler.name.clone(),
        )
    }

    async fn run(mut self) {
        let mut last: Option<Instant> = None;
        loop {
            let dirty: Vec<_> = self
                .pools
                .iter()
                .filter_map(|p| self.telemetry.dirty(p.id))
                .collect();
            if let Some(last) = last {
                tokio::time::sleep_until(last + self.config.min_interval).await;
                let idle_until = last + self.config.idle_interval;
                let woken = async {
                    if dirty.is_empty() {
                        // select_all panics on nothing to select; without pools, time alone
                        // wakes us.
                        std::future::pending::<()>().await;
                    } else {
                        futures::future::select_all(dirty.iter().map(|n| Box::pin(n.notified())))
                            .await;
                    }
                };
                // A new leader acts at once rather than at the next report or idle tick, and
                // so does an edit. Each is awaited on a copy of its receiver: the evaluation
                // must still see that it changed (`changed` would mark it seen here).
                let mut leading = self.leading.clone();
                let leadership = leadership_changed(&mut leading, &mut self.leading_open);
                let mut edits = self.redefined.clone();
                let redefined = async {
                    if edits.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                let _ = tokio::time::timeout_at(idle_until, async {
                    tokio::select! {
                        () = woken => {}
                        () = leadership => {}
                        () = redefined => {}
                    }
                })
                .await;
            }
            if self.redefined.has_changed().unwrap_or(false) {
                let next = self.redefined.borrow_and_update().clone();
                self.redefine(next);
            }
            let now = Instant::now();
            last = Some(now);
            self.evaluate(now).await;
        }
    }

    /// Applies an edit of the definition, keeping the memory that still holds.
    fn redefine(&mut self, next: Definition) {
        let carried = self
            .memory
            .carry_over(&self.autoscaler.spec, &next.autoscaler.spec);
        let pools: Vec<PoolId> = next.pools.iter().map(|p| p.id).collect();
        // Pool ids follow (role, scale target, selector): an id kept is the same replicas.
        self.observed.retain(|id, _| pools.contains(id));
        tracing::info!(
            autoscaler = %next.autoscaler.name,
            namespace = %next.autoscaler.namespace,
            kept = ?carried.kept,
            capacity_forgotten = ?carried.unlearned,
            forgotten = ?carried.forgotten,
            "autoscaler edited; in force from this evaluation"
        );
        self.autoscaler = next.autoscaler;
        self.pools = next.pools;
        let pools: Vec<(&str, &str, &str)> = self
            .pools
            .iter()
            .map(|pool| {
                (
                    pool.target.namespace.as_str(),
                    pool.name.as_str(),
                    role_str(pool.role),
                )
            })
            .collect();
        self.status.retain_series(&self.key(), &pools);
    }

    async fn evaluate(&mut self, now: Instant) {
        let policy_now = self.clock.policy_now(now);
        // Leadership only ever changes value when sent, so a change seen while it still leads is
        // a loss and a regain since the last evaluation: another replica may have led between.
        let moved = self.leading.has_changed().unwrap_or(false);
        let leading = *self.leading.borrow_and_update();
        if leading && (!self.was_leading || moved) {
            self.memory.restart(policy_now);
            tracing::info!(
                autoscaler = %self.autoscaler.name,
                "leading: acting from now on; no scale-down before a full stable window"
            );
        }
        self.was_leading = leading;
        let spec = &self.autoscaler.spec;
        let percentile = spec.slo().percentile;
        let windows = self.telemetry.windows_config();
        let reporters = self.telemetry.reporters(now);
        let last_report = self.telemetry.last_report();
        let fresh_until = self.telemetry.fresh_until();

        let freshness_of = |pool: PoolId| {
            freshness(
                reporters.live,
                last_report,
                self.telemetry.silent_feeders(pool),
                self.telemetry.keys_dropped_recently(pool, now),
                fresh_until,
                now,
            )
        };
        let mut states = Vec::with_capacity(self.pools.len());
        // A pool whose replicas cannot be read stops the decision (a pair is decided together),
        // not what is known of the others: their replicas and activity are still published.
        let mut unreadable = false;
        for pool in &self.pools {
            let replicas = match self.actuator.current(&pool.target).await {
                Ok(replicas) => replicas,
                Err(error) => {
                    // Held calls fail with the same text for the whole hold: say it once.
                    let message = error.to_string();
                    let observed = self.observed.entry(pool.id).or_default();
                    if observed.read_error.as_ref() != Some(&message) {
                        tracing::warn!(pool = %pool.name, %error, "cannot read replicas; not deciding");
                        observed.read_error = Some(message);
                    }
                    self.count_actuator_error(pool, error.kind);
                    if error.kind == TARGET_NOT_FOUND
                        && let Some((budget, seat)) = &self.budget
                    {
                        budget.release_gone(seat, pool.role);
                    }
                    // Load comes from telemetry, not from /scale: KEDA's activation must not
                    // fall to false (and scale a loaded pool to zero) because replicas cannot be
                    // read, say for want of RBAC on /scale when KEDA owns the replicas.
                    let has_load = self
                        .telemetry
                        .pool(pool.id, now)
                        .is_some_and(|view| view.has_load());
                    // Only complete, fresh telemetry showing no load says idle; else the last
                    // known activity stands (unknown if none).
                    let seen_idle = !has_load && freshness_of(pool.id) == Freshness::Fresh;
                    // A deleted target has no replicas: its last counts would be reported on
                    // in /v1/pools and flyball_pool_replicas for as long as the autoscaler is.
                    let gone = error.kind == TARGET_NOT_FOUND;
                    self.status.update(pool.id, |s| {
                        s.last_error = Some(error.source.to_string());
                        s.active = activity(s.active, has_load, seen_idle, s.desired, None);
                        if gone {
                            s.replicas = None;
                            s.desired = None;
                        }
                        true
                    });
                    // Otherwise a resource whose target is missing, or whose kind RBAC does not
                    // cover, would get no status at all, or keep one that says all is well. A
                    // transient failure is left out: the next evaluation is likely to read.
                    if leading && !error.transient && *self.leading.borrow() {
                        let evaluation = Evaluation {
                            autoscaler: &self.autoscaler,
                            at: self.clock.wall(now),
                            dry_run: self.config.dry_run || spec.dry_run(),
                            pools: Vec::new(),
                            unreadable: vec![UnreadableTarget {
                                pool,
                                error: &error,
                            }],
                        };
                        self.actuator.record(&evaluation).await;
                    }
                    unreadable = true;
                    continue;
                }
            };
            let observed = self.observed.entry(pool.id).or_default();
            observed.read_error = None;
            observed.observe(replicas, policy_now);
            let view = self.telemetry.pool(pool.id, now).unwrap_or_default();
            let fresh = freshness_of(pool.id);
            let inputs = PoolInputs {
                telemetry: pool_telemetry(
                    &view,
                    fresh,
                    windows.short(),
                    windows.stable(),
                    percentile,
                ),
                state: PoolState {
                    desired_replicas: replicas.desired,
                    current_replicas: replicas.current,
                    ready_replicas: replicas.ready,
                    starting_replicas: replicas.desired.saturating_sub(replicas.ready),
                    last_scale_change_at: observed.changed_at,
                    time_to_ready: observed.expected_time_to_ready(),
                },
            };
            let has_load = view.has_load();
            states.push((pool.clone(), replicas, inputs, has_load));
        }
        if unreadable {
            for (pool, replicas, inputs, has_load) in &states {
                let seen_idle = !has_load && inputs.telemetry.freshness == Freshness::Fresh;
                self.status.update(pool.id, |s| {
                    s.replicas = Some(*replicas);
                    s.active = activity(s.active, *has_load, seen_idle, s.desired, Some(*replicas));
                    true
                });
            }
            return;
        }
        let inputs = match states.as_slice() {
            [(_, _, unified, _)] => Pools::Unified(unified.clone()),
            [(_, _, prefill, _), (_, _, decode, _)] => Pools::Disaggregated {
                prefill: prefill.clone(),
                decode: decode.clone(),
            },
            _ => return,
        };
        let decision = match flyball_policy::decide(spec, &inputs, &mut self.memory, policy_now) {
            Ok(decision) => decision,
            Err(error) => {
                // Pools are built from the same spec, so this is a bug; say so and hold.
                tracing::error!(autoscaler = %self.autoscaler.name, %error, "policy refused inputs");
                return;
            }
        };
        let decision = match &self.budget {
            Some((budget, seat)) => budget.share(seat, decision, now),
            None => decision,
        };
        let dry_run = self.config.dry_run || decision.dry_run;

        // Per pool: its decision, whether it was set, and why not; borrowed by the outcomes.
        let mut written = Vec::with_capacity(states.len());
        for (pool, replicas, _, has_load) in &states {
            let (replicas, has_load) = (*replicas, *has_load);
            let Some(pool_decision) = decision.pools.get(pool.role) else {
                continue;
            };
            let mut applied = false;
            let mut error = None;
            let mut failure = None;
            // Leadership is read again right before writing: a step-down during this
            // evaluation's reads must not be followed by a write. Nor is leadership gained
            // during them written with: the decision came from a follower's memory, without
            // the restart hold; the next evaluation restarts it and acts.
            if pool_decision.to != replicas.desired && !dry_run && leading && *self.leading.borrow()
            {
                // `set` retries transient failures for up to ~40 s: an attempt sent after a
                // hand-over could land after the new leader's own write and undo it. Leadership
                // is polled first, so a write is not even begun once it is gone.
                let written = tokio::select! {
                    biased;
                    () = leadership_lost(self.leading.clone()) => None,
                    written = self.actuator.set(&pool.target, pool_decision.to) => Some(written),
                };
                match written {
                    None => {
                        tracing::warn!(
                            pool = %pool.name,
                            replicas = pool_decision.to,
                            "stopped leading while setting replicas; the write is abandoned, \
                             with no further attempts"
                        );
                        self.count_actuator_error(pool, WRITE_ABANDONED);
                        error = Some(format!(
                            "{}: {WRITE_ABANDONED}: this replica stopped leading before the \
                             write of {} replicas was answered; the new leader reads what landed",
                            pool.target, pool_decision.to
                        ));
                    }
                    Some(Ok(())) => applied = true,
                    Some(Err(e)) => {
                        tracing::warn!(pool = %pool.name, error = %e, "cannot set replicas");
                        self.count_actuator_error(pool, e.kind);
                        // The answer alone: it names the target, and a hold repeats it.
                        error = Some(e.source.to_string());
                        failure = Some(e);
                    }
                }
            }
            let logged = &mut self.observed.entry(pool.id).or_default().logged;
            let change = (pool_decision.from, pool_decision.to, pool_decision.rule);
            if pool_decision.action != Action::Hold && (applied || *logged != Some(change)) {
                tracing::info!(pool = %pool.name, decision = %pool_decision, applied, "decision");
            }
            *logged = Some(change);
            self.status.count_decision(
                &self.key(),
                DecisionLabels {
                    autoscaler: self.autoscaler.name.clone(),
                    namespace: pool.target.namespace.clone(),
                    pool: pool.name.clone(),
                    role: role_str(pool.role),
                    action: pool_decision.action.as_str(),
                    rule: pool_decision.rule.as_str(),
                },
            );
            let record = self.record(now, pool_decision, applied, error.clone());
            let limit = self.config.decision_log;
            let warnings = self.actuator.warnings(&pool.target);
            self.status.update(pool.id, |s| {
                s.replicas = Some(replicas);
                s.desired = Some(pool_decision.to);
                s.active = Some(has_load || pool_decision.to > 0);
                s.last_error = error;
                s.warnings = warnings;
                push_decision(&mut s.decisions, record, limit);
                true
            });
            written.push((pool, replicas, pool_decision, applied, failure));
        }
        let outcomes = written
            .iter()
            .map(|(pool, replicas, decision, applied, failure)| PoolOutcome {
                pool,
                replicas: *replicas,
                decision,
                applied: *applied,
                error: failure.as_ref(),
            })
            .collect();
        // Only a replica that still leads writes Events and status.
        if leading && *self.leading.borrow() {
            let evaluation = Evaluation {
                autoscaler: &self.autoscaler,
                at: self.clock.wall(now),
                dry_run,
                pools: outcomes,
                unreadable: Vec::new(),
            };
            self.actuator.record(&evaluation).await;
        }
    }

    fn record(
        &self,
        now: Instant,
        decision: &PoolDecision,
        applied: bool,
        error: Option<String>,
    ) -> DecisionRecord {
        let at = rfc3339(self.clock.wall(now));
        DecisionRecord {
            last_at: at.clone(),
            at,
            at_instant: now,
            from: decision.from,
            to: decision.to,
            action: decision.action,
            rule: decision.rule,
            reason: decision.to_string(),
            details: decision.reason,
            applied,
            error,
            repeats: 0,
        }
    }
}

/// Resolves when leadership changes; never, once its senders are gone.
async fn leadership_changed(leading: &mut watch::Receiver<bool>, open: &mut bool) {
    if *open && leading.changed().await.is_ok() {
        return;
    }
    *open = false;
    std::future::pending::<()>().await;
}

/// Resolves once this replica stops leading; never while it leads, nor once the senders are gone:
/// leadership is then fixed (a service without election leads for good).
async fn leadership_lost(mut leading: watch::Receiver<bool>) {
    if leading.wait_for(|leading| !*leading).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A pool's activity (KEDA's) when it is not decided this evaluation: load makes it active;
/// fresh, complete telemetry showing none, with no replicas wanted or running, idle; otherwise
/// the last known activity stands (unknown if none), as nothing better is known.
fn activity(
    known: Option<bool>,
    has_load: bool,
    seen_idle: bool,
    desired: Option<u32>,
    replicas: Option<PoolReplicas>,
) -> Option<bool> {
    let wants_replicas = desired.is_some_and(|n| n > 0);
    let runs_replicas = replicas.is_some_and(|r| r.desired > 0 || r.current > 0);
    if has_load {
        Some(true)
    } else if seen_idle && !wants_replicas && !runs_replicas {
        Some(false)
    } else {
        known
    }
}

fn push_decision(log: &mut VecDeque<DecisionRecord>, record: DecisionRecord, limit: usize) {
    if let Some(last) = log.back_mut()
        && last.from == record.from
        && last.to == record.to
        && last.rule == record.rule
        && last.error == record.error
        && !record.applied
        && !last.applied
    {
        last.repeats += 1;
        last.last_at = record.last_at;
        last.reason = record.reason;
        last.details = record.details;
        return;
    }
    log.push_back(record);
    while log.len() > limit.max(1) {
        log.pop_front();
    }
}

pub fn role_str(role: Role) -> &'static str {
    role.as_str()
}

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod tests;
