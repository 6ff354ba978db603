//! Ingest: gateways' `flyball.v1.TelemetryService` reports (unary `Report` calls, or messages on
//! a `ReportStream`) merged into the windows.
//!
//! report -> [`parse`] (validate, decode sketches; no lock) -> `Reporters::admit` (identity,
//! duplicates, gaps, restarts) -> [`Windows::record`] per key and pool -> pools marked dirty.
//!
//! A reporter is one gateway process: (gateway, process_start_unix_ms). All that is kept per
//! reporter is its identity, sequence, timing and latest in-flight gauge per key, so memory grows
//! with the number of gateways only by that much; their deltas go straight into the shared
//! windows. A reporter silent for longer than `max(stale_after, stale_intervals x its interval)`
//! is stale: its gauges leave the in-flight sums until it reports again, and the pools it fed
//! hold scale-down, since its load may be going unseen, until it is forgotten. Unless it is gone
//! rather than cut off: a reporter whose connections to this service all closed while it was
//! live (Envoy closes its connections when it exits; a partition closes nothing, and a stream
//! given up or refused leaves its connection open) is `departed` when it goes quiet, and nothing
//! holds for it (see [`crate::connection`]). Ingest never trusts a
//! remote clock's time: the time of arrival is what counts. Only the difference between two
//! consecutive reports' `sent_at_unix_ms` is used, to tell how long a backlog built up after a
//! partition, and only within the arrival times that bound it (the stable window, for a reporter
//! first seen here).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use flyball_proto::grpc::telemetry_service_server::{TelemetryService, TelemetryServiceServer};
use flyball_proto::{packed, v1};
use flyball_sketch::{SketchError, SparseSketch};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::connection::{Carried, Closed, ConnectionInfo};
use crate::forward::{FORWARDED_BY, Forwarder};
use crate::replication::Replication;
use crate::window::{
    Delta, InFlight, KeyId, KeyView, PoolId, ReportedLatencies, Selector, View, WindowConfig,
    Windows,
};
use flyball_proto::codec::ReceivedReport;

/// Limits and timings of ingest.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestConfig {
    /// A reporter is stale after this much silence, or `stale_intervals` of its own report
    /// interval if that is longer (so a slow reporter does not flap).
    pub stale_after: Duration,
    pub stale_intervals: u32,
    /// A reporter silent this long is forgotten altogether; a later report starts it afresh.
    pub forget_after: Duration,
    /// Reports larger than this, encoded, are refused before they are decoded.
    pub max_report_bytes: usize,
    pub max_keys_per_report: usize,
    /// Distinct (backend, model) keys tracked; telemetry for further keys is dropped and counted.
    pub max_keys: usize,
    /// Gateway processes remembered; reports of further ones are refused and counted.
    pub max_reporters: usize,
    /// A reporter whose own connections all closed while it was live is gone, not missing, when
    /// it goes quiet (`--hold-for-closed-gateways` turns this off).
    pub departed_on_close: bool,
}

/// Why a report was refused. The reasons double as metric labels ([`Refusal::reason`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("reporter.gateway is empty: every report names its gateway")]
    NoGateway,
    #[error("sequence = 0: sequences start at 1")]
    ZeroSequence,
    #[error("keys: {count} entries, at most {max} per report")]
    TooManyKeys { count: usize, max: usize },
    #[error("keys[{index}].{field} is empty")]
    EmptyKeyName { index: usize, field: &'static str },
    /// Gateway processes are remembered until `--forget-after`: their number bounds that memory.
    /// The pools the refused report would feed hold scale-down, as for keys over `max_keys`.
    #[error(
        "reporter: {max} gateway processes are known already (--max-reporters); a new one is \
         refused until some are forgotten"
    )]
    TooManyReporters { max: usize },
    /// Names are kept (a gateway's for `--forget-after`, a key's while tracked): their length
    /// bounds that memory.
    #[error("{field}: {bytes} bytes, at most {MAX_NAME_BYTES}")]
    NameTooLong { field: String, bytes: usize },
    #[error("keys[{index}].{field}: {source}")]
    BadSketch {
        index: usize,
        field: &'static str,
        #[source]
        source: SketchError,
    },
    /// A figure no gateway can have: merged, it would saturate the sums and scale the pool to
    /// its maximum on one bad (or forged) report.
    #[error("keys[{index}].{field} = {value}: above {max}, not a figure one gateway reports")]
    Implausible {
        index: usize,
        field: &'static str,
        value: u64,
        max: u64,
    },
}

/// A gateway, backend or model name, at most (a pod name is at most 253; Istio's node ids add
/// an address and a namespace); the filter keeps to it.
pub use flyball_proto::MAX_NAME_BYTES;

/// Requests in flight at one gateway for one key, at most.
pub const MAX_IN_FLIGHT: u64 = 1_000_000;

/// A count (requests or tokens) in one report of one key, at most: 10^12.
pub const MAX_COUNT: u64 = 1_000_000_000_000;

/// How a reporter's report was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New data, merged.
    Fresh {
        /// Sequence numbers skipped since the reporter's previous report.
        missing: u64,
        /// The first report of a new process of a gateway already known.
        restart: bool,
        /// The reporter had gone stale and is back.
        revived: bool,
    },
    /// Older than the reporter's latest and not merged before, within [`LATE_WITHIN`]
    /// sequences: merged, its gauges ignored (the latest report's are newer). A forwarded report
    /// overtaken by a newer one the same gateway sent directly (its connection moved to this
    /// replica meanwhile). The gap that newer one opened counted it as missing, unless that
    /// newer one was the first of its reporter seen here (nothing is known before a first).
    Late,
    /// A resend (or older): acknowledged and ignored.
    Duplicate,
    /// Another replica's word that the reporter's connections closed (`connections_closed`).
    ConnectionsClosed,
}

/// How far behind its reporter's latest sequence a report not merged before is still taken
/// ([`Admission::Late`]): 6.4 s of reports at 100 ms, 64 s at 1 s. A follower's queue holds
/// a report that long only while no leader takes it, and a gateway's connection leaves a
/// follower that stays up only rarely; one word per reporter keeps memory flat. Further behind,
/// a report is taken for a resend.
pub const LATE_WITHIN: u64 = 64;

/// Reporter identities and their latest gauges. Pure: `now` is a parameter.
#[derive(Debug)]
pub struct Reporters {
    stale_after: Duration,
    stale_intervals: u32,
    forget_after: Duration,
    gateways: HashMap<Box<str>, Gateway>,
    live: usize,
    stale: usize,
    /// Reporters that went quiet after their connections closed.
    departed: Counter,
    /// Processes forgotten after `forget_after` of silence.
    forgotten: Counter,
    /// The number the next process gets (see [`Process::number`]).
    next_number: u64,
    /// Processes remembered, whatever their state (bounded by `max_reporters`).
    processes: usize,
    /// No process goes stale or is forgotten before this (`None`: none will by the clock), so
    /// a sweep before it has nothing to mark. At 10,000 gateways marking visits 10,000 entries
    /// spread over the heap, every 300 ms, while a gateway reporting every second is not due
    /// for 2 s or more. (The count of quiet reporters per pool still walks them every sweep.)
    next_due: Option<Instant>,
}

#[derive(Debug)]
struct Gateway {
    newest_start_ms: u64,
    /// Usually one; two while an Envoy hot restart drains the old process.
    processes: Vec<Process>,
}

#[derive(Debug)]
struct Process {
    /// Tells it from a later entry for the same reporter, made after this one was forgotten: a
    /// connection that carried this one and closes later must not count against that one.
    number: u64,
    start_ms: u64,
    last_sequence: u64,
    /// Bit i: sequence `last_sequence - 1 - i` was merged (see [`Admission::Late`]).
    merged_before: u64,
    last_seen: Instant,
    /// The gap between its last two reports, a silence counting only up to the stale limit.
    interval: Option<Duration>,
    /// What its latest report's deltas accumulated over, as far as can be told (see
    /// [`Reporters::admit`]).
    backlog: Option<Duration>,
    /// When the report before its latest one arrived.
    seen_before: Option<Instant>,
    /// `sent_at_unix_ms` of its latest report, by its own clock; 0 when unknown.
    last_sent_ms: u64,
    stale: bool,
    /// Connections to this service that carried its reports and are still open.
    open_connections: u32,
    /// Its connections all closed while it was live (here, or at the replica that forwarded its
    /// reports): once quiet it is gone (Envoy exited), not cut off, so it is neither live nor
    /// stale. Nothing else explains a silence: not even a newer process of its gateway, since
    /// gateways may share a name (a Deployment's Envoys with one static node id) or restart with
    /// a clock behind, and a cut-off one looks like one that finished draining.
    connections_closed: bool,
    /// Its latest sequence when they closed. The report after it may still be on its way (the
    /// close can overtake it); a later one means it is back.
    closed_after: u64,
    /// They closed here, not at a replica that forwarded its reports: a report another replica
    /// forwards after that, even a resend, was sent by a gateway still running.
    closed_here: bool,
    dropped_reports: u64,
    gauges: Vec<(KeyId, InFlight)>,
    /// The keys it reported on, each with when it last did (only the last stable window's).
    fed: Vec<(KeyId, Instant)>,
    /// The pools it reported on through keys that found no room (over `--max-keys`), each with
    /// when it last did: it fed them too, and its silence leaves them as short.
    fed_unadmitted: Vec<(PoolId, Instant)>,
}

