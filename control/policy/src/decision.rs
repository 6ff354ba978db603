//! What the policy returns: per pool, the replica count to set, the rule that settled it and the
//! figures it was settled from.
//!
//! The human explanation is rendered on demand (`Display` for [`PoolDecision`]), so deciding
//! allocates nothing for it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::DurationDisplay;
use crate::inputs::Freshness;
use crate::pools::{Pools, Role};

/// One evaluation's decisions for one autoscaler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscalerDecision {
    /// The `now` the decision was made at.
    pub at: Duration,
    /// The spec's `dryRun`: report, never apply.
    pub dry_run: bool,
    pub pools: Pools<PoolDecision>,
}

/// One pool's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolDecision {
    pub role: Role,
    /// Replicas asked for before this decision (`PoolState::desired_replicas`).
    pub from: u32,
    /// Replicas to ask for.
    pub to: u32,
    pub action: Action,
    /// What settled `to`.
    pub rule: Rule,
    /// The pool's `minReplicas` (no budget goes below it).
    pub min_replicas: u32,
    /// GPUs one replica uses (for budgets).
    pub gpus_per_replica: u32,
    pub reason: Reason,
}

/// Direction of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    ScaleUp,
    ScaleDown,
    Hold,
}

/// What settled a decision's replica count; also the estimate behind a recommendation
/// ([`Reason::driver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Rule {
    /// Load over per-replica capacity.
    FeedForward,
    /// Latency over its objective (or, without capacity, latency headroom).
    SloFeedback,
    /// Short-window breach or overload: up at once, never down.
    Panic,
    /// Scale-up limited to the lowest recommendation of the scale-up window.
    StabilizedUp,
    /// Scale-down limited to the highest recommendation of the scale-down window.
    StabilizedDown,
    MinReplicas,
    MaxReplicas,
    /// `maxStep` per `period` reached.
    StepLimited,
    /// Too soon after the last change.
    Cooldown,
    /// Replicas already starting cover the shortfall.
    WaitingForStartingReplicas,
    /// Telemetry stale: hold (never down).
    StaleTelemetryHold,
    /// No telemetry ever: hold (never down).
    MissingTelemetryHold,
    /// Gateways that fed the pool have gone quiet: the load seen may be short; no scale-down.
    SilentReporterHold,
    /// Keys that feed the pool were dropped over the control service's key limit: the load
    /// seen may be short; no scale-down.
    KeysOverLimitHold,
    /// The stable window is not full of data (after a gap): no scale-down yet.
    PartialWindowHold,
    /// The stable window has not been full since this controller started leading: no scale-down.
    RestartHold,
    /// Removing replicas would leave the load above what the rest sustain within the SLO.
    WouldNotFit,
    /// Idle pool taken to zero (`scaleToZero`).
    ScaleToZero,
    /// Growth cut to fit a GPU budget.
    GpuBudget,
    /// The recommendation equals the current count.
    NoChange,
}

/// The figures behind a decision.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// The estimate that set the recommendation: `FeedForward`, `SloFeedback`, `Panic`,
    /// `MinReplicas`, `MaxReplicas`, `ScaleToZero`, or the hold rule when no estimate was made.
    pub driver: Rule,
    pub freshness: Freshness,
    /// Whether panic mode was on (triggered now or within the last stable window).
    pub panic: bool,
    /// Load used for sizing: the higher of the short and stable windows.
    pub load: LoadUsed,
    /// TTFT against its objective, in the window that counted; `None` without objective or samples.
    pub ttft: Option<SloReading>,
    /// TPOT against its objective, in the window that counted.
    pub tpot: Option<SloReading>,
    /// Per-replica capacity used; all `None` means SLO feedback alone.
    pub capacity: CapacityUsed,
    /// Replicas feed-forward asks for (`None`: no capacity known for this pool).
    pub feed_forward_replicas: Option<u32>,
    /// What feed-forward would have asked for on a capacity that is only the least proven (no
    /// hint, no miss), when it was held to what latency shows instead (`None`: not held).
    #[serde(default)]
    pub feed_forward_on_lower_bound: Option<u32>,
    /// Replicas SLO feedback asks for (`None`: latency well below objective, or no samples).
    pub slo_feedback_replicas: Option<u32>,
    /// Replicas to ask for, within bounds, before stabilization, steps and gates.
    pub recommended_replicas: u32,
    pub ready_replicas: u32,
    pub starting_replicas: u32,
    /// Whether the starting replicas counted as capacity on the way (within their expected
    /// time-to-ready).
    pub starting_counted: bool,
    /// When the hold that settled this decision ends, if known (cooldown, restart hold, panic).
    pub hold_until: Option<Duration>,
    /// `to` before a GPU budget cut it.
    pub before_budget: Option<u32>,
}

/// Load figures used for sizing.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadUsed {
    pub request_rate_per_s: f64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub error_rate_per_s: f64,
    pub decoding_sequences: u32,
    pub waiting_sequences: u32,
    /// Decoding over the stable window on average: learning sets the larger of it and the count
    /// now against the window's latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoding_sequences_mean: Option<f64>,
}

/// Which window a figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Window {
    Short,
    Stable,
}

