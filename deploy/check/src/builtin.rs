//! Kubernetes' own kinds (Deployment, Service, RBAC, ...) checked against the types k8s-openapi
//! generates from Kubernetes' OpenAPI spec, rejecting fields those types do not know, as
//! `kubectl apply --validate=strict` would. k8s-openapi's types skip unknown fields silently;
//! `serde_ignored` reports each one with its path.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::manifest::Document;

/// The built-in kinds this module knows, as `(apiVersion, kind)`.
pub const KINDS: &[(&str, &str)] = &[
    ("v1", "ConfigMap"),
    ("v1", "Namespace"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("apps/v1", "Deployment"),
    ("coordination.k8s.io/v1", "Lease"),
    ("policy/v1", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
];

/// Every problem with a built-in kind's document; `None` when the kind is not built in.
pub fn check(document: &Document) -> Option<Vec<String>> {
    let value = &document.value;
    let problems = match (document.api_version(), document.kind()) {
        ("v1", "ConfigMap") => strict::<ConfigMap>(value),
        ("v1", "Namespace") => strict::<Namespace>(value),
        ("v1", "Service") => strict::<Service>(value),
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(value),
        ("apps/v1", "Deployment") => strict::<Deployment>(value),
        ("coordination.k8s.io/v1", "Lease") => strict::<Lease>(value),
        ("policy/v1", "PodDisruptionBudget") => strict::<PodDisruptionBudget>(value),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(value),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            strict::<ClusterRoleBinding>(value)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => strict::<Role>(value),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict::<RoleBinding>(value),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            strict::<CustomResourceDefinition>(value)
        }
        _ => return None,
    };
    Some(problems)
}

/// Problems with a custom resource's `metadata`, which CRD schemas leave as a bare object.
pub fn check_metadata(document: &Document) -> Vec<String> {
    strict::<ObjectMeta>(&document.value["metadata"])
        .into_iter()
        .map(|p| format!("metadata.{p}"))
        .collect()
}

/// Deserializes `value` as `T`, collecting the fields `T` does not know and any type error.
pub fn strict<T: DeserializeOwned>(value: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let result: Result<T, _> = serde_ignored::deserialize(value.clone(), |path| {
        problems.push(format!("{}: unknown field", field_path(&path)));
    });
    if let Err(error) = result {
        problems.push(error.to_string());
    }
    problems
}

/// `spec.template.spec.containers.0.name`: serde_ignored's path without its `?` steps for
/// optional fields.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    let join = |parent: &Path<'_>, step: &str| {
        let parent = field_path(parent);
        if parent.is_empty() {
            step.to_string()
        } else {
            format!("{parent}.{step}")
        }
    };
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => join(parent, &index.to_string()),
        Path::Map { parent, key } => join(parent, key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn document(value: Value) -> Document {
        Document {
            file: "x.yaml".into(),
            index: 0,
            value,
        }
    }

    #[test]
    fn a_misspelled_deployment_field_is_reported_with_its_path() {
        let deployment = document(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {
                "replica": 2,
                "selector": {"matchLabels": {"app": "d"}},
                "template": {
                    "metadata": {"labels": {"app": "d"}},
                    "spec": {"containers": [{"name": "c", "image": "i", "readinessProbe": {"httpGet": {"path": "/", "port": 1}, "periodSecond": 1}}]}
                }
            }
        }));
        let problems = check(&deployment).expect("built-in");
        assert_eq!(
            problems,
            vec![
                "spec.replica: unknown field".to_string(),
                "spec.template.spec.containers.0.readinessProbe.periodSecond: unknown field"
                    .to_string(),
            ]
        );
    }

    #[test]
    fn a_wrong_type_is_reported() {
        let service = document(json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"ports": [{"port": "ninety"}]}
        }));
        assert_eq!(check(&service).expect("built-in").len(), 1);
    }

    #[test]
    fn custom_kinds_are_not_claimed() {
        let other =
            document(json!({"apiVersion": "flyball.dev/v1alpha1", "kind": "FlyballAutoscaler"}));
        assert_eq!(check(&other), None);
    }
}
