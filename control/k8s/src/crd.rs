//! The `FlyballAutoscaler` custom resource (`flyball.dev/v1alpha1`, short name `fba`).
//!
//! Its spec *is* the policy crate's [`AutoscalerSpecRaw`] (serde- and schema-transparent), so
//! the CRD and the YAML file share one shape, one set of defaults and one validation
//! (`AutoscalerSpec::try_from`). The status is Kubernetes-shaped: conditions plus one entry per
//! pool.

use flyball_policy::spec::{AutoscalerSpec, AutoscalerSpecRaw, SpecError};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Where the generated CRD is checked in, relative to the workspace root.
pub const CRD_PATH: &str = "deploy/crds/flyball.dev_flyballautoscalers.yaml";

/// Condition types flyball sets.
pub const CONDITION_READY: &str = "Ready";
/// The spec passed validation.
pub const CONDITION_VALID: &str = "Valid";
/// A scale change is in progress (desired differs from current or ready).
pub const CONDITION_SCALING: &str = "Scaling";

/// Sizes one backend/model's model-server pools against latency objectives.
// Each `printcolumn(...)` is its own column; clippy reads their repeated keys as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "flyball.dev",
    version = "v1alpha1",
    kind = "FlyballAutoscaler",
    namespaced,
    shortname = "fba",
    category = "flyball",
    status = "FlyballAutoscalerStatus",
    doc = "Sizes one backend/model's model-server pools (unified, or prefill and decode) against TTFT/TPOT objectives through their /scale subresource.",
    printcolumn(
        name = "Backend",
        type_ = "string",
        json_path = ".spec.selector.backend"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.selector.model"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(
        name = "DryRun",
        type_ = "boolean",
        json_path = ".spec.dryRun",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(transparent)]
#[schemars(transparent, transform = bound_uint32)]
pub struct FlyballAutoscalerSpec {
    pub autoscaler: AutoscalerSpecRaw,
}

/// Gives every `format: uint32` a `maximum`. The API server does not check formats it does not
/// know, uint32 among them: it would store `maxReplicas: 4294967296`, which no replica could then
/// read (the whole list fails to decode, stopping every autoscaler). With the bound it refuses
/// the apply, naming the field.
fn bound_uint32(schema: &mut schemars::Schema) {
    if schema.get("format").and_then(|f| f.as_str()) == Some("uint32") {
        schema.insert("maximum".into(), u32::MAX.into());
    }
    schemars::transform::transform_subschemas(&mut bound_uint32, schema);
}

// === impl FlyballAutoscalerSpec ===

impl FlyballAutoscalerSpec {
    /// The same validation the YAML file gets, with errors named from `spec`
    /// (`spec.pools.decode.maxReplicas = 0: must be >= minReplicas (1)`).
    pub fn validate(&self) -> Result<AutoscalerSpec, SpecError> {
        AutoscalerSpec::from_raw(&self.autoscaler, "spec")
    }
}

/// What flyball last saw and did.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FlyballAutoscalerStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid` (the spec passed validation), `Ready` (flyball is sizing the pools), `Scaling`
    /// (a change is in progress). Always written whole, so a merge patch replaces the list.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One entry per pool.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["role"]))]
    pub pools: Vec<PoolStatus>,
}

/// One pool's replicas and the last change flyball made to it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// `unified`, `prefill` or `decode`.
    pub role: String,
    /// The scaled workload, `Kind namespace/name`.
    pub target: String,
    /// `spec.replicas` of the target as last read.
    pub current_replicas: u32,
    /// What flyball wants.
    pub desired_replicas: u32,
    /// Ready replicas of the target as last read.
    pub ready_replicas: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<LastDecisionStatus>,
}

/// A replica change flyball made (or, in dry-run, would have made).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastDecisionStatus {
    pub at: Time,
    pub from: u32,
    pub to: u32,
    /// The policy's reason, e.g. `FeedForward` or `SloFeedback`.
    pub reason: String,
}

/// A condition to set, without the bookkeeping fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionUpdate<'a> {
    /// [`CONDITION_READY`], [`CONDITION_VALID`] or [`CONDITION_SCALING`].
    pub type_: &'a str,
    pub status: bool,
    /// CamelCase, e.g. `SpecInvalid`.
    pub reason: &'a str,
    pub message: &'a str,
}

