//! Custom resources checked against their CRD's `openAPIV3Schema`, as strictly as
//! `kubectl apply --validate=strict` would.
//!
//! A CRD schema is OpenAPI 3.0 (close to JSON Schema draft 4) plus Kubernetes extensions, and the
//! API server reads it differently from a JSON Schema validator in three ways this module makes up
//! for before handing the schema to `jsonschema`:
//! - unknown fields: the server prunes them (and strict validation rejects them) unless
//!   `x-kubernetes-preserve-unknown-fields` is set, while JSON Schema allows them; so every object
//!   schema that lists `properties` gets `additionalProperties: false`;
//! - `apiVersion`, `kind` and `metadata` are implied at the root; they are added;
//! - `nullable: true` allows null, which JSON Schema's `type` does not.
//!
//! Not checked: `x-kubernetes-validations` (CEL rules, counted in [`Registry::cel_rules`]),
//! defaults, and `metadata` beyond being an object (see [`crate::builtin::check_metadata`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::manifest::{self, Document};

/// Why a schema could not be loaded or a document checked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    #[error("CRD {name}: {rule}")]
    Crd { name: String, rule: String },
    #[error("CRD {name} version {version}: schema does not compile: {message}")]
    Schema {
        name: String,
        version: String,
        message: String,
    },
    #[error("{document}: no schema for {api_version} {kind}")]
    UnknownKind {
        document: String,
        api_version: String,
        kind: String,
    },
}

/// One served version of one kind.
struct Entry {
    validator: jsonschema::Validator,
    /// CEL rules in the schema, which this check does not evaluate.
    cel_rules: usize,
}

/// Schemas by `(group/version, kind)`.
#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<(String, String), Entry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

// === impl Registry ===

impl Registry {
    /// Every CRD in the given YAML files (other documents are ignored).
    pub fn from_files(paths: &[impl AsRef<Path>]) -> Result<Self, Error> {
        let mut registry = Registry::default();
        for path in paths {
            for document in manifest::load(path.as_ref())? {
                if document.kind() == "CustomResourceDefinition" {
                    registry.add_crd(&document.value)?;
                }
            }
        }
        Ok(registry)
    }

    /// Adds every version of one `CustomResourceDefinition` that has a schema.
    pub fn add_crd(&mut self, crd: &Value) -> Result<(), Error> {
        let name = crd["metadata"]["name"].as_str().unwrap_or("?").to_string();
        let rule = |rule: &str| Error::Crd {
            name: name.clone(),
            rule: rule.to_string(),
        };
        let group = crd["spec"]["group"]
            .as_str()
            .ok_or_else(|| rule("spec.group missing"))?;
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .ok_or_else(|| rule("spec.names.kind missing"))?;
        let versions = crd["spec"]["versions"]
            .as_array()
            .ok_or_else(|| rule("spec.versions missing"))?;
        for version in versions {
            let Some(version_name) = version["name"].as_str() else {
                return Err(rule("a version has no name"));
            };
            let schema = &version["schema"]["openAPIV3Schema"];
            if schema.is_null() {
                continue;
            }
            let mut schema = schema.clone();
            let cel_rules = count_cel_rules(&schema);
            structural(&mut schema, true);
            let validator =
                jsonschema::draft4::options()
                    .build(&schema)
                    .map_err(|e| Error::Schema {
                        name: name.clone(),
                        version: version_name.to_string(),
                        message: e.to_string(),
                    })?;
            self.entries.insert(
                (format!("{group}/{version_name}"), kind.to_string()),
                Entry {
                    validator,
                    cel_rules,
                },
            );
        }
        Ok(())
    }

    pub fn knows(&self, api_version: &str, kind: &str) -> bool {
        self.entries
            .contains_key(&(api_version.to_string(), kind.to_string()))
    }

    /// CEL rules in the schema of `api_version`/`kind`, which [`Registry::check`] leaves out.
    pub fn cel_rules(&self, api_version: &str, kind: &str) -> usize {
        self.entries
            .get(&(api_version.to_string(), kind.to_string()))
            .map_or(0, |e| e.cel_rules)
    }