/// Live and stale reporter counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReporterCounts {
    pub live: usize,
    pub stale: usize,
}

/// A report that passed validation, its sketches decoded.
#[derive(Debug)]
pub struct ParsedReport {
    gateway: String,
    process_start_unix_ms: u64,
    sequence: u64,
    sent_at_unix_ms: u64,
    /// How long a forwarding replica held it (a resend after a hand-over).
    held: Duration,
    /// Another replica's word that this reporter's connections closed; no keys.
    connections_closed: bool,
    /// Another replica took it from the gateway and passed it on.
    forwarded: bool,
    dropped_reports: u64,
    keys: Vec<ParsedKey>,
}

#[derive(Debug)]
struct ParsedKey {
    backend: String,
    model: String,
    delta: Delta,
    in_flight: InFlight,
}

/// What merging one report did.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub admission: Admission,
    /// Pools whose windows or in-flight sums changed, sorted and unique.
    pub pools: Vec<PoolId>,
    /// Keys dropped because `max_keys` keys are tracked already.
    pub keys_over_limit: u64,
    /// Reports the reporter says it gave up on since its previous report.
    pub newly_dropped_reports: u64,
}

/// Ingest counters, exported on /metrics.
#[derive(Debug, Clone, Default)]
pub struct IngestCounters {
    pub reports: Counter,
    pub duplicates: Counter,
    pub gaps: Counter,
    pub missing_reports: Counter,
    /// Reports merged after a newer one of their reporter (counted in `missing_reports` first,
    /// unless that newer one was the first of its reporter seen here).
    pub late_reports: Counter,
    pub restarts: Counter,
    pub revived: Counter,
    /// Reporters that went quiet after their connections closed: gone, not held for.
    pub departed: Counter,
    /// Gateway processes forgotten after `--forget-after` of silence. Connections read it to
    /// notice that a process they carried may be a new entry now (see `ConnectionReporters`).
    pub forgotten: Counter,
    pub reporter_dropped_reports: Counter,
    pub keys_over_limit: Counter,
    pub refused: Family<RefusedLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

/// The state every ingest call and every reader shares.
#[derive(Debug)]
pub struct Telemetry {
    config: IngestConfig,
    state: Mutex<IngestState>,
    counters: IngestCounters,
    /// Indexed by [`PoolId`]; grows as pools are added, never shrinks (ids are not reused).
    dirty: RwLock<Vec<Arc<Notify>>>,
}

#[derive(Debug)]
struct IngestState {
    windows: Windows,
    reporters: Reporters,
    last_sweep: Option<Instant>,
    /// [`IngestConfig::sweep_every`]
    sweep_every: Duration,
    /// When the newest report (of any reporter, duplicates aside) arrived.
    last_report: Option<Instant>,
    /// Until when the latest reports keep their reporters live, each by its own stale limit
    /// (`--stale-after`, or that many of its report intervals if longer).
    fresh_until: Option<Instant>,
    /// Per pool, the reporters that fed it in the stable window before they went quiet and
    /// are not yet forgotten (recounted at every sweep); pools absent have none.
    silent_feeders: HashMap<PoolId, u32>,
    /// Per pool, when a key that would feed it was last dropped for want of room under
    /// `max_keys`; pools absent never had one dropped.
    keys_dropped_at: HashMap<PoolId, Instant>,
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct IngestService {
    telemetry: Arc<Telemetry>,
    /// Set on replicas that may follow: reports they merge go on to the leader.
    forwarder: Option<Arc<Forwarder>>,
    /// Set on replicas that may lead: reports they merge go on to their followers.
    replication: Option<Arc<Replication>>,
    /// Turns true when the service shuts down: open report streams end (gateways reconnect,
    /// to another replica) instead of holding the graceful shutdown open.
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// The refusal reason of reports that reach a replica that is shutting down.
pub const STOPPING: &str = "stopping";

/// The refusal reason of reports over `max_report_bytes`, which tonic refuses before ingest
/// sees them (the service rewrites and counts those refusals on their way out).
pub const OVERSIZE: &str = "oversize";

/// The refusal reason of bytes that do not decode as a report (also refused by tonic first).
pub const MALFORMED: &str = "malformed";

/// The refusal reason of a word that a reporter's connections closed sent by anyone but a
/// forwarding replica.
pub const NOT_FORWARDED: &str = "connections_closed_not_forwarded";

/// The refusal reason of a report another replica forwarded to this one while it does not
/// lead (answered `UNAVAILABLE`: the forwarder keeps it for the next leader).
pub const NOT_LEADER: &str = "not_leader";

// === impl IngestConfig ===

impl IngestConfig {
    /// How often silent reporters are looked for. A sweep that finds a reporter due scans every
    /// reporter (10,000 gateways, 10,000 entries), so it runs a tenth of `stale_after` apart,
    /// not on every read: staleness is then seen at most 10% late.
    pub fn sweep_every(&self) -> Duration {
        (self.stale_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            stale_after: Duration::from_secs(3),
            stale_intervals: 3,
            forget_after: Duration::from_secs(600),
            max_report_bytes: 1024 * 1024,
            max_keys_per_report: flyball_proto::DEFAULT_MAX_KEYS_PER_REPORT,
            max_keys: 10_000,
            max_reporters: 100_000,
            departed_on_close: true,
        }
    }
}

// === impl Refusal ===

impl Refusal {
    /// A stable snake_case name, the `reason` label of `flyball_ingest_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoGateway => "no_gateway",
            Refusal::ZeroSequence => "zero_sequence",
            Refusal::TooManyKeys { .. } => "too_many_keys",
            Refusal::EmptyKeyName { .. } => "empty_key",
            Refusal::NameTooLong { .. } => "name_too_long",
            Refusal::TooManyReporters { .. } => "too_many_reporters",
            Refusal::BadSketch { .. } => "bad_sketch",
            Refusal::Implausible { .. } => "implausible",
        }
    }

    /// Refused for want of room (`--max-reporters`, `--max-keys-per-report`), not for what it
    /// says: the load it carries goes unseen, and the pools it would feed hold. Every replica is
    /// told, so that the leader, and whoever leads next, holds too.
    pub fn for_want_of_room(&self) -> bool {
        matches!(
            self,
            Refusal::TooManyReporters { .. } | Refusal::TooManyKeys { .. }
        )
    }

