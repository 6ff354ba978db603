//! flyball's Envoy filter: the proxy-wasm glue around `flyball-filter-core`, built for
//! `wasm32-wasip1` and loaded as a plain HTTP wasm filter (Envoy, Istio `WasmPlugin`, Envoy
//! Gateway `EnvoyExtensionPolicy`); no bootstrap extension or singleton service is needed.
//!
//! request headers -> request body (model, usage injection) -> response body chunks (TTFT, ITL,
//! usage stripping) -> on_log (outcome, tokens) -> worker accumulator -> Envoy stats and, every
//! report interval, shared data (one process-wide sum) -> gRPC `flyball.v1.TelemetryService/Report`.
//!
//! All parsing and accounting lives in the core crate and is unit-tested natively; this crate
//! only turns host calls into values and back, and is tested inside real Envoy (`tests/`). It must
//! never break traffic: every host error is handled and logged, nothing here panics, and anything
//! the filter does not understand passes through unchanged.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod control_target;
mod http;
mod root;
mod shared;
mod stats;

use proxy_wasm::types::LogLevel;

/// Monotonic nanoseconds since this VM started: the clock of every measurement. WASI's monotonic
/// clock is served by Envoy, so `Instant` does not jump with wall-clock changes.
pub(crate) fn now_nanos(epoch: std::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

proxy_wasm::main! {{
    // Also installs the SDK's panic hook, which logs a panic through the host before the trap.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(root::FlyballRoot::new(context_id)));
}}
