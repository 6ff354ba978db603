//! Autoscalers from `FlyballAutoscaler` resources (`--source kubernetes`).
//!
//! list FlyballAutoscalers (one namespace or all, optionally by label) every `resync` ->
//! [`ControlConfig::from_resources`] (each validated on its own, oldest first) ->
//! [`reconfigure`] (windows, status and the control loop follow) ; each rejected resource ->
//! its status: `Valid=False`, reason `InvalidSpec`, the field errors as the message (leader only)
//!
//! A periodic list rather than a watch: autoscalers change rarely and are few, so listing them
//! every few seconds costs the API server next to nothing; a list needs no bookmark, relist or
//! expiry handling to stay correct across API server restarts; and it is what the in-process
//! API server the tests use (which does not implement watch) can serve, so the tests run this
//! very code. The price is that a change takes up to `resync` to apply.
//!
//! It never drops a working autoscaler because another resource is invalid, and never writes
//! anything but the status of a resource it rejects.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flyball_k8s::crd::{CONDITION_READY, CONDITION_VALID, ConditionUpdate, set_condition};
use flyball_k8s::{FlyballAutoscaler, FlyballAutoscalerStatus, patch_status};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use tokio::sync::watch;

use crate::config::{AutoscalerResource, ControlConfig, Rejected};
use crate::controller::reconfigure;
use crate::http::AppState;

/// The reason of the `Valid` and `Ready` conditions of a rejected resource.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";

/// Where and how often FlyballAutoscalers are read.
#[derive(Clone)]
pub struct KubernetesSource {
    client: kube::Client,
    /// `None`: every namespace.
    namespace: Option<String>,
    label_selector: Option<String>,
    resync: Duration,
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("namespace", &self.namespace)
            .field("label_selector", &self.label_selector)
            .field("resync", &self.resync)
            .finish_non_exhaustive()
    }
}

/// What one list produced.
#[derive(Debug)]
pub struct Listed {
    pub config: ControlConfig,
    pub rejected: Vec<Rejected>,
    /// The resources as listed, for their current status.
    pub objects: Vec<FlyballAutoscaler>,
}

/// The joined field errors: `spec.a = 1: rule; spec.b = 2: rule`.
pub fn message(rejected: &Rejected) -> String {
    let errors: Vec<String> = rejected.errors.iter().map(ToString::to_string).collect();
    errors.join("; ")
}

/// `object` as the configuration reads it.
pub fn resource(object: &FlyballAutoscaler) -> AutoscalerResource {
    AutoscalerResource {
        name: object.metadata.name.clone().unwrap_or_default(),
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        uid: object.metadata.uid.clone(),
        generation: object.metadata.generation,
        spec: object.spec.autoscaler.clone(),
    }
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
    for (type_, text) in [
        (CONDITION_VALID, message.as_str()),
        (
            CONDITION_READY,
            "the spec is invalid (see the Valid condition); its pools are not sized",
        ),
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

// === impl KubernetesSource ===

impl KubernetesSource {
    /// FlyballAutoscalers in `namespace` (every namespace when `None`) matching
    /// `label_selector`, listed every `resync`.
    pub fn new(
        client: kube::Client,
        namespace: Option<String>,
        label_selector: Option<String>,
        resync: Duration,
    ) -> Self {
        KubernetesSource {
            client,
            namespace,
            label_selector,
            resync,
        }
    }

    fn api(&self) -> Api<FlyballAutoscaler> {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Lists the resources and builds the configuration from them, oldest first (so a resource
    /// created later never takes a scale target from one that has it).
    pub async fn list(&self) -> Result<Listed, kube::Error> {
        let mut params = ListParams::default();
        if let Some(selector) = &self.label_selector {
            params = params.labels(selector);
        }
        let mut objects = self.api().list(&params).await?.items;
        objects.sort_by(|a, b| {
            let key = |o: &FlyballAutoscaler| {
                (
                    o.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    o.metadata.namespace.clone(),
                    o.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let resources: Vec<AutoscalerResource> = objects.iter().map(resource).collect();
        let (config, rejected) = ControlConfig::from_resources(&resources);
        Ok(Listed {
            config,
            rejected,
            objects,
        })
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
            let Some(status) =
                rejected_status(object.status.as_ref(), rejected, generation, now.clone())
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

    /// Lists every `resync` until `stop` resolves; only the leader writes statuses.
    pub(crate) async fn run(
        self,
        app: Arc<AppState>,
        leading: watch::Receiver<bool>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut logged = Logged::new();
        let mut failing = false;
        let mut stop = std::pin::pin!(stop);
        loop {
            match self.list().await {
                Ok(listed) => {
                    failing = false;
                    self.apply(&app, &listed, &mut logged);
                    if *leading.borrow() {
                        self.report_rejected(&listed).await;
                    }
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "cannot list FlyballAutoscalers; keeping the last ones read");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.resync) => {}
                () = &mut stop => return,
            }
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
