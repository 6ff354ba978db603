//! One autoscaler's configuration: the raw shape shared by the Kubernetes CRD and the YAML file,
//! and its validated form.
//!
//! Two steps, as everywhere in flyball: serde reads [`AutoscalerSpecRaw`] (camelCase, unknown keys
//! rejected, durations as strings), then `AutoscalerSpec::try_from(&raw)` checks every rule and
//! returns either the validated [`AutoscalerSpec`] (the only type the policy sees) or a
//! [`SpecError`] listing every violation as `path = value: rule`, e.g.
//! `spec.pools.decode.maxReplicas = 0: must be >= minReplicas (1)`.
//!
//! The CRD's OpenAPI schema is generated from the raw types (doc comments become descriptions,
//! serde defaults become `default`s), so the API server and this module apply the same defaults.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::{DurationDisplay, parse_duration};
use crate::pools::Pools;

/// Default SLO percentile.
pub const DEFAULT_PERCENTILE: f64 = 95.0;
/// Default scale-up rules: react at once, up to 4 replicas per second (starting replicas, not the
/// step limit, are what keeps a burst from being answered twice).
pub const DEFAULT_SCALE_UP: ScalingRules = ScalingRules {
    stabilization_window: Duration::ZERO,
    max_step: 4,
    period: Duration::from_secs(1),
};
/// Default scale-down rules: the HPA's 300 s stabilization window, then one replica a minute.
pub const DEFAULT_SCALE_DOWN: ScalingRules = ScalingRules {
    stabilization_window: Duration::from_secs(300),
    max_step: 1,
    period: Duration::from_secs(60),
};
/// Default pause after any change before the next non-panic one: long enough for the change to show
/// in the pool state the control service reads back.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5);
/// Default panic threshold: short-window load at twice the ready replicas' capacity (Knative's 200%).
pub const DEFAULT_PANIC_THRESHOLD: f64 = 2.0;

// ===== raw shape =====

/// One autoscaler: the pools serving one backend/model, the SLO they must meet and how fast they
/// may move.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalerSpecRaw {
    /// Which telemetry keys (the gateway's backend and model) feed this autoscaler.
    pub selector: SelectorRaw,
    /// Either `unified`, or `prefill` and `decode`.
    pub pools: PoolsRaw,
    /// Latency objectives at one percentile.
    pub slo: SloRaw,
    /// How fast to move; every field has a default.
    #[serde(default)]
    pub behavior: BehaviorRaw,
    /// Allow idle pools to go to 0 replicas (only after a whole stable window of fresh data with no
    /// load). Default false.
    #[serde(default)]
    pub scale_to_zero: bool,
    /// Decide and report, but never change replicas. Default false.
    #[serde(default)]
    pub dry_run: bool,
    /// Most GPUs this autoscaler's pools may use together; when demand exceeds it, growth is split
    /// by need. Default: no budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_budget: Option<u32>,
}

/// Telemetry keys; give backend, model or both.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorRaw {
    /// The gateway's backend (Envoy cluster) name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The model named in requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Either `unified`, or both `prefill` and `decode`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolsRaw {
    /// Replicas that prefill and decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unified: Option<PoolSpecRaw>,
    /// Prefill replicas (disaggregated serving; sized on input tokens and TTFT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<PoolSpecRaw>,
    /// Decode replicas (disaggregated serving; sized on output tokens, sequences and TPOT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<PoolSpecRaw>,
}

/// One pool: the workload to scale, its bounds and what a replica can do.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSpecRaw {
    /// The workload whose `/scale` subresource is set.
    pub scale_target_ref: ScaleTargetRef,
    /// Fewest replicas while serving (at least 1; see `scaleToZero`). Default 1.
    #[serde(default = "default_one")]
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// GPUs one replica uses, for `gpuBudget`. Default 1.
    #[serde(default = "default_one")]
    pub gpus_per_replica: u32,
    /// What one replica sustains while meeting the SLO; optional hints, corrected online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacityHintsRaw>,
}

/// The workload to scale (anything with a `/scale` subresource).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleTargetRef {
    /// Default `apps/v1`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Default `Deployment`.
    #[serde(default = "default_kind")]
    pub kind: String,
    pub name: String,
    /// Default: the autoscaler's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl fmt::Display for ScaleTargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind, ns, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