/// A latency quantile against its objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SloReading {
    pub measured: Duration,
    pub target: Duration,
    pub window: Window,
    /// `measured / target - 1`: above 0 is a breach.
    pub error: f64,
}

/// Per-replica capacities used, by dimension.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CapacityUsed {
    pub prefill_tokens_per_s: Option<CapacityEstimate>,
    pub decode_tokens_per_s: Option<CapacityEstimate>,
    pub concurrent_sequences: Option<CapacityEstimate>,
}

/// One per-replica capacity and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CapacityEstimate {
    pub per_replica: f64,
    pub source: CapacitySource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CapacitySource {
    /// From the spec's `capacity` hints.
    Hint,
    /// Learned from what ready replicas sustained.
    Learned,
    /// A learned capacity raised, for this decision only, to the load the ready replicas carry
    /// (in whichever window shows more) with latency well below the objective.
    Carried,
}

// === impl Action ===

impl Action {
    pub fn between(from: u32, to: u32) -> Self {
        match to.cmp(&from) {
            std::cmp::Ordering::Greater => Action::ScaleUp,
            std::cmp::Ordering::Less => Action::ScaleDown,
            std::cmp::Ordering::Equal => Action::Hold,
        }
    }

    /// Stable snake_case name, usable as a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::ScaleUp => "scale_up",
            Action::ScaleDown => "scale_down",
            Action::Hold => "hold",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Rule ===

impl Rule {
    /// Every rule, for metric label sets and tests.
    pub const ALL: [Rule; 20] = [
        Rule::FeedForward,
        Rule::SloFeedback,
        Rule::Panic,
        Rule::StabilizedUp,
        Rule::StabilizedDown,
        Rule::MinReplicas,
        Rule::MaxReplicas,
        Rule::StepLimited,
        Rule::Cooldown,
        Rule::WaitingForStartingReplicas,
        Rule::StaleTelemetryHold,
        Rule::MissingTelemetryHold,
        Rule::SilentReporterHold,
        Rule::KeysOverLimitHold,
        Rule::PartialWindowHold,
        Rule::RestartHold,
        Rule::WouldNotFit,
        Rule::ScaleToZero,
        Rule::GpuBudget,
        Rule::NoChange,
    ];

    /// Stable snake_case name, usable as a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rule::FeedForward => "feed_forward",
            Rule::SloFeedback => "slo_feedback",
            Rule::Panic => "panic",
            Rule::StabilizedUp => "stabilized_up",
            Rule::StabilizedDown => "stabilized_down",
            Rule::MinReplicas => "min_replicas",
            Rule::MaxReplicas => "max_replicas",
            Rule::StepLimited => "step_limited",
            Rule::Cooldown => "cooldown",
            Rule::WaitingForStartingReplicas => "waiting_for_starting_replicas",
            Rule::StaleTelemetryHold => "stale_telemetry_hold",
            Rule::MissingTelemetryHold => "missing_telemetry_hold",
            Rule::SilentReporterHold => "silent_reporter_hold",
            Rule::KeysOverLimitHold => "keys_over_limit_hold",
            Rule::PartialWindowHold => "partial_window_hold",
            Rule::RestartHold => "restart_hold",
            Rule::WouldNotFit => "would_not_fit",
            Rule::ScaleToZero => "scale_to_zero",
            Rule::GpuBudget => "gpu_budget",
            Rule::NoChange => "no_change",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl PoolDecision ===

impl PoolDecision {
    /// The human explanation (same as `to_string()`).
    pub fn text(&self) -> String {
        self.to_string()
    }
}

/// `role: from -> to (action, rule): why; figures`.
impl fmt::Display for PoolDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.reason;
        write!(
            f,
            "{}: {} -> {} ({}, {}): ",
            self.role, self.from, self.to, self.action, self.rule
        )?;
        let until = |f: &mut fmt::Formatter<'_>| match r.hold_until {
            Some(t) => write!(f, " until t={}", DurationDisplay(t)),
            None => Ok(()),
        };
        match self.rule {
            Rule::StaleTelemetryHold => {
                match r.freshness {
                    Freshness::Stale { age } => {
                        write!(f, "telemetry is {} old", DurationDisplay(age))?
                    }
                    _ => f.write_str("telemetry is stale")?,
                }
                f.write_str("; holding, never scaling down on stale data")?;
                return asleep_note(f, self.to);
            }
            Rule::MissingTelemetryHold => {
                f.write_str(
                    "no telemetry has ever been reported for this pool; holding, never scaling \
                     down without data",
                )?;
                return asleep_note(f, self.to);
            }
            Rule::FeedForward => f.write_str("load over per-replica capacity")?,
            Rule::SloFeedback => f.write_str("latency against its objective")?,
            Rule::Panic if self.action == Action::Hold => {
                f.write_str("panic mode: never scaling down")?;
                until(f)?;
            }
            Rule::Panic => {
                f.write_str("panic mode (short-window breach or overload): scaling up at once")?
            }
            Rule::StabilizedUp => {
                f.write_str("lowest recommendation of the scale-up stabilization window")?
            }
            Rule::StabilizedDown => {
                f.write_str("highest recommendation of the scale-down stabilization window")?
            }
            Rule::MinReplicas => f.write_str("minReplicas")?,
            Rule::MaxReplicas => f.write_str("maxReplicas")?,
            Rule::StepLimited => f.write_str("maxStep per period reached")?,
            Rule::Cooldown => {
                f.write_str("cooldown after the last change")?;
                until(f)?;
            }
            Rule::WaitingForStartingReplicas => write!(
                f,
                "{} starting replica(s) cover the shortfall while they load",
                r.starting_replicas
            )?,
            Rule::SilentReporterHold => match r.freshness {
                Freshness::Partial {
                    silent_reporters, ..
                } => write!(
                    f,
                    "{silent_reporters} gateway(s) that fed this pool went quiet, so the load \
                     seen may be short; no scale-down until they report or are forgotten"
                )?,
                _ => f.write_str("gateways that fed this pool went quiet; no scale-down")?,
            },
            Rule::KeysOverLimitHold => f.write_str(
                "keys that feed this pool were dropped over the control service's --max-keys, \
                 so the load seen may be short; no scale-down",
            )?,
            Rule::PartialWindowHold => {
                f.write_str("the stable window is not full of data yet; no scale-down")?
            }
            Rule::RestartHold => {
                f.write_str("restart hold: the stable window has not been full since start")?;
                until(f)?;
            }
            Rule::WouldNotFit => {
                f.write_str("the load would not fit on fewer replicas within the SLO")?
            }
            Rule::ScaleToZero => f.write_str("no load over the whole stable window")?,
            Rule::GpuBudget => match r.before_budget {
                Some(wanted) => write!(f, "GPU budget (wanted {wanted})")?,
                None => f.write_str("GPU budget")?,
            },
            Rule::NoChange => f.write_str("recommendation equals current replicas")?,
        }
        write!(f, "; {r}")
    }
}

