//! The root context of one worker's VM: configuration, the worker's accumulator, and the
//! periodic tick that merges it into shared data and sends reports to the control service.

use crate::http::FlyballRequest;
use crate::shared::{self, ACCUMULATION_KEY, REPORTER_KEY};
use crate::stats::{FilterStats, StatsTable};
use crate::{control_target, now_nanos};
use flyball_filter_core::report::{self, ReporterState, TickPlan};
use flyball_filter_core::shared as shared_core;
use flyball_filter_core::{Accumulator, FilterConfig, KeyId, WorkerDelta};
use flyball_proto::v1;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant, UNIX_EPOCH};

const SERVICE: &str = "flyball.v1.TelemetryService";
const METHOD: &str = "Report";

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
}

pub(crate) struct FlyballRoot {
    worker: Option<Rc<RefCell<Worker>>>,
    epoch: Instant,
    /// Serialized `GrpcService` naming the control cluster; `None` = stats only.
    control_target: Option<String>,
    reporter: v1::Reporter,
    /// The report call this worker has in flight: (token, sequence).
    in_flight_call: Option<(u32, u64)>,
}

// === impl FlyballRoot ===

impl FlyballRoot {
    pub(crate) fn new(_context_id: u32) -> Self {
        FlyballRoot {
            worker: None,
            epoch: Instant::now(),
            control_target: None,
            reporter: v1::Reporter::default(),
            in_flight_call: None,
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
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// Moves this worker's deltas into the process-wide accumulation.
    fn merge_into_shared(worker: &mut Worker) {
        if let Some(delta) = worker.accumulator.take_delta() {
            worker.unmerged.push(delta);
        }
        let max_bytes = worker.config.max_buffered_report_bytes;
        while let Some(delta) = worker.unmerged.first() {
            let merged = shared::update(ACCUMULATION_KEY, |current| {
                Some((
                    shared_core::merge_worker_delta(current, delta, max_bytes),
                    (),
                ))
            });
            match merged {
                Ok(_) => {
                    worker.unmerged.remove(0);
                }
                Err(error) => {
                    FilterStats::count(worker.filter_stats.shared_data_conflicts);
                    log::warn!("flyball: cannot merge worker telemetry yet: {error}");
                    break;
                }
            }
        }
    }

    fn send_report_if_due(&mut self, worker: &Worker) {
        let Some(target) = self.control_target.clone() else {
            return;
        };
        if self.in_flight_call.is_some() {
            return;
        }
        let config = &worker.config;
        let now_ms = Self::now_unix_ms();
        // Claim the right to send: at most one report call per process is in flight.
        let claimed = shared::update(REPORTER_KEY, |current| {
            let state = ReporterState::decode_or_new(current, now_ms);
            let dropped_before = state.dropped_reports;
            let plan = report::plan_tick(
                &state,
                now_ms,
                config.report_interval_ms,
                config.report_timeout_ms,
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
                    self.settle(sequence, false, worker);
                    return;
                }
            },
        };
        let timeout = Duration::from_millis(config.report_timeout_ms);
        match hostcalls::dispatch_grpc_call(
            &target,
            SERVICE,
            METHOD,
            Vec::new(),
            Some(&message),
            timeout,
        ) {
            Ok(token) => self.in_flight_call = Some((token, sequence)),
            Err(status) => {
                log::warn!(
                    "flyball: report call to the control cluster failed to start: {status:?}"
                );
                FilterStats::count(worker.filter_stats.reports_failed);
                self.settle(sequence, false, worker);
            }
        }
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

    fn settle(&mut self, sequence: u64, ok: bool, worker: &Worker) {
        self.in_flight_call = None;
        let now_ms = Self::now_unix_ms();
        let result = shared::update(REPORTER_KEY, |current| {
            let state = ReporterState::decode_or_new(current, now_ms);
            Some((
                report::on_response(&state, sequence, ok).encode_to_vec(),
                (),
            ))
        });
        if let Err(error) = result {
            log::warn!("flyball: cannot record the report outcome: {error}");
        }
        if ok {
            FilterStats::count(worker.filter_stats.reports_sent);
        }
    }
}

impl Context for FlyballRoot {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, _response_size: usize) {
        let Some((token, sequence)) = self.in_flight_call else {
            return;
        };
        if token != token_id {
            return;
        }
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let Ok(worker) = worker.try_borrow() else {
            return;
        };
        let ok = status_code == 0;
        if !ok {
            let message = hostcalls::get_grpc_status().ok().and_then(|(_, m)| m);
            log::info!(
                "flyball: report refused or undelivered (grpc status {status_code}: {}); will resend",
                message.unwrap_or_default()
            );
            FilterStats::count(worker.filter_stats.reports_failed);
        }
        self.settle(sequence, ok, &worker);
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
                        "flyball: invalid plugin configuration: controlCluster = {cluster:?}: must be shorter than 120 bytes"
                    );
                    return false;
                }
            }
        }
        let now_ms = Self::now_unix_ms();
        let initial_state = ReporterState::decode_or_new(None, now_ms).encode_to_vec();
        if let Err(error) = shared::initialize(REPORTER_KEY, &initial_state)
            .and_then(|()| shared::initialize(ACCUMULATION_KEY, &[]))
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
        if let Err(status) =
            hostcalls::set_tick_period(Duration::from_millis(config.report_interval_ms))
        {
            log::error!("flyball: cannot arm the report timer: {status:?}");
            return false;
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
        };
        self.worker = Some(Rc::new(RefCell::new(worker)));
        log::info!(
            "flyball: configured (gateway {}, control {})",
            self.reporter.gateway,
            self.control_target
                .as_ref()
                .map_or("none", |_| "configured")
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
        Self::merge_into_shared(&mut worker);
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
