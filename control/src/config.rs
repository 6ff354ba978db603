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
//!
//! With `--source kubernetes` the same validated form is built from `FlyballAutoscaler`
//! resources instead ([`ControlConfig::from_resources`]), one resource at a time so a bad one
//! never takes the others down, and swapped in whole through [`LiveConfig`] whenever they change.
//! Pool ids stay with their pool across such swaps ([`ControlConfig::renumbered`]) and are never
//! reused, so whatever is keyed by id (windows, status) carries over.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flyball_policy::pools::Role;
use flyball_policy::spec::{
    AutoscalerSpec, AutoscalerSpecRaw, FieldError, Selector as SpecSelector,
};
use serde::Deserialize;
use tokio::sync::watch;

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
    /// Every pool id ever handed out is below this, so a new pool's id is fresh.
    id_limit: usize,
}

/// One validated autoscaler.
#[derive(Debug, Clone, PartialEq)]
pub struct Autoscaler {
    pub name: String,
    pub namespace: String,
    pub spec: AutoscalerSpec,
    /// Its pools, in the policy's order (prefill before decode).
    pub pools: Vec<PoolId>,
    pub origin: Origin,
}

/// Where an autoscaler was declared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Origin {
    /// The `--config` file.
    #[default]
    File,
    /// A `FlyballAutoscaler` resource; its status and Events are written to it.
    Resource {
        uid: Option<String>,
        /// `metadata.generation` of the spec in force.
        generation: Option<i64>,
    },
}

