//! Patch formats the API server accepts, applied to plain JSON.
//!
//! - `application/merge-patch+json`: RFC 7386.
//! - `application/json-patch+json`: RFC 6902 (paths are RFC 6901 JSON pointers).
//! - `application/strategic-merge-patch+json`: RFC 7386 plus merging of the few object lists
//!   flyball's objects carry by their `patchMergeKey` (containers by `name`, conditions by
//!   `type`, ...) and the `$patch: delete` list directive. Other `$` directives are refused
//!   loudly rather than silently treated as data.

use serde_json::{Map, Value};

/// Why a patch could not be applied; the server answers 422 with this text, or 500 for
/// [`PatchError::Unsupported`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("{0}")]
    Invalid(String),
    #[error("flyball fake apiserver does not implement {0}")]
    Unsupported(String),
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// `patchMergeKey` of the object lists that appear in the built-in kinds flyball touches.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "ports" => "containerPort",
        "conditions" => "type",
        _ => return None,
    })
}

/// Strategic merge patch, restricted as described in the module docs.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return Ok(());
    };
    for (key, value) in patch_map {
        if key.starts_with('$') {
            return Err(PatchError::Unsupported(format!(
                "the strategic merge patch directive {key}"
            )));
        }
        if value.is_null() {
            target_map.remove(key);
            continue;
        }
        match (merge_key(key), value, target_map.get_mut(key)) {
            (Some(mk), Value::Array(patch_items), Some(Value::Array(live_items))) => {
                merge_list(live_items, patch_items, mk)?;
            }
            (_, Value::Object(_), Some(live)) if live.is_object() => {
                strategic_merge_patch(live, value)?;
            }
            _ => {
                let mut fresh = Value::Null;
                strategic_merge_patch(&mut fresh, value)?;
                target_map.insert(key.clone(), strip_directives(fresh));
            }
        }
    }
    Ok(())
}

fn strip_directives(mut v: Value) -> Value {
    if let Value::Array(items) = &mut v {
        items.retain(|i| i.get("$patch").is_none());
    }
    v
}

fn merge_list(live: &mut Vec<Value>, patch: &[Value], key: &str) -> Result<(), PatchError> {
    for item in patch {
        let Some(id) = item.get(key) else {
            return Err(PatchError::Invalid(format!(
                "map: {item} does not contain declared merge key: {key}"
            )));
        };
        let pos = live.iter().position(|l| l.get(key) == Some(id));
        match item.get("$patch").and_then(Value::as_str) {
            Some("delete") => {
                if let Some(p) = pos {
                    live.remove(p);
                }
            }
            Some(other) => {
                return Err(PatchError::Unsupported(format!(
                    "the list item directive $patch: {other}"
                )));
            }
            None => match pos {
                Some(p) => strategic_merge_patch(&mut live[p], item)?,
                None => live.push(item.clone()),
            },
        }
    }
    Ok(())
}

/// RFC 6902 JSON patch.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| PatchError::Invalid("json patch must be an array of operations".into()))?;
    for op in ops {
        let name = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| PatchError::Invalid(format!("operation {op} has no \"op\"")))?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| PatchError::Invalid(format!("operation {op} has no \"path\"")))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Invalid(format!("operation {op} has no \"value\"")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError::Invalid(format!("operation {op} has no \"from\"")))
        };
        match name {
            "add" => add(target, path, value()?)?,
            "remove" => {
                remove(target, path)?;
            }
            "replace" => {
                remove(target, path)?;
                add(target, path, value()?)?;
            }
            "test" => {
                let expected = value()?;
                if target.pointer(path) != Some(&expected) {
                    return Err(PatchError::Invalid(format!(
                        "testing value {path} failed: test failed"
                    )));
                }
            }
            "move" => {
                let v = remove(target, from()?)?;
                add(target, path, v)?;
            }
            "copy" => {
                let from = from()?;
                let v = target.pointer(from).cloned().ok_or_else(|| {
                    PatchError::Invalid(format!("copy from {from}: doc is missing path"))
                })?;
                add(target, path, v)?;
            }
            other => {
                return Err(PatchError::Invalid(format!(
                    "Unexpected kind: {other} in json patch"
                )));
            }
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), PatchError> {
    let Some(idx) = path.rfind('/') else {
        return Err(PatchError::Invalid(format!(
            "invalid JSON pointer {path:?}: must start with '/'"
        )));
    };
    let last = path[idx + 1..].replace("~1", "/").replace("~0", "~");
    Ok((path[..idx].to_string(), last))
}

fn add(target: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    let missing = || {
        PatchError::Invalid(format!(
            "add operation does not apply: doc is missing path: \"{path}\""
        ))
    };
    match target.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(map) => {
            map.insert(last, value);
            Ok(())
        }
        Value::Array(items) => {
            if last == "-" {
                items.push(value);
                return Ok(());
            }
            let idx: usize = last.parse().map_err(|_| missing())?;
            if idx > items.len() {
                return Err(missing());
            }
            items.insert(idx, value);
            Ok(())
        }
        _ => Err(missing()),
    }
}

fn remove(target: &mut Value, path: &str) -> Result<Value, PatchError> {
    let (parent, last) = split_pointer(path)?;
    let missing = || {
        PatchError::Invalid(format!(
            "remove operation does not apply: doc is missing path: \"{path}\""
        ))
    };
    match target.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(map) => map.remove(&last).ok_or_else(missing),
        Value::Array(items) => {
            let idx: usize = last.parse().map_err(|_| missing())?;
            if idx >= items.len() {
                return Err(missing());
            }
            Ok(items.remove(idx))
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_null_removes_and_objects_merge() {
        let mut doc = json!({"spec": {"replicas": 1, "paused": true}, "keep": 1});
        merge_patch(&mut doc, &json!({"spec": {"replicas": 3, "paused": null}}));
        assert_eq!(doc, json!({"spec": {"replicas": 3}, "keep": 1}));
    }

    #[test]
    fn strategic_patch_merges_containers_by_name_instead_of_replacing_the_list() {
        let mut doc =
            json!({"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]});
        strategic_merge_patch(
            &mut doc,
            &json!({"containers": [{"name": "b", "image": "z"}]}),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "z"}]})
        );
    }

    #[test]
    fn strategic_patch_refuses_directives_it_does_not_implement() {
        let mut doc = json!({});
        let err = strategic_merge_patch(&mut doc, &json!({"$retainKeys": ["a"]})).unwrap_err();
        assert!(matches!(err, PatchError::Unsupported(_)));
    }

    #[test]
    fn json_patch_replace_test_and_append() {
        let mut doc = json!({"spec": {"replicas": 1, "list": [1]}});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/spec/replicas", "value": 1},
                {"op": "replace", "path": "/spec/replicas", "value": 4},
                {"op": "add", "path": "/spec/list/-", "value": 2}
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"spec": {"replicas": 4, "list": [1, 2]}}));
    }

    #[test]
    fn json_patch_failed_test_leaves_an_error() {
        let mut doc = json!({"spec": {"replicas": 1}});
        let err = json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/spec/replicas", "value": 2}]),
        )
        .unwrap_err();
        assert!(matches!(err, PatchError::Invalid(_)));
    }

    #[test]
    fn json_patch_replace_of_a_missing_path_fails() {
        let mut doc = json!({"spec": {}});
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "replace", "path": "/spec/replicas", "value": 2}])
            )
            .is_err()
        );
    }
}
