//! flyball's wire protocol, package `flyball.v1`: what gateways report to the control service.
//!
//! `flyball/v1/telemetry.proto` is the contract (and `replication.proto` the one between control
//! replicas); `src/gen/` holds their prost and tonic bindings,
//! checked in and verified by `tests/generated_code.rs`, so no protobuf compiler is needed to
//! build. The message types compile everywhere, the wasm32 filter included; the tonic client and
//! server (`grpc` module) need the `grpc` feature and a native target.
//!
//! filter (accumulates deltas) -> `ReportRequest` -> control (merges into windows). This crate also
//! converts [`flyball_sketch::Sketch`] to and from the wire and adds deltas together, so both ends
//! use one definition of "merge".
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all)]
    include!("gen/flyball.v1.rs");
}

#[cfg(feature = "grpc")]
pub mod codec;

#[cfg(feature = "grpc")]
pub mod grpc {
    #![allow(clippy::all)]
    // What sends reports (gateways in tests, followers) and what receives them (the control
    // service) are generated apart: see `codec::ReceivedReport`.
    include!("gen/grpc/client/flyball.v1.TelemetryService.rs");
    include!("gen/grpc/server/flyball.v1.TelemetryService.rs");
    include!("gen/grpc/flyball.v1.ReplicationService.rs");
}

pub use flyball_sketch::{Sketch, SketchError};

/// A gateway, backend or model name, at most, in bytes. The control service refuses a report
/// that names a longer one (it keeps names, so their length bounds its memory); the filter never
/// sends one: it labels a longer model or backend `other` and cuts a longer node id.
pub const MAX_NAME_BYTES: usize = 1024;

// === impl v1::Sketch ===

impl From<&Sketch> for v1::Sketch {
    fn from(sketch: &Sketch) -> Self {
        let parts = sketch.parts();
        v1::Sketch {
            relative_accuracy: parts.relative_accuracy,
            offset: parts.offset,
            counts: parts.counts.to_vec(),
            zero_count: parts.zero_count,
            sum: parts.sum,
            min: parts.min,
            max: parts.max,
        }
    }
}

impl TryFrom<&v1::Sketch> for Sketch {
    type Error = SketchError;

    fn try_from(wire: &v1::Sketch) -> Result<Self, Self::Error> {
        Sketch::from_parts(flyball_sketch::SketchParts {
            relative_accuracy: wire.relative_accuracy,
            offset: wire.offset,
            counts: &wire.counts,
            zero_count: wire.zero_count,
            sum: wire.sum,
            min: wire.min,
            max: wire.max,
        })
    }
}

// === impl v1::RequestOutcomes ===

impl v1::RequestOutcomes {
    pub fn total(&self) -> u64 {
        self.ok
            .saturating_add(self.client_error)
            .saturating_add(self.server_error)
            .saturating_add(self.upstream_reset)
            .saturating_add(self.client_cancel)
    }

    pub fn errors(&self) -> u64 {
        self.total().saturating_sub(self.ok)
    }

    pub fn add(&mut self, other: &Self) {
        self.ok = self.ok.saturating_add(other.ok);
        self.client_error = self.client_error.saturating_add(other.client_error);
        self.server_error = self.server_error.saturating_add(other.server_error);
        self.upstream_reset = self.upstream_reset.saturating_add(other.upstream_reset);
        self.client_cancel = self.client_cancel.saturating_add(other.client_cancel);
    }
}

// === impl v1::TokenUsage ===

impl v1::TokenUsage {
    pub fn add(&mut self, other: &Self) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.input_estimated = self.input_estimated.saturating_add(other.input_estimated);
        self.output_estimated = self.output_estimated.saturating_add(other.output_estimated);
        self.requests_estimated = self
            .requests_estimated
            .saturating_add(other.requests_estimated);
        self.requests_unmeasured = self
            .requests_unmeasured
            .saturating_add(other.requests_unmeasured);
    }
}

// === impl v1::KeyTelemetry ===

impl v1::KeyTelemetry {
    /// Adds the deltas of `other` (counts, tokens, sketches) to `self`; the in-flight gauges,
    /// which are absolute, are left alone. A sketch that does not convert (another accuracy,
    /// corrupt) is skipped rather than poisoning the sum.
    pub fn add_figures(&mut self, other: &Self) {
        if let Some(r) = &other.requests {
            self.requests.get_or_insert_with(Default::default).add(r);
        }
        if let Some(t) = &other.tokens {
            self.tokens.get_or_insert_with(Default::default).add(t);
        }
        merge_sketch(&mut self.ttft_us, &other.ttft_us);
        merge_sketch(&mut self.tpot_us, &other.tpot_us);
        merge_sketch(&mut self.itl_us, &other.itl_us);
        merge_sketch(&mut self.e2e_us, &other.e2e_us);
    }
}

fn merge_sketch(into: &mut Option<v1::Sketch>, from: &Option<v1::Sketch>) {
    let Some(from) = from.as_ref().and_then(|s| Sketch::try_from(s).ok()) else {
        return;
    };
    let mut merged = into
        .as_ref()
        .and_then(|s| Sketch::try_from(s).ok())
        .unwrap_or_default();
    merged.merge(&from);
    *into = Some(v1::Sketch::from(&merged));
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn sketch_survives_the_wire() -> Result<(), Box<dyn std::error::Error>> {
        let mut sketch = Sketch::new();
        for v in [0.5, 3.0, 250.0, 1.0e6, 7.0e6] {
            sketch.record(v);
        }
        let bytes = v1::Sketch::from(&sketch).encode_to_vec();
        let back = Sketch::try_from(&v1::Sketch::decode(bytes.as_slice())?)?;
        assert_eq!(back, sketch);
        Ok(())
    }

    #[test]
    fn an_absent_sketch_decodes_as_a_refusal_not_a_panic() {
        // A default wire sketch has relative_accuracy 0, which older or foreign senders might send.
        assert!(Sketch::try_from(&v1::Sketch::default()).is_err());
    }

    #[test]
    fn outcomes_add_up() {
        let mut a = v1::RequestOutcomes {
            ok: 2,
            client_error: 1,
            ..Default::default()
        };
        a.add(&v1::RequestOutcomes {
            ok: 1,
            upstream_reset: 3,
            client_cancel: 1,
            ..Default::default()
        });
        assert_eq!(a.total(), 8);
        assert_eq!(a.errors(), 5);
    }
}