/// Per-replica capacity hints, each optional.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CapacityHintsRaw {
    /// Input (prompt) tokens per second one replica prefills within the TTFT objective. Unified
    /// and prefill pools only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_tokens_per_second: Option<f64>,
    /// Requests one replica serves at once within the TPOT objective: in a unified pool every
    /// request in flight, one still waiting for its first token too; in a decode pool those
    /// past their first token. Unified and decode pools only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_sequences: Option<u32>,
    /// Output tokens per second one replica generates within the TPOT objective. Unified and
    /// decode pools only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_second: Option<f64>,
}

/// Latency objectives; give ttft, tpot or both.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SloRaw {
    /// Time to first token at `percentile`, e.g. "500ms".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::duration::DURATION_PATTERN))]
    pub ttft: Option<String>,
    /// Time per output token after the first at `percentile`, e.g. "50ms".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::duration::DURATION_PATTERN))]
    pub tpot: Option<String>,
    /// Percentile both objectives apply to, at least 1 and below 100 (99 for p99, not 0.99).
    /// Default 95.
    #[serde(default = "default_percentile")]
    pub percentile: f64,
}

/// How fast pools move.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BehaviorRaw {
    /// Default: stabilizationWindow 0s, maxStep 4, period 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRulesRaw>,
    /// Default: stabilizationWindow 300s, maxStep 1, period 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRulesRaw>,
    /// Pause after any change before the next one (panic scale-ups excepted). Default "5s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::duration::DURATION_PATTERN))]
    pub cooldown: Option<String>,
    /// Panic (scale up at once, never down) when short-window load reaches this multiple of the
    /// ready replicas' capacity. Above 1. Default 2.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<f64>,
}

/// Rules for one direction; unset fields take that direction's defaults.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingRulesRaw {
    /// Scale-down: act on the highest recommendation of this window; scale-up: on the lowest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::duration::DURATION_PATTERN))]
    pub stabilization_window: Option<String>,
    /// Most replicas added (or removed) within one `period`; at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_step: Option<u32>,
    /// The period `maxStep` applies to, above 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::duration::DURATION_PATTERN))]
    pub period: Option<String>,
}

fn default_one() -> u32 {
    1
}

fn default_percentile() -> f64 {
    DEFAULT_PERCENTILE
}

fn default_api_version() -> String {
    "apps/v1".to_owned()
}

fn default_kind() -> String {
    "Deployment".to_owned()
}

// ===== validated form =====

/// A validated autoscaler; build it with `AutoscalerSpec::try_from(&raw)` or
/// [`AutoscalerSpec::from_raw`].
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscalerSpec {
    selector: Selector,
    pools: Pools<PoolSpec>,
    slo: Slo,
    behavior: Behavior,
    scale_to_zero: bool,
    dry_run: bool,
    gpu_budget: Option<u32>,
}

/// Telemetry keys; at least one is set, none is empty.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Selector {
    pub backend: Option<String>,
    pub model: Option<String>,
}

impl Selector {
    /// Whether both select the same traffic on a field they both set (the same backend, or the
    /// same model) and do not differ on the other: `{backend: a}` and `{backend: a, model: m}`,
    /// or two equal ones. Selectors on different fields, `{backend: a}` and `{model: m}`, meet
    /// only where backend `a` serves model `m`, which they mostly are written not to.
    pub fn overlaps(&self, other: &Selector) -> bool {
        let shared =
            |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(a), Some(b)) if a == b);
        let meets = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        (shared(&self.backend, &other.backend) || shared(&self.model, &other.model))
            && meets(&self.backend, &other.backend)
            && meets(&self.model, &other.model)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut fields = Vec::new();
        if let Some(backend) = &self.backend {
            fields.push(format!("backend: {backend:?}"));
        }
        if let Some(model) = &self.model {
            fields.push(format!("model: {model:?}"));
        }
        write!(f, "{{{}}}", fields.join(", "))
    }
}

/// One validated pool.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PoolSpec {
    pub scale_target_ref: ScaleTargetRef,
    pub replicas: ReplicaBounds,
    pub gpus_per_replica: u32,
    pub capacity: CapacityHints,
}

