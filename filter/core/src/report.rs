//! The reporter: at most one report call in flight per Envoy process, resent unchanged until
//! acknowledged.
//!
//! Every worker ticks, and any of them may send; they agree through the [`ReporterState`] under
//! [`REPORTER_KEY`] in shared data. A tick reads the state, calls [`plan_tick`], and writes the
//! planned state back with the CAS it read: only the worker whose write succeeds sends, so two
//! workers never send at once. A report is built once ([`build_report`], [`record_pending`]) and
//! kept until the control service acknowledges it; a resend carries the same sequence and bytes,
//! and the control service ignores a sequence it already merged, so a call that timed out after
//! the server merged it never counts twice. A report unacknowledged past [`retention_ms`] is
//! dropped and counted in `dropped`, and the sequence moves on.
//!
//! Times here are wall-clock unix milliseconds, the only clock all workers share
//! (`proxy_get_current_time`); each worker's monotonic clock starts with its own VM. The code
//! tolerates the clock stepping back.

use flyball_proto::v1;
use prost::Message;

/// Shared-data key of the [`ReporterState`].
pub const REPORTER_KEY: &str = "flyball.reporter";

/// Version of the filter that builds the reports.
pub const FILTER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The process-wide reporter state, shared by all workers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReporterState {
    /// The sequence the next new report gets; starts at 1.
    #[prost(uint64, tag = "1")]
    pub next_sequence: u64,
    /// The encoded `ReportRequest` not yet acknowledged.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub pending: Option<Vec<u8>>,
    #[prost(uint64, tag = "3")]
    pub pending_sequence: u64,
    /// Requests whose figures are in the pending report (counted as dropped if it is).
    #[prost(uint64, tag = "4")]
    pub pending_requests: u64,
    /// When the pending report was built.
    #[prost(uint64, tag = "5")]
    pub pending_since_ms: u64,
    /// When the call in flight was sent; 0 when none is.
    #[prost(uint64, tag = "6")]
    pub dispatched_at_ms: u64,
    /// The sequence of the call in flight.
    #[prost(uint64, tag = "7")]
    pub in_flight_sequence: u64,
    /// No new call before this time.
    #[prost(uint64, tag = "8")]
    pub next_due_ms: u64,
    /// `Reporter.process_start_unix_ms`: when the first worker created this state.
    #[prost(uint64, tag = "9")]
    pub process_start_ms: u64,
    /// Reports given up on, cumulative.
    #[prost(uint64, tag = "10")]
    pub dropped_reports: u64,
    /// Requests in those reports, cumulative.
    #[prost(uint64, tag = "11")]
    pub dropped_requests: u64,
    /// The worker that sent the latest report, if it was delivered; 0 for none. See
    /// [`plan_tick`].
    #[prost(uint64, tag = "12")]
    pub sender: u64,
    /// The configuration generation of `sender` (see [`register_configuration`]).
    #[prost(uint64, tag = "13")]
    pub sender_generation: u64,
    /// The newest configuration generation, and a hash of its plugin configuration.
    #[prost(uint64, tag = "14")]
    pub newest_generation: u64,
    #[prost(uint64, tag = "15")]
    pub newest_config_hash: u64,
    /// When a root context of the newest generation last registered or sent.
    #[prost(uint64, tag = "16")]
    pub newest_seen_ms: u64,
    /// The report interval of the sender that set `next_due_ms` (configurations may differ).
    #[prost(uint64, tag = "17")]
    pub sender_interval_ms: u64,
    /// Reports that failed since the control service last answered one in time: from the third,
    /// each puts the next one back ([`backoff_ms`]).
    #[prost(uint64, tag = "18")]
    pub failures_in_a_row: u64,
}

/// What a worker's tick should do.
#[derive(Debug, Clone, PartialEq)]
pub enum TickPlan {
    /// Nothing now: a call is in flight, or the next one is not due.
    Wait,
    /// Write `state` with the CAS read; if that succeeds, send `report` (the pending report,
    /// unchanged) and remember `sequence` for [`on_response`].
    Resend {
        state: ReporterState,
        report: Vec<u8>,
        sequence: u64,
    },
    /// Write `state` with the CAS read; if that succeeds, take the keys from the accumulation,
    /// [`build_report`] with `sequence`, store it with [`record_pending`] and send it.
    BuildNew { state: ReporterState, sequence: u64 },
}

