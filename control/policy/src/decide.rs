//! `decide`: one evaluation of one autoscaler.
//!
//! Per pool: freshness gate -> learn capacity -> panic check -> feed-forward and SLO feedback ->
//! bounds -> stabilization -> gates (starting replicas, cooldown, steps, restart hold, N-1 check)
//! -> GPU budget. Every path returns a decision with its rule; holding is a decision too.
//!
//! Sizing works in "serving replicas": feed-forward asks for `load / per-replica capacity`, SLO
//! feedback for `ready * (measured / target)` when latency breaches; on a capacity that is only a
//! lower bound (no hint, no miss) feed-forward grows the pool no further than latency shows it
//! short, at most as far as SLO feedback would. Replicas asked for and still
//! starting within their expected time-to-ready count as on the way, so a shortfall they cover is
//! not answered twice; once overdue they no longer count and the shortfall is asked for again,
//! once: overdue replicas beyond the shortfall (an earlier re-ask) are not asked for again.

use std::time::Duration;

use crate::budget::split_budget;
use crate::decision::{
    Action, AutoscalerDecision, CapacityEstimate, CapacitySource, CapacityUsed, LoadUsed,
    PoolDecision, Reason, Rule, SloReading, Window,
};
use crate::inputs::{
    AutoscalerInputs, Freshness, PoolInputs, PoolState, PoolTelemetry, WindowStats, rate,
};
use crate::memory::{CapacityFlags, LastDecision, LearnedCapacity, PolicyMemory, PoolMemory};
use crate::pools::{Pools, Role, Topology};
use crate::spec::{AutoscalerSpec, Behavior, CapacityHints, PoolSpec, Slo};

/// Latency under this share of its objective is "well below": feed-forward may then size the pool
/// down. Between it and the objective, the pool keeps its ready replicas.
pub const WELL_BELOW_TARGET: f64 = 0.8;

/// SLO feedback multiplies ready replicas by at most `1 + MAX_SLO_ERROR`: near saturation latency
/// grows without bound, and one bad window must not ask for the whole cluster.
pub const MAX_SLO_ERROR: f64 = 3.0;

/// Feed-forward on a capacity that is only a lower bound (learned without a hint, never set or
/// lowered by a miss) grows the replicas that served in the stable window by at most this
/// factor, the most SLO feedback asks for one breach, and only as far as latency shows them short
/// (see `lower_bound_reach`). Such a bound may come from a quiet night (5% of a replica, latency
/// at 10% of the objectives): a step far past the night's load, sized on it, asked for 15 times
/// the replicas the step needed. Once the replicas asked for serve, what they carry shows the
/// capacity (carried now, then learned); a step still short of them breaches again and grows the
/// pool again.
pub const MAX_GROWTH_ON_A_LOWER_BOUND: f64 = 1.0 + MAX_SLO_ERROR;

/// Assumed time-to-ready until one is measured: model servers commonly need minutes to pull an
/// image and load weights.
pub const DEFAULT_TIME_TO_READY: Duration = Duration::from_secs(300);

/// Starting replicas count as on the way for this multiple of the time-to-ready after the last
/// change; start-up times vary, and re-asking too early doubles the scale-up.
pub const STARTING_GRACE_FACTOR: f64 = 1.5;

/// After an SLO miss at `x` per replica, capacity is learned towards `x` times this: the true
/// capacity is below `x`, by an unknown margin.
pub const VIOLATION_BACKOFF: f64 = 0.9;

/// While latency stays well below its objective, learned capacity rises by at most this factor
/// per stable window (see `learn`).
pub const MAX_PROBE_GROWTH: f64 = 1.2;

/// Learning never takes a capacity below this share of its hint: a hint is a statement about the
/// hardware, and a few bad windows (long prompts, a noisy neighbour) must not erase it.
pub const MIN_LEARNED_SHARE_OF_HINT: f64 = 0.25;

/// A miss teaches a capacity only when the short window's token rates are within this share of
/// the stable window's (or within their noise, if wider): a percentile breached by a burst says
/// nothing about the window's mean load (see `learn`).
pub const STEADY_LOAD_TOLERANCE: f64 = 0.35;

/// Standard errors of the short window's token rates, under steady load, that still count as
/// steady: at a few requests a second the short window's mean wanders far on its own.
pub const STEADY_LOAD_NOISE_SIGMAS: f64 = 3.0;

/// The spread of tokens per request (standard deviation over mean) assumed for that noise.
const TOKENS_PER_REQUEST_CV: f64 = 1.0;

/// Windows with more failed requests than this share teach nothing: failing replicas do not show
/// what healthy ones sustain.
pub const MAX_ERROR_SHARE_FOR_LEARNING: f64 = 0.05;

/// A short-window latency breach triggers panic only with at least this many requests in the
/// window: the percentile of a handful of requests is noise.
pub const MIN_PANIC_REQUESTS: f64 = 10.0;

/// Slack for float noise when comparing ratios to integers and capacities.
const EPSILON: f64 = 1e-9;

/// Why `decide` could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    /// The inputs do not have the spec's pools (the caller built them for another spec).
    #[error("the spec has {spec} pools but the inputs have {inputs} pools")]
    TopologyMismatch { spec: Topology, inputs: Topology },
}

impl DecideError {
    /// Stable snake_case name, usable as a metric label.
    pub const fn as_str(&self) -> &'static str {
        match self {
            DecideError::TopologyMismatch { .. } => "topology_mismatch",
        }
    }
}