    pub fn to_status(&self) -> tonic::Status {
        match self {
            Refusal::TooManyKeys { .. } | Refusal::TooManyReporters { .. } => {
                tonic::Status::resource_exhausted(self.to_string())
            }
            _ => tonic::Status::invalid_argument(self.to_string()),
        }
    }
}

// === parse ===

/// Validates a report and decodes its sketches; nothing shared is touched.
pub fn parse(
    report: packed::ReportRequest,
    config: &IngestConfig,
) -> Result<ParsedReport, Refusal> {
    let reporter = report.reporter.unwrap_or_default();
    if reporter.gateway.is_empty() {
        return Err(Refusal::NoGateway);
    }
    if reporter.gateway.len() > MAX_NAME_BYTES {
        return Err(Refusal::NameTooLong {
            field: "reporter.gateway".to_string(),
            bytes: reporter.gateway.len(),
        });
    }
    if report.sequence == 0 {
        return Err(Refusal::ZeroSequence);
    }
    if report.connections_closed {
        return Ok(ParsedReport {
            gateway: reporter.gateway,
            process_start_unix_ms: reporter.process_start_unix_ms,
            sequence: report.sequence,
            sent_at_unix_ms: report.sent_at_unix_ms,
            held: Duration::ZERO,
            forwarded: false,
            connections_closed: true,
            dropped_reports: 0,
            keys: Vec::new(),
        });
    }
    if report.keys.len() > config.max_keys_per_report {
        return Err(Refusal::TooManyKeys {
            count: report.keys.len(),
            max: config.max_keys_per_report,
        });
    }
    let mut keys = Vec::with_capacity(report.keys.len());
    for (index, key) in report.keys.into_iter().enumerate() {
        if key.backend.is_empty() {
            return Err(Refusal::EmptyKeyName {
                index,
                field: "backend",
            });
        }
        if key.model.is_empty() {
            return Err(Refusal::EmptyKeyName {
                index,
                field: "model",
            });
        }
        for (field, name) in [("backend", &key.backend), ("model", &key.model)] {
            if name.len() > MAX_NAME_BYTES {
                return Err(Refusal::NameTooLong {
                    field: format!("keys[{index}].{field}"),
                    bytes: name.len(),
                });
            }
        }
        let sketch = |field: &'static str, wire: &Option<packed::PackedSketch>| match wire {
            None => Ok(SparseSketch::default()),
            Some(wire) => SparseSketch::try_from(wire).map_err(|source| Refusal::BadSketch {
                index,
                field,
                source,
            }),
        };
        let latency = ReportedLatencies {
            ttft_us: sketch("ttft_us", &key.ttft_us)?,
            tpot_us: sketch("tpot_us", &key.tpot_us)?,
            itl_us: sketch("itl_us", &key.itl_us)?,
            e2e_us: sketch("e2e_us", &key.e2e_us)?,
        };
        let in_flight = key.in_flight.unwrap_or_default();
        let requests = key.requests.unwrap_or_default();
        let tokens = key.tokens.unwrap_or_default();
        // A sketch's count sets its window's quantiles as surely as `requests` sets the rate.
        let figures = [
            (
                "in_flight.waiting_first_token",
                in_flight.waiting_first_token,
                MAX_IN_FLIGHT,
            ),
            ("in_flight.decoding", in_flight.decoding, MAX_IN_FLIGHT),
            ("requests", requests.total(), MAX_COUNT),
            ("tokens.input", tokens.input, MAX_COUNT),
            ("tokens.output", tokens.output, MAX_COUNT),
            ("ttft_us.count", latency.ttft_us.count(), MAX_COUNT),
            ("tpot_us.count", latency.tpot_us.count(), MAX_COUNT),
            ("itl_us.count", latency.itl_us.count(), MAX_COUNT),
            ("e2e_us.count", latency.e2e_us.count(), MAX_COUNT),
        ];
        if let Some((field, value, max)) = figures.into_iter().find(|(_, v, max)| v > max) {
            return Err(Refusal::Implausible {
                index,
                field,
                value,
                max,
            });
        }
        keys.push(ParsedKey {
            backend: key.backend,
            model: key.model,
            delta: Delta {
                requests,
                tokens,
                latency,
            },
            in_flight: InFlight {
                waiting_first_token: in_flight.waiting_first_token,
                decoding: in_flight.decoding,
            },
        });
    }
    Ok(ParsedReport {
        gateway: reporter.gateway,
        process_start_unix_ms: reporter.process_start_unix_ms,
        sequence: report.sequence,
        sent_at_unix_ms: report.sent_at_unix_ms,
        held: Duration::from_millis(report.held_ms),
        forwarded: false,
        connections_closed: false,
        dropped_reports: report.dropped.unwrap_or_default().reports,
        keys,
    })
}

// === impl ParsedReport ===

impl ParsedReport {
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
}

// === impl Reporters ===

impl Reporters {
    /// `departed` counts reporters that went quiet after their connections closed, `forgotten`
    /// those forgotten after `forget_after` of silence.
    pub fn new(config: &IngestConfig, departed: Counter, forgotten: Counter) -> Self {
        Reporters {
            stale_after: config.stale_after,
            stale_intervals: config.stale_intervals,
            forget_after: config.forget_after,
            gateways: HashMap::new(),
            live: 0,
            stale: 0,
            departed,
            forgotten,
            next_number: 0,
            processes: 0,
            next_due: None,
        }
    }

    /// Whether a report of this process would add one more to remember, beyond `max` known.
    fn would_exceed(&self, gateway: &str, start_ms: u64, max: usize) -> bool {
        let known = self
            .gateways
            .get(gateway)
            .is_some_and(|g| g.processes.iter().any(|p| p.start_ms == start_ms));
        !known && self.processes >= max
    }

    fn process_mut(&mut self, gateway: &str, start_ms: u64) -> Option<&mut Process> {
        self.gateways
            .get_mut(gateway)?
            .processes
            .iter_mut()
            .find(|p| p.start_ms == start_ms)
    }

    /// A connection carried a report of this process for the first time: the process's
    /// number, for [`Reporters::connection_closed`]. None when the process is unknown (its
    /// report was refused).
    fn connection_opened(&mut self, gateway: &str, start_ms: u64) -> Option<u64> {
        let process = self.process_mut(gateway, start_ms)?;
        process.open_connections = process.open_connections.saturating_add(1);
        let number = process.number;
        if std::mem::take(&mut process.connections_closed) && process.stale {
            // Counted as gone, it is back (perhaps only resending): missing again.
            self.stale += 1;
        }
        Some(number)
    }

    /// A connection that carried this process's reports closed. When it was the last one open
    /// and the process is still live, returns the sequence of its latest report: if it now goes
    /// quiet, it is gone. A connection that closes once the process is stale is a dead one
    /// being reaped (keepalive), which says nothing of whether the gateway is gone.
    /// A connection shared with other gateways, or lost (`own` false), only stops counting as
    /// open: its close says nothing of any one of them.
    fn connection_closed(
        &mut self,
        gateway: &str,
        start_ms: u64,
        number: u64,
        own: bool,
        now: Instant,
    ) -> Option<u64> {
        let (stale_after, intervals, forget_after) =
            (self.stale_after, self.stale_intervals, self.forget_after);
        let process = self
            .process_mut(gateway, start_ms)
            .filter(|p| p.number == number)?;
        process.open_connections = process.open_connections.saturating_sub(1);
        // By the clock, not only by the flag the sweep sets (up to a sweep late).
        let quiet = process.stale
            || now.saturating_duration_since(process.last_seen)
                > stale_limit(stale_after, intervals, forget_after, process.interval);
        if process.open_connections > 0 || quiet || !own {
            return None;
        }
        process.connections_closed = true;
        process.closed_after = process.last_sequence;
        process.closed_here = true;
        Some(process.last_sequence)
    }

    /// Another replica forwarded a report of this process (perhaps a resend): if its own
    /// connections here closed, it went on reporting elsewhere since, so it is not gone.
    fn heard_elsewhere(&mut self, gateway: &str, start_ms: u64) {
        let Some(process) = self.process_mut(gateway, start_ms) else {
            return;
        };
        if !(process.connections_closed && process.closed_here) {
            return;
        }
        process.connections_closed = false;
        if process.stale {
            // Counted as gone already: missing again until it reports.
            self.stale += 1;
        }
    }

    /// The replica that forwarded this process's reports saw its connections close after
    /// report `sequence`.
    fn mark_connections_closed(&mut self, gateway: &str, start_ms: u64, sequence: u64) {
        let Some(process) = self.process_mut(gateway, start_ms) else {
            return;
        };
        if process.open_connections > 0
            || process.connections_closed
            || process.last_sequence > sequence.saturating_add(1)
        {
            // It has a connection open here, or has reported since (beyond the one report the
            // word may have overtaken).
            return;
        }
        process.connections_closed = true;
        process.closed_after = sequence;
        process.closed_here = false;
        if process.stale {
            // Quiet already (the word came late): gone, no longer missing.
            self.stale -= 1;
            self.departed.inc();
        }
    }

    pub fn counts(&self) -> ReporterCounts {
        ReporterCounts {
            live: self.live,
            stale: self.stale,
        }
    }

