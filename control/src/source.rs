//! Autoscalers from `FlyballAutoscaler` resources (`--source kubernetes`).
//!
//! watch FlyballAutoscalers (one namespace or all, optionally by label) into a reflector's
//! store -> on each change, the store's objects -> [`ControlConfig::from_resources`] (each
//! validated on its own, oldest first) -> [`reconfigure`] (windows, status and the control loop
//! follow) ; each rejected resource -> its status: `Valid=False`, reason `InvalidSpec`, the field
//! errors as the message (leader only)
//!
//! A watch (kube-runtime's watcher: list, then watch from the list's resourceVersion, relisting
//! when the API server says the version is too old) rather than a periodic list, so an edit made
//! during an incident (a higher `maxReplicas`, a looser SLO) applies within a round trip, and
//! the API server is not listed every few seconds by every replica. While the watch fails (RBAC,
//! API server down) the last autoscalers read stay in force, and the failure is logged once.
//!
//! It never drops a working autoscaler because another resource is invalid, and never writes
//! anything but the status of a resource it rejects. Resources are read untyped and decoded one
//! by one: a value the API server stored but flyball cannot read (an integer over the schema's
//! bound, stored before the bound existed) rejects that resource, naming the field, where a typed
//! list would fail whole and stop every autoscaler.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flyball_k8s::crd::{
    CONDITION_READY, CONDITION_SCALING, CONDITION_VALID, ConditionUpdate, set_condition,
};
use flyball_k8s::{
    FlyballAutoscaler, FlyballAutoscalerSpec, FlyballAutoscalerStatus, patch_status,
};
use flyball_policy::spec::FieldError;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;

use crate::config::{AutoscalerResource, ControlConfig, Rejected};
use crate::controller::reconfigure;
use crate::http::AppState;

/// The reason of the `Valid` and `Ready` conditions of a rejected resource.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";

/// Where FlyballAutoscalers are read.
#[derive(Clone)]
pub struct KubernetesSource {
    client: kube::Client,
    /// `None`: every namespace.
    namespace: Option<String>,
    label_selector: Option<String>,
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("namespace", &self.namespace)
            .field("label_selector", &self.label_selector)
            .finish_non_exhaustive()
    }
}

/// What one list produced.
#[derive(Debug)]
pub struct Listed {
    pub config: ControlConfig,
    pub rejected: Vec<Rejected>,
    /// The resources as listed, for their current status.
    pub objects: Vec<DynamicObject>,
}

/// The joined field errors: `spec.a = 1: rule; spec.b = 2: rule`.
pub fn message(rejected: &Rejected) -> String {
    let errors: Vec<String> = rejected.errors.iter().map(ToString::to_string).collect();
    errors.join("; ")
}

/// `object` as the configuration reads it, or why its spec cannot be read (the field named).
pub fn resource(object: &DynamicObject) -> Result<AutoscalerResource, Rejected> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let namespace = object.metadata.namespace.clone().unwrap_or_default();
    let found = object.data.get("spec").cloned().unwrap_or_default();
    match serde_path_to_error::deserialize::<_, FlyballAutoscalerSpec>(&found) {
        Ok(spec) => Ok(AutoscalerResource {
            name,
            namespace,
            uid: object.metadata.uid.clone(),
            generation: object.metadata.generation,
            spec: spec.autoscaler,
        }),
        Err(error) => {
            let value = value_at(&found, error.path())
                .map_or_else(|| "(absent)".to_owned(), ToString::to_string);
            let path = match error.path().to_string().as_str() {
                "." => "spec".to_owned(),
                inner => format!("spec.{inner}"),
            };
            Err(Rejected {
                namespace,
                name,
                errors: vec![FieldError {
                    path,
                    value,
                    rule: error.into_inner().to_string(),
                }],
            })
        }
    }
}

/// The value at `path` in `root`, when there is one.
fn value_at<'a>(
    root: &'a serde_json::Value,
    path: &serde_path_to_error::Path,
) -> Option<&'a serde_json::Value> {
    path.iter().try_fold(root, |value, segment| match segment {
        serde_path_to_error::Segment::Seq { index } => value.get(index),
        serde_path_to_error::Segment::Map { key } => value.get(key),
        serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {
            Some(value)
        }
    })
}

/// The status `object` carries, when it reads as one.
fn status_of(object: &DynamicObject) -> Option<FlyballAutoscalerStatus> {
    serde_json::from_value(object.data.get("status")?.clone()).ok()
}

/// The status a rejected resource gets, or `None` when it already says so.
pub fn rejected_status(
    current: Option<&FlyballAutoscalerStatus>,
    rejected: &Rejected,
    generation: Option<i64>,
    now: Time,
) -> Option<FlyballAutoscalerStatus> {
    let message = message(rejected);
    let mut status = FlyballAutoscalerStatus {
        observed_generation: generation,
        conditions: current.map(|s| s.conditions.clone()).unwrap_or_default(),
        pools: Vec::new(),
    };
    const NOT_SIZED: &str =
        "the spec is invalid (see the Valid condition); its pools are not sized";
    // Every condition, so none still describes the last valid generation.
    for (type_, text) in [
        (CONDITION_VALID, message.as_str()),
        (CONDITION_READY, NOT_SIZED),
        (CONDITION_SCALING, NOT_SIZED),
    ] {
        let update = ConditionUpdate {
            type_,
            status: false,
            reason: REASON_INVALID_SPEC,
            message: text,
        };
        set_condition(&mut status.conditions, &update, generation, now.clone());
    }
    (current != Some(&status)).then_some(status)
}