/// `1 <= min <= max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaBounds {
    min: u32,
    max: u32,
}

/// Per-replica capacity hints; each is finite and above 0 when set.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[non_exhaustive]
pub struct CapacityHints {
    pub prefill_tokens_per_s: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
    pub concurrent_sequences: Option<f64>,
}

/// Latency objectives; at least one is set, each above 0; percentile in [1, 100).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Slo {
    pub ttft: Option<Duration>,
    pub tpot: Option<Duration>,
    pub percentile: f64,
}

/// Validated behaviour; `panic_threshold > 1`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Behavior {
    pub scale_up: ScalingRules,
    pub scale_down: ScalingRules,
    pub cooldown: Duration,
    pub panic_threshold: f64,
}

/// One direction's rules; `max_step >= 1`, `period > 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScalingRules {
    pub stabilization_window: Duration,
    pub max_step: u32,
    pub period: Duration,
}

// === impl AutoscalerSpec ===

impl AutoscalerSpec {
    /// Validates `raw`, naming fields from `path` (`"spec"` for the CRD, `"autoscalers[2]"` for a
    /// list in a file).
    pub fn from_raw(raw: &AutoscalerSpecRaw, path: &str) -> Result<Self, SpecError> {
        Validator::new(path).autoscaler(raw)
    }

    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    pub fn pools(&self) -> &Pools<PoolSpec> {
        &self.pools
    }

    /// GPUs the pools hold at their minReplicas: the least a GPU budget over them can be.
    pub fn gpus_at_min_replicas(&self) -> u64 {
        gpus_at_min_replicas(&self.pools)
    }

    pub fn slo(&self) -> &Slo {
        &self.slo
    }

    pub fn behavior(&self) -> &Behavior {
        &self.behavior
    }

    pub fn scale_to_zero(&self) -> bool {
        self.scale_to_zero
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn gpu_budget(&self) -> Option<u32> {
        self.gpu_budget
    }
}

impl TryFrom<&AutoscalerSpecRaw> for AutoscalerSpec {
    type Error = SpecError;

    fn try_from(raw: &AutoscalerSpecRaw) -> Result<Self, SpecError> {
        Self::from_raw(raw, "spec")
    }
}

impl TryFrom<AutoscalerSpecRaw> for AutoscalerSpec {
    type Error = SpecError;

    fn try_from(raw: AutoscalerSpecRaw) -> Result<Self, SpecError> {
        Self::from_raw(&raw, "spec")
    }
}

// === impl ReplicaBounds ===

impl ReplicaBounds {
    /// Bounds while serving: `min >= 1` (idle pools reach 0 only through `scaleToZero`) and
    /// `max >= min`.
    pub fn try_new(min: u32, max: u32) -> Result<Self, SpecError> {
        let mut v = Validator::new("replicas");
        let bounds = v.bounds(min, max);
        v.finish(bounds)
    }

    pub fn min(self) -> u32 {
        self.min
    }

    pub fn max(self) -> u32 {
        self.max
    }
}

// === impl ScalingRules ===

impl ScalingRules {
    /// `max_step >= 1` and `period > 0`.
    pub fn try_new(
        stabilization_window: Duration,
        max_step: u32,
        period: Duration,
    ) -> Result<Self, SpecError> {
        let mut v = Validator::new("rules");
        if max_step == 0 {
            v.error("maxStep", max_step, "must be >= 1");
        }
        if period.is_zero() {
            v.error("period", DurationDisplay(period), "must be > 0");
        }
        v.finish(Self {
            stabilization_window,
            max_step,
            period,
        })
    }
}

// ===== errors =====

/// One violated rule: where, what was there, and what the rule is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} = {value}: {rule}")]
pub struct FieldError {
    /// Dotted path, e.g. `spec.pools.decode.maxReplicas`.
    pub path: String,
    /// The value found, as written (`(absent)` when missing).
    pub value: String,
    /// The rule it breaks.
    pub rule: String,
}

/// Every rule an autoscaler spec breaks (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    errors: Vec<FieldError>,
}

