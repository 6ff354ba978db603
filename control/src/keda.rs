//! KEDA's external scaler (`externalscaler.ExternalScaler`), for clusters that scale through KEDA.
//!
//! A ScaledObject names a flyball pool in its trigger's metadata: `pool: <name>` (a scale target's
//! name), or `autoscaler: <name>` plus `role: unified|prefill|decode` when the autoscaler has two
//! pools (and optionally `namespace:`, default the ScaledObject's). `tolerance:` (optional,
//! default 0.1) is the tolerance of the HPA KEDA makes, which [`metric_for_hpa`] works around.
//!
//! KEDA turns `GetMetricSpec` into an HPA external metric with an `AverageValue` target, and the
//! HPA sets `desired = ceil(metricValue / targetSize)`, unless `metricValue / (targetSize x
//! status.replicas)` is within its tolerance of 1 (10% by default), when it keeps the replicas.
//! flyball reports `targetSize = 1` and a `metricValue` the HPA applies whenever one exists
//! ([`metric_for_hpa`]): flyball's count, or, for a change inside the tolerance band, a value
//! just outside it (a scale-up may then land over flyball's count; a scale-down inside the band
//! may have no such value, and the HPA holds). The trigger's `tolerance` metadata says which
//! tolerance the HPA has. That path also inherits the HPA's sync period (15 s by default);
//! flyball's own actuator has neither. `IsActive` / `StreamIsActive` carry activation (0 <-> 1):
//! the stream pushes a change as soon as the controller sees load appear.
//!
//! KEDA reaches whichever replica its Service picks, and holds that connection. Only the leader
//! merges every gateway's reports, so a follower asks the leader ([`LeaderLink`]): `IsActive` and
//! `GetMetrics` are passed on as they come, and a follower's `StreamIsActive` asks the leader's
//! `IsActive` every [`FOLLOWER_POLL`] (activation through a follower is that much slower). Asked
//! calls carry the forwarding mark, so a replica never passes on what another passed to it. When
//! the leader cannot be asked (none known, unreachable), the follower answers from what it sees,
//! a part of the load: it may answer more replicas than run now (that much load is certain),
//! never fewer, and never deactivates a pool that has replicas ([`answer`]).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::config::{ControlConfig, LiveConfig, PoolDef};
use crate::controller::{PoolStatus, Status};
use crate::forward::FORWARDED_BY;
use crate::leader::leader_channel;
use crate::tls::GrpcTls;
use crate::window::PoolId;

pub mod externalscaler {
    #![allow(clippy::all)]
    include!("gen/externalscaler.rs");
}

use externalscaler::external_scaler_client::ExternalScalerClient;
use externalscaler::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// The HPA target per replica: one unit of metric per replica.
pub const TARGET_SIZE: i64 = 1;

/// The HPA's tolerance when the trigger's metadata gives none: kube-controller-manager's
/// `--horizontal-pod-autoscaler-tolerance` default.
pub const DEFAULT_HPA_TOLERANCE: f64 = 0.1;

/// KEDA hands the HPA metric values in milli-units: nothing finer reaches it.
const MILLI: f64 = 1000.0;

/// How often a follower's activation stream asks the leader.
pub const FOLLOWER_POLL: Duration = Duration::from_secs(1);

/// How long a follower waits for the leader's answer before it answers from what it sees: KEDA
/// calls with a deadline of its own.
const LEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// The scaler service.
#[derive(Debug, Clone)]
pub struct KedaScaler {
    config: Arc<LiveConfig>,
    status: Arc<Status>,
    /// Whether this replica leads (decides on every gateway's reports).
    leading: watch::Receiver<bool>,
    link: Arc<LeaderLink>,
    /// Turns true at shutdown: activation streams end then, rather than hold the server open.
    stop: watch::Receiver<bool>,
    /// Pools whose scale-down the HPA's tolerance holds now: warned about once per episode.
    held_by_tolerance: Arc<Mutex<HashSet<PoolId>>>,
}

/// A ScaledObject's trigger, resolved.
#[derive(Debug, Clone)]
struct Trigger {
    pool: PoolDef,
    /// The HPA's tolerance, as the trigger's `tolerance` metadata says.
    tolerance: f64,
}

