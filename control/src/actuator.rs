//! The Kubernetes actuator: replicas read and set through the `/scale` subresource
//! (flyball-k8s), and what an operator needs to see around each change.
//!
//! current: cache (fresh for `read_every`) or GET `/scale` + GET the workload -> replicas; on
//! first sight of a target and every `hpa_check_every`, list HPAs -> warnings
//! set: PATCH `/scale` `{"spec":{"replicas":n}}` (conflicts and transient failures retried in
//! [`ScaleClient`]) -> cache
//! record (leader, after each evaluation): an Event per change, refusal, unreadable target or
//! HPA found; the FlyballAutoscaler's status, when it changed (`Ready=False` while a target
//! cannot be read or set)
//!
//! An answer that waiting will not change (Forbidden, NotFound, Invalid, a kind that is not
//! served) holds further calls of that kind to that target for a backoff that doubles from
//! `hold_first` to `hold_max`, so a missing RBAC rule costs one request per backoff rather than
//! one per evaluation, and it becomes one Warning Event per backoff, not one per evaluation.
//! A transient failure (retried within the call) holds the next calls for a shorter backoff,
//! from 1 s to 30 s, without an Event.
//! It never writes anything but `spec.replicas` of a target and the status of an autoscaler.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use flyball_k8s::crd::{
    CONDITION_READY, CONDITION_SCALING, CONDITION_VALID, ConditionUpdate, set_condition,
};
use flyball_k8s::{
    FlyballAutoscaler, FlyballAutoscalerStatus, HpaConflict, LastDecisionStatus, ScaleClient,
    ScaleEvents, ScaleTargetRef, get_status, patch_status,
};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use tokio::time::Instant;

use crate::config::{Autoscaler, Origin, ScaleTarget};
use crate::controller::{Actuator, ActuatorError, Evaluation, PoolReplicas};

/// Timings of the actuator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeActuatorConfig {
    /// Replica counts read less than this long ago are reused. The loop evaluates up to ten
    /// times a second under load; reading `/scale` and the workload each time would cost the
    /// API server 20 requests a second per pool, while ready counts change as pods start, over
    /// seconds.
    pub read_every: Duration,
    /// HPAs on a target are looked for when it is first read and this often after.
    pub hpa_check_every: Duration,
    /// The first hold after an answer waiting will not change; it doubles on each repeat.
    pub hold_first: Duration,
    pub hold_max: Duration,
    /// An unchanged status is written again after this long (someone may have replaced it).
    pub status_refresh: Duration,
}

impl Default for KubeActuatorConfig {
    fn default() -> Self {
        KubeActuatorConfig {
            read_every: Duration::from_secs(1),
            hpa_check_every: Duration::from_secs(300),
            hold_first: Duration::from_secs(10),
            hold_max: Duration::from_secs(300),
            status_refresh: Duration::from_secs(60),
        }
    }
}

/// The first wait after a call that failed for a transient reason (5xx, 429, a timeout); it
/// doubles on each repeat up to [`TRANSIENT_HOLD_MAX`], and a success ends it.
pub const TRANSIENT_HOLD_FIRST: Duration = Duration::from_secs(1);
pub const TRANSIENT_HOLD_MAX: Duration = Duration::from_secs(30);

/// Reads and sets replicas through `/scale`; see the module docs.
pub struct KubeActuator {
    client: kube::Client,
    scale: ScaleClient,
    events: ScaleEvents,
    config: KubeActuatorConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for KubeActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeActuator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    reads: HashMap<ScaleTarget, (Instant, PoolReplicas)>,
    holds: HashMap<(ScaleTarget, Op), Hold>,
    hpas: HashMap<ScaleTarget, Hpas>,
    statuses: HashMap<(String, String), Written>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Read,
    Write,
}

/// Calls of one kind to one target, held after an answer waiting will not change.
#[derive(Debug)]
struct Hold {
    until: Instant,
    backoff: Duration,
    kind: &'static str,
    transient: bool,
    message: String,
    /// A refusal Event was written for this hold.
    announced: bool,
}