/// Decides replicas for every pool of one autoscaler at `now` (monotonic, since any fixed epoch).
///
/// Updates `memory` (stabilization history, learned capacity, panic time, last decisions); the
/// caller keeps it for the next call. Reads no clock and does no I/O; allocates nothing once the
/// memory's queues have warmed up. The only error is inputs shaped unlike the spec.
pub fn decide(
    spec: &AutoscalerSpec,
    inputs: &AutoscalerInputs,
    memory: &mut PolicyMemory,
    now: Duration,
) -> Result<AutoscalerDecision, DecideError> {
    let cx = Context {
        slo: spec.slo(),
        behavior: spec.behavior(),
        scale_to_zero: spec.scale_to_zero(),
        started_at: memory.started_at(),
        now,
    };
    let mut pools = match (spec.pools(), inputs) {
        (Pools::Unified(pool), Pools::Unified(input)) => Pools::Unified(decide_pool(
            &cx,
            Role::Unified,
            pool,
            input,
            memory.pool_mut(Role::Unified),
            true,
        )),
        (
            Pools::Disaggregated { prefill, decode },
            Pools::Disaggregated {
                prefill: prefill_input,
                decode: decode_input,
            },
        ) => {
            // The gateway cannot tell which pool of the pair failed a request: a pool whose own
            // objectives are well met is not taken for the one refusing them while the other's
            // are not. Both well met, the failures are no one's and count against both.
            let prefill_well = well_met(&cx, Role::Prefill, prefill_input);
            let decode_well = well_met(&cx, Role::Decode, decode_input);
            Pools::Disaggregated {
                prefill: decide_pool(
                    &cx,
                    Role::Prefill,
                    prefill,
                    prefill_input,
                    memory.pool_mut(Role::Prefill),
                    !prefill_well || decode_well,
                ),
                decode: decide_pool(
                    &cx,
                    Role::Decode,
                    decode,
                    decode_input,
                    memory.pool_mut(Role::Decode),
                    !decode_well || prefill_well,
                ),
            }
        }
        (pools, inputs) => {
            return Err(DecideError::TopologyMismatch {
                spec: pools.topology(),
                inputs: inputs.topology(),
            });
        }
    };
    if let Some(budget) = spec.gpu_budget() {
        match &mut pools {
            Pools::Unified(pool) => split_budget(&mut [pool], budget),
            Pools::Disaggregated { prefill, decode } => {
                split_budget(&mut [prefill, decode], budget)
            }
        }
    }
    for pool in pools.iter_mut() {
        memory.pool_mut(pool.role).set_last_decision(LastDecision {
            at: now,
            from: pool.from,
            to: pool.to,
            action: pool.action,
            rule: pool.rule,
        });
    }
    Ok(AutoscalerDecision {
        at: now,
        dry_run: spec.dry_run(),
        pools,
    })
}

/// What every pool of one evaluation shares.
struct Context<'a> {
    slo: &'a Slo,
    behavior: &'a Behavior,
    scale_to_zero: bool,
    started_at: Duration,
    now: Duration,
}

/// A load a replica has a capacity for.
#[derive(Clone, Copy)]
enum Dimension {
    PrefillTokens,
    DecodeTokens,
    /// Every request in flight: a unified replica holds a sequence from its prefill on, and
    /// one still waiting for its first token is queued for a slot or in its prefill.
    Sequences,
    /// Requests past their first token: in disaggregated serving the others are still at the
    /// prefill pool.
    DecodingSequences,
}

/// A latency objective.
#[derive(Clone, Copy)]
enum Signal {
    Ttft,
    Tpot,
}

fn dimensions(role: Role) -> &'static [Dimension] {
    match role {
        Role::Unified => &[
            Dimension::PrefillTokens,
            Dimension::DecodeTokens,
            Dimension::Sequences,
        ],
        Role::Prefill => &[Dimension::PrefillTokens],
        Role::Decode => &[Dimension::DecodeTokens, Dimension::DecodingSequences],
    }
}

/// TTFT drives prefill, TPOT drives decode; a unified pool answers to both.
fn signals(role: Role) -> &'static [Signal] {
    match role {
        Role::Unified => &[Signal::Ttft, Signal::Tpot],
        Role::Prefill => &[Signal::Ttft],
        Role::Decode => &[Signal::Tpot],
    }
}

// === impl Dimension ===

impl Dimension {
    fn load(self, window: &WindowStats, telemetry: &PoolTelemetry) -> f64 {
        match self {
            Dimension::PrefillTokens => rate(window.input_tokens_per_s),
            Dimension::DecodeTokens => rate(window.output_tokens_per_s),
            // In-flight counts are a snapshot, the same for both windows.
            Dimension::Sequences => {
                f64::from(telemetry.in_flight_decoding) + f64::from(telemetry.in_flight_waiting)
            }
            Dimension::DecodingSequences => f64::from(telemetry.in_flight_decoding),
        }
    }

    /// The load learning sets against `window`'s latency. For sequences, the larger of the
    /// count at the window's end and its mean over the window where measured: a lull at the end
    /// (8 decoding where the minute averaged 80) read alone taught a tenth of the capacity the
    /// latency answered to. Not the mean alone: sizing divides the count now by what is learned,
    /// so learning less than that count would ask for fewer replicas the more were in flight on
    /// average; and a count at the end above the mean (a burst seconds old) is what learning
    /// already guards against (it rises as a probe does).
    fn learning_load(self, window: &WindowStats, telemetry: &PoolTelemetry) -> f64 {
        let now = self.load(window, telemetry);
        let mean = match self {
            Dimension::DecodingSequences => window.mean_decoding,
            Dimension::Sequences => window
                .mean_decoding
                .zip(window.mean_waiting)
                .map(|(decoding, waiting)| rate(decoding) + rate(waiting)),
            Dimension::PrefillTokens | Dimension::DecodeTokens => None,
        };
        mean.map_or(now, |mean| rate(mean).max(now))
    }

    /// The higher of both windows: scale-up reacts to the short one, scale-down needs both low.
    fn sizing_load(self, telemetry: &PoolTelemetry) -> f64 {
        self.load(&telemetry.short, telemetry)
            .max(self.load(&telemetry.stable, telemetry))
    }

    fn hint(self, hints: &CapacityHints) -> Option<f64> {
        match self {
            Dimension::PrefillTokens => hints.prefill_tokens_per_s,
            Dimension::DecodeTokens => hints.decode_tokens_per_s,
            Dimension::Sequences | Dimension::DecodingSequences => hints.concurrent_sequences,
        }
    }

    fn learned(self, learned: &LearnedCapacity) -> Option<f64> {
        match self {
            Dimension::PrefillTokens => learned.prefill_tokens_per_s,
            Dimension::DecodeTokens => learned.decode_tokens_per_s,
            Dimension::Sequences | Dimension::DecodingSequences => learned.concurrent_sequences,
        }
    }

    fn learned_mut(self, learned: &mut LearnedCapacity) -> &mut Option<f64> {
        match self {
            Dimension::PrefillTokens => &mut learned.prefill_tokens_per_s,
            Dimension::DecodeTokens => &mut learned.decode_tokens_per_s,
            Dimension::Sequences | Dimension::DecodingSequences => {
                &mut learned.concurrent_sequences
            }
        }
    }

    fn lowered_by_miss(self, flags: &CapacityFlags) -> bool {
        match self {
            Dimension::PrefillTokens => flags.prefill_tokens_per_s,
            Dimension::DecodeTokens => flags.decode_tokens_per_s,
            Dimension::Sequences | Dimension::DecodingSequences => flags.concurrent_sequences,
        }
    }