/// How long start-up waits for the API server to judge `--label-selector`.
const SELECTOR_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

// === impl KubernetesSource ===

impl KubernetesSource {
    /// FlyballAutoscalers in `namespace` (every namespace when `None`) matching
    /// `label_selector`.
    pub fn new(
        client: kube::Client,
        namespace: Option<String>,
        label_selector: Option<String>,
    ) -> Self {
        KubernetesSource {
            client,
            namespace,
            label_selector,
        }
    }

    fn api(&self) -> Api<DynamicObject> {
        let resource = ApiResource::erase::<FlyballAutoscaler>(&());
        match &self.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        }
    }

    /// The API server's reason to refuse the label selector, if it does: a list with it, which
    /// the service would otherwise retry for good. Any other failure (the API unreachable, the
    /// CRD not installed yet) says nothing about the selector, so it passes here.
    pub async fn label_selector_refusal(&self) -> Option<String> {
        let selector = self.label_selector.as_deref()?;
        let params = ListParams::default().labels(selector).limit(1);
        let listed = tokio::time::timeout(SELECTOR_CHECK_TIMEOUT, self.api().list(&params)).await;
        match listed {
            Ok(Err(kube::Error::Api(status))) if status.code == 400 => Some(status.message),
            _ => None,
        }
    }

    /// Lists the resources and builds the configuration from them.
    pub async fn list(&self) -> Result<Listed, kube::Error> {
        let mut params = ListParams::default();
        if let Some(selector) = &self.label_selector {
            params = params.labels(selector);
        }
        Ok(Listed::from_objects(self.api().list(&params).await?.items))
    }

    /// Puts a list's configuration in force; logs what changed.
    pub(crate) fn apply(&self, app: &AppState, listed: &Listed, logged: &mut Logged) {
        let changed = reconfigure(
            &app.config,
            &app.telemetry,
            &app.status,
            listed.config.clone(),
        );
        if changed {
            let config = app.config.current();
            let names: Vec<String> = config
                .autoscalers()
                .iter()
                .map(|a| format!("{}/{}", a.namespace, a.name))
                .collect();
            tracing::info!(
                autoscalers = %names.join(", "),
                pools = config.pools().len(),
                "autoscalers from FlyballAutoscalers"
            );
        }
        app.configured.store(true, Ordering::Release);
        let mut now_rejected = HashMap::new();
        for rejected in &listed.rejected {
            let key = (rejected.namespace.clone(), rejected.name.clone());
            let message = message(rejected);
            if logged.get(&key) != Some(&message) {
                tracing::warn!(
                    autoscaler = %rejected.name,
                    namespace = %rejected.namespace,
                    errors = %message,
                    "FlyballAutoscaler refused"
                );
            }
            now_rejected.insert(key, message);
        }
        *logged = now_rejected;
    }

    /// Writes `Valid=False` to each rejected resource whose status does not say so yet.
    async fn report_rejected(&self, listed: &Listed) {
        let now = Time(Timestamp::now());
        for rejected in &listed.rejected {
            let object = listed.objects.iter().find(|o| {
                o.metadata.name.as_deref() == Some(rejected.name.as_str())
                    && o.metadata.namespace.as_deref() == Some(rejected.namespace.as_str())
            });
            let Some(object) = object else {
                continue;
            };
            let generation = object.metadata.generation;
            let current = status_of(object);
            let Some(status) = rejected_status(current.as_ref(), rejected, generation, now.clone())
            else {
                continue;
            };
            if let Err(error) =
                patch_status(&self.client, &rejected.namespace, &rejected.name, &status).await
            {
                tracing::warn!(
                    autoscaler = %rejected.name,
                    namespace = %rejected.namespace,
                    %error,
                    "cannot write the FlyballAutoscaler's status"
                );
            }
        }
    }

    /// Watches until `stop` resolves, applying each change; only the leader writes statuses
    /// (and a replica that becomes the leader writes what is due at once).
    pub(crate) async fn run(
        self,
        app: Arc<AppState>,
        mut leading: watch::Receiver<bool>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let writer = Writer::new(ApiResource::erase::<FlyballAutoscaler>(&()));
        let store = writer.as_reader();
        let mut config = watcher::Config::default();
        if let Some(selector) = &self.label_selector {
            config = config.labels(selector);
        }
        let events = reflector(writer, watcher(self.api(), config)).default_backoff();
        let mut events = std::pin::pin!(events);
        let mut stop = std::pin::pin!(stop);
        let mut logged = Logged::new();
        let mut failing = false;
        // The store holds every object only once the first list is done.
        let mut synced = false;
        let mut leading_open = true;
        loop {
            tokio::select! {
                () = &mut stop => return,
                changed = leading.changed(), if leading_open => {
                    // Without a sender, leadership is fixed: stop listening for it.
                    leading_open = changed.is_ok();
                    if !leading_open || !synced || !*leading.borrow_and_update() {
                        continue;
                    }
                }
                event = events.next() => match event {
                    None => return,
                    Some(Err(error)) => {
                        if !failing {
                            tracing::warn!(%error, "watching FlyballAutoscalers failed; keeping the last ones read");
                        }
                        failing = true;
                        continue;
                    }
                    Some(Ok(event)) => {
                        if failing {
                            tracing::info!("watching FlyballAutoscalers again");
                        }
                        failing = false;
                        synced |= matches!(event, watcher::Event::InitDone);
                        if !synced || matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                            continue;
                        }
                        // A burst (a relist, a kubectl apply of many) is applied once.
                        while let Some(Some(Ok(_))) = futures::FutureExt::now_or_never(events.next()) {}
                    }
                },
            }
            let objects = store.state().iter().map(|o| o.as_ref().clone()).collect();
            let listed = Listed::from_objects(objects);
            self.apply(&app, &listed, &mut logged);
            if *leading.borrow() {
                self.report_rejected(&listed).await;
            }
        }
    }
}

