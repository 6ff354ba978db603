//! The object store and the semantics of each verb: resourceVersion, generation, status and
//! scale subresources, preconditions, defaults and validation.
//!
//! Everything here is synchronous and runs under the server's one lock, so every request is
//! atomic, as a single etcd transaction is for the real server.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, RandomState};

use serde_json::{Map, Value, json};

use crate::errors::ApiError;
use crate::fields::{self, ManagedEntry, Writer};
use crate::patch::{self, PatchError};
use crate::resources::{self, ResourceType, ScaleSelector};

/// Where an object lives. Storage is per (group, plural), shared by every served version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjKey {
    pub group: String,
    pub plural: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug)]
struct Stored {
    object: Value,
    managers: Vec<ManagedEntry>,
}

/// Content types a PATCH may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Merge,
    Strategic,
    Json,
    Apply { force: bool },
}

impl PatchKind {
    pub fn from_content_type(ct: &str, force: bool) -> Option<Self> {
        let media = ct.split(';').next().unwrap_or("").trim();
        Some(match media {
            "application/merge-patch+json" => Self::Merge,
            "application/strategic-merge-patch+json" => Self::Strategic,
            "application/json-patch+json" => Self::Json,
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Self::Apply { force }
            }
            _ => return None,
        })
    }
}

/// Who is writing, for managedFields.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub manager: String,
}

/// What a committed change did to its object, as a watch event's `type` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One committed change, kept so that watchers can replay it.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub resource_version: u64,
    pub key: ObjKey,
    pub change_type: ChangeType,
    /// As stored after the change; for a deletion, as last stored but carrying the deletion's
    /// resourceVersion, as the real server sends it.
    pub object: Value,
    /// As stored before the change (`None` for a creation): a watcher whose selector matched only
    /// the old object must see the change as a deletion.
    pub previous: Option<Value>,
}

/// How many changes the store keeps for watchers unless a test says otherwise.
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 1000;

pub(crate) struct Store {
    pub types: Vec<ResourceType>,
    objects: BTreeMap<ObjKey, Stored>,
    resource_version: u64,
    uid_counter: u64,
    uid_seed: RandomState,
    /// Every change, oldest first; each resourceVersion bump is exactly one change.
    history: VecDeque<Change>,
    history_limit: usize,
    /// Every change above this resourceVersion is still in `history`.
    history_floor: u64,
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn split_path(path: &str) -> Vec<String> {
    path.split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// `a=b,c in (d,e)`: `labels.Selector.String()` of a `metav1.LabelSelector`, requirements
/// sorted by key as the real registry renders `Scale.status.selector`.
fn render_label_selector(sel: &Value) -> String {
    let mut reqs: Vec<(String, String)> = Vec::new();
    if let Some(labels) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in labels {
            reqs.push((k.clone(), format!("{k}={}", v.as_str().unwrap_or(""))));
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let mut values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            values.sort_unstable();
            let rendered = match e.get("operator").and_then(Value::as_str) {
                Some("In") => format!("{key} in ({})", values.join(",")),
                Some("NotIn") => format!("{key} notin ({})", values.join(",")),
                Some("Exists") => key.clone(),
                Some("DoesNotExist") => format!("!{key}"),
                _ => continue,
            };
            reqs.push((key, rendered));
        }
    }
    reqs.sort();
    reqs.into_iter()
        .map(|(_, r)| r)
        .collect::<Vec<_>>()
        .join(",")
}

/// A request's `labelSelector` and `fieldSelector`, checked as list and watch check them.
#[derive(Debug)]
pub(crate) struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Selector {
    pub fn parse(
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Self, ApiError> {
        let labels = parse_selector(label_selector.unwrap_or("")).map_err(ApiError::bad_request)?;
        let fields = parse_selector(field_selector.unwrap_or("")).map_err(ApiError::bad_request)?;
        for r in &fields {
            let key = match r {
                Requirement::Eq(k, _) | Requirement::NotEq(k, _) => k,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "invalid field selector requirement {other:?}: only =, == and != are supported"
                    )));
                }
            };
            if key != "metadata.name" && key != "metadata.namespace" {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {key}"
                )));
            }
        }
        Ok(Self { labels, fields })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        matches(&self.labels, |k| {
            obj.get("metadata")?
                .get("labels")?
                .get(k)?
                .as_str()
                .map(str::to_string)
        }) && matches(&self.fields, |k| {
            meta_str(obj, k.trim_start_matches("metadata.")).map(str::to_string)
        })
    }
}

