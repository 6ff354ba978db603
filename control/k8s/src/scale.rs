//! Reading and setting replicas through the `/scale` subresource of any scalable kind.
//!
//! target -> discovery (cached) -> GET .../scale + GET the object -> observation
//! target, n -> PATCH .../scale `{"spec":{"replicas":n}}` (merge patch) -> what the server kept

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::error::Error;
use crate::retry::{self, Jitter, RetryPolicy, SleepFn};
use crate::target::ScaleTargetRef;

/// The field manager flyball writes as, visible in `metadata.managedFields`.
pub const FIELD_MANAGER: &str = "flyball";

/// What the API server says about a target's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleObservation {
    /// `Scale.spec.replicas`: what the workload is asked to run (0 when the field is absent,
    /// as `autoscaling/v1` omits zero).
    pub spec_replicas: u32,
    /// `Scale.status.replicas`: pods the workload's controller currently runs.
    pub status_replicas: u32,
    /// `status.readyReplicas` of the target object itself. `Scale` has no ready count, so this
    /// comes from a second GET of the object. For the kinds known to keep the field
    /// ([`keeps_ready_replicas`]), `Some(0)` when the object has a status without it (Kubernetes
    /// omits zero counters) and `None` when it has no status yet. Any other kind may simply not
    /// have the field: then its running replicas (`status_replicas`) count as ready, rather than
    /// none for ever.
    pub ready_replicas: Option<u32>,
    /// `Scale.status.selector`: the pods behind the target, in label-selector syntax.
    pub selector: Option<String>,
    /// `resourceVersion` of the Scale as read.
    pub resource_version: Option<String>,
}

/// What a replica write left on the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleWrite {
    /// `spec.replicas` the server now holds.
    pub spec_replicas: u32,
    /// `status.replicas` at the time of the write.
    pub status_replicas: u32,
    /// Tries it took (1 when nothing was retried).
    pub attempts: u32,
}

/// An HPA that scales the same object flyball does: two controllers would fight over
/// `spec.replicas`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HpaConflict {
    pub namespace: String,
    pub name: String,
    pub min_replicas: Option<i32>,
    pub max_replicas: i32,
}

/// Reads and sets replicas of scale targets, resolving each kind once through discovery.
#[derive(Clone)]
pub struct ScaleClient {
    client: kube::Client,
    resolved: Arc<Mutex<HashMap<(String, String), ApiResource>>>,
    policy: RetryPolicy,
    sleep: SleepFn,
    jitter: Arc<Jitter>,
}

impl std::fmt::Debug for ScaleClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScaleClient")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn to_u32(n: Option<i32>) -> u32 {
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

fn observation(scale: &Scale) -> (u32, u32, Option<String>, Option<String>) {
    let spec = to_u32(scale.spec.as_ref().and_then(|s| s.replicas));
    let status = scale
        .status
        .as_ref()
        .map(|s| u32::try_from(s.replicas).unwrap_or(0))
        .unwrap_or(0);
    let selector = scale
        .status
        .as_ref()
        .and_then(|s| s.selector.clone())
        .filter(|s| !s.is_empty());
    (
        spec,
        status,
        selector,
        scale.metadata.resource_version.clone(),
    )
}

/// Kinds whose status keeps `readyReplicas` (omitted when zero).
pub fn keeps_ready_replicas(target: &ScaleTargetRef) -> bool {
    let group = target.api_version.split_once('/').map_or("", |(g, _)| g);
    matches!(
        (group, target.kind.as_str()),
        ("apps", "Deployment" | "StatefulSet" | "ReplicaSet")
            | ("leaderworkerset.x-k8s.io", "LeaderWorkerSet")
    )
}

/// `status.readyReplicas` with the rules spelled out in [`ScaleObservation`].
fn ready_replicas(object: &DynamicObject, keeps_field: bool, running: u32) -> Option<u32> {
    let field = object
        .data
        .get("status")
        .and_then(|status| status.as_object())
        .map(|status| status.get("readyReplicas"));
    match field {
        Some(Some(v)) => v.as_u64().and_then(|n| u32::try_from(n).ok()),
        Some(None) if keeps_field => Some(0),
        None if keeps_field => None,
        _ => Some(running),
    }
}

/// Same object: same kind and name, and the same group (versions of a group are views of one
/// object; an HPA may omit the version or the whole apiVersion for core kinds).
pub fn hpa_targets(hpa: &HorizontalPodAutoscaler, target: &ScaleTargetRef) -> bool {
    let Some(spec) = &hpa.spec else {
        return false;
    };
    let r = &spec.scale_target_ref;
    let group = r
        .api_version
        .as_deref()
        .map(|v| v.split_once('/').map(|(g, _)| g).unwrap_or(""))
        .unwrap_or("");
    r.kind == target.kind && r.name == target.name && group == target.group()
}