// === impl ReporterState ===

impl ReporterState {
    /// The state as read from shared data, or a fresh one (this process starts reporting now)
    /// when there is none or it does not decode.
    pub fn decode_or_new(shared: Option<&[u8]>, now_ms: u64) -> ReporterState {
        shared
            .and_then(|bytes| ReporterState::decode(bytes).ok())
            .filter(|s| s.process_start_ms != 0)
            .unwrap_or_else(|| ReporterState {
                next_sequence: 1,
                // Zero reads as "no state": keep a real value even for a clock at the epoch.
                process_start_ms: now_ms.max(1),
                ..Default::default()
            })
    }

    /// What goes in the report's `dropped`: this state's counts plus the requests the
    /// accumulation dropped (`ReportKeys::dropped_requests`).
    pub fn dropped(&self, accumulation_dropped_requests: u64) -> v1::DroppedTelemetry {
        v1::DroppedTelemetry {
            reports: self.dropped_reports,
            requests: self
                .dropped_requests
                .saturating_add(accumulation_dropped_requests),
        }
    }
}

/// How long an unacknowledged report is kept: 60 s, or 10 intervals when those are longer.
pub fn retention_ms(interval_ms: u64) -> u64 {
    interval_ms.saturating_mul(10).max(60_000)
}

/// How long a call may stay in flight before the state treats it as lost. Envoy calls back
/// after `timeout_ms` in any case; the margin covers a worker that died before it could record
/// the answer.
pub fn in_flight_expiry_ms(timeout_ms: u64) -> u64 {
    timeout_ms.saturating_add(timeout_ms.max(1000))
}

/// How long past due a report waits for the worker that sent the previous one before any other
/// worker sends it: half an interval, and at least 500 ms, so a worker busy with traffic for a
/// moment is late, not replaced. When it is gone (its VM replaced by a configuration change),
/// the next worker's tick comes up to a quarter interval after the takeover; the last report may
/// have gone half a tick (an eighth of an interval) early. So reports still arrive within 1.875
/// intervals (or 0.5 s and 1.375 intervals), well within the control service's stale limit (3
/// intervals, and at least 3 s).
pub fn takeover_ms(interval_ms: u64) -> u64 {
    (interval_ms / 2).max(500)
}

/// How often each worker ticks: a quarter of the report interval. A worker merges what its
/// requests changed into the shared accumulation on its own tick, and the sender reports on
/// its: ticking only once an interval, a request's start could wait most of an interval to be
/// merged and then most of another to be reported (load steps reached the control service in
/// about two intervals); now it is merged within a quarter.
pub fn tick_period_ms(interval_ms: u64) -> u64 {
    (interval_ms / 4).max(1)
}

/// How early the sender's tick may read the clock and still send: half a tick. Envoy re-arms the
/// tick timer for one period, but the wall clock the due time is kept in may read a millisecond
/// short of it when the timer fires. Strictly on time, such a report waited a whole tick (when a
/// tick was an interval, one report in five came 197 ms after the last at 100 ms).
pub fn early_tick_ms(interval_ms: u64) -> u64 {
    tick_period_ms(interval_ms) / 2
}

/// How much later than its due time a report goes after `failures` reports in a row failed: none
/// after one or two, then 1, 3 and 7 intervals, and no more than that or 8 s. A control service
/// that answers too slowly or not at all would otherwise get a new stream from every gateway
/// each interval, and a new connection with one request a connection (the Istio
/// `DestinationRule`): more load on a service already failing to keep up. Reports are only
/// delayed: what they carry accumulates meanwhile. Not before the third: one lost connection can
/// fail two reports (the stream on it, then another worker's), each after up to
/// `reportTimeoutMs`, and an interval put back on top of those would take a healthy gateway past
/// the control service's stale limit (3 s; at 1 s intervals the gap went from 2.9 to 3.9 s).
pub fn backoff_ms(interval_ms: u64, failures: u64) -> u64 {
    let intervals = match failures {
        0..=2 => 0,
        3 => 1,
        4 => 3,
        _ => 7,
    };
    interval_ms.saturating_mul(intervals).min(MAX_BACKOFF_MS)
}

/// The most a report is put back after failures ([`backoff_ms`]).
pub const MAX_BACKOFF_MS: u64 = 8_000;