    fn lowered_by_miss_mut(self, flags: &mut CapacityFlags) -> &mut bool {
        match self {
            Dimension::PrefillTokens => &mut flags.prefill_tokens_per_s,
            Dimension::DecodeTokens => &mut flags.decode_tokens_per_s,
            Dimension::Sequences | Dimension::DecodingSequences => &mut flags.concurrent_sequences,
        }
    }

    fn slot(self, used: &mut CapacityUsed) -> &mut Option<CapacityEstimate> {
        match self {
            Dimension::PrefillTokens => &mut used.prefill_tokens_per_s,
            Dimension::DecodeTokens => &mut used.decode_tokens_per_s,
            Dimension::Sequences | Dimension::DecodingSequences => &mut used.concurrent_sequences,
        }
    }

    fn get(self, used: &CapacityUsed) -> Option<CapacityEstimate> {
        match self {
            Dimension::PrefillTokens => used.prefill_tokens_per_s,
            Dimension::DecodeTokens => used.decode_tokens_per_s,
            Dimension::Sequences | Dimension::DecodingSequences => used.concurrent_sequences,
        }
    }

    fn is_sequences(self) -> bool {
        matches!(self, Dimension::Sequences | Dimension::DecodingSequences)
    }

    fn signal(self) -> Signal {
        match self {
            Dimension::PrefillTokens => Signal::Ttft,
            Dimension::DecodeTokens | Dimension::Sequences | Dimension::DecodingSequences => {
                Signal::Tpot
            }
        }
    }
}

// === impl Signal ===

impl Signal {
    fn target(self, slo: &Slo) -> Option<Duration> {
        match self {
            Signal::Ttft => slo.ttft,
            Signal::Tpot => slo.tpot,
        }
        .filter(|t| !t.is_zero())
    }

    fn measured(self, window: &WindowStats) -> Option<Duration> {
        match self {
            Signal::Ttft => window.ttft,
            Signal::Tpot => window.tpot,
        }
    }

    /// Whether a capacity stands behind this signal, so feed-forward can size without it.
    fn covered(self, capacity: &CapacityUsed) -> bool {
        match self {
            Signal::Ttft => capacity.prefill_tokens_per_s.is_some(),
            Signal::Tpot => {
                capacity.decode_tokens_per_s.is_some() || capacity.concurrent_sequences.is_some()
            }
        }
    }

    fn reading(self, reason: &mut Reason) -> &mut Option<SloReading> {
        match self {
            Signal::Ttft => &mut reason.ttft,
            Signal::Tpot => &mut reason.tpot,
        }
    }
}

/// A usable positive finite number (memory may come from a file).
fn positive(value: Option<f64>) -> Option<f64> {
    value.filter(|v| v.is_finite() && *v > 0.0)
}

/// Replicas for `load` at `per_replica` each, rounding up (float noise aside).
fn replicas_for(load: f64, per_replica: f64) -> u32 {
    if load <= 0.0 {
        return 0;
    }
    // `as` saturates: an infinite load asks for u32::MAX, clamped to maxReplicas later.
    (load / per_replica - EPSILON).ceil() as u32
}

fn ratio(measured: Duration, target: Duration) -> f64 {
    measured.as_secs_f64() / target.as_secs_f64()
}

