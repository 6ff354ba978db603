//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! A reduced model of Kubernetes' structured-merge-diff, enough for what flyball's callers do
//! (`kube-lease-manager` takes the Lease with an apply and renews it with strategic patches):
//! - fields are leaf paths; lists are atomic (owned and compared as a whole);
//! - an update (create, PUT, non-apply PATCH) gives the writer the fields it changed and takes
//!   them from every other manager, never conflicting;
//! - an apply sets the fields of its configuration, removes the fields this manager applied
//!   before and no longer does (unless someone else owns them), and without `force` fails with
//!   409 Conflict when it would change a field another manager owns.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

pub type FieldPath = Vec<String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Apply,
    Update,
}

#[derive(Clone, Debug)]
pub struct ManagedEntry {
    pub manager: String,
    pub operation: Operation,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: BTreeSet<FieldPath>,
}

/// One field an apply would change that another manager owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub operation: Operation,
    pub api_version: String,
    /// `.spec.holderIdentity`
    pub field: String,
}

/// Fields the server maintains itself; nobody owns them.
fn is_system(path: &[String]) -> bool {
    match path {
        [first] => first == "apiVersion" || first == "kind",
        [meta, field, ..] if meta == "metadata" => matches!(
            field.as_str(),
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "managedFields"
                | "selfLink"
                | "deletionTimestamp"
        ),
        _ => false,
    }
}

/// Leaf paths of `v`: scalars, lists and empty objects. Nulls are not fields.
pub fn leaf_paths(v: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    collect(v, &mut Vec::new(), &mut out);
    out.retain(|p| !is_system(p));
    out
}

fn collect(v: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Null => {}
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                prefix.push(k.clone());
                collect(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
        }
    }
}

pub fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key.as_str())?;
    }
    if cur.is_null() { None } else { Some(cur) }
}

fn set_at(v: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for key in parents {
        if !cur.get(key.as_str()).is_some_and(Value::is_object) {
            if let Value::Object(map) = cur {
                map.insert(key.clone(), Value::Object(Map::new()));
            } else {
                return;
            }
        }
        let Some(next) = cur.get_mut(key.as_str()) else {
            return;
        };
        cur = next;
    }
    if let Value::Object(map) = cur {
        map.insert(last.clone(), value);
    }
}

fn remove_at(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for key in parents {
        let Some(next) = cur.get_mut(key.as_str()) else {
            return;
        };
        cur = next;
    }
    if let Value::Object(map) = cur {
        map.remove(last);
    }
}

/// Leaf paths whose value differs between `old` and `new` (added, changed or removed).
pub fn changed_paths(old: &Value, new: &Value) -> BTreeSet<FieldPath> {
    leaf_paths(old)
        .union(&leaf_paths(new))
        .filter(|p| value_at(old, p) != value_at(new, p))
        .cloned()
        .collect()
}

fn entry_mut<'a>(
    entries: &'a mut [ManagedEntry],
    manager: &str,
    operation: Operation,
    subresource: Option<&str>,
) -> Option<&'a mut ManagedEntry> {
    entries.iter_mut().find(|e| {
        e.manager == manager && e.operation == operation && e.subresource.as_deref() == subresource
    })
}

/// Who writes, for the managedFields entry it earns.
#[derive(Clone, Debug)]
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub subresource: Option<&'a str>,
    pub now: &'a str,
}

