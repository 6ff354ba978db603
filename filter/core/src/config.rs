//! Plugin configuration: the JSON Envoy hands the filter at VM start, validated once.
//!
//! Two steps, as everywhere in flyball: serde into [`RawConfig`] (camelCase, unknown keys
//! rejected), then [`FilterConfig::try_from`], which checks every rule and is the only type the rest
//! of the filter sees. Every error names the field path, the value and the rule, so Envoy's log
//! line (the glue returns `false` from `on_configure`) is enough to fix the configuration.

use flyball_proto::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_MODELS_PER_BACKEND, MAX_NAME_BYTES};
use serde::Deserialize;
use std::fmt;

/// Every top-level key the configuration accepts, in the order the docs list them.
pub const FIELDS: &[&str] = &[
    "controlCluster",
    "controlAuthority",
    "reportIntervalMs",
    "reportTimeoutMs",
    "gateway",
    "paths",
    "backend",
    "maxModelsPerBackend",
    "maxBackends",
    "injectIncludeUsage",
    "continuousUsageStats",
    "maxRequestBodyBytes",
    "maxResponseJsonBytes",
    "maxSseLineBytes",
    "maxBufferedReportBytes",
    "sparseSketches",
];

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Why a configuration was refused. Display gives the path, the value and the rule.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration is not valid JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    #[error("configuration must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error(
        "unknown field {field:?} at top level (expected one of {})",
        expected_list()
    )]
    UnknownField { field: String },
    #[error("{path}: {message}")]
    Type { path: String, message: String },
    #[error("{path} = {value}: {rule}")]
    Invalid {
        path: String,
        value: String,
        rule: String,
    },
}

fn expected_list() -> String {
    let quoted: Vec<String> = FIELDS.iter().map(|f| format!("{f:?}")).collect();
    quoted.join(", ")
}

/// The configuration as written: every field optional, camelCase.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawConfig {
    pub control_cluster: Option<String>,
    pub control_authority: Option<String>,
    pub report_interval_ms: Option<u64>,
    pub report_timeout_ms: Option<u64>,
    pub gateway: Option<String>,
    pub paths: Option<Vec<String>>,
    pub backend: Option<String>,
    pub max_models_per_backend: Option<u64>,
    pub max_backends: Option<u64>,
    pub inject_include_usage: Option<bool>,
    pub continuous_usage_stats: Option<Vec<String>>,
    pub max_request_body_bytes: Option<u64>,
    pub max_response_json_bytes: Option<u64>,
    pub max_sse_line_bytes: Option<u64>,
    pub max_buffered_report_bytes: Option<u64>,
    pub sparse_sketches: Option<bool>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    /// Envoy cluster of the control service; `None`: no gRPC reports, Envoy stats only.
    pub control_cluster: Option<String>,
    /// `:authority` of the gRPC calls; `None`: the glue uses the cluster name.
    pub control_authority: Option<String>,
    /// How often each process reports (100 ms to 60 s; default 1 s).
    pub report_interval_ms: u64,
    /// Timeout of one report call (50 ms to 60 s; default max(interval, 1 s)).
    pub report_timeout_ms: u64,
    /// Reporter name; `None`: the glue falls back to the node id or the host name.
    pub gateway: Option<String>,
    /// Request paths measured, matched exactly against the path without its query string.
    pub paths: Vec<String>,
    /// Fixed backend name; `None`: the upstream cluster name.
    pub backend: Option<String>,
    /// Distinct models per backend before further models count as "other".
    pub max_models_per_backend: usize,
    /// Distinct backends before further backends count as "other".
    pub max_backends: usize,
    /// Ask streaming requests for `stream_options.include_usage` (and strip what it adds).
    pub inject_include_usage: bool,
    /// Backends (vLLM) for which to also ask for `stream_options.continuous_usage_stats`.
    pub continuous_usage_stats: Vec<String>,
    /// Request bodies larger than this are not inspected (model "unknown", no injection, tokens
    /// estimated or unmeasured). The glue buffers the request body up to this size to rewrite it,
    /// so it must stay at or below Envoy's buffer limit (`per_connection_buffer_limit_bytes`,
    /// 1 MiB by default): beyond that Envoy answers 413 instead of passing the request on.
    pub max_request_body_bytes: usize,
    /// Non-streaming JSON responses are copied up to this size to read `usage`; larger ones are
    /// counted with tokens unmeasured. The filter copies; Envoy never buffers the response.
    pub max_response_json_bytes: usize,
    /// Longest SSE line (and event data) carried across body chunks; beyond it the response is
    /// passed through unparsed.
    pub max_sse_line_bytes: usize,
    /// Bound on undelivered telemetry kept in shared data while the control service is
    /// unreachable; beyond it new deltas are dropped (and counted as dropped requests).
    pub max_buffered_report_bytes: usize,
    /// Send each sketch in the smaller of its dense and sparse forms (`flyball.v1.Sketch`); off,
    /// dense only, for control services that predate the sparse form.
    pub sparse_sketches: bool,
}

