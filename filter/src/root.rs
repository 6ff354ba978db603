//! The root context of one worker's VM: configuration, the worker's accumulator, and the
//! periodic tick that merges it into shared data and sends reports to the control service.
//!
//! Reports travel as messages on a `ReportStream` the worker keeps open (a message on an open
//! HTTP/2 stream costs the control service about a fifth less CPU than a unary call), each awaiting its
//! acknowledgement; a control service without streams (UNIMPLEMENTED) gets unary `Report` calls
//! from then on. Either way one report per process is in flight, and its fate is recorded in
//! the shared reporter state (`report::on_response`).

use crate::http::FlyballRequest;
use crate::shared::{self, ACCUMULATION_KEY, LABELS_KEY, REPORTER_KEY};
use crate::stats::{FilterStats, StatsTable};
use crate::{control_target, now_nanos};
use flyball_filter_core::config::gateway_from_node_id;
use flyball_filter_core::left::{LeftStream, LeftStreams};
use flyball_filter_core::report::{self, ReporterState, TickPlan};
use flyball_filter_core::shared as shared_core;
use flyball_filter_core::{Accumulator, FilterConfig, KeyId, WorkerDelta};
use flyball_proto::v1;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::cell::RefCell;
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;
use std::time::{Duration, Instant, UNIX_EPOCH};

const SERVICE: &str = "flyball.v1.TelemetryService";
const UNARY_METHOD: &str = "Report";
const STREAM_METHOD: &str = "ReportStream";
const GRPC_UNIMPLEMENTED: u32 = 12;
/// What the HTTP contexts of this VM share with the root: one VM runs one thread, so a
/// `RefCell` is enough, and callbacks never nest.
pub(crate) struct Worker {
    pub config: Rc<FilterConfig>,
    pub epoch: Instant,
    pub accumulator: Accumulator,
    pub stats: StatsTable,
    pub filter_stats: FilterStats,
    /// Reused by every response chunk that must be rewritten: wasm memory never shrinks, so one
    /// buffer that grows to the largest chunk beats an allocation per chunk.
    pub scratch: Vec<u8>,
    /// Deltas that could not be merged into shared data yet (contention); retried next tick.
    unmerged: Vec<WorkerDelta>,
    /// The root context is done (its configuration replaced or removed): it ticks no more, so
    /// a stream still finishing on it merges its own figures (`FlyballRequest::on_log`).
    pub retired: bool,
}

// === impl Worker ===

impl Worker {
    /// Creates the Envoy stats of keys first seen since the last call (off the request path).
    pub(crate) fn define_held_stats(&mut self) {
        let Worker {
            accumulator, stats, ..
        } = self;
        stats.define_held(|index| {
            accumulator.labels(KeyId(u32::try_from(index).unwrap_or(u32::MAX)))
        });
    }

    /// Moves this worker's deltas into the process-wide accumulation. Returns how many deltas
    /// are still held back (lost a compare-and-swap race too often; retried next time).
    pub(crate) fn merge_into_shared(&mut self) -> usize {
        if let Some(delta) = self.accumulator.take_delta() {
            self.unmerged.push(delta);
        }
        let max_bytes = self.config.max_buffered_report_bytes;
        while let Some(delta) = self.unmerged.first() {
            let merged = shared::update(ACCUMULATION_KEY, |current| {
                Some((
                    shared_core::merge_worker_delta(current, delta, max_bytes),
                    (),
                ))
            });
            match merged {
                Ok(_) => {
                    self.unmerged.remove(0);
                }
                Err(error) => {
                    FilterStats::count(self.filter_stats.shared_data_conflicts);
                    log::warn!("flyball: cannot merge worker telemetry yet: {error}");
                    break;
                }
            }
        }
        self.unmerged.len()
    }
}

pub(crate) struct FlyballRoot {
    worker: Option<Rc<RefCell<Worker>>>,
    epoch: Instant,
    /// Serialized `GrpcService` naming the control cluster; `None` = stats only.
    control_target: Option<String>,
    reporter: v1::Reporter,
    /// `sparseSketches`: reports carry sketches in their smaller form.
    sparse_sketches: bool,
    transport: Transport,
    /// The report this worker has in flight.
    in_flight: Option<InFlight>,
    /// Streams given up on and half-closed, oldest first, until they end or are reset.
    left_streams: LeftStreams,
    /// This worker's number in the reporter state (`report::plan_tick`): random, not 0.
    worker_number: u64,
    /// The generation of this root context's configuration (`report::register_configuration`).
    generation: u64,
}