    /// Decides whether a report is new data, and if so notes its arrival. The returned process
    /// is the reporter's, for its gauges to be replaced; on a restart the gauges of the gateway's
    /// older processes are moved to `retired`.
    fn admit(
        &mut self,
        gateway: &str,
        start_ms: u64,
        sequence: u64,
        sent_at_ms: u64,
        now: Instant,
        retired: &mut Vec<(KeyId, InFlight)>,
    ) -> (Admission, Option<&mut Process>) {
        if !self.gateways.contains_key(gateway) {
            self.gateways.insert(
                gateway.into(),
                Gateway {
                    newest_start_ms: start_ms,
                    processes: Vec::with_capacity(1),
                },
            );
        }
        let Some(entry) = self.gateways.get_mut(gateway) else {
            return (Admission::Duplicate, None);
        };
        let restart = !entry.processes.is_empty() && start_ms > entry.newest_start_ms;
        entry.newest_start_ms = entry.newest_start_ms.max(start_ms);
        if restart {
            // The old processes crashed or are draining after a hot restart. Their gauges are
            // most likely gone with them; one that is draining counts again from its next
            // report. Each stays live until it goes quiet, and then it is gone only if its
            // connections closed: a newer process under the same name does not prove the old
            // one gone (see `Process::connections_closed`).
            for old in &mut entry.processes {
                retired.append(&mut old.gauges);
            }
        }
        let position = match entry.processes.iter().position(|p| p.start_ms == start_ms) {
            Some(position) => position,
            None => {
                self.next_number += 1;
                self.processes += 1;
                entry.processes.push(Process {
                    number: self.next_number,
                    start_ms,
                    last_sequence: 0,
                    merged_before: 0,
                    last_seen: now,
                    interval: None,
                    backlog: None,
                    seen_before: None,
                    last_sent_ms: sent_at_ms,
                    stale: false,
                    open_connections: 0,
                    connections_closed: false,
                    closed_after: 0,
                    closed_here: false,
                    dropped_reports: 0,
                    gauges: Vec::new(),
                    fed: Vec::new(),
                    fed_unadmitted: Vec::new(),
                });
                self.live += 1;
                let last = entry.processes.len() - 1;
                let process = &mut entry.processes[last];
                process.last_sequence = sequence;
                let due =
                    process.next_due(self.stale_after, self.stale_intervals, self.forget_after);
                bring_forward(&mut self.next_due, due);
                let admission = Admission::Fresh {
                    // Nothing is known of what came before the first report seen: a control
                    // service restart must not count as lost reports.
                    missing: 0,
                    restart,
                    revived: false,
                };
                return (admission, Some(process));
            }
        };
        let process = &mut entry.processes[position];
        if sequence <= process.last_sequence {
            let behind = process.last_sequence - sequence;
            let bit = behind
                .checked_sub(1)
                .filter(|b| *b < LATE_WITHIN)
                .map(|b| 1u64 << b);
            return match bit {
                Some(bit) if process.merged_before & bit == 0 => {
                    process.merged_before |= bit;
                    (Admission::Late, Some(process))
                }
                _ => (Admission::Duplicate, None),
            };
        }
        let missing = sequence - process.last_sequence - 1;
        // The previous latest is now `missing + 1` behind: bit `missing`.
        process.merged_before = process
            .merged_before
            .checked_shl(u32::try_from(missing + 1).unwrap_or(u32::MAX))
            .unwrap_or(0)
            | 1u64
                .checked_shl(u32::try_from(missing).unwrap_or(u32::MAX))
                .unwrap_or(0);
        process.last_sequence = sequence;
        // A gap past the stale limit was a silence (a partition, a paused process), not the
        // reporter's cadence. Learned whole, it would keep a reporter that dies right after
        // coming back live, its in-flight gauge in the sums, for `stale_intervals` times that
        // silence. Capped at the limit, a reporter that really is slower still gets there, its
        // limit growing by at most `stale_intervals` times per report.
        let gap = now.saturating_duration_since(process.last_seen);
        let limit = stale_limit(
            self.stale_after,
            self.stale_intervals,
            self.forget_after,
            process.interval,
        );
        process.interval = Some(gap.min(limit));
        // The reporter builds a report once the previous one is acknowledged and resends it
        // unchanged until it is. After a partition, the report in flight when the link dropped
        // arrives first, with the long arrival gap but one interval of deltas, and the next one
        // carries the backlog with a short arrival gap. The time between the two reports'
        // builds, by the reporter's own clock (a difference, so its offset does not matter),
        // says how long the backlog accumulated. It started after the report before the
        // previous one arrived (that one was acknowledged before the previous was built), which
        // bounds what a clock step could claim.
        let built_over = (missing == 0 && process.last_sent_ms > 0)
            .then(|| sent_at_ms.saturating_sub(process.last_sent_ms))
            .map(Duration::from_millis);
        let built_over = match process.seen_before {
            Some(before) => {
                built_over.map(|built| built.min(now.saturating_duration_since(before)))
            }
            // Its second report seen here (a gateway come over from a leader that failed, say):
            // nothing here bounds the build time but the stable window the merge caps it at.
            // Discarded, the backlog this one carries would land as one burst at each failover.
            None => built_over,
        };
        // The arrival gap still counts when it is longer: when the previous report was merged
        // and only its acknowledgement lost, this one carries the silence itself.
        process.backlog = Some(built_over.map_or(gap, |built| built.max(gap)));
        process.seen_before = Some(process.last_seen);
        process.last_sent_ms = sent_at_ms;
        process.last_seen = now;
        let revived = std::mem::replace(&mut process.stale, false);
        let quiet_was_explained = process.quiet_is_explained();
        if sequence > process.closed_after.saturating_add(1) {
            // It reports on past the report its connections' close may have overtaken: it is
            // there, and if it goes quiet now it is missing until they close again.
            process.connections_closed = false;
        }
        if revived {
            if !quiet_was_explained {
                self.stale -= 1;
            }
            self.live += 1;
        }
        let due = process.next_due(self.stale_after, self.stale_intervals, self.forget_after);
        bring_forward(&mut self.next_due, due);
        let admission = Admission::Fresh {
            missing,
            restart: false,
            revived,
        };
        (admission, Some(process))
    }

    /// Marks silent reporters stale and forgets long-silent ones; returns the gauges that
    /// leave the in-flight sums.
    fn sweep(&mut self, now: Instant) -> Vec<(KeyId, InFlight)> {
        let mut dropped = Vec::new();
        if self.next_due.is_none_or(|due| now < due) {
            return dropped;
        }
        let (stale_after, intervals, forget_after) =
            (self.stale_after, self.stale_intervals, self.forget_after);
        let (departed, forgotten) = (&self.departed, &self.forgotten);
        let (mut live, mut stale, mut processes) = (self.live, self.stale, self.processes);
        let mut next_due = None;
        self.gateways.retain(|_, gateway| {
            gateway.processes.retain_mut(|process| {
                let silent = now.saturating_duration_since(process.last_seen);
                if silent >= forget_after {
                    if !process.stale {
                        live -= 1;
                        dropped.append(&mut process.gauges);
                    } else if !process.quiet_is_explained() {
                        stale -= 1;
                    }
                    processes -= 1;
                    forgotten.inc();
                    return false;
                }
                let limit = stale_limit(stale_after, intervals, forget_after, process.interval);
                if !process.stale && silent > limit {
                    process.stale = true;
                    live -= 1;
                    if !process.quiet_is_explained() {
                        stale += 1;
                    } else {
                        departed.inc();
                    }
                    dropped.append(&mut process.gauges);
                }
                bring_forward(
                    &mut next_due,
                    process.next_due(stale_after, intervals, forget_after),
                );
                true
            });
            !gateway.processes.is_empty()
        });
        self.live = live;
        self.processes = processes;
        self.stale = stale;
        self.next_due = next_due;
        dropped
    }

    /// Forgets evicted keys, whose ids will name other keys.
    fn forget_keys(&mut self, keys: &[KeyId]) {
        let keys: HashSet<KeyId> = keys.iter().copied().collect();
        for process in self
            .gateways
            .values_mut()
            .flat_map(|gateway| &mut gateway.processes)
        {
            process.forget_keys(&keys);
        }
    }

    /// For every reporter gone quiet (stale, and not gone with its connections closed), the
    /// keys it reported on within `lookback` before it went quiet.
    /// Per quiet process, the keys it fed and the pools it fed through keys that found no room,
    /// within `lookback` before it went quiet.
    fn silent_feeds(
        &self,
        lookback: Duration,
    ) -> impl Iterator<
        Item = (
            impl Iterator<Item = KeyId> + '_,
            impl Iterator<Item = PoolId> + '_,
        ),
    > + '_ {
        self.gateways
            .values()
            .flat_map(|gateway| &gateway.processes)
            .filter(|process| process.stale && !process.quiet_is_explained())
            .map(move |process| {
                let since = process.last_seen.checked_sub(lookback);
                let recent = move |at: &Instant| since.is_none_or(|since| *at >= since);
                let keys = process
                    .fed
                    .iter()
                    .filter(move |(_, at)| recent(at))
                    .map(|(key, _)| *key);
                let pools = process
                    .fed_unadmitted
                    .iter()
                    .filter(move |(_, at)| recent(at))
                    .map(|(pool, _)| *pool);
                (keys, pools)
            })
    }
}