// === impl Listed ===

impl Listed {
    /// The configuration from `objects`, oldest first (so a resource created later never takes
    /// a scale target from one that has it).
    pub fn from_objects(mut objects: Vec<DynamicObject>) -> Listed {
        objects.sort_by(|a, b| {
            let key = |o: &DynamicObject| {
                (
                    o.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    o.metadata.namespace.clone(),
                    o.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let mut unreadable = Vec::new();
        let resources: Vec<AutoscalerResource> = objects
            .iter()
            .filter_map(|object| resource(object).map_err(|r| unreadable.push(r)).ok())
            .collect();
        let (config, mut rejected) = ControlConfig::from_resources(&resources);
        rejected.append(&mut unreadable);
        Listed {
            config,
            rejected,
            objects,
        }
    }
}

/// Rejections already logged, with their message, so each is logged once per change.
pub(crate) type Logged = HashMap<(String, String), String>;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use flyball_policy::spec::FieldError;

    fn rejected() -> Rejected {
        Rejected {
            namespace: "ns".into(),
            name: "llama".into(),
            errors: vec![
                FieldError {
                    path: "spec.pools.unified.maxReplicas".into(),
                    value: "2".into(),
                    rule: "must be >= minReplicas (3)".into(),
                },
                FieldError {
                    path: "spec.slo.percentile".into(),
                    value: "100".into(),
                    rule: "must be below 100".into(),
                },
            ],
        }
    }

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn a_rejected_resource_says_which_fields_break_which_rule() {
        let status = rejected_status(None, &rejected(), Some(4), at(10)).unwrap();
        assert_eq!(status.observed_generation, Some(4));
        let valid = status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_VALID)
            .unwrap();
        assert_eq!(valid.status, "False");
        assert_eq!(valid.reason, REASON_INVALID_SPEC);
        assert_eq!(
            valid.message,
            "spec.pools.unified.maxReplicas = 2: must be >= minReplicas (3); \
             spec.slo.percentile = 100: must be below 100"
        );
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_READY)
            .unwrap();
        assert_eq!(ready.status, "False");
    }

    #[test]
    fn a_resource_rejected_after_an_edit_no_longer_says_its_pools_are_scaling() {
        // Generation 3 was valid and sizing, mid scale-up; generation 4 breaks a rule, so its
        // pools are no longer sized (and `pools` is emptied).
        let mut before = FlyballAutoscalerStatus {
            observed_generation: Some(3),
            ..Default::default()
        };
        set_condition(
            &mut before.conditions,
            &ConditionUpdate {
                type_: flyball_k8s::crd::CONDITION_SCALING,
                status: true,
                reason: "Scaling",
                message: "unified: 1 ready, 3 wanted",
            },
            Some(3),
            at(5),
        );
        let status = rejected_status(Some(&before), &rejected(), Some(4), at(10)).unwrap();
        assert_eq!(status.observed_generation, Some(4));
        for condition in &status.conditions {
            assert!(
                !(condition.type_ == flyball_k8s::crd::CONDITION_SCALING
                    && condition.status == "True"),
                "an invalid spec still reports Scaling=True: {condition:?}"
            );
            assert_eq!(
                condition.observed_generation,
                Some(4),
                "{} describes generation {:?}, not the rejected one",
                condition.type_,
                condition.observed_generation
            );
        }
    }

    #[test]
    fn a_status_that_already_says_so_is_not_written_again() {
        let first = rejected_status(None, &rejected(), Some(4), at(10)).unwrap();
        assert_eq!(
            rejected_status(Some(&first), &rejected(), Some(4), at(20)),
            None
        );
        // A new generation with the same mistake is news.
        assert!(rejected_status(Some(&first), &rejected(), Some(5), at(20)).is_some());
    }
}