// === impl FilterConfig ===

impl Default for FilterConfig {
    fn default() -> Self {
        // The raw default always validates: `defaults_validate` pins it.
        FilterConfig::try_from(RawConfig::default()).unwrap_or_else(|_| FilterConfig::fallback())
    }
}

impl FilterConfig {
    /// Parses and validates the plugin configuration. Empty (or whitespace-only) bytes give the
    /// defaults.
    pub fn from_json(bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return FilterConfig::try_from(RawConfig::default());
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(ConfigError::Syntax)?;
        let object = match &value {
            serde_json::Value::Object(object) => object,
            other => return Err(ConfigError::NotAnObject(json_kind(other))),
        };
        // Checked before serde so the message lists the accepted keys in our words.
        if let Some(field) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(ConfigError::UnknownField {
                field: field.clone(),
            });
        }
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Type {
                path,
                message: e.into_inner().to_string(),
            }
        })?;
        FilterConfig::try_from(raw)
    }

    /// Whether requests to `path` (query string allowed, ignored) are measured.
    pub fn measures_path(&self, path: &str) -> bool {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        self.paths.iter().any(|p| p == path)
    }

    /// The request rewrite options for a request routed to `backend`.
    pub fn rewrite_options(&self, backend: &str) -> crate::request::RewriteOptions {
        crate::request::RewriteOptions {
            inject_include_usage: self.inject_include_usage,
            continuous_usage: self.inject_include_usage
                && self.continuous_usage_stats.iter().any(|b| b == backend),
        }
    }

    /// What in this valid configuration may still lose telemetry, for the glue to log: label
    /// caps that allow more keys a report than a control service with its defaults takes.
    pub fn caveats(&self) -> Vec<String> {
        let keys =
            flyball_proto::max_keys_under_caps(self.max_backends, self.max_models_per_backend);
        let mut caveats = Vec::new();
        if keys > flyball_proto::DEFAULT_MAX_KEYS_PER_REPORT {
            caveats.push(format!(
                "maxBackends = {} and maxModelsPerBackend = {} allow {keys} keys a report, more than \
                 a control service takes by default ({}): a fuller report would be refused whole \
                 unless its --max-keys-per-report is raised to {keys}",
                self.max_backends,
                self.max_models_per_backend,
                flyball_proto::DEFAULT_MAX_KEYS_PER_REPORT
            ));
        }
        caveats
    }

    // Only reachable if the defaults stopped validating, which a test forbids.
    fn fallback() -> Self {
        FilterConfig {
            control_cluster: None,
            control_authority: None,
            report_interval_ms: 1000,
            report_timeout_ms: 1000,
            gateway: None,
            paths: default_paths(),
            backend: None,
            max_models_per_backend: DEFAULT_MAX_MODELS_PER_BACKEND,
            max_backends: DEFAULT_MAX_BACKENDS,
            inject_include_usage: true,
            continuous_usage_stats: Vec::new(),
            max_request_body_bytes: MIB as usize,
            max_response_json_bytes: MIB as usize,
            max_sse_line_bytes: (256 * KIB) as usize,
            max_buffered_report_bytes: MIB as usize,
            sparse_sketches: true,
        }
    }
}

/// The longest length a field of the serialized `GrpcService { envoy_grpc { cluster_name,
/// authority } }` the glue hands Envoy may have: the SDK takes it as text, and a length of 128
/// or more is a varint of two bytes, the first with its high bit set, which is not UTF-8.
const MAX_FIELD_BYTES: usize = 127;

