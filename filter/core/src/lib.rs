//! The filter's pure core: everything flyball's proxy-wasm filter decides, without proxy-wasm.
//!
//! request body -> [`request::inspect_request`] (model, stream, usage injection) ->
//! response headers and chunks -> [`response::ResponseTracker`] (SSE parsing, TTFT/ITL/TPOT,
//! tokens, stripping what the filter injected) -> [`response::RequestRecord`] ->
//! [`aggregate::Accumulator`] (per worker) -> [`shared::merge_worker_delta`] (process-wide, in
//! Envoy shared data) -> [`report::plan_tick`] / [`report::build_report`] -> `flyball.v1` report.
//! A report stream given up on is half-closed and waited on, within bounds ([`left::LeftStreams`]).
//!
//! The glue in `filter/` turns host calls into these values and back; this crate reads no clock
//! (time is a [`Nanos`] or millisecond parameter), does no I/O, and builds for `wasm32-wasip1`
//! and natively, where it is tested. It must never panic on any input: a panic traps the VM and
//! Envoy then fails every stream on it. Anything it cannot understand is passed through
//! unchanged and counted as unmeasured.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod config;
pub mod event;
pub mod left;
pub mod report;
pub mod request;
pub mod response;
pub mod shared;
pub mod sse;

#[cfg(any(fuzzing, test))]
pub mod fuzzing;

/// Monotonic nanoseconds, supplied by the caller (the glue measures from VM start).
pub type Nanos = u64;

pub use aggregate::{Accumulator, KeyId, Labels, WorkerDelta, stat_label};
pub use config::{ConfigError, FilterConfig};
pub use report::{ReporterState, TickPlan, build_report, on_response, plan_tick, record_pending};
pub use request::{RequestError, RequestInspection, RewriteOptions, StripPlan, inspect_request};
pub use response::{
    BodyVerdict, HeaderVerdict, Outcome, Phase, RequestRecord, ResponseTracker, TrackPlan,
    classify_outcome,
};
pub use shared::{Accumulation, ReportKeys, merge_worker_delta, take_report_keys};