/// How this worker's reports travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// On a `ReportStream`: its token while one is open.
    Stream(Option<u32>),
    /// Unary calls: the control service has no `ReportStream` (an older version).
    Unary,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The call's token, or the stream's the report went on.
    token: u32,
    on_stream: bool,
    sequence: u64,
    sent_at_ms: u64,
}

// === impl FlyballRoot ===

impl FlyballRoot {
    pub(crate) fn new(context_id: u32) -> Self {
        FlyballRoot {
            worker: None,
            epoch: Instant::now(),
            control_target: None,
            reporter: v1::Reporter::default(),
            sparse_sketches: true,
            transport: Transport::Stream(None),
            in_flight: None,
            left_streams: LeftStreams::default(),
            // Context ids repeat across the workers' VMs; std's hasher keys come from WASI's
            // random_get, different in every VM.
            worker_number: RandomState::new().hash_one(context_id).max(1),
            generation: 0,
        }
    }

    fn now_unix_ms() -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn gateway_name(config: &FilterConfig) -> String {
        if let Some(name) = &config.gateway {
            return name.clone();
        }
        hostcalls::get_property(vec!["node", "id"])
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|id| !id.is_empty())
            .map_or_else(
                || "unknown".to_owned(),
                |id| gateway_from_node_id(&id).to_owned(),
            )
    }

    /// This root context is going away: whatever its worker accumulated since its last tick
    /// goes to shared data now (requests that ended since, streams cut when Envoy closed the
    /// configuration's last connections), and the reporting role it held goes back to the
    /// others. Without this, those requests were never reported and their in-flight gauges
    /// stayed up for good.
    fn retire(&mut self) {
        let in_flight = self.in_flight.take();
        if let Some(in_flight) = in_flight {
            let cancelled = if in_flight.on_stream {
                hostcalls::cancel_grpc_stream(in_flight.token)
            } else {
                hostcalls::cancel_grpc_call(in_flight.token)
            };
            if let Err(status) = cancelled {
                log::debug!("flyball: report call already gone: {status:?}");
            }
        }
        if let Some(worker) = self.worker.clone()
            && let Ok(mut worker) = worker.try_borrow_mut()
        {
            worker.retired = true;
            let held = worker.merge_into_shared();
            log::info!("flyball: configuration retired; its figures handed to shared data");
            if held > 0 {
                log::warn!(
                    "flyball: configuration retired with {held} deltas not merged (shared data contended)"
                );
            }
        }
        let now_ms = Self::now_unix_ms();
        let worker_number = self.worker_number;
        let handed_over = shared::update(REPORTER_KEY, |current| {
            let state = ReporterState::decode_or_new(current, now_ms);
            let next = report::on_worker_gone(&state, worker_number, in_flight.map(|f| f.sequence));
            (next != state).then(|| (next.encode_to_vec(), ()))
        });
        if let Err(error) = handed_over {
            log::warn!("flyball: cannot hand reporting over: {error}");
        }
    }

    fn send_report_if_due(&mut self, worker: &Worker) {
        let Some(target) = self.control_target.clone() else {
            return;
        };
        if self.in_flight.is_some() {
            return;
        }
        let config = &worker.config;
        let now_ms = Self::now_unix_ms();
        // Claim the right to send: at most one report call per process is in flight.
        let claimed = shared::update(REPORTER_KEY, |current| {
            let state = ReporterState::decode_or_new(current, now_ms);
            let dropped_before = state.dropped_reports;
            let plan = report::plan_tick_for(
                &state,
                now_ms,
                config.report_interval_ms,
                config.report_timeout_ms,
                self.worker_number,
                self.generation,
            );
            match plan {
                TickPlan::Wait => None,
                TickPlan::Resend {
                    state,
                    report,
                    sequence,
                } => {
                    let dropped = state.dropped_reports > dropped_before;
                    Some((
                        state.encode_to_vec(),
                        (sequence, Some(report), state, dropped),
                    ))
                }
                TickPlan::BuildNew { state, sequence } => {
                    let dropped = state.dropped_reports > dropped_before;
                    Some((state.encode_to_vec(), (sequence, None, state, dropped)))
                }
            }
        });
        let (sequence, resend, state, dropped) = match claimed {
            Ok(Some(claim)) => claim,
            Ok(None) => return,
            Err(error) => {
                log::debug!("flyball: reporter claim failed: {error}");
                return;
            }
        };
        if dropped {
            log::warn!(
                "flyball: dropped a report the control service never acknowledged (retention passed)"
            );
            FilterStats::count(worker.filter_stats.reports_dropped);
        }
        let message = match resend {
            Some(bytes) => bytes,
            None => match self.build_and_store_report(&state, sequence, now_ms) {
                Some(bytes) => bytes,
                None => {
                    self.not_delivered(sequence);
                    return;
                }
            },
        };
        let sent = match self.transport {
            // After a failure this worker's stream, opened before, may be on the same lost
            // connection as the one that failed: a new stream (a new connection, one request a
            // connection) rather than another report timed out on it.
            Transport::Stream(Some(idle)) if state.failures_in_a_row > 0 => {
                self.leave_stream(idle, None);
                self.send_on_stream(&target, None, &message)
            }
            Transport::Stream(open) => self.send_on_stream(&target, open, &message),
            Transport::Unary => hostcalls::dispatch_grpc_call(
                &target,
                SERVICE,
                UNARY_METHOD,
                Vec::new(),
                Some(&message),
                Duration::from_millis(config.report_timeout_ms),
            )
            .map(|token| (token, false)),
        };
        match sent {
            Ok((token, on_stream)) => {
                self.in_flight = Some(InFlight {
                    token,
                    on_stream,
                    sequence,
                    sent_at_ms: now_ms,
                });
            }
            Err(status) => {
                log::warn!("flyball: report to the control cluster failed to start: {status:?}");
                FilterStats::count(worker.filter_stats.reports_failed);
                self.settle(sequence, false, worker);
            }
        }
    }

    /// Sends `message` on this worker's report stream, opening one if none is open. Returns the
    /// stream's token.
    fn send_on_stream(
        &mut self,
        target: &str,
        open: Option<u32>,
        message: &[u8],
    ) -> Result<(u32, bool), proxy_wasm::types::Status> {
        let token = match open {
            Some(token) => token,
            None => {
                let token =
                    hostcalls::open_grpc_stream(target, SERVICE, STREAM_METHOD, Vec::new())?;
                self.transport = Transport::Stream(Some(token));
                token
            }
        };
        if let Err(status) = hostcalls::send_grpc_stream_message(token, Some(message), false) {
            self.abandon_stream(token);
            return Err(status);
        }
        Ok((token, true))
    }

    /// Resets the stream; the next report opens a new one. (Envoy calls nothing back for a
    /// stream the filter cancels.)
    fn abandon_stream(&mut self, token: u32) {
        if let Err(status) = hostcalls::cancel_grpc_stream(token) {
            log::debug!("flyball: report stream already gone: {status:?}");
        }
        if self.transport == Transport::Stream(Some(token)) {
            self.transport = Transport::Stream(None);
        }
    }

    /// Ends this worker's side of the stream, leaving Envoy to finish it when the control service
    /// answers, if it ever does; the next report opens a new one. Not a reset: with one request
    /// a connection (`deploy/istio/destinationrule.yaml`) Envoy closes a connection as soon as
    /// its stream is reset, and the control service reads a gateway's connection ended as the
    /// gateway gone; cut off one way (the reports arrive, the acknowledgements do not) it would
    /// stop holding for a gateway that lives on. Half-closed, the stream keeps its connection
    /// open until the control service's answer arrives or either side gives the connection up,
    /// the control service first (its keepalive), which holds for the gateway. An answer that
    /// still comes for `sequence`, the report given up on, counts: acknowledged or refused late.
    /// A stream left waits for a bounded time, and a bounded number wait
    /// ([`flyball_filter_core::left`]), before being reset.
    fn leave_stream(&mut self, token: u32, sequence: Option<u64>) {
        if self.transport == Transport::Stream(Some(token)) {
            self.transport = Transport::Stream(None);
        }
        if let Err(status) = hostcalls::close_grpc_stream(token) {
            // Gone already: nothing to wait for, nor to reset later.
            log::debug!("flyball: report stream already gone: {status:?}");
            return;
        }
        let now = now_nanos(self.epoch);
        if let Some(oldest) = self.left_streams.leave(token, sequence, now) {
            Self::reset_left_stream(oldest, "too many unanswered");
        }
    }

    /// Resets the streams left half-closed past their deadline ([`flyball_filter_core::left`]).
    fn expire_left_streams(&mut self) {
        let now = now_nanos(self.epoch);
        while let Some(oldest) = self.left_streams.take_expired(now) {
            Self::reset_left_stream(oldest, "unanswered past the deadline");
        }
    }

    fn reset_left_stream(left: LeftStream, why: &str) {
        log::info!("flyball: resetting a report stream left half-closed ({why})");
        if let Err(status) = hostcalls::cancel_grpc_stream(left.token) {
            log::debug!("flyball: report stream already gone: {status:?}");
        }
    }

    /// Envoy ends a unary call at its timeout; a message on a stream has no deadline of its own.
    /// Past the report timeout the stream is presumed dead (a peer that vanished without a FIN,
    /// say) and the report is failed, to be resent on a new stream at the next due time.
    fn expire_streamed_report(&mut self, worker: &Worker) {
        let Some(in_flight) = self.in_flight.filter(|f| f.on_stream) else {
            return;
        };
        let now_ms = Self::now_unix_ms();
        let timeout = worker.config.report_timeout_ms;
        let expired = now_ms >= in_flight.sent_at_ms.saturating_add(timeout)
            // The clock stepped back: do not wait for it to catch up.
            || in_flight.sent_at_ms > now_ms.saturating_add(timeout);
        if !expired {
            return;
        }
        log::info!(
            "flyball: report {} unacknowledged after {timeout} ms; reopening the report stream",
            in_flight.sequence
        );
        self.leave_stream(in_flight.token, Some(in_flight.sequence));
        FilterStats::count(worker.filter_stats.reports_failed);
        self.settle(in_flight.sequence, false, worker);
    }

    /// Takes the accumulated deltas and stores them, as the pending report `sequence`, in the
    /// reporter state this worker has claimed. Returns the encoded report.
    fn build_and_store_report(
        &self,
        claimed: &ReporterState,
        sequence: u64,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        let taken = shared::update(ACCUMULATION_KEY, |current| {
            let (keys, remaining) = shared_core::take_report_keys(current.unwrap_or_default());
            Some((remaining, keys))
        });
        let taken = match taken {
            Ok(Some(taken)) => taken,
            Ok(None) => return None,
            Err(error) => {
                log::warn!("flyball: cannot take accumulated telemetry: {error}");
                return None;
            }
        };
        let requests = taken.requests;
        let report = report::build_report(
            taken.keys,
            &self.reporter,
            sequence,
            now_ms,
            claimed.dropped(taken.dropped_requests),
            self.sparse_sketches,
        )
        .encode_to_vec();
        let stored = shared::update(REPORTER_KEY, |current| {
            let state = ReporterState::decode_or_new(current, now_ms);
            let next = report::record_pending(&state, sequence, report.clone(), requests, now_ms);
            Some((next.encode_to_vec(), ()))
        });
        match stored {
            Ok(_) => Some(report),
            Err(error) => {
                // Unreachable in practice (the claim keeps other workers off this key); the
                // report still goes out now, and a failure then is counted as a gap upstream.
                log::warn!("flyball: cannot store the pending report: {error}");
                Some(report)
            }
        }
    }

    /// Applies a report's outcome to the reporter state in shared data (CAS loop), writing it
    /// when it changes; returns what `apply` returns beside the state (its default when the
    /// state could not be written, which is logged).
    fn record_outcome<T: Default>(apply: impl Fn(&ReporterState) -> (ReporterState, T)) -> T {
        let now_ms = Self::now_unix_ms();
        let result = shared::update(REPORTER_KEY, |current| {
            let state = ReporterState::decode_or_new(current, now_ms);
            let (next, result) = apply(&state);
            (next != state).then(|| (next.encode_to_vec(), result))
        });
        match result {
            Ok(result) => result.unwrap_or_default(),
            Err(error) => {
                log::warn!("flyball: cannot record the report outcome: {error}");
                T::default()
            }
        }
    }

    fn settle(&mut self, sequence: u64, ok: bool, worker: &Worker) {
        self.in_flight = None;
        Self::record_outcome(|state| (report::on_response(state, sequence, ok), ()));
        if ok {
            FilterStats::count(worker.filter_stats.reports_sent);
        }
    }

    /// Report `sequence` did not reach the control service, through no failure of its
    /// (`report::on_not_delivered`): it goes again at the next due time, nothing put back.
    fn not_delivered(&mut self, sequence: u64) {
        self.in_flight = None;
        Self::record_outcome(|state| (report::on_not_delivered(state, sequence), ()));
    }

    /// The control service answered report `sequence` on a stream this worker had left (past
    /// `reportTimeoutMs`): acknowledged it, or `refused` it (`report::on_late_answer`).
    fn answered_late(sequence: u64, refused: bool, worker: Option<&Worker>) {
        let dropped =
            Self::record_outcome(|state| report::on_late_answer(state, sequence, refused));
        let what = if refused { "refused" } else { "acknowledged" };
        log::info!("flyball: report {sequence} {what} after it was given up on");
        if dropped {
            log::warn!("flyball: the control service refused report {sequence}; dropped");
            if let Some(worker) = worker {
                FilterStats::count(worker.filter_stats.reports_dropped);
            }
        }
    }

    /// The control service refused report `sequence` as invalid: it is dropped and counted
    /// rather than resent, since the same bytes would be refused again.
    fn refuse(&mut self, sequence: u64, worker: &Worker) {
        self.in_flight = None;
        let dropped = Self::record_outcome(|state| report::on_refusal(state, sequence));
        let message = hostcalls::get_grpc_status().ok().and_then(|(_, m)| m);
        log::warn!(
            "flyball: the control service refused report {sequence} ({}); dropped, not resent",
            message.unwrap_or_default()
        );
        if dropped {
            FilterStats::count(worker.filter_stats.reports_dropped);
        }
    }
}