/// A data hold at zero: only a scaleToZero pool rests there (minReplicas is at least 1), and
/// users ask why a pool with traffic did not wake, so say it waits for data.
fn asleep_note(f: &mut fmt::Formatter<'_>, to: u32) -> fmt::Result {
    if to == 0 {
        f.write_str(
            "; the pool is at zero (scaleToZero) and is not woken without data: load in \
             fresh telemetry wakes it",
        )?;
    }
    Ok(())
}

/// The figures, as one line.
impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recommended {} (by {})",
            self.recommended_replicas, self.driver
        )?;
        match self.feed_forward_replicas {
            Some(n) => write!(f, ", feed-forward {n}")?,
            None => f.write_str(", feed-forward n/a")?,
        }
        if let Some(n) = self.feed_forward_on_lower_bound {
            write!(
                f,
                " (held from {n}: capacity only the least proven, grown as far as latency shows)"
            )?;
        }
        match self.slo_feedback_replicas {
            Some(n) => write!(f, ", SLO feedback {n}")?,
            None => f.write_str(", SLO feedback n/a")?,
        }
        if self.panic {
            f.write_str(", panic")?;
        }
        write!(
            f,
            "; ready {}, starting {}{}",
            self.ready_replicas,
            self.starting_replicas,
            if self.starting_replicas > 0 && !self.starting_counted {
                " (overdue, not counted)"
            } else {
                ""
            }
        )?;
        let l = &self.load;
        write!(
            f,
            "; load {:.1} req/s, {:.0} in tok/s, {:.0} out tok/s, {} decoding, {} waiting",
            l.request_rate_per_s,
            l.input_tokens_per_s,
            l.output_tokens_per_s,
            l.decoding_sequences,
            l.waiting_sequences
        )?;
        if let Some(mean) = l.decoding_sequences_mean {
            write!(f, " ({mean:.1} decoding on average over the stable window)")?;
        }
        for (name, reading) in [("TTFT", self.ttft), ("TPOT", self.tpot)] {
            if let Some(s) = reading {
                write!(
                    f,
                    "; {name} {:.1}ms vs {} ({:+.0}%, {} window)",
                    s.measured.as_secs_f64() * 1e3,
                    DurationDisplay(s.target),
                    s.error * 100.0,
                    match s.window {
                        Window::Short => "short",
                        Window::Stable => "stable",
                    }
                )?;
            }
        }
        let c = &self.capacity;
        if c.prefill_tokens_per_s.is_none()
            && c.decode_tokens_per_s.is_none()
            && c.concurrent_sequences.is_none()
        {
            f.write_str("; no capacity hint or learned value: SLO feedback alone")?;
        } else {
            for (name, cap) in [
                ("prefill tok/s", c.prefill_tokens_per_s),
                ("decode tok/s", c.decode_tokens_per_s),
                ("sequences", c.concurrent_sequences),
            ] {
                if let Some(cap) = cap {
                    write!(
                        f,
                        "; capacity {:.0} {name}/replica ({})",
                        cap.per_replica,
                        match cap.source {
                            CapacitySource::Hint => "hint",
                            CapacitySource::Learned => "learned",
                            CapacitySource::Carried => "carried now",
                        }
                    )?;
                }
            }
        }
        Ok(())
    }
}