/// How a follower asks the leader.
#[derive(Debug)]
pub struct LeaderLink {
    /// This replica's Lease identity, sent as the forwarding mark.
    identity: String,
    /// The leader's gRPC URI, when known and not this replica.
    leader: watch::Receiver<Option<String>>,
    tls: Option<Arc<GrpcTls>>,
    /// The client for the leader last asked, by its URI and the TLS files it was built with.
    client: Mutex<Option<(String, u64, ExternalScalerClient<Channel>)>>,
}

// === impl KedaScaler ===

impl KedaScaler {
    pub fn new(
        config: Arc<LiveConfig>,
        status: Arc<Status>,
        leading: watch::Receiver<bool>,
        link: LeaderLink,
        stop: watch::Receiver<bool>,
    ) -> Self {
        KedaScaler {
            config,
            status,
            leading,
            link: Arc::new(link),
            stop,
            held_by_tolerance: Arc::default(),
        }
    }

    /// Whether this call is the leader's to answer: this replica follows, and the call was not
    /// already passed on by another replica.
    fn for_the_leader<T>(&self, request: &tonic::Request<T>) -> bool {
        !*self.leading.borrow() && !request.metadata().contains_key(FORWARDED_BY)
    }

    pub fn into_server(self) -> ExternalScalerServer<KedaScaler> {
        ExternalScalerServer::new(self)
    }

    /// The pool a ScaledObject names in its metadata, in the configuration in force, and the
    /// tolerance it gives. Every call checks both, so a bad trigger shows from the first.
    fn resolve(&self, object: &ScaledObjectRef) -> Result<Trigger, tonic::Status> {
        let tolerance = tolerance(object)?;
        let config = self.config.current();
        let pool = resolve(&config, object)?.clone();
        Ok(Trigger { pool, tolerance })
    }

    /// Says once, when a pool's scale-down starts being held by the HPA's tolerance, what to do
    /// about it; and when it stops.
    fn note_tolerance_hold(&self, pool: &PoolDef, metric: &HpaMetric, tolerance: f64) {
        let mut held = self
            .held_by_tolerance
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if metric.held {
            if held.insert(pool.id) {
                tracing::warn!(
                    pool = %pool.name,
                    namespace = %pool.target.namespace,
                    running = metric.running,
                    desired = metric.desired,
                    tolerance,
                    "the HPA's tolerance holds this scale-down: no metric value makes it apply; \
                     set the ScaledObject's HPA tolerance (behavior.scaleUp and scaleDown \
                     .tolerance, Kubernetes 1.33+) to 0 and the trigger's `tolerance` metadata \
                     to match"
                );
            }
        } else if held.remove(&pool.id) {
            tracing::info!(pool = %pool.name, "the HPA's tolerance no longer holds this pool");
        }
    }

    /// Why `pool`'s activity is not known.
    fn unknown_activity(&self, pool: &PoolDef) -> String {
        let status = self.status.get(pool.id).unwrap_or_default();
        match status.last_error {
            Some(error) => format!(
                "pool {:?}: activity unknown: its replicas cannot be read ({error}) and no \
                 fresh telemetry has shown load or idleness",
                pool.name
            ),
            None => format!(
                "pool {:?}: activity unknown: its replicas have not been read yet",
                pool.name
            ),
        }
    }

    fn answer_for(&self, pool: &PoolDef) -> Answer {
        answer(
            &self.status.get(pool.id).unwrap_or_default(),
            *self.leading.borrow(),
        )
    }
}

/// What KEDA is told of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// `None` while unknown: KEDA is then told nothing rather than "inactive".
    pub active: Option<bool>,
    /// `None` before any replica count is known.
    pub desired: Option<u32>,
}

/// The leader's decision as it stands; a follower's partial view only ever adds to what runs
/// now (see the module docs). Before the first decision, the replicas asked for now, so the HPA
/// holds.
pub fn answer(status: &PoolStatus, leading: bool) -> Answer {
    let current = status.replicas.map(|r| r.desired);
    let decided = status.desired.or(current);
    if leading {
        return Answer {
            active: status.active,
            desired: decided,
        };
    }
    Answer {
        // Replicas running are never deactivated; replicas it cannot read, from a partial view
        // of the load, neither: only load seen (true) is certain then.
        active: match current {
            Some(n) if n > 0 => Some(true),
            Some(_) => status.active,
            None => status.active.filter(|active| *active),
        },
        desired: match (decided, current) {
            (Some(decided), Some(current)) => Some(decided.max(current)),
            (decided, current) => decided.or(current),
        },
    }
}