// === impl ScaleClient ===

impl ScaleClient {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            resolved: Arc::default(),
            policy: RetryPolicy::default(),
            sleep: retry::tokio_sleep(),
            jitter: Arc::new(Jitter::new()),
        }
    }

    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Wait with `sleep` between retries instead of `tokio::time::sleep`.
    pub fn with_sleep(mut self, sleep: SleepFn) -> Self {
        self.sleep = sleep;
        self
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.policy
    }

    async fn retried<T, F, Fut>(&self, target: &str, call: F) -> Result<(T, u32), Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        retry::with_retries(target, &self.policy, &self.sleep, &self.jitter, call).await
    }

    /// The served resource for `target`'s kind, from discovery once, then from the cache.
    /// Fails when the kind is not served or has no `/scale` subresource.
    pub async fn resolve(&self, target: &ScaleTargetRef) -> Result<ApiResource, Error> {
        let key = (target.api_version.clone(), target.kind.clone());
        if let Some(ar) = self
            .resolved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(ar.clone());
        }
        let gvk = GroupVersionKind::gvk(target.group(), target.version(), &target.kind);
        let what = format!("{} {}", target.api_version, target.kind);
        let found = self
            .retried(&what, || kube::discovery::pinned_kind(&self.client, &gvk))
            .await;
        let (ar, caps) = match found {
            Ok(((ar, caps), _)) => (ar, caps),
            // A group/version that is not served answers 404; a served one without the kind
            // fails discovery itself.
            Err(Error::NotFound { source, .. })
            | Err(Error::Api {
                source: source @ kube::Error::Discovery(_),
                ..
            }) => {
                return Err(Error::KindNotServed {
                    target: target.to_string(),
                    source,
                });
            }
            Err(e) => return Err(e),
        };
        if !caps
            .subresources
            .iter()
            .any(|(sub, _)| sub.plural == "scale")
        {
            return Err(Error::NoScaleSubresource {
                target: target.to_string(),
            });
        }
        self.resolved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, ar.clone());
        Ok(ar)
    }

    async fn api(&self, target: &ScaleTargetRef) -> Result<Api<DynamicObject>, Error> {
        let ar = self.resolve(target).await?;
        Ok(Api::namespaced_with(
            self.client.clone(),
            &target.namespace,
            &ar,
        ))
    }

    /// Replicas wanted, running and ready. Two reads: the Scale, then the object for
    /// `readyReplicas`.
    pub async fn get_scale(&self, target: &ScaleTargetRef) -> Result<ScaleObservation, Error> {
        let api = self.api(target).await?;
        let what = target.to_string();
        let (scale, _) = self.retried(&what, || api.get_scale(&target.name)).await?;
        let (object, _) = self.retried(&what, || api.get(&target.name)).await?;
        let (spec_replicas, status_replicas, selector, resource_version) = observation(&scale);
        Ok(ScaleObservation {
            spec_replicas,
            status_replicas,
            ready_replicas: ready_replicas(&object, keeps_ready_replicas(target), status_replicas),
            selector,
            resource_version,
        })
    }

    /// Ask for `replicas` with a merge patch of the Scale's `spec.replicas` (no precondition:
    /// the decision is about the count, not about the version it was read from).
    pub async fn set_replicas(
        &self,
        target: &ScaleTargetRef,
        replicas: u32,
    ) -> Result<ScaleWrite, Error> {
        let api = self.api(target).await?;
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
        let (scale, attempts) = self
            .retried(&target.to_string(), || {
                api.patch_scale(&target.name, &params, &patch)
            })
            .await?;
        let (spec_replicas, status_replicas, _, _) = observation(&scale);
        tracing::info!(%target, replicas = spec_replicas, attempts, "replicas set");
        Ok(ScaleWrite {
            spec_replicas,
            status_replicas,
            attempts,
        })
    }

    /// HorizontalPodAutoscalers in the target's namespace that scale the same object. Each is
    /// also logged as a warning: an HPA and flyball on one workload undo each other.
    pub async fn conflicting_hpas(
        &self,
        target: &ScaleTargetRef,
    ) -> Result<Vec<HpaConflict>, Error> {
        let api: Api<HorizontalPodAutoscaler> =
            Api::namespaced(self.client.clone(), &target.namespace);
        let what = format!("HorizontalPodAutoscalers in {}", target.namespace);
        let params = ListParams::default();
        let (list, _) = self.retried(&what, || api.list(&params)).await?;
        let conflicts: Vec<HpaConflict> = list
            .items
            .iter()
            .filter(|hpa| hpa_targets(hpa, target))
            .map(|hpa| HpaConflict {
                namespace: target.namespace.clone(),
                name: hpa.metadata.name.clone().unwrap_or_default(),
                min_replicas: hpa.spec.as_ref().and_then(|s| s.min_replicas),
                max_replicas: hpa.spec.as_ref().map(|s| s.max_replicas).unwrap_or(0),
            })
            .collect();
        for c in &conflicts {
            tracing::warn!(
                %target,
                hpa = %c.name,
                "a HorizontalPodAutoscaler also scales this target; it and flyball will fight over spec.replicas"
            );
        }
        Ok(conflicts)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn hpa(api_version: Option<&str>, kind: &str, name: &str) -> HorizontalPodAutoscaler {
        serde_json::from_value(json!({
            "metadata": {"name": "h"},
            "spec": {
                "scaleTargetRef": {"apiVersion": api_version, "kind": kind, "name": name},
                "maxReplicas": 3
            }
        }))
        .unwrap()
    }

    #[test]
    fn hpa_on_another_version_of_the_same_group_is_the_same_target() {
        let t = ScaleTargetRef::new("apps/v1", "Deployment", "ns", "vllm");
        assert!(hpa_targets(&hpa(Some("apps/v1"), "Deployment", "vllm"), &t));
        assert!(hpa_targets(
            &hpa(Some("apps/v1beta2"), "Deployment", "vllm"),
            &t
        ));
        assert!(!hpa_targets(
            &hpa(Some("apps/v1"), "Deployment", "other"),
            &t
        ));
        assert!(!hpa_targets(
            &hpa(Some("apps/v1"), "StatefulSet", "vllm"),
            &t
        ));
        assert!(!hpa_targets(
            &hpa(Some("example.dev/v1"), "Deployment", "vllm"),
            &t
        ));
    }

    fn obj(data: serde_json::Value) -> DynamicObject {
        let mut o = DynamicObject::new(
            "x",
            &ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
        );
        o.data = data;
        o
    }

    #[test]
    fn ready_replicas_reads_omitted_zero_as_zero_and_missing_status_as_unknown() {
        assert_eq!(
            ready_replicas(&obj(json!({"status": {"readyReplicas": 3}})), true, 5),
            Some(3)
        );
        assert_eq!(
            ready_replicas(&obj(json!({"status": {"replicas": 3}})), true, 3),
            Some(0)
        );
        assert_eq!(ready_replicas(&obj(json!({"spec": {}})), true, 0), None);
    }

    #[test]
    fn a_kind_without_ready_replicas_counts_its_running_replicas_as_ready() {
        let status_only = obj(json!({"status": {"replicas": 3, "phase": "Running"}}));
        assert_eq!(ready_replicas(&status_only, false, 3), Some(3));
        assert_eq!(ready_replicas(&obj(json!({"spec": {}})), false, 2), Some(2));
        // A field it does have is read as it is.
        let with_field = obj(json!({"status": {"readyReplicas": 1}}));
        assert_eq!(ready_replicas(&with_field, false, 3), Some(1));

        let target = |api_version: &str, kind: &str| ScaleTargetRef {
            api_version: api_version.into(),
            kind: kind.into(),
            name: "x".into(),
            namespace: "ns".into(),
        };
        assert!(keeps_ready_replicas(&target("apps/v1", "Deployment")));
        assert!(keeps_ready_replicas(&target(
            "leaderworkerset.x-k8s.io/v1",
            "LeaderWorkerSet"
        )));
        assert!(!keeps_ready_replicas(&target(
            "example.com/v1",
            "Deployment"
        )));
        assert!(!keeps_ready_replicas(&target(
            "serving.kserve.io/v1",
            "InferencePool"
        )));
    }

    #[test]
    fn scale_without_spec_replicas_means_zero() {
        let scale: Scale = serde_json::from_value(json!({
            "metadata": {"name": "x", "resourceVersion": "7"},
            "spec": {},
            "status": {"replicas": 2, "selector": "app=x"}
        }))
        .unwrap();
        let (spec, status, selector, rv) = observation(&scale);
        assert_eq!((spec, status), (0, 2));
        assert_eq!(selector.as_deref(), Some("app=x"));
        assert_eq!(rv.as_deref(), Some("7"));
    }
}