/// A stable hash of a plugin configuration (FNV-1a), the same in every VM.
pub fn config_hash(raw: &[u8]) -> u64 {
    raw.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Registers a root context configured with the plugin configuration of hash `config_hash`
/// (to be applied to the latest state, CAS loop); returns the state and the context's
/// configuration generation. The root contexts of one configuration (one per worker, and the
/// main thread's) share a generation; a configuration other than the newest one starts a newer
/// generation.
///
/// Envoy keeps the root contexts of a replaced configuration until its connections have
/// drained (`--drain-time-s`, 600 s by default, 45 s in Istio), and their ticks go on. Without
/// generations the sender of the old configuration kept sending, at its old interval, to its
/// old control cluster, under its old gateway name, until then (a reload from 100 ms to 200 ms
/// went on reporting every 100 ms).
pub fn register_configuration(
    state: &ReporterState,
    config_hash: u64,
    now_ms: u64,
) -> (ReporterState, u64) {
    let mut s = state.clone();
    if s.newest_generation == 0 || s.newest_config_hash != config_hash {
        s.newest_generation = s.newest_generation.saturating_add(1);
        s.newest_config_hash = config_hash;
        // The failures were the old configuration's (a wrong `controlCluster`, say): the new one
        // sends at its due time, not put back.
        s.failures_in_a_row = 0;
    }
    s.newest_seen_ms = now_ms;
    let generation = s.newest_generation;
    (s, generation)
}

/// [`plan_tick_for`] for a worker of generation 0 (no configuration generations).
pub fn plan_tick(
    state: &ReporterState,
    now_ms: u64,
    interval_ms: u64,
    timeout_ms: u64,
    worker: u64,
) -> TickPlan {
    plan_tick_for(state, now_ms, interval_ms, timeout_ms, worker, 0)
}

/// Decides the tick of `worker` (a number of its own, not 0), whose root context has
/// configuration generation `generation` ([`register_configuration`]). See [`TickPlan`].
///
/// The worker that sent the latest report sends the next one too; the others only once it is
/// [`takeover_ms`] overdue (that worker is stuck, or gone with its VM), or after a report that
/// failed. Every worker ticks, and each has its own connections to the control cluster: without
/// this, over time each would open a report stream, and the control service would hold one
/// connection and stream per worker of every gateway instead of one per gateway.
///
/// A newer configuration comes first: a worker of a newer generation than the sender's sends
/// at the due time, and a sender whose configuration was replaced gives way as long as the
/// newest generation shows signs of life (it registered or sent within [`takeover_ms`]).
pub fn plan_tick_for(
    state: &ReporterState,
    now_ms: u64,
    interval_ms: u64,
    timeout_ms: u64,
    worker: u64,
    generation: u64,
) -> TickPlan {
    let mut s = state.clone();
    if s.next_sequence == 0 {
        s.next_sequence = 1;
    }
    if s.dispatched_at_ms != 0 {
        let expiry = in_flight_expiry_ms(timeout_ms);
        let expired = now_ms >= s.dispatched_at_ms.saturating_add(expiry)
            // The clock stepped back by more than the expiry: do not wait for it to catch up.
            || s.dispatched_at_ms > now_ms.saturating_add(expiry);
        if !expired {
            return TickPlan::Wait;
        }
        s.dispatched_at_ms = 0;
        s.in_flight_sequence = 0;
    }
    // A report sent a little early schedules the next a little over an interval ahead, and a
    // worker may read the clock a moment before the sender did: only a due time more than an
    // interval and a tick off means the clock went back.
    // The due time may have been set by a sender of another configuration, at its interval.
    let scheduled_by = interval_ms.max(s.sender_interval_ms);
    let stepped_back =
        s.next_due_ms > now_ms.saturating_add(scheduled_by + tick_period_ms(scheduled_by));
    let superseded = generation < s.newest_generation
        && now_ms < s.newest_seen_ms.saturating_add(takeover_ms(interval_ms));
    // With no sender (after a failed report) the newest configuration goes first: a draining
    // older one that resent first would schedule the next report at its own interval (60 s
    // held a 100 ms configuration back past the control service's stale limit).
    let first_in_line = (s.sender == 0 && generation >= s.newest_generation)
        || (s.sender == worker && !superseded)
        || (s.sender != worker && generation > s.sender_generation);
    let due_ms = if first_in_line {
        s.next_due_ms.saturating_sub(early_tick_ms(interval_ms))
    } else {
        s.next_due_ms.saturating_add(takeover_ms(interval_ms))
    }
    .saturating_add(backoff_ms(interval_ms, s.failures_in_a_row));
    if now_ms < due_ms && !stepped_back {
        return TickPlan::Wait;
    }
    s.sender = worker;
    s.sender_generation = generation;
    s.sender_interval_ms = interval_ms;
    if generation >= s.newest_generation {
        s.newest_generation = generation;
        s.newest_seen_ms = now_ms;
    }
    if s.pending.is_some() {
        if s.pending_since_ms > now_ms {
            s.pending_since_ms = now_ms;
        }
        if now_ms - s.pending_since_ms >= retention_ms(interval_ms) {
            drop_pending(&mut s);
        }
    }
    // Due times keep to a schedule: a report goes out on the first tick at or past its due time,
    // up to a tick late, and timing the next from then would stretch every interval by that
    // (112 ms apart at 100 ms). A report later than that (a stalled sender, a takeover, a slow
    // acknowledgement) starts the schedule again: kept, the next would follow it closely, and the
    // control service, which judges a gateway stale by the gaps between its reports, would take
    // the next regular gap for silence.
    let late_by = now_ms.saturating_sub(s.next_due_ms);
    s.next_due_ms = if s.next_due_ms != 0 && late_by < tick_period_ms(interval_ms) && !stepped_back
    {
        s.next_due_ms.saturating_add(interval_ms)
    } else {
        now_ms.saturating_add(interval_ms)
    };
    s.dispatched_at_ms = now_ms.max(1);
    match s.pending.clone() {
        Some(report) => {
            let sequence = s.pending_sequence;
            s.in_flight_sequence = sequence;
            TickPlan::Resend {
                state: s,
                report,
                sequence,
            }
        }
        None => {
            let sequence = s.next_sequence;
            s.next_sequence = sequence.saturating_add(1);
            s.in_flight_sequence = sequence;
            TickPlan::BuildNew { state: s, sequence }
        }
    }
}

/// Stores a freshly built report as pending (to be applied to the latest state, CAS loop).
pub fn record_pending(
    state: &ReporterState,
    sequence: u64,
    report: Vec<u8>,
    requests: u64,
    now_ms: u64,
) -> ReporterState {
    let mut s = state.clone();
    s.pending = Some(report);
    s.pending_sequence = sequence;
    s.pending_requests = requests;
    s.pending_since_ms = now_ms;
    s
}

/// Applies the answer to the call that sent `sequence` (to the latest state, CAS loop). An
/// answer for a call the state no longer tracks changes nothing it should not: a late success
/// only clears the pending report if it is that same sequence.
pub fn on_response(state: &ReporterState, sequence: u64, ok: bool) -> ReporterState {
    let mut s = state.clone();
    let current = s.in_flight_sequence == sequence;
    if current {
        s.dispatched_at_ms = 0;
        s.in_flight_sequence = 0;
    }
    if ok && s.pending.is_some() && s.pending_sequence == sequence {
        clear_pending(&mut s);
    }
    if ok {
        s.failures_in_a_row = 0;
    }
    if !ok && current {
        // Perhaps only the sender's connection is broken: whichever worker ticks first may
        // send the next one.
        s.sender = 0;
        s.failures_in_a_row = s.failures_in_a_row.saturating_add(1);
    }
    // A failure is retried at the next due time, which the dispatch already set.
    s
}

/// Applies an answer to `sequence` that came after the filter gave its call up (past
/// `reportTimeoutMs`, on the stream it left half-closed): an acknowledgement, or a refusal when
/// `refused`. The report, if still pending, was delivered (or refused: dropped, as
/// [`on_refusal`] drops it) and is not sent again. What is in flight now (a resend of it,
/// perhaps, on another worker) is left alone, so no second call goes beside it, and so are the
/// failures in a row: a service that answers only after the timeout is still put back
/// ([`backoff_ms`]), taking fewer reports, each carrying what accumulated meanwhile. Returns the
/// state and whether a report was dropped.
pub fn on_late_answer(
    state: &ReporterState,
    sequence: u64,
    refused: bool,
) -> (ReporterState, bool) {
    let mut s = state.clone();
    let was_pending = s.pending.is_some() && s.pending_sequence == sequence;
    if was_pending && refused {
        drop_pending(&mut s);
    } else if was_pending {
        clear_pending(&mut s);
    }
    (s, was_pending && refused)
}

/// Applies the end of the call that sent `sequence` without an answer from the control
/// service, through no failure of its: the filter cancelled the call (its configuration
/// retired), could not build the report, or the service has no `ReportStream` (the report goes
/// again as a unary call). The report goes again at the next due time, as after a failure, but
/// nothing is put back ([`backoff_ms`]), and by the same worker (no connection of its failed),
/// which now knows to send it as a unary call: another worker would try a `ReportStream` first,
/// each costing an interval. A worker gone is let go by [`on_worker_gone`].
pub fn on_not_delivered(state: &ReporterState, sequence: u64) -> ReporterState {
    ReporterState {
        failures_in_a_row: state.failures_in_a_row,
        sender: state.sender,
        ..on_response(state, sequence, false)
    }
}

/// Applies the end of `worker`'s root context (its plugin configuration replaced or removed:
/// Envoy calls `on_done`, and nothing of that worker ticks or answers again). The report it had
/// in flight, `in_flight_sequence`, ends undelivered, so the pending report goes again at the
/// next due time rather than after the call's expiry (the control service ignores a sequence it
/// already merged), and the next report is anyone's to send at its due time rather than after a
/// takeover delay. The control service did not fail it: nothing is put back.
pub fn on_worker_gone(
    state: &ReporterState,
    worker: u64,
    in_flight_sequence: Option<u64>,
) -> ReporterState {
    let mut s = match in_flight_sequence {
        Some(sequence) => on_not_delivered(state, sequence),
        None => state.clone(),
    };
    if s.sender == worker {
        s.sender = 0;
    }
    s
}

/// The gRPC status the control service refuses an invalid report with (naming why).
pub const GRPC_INVALID_ARGUMENT: u32 = 3;

/// Applies a refusal of the call that sent `sequence` (status [`GRPC_INVALID_ARGUMENT`]): the
/// same bytes would be refused at every resend until retention passed, and the gateway's load
/// would go unseen all that while (a newer control service stricter than this filter, say). The
/// report is dropped and counted at once; the next carries what came since. Returns the state
/// and whether a report was dropped.
pub fn on_refusal(state: &ReporterState, sequence: u64) -> (ReporterState, bool) {
    let mut s = state.clone();
    // It answered.
    s.failures_in_a_row = 0;
    if s.in_flight_sequence == sequence {
        s.dispatched_at_ms = 0;
        s.in_flight_sequence = 0;
    }
    let dropped = s.pending.is_some() && s.pending_sequence == sequence;
    if dropped {
        drop_pending(&mut s);
    }
    (s, dropped)
}

/// Gives the pending report up, counting it and its requests as dropped.
fn drop_pending(s: &mut ReporterState) {
    s.dropped_reports = s.dropped_reports.saturating_add(1);
    s.dropped_requests = s.dropped_requests.saturating_add(s.pending_requests);
    clear_pending(s);
}

fn clear_pending(s: &mut ReporterState) {
    s.pending = None;
    s.pending_sequence = 0;
    s.pending_requests = 0;
    s.pending_since_ms = 0;
}

/// Builds one report.
pub fn build_report(
    mut keys: Vec<v1::KeyTelemetry>,
    reporter: &v1::Reporter,
    sequence: u64,
    now_unix_ms: u64,
    dropped: v1::DroppedTelemetry,
    sparse_sketches: bool,
) -> v1::ReportRequest {
    if sparse_sketches {
        for key in &mut keys {
            for sketch in [
                &mut key.ttft_us,
                &mut key.tpot_us,
                &mut key.itl_us,
                &mut key.e2e_us,
            ] {
                *sketch = sketch.take().map(v1::Sketch::compacted);
            }
        }
    }
    v1::ReportRequest {
        reporter: Some(reporter.clone()),
        sequence,
        sent_at_unix_ms: now_unix_ms,
        keys,
        dropped: Some(dropped),
        // Only a forwarding control replica holds reports.
        held_ms: 0,
        connections_closed: false,
    }
}

#[cfg(test)]
mod tests;