fn scale_duration(duration: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(duration.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

fn later(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// `failures_implicated`: whether failed requests tell against this pool (see `decide`).
fn decide_pool(
    cx: &Context<'_>,
    role: Role,
    pool: &PoolSpec,
    input: &PoolInputs,
    mem: &mut PoolMemory,
    failures_implicated: bool,
) -> PoolDecision {
    let now = cx.now;
    let t = &input.telemetry;
    let state = &input.state;
    let behavior = cx.behavior;
    let bounds = pool.replicas;
    let from = state.desired_replicas;
    let ready = state.ready_replicas;

    let horizon = behavior
        .scale_up
        .period
        .max(behavior.scale_down.period)
        .max(behavior.cooldown);
    mem.observe(state, now, horizon, t.stable.length.max(t.short.length));
    let started_at = mem.history_since(cx.started_at);

    let mut reason = Reason {
        driver: Rule::NoChange,
        freshness: t.freshness,
        panic: false,
        load: load_used(t),
        ttft: None,
        tpot: None,
        capacity: CapacityUsed::default(),
        feed_forward_replicas: None,
        feed_forward_on_lower_bound: None,
        slo_feedback_replicas: None,
        recommended_replicas: from,
        ready_replicas: ready,
        starting_replicas: state.starting_replicas,
        starting_counted: true,
        hold_until: None,
        before_budget: None,
    };
    let decision = |to: u32, rule: Rule, reason: Reason| PoolDecision {
        role,
        from,
        to,
        action: Action::between(from, to),
        rule,
        min_replicas: bounds.min(),
        gpus_per_replica: pool.gpus_per_replica,
        reason,
    };

    // Without current data nothing is known about the load: hold, only honouring the bounds
    // (configuration, not data: a maxReplicas lowered under the count applies at once, as it
    // does on fresh data; every pool's data is missing from a start to its first report).
    // A scaleToZero pool at zero is asleep, not below its minimum: waking it on no data would
    // start every sleeping pool at each control-service start (telemetry is Missing until the
    // first report) or gateway outage, for a model load and a whole scale-down window each.
    let data_hold = match t.freshness {
        Freshness::Fresh | Freshness::Partial { .. } => None,
        Freshness::Stale { .. } => Some(Rule::StaleTelemetryHold),
        Freshness::Missing => Some(Rule::MissingTelemetryHold),
    };
    if let Some(rule) = data_hold {
        reason.driver = rule;
        let asleep = cx.scale_to_zero && from == 0;
        let (to, rule) = if from < bounds.min() && !asleep {
            reason.recommended_replicas = bounds.min();
            (bounds.min(), Rule::MinReplicas)
        } else if from > bounds.max() {
            reason.recommended_replicas = bounds.max();
            (bounds.max(), Rule::MaxReplicas)
        } else {
            (from, rule)
        };
        mem.record_held(now, to);
        return decision(to, rule, reason);
    }

    // Read before this evaluation learns: whether a capacity is only a lower bound then depends
    // on the memory alone, not on the load at hand, so more load cannot lift the limit below
    // (a miss that lowers the capacity now counts from the next evaluation).
    let lowered_by_miss = mem.learned().lowered_by_miss;
    let learned = learn(cx, role, pool, t, state, mem);

    let short_requests = rate(t.short.request_rate_per_s) * t.short.coverage.as_secs_f64();
    // Latency speaks for the load only while nothing queues: at the start of a burst completed
    // requests are few, and a queue shows before they do. However few they are then, latency
    // well within the objective with every request in flight past its first token is the load
    // carried: asking it for MIN_PANIC_REQUESTS as a breach must would make a few more completed
    // requests ask for fewer replicas (panic at 9 on the capacity a quiet hour proved, "carried
    // now" at 10). A breach still needs them to trigger panic (below).
    let latency_judged = !queued_for(role, t, ready);
    for &dim in dimensions(role) {
        let estimate = match positive(dim.learned(&learned)) {
            Some(learned) => Some(
                match carried_per_replica(
                    cx,
                    dim,
                    t,
                    state,
                    mem,
                    latency_judged,
                    failures_implicated,
                )
                .filter(|c| *c > learned)
                {
                    Some(per_replica) => CapacityEstimate {
                        per_replica,
                        source: CapacitySource::Carried,
                    },
                    None => CapacityEstimate {
                        per_replica: learned,
                        source: CapacitySource::Learned,
                    },
                },
            ),
            None => dim
                .hint(&pool.capacity)
                .map(|per_replica| CapacityEstimate {
                    per_replica,
                    source: CapacitySource::Hint,
                }),
        };
        *dim.slot(&mut reason.capacity) = estimate;
    }
    let capacity = reason.capacity;
    let has_load = t.has_load();

    // Panic: the short window breaches an objective, short-window load reaches panicThreshold
    // times what the ready replicas sustain, or nothing is ready to serve the load (the largest
    // overload there is, e.g. waking from zero).
    let mut panic_now = ready == 0 && has_load;
    for &dim in dimensions(role) {
        if let Some(cap) = dim.get(&capacity) {
            let load = dim.load(&t.short, t);
            let sustained = f64::from(ready) * cap.per_replica;
            // A learned capacity is a lower bound (what a window within the objective proved):
            // load beyond it while latency stays well below the objective is not an overload.
            let signal = dim.signal();
            let latency_fine = matches!(
                cap.source,
                CapacitySource::Learned | CapacitySource::Carried
            ) && latency_judged
                && well_within(signal, cx.slo, &t.short);
            if load > 0.0
                && (ready == 0 || (load >= behavior.panic_threshold * sustained && !latency_fine))
            {
                panic_now = true;
            }
        }
    }
    if short_requests >= MIN_PANIC_REQUESTS {
        for &signal in signals(role) {
            if let (Some(target), Some(q)) = (signal.target(cx.slo), signal.measured(&t.short))
                && q > target
            {
                panic_now = true;
            }
        }
    }
    if panic_now {
        mem.set_last_panic_at(now);
    }
    let panic_until = mem
        .last_panic_at()
        .map(|at| at.saturating_add(t.stable.length));
    let in_panic = panic_now || panic_until.is_some_and(|until| now < until);
    reason.panic = in_panic;

    // Feed-forward: load over per-replica capacity, per known dimension. A capacity that is only
    // the least proven says nothing of how far past it the replicas could go: extrapolated to a
    // load many times it, it asks for many times the replicas needed; latency says how short
    // they are (see `lower_bound_reach`).
    let lower_bound_reach =
        lower_bound_reach(cx, role, t, ready, mem, latency_judged, failures_implicated);
    let mut feed_forward: Option<u32> = None;
    for &dim in dimensions(role) {
        if let Some(cap) = dim.get(&capacity) {
            let mut n = replicas_for(dim.sizing_load(t), cap.per_replica);
            let only_a_lower_bound =
                dim.hint(&pool.capacity).is_none() && !dim.lowered_by_miss(&lowered_by_miss);
            if only_a_lower_bound && n > lower_bound_reach {
                reason.feed_forward_on_lower_bound =
                    Some(reason.feed_forward_on_lower_bound.map_or(n, |m| m.max(n)));
                n = lower_bound_reach;
            }
            feed_forward = Some(feed_forward.map_or(n, |f| f.max(n)));
        }
    }

    // SLO feedback, per objective. In panic the worse window counts, otherwise the stable one.
    let mut feedback: Option<u32> = None;
    for &signal in signals(role) {
        let Some(target) = signal.target(cx.slo) else {
            continue;
        };
        let stable_q = signal.measured(&t.stable);
        let short_q = signal.measured(&t.short);
        let counted = match (stable_q, short_q) {
            (Some(stable), Some(short)) if in_panic && short > stable => {
                Some((short, Window::Short))
            }
            (Some(stable), _) => Some((stable, Window::Stable)),
            (None, Some(short)) if in_panic => Some((short, Window::Short)),
            (None, _) => None,
        };
        let covered = signal.covered(&capacity);
        let wants = match counted {
            Some((q, window)) => {
                let r = ratio(q, target);
                *signal.reading(&mut reason) = Some(SloReading {
                    measured: q,
                    target,
                    window,
                    error: r - 1.0,
                });
                if r > 1.0 {
                    let factor = r.min(1.0 + MAX_SLO_ERROR);
                    // The latency was measured on the replicas that served during the window:
                    // replicas that became ready since (the answer to this very breach) did not
                    // shape it, and multiplying them too would scale up a second time for the
                    // same shortfall.
                    let length = match window {
                        Window::Short => t.short.length,
                        Window::Stable => t.stable.length,
                    };
                    let served = mem.ready_within(now, length).unwrap_or(ready).min(ready);
                    Some((f64::from(served.max(1)) * factor - EPSILON).ceil() as u32)
                } else if covered {
                    // Near the objective the ready replicas stay; well below, feed-forward governs.
                    (r >= WELL_BELOW_TARGET).then_some(ready)
                } else if ready >= 2
                    && latency_judged
                    && worst_ratio(signal, t, target) * f64::from(ready) / f64::from(ready - 1)
                        <= WELL_BELOW_TARGET
                {
                    // No capacity to size on: give up one replica only when the latency, scaled to
                    // one replica fewer, would still be well below the objective.
                    Some(ready - 1)
                } else {
                    Some(ready)
                }
            }
            // Load but no completed request to judge it by: keep what serves it.
            None if !covered && has_load => Some(ready.max(1)),
            None => None,
        };
        if let Some(n) = wants {
            feedback = Some(feedback.map_or(n, |f| f.max(n)));
        }
    }
    reason.feed_forward_replicas = feed_forward;
    // Held only if the limit lowered the estimate: another dimension (on its hint) may ask for
    // more than the held one wanted.
    reason.feed_forward_on_lower_bound = reason
        .feed_forward_on_lower_bound
        .filter(|&held_from| feed_forward.is_some_and(|asked| held_from > asked));
    reason.slo_feedback_replicas = feedback;

    let mut need = feed_forward.unwrap_or(0).max(feedback.unwrap_or(0));
    if has_load {
        // Any load needs a replica, whatever the estimates (scale from zero).
        need = need.max(1);
    }
    let mut driver = match (feed_forward, feedback) {
        (Some(ff), Some(fb)) if fb > ff => Rule::SloFeedback,
        (Some(_), _) => Rule::FeedForward,
        (None, Some(_)) => Rule::SloFeedback,
        (None, None) => Rule::NoChange,
    };
    if in_panic && need > from {
        driver = Rule::Panic;
    }

    // Starting replicas are on the way within the grace after the last change; overdue ones stay
    // asked for but no longer count, so the shortfall is asked for on top of them. With no
    // change seen since this controller started (a restart, a new leader), they were asked for
    // before it: the grace runs from its start, so replicas stuck Pending do not block a
    // scale-up for ever.
    let last_change = later(state.last_scale_change_at, mem.last_event_at());
    let grace = scale_duration(
        state.time_to_ready.unwrap_or(DEFAULT_TIME_TO_READY),
        STARTING_GRACE_FACTOR,
    );
    let starting_since = last_change.unwrap_or(started_at);
    let starting_counted = now.saturating_sub(starting_since) <= grace;
    reason.starting_counted = starting_counted;
    // The re-ask is the shortfall asked for once more, not one replica per overdue one: the
    // replicas of an earlier re-ask are starting (and overdue) too, and counting them again would
    // grow the pool by the shortfall at every grace, up to maxReplicas, while pods stay Pending
    // for want of nodes; then all start at once when nodes come. A growing shortfall still asks
    // for more.
    let overdue = if starting_counted {
        0
    } else {
        state.starting_replicas.min(need.saturating_sub(ready))
    };
    let wanted = need.saturating_add(overdue);

    let restart_until = started_at.saturating_add(t.stable.length);
    let restart_hold = now < restart_until;
    // Staying at zero is not a scale-down, so an idle pool already at zero needs no full window.
    let zero_allowed = cx.scale_to_zero
        && !has_load
        && (from == 0 || (t.stable.is_full() && !restart_hold && !in_panic));
    let floor = if zero_allowed { 0 } else { bounds.min() };
    let recommended = wanted.clamp(floor, bounds.max());
    if recommended > wanted {
        driver = Rule::MinReplicas;
    } else if recommended < wanted {
        driver = Rule::MaxReplicas;
    } else if recommended == 0 {
        driver = Rule::ScaleToZero;
    }
    reason.driver = driver;
    reason.recommended_replicas = recommended;
    if matches!(t.freshness, Freshness::Partial { .. }) {
        // The load seen is short, so is the recommendation: it must not stand for the load that
        // was really there in either window. The scale-down window holds the current count, as
        // for a gap; the scale-up window is left alone, where a low sample would hold back the
        // scale-up that the whole load calls for once it is seen again.
        mem.record_held(now, recommended.max(from));
    } else {
        mem.record(now, recommended);
    }

    // maxReplicas lowered under the current count is configuration, not data: apply it at once.
    if from > bounds.max() {
        return decision(bounds.max(), Rule::MaxReplicas, reason);
    }

    let cooldown_until = last_change.map(|at| at.saturating_add(behavior.cooldown));
    let in_cooldown = cooldown_until.is_some_and(|until| now < until);

    if recommended > from {
        let rules = &behavior.scale_up;
        let lowest = if in_panic {
            recommended
        } else {
            mem.lowest_within(now, rules.stabilization_window)
                .unwrap_or(recommended)
                .min(recommended)
        };
        let covered_by_starting = starting_counted
            && need > ready
            && need <= ready.saturating_add(state.starting_replicas);
        let (mut to, mut rule) = if lowest <= from {
            (from, Rule::StabilizedUp)
        } else if covered_by_starting {
            (from, Rule::WaitingForStartingReplicas)
        } else if in_cooldown && !in_panic {
            reason.hold_until = cooldown_until;
            (from, Rule::Cooldown)
        } else {
            let allowed = rules
                .max_step
                .saturating_sub(mem.moved_within(now, rules.period, true));
            let to = lowest.min(from.saturating_add(allowed));
            let rule = if to < lowest {
                Rule::StepLimited
            } else if lowest < recommended {
                Rule::StabilizedUp
            } else {
                driver
            };
            (to, rule)
        };
        // minReplicas is a bound, not a recommendation: no gate holds a pool below it.
        if to < bounds.min() {
            to = bounds.min();
            rule = Rule::MinReplicas;
        }
        return decision(to, rule, reason);
    }

    if recommended < from {
        let rules = &behavior.scale_down;
        let mut highest = mem
            .highest_within(now, rules.stabilization_window)
            .unwrap_or(recommended)
            .max(recommended);
        // Recommendations from before this controller started are unknown; assume they were the
        // current count, so a restart never shortens the scale-down window.
        if now.saturating_sub(started_at) < rules.stabilization_window {
            highest = highest.max(from);
        }
        let (to, rule) = if in_panic {
            reason.hold_until = panic_until;
            (from, Rule::Panic)
        } else if let Freshness::Partial {
            silent_reporters, ..
        } = t.freshness
        {
            let rule = if silent_reporters > 0 {
                Rule::SilentReporterHold
            } else {
                Rule::KeysOverLimitHold
            };
            (from, rule)
        } else if restart_hold {
            reason.hold_until = Some(restart_until);
            (from, Rule::RestartHold)
        } else if highest >= from {
            (from, Rule::StabilizedDown)
        } else if !t.stable.is_full() {
            (from, Rule::PartialWindowHold)
        } else if in_cooldown {
            reason.hold_until = cooldown_until;
            (from, Rule::Cooldown)
        } else {
            let allowed = rules
                .max_step
                .saturating_sub(mem.moved_within(now, rules.period, false));
            let mut target = highest.max(from.saturating_sub(allowed));
            if target > 0 && target < bounds.min() {
                // Only a pool going to zero gets here (every other recommendation is at least
                // minReplicas). It never rests between zero and minReplicas: it steps down to the
                // minimum, then takes the last step to zero at once.
                target = if from <= bounds.min() {
                    0
                } else {
                    bounds.min()
                };
            }
            // Check N-1 (and each count below it) before removing a replica.
            let mut to = target;
            while to < from && !fits(to, role, cx.slo, t, ready, &capacity, has_load) {
                to += 1;
            }
            let rule = if to > target {
                Rule::WouldNotFit
            } else if target > highest {
                Rule::StepLimited
            } else if highest > recommended {
                Rule::StabilizedDown
            } else {
                driver
            };
            (to, rule)
        };
        // A count set below minReplicas from outside, held rather than taken to zero, rests at
        // the minimum: a pool never rests between zero and minReplicas.
        if to > 0 && to < bounds.min() {
            return decision(bounds.min(), Rule::MinReplicas, reason);
        }
        return decision(to, rule, reason);
    }

    let rule = if wanted > bounds.max() {
        Rule::MaxReplicas
    } else if starting_counted && state.starting_replicas > 0 && need > ready {
        Rule::WaitingForStartingReplicas
    } else {
        Rule::NoChange
    };
    decision(from, rule, reason)
}

/// The most replicas feed-forward may ask for on a capacity that is only a lower bound: the
/// replicas that served over the stable window (as SLO feedback counts them: ones made ready by
/// the answer have not shown what they carry yet, and multiplying them would answer the step
/// again), grown by the worst latency of either window over [`WELL_BELOW_TARGET`] (from 1 while
/// well below the objectives, so a pool nearing them may still add ahead of a breach), at most
/// [`MAX_GROWTH_ON_A_LOWER_BOUND`]; never fewer than the ready replicas. Requests queueing, or
/// failing (refused for lack of replicas, their latency unmeasured) in either window, or no
/// replica ready, show nothing of the replicas' headroom: the whole factor. Without latency samples nothing shows the
/// replicas short: no growth. Each piece of evidence only raises the growth, and more load only
/// adds evidence (a queue, latency samples, a breach), so more load never lowers the limit: the
/// short window's latency alone, and the whole factor without it, asked for 8 replicas while the
/// last 10 s had completed nothing and 3 once they had, within the objective. Replicas that meet
/// the objectives with room to spare are not multiplied again while what they carry is not yet
/// steady enough to count as "carried now": bounded by the served replicas alone, a step worth
/// six went 1 -> 4 -> 16 -> 54 as each answer became ready.
fn lower_bound_reach(
    cx: &Context<'_>,
    role: Role,
    t: &PoolTelemetry,
    ready: u32,
    mem: &PoolMemory,
    latency_judged: bool,
    failures_implicated: bool,
) -> u32 {
    let served = mem
        .ready_within(cx.now, t.stable.length)
        .unwrap_or(ready)
        .min(ready);
    let worst_latency = signals(role)
        .iter()
        .filter_map(|&signal| Some(worst_ratio(signal, t, signal.target(cx.slo)?)))
        .fold(0.0, f64::max);
    let failing = |window: &WindowStats| {
        failures_implicated
            && rate(window.error_rate_per_s)
                > MAX_ERROR_SHARE_FOR_LEARNING * rate(window.request_rate_per_s)
    };
    // Nothing serving (waking from zero) shows nothing either.
    let headroom_judged = ready > 0 && latency_judged && !failing(&t.short) && !failing(&t.stable);
    let growth = if headroom_judged {
        (worst_latency / WELL_BELOW_TARGET).clamp(1.0, MAX_GROWTH_ON_A_LOWER_BOUND)
    } else {
        MAX_GROWTH_ON_A_LOWER_BOUND
    };
    // `as` saturates, and a NaN ratio (a zero objective is filtered out) cannot arise.
    let grown = (f64::from(served.max(1)) * growth - EPSILON).ceil() as u32;
    grown.max(ready)
}

/// The worse of both windows' ratios for `signal` (0 without samples).
fn worst_ratio(signal: Signal, t: &PoolTelemetry, target: Duration) -> f64 {
    [signal.measured(&t.stable), signal.measured(&t.short)]
        .into_iter()
        .flatten()
        .map(|q| ratio(q, target))
        .fold(0.0, f64::max)
}

/// Whether the load would fit on `n` replicas within the SLO: under every known capacity, with no
/// objective breached in either window (a short-window breach too small to panic on still forbids
/// removing replicas), and, for objectives no capacity stands behind, with latency scaled to `n`
/// serving replicas well below the objective. No serving replica is removed while requests queue
/// for the pool: token rates count requests as they finish, so a queue at the start of a burst is
/// in neither them nor the latency of the few completed (4 -> 3 with 100 requests waiting).
fn fits(
    n: u32,
    role: Role,
    slo: &Slo,
    t: &PoolTelemetry,
    ready: u32,
    capacity: &CapacityUsed,
    has_load: bool,
) -> bool {
    if n == 0 {
        return !has_load;
    }
    for &dim in dimensions(role) {
        if let Some(cap) = dim.get(capacity)
            && dim.sizing_load(t) / f64::from(n) > cap.per_replica * (1.0 + EPSILON)
        {
            return false;
        }
    }
    for &signal in signals(role) {
        if let Some(target) = signal.target(slo)
            && worst_ratio(signal, t, target) > 1.0
        {
            return false;
        }
    }
    if n >= ready {
        // No serving replica is removed (only starting ones, or none).
        return true;
    }
    // Every role: requests waiting for their first token decode at a disaggregated decode pool
    // next (4 -> 3 with 200 waiting went over its hint).
    if first_tokens_queue(t, ready) {
        return false;
    }
    for &signal in signals(role) {
        let Some(target) = signal.target(slo) else {
            continue;
        };
        if signal.covered(capacity) {
            continue;
        }
        let has_samples =
            signal.measured(&t.stable).is_some() || signal.measured(&t.short).is_some();
        if !has_samples {
            if has_load {
                return false;
            }
            continue;
        }
        let projected = worst_ratio(signal, t, target) * f64::from(ready) / f64::from(n);
        if projected > WELL_BELOW_TARGET {
            return false;
        }
    }
    true
}

fn load_used(t: &PoolTelemetry) -> LoadUsed {
    LoadUsed {
        request_rate_per_s: rate(t.short.request_rate_per_s).max(rate(t.stable.request_rate_per_s)),
        input_tokens_per_s: Dimension::PrefillTokens.sizing_load(t),
        output_tokens_per_s: Dimension::DecodeTokens.sizing_load(t),
        error_rate_per_s: rate(t.short.error_rate_per_s).max(rate(t.stable.error_rate_per_s)),
        decoding_sequences: t.in_flight_decoding,
        waiting_sequences: t.in_flight_waiting,
        decoding_sequences_mean: t.stable.mean_decoding.map(rate),
    }
}

/// Whether `window` shows what `ready` replicas sustain: fresh and whole, with requests completed
/// and few failed, the ready count unchanged for `steady_for`. Partial telemetry sees only part
/// of the load (a lower bound): a miss at the load seen would teach a capacity below the truth,
/// and nothing learned later would undo it.
fn shows_steady_replicas(
    window: &WindowStats,
    t: &PoolTelemetry,
    ready: u32,
    mem: &PoolMemory,
    now: Duration,
    steady_for: Duration,
) -> bool {
    if t.freshness != Freshness::Fresh || ready == 0 || !window.is_full() {
        return false;
    }
    let Some(since) = mem.ready_since() else {
        return false;
    };
    if now.saturating_sub(since) < steady_for {
        return false;
    }
    few_failed(window)
}

/// Whether the load looks steady now: each token rate of the short window within
/// [`STEADY_LOAD_TOLERANCE`] of the stable window's. A percentile breached by a burst (one in
/// progress, or one the short window has seen pass) proves a capacity below the burst's load, not
/// below the stable window's mean: learnt from the mean, it would size the steady hours that
/// follow for the bursts (three times over on the Azure code trace). One look can match by
/// chance between bursts, so `learn` requires every look for a stable window to.
fn load_looks_steady(t: &PoolTelemetry) -> bool {
    // Requests the short window would hold under the stable window's rate; its token rates'
    // relative standard error is then sqrt((1 + cv^2) / n).
    let expected = rate(t.stable.request_rate_per_s) * t.short.coverage.as_secs_f64();
    if expected <= 0.0 {
        // Nothing completed to compare: no burst either.
        return true;
    }
    let noise = ((1.0 + TOKENS_PER_REQUEST_CV.powi(2)) / expected).sqrt();
    let tolerance = STEADY_LOAD_TOLERANCE.max(STEADY_LOAD_NOISE_SIGMAS * noise);
    let near =
        |short: f64, stable: f64| (rate(short) - rate(stable)).abs() <= tolerance * rate(stable);
    near(t.short.input_tokens_per_s, t.stable.input_tokens_per_s)
        && near(t.short.output_tokens_per_s, t.stable.output_tokens_per_s)
}

/// Whether requests queue for this pool (waiting for their first token as many as replicas are
/// ready, or any with none ready): its latency then no longer speaks for the load (see
/// `decide_pool`). A disaggregated decode pool's requests wait at the prefill pool, before it.
fn queued_for(role: Role, t: &PoolTelemetry, ready: u32) -> bool {
    role != Role::Decode && first_tokens_queue(t, ready)
}

/// Whether as many requests wait for their first token as replicas are ready (any, with none).
fn first_tokens_queue(t: &PoolTelemetry, ready: u32) -> bool {
    f64::from(t.in_flight_waiting) >= f64::from(ready.max(1))
}

/// Whether a pool of a disaggregated pair meets its own objectives well in both windows, with
/// nothing queued for it: failures are then taken for its partner's when the partner's are not
/// met (see `decide`). Without it, a long-output burst that the decode pool refused part of grew
/// a prefill pool carrying its load at 40% of its TTFT objective 2 -> 6.
fn well_met(cx: &Context<'_>, role: Role, input: &PoolInputs) -> bool {
    let t = &input.telemetry;
    !queued_for(role, t, input.state.ready_replicas)
        && signals(role).iter().all(|&signal| {
            well_within(signal, cx.slo, &t.short) && well_within(signal, cx.slo, &t.stable)
        })
}

/// Whether `window` has completed requests and few of them failed.
fn few_failed(window: &WindowStats) -> bool {
    let requests = rate(window.request_rate_per_s);
    // `requests` counts every completed request, failed ones included.
    requests > 0.0 && rate(window.error_rate_per_s) <= MAX_ERROR_SHARE_FOR_LEARNING * requests
}

/// Whether `signal`'s objective is met with room to spare in `window`.
fn well_within(signal: Signal, slo: &Slo, window: &WindowStats) -> bool {
    signal
        .target(slo)
        .zip(signal.measured(window))
        .is_some_and(|(target, q)| ratio(q, target) < WELL_BELOW_TARGET)
}

/// Learns per-replica capacity from a steady pool: meeting the objective at `x` per ready replica
/// shows capacity >= `x` (the estimate rises to `x`, and further by [`probe`] while latency is well
/// below the objective), missing it shows capacity < `x` (the estimate
/// falls towards `x * VIOLATION_BACKOFF`, as an EWMA with the stable window as time constant, so
/// the tick rate does not matter and one bad window does not erase what was learned). Returns the
/// capacity for the decision at hand: what is kept, and what a miss in unsteady load showed.
fn learn(
    cx: &Context<'_>,
    role: Role,
    pool: &PoolSpec,
    t: &PoolTelemetry,
    state: &PoolState,
    mem: &mut PoolMemory,
) -> LearnedCapacity {
    let now = cx.now;
    let window = &t.stable;
    let ready = state.ready_replicas;
    let load_steady = mem.note_load_steadiness(load_looks_steady(t), now, window.length);
    // The window must show these ready replicas alone, not a mix of counts.
    if !shows_steady_replicas(window, t, ready, mem, now, window.length) {
        return *mem.learned();
    }
    // A queue at the window's end, or over it on average.
    let waiting = f64::from(t.in_flight_waiting).max(window.mean_waiting.map_or(0.0, rate));
    let waiting_per_replica = waiting / f64::from(ready);
    let tau = window.length.as_secs_f64();
    let learned = mem.learned_mut();
    let dt = learned
        .updated_at
        .map_or(tau, |at| now.saturating_sub(at).as_secs_f64().min(tau));
    // The share of a stable window since learning last looked.
    let windows = if tau > 0.0 { dt / tau } else { 1.0 };
    let alpha = if tau > 0.0 {
        1.0 - (-windows).exp()
    } else {
        1.0
    };
    learned.updated_at = Some(now);
    let mut at_hand_only = Vec::new();
    for &dim in dimensions(role) {
        // A unified pool's sequences include a queue, which waits rather than being served and
        // leaves TPOT untouched: counted in, it would be learned as what a replica serves.
        if matches!(dim, Dimension::Sequences) && waiting_per_replica >= 1.0 {
            continue;
        }
        let signal = dim.signal();
        let (Some(target), Some(q)) = (signal.target(cx.slo), signal.measured(window)) else {
            continue;
        };
        let x = dim.learning_load(window, t) / f64::from(ready);
        if !(x.is_finite() && x > 0.0) {
            continue;
        }
        let hint = dim.hint(&pool.capacity);
        let slot = dim.learned_mut(learned);
        let prior = positive(*slot).or(hint);
        let r = ratio(q, target);
        let next = if q <= target {
            // Sustained within the objective: a proven lower bound, taken at once. Approaching it
            // gradually would leave feed-forward asking for one replica more than the ones that
            // just proved enough.
            match prior {
                Some(p) if x <= p => probe(p, x, r, windows),
                // Sequences count from their first token, TPOT once they finish: a burst
                // seconds old shows in the sequences (at the window's end, and some in its
                // mean) at a latency it has not yet moved. Taken at once it would be learned as
                // capacity and cancel the scale-up it calls for, so it rises as a probe does.
                Some(p) if dim.is_sequences() => {
                    Some(x.min(p * MAX_PROBE_GROWTH.powf(windows.min(1.0))))
                }
                _ => Some(x),
            }
        } else {
            // A TTFT miss with no queue is the prompts' length, not a lack of replicas.
            if matches!(signal, Signal::Ttft) && waiting_per_replica < 1.0 {
                continue;
            }
            let goal = x * VIOLATION_BACKOFF;
            let floor = hint.map_or(0.0, |h| h * MIN_LEARNED_SHARE_OF_HINT);
            match prior {
                None => Some(goal.max(floor)),
                Some(p) if p > goal => Some((p + alpha * (goal - p)).max(floor)),
                Some(_) => None,
            }
        };
        if let Some(value) = positive(next) {
            if q > target && !load_steady {
                // A miss in a window whose load came in bursts is the bursts', not its mean's:
                // kept, it would size the steady hours after for them. It still counts for the
                // decision at hand, so that more load never meets a higher capacity than less.
                at_hand_only.push((dim, value));
            } else {
                *slot = Some(value);
                if q > target {
                    // A miss bounds the capacity from above: no longer only the least proven.
                    *dim.lowered_by_miss_mut(&mut learned.lowered_by_miss) = true;
                }
            }
        }
    }
    let mut at_hand = *mem.learned();
    for (dim, value) in at_hand_only {
        *dim.learned_mut(&mut at_hand) = Some(value);
    }
    at_hand
}

/// The token rate each ready replica carries, when that proves a capacity beyond what was
/// learned: latency can be judged in the short window (nothing queues), few
/// failed, the latency objective is well met there and not missed in the stable window, and the
/// ready replicas have not changed for a stable window (requests finishing now started long ago);
/// few failed in the stable window either.
/// Both windows then show load these replicas carried within the objective, so the higher one
/// counts: the short window's alone, set against a higher stable load, would ask for more
/// replicas the less the short window showed (2 -> 16 at 150 tok/s, a hold at 1,200).
/// Without it a capacity learned at a quiet hour (a lower bound) would size a burst the
/// replicas plainly carry as an overload, many replicas at once. Used for the decision at hand
/// only, never learned: tokens are counted as requests finish, so one short window can show a
/// batch of completions rather than a throughput, and keeping the highest of many would ratchet
/// the estimate up. A unified pool's sequences in flight are a snapshot, ahead of the latency
/// measured; they count too, as the panic rule counts them: a burst shows there first as requests
/// waiting for their first token (then nothing is judged carried) and as TTFT, measured at the
/// first token, before any of it decodes. Without this a pool without hints, sized on the
/// sequences a quiet hour's snapshot taught, went 1 -> 8 on a load one replica carried at 18% of
/// its objectives, and took 25 minutes to come back down. A decode pool's sequences arrive
/// decoding, with nothing before them to judge them by: they are left out.
fn carried_per_replica(
    cx: &Context<'_>,
    dim: Dimension,
    t: &PoolTelemetry,
    state: &PoolState,
    mem: &PoolMemory,
    latency_judged: bool,
    failures_implicated: bool,
) -> Option<f64> {
    if matches!(dim, Dimension::DecodingSequences) || !latency_judged {
        return None;
    }
    let (window, ready) = (&t.short, state.ready_replicas);
    if !shows_steady_replicas(window, t, ready, mem, cx.now, t.stable.length) {
        return None;
    }
    let signal = dim.signal();
    let stable_missed = signal
        .target(cx.slo)
        .zip(signal.measured(&t.stable))
        .is_some_and(|(target, q)| q > target);
    // The stable window's load counts too, so its failures must be as few: a burst refused in
    // part is not one the replicas carried. (It holds the short window's requests, so it has
    // completed ones.)
    let failures_ok =
        few_failed(&t.stable) || (rate(t.stable.request_rate_per_s) > 0.0 && !failures_implicated);
    if !well_within(signal, cx.slo, window) || stable_missed || !failures_ok {
        return None;
    }
    let carried = dim.sizing_load(t) / f64::from(ready);
    (carried.is_finite() && carried > 0.0).then_some(carried)
}

/// A capacity `p` that the pool sustains at `x` per replica with latency at `r` of its objective.
///
/// A window within the objective only proves capacity >= `x`, and feed-forward sizes the pool so
/// that per-replica load stays at or under `p`: taken alone, the estimate would stay at the
/// lowest utilisation it first saw (a quiet night) and the pool over-provisioned for good. So
/// while latency is well below its objective, `p` is raised towards what the headroom suggests,
/// slowly (at most [`MAX_PROBE_GROWTH`] per stable window, `elapsed` in windows) and never past
/// `x * (1 + (WELL_BELOW_TARGET - r) / 2)`: the more headroom, the further beyond the proven
/// load, but at most 1.4 x it, and not at all where latency was near the objective. Latency rises
/// steeply near saturation, so a bolder bound overshoots the true capacity from half-loaded
/// replicas; this one may leave a small pool a replica above the least it could run on. An
/// overshoot shows as a miss, which SLO feedback answers at once and the EWMA on misses learns
/// from.
fn probe(p: f64, x: f64, r: f64, elapsed: f64) -> Option<f64> {
    if !(r < WELL_BELOW_TARGET && r.is_finite() && elapsed > 0.0) {
        return None;
    }
    let growth = if r > 0.0 {
        (WELL_BELOW_TARGET / r).min(MAX_PROBE_GROWTH)
    } else {
        MAX_PROBE_GROWTH
    };
    let next = (p * growth.powf(elapsed.min(1.0))).min(x * (1.0 + (WELL_BELOW_TARGET - r) / 2.0));
    (next > p).then_some(next)
}