/// The metric value for the HPA, and where it leads: see [`metric_for_hpa`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaMetric {
    /// `metricValueFloat`, in whole milli-units as KEDA passes it on.
    pub value: f64,
    /// The replicas the HPA reads (`status.replicas`) and flyball's count.
    pub running: u32,
    pub desired: u32,
    /// Where the HPA lands on `value`: `desired`, more for a scale-up inside its tolerance,
    /// `running` when held.
    pub lands_on: u32,
    /// A scale-down inside the tolerance that no value can make the HPA apply: it keeps
    /// `running`, and `value` is flyball's count, for whoever reads it.
    pub held: bool,
}

/// The metric value that makes an HPA (AverageValue target 1, `tolerance` both ways, as
/// kubernetes' replica_calculator.go `GetExternalPerPodMetricReplicas`) move from `running`
/// replicas to `desired`, whenever one exists.
///
/// The HPA keeps `running` while `value / running` is within `[1 - t, 1 + t]`, else sets
/// `ceil(value)`. Outside that band (and at zero, or with nothing to change) the value is
/// `desired`. A scale-up inside the band reports the least value above it: the HPA lands at or
/// over `desired` (short would be worse than over). A scale-down inside the band reports a value
/// in `(desired - 1, desired]` below the band when one exists, so the HPA lands exactly;
/// otherwise none does, and the HPA will keep `running` whatever is reported.
pub fn metric_for_hpa(running: u32, desired: u32, tolerance: f64) -> HpaMetric {
    let at = |milli: i64, lands_on: u32, held: bool| HpaMetric {
        value: value_for_milli(milli),
        running,
        desired,
        lands_on,
        held,
    };
    let desired_milli = i64::from(desired) * MILLI as i64;
    if running == 0 || desired == running || !hpa_holds(desired_milli, running, tolerance) {
        return at(desired_milli, desired, false);
    }
    if desired > running {
        // Start at the band's edge, then up to the first value the HPA counts as outside it
        // (it compares in floating point, so the edge itself may count as either).
        let mut milli = ((1.0 + tolerance) * f64::from(running) * MILLI).floor() as i64;
        while hpa_holds(milli, running, tolerance) {
            milli += 1;
        }
        return at(milli, ceil_div_milli(milli), false);
    }
    let mut milli = ((1.0 - tolerance) * f64::from(running) * MILLI).ceil() as i64;
    while milli > 0 && hpa_holds(milli, running, tolerance) {
        milli -= 1;
    }
    if milli > desired_milli - MILLI as i64 {
        at(milli, desired, false)
    } else {
        at(desired_milli, running, true)
    }
}

/// Whether the HPA keeps `running` replicas on a metric of `milli` milli-units: its own
/// floating-point comparison, so the band's edges fall where the HPA's do.
fn hpa_holds(milli: i64, running: u32, tolerance: f64) -> bool {
    let ratio = milli as f64 / (MILLI * f64::from(running));
    (1.0 - tolerance) <= ratio && ratio <= (1.0 + tolerance)
}

fn ceil_div_milli(milli: i64) -> u32 {
    let whole = milli.div_euclid(MILLI as i64) + i64::from(milli.rem_euclid(MILLI as i64) > 0);
    u32::try_from(whole).unwrap_or(u32::MAX)
}

/// A float that KEDA turns into exactly `milli` milli-units, whether it truncates
/// `value x 1000` (older releases) or rounds to three decimals (newer ones).
fn value_for_milli(milli: i64) -> f64 {
    let value = milli as f64 / MILLI;
    if ((value * MILLI) as i64) < milli {
        value.next_up()
    } else {
        value
    }
}

/// The HPA tolerance the trigger's `tolerance` metadata gives, or the HPA's default.
fn tolerance(object: &ScaledObjectRef) -> Result<f64, tonic::Status> {
    let Some(given) = object.scaler_metadata.get("tolerance") else {
        return Ok(DEFAULT_HPA_TOLERANCE);
    };
    match given.trim().parse::<f64>() {
        Ok(t) if (0.0..1.0).contains(&t) => Ok(t),
        _ => Err(tonic::Status::invalid_argument(format!(
            "scalerMetadata.tolerance = {given:?}: give the HPA's tolerance, a number from 0 \
             up to (not including) 1 (default {DEFAULT_HPA_TOLERANCE})"
        ))),
    }
}

