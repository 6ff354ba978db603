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
pub mod packed;

#[cfg(feature = "grpc")]
pub mod grpc {
    #![allow(clippy::all)]
    // What sends reports (gateways, in tests) and what receives them (the control service) are
    // generated apart: see `codec::ReceivedReport`.
    include!("gen/grpc/client/flyball.v1.TelemetryService.rs");
    include!("gen/grpc/server/flyball.v1.TelemetryService.rs");
    include!("gen/grpc/flyball.v1.ReplicationService.rs");

    /// The client a follower forwards reports to the leader with, as they arrived.
    pub mod forward {
        include!("gen/grpc/forward/flyball.v1.TelemetryService.rs");
    }
}

pub use flyball_sketch::{Sketch, SketchError, SparseSketch};

/// A gateway, backend or model name, at most, in bytes. The control service refuses a report
/// that names a longer one (it keeps names, so their length bounds its memory); the filter never
/// sends one: it labels a longer model or backend `other` and cuts a longer node id.
pub const MAX_NAME_BYTES: usize = 1024;

/// The filter's `maxBackends` by default.
pub const DEFAULT_MAX_BACKENDS: usize = 64;
/// The filter's `maxModelsPerBackend` by default.
pub const DEFAULT_MAX_MODELS_PER_BACKEND: usize = 256;

/// The most keys one gateway's report can carry under its label caps: each backend admitted has
/// its models, `other` and `unknown`, and the backends past the cap share the `other` backend,
/// which has as many. Caps lowered by a reload do not lower it at once: the process keeps the
/// names it admitted under the higher ones.
pub const fn max_keys_under_caps(max_backends: usize, max_models_per_backend: usize) -> usize {
    (max_backends + 1) * (max_models_per_backend + 2)
}

/// The control service's `--max-keys-per-report` by default: as many keys as a gateway with the
/// default caps can send (16,770), so that only a gateway whose caps were raised past them has a
/// report refused whole for its keys. What all reports together may track is `--max-keys`'s
/// bound (keys past it are dropped, counted, and their pools hold).
pub const DEFAULT_MAX_KEYS_PER_REPORT: usize =
    max_keys_under_caps(DEFAULT_MAX_BACKENDS, DEFAULT_MAX_MODELS_PER_BACKEND);

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
            sparse_gaps: Vec::new(),
            sparse_counts: Vec::new(),
        }
    }
}

impl v1::Sketch {
    /// `sketch` in whichever form, dense `counts` or `sparse_*`, encodes smaller.
    pub fn compact(sketch: &Sketch) -> Self {
        v1::Sketch::from(sketch).compacted()
    }

    /// This sketch in whichever form encodes smaller: sparse when few buckets are occupied
    /// across a wide range, as at a few requests a second. A sparse one stays as it is.
    pub fn compacted(self) -> Self {
        use prost::encoding::encoded_len_varint;
        let (sparse_gaps, sparse_counts): (Vec<u32>, Vec<u64>) =
            flyball_sketch::sparse_from_dense(&self.counts).unzip();
        let dense_len: usize = self.counts.iter().map(|&n| encoded_len_varint(n)).sum();
        let sparse_len: usize = sparse_gaps
            .iter()
            .map(|&gap| encoded_len_varint(u64::from(gap)))
            .chain(sparse_counts.iter().map(|&n| encoded_len_varint(n)))
            .sum::<usize>()
            // A second packed field: its tag and length.
            + 3;
        if sparse_len >= dense_len {
            return self;
        }
        v1::Sketch {
            counts: Vec::new(),
            sparse_gaps,
            sparse_counts,
            ..self
        }
    }
}

impl TryFrom<&v1::Sketch> for Sketch {
    type Error = SketchError;