impl Origin {
    /// Whether `self` and `other` declare the same object: the file, or a resource with the
    /// same uid (one deleted and created again under its name is another).
    pub fn same_object(&self, other: &Origin) -> bool {
        match (self, other) {
            (Origin::File, Origin::File) => true,
            (Origin::Resource { uid: a, .. }, Origin::Resource { uid: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// One `FlyballAutoscaler` as read from the API server, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalerResource {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub spec: AutoscalerSpecRaw,
}

/// A resource left out of the configuration, with every rule it breaks (paths from `spec`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub namespace: String,
    pub name: String,
    pub errors: Vec<FieldError>,
}

/// The configuration in force. File mode sets it once; the Kubernetes source replaces it as
/// resources change. Readers take a snapshot ([`LiveConfig::current`]) per request or
/// evaluation, so one answer never mixes two configurations.
#[derive(Debug)]
pub struct LiveConfig {
    tx: watch::Sender<Arc<ControlConfig>>,
}

/// One pool: an autoscaler's selector plus a role.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolDef {
    pub id: PoolId,
    /// The scale target's name; with its namespace (`target.namespace`), unique within the
    /// configuration, so teams in different namespaces may each have a pool named `vllm`.
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

    /// GPUs every autoscaler's pools hold at their minReplicas: the least a shared budget can be.
    pub fn gpus_at_min_replicas(&self) -> u64 {
        self.autoscalers
            .iter()
            .map(|a| a.spec.gpus_at_min_replicas())
            .sum()
    }

    pub fn autoscalers(&self) -> &[Autoscaler] {
        &self.autoscalers
    }

    pub fn pools(&self) -> &[PoolDef] {
        &self.pools
    }

    pub fn pool(&self, id: PoolId) -> Option<&PoolDef> {
        // Ids equal positions until pools come and go (see `renumbered`).
        self.pools
            .get(id.0)
            .filter(|p| p.id == id)
            .or_else(|| self.pools.iter().find(|p| p.id == id))
    }

    /// The selectors in pool order, for the windows.
    pub fn selectors(&self) -> Vec<Selector> {
        self.pools.iter().map(|p| p.selector.clone()).collect()
    }

    /// Each pool's id and selector, for the windows.
    pub fn pool_selectors(&self) -> Vec<(PoolId, Selector)> {
        self.pools
            .iter()
            .map(|p| (p.id, p.selector.clone()))
            .collect()
    }

    /// Autoscalers from `FlyballAutoscaler` resources, in the order given: when two claim the
    /// same scale target, the earlier keeps it. Each resource stands alone: one that breaks a
    /// rule is left out with its errors (named from `spec`, as `kubectl explain` shows the
    /// fields), and the others are used.
    pub fn from_resources(resources: &[AutoscalerResource]) -> (ControlConfig, Vec<Rejected>) {
        let mut config = ControlConfig::default();
        let mut rejected = Vec::new();
        // Pool (namespace, name) -> the resource that holds it.
        let mut holders: HashMap<(String, String), String> = HashMap::new();
        for resource in resources {
            let spec = match AutoscalerSpec::from_raw(&resource.spec, "spec") {
                Ok(spec) => spec,
                Err(e) => {
                    rejected.push(Rejected {
                        namespace: resource.namespace.clone(),
                        name: resource.name.clone(),
                        errors: e.errors().to_vec(),
                    });
                    continue;
                }
            };
            let targets = targets(&spec, &resource.namespace);
            let this = format!("{}/{}", resource.namespace, resource.name);
            let mut errors = Vec::new();
            for (role, pool) in spec.pools().iter() {
                // Anyone who may create a FlyballAutoscaler in one namespace must not be able to
                // scale another's workloads with this service's rights.
                if let Some(namespace) = &pool.scale_target_ref.namespace
                    && *namespace != resource.namespace
                {
                    errors.push(FieldError {
                        path: format!("spec.pools.{role}.scaleTargetRef.namespace"),
                        value: format!("{namespace:?}"),
                        rule: format!(
                            "must be the FlyballAutoscaler's own namespace ({:?}) or omitted: it \
                             scales workloads of its namespace, as an HPA does",
                            resource.namespace
                        ),
                    });
                }
            }
            let mut own = HashSet::new();
            for (role, target) in &targets {
                let key = (target.namespace.clone(), target.name.clone());
                let holder = match holders.get(&key) {
                    Some(holder) => Some(holder.as_str()),
                    None => (!own.insert(key)).then_some(this.as_str()),
                };
                if let Some(holder) = holder {
                    errors.push(FieldError {
                        path: format!("spec.pools.{role}.scaleTargetRef.name"),
                        value: format!("{:?}", target.name),
                        rule: format!(
                            "already scaled by FlyballAutoscaler {holder} (a scale target's name \
                             names its pool, so it must be unique within namespace {:?})",
                            target.namespace
                        ),
                    });
                }
            }
            if let Some(other) = overlapping(&config, spec.selector()) {
                errors.push(overlap_error("spec.selector", spec.selector(), &other));
            }
            if !errors.is_empty() {
                rejected.push(Rejected {
                    namespace: resource.namespace.clone(),
                    name: resource.name.clone(),
                    errors,
                });
                continue;
            }
            for (_, target) in &targets {
                holders.insert(
                    (target.namespace.clone(), target.name.clone()),
                    format!("{}/{}", resource.namespace, resource.name),
                );
            }
            config.push(
                &resource.name,
                &resource.namespace,
                spec,
                targets,
                Origin::Resource {
                    uid: resource.uid.clone(),
                    generation: resource.generation,
                },
            );
        }
        (config, rejected)
    }

    /// Adds one validated autoscaler and its pools, with the next ids.
    fn push(
        &mut self,
        name: &str,
        namespace: &str,
        spec: AutoscalerSpec,
        targets: Vec<(Role, ScaleTarget)>,
        origin: Origin,
    ) {
        let selector = Selector {
            backend: spec.selector().backend.clone(),
            model: spec.selector().model.clone(),
        };
        let mut ids = Vec::with_capacity(targets.len());
        for (role, target) in targets {
            let id = PoolId(self.pools.len());
            ids.push(id);
            self.pools.push(PoolDef {
                id,
                name: target.name.clone(),
                autoscaler: self.autoscalers.len(),
                autoscaler_name: name.to_owned(),
                role,
                selector: selector.clone(),
                target,
            });
        }
        self.id_limit = self.pools.len();
        self.autoscalers.push(Autoscaler {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            spec,
            pools: ids,
            origin,
        });
    }

    /// This configuration with pool ids that continue `previous`: a pool that was there before
    /// (same autoscaler, role, target and selector) keeps its id, any other gets one never used.
    pub fn renumbered(mut self, previous: &ControlConfig) -> ControlConfig {
        type Key = (String, String, Role, ScaleTarget, Selector);
        let key = |config: &ControlConfig, pool: &PoolDef| -> Option<Key> {
            let autoscaler = config.autoscalers.get(pool.autoscaler)?;
            Some((
                autoscaler.namespace.clone(),
                autoscaler.name.clone(),
                pool.role,
                pool.target.clone(),
                pool.selector.clone(),
            ))
        };
        let mut old: HashMap<Key, PoolId> = previous
            .pools
            .iter()
            .filter_map(|p| Some((key(previous, p)?, p.id)))
            .collect();
        let mut next = previous.id_limit.max(previous.pools.len());
        let mut ids = HashMap::new();
        for i in 0..self.pools.len() {
            let kept = key(&self, &self.pools[i]).and_then(|k| old.remove(&k));
            let id = kept.unwrap_or_else(|| {
                next += 1;
                PoolId(next - 1)
            });
            ids.insert(self.pools[i].id, id);
            self.pools[i].id = id;
        }
        for autoscaler in &mut self.autoscalers {
            for id in &mut autoscaler.pools {
                *id = ids.get(id).copied().unwrap_or(*id);
            }
        }
        let highest = self.pools.iter().map(|p| p.id.0 + 1).max().unwrap_or(0);
        self.id_limit = next.max(highest);
        self
    }
}

/// Each role's scale target, its namespace resolved against the autoscaler's.
fn targets(spec: &AutoscalerSpec, namespace: &str) -> Vec<(Role, ScaleTarget)> {
    spec.pools()
        .iter()
        .map(|(role, pool)| {
            let reference = &pool.scale_target_ref;
            let target = ScaleTarget {
                api_version: reference.api_version.clone(),
                kind: reference.kind.clone(),
                namespace: reference
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.to_owned()),
                name: reference.name.clone(),
            };
            (role, target)
        })
        .collect()
}

// === impl LiveConfig ===

impl LiveConfig {
    pub fn new(config: ControlConfig) -> Self {
        LiveConfig {
            tx: watch::Sender::new(Arc::new(config)),
        }
    }

