//! The resource table: which kinds the fake serves, and the discovery documents built from it.
//!
//! Discovery answers are built from the same table the request router uses, so `kube`'s
//! `pinned_kind` / `Discovery` see exactly what the fake can serve, no more.

use serde_json::{Value, json};

/// Verbs listed in discovery for every resource. Only what the fake implements: `watch` and
/// `deletecollection` are left out on purpose so that `ApiCapabilities::supports_operation`
/// tells the truth.
const VERBS: &[&str] = &["create", "delete", "get", "list", "patch", "update"];
const SUBRESOURCE_VERBS: &[&str] = &["get", "patch", "update"];

/// Where the `/scale` subresource reads and writes inside the parent object.
///
/// Paths are the JSONPath-like dotted paths a CRD's `subresources.scale` uses
/// (`.spec.replicas`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub selector: ScaleSelector,
}

/// How `Scale.status.selector` is derived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleSelector {
    /// Built-in workloads: a `metav1.LabelSelector` object at this path, rendered to a string
    /// (`app=x,tier in (a,b)`) as the real registry does.
    LabelSelectorAt(String),
    /// Custom resources: `labelSelectorPath`, a string field already in selector syntax.
    StringAt(String),
    /// No selector: `status.selector` is left empty.
    None,
}

/// One served resource (group, version, plural) and how it behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a `/status` subresource: writes to the main resource keep the stored status, and
    /// writes to `/status` keep everything else.
    pub status_subresource: bool,
    pub scale: Option<ScalePaths>,
    /// Built into Kubernetes (strategic merge patch accepted, list items carry no
    /// `apiVersion`/`kind`, unconditional updates allowed) rather than a custom resource.
    pub builtin: bool,
    /// Sets `metadata.generation` on create and bumps it when anything but metadata and status
    /// changes.
    pub tracks_generation: bool,
}

// === impl ResourceType ===

impl ResourceType {
    fn builtin(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            singular: kind.to_ascii_lowercase(),
            namespaced,
            short_names: Vec::new(),
            categories: Vec::new(),
            status_subresource: false,
            scale: None,
            builtin: true,
            tracks_generation: false,
        }
    }

    /// A custom resource (served as unstructured JSON; merge and JSON patch only).
    pub fn custom(group: &str, version: &str, kind: &str, plural: &str) -> Self {
        Self {
            builtin: false,
            tracks_generation: true,
            ..Self::builtin(group, version, kind, plural, true)
        }
    }

    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    pub fn with_scale(mut self, scale: ScalePaths) -> Self {
        self.scale = Some(scale);
        self
    }

    pub fn with_short_names(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn with_categories(mut self, categories: &[&str]) -> Self {
        self.categories = categories.iter().map(|s| s.to_string()).collect();
        self
    }

    /// `leaderworkerset.x-k8s.io/v1` `LeaderWorkerSet`, with the scale subresource its CRD
    /// declares (`.spec.replicas`, `.status.replicas`, `.status.hpaPodSelector`).
    pub fn leader_worker_set() -> Self {
        Self::custom(
            "leaderworkerset.x-k8s.io",
            "v1",
            "LeaderWorkerSet",
            "leaderworkersets",
        )
        .with_short_names(&["lws"])
        .with_status()
        .with_scale(ScalePaths {
            spec_replicas: ".spec.replicas".into(),
            status_replicas: ".status.replicas".into(),
            selector: ScaleSelector::StringAt(".status.hpaPodSelector".into()),
        })
    }

    /// `apiVersion` as written in objects (`apps/v1`, or `v1` for core).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, or `events` for the core group: the name the real server uses in
    /// messages ("deployments.apps \"x\" not found").
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub(crate) fn has_subresource(&self, sub: &str) -> bool {
        match sub {
            "status" => self.status_subresource,
            "scale" => self.scale.is_some(),
            _ => false,
        }
    }

    fn discovery_entries(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": VERBS,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": SUBRESOURCE_VERBS,
            }));
        }
        if self.scale.is_some() {
            out.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": SUBRESOURCE_VERBS,
            }));
        }
        out
    }

    fn aggregated_entry(&self) -> Value {
        let mut subresources = Vec::new();
        if self.status_subresource {
            subresources.push(json!({
                "subresource": "status",
                "responseKind": {"group": self.group, "version": self.version, "kind": self.kind},
                "verbs": SUBRESOURCE_VERBS,
            }));
        }
        if self.scale.is_some() {
            subresources.push(json!({
                "subresource": "scale",
                "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                "verbs": SUBRESOURCE_VERBS,
            }));
        }
        let mut entry = json!({
            "resource": self.plural,
            "responseKind": {"group": self.group, "version": self.version, "kind": self.kind},
            "scope": if self.namespaced { "Namespaced" } else { "Cluster" },
            "singularResource": self.singular,
            "verbs": VERBS,
        });
        if !self.short_names.is_empty() {
            entry["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            entry["categories"] = json!(self.categories);
        }
        if !subresources.is_empty() {
            entry["subresources"] = json!(subresources);
        }
        entry
    }
}