/// The pool `object` names in its metadata.
fn resolve<'a>(
    config: &'a ControlConfig,
    object: &ScaledObjectRef,
) -> Result<&'a PoolDef, tonic::Status> {
    let metadata = &object.scaler_metadata;
    // Names are unique within a namespace, and only there: a ScaledObject in team-b must not
    // follow team-a's pool of the same name, even when team-b has none.
    let namespace = metadata.get("namespace").unwrap_or(&object.namespace);
    let pick = |namespaces: &[&str]| namespaces.iter().position(|ns| *ns == namespace.as_str());
    if let Some(name) = metadata.get("pool") {
        let named: Vec<&PoolDef> = config.pools().iter().filter(|p| p.name == *name).collect();
        let namespaces: Vec<&str> = named.iter().map(|p| p.target.namespace.as_str()).collect();
        let pool = pick(&namespaces).map(|i| named[i]);
        return pool.ok_or_else(|| {
            tonic::Status::not_found(format!(
                "scalerMetadata.pool = {name:?}: no such pool in namespace {namespace:?} (known: \
                 {})",
                pool_names(config)
            ))
        });
    }
    let Some(name) = metadata.get("autoscaler") else {
        return Err(tonic::Status::invalid_argument(
            "scalerMetadata: give `pool` (a pool name) or `autoscaler` (plus `role` for a \
             prefill/decode autoscaler)",
        ));
    };
    let candidates: Vec<_> = config
        .autoscalers()
        .iter()
        .filter(|a| a.name == *name)
        .collect();
    let namespaces: Vec<&str> = candidates.iter().map(|a| a.namespace.as_str()).collect();
    let autoscaler = pick(&namespaces).map(|i| candidates[i]).ok_or_else(|| {
        tonic::Status::not_found(format!(
            "scalerMetadata.autoscaler = {name:?}: no such autoscaler in namespace \
             {namespace:?}"
        ))
    })?;
    let pools: Vec<&PoolDef> = autoscaler
        .pools
        .iter()
        .filter_map(|id| config.pool(*id))
        .collect();
    match (metadata.get("role"), pools.as_slice()) {
        (None, [only]) => Ok(*only),
        (None, _) => Err(tonic::Status::invalid_argument(format!(
            "scalerMetadata.role: required, autoscaler {name:?} has prefill and decode pools"
        ))),
        (Some(role), pools) => pools
            .iter()
            .find(|p| p.role.as_str() == role)
            .copied()
            .ok_or_else(|| {
                tonic::Status::not_found(format!(
                    "scalerMetadata.role = {role:?}: autoscaler {name:?} has no such pool"
                ))
            }),
    }
}

fn pool_names(config: &ControlConfig) -> String {
    let names: Vec<String> = config
        .pools()
        .iter()
        .map(|p| format!("{}/{}", p.target.namespace, p.name))
        .collect();
    names.join(", ")
}

/// The metric a pool is scaled on: `flyball-<pool>`.
pub fn metric_name(pool: &PoolDef) -> String {
    format!("flyball-{}", pool.name)
}

// === impl LeaderLink ===

impl LeaderLink {
    pub fn new(
        identity: String,
        leader: watch::Receiver<Option<String>>,
        tls: Option<Arc<GrpcTls>>,
    ) -> Self {
        LeaderLink {
            identity,
            leader,
            tls,
            client: Mutex::new(None),
        }
    }

    /// A link that never asks: for a replica that always leads, and for tests.
    pub fn none() -> Self {
        let (_, leader) = watch::channel(None);
        LeaderLink::new(String::new(), leader, None)
    }

