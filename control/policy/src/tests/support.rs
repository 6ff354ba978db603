//! Builders shared by the policy tests.

use std::time::Duration;

use crate::*;

pub const SHORT: Duration = Duration::from_secs(10);
pub const STABLE: Duration = Duration::from_secs(60);
/// A `now` well past every restart hold and default window of a memory started at 0.
pub const T0: Duration = Duration::from_secs(10_000);

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// A unified pool with every capacity hint, fast scale-down and no cooldown, so each test
/// switches on only the brakes it is about.
pub const UNIFIED: &str = r#"
selector: { backend: vllm-llama, model: meta-llama/Llama-3.1-8B-Instruct }
pools:
  unified:
    scaleTargetRef: { apiVersion: apps/v1, kind: Deployment, name: llama, namespace: default }
    minReplicas: 1
    maxReplicas: 16
    capacity: { prefillTokensPerSecond: 8000, concurrentSequences: 64, decodeTokensPerSecond: 2000 }
slo: { ttft: 500ms, tpot: 50ms, percentile: 95 }
behavior:
  scaleUp: { stabilizationWindow: 0s, maxStep: 4, period: 1s }
  scaleDown: { stabilizationWindow: 0s, maxStep: 1, period: 1s }
  cooldown: 0s
"#;

/// Prefill and decode pools with hints, same brakes as [`UNIFIED`].
pub const DISAGGREGATED: &str = r#"
selector: { backend: vllm-llama }
pools:
  prefill:
    scaleTargetRef: { name: llama-prefill }
    maxReplicas: 16
    capacity: { prefillTokensPerSecond: 8000 }
  decode:
    scaleTargetRef: { name: llama-decode }
    maxReplicas: 16
    capacity: { decodeTokensPerSecond: 2000, concurrentSequences: 64 }
slo: { ttft: 500ms, tpot: 50ms }
behavior:
  scaleUp: { stabilizationWindow: 0s, maxStep: 4, period: 1s }
  scaleDown: { stabilizationWindow: 0s, maxStep: 1, period: 1s }
  cooldown: 0s
"#;

pub fn raw(yaml: &str) -> AutoscalerSpecRaw {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("test YAML does not parse: {e}"))
}

pub fn spec(yaml: &str) -> AutoscalerSpec {
    spec_with(yaml, |_| {})
}

pub fn spec_with(yaml: &str, edit: impl FnOnce(&mut AutoscalerSpecRaw)) -> AutoscalerSpec {
    let mut raw = raw(yaml);
    edit(&mut raw);
    AutoscalerSpec::try_from(&raw).unwrap_or_else(|e| panic!("test spec is invalid: {e}"))
}

/// Drops every capacity hint of every pool.
pub fn without_hints(raw: &mut AutoscalerSpecRaw) {
    for pool in [
        &mut raw.pools.unified,
        &mut raw.pools.prefill,
        &mut raw.pools.decode,
    ]
    .into_iter()
    .flatten()
    {
        pool.capacity = None;
    }
}

/// One window's worth of traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub requests_per_s: f64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub errors_per_s: f64,
    pub decoding: u32,
    pub waiting: u32,
    pub ttft: Option<Duration>,
    pub tpot: Option<Duration>,
}

impl Load {
    pub fn idle() -> Self {
        Self {
            requests_per_s: 0.0,
            input_tokens_per_s: 0.0,
            output_tokens_per_s: 0.0,
            errors_per_s: 0.0,
            decoding: 0,
            waiting: 0,
            ttft: None,
            tpot: None,
        }
    }

    /// Traffic with latency comfortably within the objectives (40% of each).
    pub fn tokens(input_tokens_per_s: f64, output_tokens_per_s: f64, decoding: u32) -> Self {
        Self {
            requests_per_s: 10.0,
            input_tokens_per_s,
            output_tokens_per_s,
            errors_per_s: 0.0,
            decoding,
            waiting: 0,
            ttft: Some(ms(200)),
            tpot: Some(ms(20)),
        }
    }

    pub fn ttft(self, ttft: Duration) -> Self {
        Self {
            ttft: Some(ttft),
            ..self
        }
    }

    pub fn tpot(self, tpot: Duration) -> Self {
        Self {
            tpot: Some(tpot),
            ..self
        }
    }

    pub fn requests(self, requests_per_s: f64) -> Self {
        Self {
            requests_per_s,
            ..self
        }
    }

    pub fn waiting(self, waiting: u32) -> Self {
        Self { waiting, ..self }
    }
}

pub fn window(length: Duration, load: &Load) -> WindowStats {
    WindowStats {
        length,
        coverage: length,
        request_rate_per_s: load.requests_per_s,
        input_tokens_per_s: load.input_tokens_per_s,
        output_tokens_per_s: load.output_tokens_per_s,
        error_rate_per_s: load.errors_per_s,
        ttft: load.ttft,
        tpot: load.tpot,
        mean_waiting: Some(f64::from(load.waiting)),
        mean_decoding: Some(f64::from(load.decoding)),
    }
}

/// Fresh telemetry with the same load in both windows.
pub fn telemetry(load: Load) -> PoolTelemetry {
    windows(load, load)
}

/// Fresh telemetry with different short and stable windows (in-flight counts from the short one).
pub fn windows(short: Load, stable: Load) -> PoolTelemetry {
    PoolTelemetry {
        freshness: Freshness::Fresh,
        short: window(SHORT, &short),
        stable: window(STABLE, &stable),
        in_flight_waiting: short.waiting,
        in_flight_decoding: short.decoding,
    }
}

/// `desired` asked for, `ready` of them ready, the rest starting; no change time known.
pub fn state(desired: u32, ready: u32) -> PoolState {
    PoolState {
        desired_replicas: desired,
        current_replicas: desired,
        ready_replicas: ready,
        starting_replicas: desired.saturating_sub(ready),
        last_scale_change_at: None,
        time_to_ready: None,
    }
}

pub fn unified(telemetry: PoolTelemetry, state: PoolState) -> AutoscalerInputs {
    Pools::Unified(PoolInputs { telemetry, state })
}

pub fn disaggregated(
    prefill: (PoolTelemetry, PoolState),
    decode: (PoolTelemetry, PoolState),
) -> AutoscalerInputs {
    Pools::Disaggregated {
        prefill: PoolInputs {
            telemetry: prefill.0,
            state: prefill.1,
        },
        decode: PoolInputs {
            telemetry: decode.0,
            state: decode.1,
        },
    }
}

/// Memory of a controller that started at 0.
pub fn memory() -> PolicyMemory {
    PolicyMemory::new(Duration::ZERO)
}

pub fn run(
    spec: &AutoscalerSpec,
    inputs: &AutoscalerInputs,
    memory: &mut PolicyMemory,
    now: Duration,
) -> AutoscalerDecision {
    decide(spec, inputs, memory, now).unwrap_or_else(|e| panic!("decide failed: {e}"))
}

pub fn pool(decision: &AutoscalerDecision, role: Role) -> &PoolDecision {
    decision
        .pools
        .get(role)
        .unwrap_or_else(|| panic!("no {role} pool in the decision"))
}

/// Shorthand: decide once for a unified autoscaler and return its one pool decision.
pub fn decide_unified(
    spec: &AutoscalerSpec,
    telemetry: PoolTelemetry,
    state: PoolState,
    memory: &mut PolicyMemory,
    now: Duration,
) -> PoolDecision {
    let decision = run(spec, &unified(telemetry, state), memory, now);
    pool(&decision, Role::Unified).clone()
}