/// The built-in kinds flyball touches. Anything else is registered by a test
/// ([`crate::ApiServer::register`]) or by creating a CustomResourceDefinition through the API.
pub(crate) fn builtins() -> Vec<ResourceType> {
    let workload_scale = ScalePaths {
        spec_replicas: ".spec.replicas".into(),
        status_replicas: ".status.replicas".into(),
        selector: ScaleSelector::LabelSelectorAt(".spec.selector".into()),
    };
    vec![
        ResourceType::builtin("", "v1", "Namespace", "namespaces", false).with_short_names(&["ns"]),
        ResourceType::builtin("", "v1", "Event", "events", true).with_short_names(&["ev"]),
        ResourceType {
            tracks_generation: true,
            ..ResourceType::builtin("apps", "v1", "Deployment", "deployments", true)
                .with_short_names(&["deploy"])
                .with_categories(&["all"])
                .with_status()
                .with_scale(workload_scale.clone())
        },
        ResourceType {
            tracks_generation: true,
            ..ResourceType::builtin("apps", "v1", "StatefulSet", "statefulsets", true)
                .with_short_names(&["sts"])
                .with_categories(&["all"])
                .with_status()
                .with_scale(workload_scale)
        },
        ResourceType {
            tracks_generation: true,
            ..ResourceType::builtin(
                "autoscaling",
                "v2",
                "HorizontalPodAutoscaler",
                "horizontalpodautoscalers",
                true,
            )
            .with_short_names(&["hpa"])
            .with_categories(&["all"])
            .with_status()
        },
        ResourceType::builtin("coordination.k8s.io", "v1", "Lease", "leases", true),
        ResourceType::builtin("events.k8s.io", "v1", "Event", "events", true)
            .with_short_names(&["ev"]),
        ResourceType {
            tracks_generation: true,
            ..ResourceType::builtin(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                false,
            )
            .with_short_names(&["crd", "crds"])
            .with_status()
        },
    ]
}

/// `GET /api`.
pub(crate) fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_versions(table: &[ResourceType], group: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for rt in table.iter().filter(|rt| rt.group == group) {
        if !versions.contains(&rt.version) {
            versions.push(rt.version.clone());
        }
    }
    versions
}

fn api_group(table: &[ResourceType], group: &str) -> Value {
    let versions = group_versions(table, group);
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = entries.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": entries, "preferredVersion": preferred})
}

fn named_groups(table: &[ResourceType]) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for rt in table.iter().filter(|rt| !rt.group.is_empty()) {
        if !groups.contains(&rt.group) {
            groups.push(rt.group.clone());
        }
    }
    groups
}

/// `GET /apis`.
pub(crate) fn group_list(table: &[ResourceType]) -> Value {
    let groups: Vec<Value> = named_groups(table)
        .iter()
        .map(|g| api_group(table, g))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/{group}`, or `None` when no version of the group is served.
pub(crate) fn group(table: &[ResourceType], group: &str) -> Option<Value> {
    if group_versions(table, group).is_empty() {
        return None;
    }
    let mut g = api_group(table, group);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

/// `GET /api/v1` or `GET /apis/{group}/{version}`, or `None` when nothing is served there.
pub(crate) fn resource_list(table: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = table
        .iter()
        .filter(|rt| rt.group == group && rt.version == version)
        .flat_map(ResourceType::discovery_entries)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList`), served when the