impl SpecError {
    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn gpus_at_min_replicas(pools: &Pools<PoolSpec>) -> u64 {
    pools
        .iter()
        .map(|(_, p)| u64::from(p.replicas.min()) * u64::from(p.gpus_per_replica))
        .sum()
}

// ===== validation =====

/// Shown for a field that is not there.
const ABSENT: &str = "(absent)";

/// Collects every violation rather than stopping at the first.
struct Validator {
    prefix: String,
    errors: Vec<FieldError>,
}

/// A string value as written, quoted.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Validator {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            errors: Vec::new(),
        }
    }

    fn error(&mut self, path: &str, value: impl fmt::Display, rule: impl Into<String>) {
        let path = if path.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{}", self.prefix, path)
        };
        self.errors.push(FieldError {
            path,
            value: value.to_string(),
            rule: rule.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, SpecError> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(SpecError {
                errors: self.errors,
            })
        }
    }

    fn non_empty(&mut self, path: &str, value: &str) {
        if value.trim().is_empty() {
            self.error(path, Quoted(value), "must not be empty");
        }
    }

    fn duration(&mut self, path: &str, text: Option<&str>, default: Duration) -> Duration {
        match text {
            None => default,
            Some(text) => match parse_duration(text) {
                Ok(d) => d,
                Err(e) => {
                    self.error(
                        path,
                        Quoted(text),
                        format!("not a duration ({e}); write e.g. \"500ms\", \"2s\", \"1m30s\""),
                    );
                    default
                }
            },
        }
    }

    fn autoscaler(mut self, raw: &AutoscalerSpecRaw) -> Result<AutoscalerSpec, SpecError> {
        let selector = self.selector(&raw.selector);
        let pools = self.pools(&raw.pools);
        let slo = self.slo(&raw.slo);
        let behavior = self.behavior(&raw.behavior);
        if let Some(pools) = &pools {
            self.slo_covers_pools(&raw.slo, pools);
            if let Some(budget) = raw.gpu_budget {
                let floor = gpus_at_min_replicas(pools);
                if u64::from(budget) < floor {
                    self.error(
                        "gpuBudget",
                        budget,
                        format!("must be >= the GPUs of all pools at minReplicas ({floor})"),
                    );
                }
            }
        }
        match pools {
            Some(pools) => self.finish(AutoscalerSpec {
                selector,
                pools,
                slo,
                behavior,
                scale_to_zero: raw.scale_to_zero,
                dry_run: raw.dry_run,
                gpu_budget: raw.gpu_budget,
            }),
            // The pools' own errors are already recorded.
            None => Err(SpecError {
                errors: self.errors,
            }),
        }
    }

    fn selector(&mut self, raw: &SelectorRaw) -> Selector {
        if raw.backend.is_none() && raw.model.is_none() {
            self.error("selector", "{}", "give backend, model or both");
        }
        if let Some(backend) = &raw.backend {
            self.non_empty("selector.backend", backend);
        }
        if let Some(model) = &raw.model {
            self.non_empty("selector.model", model);
        }
        Selector {
            backend: raw.backend.clone(),
            model: raw.model.clone(),
        }
    }

    fn pools(&mut self, raw: &PoolsRaw) -> Option<Pools<PoolSpec>> {
        const SHAPE: &str = "give either unified, or prefill and decode";
        let given = |raw: &PoolsRaw| {
            let names: Vec<&str> = [
                ("unified", raw.unified.is_some()),
                ("prefill", raw.prefill.is_some()),
                ("decode", raw.decode.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
            format!("{{{}}}", names.join(", "))
        };
        match (&raw.unified, &raw.prefill, &raw.decode) {
            (Some(unified), None, None) => {
                let unified = self.pool("pools.unified", unified);
                Some(Pools::Unified(unified))
            }
            (None, Some(prefill), Some(decode)) => {
                let prefill_hints = prefill.capacity.clone().unwrap_or_default();
                let decode_hints = decode.capacity.clone().unwrap_or_default();
                let prefill = self.pool("pools.prefill", prefill);
                let decode = self.pool("pools.decode", decode);
                // A hint the pool is never sized on would be dropped without a word.
                const PREFILL_ONLY: &str = "not read for a prefill pool: it is sized on input tokens only \
                     (prefillTokensPerSecond)";
                const DECODE_ONLY: &str = "not read for a decode pool: it is sized on output \
                     tokens and decoding sequences (decodeTokensPerSecond, concurrentSequences)";
                if let Some(v) = prefill_hints.concurrent_sequences {
                    self.error(
                        "pools.prefill.capacity.concurrentSequences",
                        v,
                        PREFILL_ONLY,
                    );
                }
                if let Some(v) = prefill_hints.decode_tokens_per_second {
                    self.error(
                        "pools.prefill.capacity.decodeTokensPerSecond",
                        v,
                        PREFILL_ONLY,
                    );
                }
                if let Some(v) = decode_hints.prefill_tokens_per_second {
                    self.error(
                        "pools.decode.capacity.prefillTokensPerSecond",
                        v,
                        DECODE_ONLY,
                    );
                }
                if prefill.scale_target_ref == decode.scale_target_ref {
                    self.error(
                        "pools.decode.scaleTargetRef",
                        Quoted(&decode.scale_target_ref.to_string()),
                        "must differ from pools.prefill.scaleTargetRef",
                    );
                }
                Some(Pools::Disaggregated { prefill, decode })
            }
            (None, Some(_), None) => {
                self.error(
                    "pools.decode",
                    ABSENT,
                    "required with prefill (disaggregated serving needs both pools)",
                );
                None
            }
            (None, None, Some(_)) => {
                self.error(
                    "pools.prefill",
                    ABSENT,
                    "required with decode (disaggregated serving needs both pools)",
                );
                None
            }
            _ => {
                self.error("pools", given(raw), SHAPE);
                None
            }
        }
    }

    fn pool(&mut self, path: &str, raw: &PoolSpecRaw) -> PoolSpec {
        let target = &raw.scale_target_ref;
        self.non_empty(
            &format!("{path}.scaleTargetRef.apiVersion"),
            &target.api_version,
        );
        self.non_empty(&format!("{path}.scaleTargetRef.kind"), &target.kind);
        self.non_empty(&format!("{path}.scaleTargetRef.name"), &target.name);
        if let Some(ns) = &target.namespace {
            self.non_empty(&format!("{path}.scaleTargetRef.namespace"), ns);
        }
        let nested = format!("{}.{path}", self.prefix);
        let prefix = std::mem::replace(&mut self.prefix, nested);
        let replicas = self.bounds(raw.min_replicas, raw.max_replicas);
        self.prefix = prefix;

        let hints = raw.capacity.clone().unwrap_or_default();
        let mut rate = |name: &str, value: Option<f64>| -> Option<f64> {
            let value = value?;
            if value.is_finite() && value > 0.0 {
                Some(value)
            } else {
                self.error(
                    &format!("{path}.capacity.{name}"),
                    value,
                    "must be a number above 0",
                );
                None
            }
        };
        let prefill_tokens_per_s = rate("prefillTokensPerSecond", hints.prefill_tokens_per_second);
        let decode_tokens_per_s = rate("decodeTokensPerSecond", hints.decode_tokens_per_second);
        let concurrent_sequences = match hints.concurrent_sequences {
            Some(0) => {
                self.error(
                    &format!("{path}.capacity.concurrentSequences"),
                    0,
                    "must be >= 1",
                );
                None
            }
            other => other.map(f64::from),
        };
        PoolSpec {
            scale_target_ref: raw.scale_target_ref.clone(),
            replicas,
            gpus_per_replica: raw.gpus_per_replica,
            capacity: CapacityHints {
                prefill_tokens_per_s,
                decode_tokens_per_s,
                concurrent_sequences,
            },
        }
    }

    /// Checks bounds under the current prefix; returns them repaired so checking can go on.
    fn bounds(&mut self, min: u32, max: u32) -> ReplicaBounds {
        if min == 0 {
            self.error(
                "minReplicas",
                min,
                "must be >= 1 (scaleToZero: true lets idle pools reach 0)",
            );
        }
        if max < min.max(1) {
            self.error(
                "maxReplicas",
                max,
                format!("must be >= minReplicas ({})", min.max(1)),
            );
        }
        let min = min.max(1);
        ReplicaBounds {
            min,
            max: max.max(min),
        }
    }

    fn slo(&mut self, raw: &SloRaw) -> Slo {
        if raw.ttft.is_none() && raw.tpot.is_none() {
            self.error("slo", "{}", "give ttft, tpot or both");
        }
        let mut objective = |name: &str, text: Option<&String>| -> Option<Duration> {
            let text = text?;
            let path = format!("slo.{name}");
            let d = self.duration(&path, Some(text), Duration::ZERO);
            if d.is_zero() {
                if parse_duration(text).is_ok() {
                    self.error(&path, Quoted(text), "must be above 0");
                }
                None
            } else {
                Some(d)
            }
        };
        let ttft = objective("ttft", raw.ttft.as_ref());
        let tpot = objective("tpot", raw.tpot.as_ref());
        if !(raw.percentile.is_finite() && raw.percentile > 0.0 && raw.percentile < 100.0) {
            self.error("slo.percentile", raw.percentile, "must be > 0 and < 100");
        } else if raw.percentile < 1.0 {
            // Almost surely a quantile (Prometheus writes p99 as 0.99): as a percentile it would
            // hold the objective against nearly the fastest request.
            self.error(
                "slo.percentile",
                raw.percentile,
                "must be >= 1: a percentile, not a quantile (99 for p99, not 0.99)",
            );
        }
        Slo {
            ttft,
            tpot,
            percentile: raw.percentile,
        }
    }

    /// Disaggregated pools each need something to size them on: an objective or a capacity hint.
    fn slo_covers_pools(&mut self, slo: &SloRaw, pools: &Pools<PoolSpec>) {
        if let Pools::Disaggregated { prefill, decode } = pools {
            if slo.ttft.is_none() && prefill.capacity.prefill_tokens_per_s.is_none() {
                self.error(
                    "slo.ttft",
                    ABSENT,
                    "required for the prefill pool unless \
                     pools.prefill.capacity.prefillTokensPerSecond is given",
                );
            }
            if slo.tpot.is_none()
                && decode.capacity.decode_tokens_per_s.is_none()
                && decode.capacity.concurrent_sequences.is_none()
            {
                self.error(
                    "slo.tpot",
                    ABSENT,
                    "required for the decode pool unless pools.decode.capacity gives \
                     decodeTokensPerSecond or concurrentSequences",
                );
            }
        }
    }

    fn behavior(&mut self, raw: &BehaviorRaw) -> Behavior {
        let scale_up = self.rules("behavior.scaleUp", raw.scale_up.as_ref(), DEFAULT_SCALE_UP);
        let scale_down = self.rules(
            "behavior.scaleDown",
            raw.scale_down.as_ref(),
            DEFAULT_SCALE_DOWN,
        );
        let cooldown = self.duration(
            "behavior.cooldown",
            raw.cooldown.as_deref(),
            DEFAULT_COOLDOWN,
        );
        let panic_threshold = match raw.panic_threshold {
            None => DEFAULT_PANIC_THRESHOLD,
            Some(t) if t.is_finite() && t > 1.0 => t,
            Some(t) => {
                self.error("behavior.panicThreshold", t, "must be a number above 1");
                DEFAULT_PANIC_THRESHOLD
            }
        };
        Behavior {
            scale_up,
            scale_down,
            cooldown,
            panic_threshold,
        }
    }

    fn rules(
        &mut self,
        path: &str,
        raw: Option<&ScalingRulesRaw>,
        default: ScalingRules,
    ) -> ScalingRules {
        let Some(raw) = raw else {
            return default;
        };
        let stabilization_window = self.duration(
            &format!("{path}.stabilizationWindow"),
            raw.stabilization_window.as_deref(),
            default.stabilization_window,
        );
        let max_step = match raw.max_step {
            None => default.max_step,
            Some(0) => {
                self.error(&format!("{path}.maxStep"), 0, "must be >= 1");
                default.max_step
            }
            Some(n) => n,
        };
        let period_path = format!("{path}.period");
        let mut period = self.duration(&period_path, raw.period.as_deref(), default.period);
        if period.is_zero() {
            self.error(
                &period_path,
                Quoted(raw.period.as_deref().unwrap_or("0")),
                "must be above 0",
            );
            period = default.period;
        }
        ScalingRules {
            stabilization_window,
            max_step,
            period,
        }
    }
}