    fn try_from(wire: &v1::Sketch) -> Result<Self, Self::Error> {
        let parts = |offset, counts| flyball_sketch::SketchParts {
            relative_accuracy: wire.relative_accuracy,
            offset,
            counts,
            zero_count: wire.zero_count,
            sum: wire.sum,
            min: wire.min,
            max: wire.max,
        };
        if wire.sparse_gaps.is_empty() && wire.sparse_counts.is_empty() {
            return Sketch::from_parts(parts(wire.offset, &wire.counts));
        }
        if !wire.counts.is_empty() {
            return Err(SketchError::DenseAndSparse);
        }
        let mut buckets = Vec::with_capacity(wire.sparse_counts.len());
        let gaps = wire.sparse_gaps.iter().copied();
        let counts = wire.sparse_counts.iter().copied();
        flyball_sketch::sparse_buckets(wire.offset, gaps, counts, &mut buckets)?;
        let sparse = SparseSketch::from_buckets(parts(wire.offset, &[]), buckets)?;
        Ok(Sketch::from(&sparse))
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
#[allow(clippy::unwrap_used)]
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

    proptest::proptest! {
        /// Whichever form `compact` picks, the receiver gets the very sketch recorded, and the
        /// form is never larger than the dense one.
        #[test]
        fn a_compact_sketch_survives_the_wire_and_is_never_larger(
            values in proptest::collection::vec(0.0f64..1.0e7, 0..200),
            spread in 1.0f64..1.0e5,
        ) {
            let mut sketch = Sketch::new();
            for v in &values {
                sketch.record(1.0 + v * spread / 1.0e7 * v);
            }
            let compact = v1::Sketch::compact(&sketch);
            let dense = v1::Sketch::from(&sketch);
            proptest::prop_assert!(compact.encoded_len() <= dense.encoded_len());
            let bytes = compact.encode_to_vec();
            let back = Sketch::try_from(&v1::Sketch::decode(bytes.as_slice()).unwrap()).unwrap();
            proptest::prop_assert_eq!(back, sketch);
        }
    }

    #[test]
    fn a_few_requests_over_a_wide_range_go_sparse_and_a_busy_narrow_one_dense() {
        let mut few = Sketch::new();
        for v in [60_000.0, 400_000.0, 1_900_000.0] {
            few.record(v);
        }
        let few_wire = v1::Sketch::compact(&few);
        assert!(few_wire.counts.is_empty());
        assert_eq!(few_wire.sparse_counts, vec![1, 1, 1]);
        // Three buckets across 89: 49 bytes in all, against 128 dense.
        assert!(few_wire.encoded_len() * 2 < v1::Sketch::from(&few).encoded_len());
        let mut busy = Sketch::new();
        for i in 0..1_000 {
            busy.record(20_000.0 + f64::from(i) * 10.0);
        }
        let busy_wire = v1::Sketch::compact(&busy);
        assert!(busy_wire.sparse_counts.is_empty());
        assert_eq!(busy_wire, v1::Sketch::from(&busy));
    }

    #[test]
    fn a_forged_sparse_sketch_is_refused_naming_what_is_wrong() {
        let mut sketch = Sketch::new();
        for v in [10.0, 1_000.0] {
            sketch.record(v);
        }
        let good = v1::Sketch::compact(&sketch);
        assert!(!good.sparse_gaps.is_empty());
        let refused = |wire: v1::Sketch| Sketch::try_from(&wire).unwrap_err().to_string();
        let mut lengths = good.clone();
        lengths.sparse_counts.push(1);
        assert_eq!(
            refused(lengths),
            "sparse_gaps has 2 entries and sparse_counts 3: one gap per count"
        );
        let mut zero = good.clone();
        zero.sparse_gaps[1] = 0;
        assert_eq!(
            refused(zero),
            "sparse_gaps[1] = 0: each occupied bucket lies past the one before"
        );
        let mut far = good.clone();
        // Far past the last bucket: refused before anything is allocated for it.
        far.sparse_gaps[1] = u32::MAX;
        assert!(
            refused(far).starts_with("occupied buckets "),
            "a bucket out of range"
        );
        let mut both = good.clone();
        both.counts = vec![1];
        assert_eq!(
            refused(both),
            "counts and sparse_counts are both set: a sketch is sent in one form or the other"
        );
        // And the rules of the dense form hold in the sparse one: min must match the buckets.
        let mut forged_min = good;
        forged_min.min = 900.0;
        assert!(refused(forged_min).starts_with("min = 900"));
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
