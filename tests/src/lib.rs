//! End-to-end test support: what only tests need on top of `flyball-local` (which starts real
//! Envoy and waits for it).
//!
//! - [`receiver`]: a gRPC `TelemetryService` that records every report it is sent, and can be
//!   taken down and brought back on the same port.
//! - [`streaming_chat`]: the body of a streaming chat completion request.
#![forbid(unsafe_code)]

pub mod receiver;

/// The body of a short streaming chat completion request for `model`.
pub fn streaming_chat(model: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": true
    }))
    .unwrap_or_default()
}

pub use flyball_local::control::{LocalControl, control_args};