/// Record a non-apply write that turned `old` into `new`.
pub fn record_update(entries: &mut Vec<ManagedEntry>, w: &Writer<'_>, old: &Value, new: &Value) {
    let changed = changed_paths(old, new);
    if changed.is_empty() {
        return;
    }
    let present = leaf_paths(new);
    for e in entries.iter_mut() {
        e.fields.retain(|p| !changed.contains(p));
    }
    let gained: BTreeSet<FieldPath> = changed.intersection(&present).cloned().collect();
    match entry_mut(entries, w.manager, Operation::Update, w.subresource) {
        Some(e) => {
            e.fields.extend(gained);
            e.time = w.now.to_string();
            e.api_version = w.api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: w.manager.to_string(),
            operation: Operation::Update,
            api_version: w.api_version.to_string(),
            time: w.now.to_string(),
            subresource: w.subresource.map(str::to_string),
            fields: gained,
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// Server-side apply of `config` onto `live` (`Value::Null` when the object does not exist yet).
pub fn apply(
    entries: &mut Vec<ManagedEntry>,
    w: &Writer<'_>,
    live: &Value,
    config: &Value,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let applied = leaf_paths(config);
    let previously: BTreeSet<FieldPath> =
        entry_mut(entries, w.manager, Operation::Apply, w.subresource)
            .map(|e| e.fields.clone())
            .unwrap_or_default();
    let is_self = |e: &ManagedEntry| {
        e.manager == w.manager
            && e.operation == Operation::Apply
            && e.subresource.as_deref() == w.subresource
    };

    if !force {
        let mut conflicts = Vec::new();
        for p in &applied {
            let live_value = value_at(live, p);
            if live_value.is_none() || live_value == value_at(config, p) {
                continue;
            }
            for e in entries
                .iter()
                .filter(|e| !is_self(e) && e.fields.contains(p))
            {
                conflicts.push(Conflict {
                    manager: e.manager.clone(),
                    operation: e.operation,
                    api_version: e.api_version.clone(),
                    field: format!(".{}", p.join(".")),
                });
            }
        }
        if !conflicts.is_empty() {
            return Err(conflicts);
        }
    }

    let mut new = if live.is_null() {
        Value::Object(Map::new())
    } else {
        live.clone()
    };
    for p in previously.difference(&applied) {
        let owned_elsewhere = entries.iter().any(|e| !is_self(e) && e.fields.contains(p));
        if !owned_elsewhere {
            remove_at(&mut new, p);
        }
    }
    for p in &applied {
        if let Some(v) = value_at(config, p) {
            set_at(&mut new, p, v.clone());
        }
    }

    let changed = changed_paths(live, &new);
    for e in entries.iter_mut().filter(|e| !is_self(e)) {
        e.fields.retain(|p| !changed.contains(p));
    }
    match entry_mut(entries, w.manager, Operation::Apply, w.subresource) {
        Some(e) => {
            e.fields = applied;
            e.time = w.now.to_string();
            e.api_version = w.api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: w.manager.to_string(),
            operation: Operation::Apply,
            api_version: w.api_version.to_string(),
            time: w.now.to_string(),
            subresource: w.subresource.map(str::to_string),
            fields: applied,
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
    Ok(new)
}

/// The `Status.message` the real server gives for apply conflicts.
pub fn conflict_message(conflicts: &[Conflict]) -> String {
    let who = |c: &Conflict| match c.operation {
        Operation::Apply => format!("conflict with {:?}", c.manager),
        Operation::Update => format!("conflict with {:?} using {}", c.manager, c.api_version),
    };
    match conflicts {
        [one] => format!("Apply failed with 1 conflict: {}: {}", who(one), one.field),
        many => {
            let lines: Vec<String> = many
                .iter()
                .map(|c| format!("{}: {}", who(c), c.field))
                .collect();
            format!(
                "Apply failed with {} conflicts: {}",
                many.len(),
                lines.join("\n")
            )
        }
    }
}

/// `metadata.managedFields` as the real server renders it (`fieldsType: FieldsV1`).
pub fn render(entries: &[ManagedEntry]) -> Value {
    let rendered: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut fields = Value::Object(Map::new());
            for p in &e.fields {
                let keyed: Vec<String> = p.iter().map(|k| format!("f:{k}")).collect();
                set_at(&mut fields, &keyed, json!({}));
            }
            let mut entry = json!({
                "manager": e.manager,
                "operation": match e.operation { Operation::Apply => "Apply", Operation::Update => "Update" },
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields,
            });
            if let Some(sub) = &e.subresource {
                entry["subresource"] = json!(sub);
            }
            entry
        })
        .collect();
    Value::Array(rendered)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn writer<'a>(manager: &'a str) -> Writer<'a> {
        Writer {
            manager,
            api_version: "coordination.k8s.io/v1",
            subresource: None,
            now: "2025-01-01T00:00:00Z",
        }
    }

    #[test]
    fn second_manager_applying_a_different_holder_conflicts() {
        let mut entries = Vec::new();
        let live = json!({"metadata": {"name": "l"}, "spec": {}});
        let a = json!({"spec": {"holderIdentity": "a", "leaseDurationSeconds": 2}});
        let live = apply(&mut entries, &writer("a"), &live, &a, false).unwrap();
        let b = json!({"spec": {"holderIdentity": "b", "leaseDurationSeconds": 2}});
        let conflicts = apply(&mut entries, &writer("b"), &live, &b, false).unwrap_err();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].field, ".spec.holderIdentity");
        assert_eq!(conflicts[0].manager, "a");
    }

    #[test]
    fn update_that_removes_a_field_frees_it_for_another_applier() {
        let mut entries = Vec::new();
        let live = json!({"spec": {}});
        let live = apply(
            &mut entries,
            &writer("a"),
            &live,
            &json!({"spec": {"holderIdentity": "a"}}),
            false,
        )
        .unwrap();
        let released = json!({"spec": {}});
        record_update(&mut entries, &writer("a"), &live, &released);
        let taken = apply(
            &mut entries,
            &writer("b"),
            &released,
            &json!({"spec": {"holderIdentity": "b"}}),
            false,
        )
        .unwrap();
        assert_eq!(taken["spec"]["holderIdentity"], "b");
    }

    #[test]
    fn reapplying_without_a_field_removes_it() {
        let mut entries = Vec::new();
        let live = apply(
            &mut entries,
            &writer("a"),
            &Value::Null,
            &json!({"spec": {"x": 1, "y": 2}}),
            false,
        )
        .unwrap();
        let live = apply(
            &mut entries,
            &writer("a"),
            &live,
            &json!({"spec": {"x": 1}}),
            false,
        )
        .unwrap();
        assert_eq!(live, json!({"spec": {"x": 1}}));
    }

    #[test]
    fn rendered_managed_fields_use_fields_v1_keys() {
        let mut entries = Vec::new();
        record_update(
            &mut entries,
            &writer("m"),
            &json!({}),
            &json!({"spec": {"a": 1}}),
        );
        let rendered = render(&entries);
        assert_eq!(rendered[0]["fieldsV1"], json!({"f:spec": {"f:a": {}}}));
        assert_eq!(rendered[0]["operation"], "Update");
    }
}