impl FlyballRoot {
    /// The report in flight on `token` (a unary call, or a stream), with the worker to settle
    /// it with.
    fn in_flight_on(&self, token: u32, on_stream: bool) -> Option<(InFlight, Rc<RefCell<Worker>>)> {
        let in_flight = self
            .in_flight
            .filter(|f| f.token == token && f.on_stream == on_stream)?;
        Some((in_flight, self.worker.clone()?))
    }

    fn count_failure(worker: &Worker, what: &str, status_code: u32) {
        let message = hostcalls::get_grpc_status().ok().and_then(|(_, m)| m);
        log::info!(
            "flyball: {what} (grpc status {status_code}: {}); will resend",
            message.unwrap_or_default()
        );
        FilterStats::count(worker.filter_stats.reports_failed);
    }
}

impl Context for FlyballRoot {
    /// Envoy is done with this root context: its plugin configuration was replaced (a
    /// `WasmPlugin` edit) or removed, and the last stream on it has ended.
    fn on_done(&mut self) -> bool {
        self.retire();
        true
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, _response_size: usize) {
        let Some((in_flight, worker)) = self.in_flight_on(token_id, false) else {
            return;
        };
        let Ok(worker) = worker.try_borrow() else {
            return;
        };
        if status_code == report::GRPC_INVALID_ARGUMENT {
            self.refuse(in_flight.sequence, &worker);
            return;
        }
        let ok = status_code == 0;
        if !ok {
            Self::count_failure(&worker, "report undelivered", status_code);
        }
        self.settle(in_flight.sequence, ok, &worker);
    }

    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        let ack = || {
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, message_size)
                .ok()
                .flatten()
                .and_then(|bytes| v1::ReportResponse::decode(bytes.as_slice()).ok())
        };
        let Some((in_flight, worker)) = self.in_flight_on(token_id, true) else {
            let left = self.left_streams.get(token_id);
            if let Some(sequence) = left.and_then(|left| left.sequence)
                && ack().is_some_and(|ack| ack.acknowledged_sequence == sequence)
            {
                Self::answered_late(sequence, false, None);
            }
            return;
        };
        let Ok(worker) = worker.try_borrow() else {
            return;
        };
        match ack() {
            Some(ack) if ack.acknowledged_sequence == in_flight.sequence => {
                self.settle(in_flight.sequence, true, &worker);
            }
            // Acks come in order, one per report: anything else is a confused peer. The
            // report stays in flight until its timeout, then goes again on a new stream.
            other => log::warn!(
                "flyball: report stream answered {other:?} to report {}",
                in_flight.sequence
            ),
        }
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        // Envoy lets go of an ended stream: its token must not be closed or reset after this.
        let left = self.left_streams.ended(token_id);
        if let Some(sequence) = left.and_then(|left| left.sequence)
            && status_code == report::GRPC_INVALID_ARGUMENT
        {
            // Refused after it was given up on: resent, it would be refused again.
            let worker = self.worker.clone();
            let worker = worker.as_ref().and_then(|w| w.try_borrow().ok());
            Self::answered_late(sequence, true, worker.as_deref());
        }
        if self.transport != Transport::Stream(Some(token_id)) {
            return;
        }
        let unimplemented = status_code == GRPC_UNIMPLEMENTED;
        self.transport = if unimplemented {
            log::info!("flyball: the control service has no ReportStream; sending unary reports");
            Transport::Unary
        } else {
            Transport::Stream(None)
        };
        let Some((in_flight, worker)) = self.in_flight_on(token_id, true) else {
            return;
        };
        if unimplemented {
            // An answer, not a failure: the report goes again at its due time, as a unary call.
            self.not_delivered(in_flight.sequence);
            return;
        }
        let Ok(worker) = worker.try_borrow() else {
            // Not left on the ended stream: the reporter state resends the report when its
            // time is up.
            self.in_flight = None;
            return;
        };
        if status_code == report::GRPC_INVALID_ARGUMENT {
            self.refuse(in_flight.sequence, &worker);
            return;
        }
        Self::count_failure(&worker, "report stream ended", status_code);
        self.settle(in_flight.sequence, false, &worker);
    }
}