    fn client(&self) -> Option<ExternalScalerClient<Channel>> {
        let uri = self.leader.borrow().clone()?;
        // Renewed certificates (or CA) make a new client: the old one's reconnections would
        // present what the leader no longer accepts.
        let generation = self.tls.as_ref().map_or(0, |tls| tls.generation());
        let mut cached = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((known, built_with, client)) = cached.as_ref()
            && *known == uri
            && *built_with == generation
        {
            return Some(client.clone());
        }
        let channel = match leader_channel(&uri, self.tls.as_deref(), LEADER_TIMEOUT) {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(%uri, %error, "cannot reach the leader for KEDA; answering locally");
                return None;
            }
        };
        let client = ExternalScalerClient::new(channel);
        *cached = Some((uri, generation, client.clone()));
        Some(client)
    }

    /// The leader's answer to `message`, or `None` (answer locally) if it cannot be had in time.
    async fn ask<M, T, F, Fut>(&self, message: M, call: F) -> Option<T>
    where
        F: FnOnce(ExternalScalerClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client()?;
        let mut request = tonic::Request::new(message);
        if let Ok(identity) = self.identity.parse() {
            request.metadata_mut().insert(FORWARDED_BY, identity);
        }
        match tokio::time::timeout(LEADER_TIMEOUT, call(client, request)).await {
            Ok(Ok(response)) => Some(response.into_inner()),
            Ok(Err(status)) => {
                tracing::debug!(%status, "the leader did not answer KEDA's call; answering locally");
                None
            }
            Err(_elapsed) => {
                tracing::debug!("the leader did not answer KEDA's call in time; answering locally");
                None
            }
        }
    }

    async fn is_active(&self, object: ScaledObjectRef) -> Option<bool> {
        self.ask(object, |mut client, request| async move {
            client.is_active(request).await
        })
        .await
        .map(|answer| answer.result)
    }
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for KedaScaler {
    async fn is_active(
        &self,
        request: tonic::Request<ScaledObjectRef>,
    ) -> Result<tonic::Response<IsActiveResponse>, tonic::Status> {
        let pool = self.resolve(request.get_ref())?.pool;
        if self.for_the_leader(&request)
            && let Some(result) = self.link.is_active(request.get_ref().clone()).await
        {
            return Ok(tonic::Response::new(IsActiveResponse { result }));
        }
        match self.answer_for(&pool).active {
            Some(result) => Ok(tonic::Response::new(IsActiveResponse { result })),
            // An error makes KEDA keep the replicas as they are; false would scale to zero.
            None => Err(tonic::Status::unavailable(self.unknown_activity(&pool))),
        }
    }

    type StreamIsActiveStream = ActiveStream;

    /// The current activation at once, then each change.
    async fn stream_is_active(
        &self,
        request: tonic::Request<ScaledObjectRef>,
    ) -> Result<tonic::Response<ActiveStream>, tonic::Status> {
        let pool = self.resolve(request.get_ref())?.pool;
        let Some(receiver) = self.status.subscribe(pool.id) else {
            return Err(tonic::Status::internal("pool has no status channel"));
        };
        let activation = Activation {
            object: request.get_ref().clone(),
            // A call passed on by another replica is answered from here, never passed on.
            ask_leader: !request.metadata().contains_key(FORWARDED_BY),
            link: self.link.clone(),
            receiver,
            leading: self.leading.clone(),
            stop: self.stop.clone(),
            last: None,
        };
        let stream = futures::stream::unfold(activation, |mut activation| async move {
            let active = activation.next_change().await?;
            Some((Ok(IsActiveResponse { result: active }), activation))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: tonic::Request<ScaledObjectRef>,
    ) -> Result<tonic::Response<GetMetricSpecResponse>, tonic::Status> {
        let pool = self.resolve(request.get_ref())?.pool;
        Ok(tonic::Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: metric_name(&pool),
                target_size: TARGET_SIZE,
                target_size_float: TARGET_SIZE as f64,
            }],
        }))
    }

    /// A value that makes the HPA land on the desired replicas ([`answer`], [`metric_for_hpa`]);
    /// before any replica count is known, Unavailable.
    async fn get_metrics(
        &self,
        request: tonic::Request<GetMetricsRequest>,
    ) -> Result<tonic::Response<GetMetricsResponse>, tonic::Status> {
        if self.for_the_leader(&request) {
            let asked = self
                .link
                .ask(
                    request.get_ref().clone(),
                    |mut client, request| async move { client.get_metrics(request).await },
                )
                .await;
            if let Some(answer) = asked {
                return Ok(tonic::Response::new(answer));
            }
        }
        let request = request.into_inner();
        let object = request.scaled_object_ref.unwrap_or_default();
        let Trigger { pool, tolerance } = self.resolve(&object)?;
        let status = self.status.get(pool.id).unwrap_or_default();
        let Some(desired) = answer(&status, *self.leading.borrow()).desired else {
            return Err(tonic::Status::unavailable(format!(
                "pool {:?}: no replica count known yet",
                pool.name
            )));
        };
        // The HPA weighs the metric against the replicas that exist (status.replicas).
        let running = status.replicas.map_or(0, |r| r.current);
        let metric = metric_for_hpa(running, desired, tolerance);
        self.note_tolerance_hold(&pool, &metric, tolerance);
        let metric_name = if request.metric_name.is_empty() {
            metric_name(&pool)
        } else {
            request.metric_name
        };
        Ok(tonic::Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                // KEDA reads the integer only when the float is 0; rounded up, it leads where
                // the float does (ceil is where the HPA lands).
                metric_value: metric.value.ceil() as i64 * TARGET_SIZE,
                metric_value_float: metric.value * TARGET_SIZE as f64,
            }],
        }))
    }
}