    /// Every violation of the document's schema as `path: message`; empty when it validates.
    pub fn check(&self, document: &Document) -> Result<Vec<String>, Error> {
        let key = (
            document.api_version().to_string(),
            document.kind().to_string(),
        );
        let entry = self.entries.get(&key).ok_or_else(|| Error::UnknownKind {
            document: document.to_string(),
            api_version: key.0.clone(),
            kind: key.1.clone(),
        })?;
        Ok(entry
            .validator
            .iter_errors(&document.value)
            .map(|e| {
                let at = e.instance_path().to_string();
                format!("{}: {e}", if at.is_empty() { "/" } else { &at })
            })
            .collect())
    }
}

/// Rewrites a CRD schema node into what the API server enforces (see the module docs). Only the
/// structural positions are visited: `properties`, `items` and `additionalProperties`; the
/// branches of `allOf`/`anyOf`/`oneOf`/`not` may only restate fields, so they are left alone.
fn structural(schema: &mut Value, root: bool) {
    let Value::Object(node) = schema else {
        return;
    };
    if node.get("nullable") == Some(&Value::Bool(true))
        && let Some(Value::String(ty)) = node.get("type")
    {
        let ty = ty.clone();
        node.insert("type".into(), json!([ty, "null"]));
    }
    if root {
        let properties = node
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(properties) = properties {
            for (field, ty) in [
                ("apiVersion", "string"),
                ("kind", "string"),
                ("metadata", "object"),
            ] {
                properties
                    .entry(field)
                    .or_insert_with(|| json!({ "type": ty }));
            }
        }
    }
    let preserves_unknown =
        node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if node.contains_key("properties")
        && !preserves_unknown
        && !node.contains_key("additionalProperties")
    {
        node.insert("additionalProperties".into(), Value::Bool(false));
    }
    if let Some(Value::Object(properties)) = node.get_mut("properties") {
        for child in properties.values_mut() {
            structural(child, false);
        }
    }
    if let Some(items) = node.get_mut("items") {
        structural(items, false);
    }
    if let Some(additional @ Value::Object(_)) = node.get_mut("additionalProperties") {
        structural(additional, false);
    }
}

fn count_cel_rules(schema: &Value) -> usize {
    match schema {
        Value::Object(node) => node
            .iter()
            .map(|(key, child)| {
                if key == "x-kubernetes-validations" {
                    child.as_array().map_or(0, Vec::len)
                } else {
                    count_cel_rules(child)
                }
            })
            .sum(),
        Value::Array(items) => items.iter().map(count_cel_rules).sum(),
        _ => 0,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "names": {"kind": "Widget"},
                "versions": [{
                    "name": "v1",
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "properties": {"spec": {
                            "type": "object",
                            "properties": {
                                "size": {"type": "integer", "nullable": true},
                                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                                         "x-kubernetes-validations": [{"rule": "true"}]}
                            }
                        }}
                    }}
                }]
            }
        });
        let mut registry = Registry::default();
        registry.add_crd(&crd).expect("compiles");
        registry
    }

    fn document(value: Value) -> Document {
        Document {
            file: "widget.yaml".into(),
            index: 0,
            value,
        }
    }

    #[test]
    fn unknown_fields_are_rejected_unless_the_schema_preserves_them() {
        let registry = registry();
        let ok = document(json!({
            "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": null, "free": {"anything": [1, 2]}}
        }));
        assert_eq!(registry.check(&ok).expect("known"), Vec::<String>::new());

        let typo = document(json!({
            "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"sise": 3}
        }));
        let errors = registry.check(&typo).expect("known");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("/spec:"), "{errors:?}");
        assert!(errors[0].contains("sise"), "{errors:?}");
    }

    #[test]
    fn a_kind_without_a_schema_is_an_error_not_a_pass() {
        let unknown = document(json!({"apiVersion": "example.com/v2", "kind": "Widget"}));
        assert!(matches!(
            registry().check(&unknown),
            Err(Error::UnknownKind { .. })
        ));
    }

    #[test]
    fn cel_rules_are_counted_as_unchecked() {
        assert_eq!(registry().cel_rules("example.com/v1", "Widget"), 1);
    }
}