/// Whether the control service's cluster (and `:authority`, when it differs: Envoy defaults it
/// to the cluster's name) fit one `EnvoyGrpc` message of at most [`MAX_FIELD_BYTES`].
fn fits_one_grpc_service(cluster: &str, authority: Option<&str>) -> Result<(), ConfigError> {
    // Each string is a tag byte, a length byte and its bytes.
    let field = |s: &str| 2 + s.len();
    const WHY: &str = "Envoy is given the control service as a serialized GrpcService, whose \
                       EnvoyGrpc message must stay under 128 bytes";
    match authority.filter(|a| *a != cluster) {
        None if field(cluster) > MAX_FIELD_BYTES => Err(invalid(
            "controlCluster",
            &format!("{cluster:?}"),
            &format!("must be at most {} bytes ({WHY})", MAX_FIELD_BYTES - 2),
        )),
        Some(authority) if field(cluster) + field(authority) > MAX_FIELD_BYTES => Err(invalid(
            "controlAuthority",
            &format!("{authority:?}"),
            &format!(
                "with controlCluster ({} bytes) must be at most {} bytes together ({WHY})",
                cluster.len(),
                MAX_FIELD_BYTES - 4
            ),
        )),
        _ => Ok(()),
    }
}

fn default_paths() -> Vec<String> {
    vec![
        "/v1/chat/completions".to_string(),
        "/v1/completions".to_string(),
    ]
}

impl TryFrom<RawConfig> for FilterConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let report_interval_ms = in_range(
            "reportIntervalMs",
            raw.report_interval_ms,
            1000,
            100,
            60_000,
        )?;
        let report_timeout_ms = in_range(
            "reportTimeoutMs",
            raw.report_timeout_ms,
            report_interval_ms.max(1000),
            50,
            60_000,
        )?;
        let control_cluster = non_empty("controlCluster", raw.control_cluster)?;
        let control_authority = non_empty("controlAuthority", raw.control_authority)?;
        if let Some(cluster) = &control_cluster {
            fits_one_grpc_service(cluster, control_authority.as_deref())?;
        }
        let gateway = name("gateway", raw.gateway)?;
        let backend = name("backend", raw.backend)?;

        let paths = raw.paths.unwrap_or_else(default_paths);
        if paths.is_empty() {
            return Err(invalid("paths", "[]", "must list at least one path"));
        }
        for (i, path) in paths.iter().enumerate() {
            let rule = if !path.starts_with('/') {
                Some("must start with \"/\"")
            } else if path.contains('?') {
                Some("must not contain a query string (paths match without it)")
            } else if path.chars().any(char::is_whitespace) {
                Some("must not contain whitespace")
            } else {
                None
            };
            if let Some(rule) = rule {
                return Err(invalid(&format!("paths[{i}]"), &format!("{path:?}"), rule));
            }
        }

        let continuous_usage_stats = raw.continuous_usage_stats.unwrap_or_default();
        for (i, name) in continuous_usage_stats.iter().enumerate() {
            if name.is_empty() {
                return Err(invalid(
                    &format!("continuousUsageStats[{i}]"),
                    "\"\"",
                    "must be a backend name",
                ));
            }
        }

        Ok(FilterConfig {
            control_cluster,
            control_authority,
            report_interval_ms,
            report_timeout_ms,
            gateway,
            paths,
            backend,
            max_models_per_backend: in_range(
                "maxModelsPerBackend",
                raw.max_models_per_backend,
                DEFAULT_MAX_MODELS_PER_BACKEND as u64,
                1,
                10_000,
            )? as usize,
            max_backends: in_range(
                "maxBackends",
                raw.max_backends,
                DEFAULT_MAX_BACKENDS as u64,
                1,
                10_000,
            )? as usize,
            inject_include_usage: raw.inject_include_usage.unwrap_or(true),
            continuous_usage_stats,
            max_request_body_bytes: in_range(
                "maxRequestBodyBytes",
                raw.max_request_body_bytes,
                MIB,
                KIB,
                64 * MIB,
            )? as usize,
            max_response_json_bytes: in_range(
                "maxResponseJsonBytes",
                raw.max_response_json_bytes,
                MIB,
                KIB,
                64 * MIB,
            )? as usize,
            max_sse_line_bytes: in_range(
                "maxSseLineBytes",
                raw.max_sse_line_bytes,
                256 * KIB,
                KIB,
                16 * MIB,
            )? as usize,
            max_buffered_report_bytes: in_range(
                "maxBufferedReportBytes",
                raw.max_buffered_report_bytes,
                MIB,
                64 * KIB,
                64 * MIB,
            )? as usize,
            sparse_sketches: raw.sparse_sketches.unwrap_or(true),
        })
    }
}

fn in_range(
    path: &str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let value = value.unwrap_or(default);
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            path,
            &value.to_string(),
            &format!("must be between {min} and {max}"),
        ))
    }
}

fn non_empty(path: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    match value {
        Some(v) if v.trim().is_empty() => Err(invalid(
            path,
            &format!("{v:?}"),
            "must not be empty (omit the field instead)",
        )),
        other => Ok(other),
    }
}