#[derive(Debug, Default)]
struct Hpas {
    checked_at: Option<Instant>,
    found: Vec<HpaConflict>,
    /// Found but not yet reported as an Event.
    unannounced: Vec<HpaConflict>,
    /// The last check failed (logged once, not at every check).
    failing: bool,
}

/// The status last written for an autoscaler (or read from it, when this replica took over).
#[derive(Debug)]
struct Written {
    status: Option<FlyballAutoscalerStatus>,
    at: Instant,
    /// The last evaluation that came to write it: a longer gap means another replica led
    /// meanwhile and may have written since.
    touched: Instant,
}

/// An autoscaler not recorded for this long was led by another replica meanwhile (a leader
/// records every autoscaler at least once per idle interval, 1 s).
const STATUS_CACHE_GAP: Duration = Duration::from_secs(5);

/// A call not made because an earlier one was refused within its backoff: it fails with that
/// answer's text, so a refusal and the calls held after it read alike, and the decision log and
/// the status name one failure, not two that alternate.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Held {
    message: String,
}

/// The target as flyball-k8s names it.
pub fn target_ref(target: &ScaleTarget) -> ScaleTargetRef {
    ScaleTargetRef::new(
        &target.api_version,
        &target.kind,
        &target.namespace,
        &target.name,
    )
}

/// What Events about `autoscaler`'s pools regard: its FlyballAutoscaler when it has one, else
/// the workload itself.
pub fn regarding(autoscaler: &Autoscaler, target: &ScaleTargetRef) -> ObjectReference {
    match &autoscaler.origin {
        Origin::Resource { uid, .. } => ObjectReference {
            api_version: Some(FlyballAutoscaler::api_version(&()).into_owned()),
            kind: Some(FlyballAutoscaler::kind(&()).into_owned()),
            name: Some(autoscaler.name.clone()),
            namespace: Some(autoscaler.namespace.clone()),
            uid: uid.clone(),
            ..ObjectReference::default()
        },
        Origin::File => target.object_reference(),
    }
}

fn time(at: SystemTime) -> Time {
    Time(Timestamp::try_from(at).unwrap_or(Timestamp::UNIX_EPOCH))
}

// === impl KubeActuator ===

impl KubeActuator {
    /// `instance` names this replica in the Events it writes (the pod name).
    pub fn new(client: kube::Client, instance: &str) -> Self {
        Self::with_config(client, instance, KubeActuatorConfig::default())
    }

