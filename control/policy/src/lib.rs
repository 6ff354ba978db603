//! flyball's scaling policy: how many replicas each model-server pool should have, and why.
//!
//! ```text
//! ingest windows + pool state + now -> decide(spec, inputs, memory, now) -> decision + reason -> actuator
//! ```
//!
//! The control service calls [`decide`] for each autoscaler at each evaluation, with telemetry
//! windows from its ingest and replica counts from the `/scale` subresource; the trace simulator
//! of the roadmap (not built yet) is to call the very same function faster than real time. So the
//! crate is pure and deterministic: time
//! is the `now` parameter, state is the caller-owned [`PolicyMemory`], and it reads no clock,
//! socket or Kubernetes object. [`spec`] holds the autoscaler configuration shared by the CRD and
//! the YAML file, validated into [`AutoscalerSpec`].
//!
//! It never scales down on stale or missing telemetry, never scales to zero unless allowed and a
//! whole stable window of fresh data shows no load, and never panics on any input: "no decision"
//! is a hold with its reason.
#![forbid(unsafe_code)]

pub mod budget;
pub mod decide;
pub mod decision;
pub mod duration;
pub mod inputs;
pub mod memory;
pub mod pools;
pub mod spec;

pub use budget::apply_global_gpu_budget;
pub use decide::{DecideError, decide};
pub use decision::{
    Action, AutoscalerDecision, CapacityEstimate, CapacitySource, CapacityUsed, LoadUsed,
    PoolDecision, Reason, Rule, SloReading, Window,
};
pub use inputs::{AutoscalerInputs, Freshness, PoolInputs, PoolState, PoolTelemetry, WindowStats};
pub use memory::{
    CapacityFlags, CarriedOver, LastDecision, LearnedCapacity, PolicyMemory, PoolMemory,
};
pub use pools::{Pools, Role, Topology};
pub use spec::{AutoscalerSpec, AutoscalerSpecRaw, FieldError, SpecError};

#[cfg(test)]
mod tests;