/// A gateway or backend name: not empty, and one the control service takes.
fn name(path: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    match non_empty(path, value)? {
        Some(v) if v.len() > MAX_NAME_BYTES => Err(invalid(
            path,
            &format!("{} bytes", v.len()),
            &format!("must be at most {MAX_NAME_BYTES} bytes"),
        )),
        other => Ok(other),
    }
}

/// `node_id` as a gateway name the control service takes: cut, at a character boundary, to
/// [`MAX_NAME_BYTES`]. Node ids that long differ well before their end (Istio's carry the pod's
/// address and name first).
pub fn gateway_from_node_id(node_id: &str) -> &str {
    let mut end = node_id.len().min(MAX_NAME_BYTES);
    while !node_id.is_char_boundary(end) {
        end -= 1;
    }
    &node_id[..end]
}

fn invalid(path: &str, value: &str, rule: &str) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_string(),
        value: value.to_string(),
        rule: rule.to_string(),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl fmt::Display for FilterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "control={} interval={}ms timeout={}ms paths={:?} backend={} maxBackends={} maxModelsPerBackend={} injectIncludeUsage={}",
            self.control_cluster.as_deref().unwrap_or("-"),
            self.report_interval_ms,
            self.report_timeout_ms,
            self.paths,
            self.backend.as_deref().unwrap_or("(upstream cluster)"),
            self.max_backends,
            self.max_models_per_backend,
            self.inject_include_usage,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        match FilterConfig::from_json(json.as_bytes()) {
            Ok(c) => panic!("expected an error for {json}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_validate() {
        assert!(FilterConfig::try_from(RawConfig::default()).is_ok());
        assert_eq!(FilterConfig::default(), FilterConfig::fallback());
    }

    #[test]
    fn label_caps_past_what_the_control_service_takes_are_named() {
        assert!(FilterConfig::default().caveats().is_empty());
        let raised =
            FilterConfig::from_json(br#"{"maxBackends":64,"maxModelsPerBackend":257}"#).unwrap();
        assert_eq!(
            raised.caveats(),
            [
                "maxBackends = 64 and maxModelsPerBackend = 257 allow 16835 keys a report, more than \
              a control service takes by default (16770): a fuller report would be refused whole \
              unless its --max-keys-per-report is raised to 16835"
            ]
        );
    }

    #[test]
    fn empty_bytes_give_the_defaults() -> Result<(), ConfigError> {
        let config = FilterConfig::from_json(b"")?;
        assert_eq!(config, FilterConfig::default());
        assert_eq!(FilterConfig::from_json(b"  \n")?, config);
        assert_eq!(FilterConfig::from_json(b"{}")?, config);
        assert_eq!(config.report_interval_ms, 1000);
        assert_eq!(config.report_timeout_ms, 1000);
        assert_eq!(config.max_sse_line_bytes, 256 * 1024);
        assert!(config.control_cluster.is_none());
        Ok(())
    }

    #[test]
    fn every_field_parses() -> Result<(), ConfigError> {
        let config = FilterConfig::from_json(
            br#"{"controlCluster":"flyball","controlAuthority":"flyball.svc","reportIntervalMs":250,
                "reportTimeoutMs":2000,"gateway":"gw-0","paths":["/v1/chat/completions"],"backend":"vllm",
                "maxModelsPerBackend":8,"maxBackends":4,"injectIncludeUsage":false,
                "continuousUsageStats":["vllm"],"maxRequestBodyBytes":65536,"maxResponseJsonBytes":65536,
                "maxSseLineBytes":4096,"maxBufferedReportBytes":131072,"sparseSketches":false}"#,
        )?;
        assert_eq!(config.control_cluster.as_deref(), Some("flyball"));
        assert_eq!(config.report_interval_ms, 250);
        assert_eq!(config.report_timeout_ms, 2000);
        assert_eq!(config.max_backends, 4);
        assert!(!config.inject_include_usage);
        assert_eq!(config.max_buffered_report_bytes, 131072);
        assert!(!config.sparse_sketches);
        Ok(())
    }

    #[test]
    fn report_timeout_defaults_to_the_interval_but_at_least_a_second() -> Result<(), ConfigError> {
        assert_eq!(
            FilterConfig::from_json(br#"{"reportIntervalMs":5000}"#)?.report_timeout_ms,
            5000
        );
        assert_eq!(
            FilterConfig::from_json(br#"{"reportIntervalMs":200}"#)?.report_timeout_ms,
            1000
        );
        Ok(())
    }

    #[test]
    fn out_of_range_numbers_name_field_value_and_rule() {
        assert_eq!(
            err(r#"{"reportIntervalMs":50}"#),
            "reportIntervalMs = 50: must be between 100 and 60000"
        );
        assert_eq!(
            err(r#"{"maxModelsPerBackend":0}"#),
            "maxModelsPerBackend = 0: must be between 1 and 10000"
        );
    }

    #[test]
    fn paths_must_be_absolute_and_the_error_names_the_index() {
        assert_eq!(
            err(r#"{"paths":["/v1/chat/completions","v1/x"]}"#),
            r#"paths[1] = "v1/x": must start with "/""#
        );
        assert_eq!(
            err(r#"{"paths":[]}"#),
            "paths = []: must list at least one path"
        );
    }

    #[test]
    fn unknown_fields_are_named_with_the_accepted_ones() {
        let message = err(r#"{"reportIntervall":100}"#);
        assert!(
            message.starts_with(r#"unknown field "reportIntervall" at top level (expected one of "controlCluster", "#),
            "{message}"
        );
    }

    #[test]
    fn wrong_types_name_the_path() {
        assert_eq!(
            err(r#"{"paths":["/a",3]}"#),
            "paths[1]: invalid type: integer `3`, expected a string"
        );
        assert!(
            err(r#"{"injectIncludeUsage":"yes"}"#).starts_with("injectIncludeUsage: invalid type")
        );
    }

    #[test]
    fn syntax_errors_and_non_objects_are_refused() {
        assert!(err("{").starts_with("configuration is not valid JSON"));
        assert_eq!(
            err("[1]"),
            "configuration must be a JSON object, got an array"
        );
    }

    #[test]
    fn empty_names_are_refused() {
        assert_eq!(
            err(r#"{"controlCluster":""}"#),
            r#"controlCluster = "": must not be empty (omit the field instead)"#
        );
    }

    #[test]
    fn names_the_control_service_would_refuse_are_refused_here() {
        let long = "g".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            err(&format!(r#"{{"gateway":"{long}"}}"#)),
            "gateway = 1025 bytes: must be at most 1024 bytes"
        );
        assert_eq!(
            err(&format!(r#"{{"backend":"{long}"}}"#)),
            "backend = 1025 bytes: must be at most 1024 bytes"
        );
    }

    #[test]
    fn node_ids_too_long_for_a_gateway_name_are_cut_at_a_character() {
        assert_eq!(
            gateway_from_node_id("sidecar~10.0.0.1~pod"),
            "sidecar~10.0.0.1~pod"
        );
        let wide = "é".repeat(MAX_NAME_BYTES);
        let cut = gateway_from_node_id(&wide);
        assert_eq!(cut.len(), MAX_NAME_BYTES);
        let odd = format!("x{wide}");
        let cut = gateway_from_node_id(&odd);
        assert_eq!(cut.len(), MAX_NAME_BYTES - 1);
        assert!(odd.starts_with(cut));
    }

    #[test]
    fn paths_match_without_the_query_string() {
        let config = FilterConfig::default();
        assert!(config.measures_path("/v1/chat/completions?x=1"));
        assert!(config.measures_path("/v1/completions"));
        assert!(!config.measures_path("/v1/chat/completions/"));
        assert!(!config.measures_path("/v1/embeddings"));
    }

    #[test]
    fn continuous_usage_applies_only_to_listed_backends() -> Result<(), ConfigError> {
        let config = FilterConfig::from_json(br#"{"continuousUsageStats":["vllm"]}"#)?;
        assert!(config.rewrite_options("vllm").continuous_usage);
        assert!(!config.rewrite_options("openai").continuous_usage);
        assert!(config.rewrite_options("openai").inject_include_usage);
        Ok(())
    }

    #[test]
    fn a_control_service_name_too_long_to_hand_envoy_names_its_field() {
        let long = "c".repeat(126);
        let error = FilterConfig::from_json(format!(r#"{{"controlCluster":"{long}"}}"#).as_bytes())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("controlCluster = "), "{error}");
        let istio = "outbound|9090||flyball-control.flyball-system.svc.cluster.local";
        let authority = "a".repeat(70);
        let json = format!(r#"{{"controlCluster":"{istio}","controlAuthority":"{authority}"}}"#);
        let error = FilterConfig::from_json(json.as_bytes())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("controlAuthority = "), "{error}");
        let json = format!(r#"{{"controlCluster":"{istio}"}}"#);
        assert!(FilterConfig::from_json(json.as_bytes()).is_ok());
    }
}
