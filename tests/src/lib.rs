//! End-to-end test support: what only tests need on top of `flyball-local` (which starts real
//! Envoy and waits for it).
//!
//! - [`receiver`]: a gRPC `TelemetryService` that records every report it is sent, and can be
//!   taken down and brought back on the same port.
#![forbid(unsafe_code)]

pub mod receiver;

pub use flyball_local::control::{LocalControl, control_args};