impl RootContext for FlyballRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let raw = match hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        ) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log::error!("flyball: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        let config = match FilterConfig::from_json(&raw) {
            Ok(config) => config,
            Err(error) => {
                // Returning false makes Envoy reject the configuration at load (or NACK it).
                log::error!("flyball: invalid plugin configuration: {error}");
                return false;
            }
        };
        if let Some(cluster) = &config.control_cluster {
            match control_target::encode(cluster, config.control_authority.as_deref()) {
                Some(target) => self.control_target = Some(target),
                None => {
                    log::error!(
                        "flyball: invalid plugin configuration: controlCluster = {cluster:?}: with controlAuthority, too long to hand Envoy as a GrpcService"
                    );
                    return false;
                }
            }
        }
        let now_ms = Self::now_unix_ms();
        let initial_state = ReporterState::decode_or_new(None, now_ms).encode_to_vec();
        if let Err(error) = shared::initialize(REPORTER_KEY, &initial_state)
            .and_then(|()| shared::initialize(ACCUMULATION_KEY, &[]))
            .and_then(|()| shared::initialize(LABELS_KEY, &[]))
        {
            log::error!("flyball: shared data unavailable: {error}");
            return false;
        }
        let process_start_ms = hostcalls::get_shared_data(REPORTER_KEY)
            .ok()
            .and_then(|(bytes, _)| bytes)
            .map(|bytes| ReporterState::decode_or_new(Some(&bytes), now_ms).process_start_ms)
            .unwrap_or(now_ms);
        self.reporter = v1::Reporter {
            gateway: Self::gateway_name(&config),
            process_start_unix_ms: process_start_ms,
            filter_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        self.sparse_sketches = config.sparse_sketches;
        if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(
            report::tick_period_ms(config.report_interval_ms),
        )) {
            log::error!("flyball: cannot arm the report timer: {status:?}");
            return false;
        }
        // Last: only a configuration Envoy takes becomes the newest generation.
        let config_hash = report::config_hash(&raw);
        let registered = shared::update(REPORTER_KEY, |current| {
            let state = ReporterState::decode_or_new(current, now_ms);
            let (next, generation) = report::register_configuration(&state, config_hash, now_ms);
            Some((next.encode_to_vec(), generation))
        });
        match registered {
            Ok(Some(generation)) => self.generation = generation,
            Ok(None) => {}
            Err(error) => {
                // Generation 0 only gives way to others: reporting goes on.
                log::warn!("flyball: cannot register the configuration: {error}");
            }
        }
        for caveat in config.caveats() {
            log::warn!("flyball: {caveat}");
        }
        let config = Rc::new(config);
        let worker = Worker {
            accumulator: Accumulator::new(&config),
            config,
            epoch: self.epoch,
            stats: StatsTable::default(),
            filter_stats: FilterStats::define(),
            scratch: Vec::new(),
            unmerged: Vec::new(),
            retired: false,
        };
        self.worker = Some(Rc::new(RefCell::new(worker)));
        log::info!(
            "flyball: configured (gateway {}, control {}, generation {})",
            self.reporter.gateway,
            self.control_target
                .as_ref()
                .map_or("none", |_| "configured"),
            self.generation
        );
        true
    }

    fn on_tick(&mut self) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let Ok(mut worker) = worker.try_borrow_mut() else {
            return;
        };
        worker.define_held_stats();
        worker.merge_into_shared();
        self.expire_left_streams();
        self.expire_streamed_report(&worker);
        self.send_report_if_due(&worker);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        let started_at = now_nanos(self.epoch);
        Some(Box::new(FlyballRequest::new(worker, started_at)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
