//! The autoscalers of a local run, from a YAML file.
//!
//! ```yaml
//! autoscalers:
//!   - name: llama
//!     namespace: serving        # optional; default "default"
//!     spec:                     # the Autoscaler CRD's spec, same rules
//!       selector: { backend: vllm-llama }
//!       pools:
//!         unified: { scaleTargetRef: { name: llama }, maxReplicas: 8 }
//!       slo: { ttft: 500ms }
//! ```
//!
//! Two steps, as everywhere in flyball: serde reads the raw shape (unknown keys rejected; the spec
//! is [`AutoscalerSpecRaw`], shared with the CRD), then [`ControlConfig::try_from`] validates it
//! with the policy's own rules, naming each field from the file's root:
//! `autoscalers[0].spec.pools.decode.maxReplicas = 0: must be >= minReplicas (1)`.
//!
//! A pool is one autoscaler's selector plus one role; its name is its scale target's name.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use flyball_policy::pools::Role;
use flyball_policy::spec::{AutoscalerSpec, AutoscalerSpecRaw, FieldError};
use serde::Deserialize;

use crate::window::{PoolId, Selector};

/// The file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFileRaw {
    #[serde(default)]
    pub autoscalers: Vec<AutoscalerEntryRaw>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalerEntryRaw {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub spec: AutoscalerSpecRaw,
}

/// The validated configuration: the only form the rest of the service sees.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ControlConfig {
    autoscalers: Vec<Autoscaler>,
    pools: Vec<PoolDef>,
}

/// One validated autoscaler.
#[derive(Debug, Clone, PartialEq)]
pub struct Autoscaler {
    pub name: String,
    pub namespace: String,
    pub spec: AutoscalerSpec,
    /// Its pools, in the policy's order (prefill before decode).
    pub pools: Vec<PoolId>,
}

/// One pool: an autoscaler's selector plus a role.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolDef {
    pub id: PoolId,
    /// The scale target's name, unique within the configuration.
    pub name: String,
    /// Index into [`ControlConfig::autoscalers`].
    pub autoscaler: usize,
    pub autoscaler_name: String,
    pub role: Role,
    pub selector: Selector,
    pub target: ScaleTarget,
}

/// A workload with a `/scale` subresource, its namespace resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScaleTarget {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{}", Joined(.errors))]
    Invalid { errors: Vec<FieldError> },
}

/// Namespace of autoscalers that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

struct Joined<'a>(&'a [FieldError]);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// === impl ControlConfig ===

impl ControlConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw: ConfigFileRaw =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
                path: PathBuf::from("<yaml>"),
                source,
            })?;
        Self::try_from(&raw)
    }

    pub fn autoscalers(&self) -> &[Autoscaler] {
        &self.autoscalers
    }

    pub fn pools(&self) -> &[PoolDef] {
        &self.pools
    }

    pub fn pool(&self, id: PoolId) -> Option<&PoolDef> {
        self.pools.get(id.0)
    }

    /// The selectors in pool order, for the windows.
    pub fn selectors(&self) -> Vec<Selector> {
        self.pools.iter().map(|p| p.selector.clone()).collect()
    }
}

impl TryFrom<&ConfigFileRaw> for ControlConfig {
    type Error = ConfigError;

    fn try_from(raw: &ConfigFileRaw) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        let mut config = ControlConfig::default();
        let mut names = HashSet::new();
        let mut pool_names = HashSet::new();
        for (i, entry) in raw.autoscalers.iter().enumerate() {
            let at = format!("autoscalers[{i}]");
            let namespace = entry
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            if entry.name.trim().is_empty() {
                errors.push(field(
                    &at,
                    "name",
                    format!("{:?}", entry.name),
                    "must not be empty",
                ));
            } else if !names.insert((namespace.clone(), entry.name.clone())) {
                errors.push(field(
                    &at,
                    "name",
                    format!("{:?}", entry.name),
                    format!("must be unique in namespace {namespace:?}"),
                ));
            }
            if namespace.trim().is_empty() {
                errors.push(field(&at, "namespace", "\"\"", "must not be empty"));
            }
            let spec = match AutoscalerSpec::from_raw(&entry.spec, &format!("{at}.spec")) {
                Ok(spec) => spec,
                Err(e) => {
                    errors.extend_from_slice(e.errors());
                    continue;
                }
            };
            let selector = Selector {
                backend: spec.selector().backend.clone(),
                model: spec.selector().model.clone(),
            };
            let mut ids = Vec::new();
            for (role, pool) in spec.pools().iter() {
                let reference = &pool.scale_target_ref;
                let target = ScaleTarget {
                    api_version: reference.api_version.clone(),
                    kind: reference.kind.clone(),
                    namespace: reference
                        .namespace
                        .clone()
                        .unwrap_or_else(|| namespace.clone()),
                    name: reference.name.clone(),
                };
                if !pool_names.insert(target.name.clone()) {
                    errors.push(field(
                        &at,
                        &format!("spec.pools.{role}.scaleTargetRef.name"),
                        format!("{:?}", target.name),
                        "must be unique across all autoscalers (it names the pool)",
                    ));
                }
                let id = PoolId(config.pools.len());
                ids.push(id);
                config.pools.push(PoolDef {
                    id,
                    name: target.name.clone(),
                    autoscaler: config.autoscalers.len(),
                    autoscaler_name: entry.name.clone(),
                    role,
                    selector: selector.clone(),
                    target,
                });
            }
            config.autoscalers.push(Autoscaler {
                name: entry.name.clone(),
                namespace,
                spec,
                pools: ids,
            });
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { errors })
        }
    }
}

fn field(at: &str, path: &str, value: impl fmt::Display, rule: impl Into<String>) -> FieldError {
    FieldError {
        path: format!("{at}.{path}"),
        value: value.to_string(),
        rule: rule.into(),
    }
}

// === impl ScaleTarget ===

impl fmt::Display for ScaleTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests;
