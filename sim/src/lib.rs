#![forbid(unsafe_code)]
//! flyball-sim: an OpenAI-compatible model server that stands in for vLLM in tests and demos.
//!
//! Input: HTTP/1.1 or HTTP/2 (h2c, prior knowledge) requests on one listener, shaped by
//! per-request `x-sim-*` headers ([`header`]). Output: vLLM-shaped completions and SSE streams,
//! plus a ground-truth log of what was really sent and when ([`RequestTruth`]), which tests hold
//! a gateway's measurements against.
//!
//! request -> knobs + body -> plan (pure, byte-exact) -> pacer (knobs or engine model) -> body -> hyper
//!
//! It must never let a request change another's bytes: a response is a pure function of its
//! request id, knobs and prompt (plus `created`, fixed by `x-sim-created`). Timing without knobs
//! comes from [`engine`], a pure continuous-batching model. It never panics on input: every
//! malformed body or knob is a 400 with an OpenAI-style error.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`, `GET /sim/requests` (ground truth), `POST /sim/reset`.
//!
//! Prompt tokens are estimated, not tokenized: ceil(characters / 4) over all message contents
//! (or the legacy prompt; token-id prompts count their ids), plus 4 per chat message.

mod body;
pub mod engine;
mod knobs;
mod metrics;
mod openai;
mod pacing;
mod plan;
mod server;
mod tokens;
mod truth;

pub use engine::EngineModel;
pub use knobs::header;
pub use server::{SimConfig, SimServer, serve};
pub use truth::{Outcome, RequestTruth};

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A configuration value breaks a rule.
    #[error("{field} = {value}: {rule}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        rule: &'static str,
    },
    /// The listener has no local address.
    #[error("reading the listener's local address")]
    LocalAddr(#[source] std::io::Error),
}