/// One `StreamIsActive` call: the activation, each time it changes.
struct Activation {
    object: ScaledObjectRef,
    /// Ask the leader while this replica follows.
    ask_leader: bool,
    link: Arc<LeaderLink>,
    receiver: watch::Receiver<PoolStatus>,
    leading: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    last: Option<bool>,
}

impl Activation {
    /// The activation when it differs from the last sent (at once for the first known one;
    /// nothing while unknown); `None` at shutdown or when the pool goes.
    async fn next_change(&mut self) -> Option<bool> {
        loop {
            let leads = *self.leading.borrow_and_update();
            let local = answer(&self.receiver.borrow_and_update(), leads).active;
            let following = self.ask_leader && !leads;
            let active = if following {
                match self.link.is_active(self.object.clone()).await {
                    Some(leaders) => Some(leaders),
                    None => local,
                }
            } else {
                local
            };
            if let Some(active) = active
                && self.last != Some(active)
            {
                self.last = Some(active);
                return Some(active);
            }
            tokio::select! {
                changed = self.receiver.changed() => changed.ok()?,
                changed = self.leading.changed() => changed.ok()?,
                () = tokio::time::sleep(FOLLOWER_POLL), if following => {}
                _ = self.stop.wait_for(|stop| *stop) => return None,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::controller::PoolReplicas;

    /// A ScaledObject in `namespace` whose trigger carries `metadata`.
    fn object(namespace: &str, metadata: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: "scaler".into(),
            namespace: namespace.into(),
            scaler_metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn status(running: u32, decided: Option<u32>, active: bool) -> PoolStatus {
        let active = Some(active);
        PoolStatus {
            replicas: Some(PoolReplicas {
                desired: running,
                current: running,
                ready: running,
            }),
            desired: decided,
            active,
            ..PoolStatus::default()
        }
    }

    #[test]
    fn the_leader_answers_its_decision_either_way() {
        let down = status(6, Some(2), true);
        assert_eq!(
            answer(&down, true),
            Answer {
                active: Some(true),
                desired: Some(2)
            }
        );
        let to_zero = status(1, Some(0), false);
        assert_eq!(
            answer(&to_zero, true),
            Answer {
                active: Some(false),
                desired: Some(0)
            }
        );
    }

    #[test]
    fn a_follower_answers_more_than_runs_but_never_less() {
        // It sees only its own gateways: 2 is what that part of the load needs.
        assert_eq!(answer(&status(6, Some(2), true), false).desired, Some(6));
        assert_eq!(answer(&status(6, Some(9), true), false).desired, Some(9));
        let idle = answer(&status(1, Some(0), false), false);
        assert_eq!(
            idle,
            Answer {
                active: Some(true),
                desired: Some(1)
            }
        );
        // At zero, load it sees is certain: it may activate.
        assert_eq!(answer(&status(0, Some(1), true), false).active, Some(true));
        assert_eq!(
            answer(&status(0, Some(0), false), false).active,
            Some(false)
        );
        // Before any decision: what runs now, so the HPA holds.
        assert_eq!(answer(&status(3, None, false), false).desired, Some(3));
        assert_eq!(answer(&PoolStatus::default(), false).desired, None);
    }

    /// A follower that cannot read the replicas, its own reports idle (the leader's may not be),
    /// and the leader out of reach: "inactive" from that partial view would let KEDA take a
    /// loaded pool to zero.
    #[test]
    fn a_follower_that_cannot_read_replicas_never_answers_inactive() {
        let unread_idle = PoolStatus {
            replicas: None,
            active: Some(false),
            ..PoolStatus::default()
        };
        assert_eq!(answer(&unread_idle, false).active, None);
        assert_eq!(answer(&unread_idle, true).active, Some(false));
        let unread_loaded = PoolStatus {
            active: Some(true),
            ..unread_idle
        };
        assert_eq!(answer(&unread_loaded, false).active, Some(true));
    }

    #[test]
    fn activity_not_yet_known_is_answered_as_unknown_not_inactive() {
        let unread = PoolStatus::default();
        assert_eq!(answer(&unread, true).active, None);
        assert_eq!(answer(&unread, false).active, None);
        // A follower that reads replicas running knows enough: never deactivate them.
        let running = PoolStatus {
            active: None,
            ..status(2, None, false)
        };
        assert_eq!(answer(&running, false).active, Some(true));
        assert_eq!(answer(&running, true).active, None);
    }

    /// What the HPA does with a reported value: KEDA makes it milli-units (truncating in older
    /// releases, rounding to three decimals in newer ones; both are checked), then
    /// replica_calculator.go's `GetExternalPerPodMetricReplicas` with target 1000 milli.
    fn hpa_sets(status_replicas: u32, value: f64, tolerance: f64) -> u32 {
        let truncated = (value * 1000.0) as i64;
        let rounded = (value * 1000.0).round() as i64;
        assert_eq!(
            truncated, rounded,
            "{value} is not a whole number of milli-units"
        );
        let ratio = truncated as f64 / (1000.0 * f64::from(status_replicas));
        if (1.0 - tolerance) <= ratio && ratio <= (1.0 + tolerance) {
            status_replicas
        } else {
            (truncated as f64 / 1000.0).ceil() as u32
        }
    }

    #[test]
    fn the_metric_makes_the_hpa_apply_a_change_inside_its_tolerance() {
        // (running, desired, tolerance) -> (value, lands on, held)
        let table = [
            // One replica down from 12: 10.799 is under the band (10.8) and ceils to 11.
            ((12, 11, 0.1), (10.799, 11, false)),
            // Four up from 41: 45 is inside the band (up to 45.1); the least value above it.
            ((41, 45, 0.1), (45.101, 46, false)),
            // One down from 25: the band starts at 22.5, under 23 = 24 - 1: nothing lands on 24.
            ((25, 24, 0.1), (24.0, 25, true)),
            // At zero the HPA does not weigh a ratio (KEDA activates): the count itself.
            ((0, 3, 0.1), (3.0, 3, false)),
            ((7, 7, 0.1), (7.0, 7, false)),
            // Outside the band already.
            ((9, 10, 0.1), (10.0, 10, false)),
            ((20, 15, 0.1), (15.0, 15, false)),
            // 11/10 is exactly on the edge, which the HPA counts as inside.
            ((10, 11, 0.1), (11.001, 12, false)),
            // No tolerance: every change is applied as it is.
            ((25, 24, 0.0), (24.0, 24, false)),
            ((41, 45, 0.0), (45.0, 45, false)),
        ];
        for ((running, desired, tolerance), (value, lands_on, held)) in table {
            let metric = metric_for_hpa(running, desired, tolerance);
            let case = format!("{running} -> {desired} at {tolerance}: {metric:?}");
            assert!((metric.value - value).abs() < 1e-9, "{case}");
            assert_eq!((metric.lands_on, metric.held), (lands_on, held), "{case}");
            if running > 0 {
                assert_eq!(
                    hpa_sets(running, metric.value, tolerance),
                    lands_on,
                    "{case}"
                );
            }
        }
    }

    #[test]
    fn the_hpa_lands_where_the_metric_says_for_every_count() {
        for tolerance in [0.0, 0.01, 0.05, 0.1, 0.25, 0.5] {
            for running in 1..=300 {
                for desired in 0..=400 {
                    let metric = metric_for_hpa(running, desired, tolerance);
                    let case = format!("{running} -> {desired} at {tolerance}: {metric:?}");
                    let set = hpa_sets(running, metric.value, tolerance);
                    assert_eq!(set, metric.lands_on, "{case}");
                    if metric.held {
                        assert!(desired < running && tolerance > 0.0, "{case}");
                        assert_eq!(metric.value, f64::from(desired), "{case}");
                        // Held only when no value in (desired - 1, desired] is under the band.
                        let band_floor = (1.0 - tolerance) * f64::from(running);
                        assert!(band_floor <= f64::from(desired - 1) + 0.001, "{case}");
                    } else if desired > running {
                        // Never short; over by no more than the band's width and a replica.
                        let over = f64::from(set) - f64::from(desired);
                        assert!(set >= desired, "{case}");
                        assert!(over <= tolerance * f64::from(running) + 1.0, "{case}");
                    } else {
                        assert_eq!(set, desired, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_tolerance_metadata_is_a_fraction_below_one() {
        let with = |tolerance: &str| ScaledObjectRef {
            scaler_metadata: [("tolerance".to_string(), tolerance.to_string())].into(),
            ..ScaledObjectRef::default()
        };
        assert_eq!(tolerance(&ScaledObjectRef::default()).unwrap(), 0.1);
        assert_eq!(tolerance(&with("0")).unwrap(), 0.0);
        assert_eq!(tolerance(&with("0.05")).unwrap(), 0.05);
        for bad in ["1", "-0.1", "10%", "NaN", "inf", ""] {
            let refused = tolerance(&with(bad)).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(
                refused.message().starts_with("scalerMetadata.tolerance"),
                "{}",
                refused.message()
            );
        }
    }

    #[test]
    fn a_pool_name_in_two_namespaces_resolves_to_the_scaled_objects_own() {
        let yaml = r#"
autoscalers:
  - name: llama
    namespace: team-a
    spec:
      selector: { backend: a }
      pools: { unified: { scaleTargetRef: { name: vllm }, maxReplicas: 2 } }
      slo: { ttft: 1s }
  - name: llama
    namespace: team-b
    spec:
      selector: { backend: b }
      pools: { unified: { scaleTargetRef: { name: vllm }, maxReplicas: 2 } }
      slo: { ttft: 1s }
"#;
        let config = ControlConfig::from_yaml(yaml).unwrap();
        let namespace_of =
            |object: &ScaledObjectRef| resolve(&config, object).map(|p| p.target.namespace.clone());
        assert_eq!(
            namespace_of(&object("team-b", &[("pool", "vllm")])).unwrap(),
            "team-b"
        );
        let named = object("team-b", &[("pool", "vllm"), ("namespace", "team-a")]);
        assert_eq!(namespace_of(&named).unwrap(), "team-a");
        let elsewhere = namespace_of(&object("keda", &[("pool", "vllm")])).unwrap_err();
        assert_eq!(elsewhere.code(), tonic::Code::NotFound);
        assert!(
            elsewhere.message().contains("team-a/vllm, team-b/vllm"),
            "{}",
            elsewhere.message()
        );
    }

    #[test]
    fn the_only_pool_of_a_name_is_not_found_from_another_namespace() {
        let yaml = r#"
autoscalers:
  - name: llama
    namespace: team-a
    spec:
      selector: { backend: a }
      pools: { unified: { scaleTargetRef: { name: vllm }, maxReplicas: 2 } }
      slo: { ttft: 1s }
"#;
        let config = ControlConfig::from_yaml(yaml).unwrap();
        for by in [[("pool", "vllm")], [("autoscaler", "llama")]] {
            let from_team_b = resolve(&config, &object("team-b", &by)).unwrap_err();
            assert_eq!(from_team_b.code(), tonic::Code::NotFound, "{by:?}");
            assert!(
                from_team_b.message().contains("\"team-b\""),
                "{}",
                from_team_b.message()
            );
            assert!(resolve(&config, &object("team-a", &by)).is_ok(), "{by:?}");
            let named = [by[0], ("namespace", "team-a")];
            assert!(
                resolve(&config, &object("team-b", &named)).is_ok(),
                "{by:?}"
            );
        }
    }
}
