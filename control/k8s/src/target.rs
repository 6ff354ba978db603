//! The workload a pool scales, fully resolved (namespace included).

use std::fmt;

use k8s_openapi::api::core::v1::ObjectReference;

/// A workload with a `/scale` subresource, in one namespace.
///
/// The spec's `scaleTargetRef` leaves the namespace optional (default: the autoscaler's own);
/// by the time the actuator holds a target, it is known.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScaleTargetRef {
    /// `apps/v1`, `leaderworkerset.x-k8s.io/v1`, ...
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
}

// === impl ScaleTargetRef ===

impl ScaleTargetRef {
    pub fn new(api_version: &str, kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            name: name.to_string(),
            namespace: namespace.to_string(),
        }
    }

    /// Resolve the spec's reference, defaulting the namespace to the autoscaler's.
    pub fn from_spec(
        spec: &flyball_policy::spec::ScaleTargetRef,
        autoscaler_namespace: &str,
    ) -> Self {
        Self {
            api_version: spec.api_version.clone(),
            kind: spec.kind.clone(),
            name: spec.name.clone(),
            namespace: spec
                .namespace
                .clone()
                .unwrap_or_else(|| autoscaler_namespace.to_string()),
        }
    }

    /// The API group (`apps`; empty for the core group).
    pub fn group(&self) -> &str {
        match self.api_version.split_once('/') {
            Some((group, _)) => group,
            None => "",
        }
    }

    /// The version (`v1`).
    pub fn version(&self) -> &str {
        match self.api_version.split_once('/') {
            Some((_, version)) => version,
            None => &self.api_version,
        }
    }

    /// `answer` (an error of this crate about this target) without the target it starts with,
    /// for a message that names the target itself.
    pub fn strip_from<'a>(&self, answer: &'a str) -> &'a str {
        let me = self.to_string();
        answer
            .strip_prefix(me.as_str())
            .and_then(|rest| rest.strip_prefix(": "))
            .unwrap_or(answer)
    }

    /// For Events' `related` field.
    pub fn object_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.api_version.clone()),
            kind: Some(self.kind.clone()),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        }
    }
}

impl fmt::Display for ScaleTargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_about_the_target_loses_its_name_and_others_stay_whole() {
        let target = ScaleTargetRef::new("apps/v1", "Deployment", "ns", "vllm");
        assert_eq!(
            target.strip_from("Deployment ns/vllm: forbidden: no"),
            "forbidden: no"
        );
        assert_eq!(
            target.strip_from("Deployment ns/other: forbidden: no"),
            "Deployment ns/other: forbidden: no"
        );
        assert_eq!(
            target.strip_from("Deployment ns/vllm"),
            "Deployment ns/vllm"
        );
    }

    #[test]
    fn group_and_version_split_the_api_version_and_core_has_no_group() {
        let t = ScaleTargetRef::new("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "ns", "x");
        assert_eq!(t.group(), "leaderworkerset.x-k8s.io");
        assert_eq!(t.version(), "v1");
        let core = ScaleTargetRef::new("v1", "ReplicationController", "ns", "x");
        assert_eq!(core.group(), "");
        assert_eq!(core.version(), "v1");
    }

    #[test]
    fn spec_reference_without_namespace_takes_the_autoscalers() {
        let spec: flyball_policy::spec::ScaleTargetRef =
            serde_json::from_value(serde_json::json!({"name": "vllm"})).unwrap();
        let t = ScaleTargetRef::from_spec(&spec, "models");
        assert_eq!(
            t,
            ScaleTargetRef::new("apps/v1", "Deployment", "models", "vllm")
        );
        assert_eq!(t.to_string(), "Deployment models/vllm");
    }
}