/// A parsed `labelSelector` / `fieldSelector` requirement.
#[derive(Debug)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn parse_selector(s: &str) -> Result<Vec<Requirement>, String> {
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("unable to parse requirement: {s:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    let mut reqs = Vec::new();
    for part in split_top_level(s) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let req = if let Some((k, v)) = part.split_once("!=") {
            Requirement::NotEq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==") {
            Requirement::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('=') {
            Requirement::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = part.split_once(" notin ") {
            Requirement::NotIn(k.trim().into(), set(rest)?)
        } else if let Some((k, rest)) = part.split_once(" in ") {
            Requirement::In(k.trim().into(), set(rest)?)
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::NotExists(k.trim().into())
        } else {
            Requirement::Exists(part.into())
        };
        reqs.push(req);
    }
    Ok(reqs)
}

fn matches(reqs: &[Requirement], lookup: impl Fn(&str) -> Option<String>) -> bool {
    reqs.iter().all(|r| match r {
        Requirement::Eq(k, v) => lookup(k).as_deref() == Some(v.as_str()),
        Requirement::NotEq(k, v) => lookup(k).as_deref() != Some(v.as_str()),
        Requirement::In(k, vs) => lookup(k).is_some_and(|x| vs.contains(&x)),
        Requirement::NotIn(k, vs) => !lookup(k).is_some_and(|x| vs.contains(&x)),
        Requirement::Exists(k) => lookup(k).is_some(),
        Requirement::NotExists(k) => lookup(k).is_none(),
    })
}

/// RFC 1123 subdomain, the rule for most object names.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// Set `metadata.<field>`, creating `metadata` if needed. `obj` must be an object (callers check
/// bodies with [`require_object`] first).
fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if let Value::Object(root) = obj {
        let meta = root
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            *meta = Value::Object(Map::new());
        }
        if let Value::Object(m) = meta {
            m.insert(field.to_string(), value);
        }
    }
}

fn remove_meta(obj: &mut Value, field: &str) {
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        m.remove(field);
    }
}

fn require_object(obj: &Value) -> Result<(), ApiError> {
    if obj.is_object() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "the object provided is not a JSON object: {obj}"
        )))
    }
}

/// Everything but metadata and status: what `metadata.generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

/// The object without the fields a no-op write would still differ in.
fn comparable(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(Value::Object(m)) = v.get_mut("metadata") {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    v
}

fn patch_error(e: PatchError) -> ApiError {
    match e {
        PatchError::Invalid(msg) => ApiError::unprocessable(msg),
        PatchError::Unsupported(msg) => {
            ApiError::internal(&format!("flyball fake apiserver does not implement {msg}"))
        }
    }
}

/// Parse a request body; YAML is accepted only for apply, as on the real server.
pub(crate) fn parse_body(body: &[u8], yaml: bool) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(json_err) if yaml => serde_yaml_ng::from_slice::<Value>(body).map_err(|e| {
            ApiError::bad_request(format!("error decoding YAML: {e} (as JSON: {json_err})"))
        }),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))),
    }
}

// === impl Store ===