    pub fn with_config(client: kube::Client, instance: &str, config: KubeActuatorConfig) -> Self {
        KubeActuator {
            scale: ScaleClient::new(client.clone()),
            events: ScaleEvents::new(client.clone(), instance),
            client,
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// Uses `scale` (e.g. with another retry policy) for the `/scale` calls.
    pub fn with_scale_client(mut self, scale: ScaleClient) -> Self {
        self.scale = scale;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error to return instead of calling, while a hold lasts.
    fn held(&self, target: &ScaleTarget, op: Op, now: Instant) -> Option<ActuatorError> {
        let state = self.lock();
        let hold = state.holds.get(&(target.clone(), op))?;
        (now < hold.until).then(|| ActuatorError {
            target: target.to_string(),
            kind: hold.kind,
            transient: hold.transient,
            source: Box::new(Held {
                message: hold.message.clone(),
            }),
        })
    }

    /// Turns a failed call into the loop's error, holding further calls if waiting will not help.
    fn failed(
        &self,
        target: &ScaleTarget,
        op: Op,
        error: flyball_k8s::Error,
        now: Instant,
    ) -> ActuatorError {
        let kind = error.metric_label();
        // A transient failure has already been retried within the call; the next evaluation
        // (100 ms later under load) waits a short backoff too, so an API server shedding load
        // is not asked again at once by every pool of every replica. No Event: it says nothing
        // an operator must act on.
        let transient = error.is_transient();
        let (first, max) = if transient {
            (TRANSIENT_HOLD_FIRST, TRANSIENT_HOLD_MAX)
        } else {
            (self.config.hold_first, self.config.hold_max)
        };
        let mut state = self.lock();
        let key = (target.clone(), op);
        let backoff = match state.holds.get(&key) {
            Some(previous) => (previous.backoff * 2).clamp(first, max),
            None => first,
        };
        if !transient {
            tracing::warn!(
                %target,
                %error,
                ?backoff,
                "the API server refused; not trying again before the backoff"
            );
        }
        state.holds.insert(
            key,
            Hold {
                until: now + backoff,
                backoff,
                kind,
                transient,
                message: error.to_string(),
                announced: transient,
            },
        );
        drop(state);
        ActuatorError {
            target: target.to_string(),
            kind,
            transient,
            source: Box::new(error),
        }
    }

    /// Looks for HPAs on `target` when due; new ones are kept for an Event.
    async fn check_hpas(&self, target: &ScaleTarget, now: Instant) {
        let due = self
            .lock()
            .hpas
            .get(target)
            .and_then(|h| h.checked_at)
            .is_none_or(|at| now.saturating_duration_since(at) >= self.config.hpa_check_every);
        if !due {
            return;
        }
        let found = self.scale.conflicting_hpas(&target_ref(target)).await;
        let mut state = self.lock();
        let hpas = state.hpas.entry(target.clone()).or_default();
        hpas.checked_at = Some(now);
        match found {
            Ok(found) => {
                hpas.failing = false;
                for hpa in &found {
                    if !hpas.found.iter().any(|h| h.name == hpa.name) {
                        hpas.unannounced.push(hpa.clone());
                    }
                }
                hpas.found = found;
            }
            Err(error) => {
                if !hpas.failing {
                    tracing::warn!(
                        %target,
                        %error,
                        "cannot list HorizontalPodAutoscalers; an HPA on this target would go unnoticed"
                    );
                }
                hpas.failing = true;
            }
        }
    }

    /// The refused answer, when a Warning Event is due for the hold on `target`'s `op` calls:
    /// once per hold, not once per evaluation.
    fn announce(&self, target: &ScaleTarget, op: Op) -> Option<String> {
        let mut state = self.lock();
        let hold = state.holds.get_mut(&(target.clone(), op))?;
        if hold.announced {
            return None;
        }
        hold.announced = true;
        Some(hold.message.clone())
    }

    async fn write_status(&self, evaluation: &Evaluation<'_>, generation: Option<i64>) {
        let autoscaler = evaluation.autoscaler;
        let key = (autoscaler.namespace.clone(), autoscaler.name.clone());
        let now = Instant::now();
        let known = self.lock().statuses.get_mut(&key).is_some_and(|w| {
            let recent = now.saturating_duration_since(w.touched) < STATUS_CACHE_GAP;
            w.touched = now;
            recent
        });
        if !known {
            // Taking over from another replica (or starting): build on the status it left, so
            // conditions keep their transition times and an unchanged status is not rewritten.
            let found = match get_status(&self.client, &key.0, &key.1).await {
                Ok(found) => found,
                Err(error) => {
                    tracing::debug!(%error, "cannot read the FlyballAutoscaler's status");
                    None
                }
            };
            let mut state = self.lock();
            match found {
                Some(status) => {
                    state.statuses.insert(
                        key.clone(),
                        Written {
                            status: Some(status),
                            at: now,
                            touched: now,
                        },
                    );
                }
                None => {
                    state.statuses.remove(&key);
                }
            }
        }
        let status = {
            let state = self.lock();
            let written = state.statuses.get(&key);
            let previous = written.and_then(|w| w.status.as_ref());
            let status = autoscaler_status(previous, evaluation, generation);
            let fresh = written
                .is_some_and(|w| now.saturating_duration_since(w.at) < self.config.status_refresh);
            // A failed write (status None) waits out the refresh too: no write per evaluation.
            if fresh && written.is_some_and(|w| w.status.is_none() || previous == Some(&status)) {
                return;
            }
            status
        };
        let result = patch_status(&self.client, &key.0, &key.1, &status).await;
        let written = match result {
            Ok(_) => Some(status),
            Err(error) => {
                tracing::warn!(
                    autoscaler = %key.1,
                    namespace = %key.0,
                    %error,
                    "cannot write the FlyballAutoscaler's status"
                );
                None
            }
        };
        self.lock().statuses.insert(
            key,
            Written {
                status: written,
                at: now,
                touched: now,
            },
        );
    }
}

impl Actuator for KubeActuator {
    async fn current(&self, target: &ScaleTarget) -> Result<PoolReplicas, ActuatorError> {
        let now = Instant::now();
        if let Some(held) = self.held(target, Op::Read, now) {
            return Err(held);
        }
        let cached = self.lock().reads.get(target).copied();
        if let Some((at, replicas)) = cached
            && now.saturating_duration_since(at) < self.config.read_every
        {
            return Ok(replicas);
        }
        let observed = self
            .scale
            .get_scale(&target_ref(target))
            .await
            .map_err(|e| self.failed(target, Op::Read, e, now))?;
        let replicas = PoolReplicas {
            desired: observed.spec_replicas,
            current: observed.status_replicas,
            // No status yet: its controller has not counted anything ready.
            ready: observed.ready_replicas.unwrap_or(0),
        };
        {
            let mut state = self.lock();
            state.reads.insert(target.clone(), (now, replicas));
            state.holds.remove(&(target.clone(), Op::Read));
        }
        self.check_hpas(target, now).await;
        Ok(replicas)
    }

    async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<(), ActuatorError> {
        let now = Instant::now();
        if let Some(held) = self.held(target, Op::Write, now) {
            return Err(held);
        }
        let written = self
            .scale
            .set_replicas(&target_ref(target), replicas)
            .await
            .map_err(|e| self.failed(target, Op::Write, e, now))?;
        let mut state = self.lock();
        state.holds.remove(&(target.clone(), Op::Write));
        if let Some((_, cached)) = state.reads.get_mut(target) {
            cached.desired = written.spec_replicas;
            cached.current = written.status_replicas;
        }
        Ok(())
    }

    async fn record(&self, evaluation: &Evaluation<'_>) {
        for unreadable in &evaluation.unreadable {
            // Once per hold, with the answer that started it.
            let Some(answer) = self.announce(&unreadable.pool.target, Op::Read) else {
                continue;
            };
            let target = target_ref(&unreadable.pool.target);
            let about = regarding(evaluation.autoscaler, &target);
            if let Err(error) = self.events.unreadable(&about, &target, &answer).await {
                tracing::warn!(%target, %error, "cannot write an Event");
            }
        }
        for outcome in &evaluation.pools {
            let target = target_ref(&outcome.pool.target);
            let about = regarding(evaluation.autoscaler, &target);
            let decision = outcome.decision;
            let published = if outcome.applied {
                let reason = decision.to_string();
                Some(
                    self.events
                        .scaled(
                            &about,
                            &target,
                            outcome.replicas.desired,
                            decision.to,
                            &reason,
                        )
                        .await,
                )
            } else if let Some(error) = outcome.error
                && self.announce(&outcome.pool.target, Op::Write).is_some()
            {
                Some(
                    self.events
                        .refused(&about, &target, decision.to, &error.source.to_string())
                        .await,
                )
            } else {
                None
            };
            if let Some(Err(error)) = published {
                tracing::warn!(%target, %error, "cannot write an Event");
            }
            // In a dry run flyball writes no replicas, so an HPA (KEDA's own, in the KEDA setup)
            // is no conflict; it is announced if the autoscaler starts acting.
            let found = if evaluation.dry_run {
                Vec::new()
            } else {
                std::mem::take(
                    &mut self
                        .lock()
                        .hpas
                        .entry(outcome.pool.target.clone())
                        .or_default()
                        .unannounced,
                )
            };
            for hpa in found {
                if let Err(error) = self.events.hpa_conflict(&about, &target, &hpa).await {
                    tracing::warn!(%target, %error, "cannot write an Event");
                }
            }
        }
        if let Origin::Resource { generation, .. } = &evaluation.autoscaler.origin {
            self.write_status(evaluation, *generation).await;
        }
    }

    fn warnings(&self, target: &ScaleTarget) -> Vec<String> {
        self.lock()
            .hpas
            .get(target)
            .map(|h| {
                h.found
                    .iter()
                    .map(|hpa| {
                        format!(
                            "HorizontalPodAutoscaler {}/{} also scales this target; it and \
                             flyball will undo each other's changes unless flyball only \
                             recommends (dry run, as with KEDA)",
                            hpa.namespace, hpa.name
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `what` failed on `target`, with the API's answer (the same for the call refused and the calls
/// held after it, so a condition built on it is written once per failure), naming the target
/// once.
fn failure_message(what: &str, target: &ScaleTarget, error: &ActuatorError) -> String {
    let target = target_ref(target);
    let answer = error.source.to_string();
    format!(
        "cannot {what} the replicas of {target}: {}",
        target.strip_from(&answer)
    )
}

/// The status an evaluation leaves: conditions (kept from `previous` where unchanged, so their
/// transition times hold) and one entry per pool.
pub fn autoscaler_status(
    previous: Option<&FlyballAutoscalerStatus>,
    evaluation: &Evaluation<'_>,
    generation: Option<i64>,
) -> FlyballAutoscalerStatus {
    let now = time(evaluation.at);
    let mut status = FlyballAutoscalerStatus {
        observed_generation: generation,
        conditions: previous.map(|p| p.conditions.clone()).unwrap_or_default(),
        pools: Vec::with_capacity(evaluation.pools.len()),
    };
    let mut set = |type_, value, reason, message: &str| {
        let update = ConditionUpdate {
            type_,
            status: value,
            reason,
            message,
        };
        set_condition(&mut status.conditions, &update, generation, now.clone());
    };
    set(
        CONDITION_VALID,
        true,
        "SpecValid",
        "the spec passed validation",
    );
    if !evaluation.unreadable.is_empty() {
        let message = evaluation
            .unreadable
            .iter()
            .map(|u| failure_message("read", &u.pool.target, u.error))
            .collect::<Vec<_>>()
            .join("; ");
        set(CONDITION_READY, false, "TargetUnreadable", &message);
        // Nothing was decided: the Scaling condition and the pools stay as last known.
        status.pools = previous.map(|p| p.pools.clone()).unwrap_or_default();
        return status;
    }
    let failure = evaluation.pools.iter().find_map(|o| {
        o.error
            .map(|error| failure_message("set", &o.pool.target, error))
    });
    match failure {
        Some(message) => set(CONDITION_READY, false, "ScaleFailed", &message),
        None if evaluation.dry_run => set(
            CONDITION_READY,
            true,
            "DryRun",
            "deciding and reporting; not setting replicas",
        ),
        None => set(CONDITION_READY, true, "Sizing", "sizing the pools"),
    }
    let moving: Vec<String> = evaluation
        .pools
        .iter()
        .filter(|o| o.decision.to != o.replicas.ready)
        .map(|o| {
            format!(
                "{}: {} ready, {} wanted",
                o.pool.role, o.replicas.ready, o.decision.to
            )
        })
        .collect();
    if moving.is_empty() {
        set(
            CONDITION_SCALING,
            false,
            "Steady",
            "every pool has the replicas it wants, ready",
        );
    } else {
        set(CONDITION_SCALING, true, "Scaling", &moving.join("; "));
    }

    for outcome in &evaluation.pools {
        let decision = outcome.decision;
        let role = outcome.pool.role.as_str();
        let reason = format!("{:?}", decision.rule);
        let earlier = previous
            .and_then(|p| p.pools.iter().find(|pool| pool.role == role))
            .and_then(|pool| pool.last_decision.clone());
        // A recommendation made again keeps the time it was first made: a dry run may repeat
        // one for hours (KEDA's HPA ignores it inside its tolerance), and a new time at every
        // evaluation would rewrite the status ten times a second.
        let repeated = earlier.as_ref().is_some_and(|last| {
            (last.from, last.to, &last.reason) == (decision.from, decision.to, &reason)
        });
        let recommended = evaluation.dry_run && decision.to != decision.from && !repeated;
        let last_decision = if outcome.applied || recommended {
            Some(LastDecisionStatus {
                at: now.clone(),
                from: decision.from,
                to: decision.to,
                reason,
            })
        } else {
            earlier
        };
        status.pools.push(flyball_k8s::PoolStatus {
            role: role.to_owned(),
            target: target_ref(&outcome.pool.target).to_string(),
            current_replicas: if outcome.applied {
                decision.to
            } else {
                outcome.replicas.desired
            },
            desired_replicas: decision.to,
            ready_replicas: outcome.replicas.ready,
            last_decision,
        });
    }
    status
}
