//! What the control service hands the policy at each evaluation: windowed telemetry per pool (from
//! the ingest) and the pool's replica state (from the `/scale` subresource and pod status).
//!
//! Rates and counts are plain numbers; the policy treats NaN and negative values as 0 and infinite
//! ones as "more than any bound", so no input makes it panic.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pools::Pools;

/// A window is "full" at this share of its length: the ingest's windows are made of buckets, so a
/// window that has been receiving data all along may report slightly less than its length.
pub const FULL_WINDOW_FRACTION: f64 = 0.9;

/// Everything one evaluation of one autoscaler needs, one entry per pool.
pub type AutoscalerInputs = Pools<PoolInputs>;

/// One pool's telemetry and state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolInputs {
    pub telemetry: PoolTelemetry,
    pub state: PoolState,
}

/// Telemetry for one pool at one evaluation, computed by the ingest.
///
/// For disaggregated serving the control service may give both pools the same figures: the prefill
/// pool reads only input tokens and TTFT, the decode pool only output tokens, decoding sequences
/// and TPOT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolTelemetry {
    pub freshness: Freshness,
    /// Short window (about 10 s): drives panic.
    pub short: WindowStats,
    /// Stable window (about 60 s): drives steady sizing, learning and scale-down.
    pub stable: WindowStats,
    /// Requests in flight that have not received their first token yet (now).
    pub in_flight_waiting: u32,
    /// Requests in flight past their first token (now): the sequences being decoded.
    pub in_flight_decoding: u32,
}

/// Whether the reporters feeding a pool are current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Freshness {
    /// Reports arrive on schedule.
    Fresh,
    /// Every reporter is quiet past its staleness bound; `age` is the newest report's.
    Stale { age: Duration },
    /// No gateway has reported since the service started. (Once any has, a pool none of whose
    /// keys are reported is fresh and idle: a live gateway leaves idle keys out of its reports.)
    Missing,
    /// Reports arrive, but some of this pool's load is not in them, so the load seen is a lower
    /// bound: scale up on it, never down. `silent_reporters` gateway processes that fed this pool
    /// within the stable window have gone quiet (partitioned from the control service, or gone);
    /// `keys_over_limit`: keys that select this pool were dropped within the stable window
    /// because the control service tracks its maximum number of keys.
    Partial {
        silent_reporters: u32,
        #[serde(default)]
        keys_over_limit: bool,
    },
}

/// Aggregates over one sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    /// The window's nominal length.
    pub length: Duration,
    /// How much of the window has data (less than `length` after a start or a gap).
    pub coverage: Duration,
    pub request_rate_per_s: f64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Failed requests (including those refused for lack of replicas).
    pub error_rate_per_s: f64,
    /// TTFT at the SLO percentile; `None` without samples.
    pub ttft: Option<Duration>,
    /// TPOT at the SLO percentile; `None` without samples.
    pub tpot: Option<Duration>,
    /// Requests waiting for their first token, on average over the window; `None` where not
    /// measured, and learning then takes the count at the window's end
    /// ([`PoolTelemetry::in_flight_waiting`]).
    #[serde(default)]
    pub mean_waiting: Option<f64>,
    /// Requests decoding, on average over the window; `None` where not measured (as above).
    #[serde(default)]
    pub mean_decoding: Option<f64>,
}

/// One pool's replicas as the control service observes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolState {
    /// Replicas asked for: `spec.replicas` of the scale target as last set (by anyone).
    pub desired_replicas: u32,
    /// Replicas that exist (`status.replicas`).
    pub current_replicas: u32,
    /// Replicas ready to serve.
    pub ready_replicas: u32,
    /// Replicas asked for that are not ready yet (pending, pulling, loading weights).
    pub starting_replicas: u32,
    /// When `desired_replicas` last changed, on the policy's clock; `None` if unknown.
    pub last_scale_change_at: Option<Duration>,
    /// Measured time from asking for a replica to its being ready (e.g. a recent median);
    /// `None` until measured.
    pub time_to_ready: Option<Duration>,
}

// === impl WindowStats ===

impl WindowStats {
    /// A window with no traffic, fully covered.
    pub fn idle(length: Duration) -> Self {
        Self {
            length,
            coverage: length,
            request_rate_per_s: 0.0,
            input_tokens_per_s: 0.0,
            output_tokens_per_s: 0.0,
            error_rate_per_s: 0.0,
            ttft: None,
            tpot: None,
            mean_waiting: None,
            mean_decoding: None,
        }
    }

    /// Whether data covers (nearly) all of the window; see [`FULL_WINDOW_FRACTION`].
    pub fn is_full(&self) -> bool {
        self.coverage.as_secs_f64() >= self.length.as_secs_f64() * FULL_WINDOW_FRACTION
    }

    /// Whether anything at all arrived in this window.
    pub(crate) fn has_traffic(&self) -> bool {
        rate(self.request_rate_per_s) > 0.0
            || rate(self.input_tokens_per_s) > 0.0
            || rate(self.output_tokens_per_s) > 0.0
            || rate(self.error_rate_per_s) > 0.0
    }
}

// === impl PoolTelemetry ===

impl PoolTelemetry {
    /// Whether the pool has any load now or in either window.
    pub(crate) fn has_load(&self) -> bool {
        self.in_flight_waiting > 0
            || self.in_flight_decoding > 0
            || self.short.has_traffic()
            || self.stable.has_traffic()
    }
}

/// A rate as the policy uses it: NaN and negatives count as 0.
pub(crate) fn rate(value: f64) -> f64 {
    // f64::max returns the other operand when one is NaN.
    value.max(0.0)
}