impl Store {
    pub fn new() -> Self {
        let mut store = Self {
            types: resources::builtins(),
            objects: BTreeMap::new(),
            resource_version: 1000,
            uid_counter: 0,
            uid_seed: RandomState::new(),
            history: VecDeque::new(),
            history_limit: DEFAULT_HISTORY_LIMIT,
            history_floor: 1000,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            // Cannot fail: the namespace type is built in and the names are valid.
            let _ = store.ensure_namespace(ns);
        }
        store
    }

    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|rt| rt.group == group && rt.version == version && rt.plural == plural)
            .cloned()
    }

    pub fn lookup_kind(&self, api_version: &str, kind: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|rt| rt.api_version() == api_version && rt.kind == kind)
            .cloned()
    }

    pub fn register(&mut self, rt: ResourceType) {
        self.types
            .retain(|t| !(t.group == rt.group && t.version == rt.version && t.plural == rt.plural));
        self.types.push(rt);
    }

    fn uid(&mut self) -> String {
        self.uid_counter += 1;
        let a = self.uid_seed.hash_one(self.uid_counter);
        let b = self.uid_seed.hash_one(!self.uid_counter);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }

    pub fn current_resource_version(&self) -> String {
        self.resource_version.to_string()
    }

    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    // --- change history, for watchers ---

    fn record(
        &mut self,
        change_type: ChangeType,
        key: ObjKey,
        object: Value,
        previous: Option<Value>,
    ) {
        self.history.push_back(Change {
            resource_version: self.resource_version,
            key,
            change_type,
            object,
            previous,
        });
        self.trim_history();
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.history_floor = dropped.resource_version;
            }
        }
    }

    /// Keep only the last `events` changes from now on.
    pub fn set_history_limit(&mut self, events: usize) {
        self.history_limit = events;
        self.trim_history();
    }

    /// Every change above this resourceVersion is kept; a watch from below it is too old.
    pub fn history_floor(&self) -> u64 {
        self.history_floor
    }

    /// Every kept change after `resource_version`, oldest first.
    pub fn changes_after(&self, resource_version: u64) -> impl Iterator<Item = &Change> {
        let start = self
            .history
            .partition_point(|c| c.resource_version <= resource_version);
        self.history.range(start..)
    }

    fn key(rt: &ResourceType, namespace: Option<&str>, name: &str) -> ObjKey {
        ObjKey {
            group: rt.group.clone(),
            plural: rt.plural.clone(),
            namespace: if rt.namespaced {
                namespace.unwrap_or("").to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects.contains_key(&ObjKey {
            group: String::new(),
            plural: "namespaces".into(),
            namespace: String::new(),
            name: ns.into(),
        })
    }

    pub fn ensure_namespace(&mut self, ns: &str) -> Result<(), ApiError> {
        if self.namespace_exists(ns) {
            return Ok(());
        }
        let Some(rt) = self.lookup("", "v1", "namespaces") else {
            return Err(ApiError::internal("namespaces are not registered"));
        };
        let caller = Caller {
            manager: "flyball-fake-apiserver".into(),
        };
        self.create(&rt, None, json!({"metadata": {"name": ns}}), &caller)
            .map(|_| ())
    }

    /// The object as served at `rt`'s version.
    pub fn present(rt: &ResourceType, obj: &Value) -> Value {
        let mut out = obj.clone();
        out["apiVersion"] = json!(rt.api_version());
        out["kind"] = json!(rt.kind);
        out
    }

    fn stored(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<&Stored, ApiError> {
        self.objects
            .get(&Self::key(rt, namespace, name))
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    pub fn get(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        Ok(Self::present(rt, &self.stored(rt, namespace, name)?.object))
    }

    /// The stored objects of `rt`, in `namespace` when given, in key order.
    pub fn objects_of<'a>(
        &'a self,
        rt: &'a ResourceType,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |(k, _)| k.group == rt.group && k.plural == rt.plural)
            .filter(move |(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, s)| &s.object)
    }

    pub fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Value, ApiError> {
        let selector = Selector::parse(label_selector, field_selector)?;
        let items: Vec<Value> = self
            .objects_of(rt, namespace)
            .filter(|o| selector.matches(o))
            .map(|o| {
                // Built-in lists carry no apiVersion/kind on items; custom resources do.
                if rt.builtin {
                    let mut o = o.clone();
                    if let Value::Object(m) = &mut o {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    o
                } else {
                    Self::present(rt, o)
                }
            })
            .collect();
        Ok(json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.api_version(),
            "metadata": {"resourceVersion": self.current_resource_version()},
            "items": items,
        }))
    }

    fn defaults(rt: &ResourceType, obj: &mut Value) {
        let workload =
            rt.group == "apps" && (rt.plural == "deployments" || rt.plural == "statefulsets");
        if workload && obj.pointer("/spec/replicas").is_none() {
            if !obj.get("spec").is_some_and(Value::is_object) {
                obj["spec"] = json!({});
            }
            obj["spec"]["replicas"] = json!(1);
        }
        if rt.plural == "horizontalpodautoscalers"
            && obj.get("spec").is_some_and(Value::is_object)
            && obj.pointer("/spec/minReplicas").is_none()
        {
            obj["spec"]["minReplicas"] = json!(1);
        }
        if rt.group.is_empty() && rt.plural == "namespaces" {
            if obj.pointer("/spec/finalizers").is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            obj["status"] = json!({"phase": "Active"});
        }
    }

    fn validate(rt: &ResourceType, obj: &Value, name: &str) -> Result<(), ApiError> {
        let workload =
            rt.group == "apps" && (rt.plural == "deployments" || rt.plural == "statefulsets");
        if workload
            && let Some(r) = obj.pointer("/spec/replicas")
            && !r
                .as_i64()
                .is_some_and(|r| (0..=i64::from(i32::MAX)).contains(&r))
        {
            return Err(ApiError::invalid(
                &format!("{}.{}", rt.kind, rt.group),
                &rt.group,
                name,
                "spec.replicas",
                format!("Invalid value: {r}: must be greater than or equal to 0"),
            ));
        }
        if rt.group == "events.k8s.io" {
            Self::validate_event_lengths(rt, obj, name)?;
        }
        Ok(())
    }

    /// The length limits `legacyValidateEvent` (pkg/apis/core/validation/events.go) puts on an
    /// `events.k8s.io` Event; Go's `len`, so bytes. The note is stored as the internal
    /// `message`, which is the field the real error names.
    fn validate_event_lengths(rt: &ResourceType, obj: &Value, name: &str) -> Result<(), ApiError> {
        const LIMITS: [(&str, &str, usize); 4] = [
            ("reportingInstance", "reportingInstance", 128),
            ("action", "action", 128),
            ("reason", "reason", 128),
            ("note", "message", 1024),
        ];
        for (field, named, limit) in LIMITS {
            if obj
                .get(field)
                .and_then(Value::as_str)
                .is_some_and(|v| v.len() > limit)
            {
                return Err(ApiError::invalid(
                    &format!("{}.{}", rt.kind, rt.group),
                    &rt.group,
                    name,
                    named,
                    format!("Invalid value: \"\": can have at most {limit} characters"),
                ));
            }
        }
        Ok(())
    }

    /// Set the server-owned metadata, decide whether anything changed, and store.
    /// Returns the stored object (unchanged, with the old resourceVersion, on a no-op write).
    fn commit(
        &mut self,
        rt: &ResourceType,
        key: ObjKey,
        mut new: Value,
        managers: Vec<ManagedEntry>,
    ) -> Value {
        let old = self.objects.get(&key).cloned();
        let uid = match &old {
            Some(o) => meta_str(&o.object, "uid").unwrap_or("").to_string(),
            None => self.uid(),
        };
        let created = match &old {
            Some(o) => meta_str(&o.object, "creationTimestamp")
                .unwrap_or("")
                .to_string(),
            None => now(),
        };
        new["apiVersion"] = json!(rt.api_version());
        new["kind"] = json!(rt.kind);
        set_meta(&mut new, "name", json!(key.name));
        if rt.namespaced {
            set_meta(&mut new, "namespace", json!(key.namespace));
        } else {
            remove_meta(&mut new, "namespace");
        }
        remove_meta(&mut new, "generateName");
        set_meta(&mut new, "uid", json!(uid));
        set_meta(&mut new, "creationTimestamp", json!(created));
        if rt.tracks_generation {
            let generation = match &old {
                None => 1,
                Some(o) => {
                    let prev = o
                        .object
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64)
                        .unwrap_or(1);
                    if spec_part(&o.object) == spec_part(&new) {
                        prev
                    } else {
                        prev + 1
                    }
                }
            };
            set_meta(&mut new, "generation", json!(generation));
        }
        if let Some(o) = &old
            && comparable(&o.object) == comparable(&new)
        {
            return o.object.clone();
        }
        self.resource_version += 1;
        set_meta(
            &mut new,
            "resourceVersion",
            json!(self.resource_version.to_string()),
        );
        if managers.is_empty() {
            remove_meta(&mut new, "managedFields");
        } else {
            set_meta(&mut new, "managedFields", fields::render(&managers));
        }
        if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
            self.establish_crd(&mut new);
        }
        self.objects.insert(
            key.clone(),
            Stored {
                object: new.clone(),
                managers,
            },
        );
        let (change_type, previous) = match old {
            Some(o) => (ChangeType::Modified, Some(o.object)),
            None => (ChangeType::Added, None),
        };
        self.record(change_type, key, new.clone(), previous);
        new
    }

    /// CRDs are established at once: register what they serve and say so in their status.
    fn establish_crd(&mut self, crd: &mut Value) {
        if let Ok(types) = resources::from_crd(crd) {
            for rt in types {
                self.register(rt);
            }
        }
        let t = now();
        crd["status"] = json!({
            "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or(json!({})),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": t},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": t},
            ],
            "storedVersions": crd.pointer("/spec/versions").and_then(Value::as_array)
                .map(|vs| vs.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                    .filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>())
                .unwrap_or_default(),
        });
    }

    fn check_kind(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str);
        let kind = obj.get("kind").and_then(Value::as_str);
        if let Some(k) = kind
            && k != rt.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind of the provided object ({k}) does not match the kind of the request ({})",
                rt.kind
            )));
        }
        if let Some(v) = api_version
            && v != rt.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                rt.api_version()
            )));
        }
        Ok(())
    }

    pub fn create(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        obj: Value,
        caller: &Caller,
    ) -> Result<Value, ApiError> {
        self.create_managed(rt, namespace, obj, caller, None)
    }

    /// `apply_managers`: the managedFields a server-side apply computed, which own the fields as
    /// Apply instead of the Update entry a create records for `caller`.
    fn create_managed(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        mut obj: Value,
        caller: &Caller,
        apply_managers: Option<Vec<ManagedEntry>>,
    ) -> Result<Value, ApiError> {
        require_object(&obj)?;
        Self::check_kind(rt, &obj)?;
        let body_ns = meta_str(&obj, "namespace").map(str::to_string);
        if rt.namespaced
            && let (Some(b), Some(p)) = (&body_ns, namespace)
            && b != p
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
                    .into(),
            ));
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(prefix)) => {
                let suffix = format!("{:x}", self.uid_seed.hash_one(self.uid_counter + 7));
                self.uid_counter += 1;
                format!("{prefix}{}", &suffix[..5.min(suffix.len())])
            }
            _ => {
                return Err(ApiError::invalid(
                    &format!("{}.{}", rt.kind, rt.group),
                    &rt.group,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required".into(),
                ));
            }
        };
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                &format!("{}.{}", rt.kind, rt.group),
                &rt.group,
                &name,
                "metadata.name",
                format!(
                    "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case \
                     alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            ));
        }
        if rt.namespaced {
            let Some(ns) = namespace else {
                return Err(ApiError::method_not_allowed("POST"));
            };
            if !self.namespace_exists(ns) {
                return Err(ApiError::namespace_not_found(ns));
            }
        }
        let key = Self::key(rt, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        if rt.status_subresource {
            // Status is the controller's to write, through /status.
            if let Value::Object(m) = &mut obj {
                m.remove("status");
            }
            if rt.builtin {
                obj["status"] = json!({});
            }
        }
        Self::defaults(rt, &mut obj);
        Self::validate(rt, &obj, &name)?;
        let managers = match apply_managers {
            Some(managers) => managers,
            None => {
                let mut managers = Vec::new();
                let t = now();
                fields::record_update(
                    &mut managers,
                    &Writer {
                        manager: &caller.manager,
                        api_version: &rt.api_version(),
                        subresource: None,
                        now: &t,
                    },
                    &Value::Null,
                    &obj,
                );
                managers
            }
        };
        Ok(Self::present(rt, &self.commit(rt, key, obj, managers)))
    }

    /// Merge a candidate for `sub` into the stored object the way the real registries do:
    /// main-resource writes keep the stored status, status writes keep everything else.
    fn merge_for_subresource(
        rt: &ResourceType,
        old: &Value,
        candidate: Value,
        sub: Option<&str>,
    ) -> Value {
        match sub {
            Some("status") => {
                let mut new = old.clone();
                match candidate.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Value::Object(m) = &mut new {
                            m.remove("status");
                        }
                    }
                }
                new
            }
            _ if rt.status_subresource => {
                let mut new = candidate;
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Value::Object(m) = &mut new {
                            m.remove("status");
                        }
                    }
                }
                new
            }
            _ => candidate,
        }
    }

    pub fn replace(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        sub: Option<&str>,
        obj: Value,
        caller: &Caller,
    ) -> Result<Value, ApiError> {
        if sub == Some("scale") {
            return self.replace_scale(rt, namespace, name, obj, caller);
        }
        require_object(&obj)?;
        Self::check_kind(rt, &obj)?;
        if let Some(body_name) = meta_str(&obj, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let stored = self.stored(rt, namespace, name)?.clone();
        match meta_str(&obj, "resourceVersion") {
            Some(rv)
                if !rv.is_empty() && Some(rv) != meta_str(&stored.object, "resourceVersion") =>
            {
                return Err(ApiError::conflict(rt, name));
            }
            Some(rv) if !rv.is_empty() => {}
            // Custom resources refuse unconditional updates; built-ins allow them.
            _ if !rt.builtin => {
                return Err(ApiError::invalid(
                    &format!("{}.{}", rt.kind, rt.group),
                    &rt.group,
                    name,
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update".into(),
                ));
            }
            _ => {}
        }
        self.write(rt, namespace, name, sub, &stored, obj, caller)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        sub: Option<&str>,
        stored: &Stored,
        candidate: Value,
        caller: &Caller,
    ) -> Result<Value, ApiError> {
        let mut new = Self::merge_for_subresource(rt, &stored.object, candidate, sub);
        if sub.is_none() {
            Self::defaults(rt, &mut new);
        }
        Self::validate(rt, &new, name)?;
        let mut managers = stored.managers.clone();
        let t = now();
        fields::record_update(
            &mut managers,
            &Writer {
                manager: &caller.manager,
                api_version: &rt.api_version(),
                subresource: sub,
                now: &t,
            },
            &stored.object,
            &new,
        );
        let key = Self::key(rt, namespace, name);
        Ok(Self::present(rt, &self.commit(rt, key, new, managers)))
    }

    /// Returns the HTTP status (201 when an apply created the object) and the object.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        sub: Option<&str>,
        kind: PatchKind,
        body: &Value,
        caller: &Caller,
    ) -> Result<(u16, Value), ApiError> {
        if kind == PatchKind::Strategic && !rt.builtin && sub != Some("scale") {
            return Err(ApiError::unsupported_media_type(
                "application/strategic-merge-patch+json",
                &[
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/apply-patch+yaml",
                ],
            ));
        }
        if sub == Some("scale") {
            return self
                .patch_scale(rt, namespace, name, kind, body, caller)
                .map(|v| (200, v));
        }
        if let PatchKind::Apply { force } = kind {
            return self.apply(rt, namespace, name, sub, body, force, caller);
        }
        let stored = self.stored(rt, namespace, name)?.clone();
        let mut candidate = stored.object.clone();
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut candidate, body),
            PatchKind::Strategic => {
                patch::strategic_merge_patch(&mut candidate, body).map_err(patch_error)?
            }
            PatchKind::Json => patch::json_patch(&mut candidate, body).map_err(patch_error)?,
            PatchKind::Apply { .. } => {}
        }
        require_object(&candidate)?;
        if meta_str(&candidate, "resourceVersion") != meta_str(&stored.object, "resourceVersion") {
            return Err(ApiError::conflict(rt, name));
        }
        if meta_str(&candidate, "name") != Some(name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&candidate, "name").unwrap_or("")
            )));
        }
        Self::check_kind(rt, &candidate)?;
        self.write(rt, namespace, name, sub, &stored, candidate, caller)
            .map(|v| (200, v))
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        sub: Option<&str>,
        config: &Value,
        force: bool,
        caller: &Caller,
    ) -> Result<(u16, Value), ApiError> {
        require_object(config)?;
        for field in ["apiVersion", "kind"] {
            if config
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(ApiError::bad_request(format!(
                    "invalid object type: {field} must be set"
                )));
            }
        }
        Self::check_kind(rt, config)?;
        if let Some(n) = meta_str(config, "name")
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        let existing = self.objects.get(&Self::key(rt, namespace, name)).cloned();
        let live = existing
            .as_ref()
            .map(|s| s.object.clone())
            .unwrap_or(Value::Null);
        let mut managers = existing
            .as_ref()
            .map(|s| s.managers.clone())
            .unwrap_or_default();
        let t = now();
        let writer = Writer {
            manager: &caller.manager,
            api_version: &rt.api_version(),
            subresource: sub,
            now: &t,
        };
        let candidate =
            fields::apply(&mut managers, &writer, &live, config, force).map_err(|conflicts| {
                let pairs: Vec<(String, String)> = conflicts
                    .iter()
                    .map(|c| (c.manager.clone(), c.field.clone()))
                    .collect();
                ApiError::apply_conflict(fields::conflict_message(&conflicts), &pairs)
            })?;
        match existing {
            Some(stored) => {
                if meta_str(&candidate, "resourceVersion")
                    != meta_str(&stored.object, "resourceVersion")
                {
                    return Err(ApiError::conflict(rt, name));
                }
                let mut new = Self::merge_for_subresource(rt, &stored.object, candidate, sub);
                if sub.is_none() {
                    Self::defaults(rt, &mut new);
                }
                Self::validate(rt, &new, name)?;
                let key = Self::key(rt, namespace, name);
                Ok((200, Self::present(rt, &self.commit(rt, key, new, managers))))
            }
            None => {
                if sub.is_some() {
                    return Err(ApiError::not_found(rt, name));
                }
                let mut obj = candidate;
                set_meta(&mut obj, "name", json!(name));
                let created = self.create_managed(rt, namespace, obj, caller, Some(managers))?;
                Ok((201, created))
            }
        }
    }

    pub fn delete(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = Self::key(rt, namespace, name);
        let Some(stored) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(rt, name));
        };
        // What the namespace controller and the CRD finalizer would delete, each its own change,
        // before the owner goes.
        let mut contents: Vec<ObjKey> = Vec::new();
        if rt.group.is_empty() && rt.plural == "namespaces" {
            contents.extend(self.objects.keys().filter(|k| k.namespace == name).cloned());
        }
        if rt.group == "apiextensions.k8s.io"
            && rt.plural == "customresourcedefinitions"
            && let Ok(types) = resources::from_crd(&stored.object)
        {
            for t in &types {
                self.types
                    .retain(|x| !(x.group == t.group && x.plural == t.plural));
                contents.extend(
                    self.objects
                        .keys()
                        .filter(|k| k.group == t.group && k.plural == t.plural)
                        .cloned(),
                );
            }
        }
        for k in contents {
            self.remove(k);
        }
        self.remove(key);
        let mut details = json!({"name": name, "group": rt.group, "kind": rt.plural});
        if let Some(uid) = meta_str(&stored.object, "uid") {
            details["uid"] = json!(uid);
        }
        Ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }))
    }

    fn remove(&mut self, key: ObjKey) {
        let Some(stored) = self.objects.remove(&key) else {
            return;
        };
        self.resource_version += 1;
        let mut last = stored.object.clone();
        set_meta(
            &mut last,
            "resourceVersion",
            json!(self.resource_version.to_string()),
        );
        self.record(ChangeType::Deleted, key, last, Some(stored.object));
    }

    // --- scale subresource ---

    fn scale_of(rt: &ResourceType, obj: &Value) -> Result<Value, ApiError> {
        let Some(paths) = &rt.scale else {
            return Err(ApiError::path_not_found());
        };
        let int_at = |path: &str| -> i64 {
            fields::value_at(obj, &split_path(path))
                .and_then(Value::as_i64)
                .unwrap_or(0)
        };
        let spec_replicas = int_at(&paths.spec_replicas);
        let status_replicas = int_at(&paths.status_replicas);
        let selector = match &paths.selector {
            ScaleSelector::LabelSelectorAt(p) => fields::value_at(obj, &split_path(p))
                .map(render_label_selector)
                .unwrap_or_default(),
            ScaleSelector::StringAt(p) => fields::value_at(obj, &split_path(p))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            ScaleSelector::None => String::new(),
        };
        let mut metadata = json!({});
        for field in [
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "creationTimestamp",
        ] {
            if let Some(v) = meta_str(obj, field) {
                metadata[field] = json!(v);
            }
        }
        // autoscaling/v1 ScaleSpec.replicas is `omitempty`: zero replicas serialize as `{}`.
        let spec = if spec_replicas == 0 {
            json!({})
        } else {
            json!({"replicas": spec_replicas})
        };
        let mut status = json!({"replicas": status_replicas});
        if !selector.is_empty() {
            status["selector"] = json!(selector);
        }
        Ok(json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": metadata,
            "spec": spec,
            "status": status,
        }))
    }

    pub fn get_scale(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        if rt.scale.is_none() {
            return Err(ApiError::path_not_found());
        }
        Self::scale_of(rt, &self.stored(rt, namespace, name)?.object)
    }

    fn patch_scale(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &Value,
        caller: &Caller,
    ) -> Result<Value, ApiError> {
        if rt.scale.is_none() {
            return Err(ApiError::path_not_found());
        }
        let stored = self.stored(rt, namespace, name)?.clone();
        let mut scale = Self::scale_of(rt, &stored.object)?;
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut scale, body),
            PatchKind::Strategic => {
                patch::strategic_merge_patch(&mut scale, body).map_err(patch_error)?
            }
            PatchKind::Json => patch::json_patch(&mut scale, body).map_err(patch_error)?,
            PatchKind::Apply { .. } => {
                return Err(ApiError::internal(
                    "flyball fake apiserver does not implement server-side apply on /scale",
                ));
            }
        }
        require_object(&scale)?;
        self.write_scale(rt, namespace, name, &stored, scale, caller)
    }

    fn replace_scale(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        scale: Value,
        caller: &Caller,
    ) -> Result<Value, ApiError> {
        if rt.scale.is_none() {
            return Err(ApiError::path_not_found());
        }
        let stored = self.stored(rt, namespace, name)?.clone();
        if let Some(body_name) = meta_str(&scale, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        require_object(&scale)?;
        let mut scale = scale;
        if meta_str(&scale, "resourceVersion").is_none_or(str::is_empty) {
            // Unconditional update of the scale is allowed.
            let rv = meta_str(&stored.object, "resourceVersion")
                .unwrap_or("")
                .to_string();
            set_meta(&mut scale, "resourceVersion", json!(rv));
        }
        self.write_scale(rt, namespace, name, &stored, scale, caller)
    }

    fn write_scale(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        stored: &Stored,
        scale: Value,
        caller: &Caller,
    ) -> Result<Value, ApiError> {
        if meta_str(&scale, "resourceVersion") != meta_str(&stored.object, "resourceVersion") {
            return Err(ApiError::conflict(rt, name));
        }
        let replicas = match scale.pointer("/spec/replicas") {
            None | Some(Value::Null) => 0,
            Some(v) => match v.as_i64() {
                Some(r) if r >= 0 && r <= i64::from(i32::MAX) => r,
                _ => {
                    return Err(ApiError::invalid(
                        "Scale.autoscaling",
                        "autoscaling",
                        name,
                        "spec.replicas",
                        format!("Invalid value: {v}: must be greater than or equal to 0"),
                    ));
                }
            },
        };
        let Some(paths) = &rt.scale else {
            return Err(ApiError::path_not_found());
        };
        let mut new = stored.object.clone();
        let path = split_path(&paths.spec_replicas);
        let mut cur = &mut new;
        for (i, key) in path.iter().enumerate() {
            if i + 1 == path.len() {
                cur[key.as_str()] = json!(replicas);
            } else {
                if !cur.get(key.as_str()).is_some_and(Value::is_object) {
                    cur[key.as_str()] = json!({});
                }
                cur = &mut cur[key.as_str()];
            }
        }
        let mut managers = stored.managers.clone();
        let t = now();
        fields::record_update(
            &mut managers,
            &Writer {
                manager: &caller.manager,
                api_version: &rt.api_version(),
                subresource: Some("scale"),
                now: &t,
            },
            &stored.object,
            &new,
        );
        let key = Self::key(rt, namespace, name);
        let written = self.commit(rt, key, new, managers);
        Self::scale_of(rt, &written)
    }

    // --- direct access for test helpers (no HTTP, no RBAC, status kept) ---

    /// Store `obj` as a controller would have left it, status included.
    pub fn seed(&mut self, mut obj: Value) -> Result<Value, ApiError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let Some(rt) = self.lookup_kind(api_version, kind) else {
            return Err(ApiError::bad_request(format!(
                "no resource is registered for {api_version} {kind}"
            )));
        };
        let namespace = meta_str(&obj, "namespace").map(str::to_string);
        if let Some(ns) = &namespace {
            self.ensure_namespace(ns)?;
        }
        let name = meta_str(&obj, "name").unwrap_or("").to_string();
        let status = obj.get("status").cloned();
        let caller = Caller {
            manager: "flyball-fake-apiserver".into(),
        };
        if let Value::Object(m) = &mut obj {
            m.remove("status");
        }
        self.create(&rt, namespace.as_deref(), obj, &caller)?;
        match status {
            Some(s) => self.set_status(&rt, namespace.as_deref(), &name, s),
            None => self.get(&rt, namespace.as_deref(), &name),
        }
    }

    /// Replace the status of a stored object, as its controller would.
    pub fn set_status(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<Value, ApiError> {
        let stored = self.stored(rt, namespace, name)?.clone();
        let mut new = stored.object.clone();
        new["status"] = status;
        let caller = Caller {
            manager: "flyball-fake-controller".into(),
        };
        self.write(rt, namespace, name, Some("status"), &stored, new, &caller)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn label_selector_renders_sorted_like_the_real_registry() {
        let sel = json!({
            "matchLabels": {"b": "2", "a": "1"},
            "matchExpressions": [{"key": "c", "operator": "In", "values": ["y", "x"]}]
        });
        assert_eq!(render_label_selector(&sel), "a=1,b=2,c in (x,y)");
    }

    #[test]
    fn selector_parsing_handles_sets_and_existence() {
        let reqs = parse_selector("app=x,tier in (a,b),!legacy").unwrap();
        let labels = |k: &str| match k {
            "app" => Some("x".to_string()),
            "tier" => Some("b".to_string()),
            _ => None,
        };
        assert!(matches(&reqs, labels));
    }

    fn leases(store: &Store) -> ResourceType {
        store.lookup("coordination.k8s.io", "v1", "leases").unwrap()
    }

    fn caller() -> Caller {
        Caller {
            manager: "test".into(),
        }
    }

    fn lease(name: &str, holder: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"holderIdentity": holder}})
    }

    fn history(store: &Store, after: u64) -> Vec<(ChangeType, u64, String)> {
        store
            .changes_after(after)
            .map(|c| (c.change_type, c.resource_version, c.key.name.clone()))
            .collect()
    }

    #[test]
    fn every_committed_change_is_one_event_and_no_op_writes_are_none() {
        let mut store = Store::new();
        let rt = leases(&store);
        let from = store.resource_version();
        let ns = Some("default");
        store.create(&rt, ns, lease("l", "a"), &caller()).unwrap();
        let patch = json!({"spec": {"holderIdentity": "b"}});
        for _ in 0..2 {
            store
                .patch(&rt, ns, "l", None, PatchKind::Merge, &patch, &caller())
                .unwrap();
        }
        store.delete(&rt, ns, "l").unwrap();
        use ChangeType::*;
        assert_eq!(
            history(&store, from),
            [
                (Added, from + 1, "l".into()),
                (Modified, from + 2, "l".into()),
                (Deleted, from + 3, "l".into())
            ]
        );
        assert_eq!(store.resource_version(), from + 3);
        let deleted = store.changes_after(from + 2).next().unwrap();
        let rv_of = |v: &Value| v["metadata"]["resourceVersion"].clone();
        assert_eq!(rv_of(&deleted.object), json!((from + 3).to_string()));
        assert_eq!(
            rv_of(deleted.previous.as_ref().unwrap()),
            json!((from + 2).to_string())
        );
    }

    #[test]
    fn deleting_a_namespace_deletes_its_objects_first_each_at_its_own_resource_version() {
        let mut store = Store::new();
        let rt = leases(&store);
        store.ensure_namespace("team").unwrap();
        for name in ["a", "b"] {
            store
                .create(&rt, Some("team"), lease(name, "x"), &caller())
                .unwrap();
        }
        let from = store.resource_version();
        let namespaces = store.lookup("", "v1", "namespaces").unwrap();
        store.delete(&namespaces, None, "team").unwrap();
        use ChangeType::Deleted;
        assert_eq!(
            history(&store, from),
            [
                (Deleted, from + 1, "a".into()),
                (Deleted, from + 2, "b".into()),
                (Deleted, from + 3, "team".into())
            ]
        );
    }

    #[test]
    fn trimming_the_history_moves_the_floor_to_the_last_dropped_change() {
        let mut store = Store::new();
        let newest = store.resource_version();
        assert!(store.history_floor() < newest);
        store.set_history_limit(1);
        assert_eq!(store.history_floor(), newest - 1);
        assert_eq!(history(&store, 0).len(), 1);
        store.set_history_limit(0);
        assert_eq!(store.history_floor(), newest);
        assert!(history(&store, 0).is_empty());
    }

    #[test]
    fn names_follow_rfc_1123_subdomains() {
        assert!(valid_name("vllm-decode.v1"));
        assert!(!valid_name("Bad_Name"));
        assert!(!valid_name("-leading"));
    }
}