/// Sets `item`'s time to `now`, forgetting items older than `lookback` when adding one.
fn note_recent<T: PartialEq>(
    list: &mut Vec<(T, Instant)>,
    item: T,
    now: Instant,
    lookback: Duration,
) {
    match list.iter_mut().find(|(listed, _)| *listed == item) {
        Some((_, at)) => *at = now,
        None => {
            list.retain(|(_, at)| now.saturating_duration_since(*at) <= lookback);
            list.push((item, now));
        }
    }
}

/// How long a process reporting every `interval` may be silent before it is stale.
fn stale_limit(
    stale_after: Duration,
    intervals: u32,
    forget_after: Duration,
    interval: Option<Duration>,
) -> Duration {
    let interval = interval.unwrap_or_default().min(forget_after);
    stale_after.max(interval.saturating_mul(intervals))
}

/// Lowers `next_due` to `due` if that is sooner (`None`: never).
fn bring_forward(next_due: &mut Option<Instant>, due: Option<Instant>) {
    if let Some(due) = due {
        *next_due = Some(next_due.map_or(due, |next| next.min(due)));
    }
}

impl Process {
    /// When it next changes by the clock alone: goes stale, or, stale, is forgotten (`None`:
    /// beyond what `Instant` holds). A sweep before then leaves it as it is.
    fn next_due(
        &self,
        stale_after: Duration,
        intervals: u32,
        forget_after: Duration,
    ) -> Option<Instant> {
        let silence = if self.stale {
            forget_after
        } else {
            stale_limit(stale_after, intervals, forget_after, self.interval).min(forget_after)
        };
        self.last_seen.checked_add(silence)
    }

    /// Quiet, it is not missing: its connections closed as Envoy's do when it exits.
    fn quiet_is_explained(&self) -> bool {
        self.connections_closed
    }

    fn forget_keys(&mut self, keys: &HashSet<KeyId>) {
        self.fed.retain(|(key, _)| !keys.contains(key));
        self.gauges.retain(|(key, _)| !keys.contains(key));
    }

    /// Notes that this process reported on `key` at `now`, forgetting keys not reported on
    /// within `lookback`.
    fn note_fed(&mut self, key: KeyId, now: Instant, lookback: Duration) {
        note_recent(&mut self.fed, key, now, lookback);
    }

    /// As [`Process::note_fed`], for a pool fed through a key that found no room.
    fn note_fed_unadmitted(&mut self, pool: PoolId, now: Instant, lookback: Duration) {
        note_recent(&mut self.fed_unadmitted, pool, now, lookback);
    }
}

// === impl IngestState ===

impl IngestState {
    fn merge(&mut self, report: ParsedReport, now: Instant) -> Merged {
        if report.connections_closed {
            self.reporters.mark_connections_closed(
                &report.gateway,
                report.process_start_unix_ms,
                report.sequence,
            );
            return Merged {
                admission: Admission::ConnectionsClosed,
                pools: Vec::new(),
                keys_over_limit: 0,
                newly_dropped_reports: 0,
            };
        }
        if report.forwarded {
            self.reporters
                .heard_elsewhere(&report.gateway, report.process_start_unix_ms);
        }
        let mut retired = Vec::new();
        let stale_after = self.reporters.stale_after;
        let (stale_intervals, forget_after) =
            (self.reporters.stale_intervals, self.reporters.forget_after);
        let (admission, process) = self.reporters.admit(
            &report.gateway,
            report.process_start_unix_ms,
            report.sequence,
            report.sent_at_unix_ms,
            now,
            &mut retired,
        );
        let mut merged = Merged {
            admission,
            pools: Vec::new(),
            keys_over_limit: 0,
            newly_dropped_reports: 0,
        };
        for (key, old) in retired {
            self.windows
                .replace_in_flight(key, old, InFlight::default(), now);
            merged.pools.extend_from_slice(self.windows.pools_of(key));
        }
        let Some(process) = process else {
            return merged;
        };
        self.last_report = Some(now);
        self.windows.note_heard(now);
        // Live on its own schedule: a gateway reporting every 5 s is not stale 3 s after one.
        let live_until =
            now + stale_limit(stale_after, stale_intervals, forget_after, process.interval);
        self.fresh_until = self.fresh_until.max(Some(live_until));
        merged.newly_dropped_reports = report
            .dropped_reports
            .saturating_sub(process.dropped_reports);
        process.dropped_reports = process.dropped_reports.max(report.dropped_reports);

        // A late report's gauges are older than those of the latest, which stay.
        let late = merged.admission == Admission::Late;
        if !late {
            for (key, old) in process.gauges.drain(..) {
                self.windows
                    .replace_in_flight(key, old, InFlight::default(), now);
                merged.pools.extend_from_slice(self.windows.pools_of(key));
            }
        }
        let lookback = self.windows.config().stable();
        // A report whose deltas accumulated over longer than the staleness bound carries the
        // reporter's backlog (it kept counting while it could not report): shared out over the
        // stable window at most, not counted as one burst that would set off panic mode.
        let backlog_since = process
            .backlog
            .filter(|silence| !late && *silence > stale_after)
            .and_then(|silence| now.checked_sub(silence.min(lookback)));
        for key in &report.keys {
            let Some(id) = self.windows.key(&key.backend, &key.model) else {
                merged.keys_over_limit += 1;
                for pool in self.windows.pools_selecting(&key.backend, &key.model) {
                    self.keys_dropped_at.insert(pool, now);
                    process.note_fed_unadmitted(pool, now, lookback);
                    merged.pools.push(pool);
                }
                continue;
            };
            process.note_fed(id, now, lookback);
            if report.held.is_zero() {
                self.windows.record(id, backlog_since, now, &key.delta);
            } else {
                // A report a follower held through a hand-over goes where it was taken, not into
                // the arrival bucket with every other held one: that burst would overstate the
                // short window's rate and could set off a scale-up after each failover.
                let taken = now.checked_sub(report.held.min(lookback)).unwrap_or(now);
                self.windows.record(id, None, taken, &key.delta);
            }
            if key.in_flight.total() > 0 && !late {
                self.windows
                    .replace_in_flight(id, InFlight::default(), key.in_flight, now);
                process.gauges.push((id, key.in_flight));
            }
            merged.pools.extend_from_slice(self.windows.pools_of(id));
        }
        merged.pools.sort_unstable();
        merged.pools.dedup();
        merged
    }

    /// Telemetry for the pools these (backend, model) keys would feed was turned away: they
    /// hold scale-down.
    fn unseen<'k>(&mut self, keys: impl IntoIterator<Item = (&'k str, &'k str)>, now: Instant) {
        for (backend, model) in keys {
            for pool in self.windows.pools_selecting(backend, model) {
                self.keys_dropped_at.insert(pool, now);
            }
        }
    }

    fn sweep(&mut self, now: Instant) -> Vec<PoolId> {
        self.last_sweep = Some(now);
        let mut pools = Vec::new();
        for (key, gauge) in self.reporters.sweep(now) {
            self.windows
                .replace_in_flight(key, gauge, InFlight::default(), now);
            pools.extend_from_slice(self.windows.pools_of(key));
        }
        // Idle for the stable window past `forget_after`: every reporter that fed the key within
        // the stable window before going quiet is forgotten already, so forgetting the key
        // changes no count; it only frees its place.
        let idle_for = self.reporters.forget_after + self.windows.config().stable();
        let evicted = self.windows.evict_idle(now, idle_for);
        if !evicted.is_empty() {
            self.reporters.forget_keys(&evicted);
        }
        let silent_feeders = self.count_silent_feeders();
        for (pool, count) in &silent_feeders {
            if self.silent_feeders.get(pool) != Some(count) {
                pools.push(*pool);
            }
        }
        pools.extend(
            self.silent_feeders
                .keys()
                .filter(|pool| !silent_feeders.contains_key(pool)),
        );
        self.silent_feeders = silent_feeders;
        pools.sort_unstable();
        pools.dedup();
        pools
    }

    /// Per pool, how many quiet reporters fed it within the stable window before going quiet.
    fn count_silent_feeders(&self) -> HashMap<PoolId, u32> {
        let mut counts: HashMap<PoolId, u32> = HashMap::new();
        let mut pools = Vec::new();
        for (keys, unadmitted) in self.reporters.silent_feeds(self.windows.config().stable()) {
            pools.clear();
            for key in keys {
                pools.extend_from_slice(self.windows.pools_of(key));
            }
            pools.extend(unadmitted);
            pools.sort_unstable();
            pools.dedup();
            for pool in &pools {
                *counts.entry(*pool).or_default() += 1;
            }
        }
        counts
    }

    fn sweep_if_due(&mut self, now: Instant) -> Vec<PoolId> {
        match self.last_sweep {
            Some(last) if now.saturating_duration_since(last) < self.sweep_every => Vec::new(),
            _ => self.sweep(now),
        }
    }
}