/// client asks for it in `Accept`, as Kubernetes >= 1.30 does. `core` selects `/api` (the core
/// group only) rather than `/apis` (every named group).
pub(crate) fn aggregated(table: &[ResourceType], core: bool) -> Value {
    let groups: Vec<String> = if core {
        vec![String::new()]
    } else {
        named_groups(table)
    };
    let items: Vec<Value> = groups
        .iter()
        .map(|g| {
            let versions: Vec<Value> = group_versions(table, g)
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = table
                        .iter()
                        .filter(|rt| &rt.group == g && &rt.version == v)
                        .map(ResourceType::aggregated_entry)
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            let metadata = if g.is_empty() {
                json!({})
            } else {
                json!({"name": g})
            };
            json!({"metadata": metadata, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

/// The resource types a CustomResourceDefinition declares: one per served version.
pub(crate) fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let group = str_at(spec, &["group"]).ok_or("spec.group: Required value")?;
    let names = spec.get("names").ok_or("spec.names: Required value")?;
    let plural = str_at(names, &["plural"]).ok_or("spec.names.plural: Required value")?;
    let kind = str_at(names, &["kind"]).ok_or("spec.names.kind: Required value")?;
    let singular = str_at(names, &["singular"])
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_ascii_lowercase());
    let namespaced = match str_at(spec, &["scope"]) {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err("spec.scope: Unsupported value: must be Namespaced or Cluster".into()),
    };
    let strings = |key: &str| -> Vec<String> {
        names
            .get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .ok_or("spec.versions: Required value")?;
    let mut out = Vec::new();
    for v in versions {
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let version = str_at(v, &["name"]).ok_or("spec.versions[].name: Required value")?;
        let subresources = v.get("subresources");
        let status = subresources.and_then(|s| s.get("status")).is_some();
        let scale = subresources
            .and_then(|s| s.get("scale"))
            .map(|s| -> Result<ScalePaths, String> {
                Ok(ScalePaths {
                    spec_replicas: str_at(s, &["specReplicasPath"])
                        .ok_or("subresources.scale.specReplicasPath: Required value")?
                        .to_string(),
                    status_replicas: str_at(s, &["statusReplicasPath"])
                        .ok_or("subresources.scale.statusReplicasPath: Required value")?
                        .to_string(),
                    selector: str_at(s, &["labelSelectorPath"])
                        .map(|p| ScaleSelector::StringAt(p.to_string()))
                        .unwrap_or(ScaleSelector::None),
                })
            })
            .transpose()?;
        out.push(ResourceType {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            singular: singular.clone(),
            namespaced,
            short_names: strings("shortNames"),
            categories: strings("categories"),
            status_subresource: status,
            scale,
            builtin: false,
            tracks_generation: true,
        });
    }
    Ok(out)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(*key)?;
    }
    cur.as_str()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn apps_resource_list_names_the_scale_subresource_as_autoscaling_v1_scale() {
        let list = resource_list(&builtins(), "apps", "v1").unwrap();
        let scale = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "deployments/scale")
            .unwrap();
        assert_eq!(scale["group"], "autoscaling");
        assert_eq!(scale["version"], "v1");
        assert_eq!(scale["kind"], "Scale");
    }

    #[test]
    fn unknown_group_version_has_no_resource_list() {
        assert!(resource_list(&builtins(), "apps", "v1beta9").is_none());
    }

    #[test]
    fn crd_with_scale_subresource_becomes_a_scalable_resource_type() {
        let crd = json!({
            "spec": {
                "group": "example.dev", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true,
                     "subresources": {"status": {}, "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas"}}},
                    {"name": "v0", "served": false, "storage": false}
                ]
            }
        });
        let types = from_crd(&crd).unwrap();
        assert_eq!(types.len(), 1);
        assert_eq!(types[0].plural, "widgets");
        assert!(types[0].status_subresource);
        assert_eq!(
            types[0].scale.as_ref().unwrap().selector,
            ScaleSelector::None
        );
        assert_eq!(types[0].short_names, vec!["wd".to_string()]);
    }
}