    /// The configuration in force now.
    pub fn current(&self) -> Arc<ControlConfig> {
        self.tx.borrow().clone()
    }

    /// Changes whenever a new configuration is published.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ControlConfig>> {
        self.tx.subscribe()
    }

    /// Puts `config` in force, unless it equals the one in force. Renumber it first
    /// ([`ControlConfig::renumbered`]) and prepare whatever is keyed by its ids.
    pub fn publish(&self, config: ControlConfig) -> bool {
        self.tx.send_if_modified(|current| {
            if **current == config {
                return false;
            }
            *current = Arc::new(config);
            true
        })
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
            if let Some(other) = overlapping(&config, spec.selector()) {
                errors.push(overlap_error(
                    &format!("{at}.spec.selector"),
                    spec.selector(),
                    &other,
                ));
            }
            let targets = targets(&spec, &namespace);
            for (role, target) in &targets {
                if !pool_names.insert((target.namespace.clone(), target.name.clone())) {
                    errors.push(field(
                        &at,
                        &format!("spec.pools.{role}.scaleTargetRef.name"),
                        format!("{:?}", target.name),
                        format!(
                            "must be unique within namespace {:?} across all autoscalers (it \
                             names the pool)",
                            target.namespace
                        ),
                    ));
                }
            }
            config.push(&entry.name, &namespace, spec, targets, Origin::File);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { errors })
        }
    }
}

/// The autoscaler in `config` whose selector may match keys `selector` matches, if any.
fn overlapping(config: &ControlConfig, selector: &SpecSelector) -> Option<String> {
    config
        .autoscalers
        .iter()
        .find(|a| a.spec.selector().overlaps(selector))
        .map(|a| format!("{}/{}", a.namespace, a.name))
}

/// Two autoscalers on the same telemetry would each size their pools for all of it.
fn overlap_error(path: &str, selector: &SpecSelector, other: &str) -> FieldError {
    FieldError {
        path: path.to_owned(),
        value: selector.to_string(),
        rule: format!(
            "selects telemetry autoscaler {other} selects too: each would size its pools for \
             all of it (make the backends or models differ)"
        ),
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