// === impl Telemetry ===

impl Telemetry {
    /// `pools[i]` selects the keys of pool `PoolId(i)`; `epoch` is when the service started.
    pub fn new(
        config: IngestConfig,
        windows: WindowConfig,
        pools: Vec<Selector>,
        epoch: Instant,
    ) -> Self {
        let dirty = RwLock::new(pools.iter().map(|_| Arc::new(Notify::new())).collect());
        let mut windows = Windows::new(windows, epoch, config.max_keys);
        windows.set_pools(pools);
        let counters = IngestCounters::default();
        let reporters = Reporters::new(
            &config,
            counters.departed.clone(),
            counters.forgotten.clone(),
        );
        let sweep_every = config.sweep_every();
        Telemetry {
            config,
            state: Mutex::new(IngestState {
                windows,
                reporters,
                last_sweep: None,
                sweep_every,
                last_report: None,
                fresh_until: None,
                silent_feeders: HashMap::new(),
                keys_dropped_at: HashMap::new(),
            }),
            counters,
            dirty,
        }
    }

    pub fn config(&self) -> &IngestConfig {
        &self.config
    }

    pub fn windows_config(&self) -> WindowConfig {
        *self.lock().windows.config()
    }

    /// When the newest report of any reporter arrived.
    pub fn last_report(&self) -> Option<Instant> {
        self.lock().last_report
    }

    /// Until when the reports so far keep some reporter live (each by its own stale limit):
    /// past it, every reporter is quiet.
    pub fn fresh_until(&self) -> Option<Instant> {
        self.lock().fresh_until
    }