/// Set one condition, keeping `lastTransitionTime` unless the status flips (the Kubernetes
/// convention). Returns whether anything changed. Pure: `now` is a parameter.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    update: &ConditionUpdate<'_>,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let status = if update.status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == update.type_) {
        Some(c) => {
            let before = c.clone();
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.to_string();
            c.reason = update.reason.to_string();
            c.message = update.message.to_string();
            c.observed_generation = observed_generation;
            *c != before
        }
        None => {
            conditions.push(Condition {
                type_: update.type_.to_string(),
                status: status.to_string(),
                reason: update.reason.to_string(),
                message: update.message.to_string(),
                observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// The CRD as YAML, with a header saying how it is made. This is the text checked in at
/// [`CRD_PATH`].
pub fn crd_yaml() -> Result<String, Error> {
    let body = serde_yaml_ng::to_string(&FlyballAutoscaler::crd()).map_err(Error::CrdRender)?;
    Ok(format!(
        "# Generated from control/k8s/src/crd.rs by flyball_k8s::crd_yaml(); do not edit.\n\
         # Regenerate with: cargo test -p flyball-k8s --test crd\n\
         ---\n{body}"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn ready(status: bool, reason: &str) -> ConditionUpdate<'_> {
        ConditionUpdate {
            type_: CONDITION_READY,
            status,
            reason,
            message: "m",
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            &ready(true, "Sizing"),
            Some(1),
            at(10)
        ));
        assert!(set_condition(
            &mut conds,
            &ready(true, "Holding"),
            Some(1),
            at(20)
        ));
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].reason, "Holding");
        assert!(set_condition(
            &mut conds,
            &ready(false, "Stale"),
            Some(1),
            at(30)
        ));
        assert_eq!(conds[0].last_transition_time, at(30));
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn setting_the_same_condition_again_changes_nothing() {
        let mut conds = Vec::new();
        set_condition(&mut conds, &ready(true, "Sizing"), Some(2), at(10));
        assert!(!set_condition(
            &mut conds,
            &ready(true, "Sizing"),
            Some(2),
            at(99)
        ));
    }

    #[test]
    fn the_spec_serializes_exactly_as_the_policy_raw_spec() {
        let raw: AutoscalerSpecRaw = serde_json::from_value(serde_json::json!({
            "selector": {"model": "llama"},
            "pools": {"unified": {"scaleTargetRef": {"name": "vllm"}, "maxReplicas": 4}},
            "slo": {"ttft": "500ms"}
        }))
        .unwrap();
        let spec = FlyballAutoscalerSpec {
            autoscaler: raw.clone(),
        };
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::to_value(&raw).unwrap()
        );
    }

    #[test]
    fn unknown_spec_fields_are_rejected_as_in_the_yaml_file() {
        let err = serde_json::from_value::<FlyballAutoscalerSpec>(serde_json::json!({
            "selector": {"model": "llama"},
            "pools": {"unified": {"scaleTargetRef": {"name": "vllm"}, "maxReplicas": 4}},
            "slo": {"ttft": "500ms"},
            "maxReplicas": 3
        }))
        .unwrap_err();
        assert!(err.to_string().contains("maxReplicas"), "{err}");
    }

    #[test]
    fn the_crd_spec_is_validated_by_the_policy_rules_with_spec_paths() {
        let spec: FlyballAutoscalerSpec = serde_json::from_value(serde_json::json!({
            "selector": {"model": "llama"},
            "pools": {"unified": {"scaleTargetRef": {"name": "vllm"}, "minReplicas": 3, "maxReplicas": 2}},
            "slo": {"ttft": "500ms"}
        }))
        .unwrap();
        let err = spec.validate().unwrap_err();
        assert!(
            err.errors()
                .iter()
                .any(|e| e.path == "spec.pools.unified.maxReplicas"),
            "{err}"
        );
    }

    #[test]
    fn crd_has_short_name_status_subresource_and_printer_columns() {
        let crd = FlyballAutoscaler::crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["fba".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Backend", "Model", "Ready", "Reason", "DryRun", "Age"]
        );
    }
}