    pub fn counters(&self) -> &IngestCounters {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, IngestState> {
        // A panic while holding the lock cannot leave the windows half-written in a way that
        // matters more than losing the service, so carry on with the data.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Validates and merges one report that arrived at `now` from its gateway.
    pub fn ingest(&self, report: v1::ReportRequest, now: Instant) -> Result<Merged, Refusal> {
        self.ingest_from(packed::ReportRequest::from(&report), now, false)
    }

    /// Validates and merges one report that arrived at `now`, `forwarded` by another replica or
    /// straight from its gateway.
    pub fn ingest_from(
        &self,
        report: packed::ReportRequest,
        now: Instant,
        forwarded: bool,
    ) -> Result<Merged, Refusal> {
        if report.keys.len() > self.config.max_keys_per_report {
            // Refused whole below: turned away for want of room, as keys over --max-keys are.
            let keys = report.keys.iter();
            self.lock()
                .unseen(keys.map(|k| (k.backend.as_str(), k.model.as_str())), now);
        }
        let parsed = match parse(report, &self.config) {
            Ok(parsed) => ParsedReport {
                forwarded,
                ..parsed
            },
            Err(refusal) => {
                self.count_refusal(refusal.reason());
                return Err(refusal);
            }
        };
        let merged = {
            let mut state = self.lock();
            let max = self.config.max_reporters;
            if !parsed.connections_closed
                && state
                    .reporters
                    .would_exceed(&parsed.gateway, parsed.process_start_unix_ms, max)
            {
                let keys = parsed.keys.iter();
                state.unseen(keys.map(|k| (k.backend.as_str(), k.model.as_str())), now);
                drop(state);
                let refusal = Refusal::TooManyReporters { max };
                self.count_refusal(refusal.reason());
                return Err(refusal);
            }
            state.merge(parsed, now)
        };
        match merged.admission {
            Admission::Duplicate => {
                self.counters.duplicates.inc();
            }
            Admission::ConnectionsClosed => {}
            Admission::Late => {
                self.counters.reports.inc();
                self.counters.late_reports.inc();
            }
            Admission::Fresh {
                missing,
                restart,
                revived,
            } => {
                self.counters.reports.inc();
                if missing > 0 {
                    self.counters.gaps.inc();
                    self.counters.missing_reports.inc_by(missing);
                }
                if restart {
                    self.counters.restarts.inc();
                }
                if revived {
                    self.counters.revived.inc();
                }
            }
        }
        if merged.keys_over_limit > 0 {
            self.counters.keys_over_limit.inc_by(merged.keys_over_limit);
        }
        if merged.newly_dropped_reports > 0 {
            self.counters
                .reporter_dropped_reports
                .inc_by(merged.newly_dropped_reports);
        }
        self.mark_dirty(&merged.pools);
        Ok(merged)
    }

    pub fn count_refusal(&self, reason: &'static str) {
        self.counters
            .refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
    }

    fn mark_dirty(&self, pools: &[PoolId]) {
        if pools.is_empty() {
            return;
        }
        let dirty = self.dirty.read().unwrap_or_else(|p| p.into_inner());
        for pool in pools {
            if let Some(notify) = dirty.get(pool.0) {
                notify.notify_one();
            }
        }
    }

    /// Replaces the pools (the autoscalers changed). See [`Windows::assign_pools`]: kept pools
    /// keep their windows, new ones start with their keys' history.
    pub fn set_pools(&self, pools: Vec<(PoolId, Selector)>) {
        let len = pools.iter().map(|(id, _)| id.0 + 1).max().unwrap_or(0);
        {
            let mut dirty = self.dirty.write().unwrap_or_else(|p| p.into_inner());
            while dirty.len() < len {
                dirty.push(Arc::new(Notify::new()));
            }
        }
        let changed: Vec<PoolId> = pools.iter().map(|(id, _)| *id).collect();
        self.lock().windows.assign_pools(pools);
        self.mark_dirty(&changed);
    }

    /// Marks silent reporters stale (at most every 100 ms); pools whose in-flight sums changed
    /// are marked dirty.
    pub fn sweep(&self, now: Instant) {
        let pools = self.lock().sweep_if_due(now);
        self.mark_dirty(&pools);
    }

    /// Notified whenever telemetry for the pool changed.
    pub fn dirty(&self, pool: PoolId) -> Option<Arc<Notify>> {
        self.dirty
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(pool.0)
            .cloned()
    }

    pub fn pool_count(&self) -> usize {
        self.lock().windows.pool_count()
    }

    /// A pool's figures at `now`, after sweeping for stale reporters.
    pub fn pool(&self, pool: PoolId, now: Instant) -> Option<View> {
        let (view, dirty) = {
            let mut state = self.lock();
            let dirty = state.sweep_if_due(now);
            (state.windows.pool(pool, now), dirty)
        };
        self.mark_dirty(&dirty);
        view
    }

    /// A connection carried a report of this reporter for the first time: the reporter's number
    /// for [`Telemetry::connection_closed`]. None when the reporter is unknown (its report was
    /// refused): then the connection's close means nothing.
    pub fn connection_opened(&self, gateway: &str, process_start_unix_ms: u64) -> Option<u64> {
        self.lock()
            .reporters
            .connection_opened(gateway, process_start_unix_ms)
    }

    /// Whether the reporter that [`Telemetry::connection_opened`] numbered `number` is still the
    /// one ingest remembers (not forgotten since, nor forgotten and back as a new entry).
    pub fn is_remembered(&self, gateway: &str, process_start_unix_ms: u64, number: u64) -> bool {
        self.lock()
            .reporters
            .process_mut(gateway, process_start_unix_ms)
            .is_some_and(|process| process.number == number)
    }

    /// A connection that [`Telemetry::connection_opened`] for this reporter (returning `number`)
    /// closed. `Some(sequence)` when it was the reporter's last open connection and the reporter
    /// is live: the sequence of its latest report, for the word passed on to the leader.
    /// `own`: the connection carried only this gateway's reports, and it ended rather than was
    /// lost.
    pub fn connection_closed(
        &self,
        gateway: &str,
        process_start_unix_ms: u64,
        number: u64,
        own: bool,
        now: Instant,
    ) -> Option<u64> {
        self.lock()
            .reporters
            .connection_closed(gateway, process_start_unix_ms, number, own, now)
    }

    /// How many reporters that fed `pool` within the stable window have since gone quiet (as
    /// of the last sweep): while any has, the pool's load may be short.
    pub fn silent_feeders(&self, pool: PoolId) -> u32 {
        self.lock().silent_feeders.get(&pool).copied().unwrap_or(0)
    }

    /// Whether a key that would feed `pool` was dropped over `max_keys` within the stable
    /// window before `now`: while one was, the pool's load may be short.
    pub fn keys_dropped_recently(&self, pool: PoolId, now: Instant) -> bool {
        let state = self.lock();
        let stable = state.windows.config().stable();
        state
            .keys_dropped_at
            .get(&pool)
            .is_some_and(|at| now.saturating_duration_since(*at) < stable)
    }

    pub fn keys(&self, now: Instant) -> Vec<KeyView> {
        self.lock().windows.keys(now)
    }

    pub fn reporters(&self, now: Instant) -> ReporterCounts {
        let (counts, dirty) = {
            let mut state = self.lock();
            let dirty = state.sweep_if_due(now);
            (state.reporters.counts(), dirty)
        };
        self.mark_dirty(&dirty);
        counts
    }
}

// === impl IngestService ===

impl IngestService {
    /// Ingest into `telemetry`; report streams end when `stopping` turns true (a closed channel
    /// would end them at once).
    pub fn new(telemetry: Arc<Telemetry>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        IngestService {
            telemetry,
            forwarder: None,
            replication: None,
            stopping,
        }
    }

    /// Forward what this replica merges while it follows (see [`crate::forward`]).
    pub fn with_forwarder(mut self, forwarder: Arc<Forwarder>) -> Self {
        self.forwarder = Some(forwarder);
        self
    }

    /// Send what this replica merges while it leads to its followers (see
    /// [`crate::replication`]).
    pub fn with_replication(mut self, replication: Arc<Replication>) -> Self {
        self.replication = Some(replication);
        self
    }

    /// The tonic server, with the report size limit.
    pub fn into_server(self) -> TelemetryServiceServer<IngestService> {
        let limit = self.telemetry.config.max_report_bytes;
        TelemetryServiceServer::new(self).max_decoding_message_size(limit)
    }
}

impl IngestService {
    /// Merges one report, unary or streamed, and answers with its acknowledgement or refusal.
    fn merge(
        &self,
        received: ReceivedReport,
        forwarded_by: Option<&Arc<str>>,
    ) -> Result<v1::ReportResponse, tonic::Status> {
        let ReceivedReport { report, encoded } = received;
        let forwarded = forwarded_by.is_some();
        // Stopping, this replica steps down before its servers have drained, and its followers'
        // streams end: a report taken now would be acknowledged and reach no other replica.
        // Refused, it goes again to another replica, as gateways and followers send again what
        // is not acknowledged.
        if *self.stopping.borrow() {
            self.telemetry.count_refusal(STOPPING);
            return Err(shutting_down());
        }
        // A follower forwards to the replica the Lease names, which may have stopped leading
        // (its renewals fail) while the Lease still names it, until it expires. Taken and
        // acknowledged there, the report would be lost to whoever leads next: refused as
        // unavailable, it stays with the follower, which sends it again to the next holder.
        // Gateways' own reports are taken by every replica, leading or not.
        if forwarded && self.forwarder.as_ref().is_some_and(|f| f.active()) {
            self.telemetry.count_refusal(NOT_LEADER);
            tracing::debug!(
                sequence = report.sequence,
                "forwarded report refused: this replica does not lead"
            );
            return Err(tonic::Status::unavailable(
                "not the leader: send forwarded reports to the Lease holder",
            ));
        }
        if report.connections_closed && !forwarded {
            // Only a replica that saw a gateway's connections close may say so: from anyone
            // else it could release the hold that protects a gateway cut off.
            self.telemetry.count_refusal(NOT_FORWARDED);
            return Err(tonic::Status::invalid_argument(
                "connections_closed: set only by a control replica forwarding reports",
            ));
        }
        // A forwarded report has made its one hop; forwarding it again could bounce it between
        // two replicas that each think the other leads (should this one stop leading between
        // the check above and now).
        let (sequence, held_ms) = (report.sequence, report.held_ms);
        // A follower passes the report on to the leader; the leader keeps it, as it arrived, for
        // its followers. Both before ingest takes it.
        let forwarder = self.forwarder.as_ref().filter(|f| !forwarded && f.active());
        let to_leader = forwarder.map(|f| f.prepare(&report, encoded.clone()));
        let replication = self.replication.as_ref().filter(|r| r.wanted());
        let encoded = replication.map(|_| encoded);
        let pass_on = move || match (to_leader, forwarder, encoded, replication) {
            (Some(to_leader), Some(forwarder), _, _) => forwarder.offer(to_leader),
            (_, _, Some(encoded), Some(replication)) => {
                replication.keep(encoded, held_ms, forwarded_by.cloned());
            }
            _ => {}
        };
        match self
            .telemetry
            .ingest_from(report, Instant::now(), forwarded)
        {
            Ok(merged) => {
                let new = matches!(merged.admission, Admission::Fresh { .. } | Admission::Late);
                // Only a leader passes on a word that a gateway's connections closed (a follower
                // sends its own words, when they close here).
                let closed =
                    merged.admission == Admission::ConnectionsClosed && forwarder.is_none();
                if new || closed {
                    pass_on();
                }
                Ok(v1::ReportResponse {
                    acknowledged_sequence: sequence,
                })
            }
            Err(refusal) => {
                tracing::debug!(reason = refusal.reason(), %refusal, "report refused");
                if refusal.for_want_of_room() {
                    pass_on();
                    // Taken into account (it holds the pools here), and the forwarding stream
                    // goes on: ending it would hold back the other reports on it.
                    if forwarded {
                        return Ok(v1::ReportResponse {
                            acknowledged_sequence: sequence,
                        });
                    }
                }
                Err(refusal.to_status())
            }
        }
    }
}

/// Gateway processes followed per connection: a gateway's connection carries its own process's
/// reports (two during a hot restart). One shared by many gateways (a pooling proxy in front of
/// this service) follows the first few; the others' close is not seen, and they are held for
/// when quiet, as before.
const REPORTERS_PER_CONNECTION: usize = 4;

/// The gateway processes one connection carried reports of. Told when the connection closes
/// ([`crate::connection`]): each process is told, and on a follower the leader too.
struct ConnectionReporters {
    service: IngestService,
    /// Gateway, process start, and the number ingest gave the process.
    carried: Vec<(String, u64, u64)>,
    /// It carried more than one gateway's reports: a proxy's connection (a sidecar in front of
    /// this service), whose close says nothing of any one gateway.
    shared: bool,
    /// `IngestCounters::forgotten` when `carried` was last checked against what ingest
    /// remembers.
    forgotten_seen: u64,
}

impl ConnectionReporters {
    fn new(service: IngestService) -> Self {
        let forgotten_seen = service.telemetry.counters().forgotten.get();
        ConnectionReporters {
            service,
            carried: Vec::new(),
            shared: false,
            forgotten_seen,
        }
    }

    fn knows(&mut self, gateway: &str, start: u64) -> bool {
        self.drop_forgotten();
        self.shared
            || self
                .carried
                .iter()
                .any(|(g, s, _)| g == gateway && *s == start)
            || self.carried.len() >= REPORTERS_PER_CONNECTION
    }

    /// A process silent past `--forget-after` is forgotten, its connection perhaps still open;
    /// should it report again on it, ingest remembers it as a new entry, which this connection
    /// must follow afresh, or its close (Envoy exiting) would go unseen and its load be held for
    /// until forgotten again. A process is forgotten once, long after it went quiet, so the
    /// check runs only after one.
    fn drop_forgotten(&mut self) {
        let forgotten = self.service.telemetry.counters().forgotten.get();
        if forgotten == self.forgotten_seen {
            return;
        }
        self.forgotten_seen = forgotten;
        let telemetry = &self.service.telemetry;
        self.carried
            .retain(|(gateway, start, number)| telemetry.is_remembered(gateway, *start, *number));
    }

    fn track(&mut self, gateway: String, start: u64) {
        if self.knows(&gateway, start) {
            return;
        }
        if self.carried.iter().any(|(g, _, _)| *g != gateway) {
            // Two gateways' processes share no connection unless a proxy pools them (two
            // processes of one gateway do, during a hot restart).
            self.shared = true;
            return;
        }
        if let Some(number) = self.service.telemetry.connection_opened(&gateway, start) {
            self.carried.push((gateway, start, number));
        }
    }
}

impl Carried for ConnectionReporters {
    fn closed(mut self: Box<Self>, how: Closed) {
        // This service's own shutdown closes every connection: that says nothing of gateways.
        if *self.service.stopping.borrow() {
            return;
        }
        let forwarder = self.service.forwarder.as_ref().filter(|f| f.active());
        let replication = self.service.replication.as_ref().filter(|r| r.wanted());
        // Lost, it still stops counting as open; its gateway may live on behind a partition,
        // held for as a quiet one is.
        let own = !self.shared && how == Closed::Ended;
        let now = Instant::now();
        for (gateway, start, number) in self.carried.drain(..) {
            let telemetry = &self.service.telemetry;
            let Some(sequence) = telemetry.connection_closed(&gateway, start, number, own, now)
            else {
                continue;
            };
            tracing::debug!(%gateway, start, sequence, "a reporter's connections all closed");
            let word = || v1::ReportRequest {
                reporter: Some(v1::Reporter {
                    gateway,
                    process_start_unix_ms: start,
                    filter_version: String::new(),
                }),
                sequence,
                connections_closed: true,
                ..v1::ReportRequest::default()
            };
            // The leader's followers are told as the leader is by a follower.
            if let Some(forwarder) = forwarder {
                forwarder.offer_report(word());
            } else if let Some(replication) = replication {
                replication.publish(&word(), None);
            }
        }
    }
}

impl IngestService {
    /// The reporter of a gateway's `report` when `connection` has not carried it yet: to
    /// [`IngestService::track`] once the report is taken. (Checked before the report is merged,
    /// which consumes it, so its name is copied only the first time.)
    fn untracked(
        &self,
        connection: Option<&ConnectionInfo>,
        report: &packed::ReportRequest,
    ) -> Option<(String, u64)> {
        let reporter = report
            .reporter
            .as_ref()
            .filter(|_| !report.connections_closed)?;
        let start = reporter.process_start_unix_ms;
        let known = connection?.carried(
            || ConnectionReporters::new(self.clone()),
            |c| c.knows(&reporter.gateway, start),
        )?;
        (!known).then(|| (reporter.gateway.clone(), start))
    }

    fn track(&self, connection: Option<&ConnectionInfo>, reporter: Option<(String, u64)>) {
        let (Some(connection), Some((gateway, start))) = (connection, reporter) else {
            return;
        };
        connection.carried(
            || ConnectionReporters::new(self.clone()),
            |c| c.track(gateway, start),
        );
    }

    /// Merges a report from a gateway or another replica, following the gateway's connection.
    fn take(
        &self,
        report: ReceivedReport,
        forwarded_by: Option<&Arc<str>>,
        connection: Option<&ConnectionInfo>,
    ) -> Result<v1::ReportResponse, tonic::Status> {
        let forwarded = forwarded_by.is_some();
        // A replica's forwarding connection carries many gateways; its close says nothing of them.
        let connection =
            connection.filter(|_| !forwarded && self.telemetry.config().departed_on_close);
        let reporter = self.untracked(connection, &report.report);
        let answer = self.merge(report, forwarded_by);
        if answer.is_ok() {
            self.track(connection, reporter);
        }
        answer
    }
}

fn shutting_down() -> tonic::Status {
    tonic::Status::unavailable("the control service is shutting down; report to another replica")
}

/// The replica that forwarded `request`'s reports, if one did ([`FORWARDED_BY`]).
fn forwarded_by<T>(request: &tonic::Request<T>) -> Option<Arc<str>> {
    let value = request.metadata().get(FORWARDED_BY)?;
    // An identity that is not text still marks the report forwarded.
    Some(Arc::from(value.to_str().unwrap_or_default()))
}

/// The acknowledgements of one `ReportStream`, in the order of its reports. Each report is
/// merged when it arrives and acknowledged before the next is read. A refusal (or a message
/// tonic could not decode, such as one over the size limit) is the stream's last answer: its
/// status ends the stream, as it would end a unary call.
///
/// Written out rather than composed from `futures::stream::unfold` and `tokio::select!`: those
/// moved the stream's state in and out of a new future and registered a new wake-up for
/// `stopping` with every report, about 3% of the service's CPU at 10,000 gateways.
pub struct AckStream {
    reports: tonic::Streaming<ReceivedReport>,
    /// `None` once the stream has given its last answer.
    service: Option<IngestService>,
    forwarded_by: Option<Arc<str>>,
    connection: Option<ConnectionInfo>,
    /// Ends an idle stream when the service stops, rather than let it hold the graceful
    /// shutdown open.
    stopping: StopWatch,
}

/// Tells a stream whether the service is stopping, and has its task woken when it starts to.
/// The wait on the signal is polled again only when the signal changed or the task did: its
/// wake-up, once registered, stands, and registering it anew on each of a stream's reports was
/// about 1.5% of the service's CPU at 10,000 gateways.
struct StopWatch {
    stopping: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    /// What `stopping` waits on, to tell without polling it whether it may have news.
    signal: tokio::sync::watch::Receiver<bool>,
    /// The waker `stopping` was last polled with, and so will wake.
    wakes: Option<std::task::Waker>,
}

impl StopWatch {
    fn new(signal: &tokio::sync::watch::Receiver<bool>) -> Self {
        let mut stopping = signal.clone();
        let mut signal = signal.clone();
        signal.borrow_and_update();
        StopWatch {
            // Unconstrained: out of the task's budget, the wait would return pending without
            // registering its wake-up, and this would take it as registered. A closed channel
            // (the service gone) stops the stream too.
            stopping: Box::pin(tokio::task::unconstrained(async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            })),
            signal,
            wakes: None,
        }
    }

    /// Whether the service is stopping; if not, the task of `cx` is woken when it starts to.
    fn stopped(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let registered = self
            .wakes
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if registered && !self.signal.has_changed().unwrap_or(true) {
            return false;
        }
        if self.stopping.as_mut().poll(cx).is_ready() {
            return true;
        }
        self.wakes = Some(cx.waker().clone());
        false
    }
}

impl AckStream {
    fn new(
        reports: tonic::Streaming<ReceivedReport>,
        service: IngestService,
        forwarded_by: Option<Arc<str>>,
        connection: Option<ConnectionInfo>,
    ) -> Self {
        AckStream {
            reports,
            stopping: StopWatch::new(&service.stopping),
            service: Some(service),
            forwarded_by,
            connection,
        }
    }
}

impl futures::Stream for AckStream {
    type Item = Result<v1::ReportResponse, tonic::Status>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        let Some(service) = this.service.as_ref() else {
            return Poll::Ready(None);
        };
        let answer = match futures::StreamExt::poll_next_unpin(&mut this.reports, cx) {
            // Taken even if the service is stopping: `IngestService::merge` refuses it then.
            Poll::Ready(Some(Ok(report))) => {
                service.take(report, this.forwarded_by.as_ref(), this.connection.as_ref())
            }
            Poll::Ready(Some(Err(status))) => Err(status),
            Poll::Ready(None) => {
                this.service = None;
                return Poll::Ready(None);
            }
            Poll::Pending if this.stopping.stopped(cx) => Err(shutting_down()),
            Poll::Pending => return Poll::Pending,
        };
        if answer.is_err() {
            this.service = None;
        }
        Poll::Ready(Some(answer))
    }
}

#[tonic::async_trait]
impl TelemetryService for IngestService {
    async fn report(
        &self,
        request: tonic::Request<ReceivedReport>,
    ) -> Result<tonic::Response<v1::ReportResponse>, tonic::Status> {
        let forwarded_by = forwarded_by(&request);
        let connection = request.extensions().get::<ConnectionInfo>().cloned();
        self.take(
            request.into_inner(),
            forwarded_by.as_ref(),
            connection.as_ref(),
        )
        .map(tonic::Response::new)
    }

    type ReportStreamStream = AckStream;

    async fn report_stream(
        &self,
        request: tonic::Request<tonic::Streaming<ReceivedReport>>,
    ) -> Result<tonic::Response<AckStream>, tonic::Status> {
        let forwarded_by = forwarded_by(&request);
        let connection = request.extensions().get::<ConnectionInfo>().cloned();
        let reports = request.into_inner();
        Ok(tonic::Response::new(AckStream::new(
            reports,
            self.clone(),
            forwarded_by,
            connection,
        )))
    }
}

#[cfg(test)]
mod tests;
