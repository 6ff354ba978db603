//! Followers forward: a follower merges each report it receives AND sends it, unchanged, to the
//! leader.
//!
//! report at a follower -> [`Forwarder::offer`] (bounded queue; full: dropped and counted) ->
//! one of [`LANES`] tasks -> a message on that lane's `TelemetryService/ReportStream` to the
//! leader's advertised address, opened with [`FORWARDED_BY`] so its reports are never forwarded
//! again. A lane sends without waiting for each acknowledgement (the leader acknowledges in
//! order, and HTTP/2 flow control bounds what is outstanding), so its throughput is not one report
//! per round trip; it counts a report forwarded when the leader acknowledges it. What a stream
//! leaves unacknowledged (the leader went away, or the Lease changed hands) is sent again, first,
//! on the next stream, to whichever replica the Lease names by then, for up to [`RESEND_WITHIN`]:
//! a hand-over loses nothing a follower took, and the leader merges each report once however
//! often it arrives. A replica that does not lead answers forwarded reports `UNAVAILABLE` ("not
//! the leader") rather than taking them, so a leader that lost the Lease but is still named by it
//! does not swallow them: they stay outstanding and go to the next holder.
//!
//! Why forward rather than have gateways find the leader: gateways reach the control service
//! through its Kubernetes Service, which spreads their connections over every replica, and a
//! gateway knows nothing of leases. Rather than teach each gateway to chase the leader, every
//! replica takes every report it is given, merges it into its own windows, and a follower passes
//! it on. The leader streams back to each follower what the others forwarded and its own
//! gateways sent ([`crate::replication`]), so a follower that becomes leader starts on complete
//! windows. Reports that wait longer than [`RESEND_WITHIN`] for a new leader (a crashed one's
//! Lease runs out first) are dropped and counted. Forwarding is idempotent because the leader admits
//! reports by (reporter, sequence) as ingest always does: a report that reaches it twice (sent
//! directly and forwarded) is merged once. Order does not matter either: a forwarded report that
//! arrives after a newer one from the same gateway sent directly (its connection moved between
//! replicas meanwhile) is merged late, if it is at most [`crate::ingest::LATE_WITHIN`]
//! sequences behind (see `Admission::Late`).
//!
//! The leader's address comes from the Lease: a holder identity `name@host:port` (see
//! [`identity`]) names where its gRPC server listens. Forwarding never blocks ingest: reports
//! wait in a bounded queue per lane, and when the queue is full, when no leader was named or took
//! them within [`RESEND_WITHIN`] or when the leader refused them, they are dropped and counted in
//! `flyball_forward_dropped_total{reason}`. Lanes are chosen by gateway so one gateway's reports
//! keep their order.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flyball_proto::codec::EncodedReport;
use flyball_proto::grpc::forward::telemetry_service_client::TelemetryServiceClient;
use flyball_proto::{packed, v1};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::leader::leader_channel;
use crate::replication::Replication;
use crate::tls::GrpcTls;

/// gRPC metadata naming the replica that forwarded a report. A report carrying it is merged
/// and never forwarded again, so two replicas that each think the other leads cannot bounce a
/// report between them.
pub const FORWARDED_BY: &str = "flyball-forwarded-by";

/// Sending tasks, each with its own stream to the leader; one gateway's reports always take
/// the same lane, so they arrive in order.
pub const LANES: usize = 4;

/// Reports a lane hands its stream before the stream takes them (beyond that the lane waits,
/// and its queue fills): bounds, with the HTTP/2 window, what a broken stream can lose.
const STREAM_BUFFER: usize = 64;

/// Reports waiting per lane. A gateway reports about once a second and a report is a few KB,
/// so this holds a few seconds of a thousand gateways at a few MB at most; beyond that the
/// leader is not keeping up and waiting longer only makes the data staler.
pub const QUEUE_PER_LANE: usize = 1024;

/// How long a stream may go without an acknowledgement while reports await one, or take to
/// open, before it counts as failed (its reports are then sent again on the next stream).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a report may wait for a leader to take it. A leader whose renewals fail stops
/// leading, and refuses forwarded reports, while the Lease still names it: for up to a Lease
/// duration (15 s by default) before another replica may take it, then that replica's claim,
/// then followers' next read of the holder (within a second of a failed send). 20 s covers the
/// default Lease; waiting only 10 s, the reports taken in the first part of that hand-over would
/// be dropped. The cost is that the last of them reach the new leader up to 20 s late, as one
/// burst in its short window, while its restart hold keeps it from scaling down; older ones are
/// dropped. (Under heavy load, `queue_per_lane` bounds what a lane keeps before this does.)
pub const RESEND_WITHIN: Duration = Duration::from_secs(20);

/// While reports wait for a leader and none arrive to carry them, how often to try again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// How forwarding connects, and its bounds; the defaults are the constants above.
#[derive(Debug, Clone)]
pub struct ForwardSettings {
    /// Reports queued per lane, and reports a lane keeps unacknowledged.
    pub queue_per_lane: usize,
    /// [`SEND_TIMEOUT`]
    pub timeout: Duration,
    /// [`RESEND_WITHIN`]
    pub resend_within: Duration,
    /// TLS to the leader (`https`), when the gRPC port speaks it: each new stream takes the
    /// client config current then, so renewed certificates are used without a restart.
    pub tls: Option<Arc<GrpcTls>>,
    /// Where this replica keeps what it merges for its followers once it leads: what a lane
    /// holds for a leader when this replica takes the lead goes there.
    pub replication: Option<Arc<Replication>>,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        ForwardSettings {
            queue_per_lane: QUEUE_PER_LANE,
            timeout: SEND_TIMEOUT,
            resend_within: RESEND_WITHIN,
            tls: None,
            replication: None,
        }
    }
}

/// Forwarding counters, on `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ForwardCounters {
    pub forwarded: Counter,
    pub dropped: Family<DroppedLabels, Counter>,
}

impl ForwardCounters {
    /// Counts `n` reports dropped for `reason`.
    fn drop(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.dropped
                .get_or_create(&DroppedLabels { reason })
                .inc_by(n);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `queue_full`, `no_leader` (none named within [`RESEND_WITHIN`]), `send_failed` (not
    /// delivered within it),
    /// `refused` (the leader refused the report) or `leading` (held for a leader when this
    /// replica took the lead: the report is in its own windows).
    pub reason: &'static str,
}

/// The follower's side of forwarding, shared by every ingest call.
#[derive(Debug)]
pub struct Forwarder {
    lanes: Vec<mpsc::Sender<Forwarded>>,
    leading: watch::Receiver<bool>,
    hasher: RandomState,
    counters: ForwardCounters,
}

/// One sending task; run it with [`Lane::run`].
#[derive(Debug)]
pub struct Lane {
    queue: mpsc::Receiver<Forwarded>,
    leading: watch::Receiver<bool>,
    leader: watch::Receiver<Option<String>>,
    refresh: Arc<Notify>,
    identity: String,
    counters: ForwardCounters,
    timeout: Duration,
    resend_within: Duration,
    max_outstanding: usize,
    outstanding: Arc<Mutex<Outstanding>>,
    tls: Option<Arc<GrpcTls>>,
    replication: Option<Arc<Replication>>,
}

/// The identity a replica claims the Lease with: its name and, when known, where its gRPC
/// server can be reached (`flyball-control-0@10.0.0.7:9090`).
pub fn identity(name: &str, advertise: Option<&str>) -> String {
    match advertise {
        Some(addr) => format!("{name}@{addr}"),
        None => name.to_owned(),
    }
}

/// The gRPC URI of the replica holding the Lease as `holder`, if its identity names one.
pub fn leader_uri(holder: &str) -> Option<String> {
    let (_, addr) = holder.rsplit_once('@')?;
    let uri = format!("http://{addr}");
    let parsed: axum::http::Uri = uri.parse().ok()?;
    // host:port and nothing else.
    let authority = parsed.authority()?;
    (authority.as_str() == addr && authority.port().is_some() && parsed.path() == "/")
        .then_some(uri)
}

// === impl Forwarder ===

impl Forwarder {
    /// A forwarder and its lanes. `leader` is the leader's gRPC URI when known and not this
    /// replica; `refresh` asks for it to be read again (after a failed send).
    pub fn with_settings(
        identity: &str,
        leading: watch::Receiver<bool>,
        leader: watch::Receiver<Option<String>>,
        refresh: Arc<Notify>,
        counters: ForwardCounters,
        limits: ForwardSettings,
    ) -> (Self, Vec<Lane>) {
        let mut senders = Vec::with_capacity(LANES);
        let mut lanes = Vec::with_capacity(LANES);
        for _ in 0..LANES {
            let (tx, rx) = mpsc::channel(limits.queue_per_lane.max(1));
            senders.push(tx);
            lanes.push(Lane {
                queue: rx,
                leading: leading.clone(),
                leader: leader.clone(),
                refresh: refresh.clone(),
                identity: identity.to_owned(),
                counters: counters.clone(),
                timeout: limits.timeout,
                resend_within: limits.resend_within,
                max_outstanding: limits.queue_per_lane.max(1),
                outstanding: Arc::default(),
                tls: limits.tls.clone(),
                replication: limits.replication.clone(),
            });
        }
        let forwarder = Forwarder {
            lanes: senders,
            leading,
            hasher: RandomState::new(),
            counters,
        };
        (forwarder, lanes)
    }

    /// Whether reports arriving now are to be forwarded: this replica is a follower.
    pub fn active(&self) -> bool {
        !*self.leading.borrow()
    }

    /// `report`, which arrived as `encoded`, made ready to forward: taken apart before ingest
    /// takes the report, offered once ingest has merged it.
    pub fn prepare(&self, report: &packed::ReportRequest, encoded: EncodedReport) -> Forwarded {
        let gateway = report
            .reporter
            .as_ref()
            .map(|r| r.gateway.as_str())
            .unwrap_or_default();
        // One gateway's reports keep to one lane, so they reach the leader in order.
        let lane = (self.hasher.hash_one(gateway) % self.lanes.len().max(1) as u64) as usize;
        Forwarded {
            encoded,
            held_ms: report.held_ms,
            word: report.connections_closed,
            lane,
        }
    }

    /// Queues `report` for the leader; never waits.
    pub fn offer(&self, report: Forwarded) {
        let Some(lane) = self.lanes.get(report.lane) else {
            return;
        };
        match lane.try_reserve() {
            Ok(permit) => permit.send(report),
            Err(_) => self.counters.drop("queue_full", 1),
        }
    }

    /// Queues a report made here (a word that a gateway's connections closed), encoding it.
    pub fn offer_report(&self, report: v1::ReportRequest) {
        let encoded = EncodedReport::encode(&report);
        self.offer(self.prepare(&packed::ReportRequest::from(&report), encoded));
    }

    pub fn counters(&self) -> &ForwardCounters {
        &self.counters
    }
}

// === impl Lane ===

/// What a lane has handed to the leader and not had acknowledged, shared with the task reading
/// the current stream's acknowledgements. Each report is counted once: forwarded when its ack
/// comes, or dropped when it could not be delivered within [`RESEND_WITHIN`].
#[derive(Debug, Default)]
struct Outstanding {
    /// Sent (or to be sent again) in order, each with when the lane first took it.
    reports: VecDeque<(Instant, Forwarded)>,
    /// Counts streams; a reading task acts only on the stream it was started for.
    stream: u64,
    /// The current stream ended (or stalled): the next report, or the retry timer, opens another
    /// and sends `reports` again first.
    over: bool,
    /// A failure to reach the leader was logged as a warning, and nothing has been
    /// acknowledged since: further failures go to debug, not once per retry.
    warned: bool,
}

/// A report on its way to the leader: the bytes it arrived as, which go on as they are (the
/// follower neither copies the report nor encodes it again), and the lane it keeps to.
#[derive(Debug, Clone)]
pub struct Forwarded {
    encoded: EncodedReport,
    /// `held_ms` as the report arrived with it.
    held_ms: u64,
    /// A word that a gateway's connections closed, not a report: not counted as forwarded.
    word: bool,
    lane: usize,
}

/// How long a report taken at `taken` has been held by `now`.
fn held_ms(taken: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(taken).as_millis()).unwrap_or(u64::MAX)
}

/// `report`, taken at `taken`, saying how long it was held by `now`, so that whoever merges it
/// places it where it was taken.
fn held_since(report: &Forwarded, taken: Instant, now: Instant) -> EncodedReport {
    report.encoded.with_held_ms(held_ms(taken, now))
}

fn lock(state: &Mutex<Outstanding>) -> std::sync::MutexGuard<'_, Outstanding> {
    // Plain data: a panic elsewhere cannot leave it half-updated.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The open stream: where it goes and how reports are handed to it.
#[derive(Debug)]
struct LeaderStream {
    uri: String,
    reports: mpsc::Sender<EncodedReport>,
}

impl Lane {
    /// Sends queued reports until every [`Forwarder`] handle is gone.
    pub async fn run(mut self) {
        let mut stream: Option<LeaderStream> = None;
        // When a stream to which leader was last opened.
        let mut last_opened: Option<(String, Instant)> = None;
        // One timer for the lane's life, not one per report.
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The stream may end while the lane waits here: with reports outstanding, look
            // again now and then rather than only when the next report comes.
            let waiting = !lock(&self.outstanding).reports.is_empty();
            let report = tokio::select! {
                report = self.queue.recv() => match report {
                    Some(report) => Some(report),
                    None => return,
                },
                // Reports wait for a leader to take them even when no new ones come.
                _ = retry.tick(), if waiting => None,
            };
            if *self.leading.borrow() {
                // This replica leads now: what it held for the old leader is in its own windows,
                // and goes to its followers, which nobody else told of it.
                let held = {
                    let mut state = lock(&self.outstanding);
                    // Acknowledgements still coming from the old stream are for reports no
                    // longer here: they must not take the ones held from now on.
                    state.stream += 1;
                    state.over = true;
                    std::mem::take(&mut state.reports)
                };
                let now = Instant::now();
                let held: Vec<_> = held
                    .into_iter()
                    .map(|(taken, report)| (report, held_ms(taken, now)))
                    .chain(report.map(|report| {
                        let held_ms = report.held_ms;
                        (report, held_ms)
                    }))
                    .collect();
                self.counters.drop("leading", held.len() as u64);
                if let Some(replication) = &self.replication {
                    for (report, held_ms) in held {
                        replication.keep(report.encoded, held_ms, None);
                    }
                }
                stream = None;
                continue;
            }
            let Some(uri) = self.leader.borrow().clone() else {
                // No leader named (the Lease changing hands, or naming this replica while it
                // no longer leads): the report waits for the next one, as reports a stream left
                // unacknowledged do, for up to `resend_within`.
                if let Some(report) = report {
                    self.hold(report);
                }
                self.expire("no_leader");
                continue;
            };
            let reopen = {
                let state = lock(&self.outstanding);
                state.over || stream.as_ref().is_none_or(|s| s.uri != uri)
            };
            if reopen {
                let moments_ago = last_opened
                    .as_ref()
                    .is_some_and(|(to, at)| *to == uri && at.elapsed() < RETRY_EVERY);
                if moments_ago {
                    // The stream to this leader failed moments after it was opened (a refused
                    // handshake, a holder that is gone): opening one per report would cost the
                    // leader a connection each. The report waits for the retry timer.
                    if let Some(report) = report {
                        self.hold(report);
                    }
                    continue;
                }
                last_opened = Some((uri.clone(), Instant::now()));
                stream = self.reopen(uri).await;
            }
            match (report, stream.as_ref()) {
                (Some(report), Some(open)) => {
                    let encoded = report.encoded.clone();
                    lock(&self.outstanding)
                        .reports
                        .push_back((Instant::now(), report));
                    self.trim();
                    self.send(open, encoded).await;
                }
                // The leader's address is unusable: it may advertise another.
                (Some(report), None) => self.hold(report),
                (None, _) => {}
            }
        }
    }

    /// Opens a stream to `uri` and sends again what the last one left unacknowledged (the
    /// leader merges a report once, however often it comes). `None` when `uri` is unusable.
    async fn reopen(&self, uri: String) -> Option<LeaderStream> {
        let stream_id = {
            let mut state = lock(&self.outstanding);
            state.stream += 1;
            state.over = false;
            state.stream
        };
        self.expire("send_failed");
        let open = self.open(uri, stream_id)?;
        let now = Instant::now();
        let resend: Vec<EncodedReport> = lock(&self.outstanding)
            .reports
            .iter()
            .map(|(taken, report)| held_since(report, *taken, now))
            .collect();
        for report in resend {
            if !self.send(&open, report).await {
                break;
            }
        }
        Some(open)
    }

    /// Hands `report` to the stream; on a stall or a closed stream, marks it over (the report
    /// stays outstanding, for the next stream).
    async fn send(&self, open: &LeaderStream, report: EncodedReport) -> bool {
        let sent = tokio::time::timeout(self.timeout, open.reports.send(report)).await;
        let ok = matches!(sent, Ok(Ok(())));
        if !ok {
            tracing::debug!(uri = %open.uri, "forwarding stream stalled; reopening");
            lock(&self.outstanding).over = true;
        }
        ok
    }

    /// Opens a stream to `uri` in the background (the lane never waits for a connection).
    fn open(&self, uri: String, stream_id: u64) -> Option<LeaderStream> {
        let channel = match leader_channel(&uri, self.tls.as_deref(), self.timeout) {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(%uri, %error, "leader address is not a URI; not forwarding");
                lock(&self.outstanding).over = true;
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Ok(value) = self.identity.parse() {
            request.metadata_mut().insert(FORWARDED_BY, value);
        }
        let acks = Acknowledgements {
            uri: uri.clone(),
            stream_id,
            outstanding: self.outstanding.clone(),
            refresh: self.refresh.clone(),
            counters: self.counters.clone(),
            timeout: self.timeout,
        };
        let mut grpc = TelemetryServiceClient::new(channel);
        tokio::spawn(async move {
            let opened = tokio::time::timeout(acks.timeout, grpc.report_stream(request)).await;
            acks.read(opened.ok()).await;
        });
        Some(LeaderStream { uri, reports: tx })
    }

    /// Keeps `report` outstanding, to be sent first on the next stream opened.
    fn hold(&self, report: Forwarded) {
        {
            let mut state = lock(&self.outstanding);
            state.reports.push_back((Instant::now(), report));
            state.over = true;
        }
        self.trim();
    }

    /// Drops (and counts, for `reason`) what has waited longer than `resend_within` for a leader
    /// to take it.
    fn expire(&self, reason: &'static str) {
        let now = Instant::now();
        let expired = {
            let mut state = lock(&self.outstanding);
            let before = state.reports.len();
            state
                .reports
                .retain(|(at, _)| now.saturating_duration_since(*at) < self.resend_within);
            before - state.reports.len()
        };
        self.counters.drop(reason, expired as u64);
    }

    /// Keeps at most `max_outstanding` reports, dropping (and counting) the oldest. Acks answer
    /// reports in the order sent, so once reports leave from the front the stream's acks no
    /// longer line up with them: it is replaced, and what remains is sent again.
    fn trim(&self) {
        let over = {
            let mut state = lock(&self.outstanding);
            let over = state.reports.len().saturating_sub(self.max_outstanding);
            if over > 0 {
                state.reports.drain(..over);
                state.stream += 1;
                state.over = true;
            }
            over
        };
        self.counters.drop("send_failed", over as u64);
    }
}

/// Whether `status` refuses a report (as ingest does, naming why), rather than failing the call.
/// `UNAVAILABLE` is not a refusal: it is how a replica that does not lead (any more) answers
/// forwarded reports, which then wait, outstanding, for the next leader.
fn is_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
    )
}

/// Reads one stream's acknowledgements: each takes the oldest outstanding report as forwarded.
struct Acknowledgements {
    uri: String,
    stream_id: u64,
    outstanding: Arc<Mutex<Outstanding>>,
    refresh: Arc<Notify>,
    counters: ForwardCounters,
    timeout: Duration,
}

impl Acknowledgements {
    /// `opened` is `None` when opening timed out.
    async fn read(
        self,
        opened: Option<
            Result<tonic::Response<tonic::Streaming<v1::ReportResponse>>, tonic::Status>,
        >,
    ) {
        let uri = &self.uri;
        let mut acks = match opened {
            None => {
                self.warn_once(&"no answer in time");
                return self.end("opening the stream timed out");
            }
            Some(Err(status)) => {
                self.warn_once(&status);
                return self.end("opening the stream failed");
            }
            Some(Ok(response)) => response.into_inner(),
        };
        loop {
            match tokio::time::timeout(self.timeout, acks.message()).await {
                Ok(Ok(Some(_))) => {
                    let mut state = lock(&self.outstanding);
                    state.warned = false;
                    // An ack for a stream already replaced: the report is being sent again
                    // and counts when the new stream acknowledges it.
                    // A word that a gateway's connections closed is not a report.
                    let acknowledged = (state.stream == self.stream_id)
                        .then(|| state.reports.pop_front())
                        .flatten();
                    if acknowledged.is_some_and(|(_, report)| !report.word) {
                        self.counters.forwarded.inc();
                    }
                }
                Ok(Ok(None)) => return self.end("the leader ended the stream"),
                Ok(Err(status)) => {
                    tracing::debug!(%uri, %status, "forwarding stream ended");
                    if is_refusal(&status) {
                        // The leader's answer to the oldest unacknowledged report: sending it
                        // again would only hold up the others behind it.
                        let mut state = lock(&self.outstanding);
                        if state.stream == self.stream_id && state.reports.pop_front().is_some() {
                            self.counters.drop("refused", 1);
                        }
                    }
                    return self.end("the stream failed");
                }
                Err(_) if lock(&self.outstanding).reports.is_empty() => {}
                Err(_) => return self.end("reports were not acknowledged in time"),
            }
        }
    }

    /// Says once why the leader cannot be reached (until it acknowledges a report again); the
    /// reports wait meanwhile, and are dropped and counted past [`RESEND_WITHIN`].
    fn warn_once(&self, why: &dyn std::fmt::Display) {
        let first = !std::mem::replace(&mut lock(&self.outstanding).warned, true);
        if first {
            tracing::warn!(uri = %self.uri, %why, "cannot forward reports to the leader; holding them");
        } else {
            tracing::debug!(uri = %self.uri, %why, "opening a forwarding stream failed");
        }
    }

    fn end(self, why: &str) {
        let mut state = lock(&self.outstanding);
        if state.stream != self.stream_id {
            return;
        }
        state.over = true;
        if !state.reports.is_empty() {
            tracing::debug!(uri = %self.uri, why, waiting = state.reports.len(), "forwarding stream over");
            // The holder may have changed; the next stream follows the new address.
            self.refresh.notify_one();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn report(gateway: &str, sequence: u64) -> v1::ReportRequest {
        v1::ReportRequest {
            reporter: Some(v1::Reporter {
                gateway: gateway.into(),
                process_start_unix_ms: 1,
                filter_version: "test".into(),
            }),
            sequence,
            ..Default::default()
        }
    }

    #[test]
    fn the_leader_address_is_the_part_of_its_identity_after_the_last_at() {
        assert_eq!(
            leader_uri("flyball-control-0@10.0.0.7:9090").as_deref(),
            Some("http://10.0.0.7:9090")
        );
        assert_eq!(
            leader_uri("odd@name@[fd00::7]:9090").as_deref(),
            Some("http://[fd00::7]:9090")
        );
        assert_eq!(leader_uri("flyball-control-0"), None);
        assert_eq!(leader_uri("a@10.0.0.7"), None, "a port is required");
        assert_eq!(leader_uri("a@10.0.0.7:9090/x"), None);
        assert_eq!(leader_uri("a@"), None);
        assert_eq!(
            identity("pod-a", Some("10.0.0.7:9090")),
            "pod-a@10.0.0.7:9090"
        );
        assert_eq!(identity("pod-a", None), "pod-a");
    }

    /// A follower's forwarder and lanes, with the senders of its leadership and its counters.
    struct Follower {
        forwarder: Forwarder,
        lanes: Vec<Lane>,
        counters: ForwardCounters,
        leading: watch::Sender<bool>,
        leader: watch::Sender<Option<String>>,
    }

    /// Runs the follower's lanes; returns what each holds, to see them let everything go.
    fn spawn_lanes(f: &mut Follower) -> Vec<Arc<Mutex<Outstanding>>> {
        f.lanes
            .drain(..)
            .map(|lane| {
                let outstanding = lane.outstanding.clone();
                tokio::spawn(lane.run());
                outstanding
            })
            .collect()
    }

    /// Waits (up to 10 s) until no lane holds a report: nothing is left that could be dropped
    /// (and counted) again. A lane counts a report as it lets it go from what it holds, and sends
    /// or sends again only what it holds, so once every lane holds nothing (and nothing more was
    /// offered) no later pass can count one.
    async fn let_go(lanes: &[Arc<Mutex<Outstanding>>]) {
        held_until(lanes, "no report held", |held| held == 0).await;
    }

    /// Waits (up to 10 s) until the number of reports the lanes hold satisfies `wanted`.
    async fn held_until(
        lanes: &[Arc<Mutex<Outstanding>>],
        what: &str,
        wanted: impl Fn(usize) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wanted(lanes.iter().map(|l| lock(l).reports.len()).sum()) {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn follower(leader: Option<String>, settings: ForwardSettings) -> Follower {
        let (leading_tx, leading) = watch::channel(false);
        let (leader_tx, leader) = watch::channel(leader);
        let counters = ForwardCounters::default();
        let (forwarder, lanes) = Forwarder::with_settings(
            "b",
            leading,
            leader,
            Arc::new(Notify::new()),
            counters.clone(),
            settings,
        );
        Follower {
            forwarder,
            lanes,
            counters,
            leading: leading_tx,
            leader: leader_tx,
        }
    }

    fn dropped_now(counters: &ForwardCounters, reason: &'static str) -> u64 {
        counters
            .dropped
            .get_or_create(&DroppedLabels { reason })
            .get()
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let settings = ForwardSettings {
            queue_per_lane: 2,
            ..ForwardSettings::default()
        };
        let f = follower(None, settings);
        assert!(f.forwarder.active());
        // Nothing drains the lanes: one gateway's reports all go to one lane of 2.
        for sequence in 1..=5 {
            f.forwarder.offer_report(report("gw", sequence));
        }
        assert_eq!(dropped_now(&f.counters, "queue_full"), 3);
        let queued: usize = f.lanes.iter().map(|l| l.queue.len()).sum();
        assert_eq!(queued, 2);
    }

    #[tokio::test]
    async fn reports_no_leader_is_named_for_in_time_are_dropped_and_counted_once() {
        let settings = ForwardSettings {
            resend_within: Duration::from_millis(300),
            ..ForwardSettings::default()
        };
        let mut f = follower(None, settings);
        let lanes = spawn_lanes(&mut f);
        f.forwarder.offer_report(report("gw", 1));
        f.forwarder.offer_report(report("gw", 2));
        dropped(&f.counters, "no_leader", 2).await;
        let_go(&lanes).await;
        assert_eq!(dropped_now(&f.counters, "no_leader"), 2);
        assert_eq!(f.counters.forwarded.get(), 0);
    }

    /// Waits (up to 10 s) until `reason` has counted `n` dropped reports.
    async fn dropped(counters: &ForwardCounters, reason: &'static str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while dropped_now(counters, reason) < n {
            assert!(
                Instant::now() < deadline,
                "{reason}: not {n} dropped in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A follower whose leader is at a closed port, holding reports for `resend_within`, its
    /// lanes running (what each holds beside it).
    fn unreachable_leader(resend_within: Duration) -> (Follower, Vec<Arc<Mutex<Outstanding>>>) {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let settings = ForwardSettings {
            timeout: Duration::from_millis(200),
            resend_within,
            ..ForwardSettings::default()
        };
        let mut f = follower(Some(uri), settings);
        let lanes = spawn_lanes(&mut f);
        (f, lanes)
    }

    #[tokio::test]
    async fn reports_no_leader_takes_in_time_are_dropped_and_counted_once() {
        let (f, lanes) = unreachable_leader(Duration::from_millis(300));
        for sequence in 1..=3 {
            f.forwarder.offer_report(report("gw", sequence));
        }
        dropped(&f.counters, "send_failed", 3).await;
        // Each once, however often the lane tried again.
        let_go(&lanes).await;
        assert_eq!(dropped_now(&f.counters, "send_failed"), 3);
        assert_eq!(f.counters.forwarded.get(), 0);
    }

    #[tokio::test]
    async fn reports_held_for_a_leader_are_let_go_when_this_replica_takes_the_lead() {
        let (f, lanes) = unreachable_leader(RESEND_WITHIN);
        f.forwarder.offer_report(report("gw", 1));
        f.forwarder.offer_report(report("gw", 2));
        f.leading.send(true).unwrap();
        dropped(&f.counters, "leading", 2).await;
        let_go(&lanes).await;
        assert_eq!(dropped_now(&f.counters, "leading"), 2);
        assert_eq!(dropped_now(&f.counters, "send_failed"), 0);
    }

    use flyball_proto::codec::{EncodedReport, ReceivedReport};

    /// What the fake leader was sent, as prost decodes it.
    fn decoded(encoded: EncodedReport) -> v1::ReportRequest {
        prost::Message::decode(encoded.0).expect("a report")
    }

    /// A leader that acknowledges every report and keeps what it was sent.
    #[derive(Clone, Default)]
    struct RecordingLeader {
        received: Arc<Mutex<Vec<v1::ReportRequest>>>,
    }

    #[tonic::async_trait]
    impl flyball_proto::grpc::telemetry_service_server::TelemetryService for RecordingLeader {
        async fn report(
            &self,
            request: tonic::Request<ReceivedReport>,
        ) -> Result<tonic::Response<v1::ReportResponse>, tonic::Status> {
            let report = decoded(request.into_inner().encoded);
            let acknowledged_sequence = report.sequence;
            self.received.lock().unwrap().push(report);
            Ok(tonic::Response::new(v1::ReportResponse {
                acknowledged_sequence,
            }))
        }

        type ReportStreamStream =
            futures::stream::BoxStream<'static, Result<v1::ReportResponse, tonic::Status>>;

        async fn report_stream(
            &self,
            request: tonic::Request<tonic::Streaming<ReceivedReport>>,
        ) -> Result<tonic::Response<Self::ReportStreamStream>, tonic::Status> {
            use futures::StreamExt;
            let received = self.received.clone();
            let acks = request.into_inner().map(move |report| {
                report.map(|ReceivedReport { encoded, .. }| {
                    let report = decoded(encoded);
                    let acknowledged_sequence = report.sequence;
                    received.lock().unwrap().push(report);
                    v1::ReportResponse {
                        acknowledged_sequence,
                    }
                })
            });
            Ok(tonic::Response::new(Box::pin(acks)))
        }
    }

    impl RecordingLeader {
        /// Serves on a loopback port; returns its URI.
        async fn serve(&self) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let uri = format!("http://{}", listener.local_addr().unwrap());
            let service =
                flyball_proto::grpc::telemetry_service_server::TelemetryServiceServer::new(
                    self.clone(),
                );
            tokio::spawn(
                crate::grpc_server()
                    .add_service(service)
                    .serve_with_incoming(crate::grpc_incoming(
                        listener,
                        crate::GrpcKeepalive::default(),
                    )),
            );
            uri
        }

        /// Waits (up to 10 s) for `n` reports.
        async fn wait_for(&self, n: usize) -> Vec<v1::ReportRequest> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let received = self.received.lock().unwrap().clone();
                if received.len() >= n {
                    return received;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} of {n} reports in 10 s",
                    received.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// The old leader during a hand-over (it stopped leading; the Lease still names it, so its
    /// `leader` is None), or any follower whose Lease read failed once: the reports its
    /// gateways send meanwhile must wait for the next leader, as held reports do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_taken_while_no_leader_is_named_reach_the_next_one() {
        let mut f = follower(None, ForwardSettings::default());
        let lanes = spawn_lanes(&mut f);
        f.forwarder.offer_report(report("gw", 1));
        f.forwarder.offer_report(report("gw", 2));
        // Both held for want of a leader; one poll later the Lease names the next one.
        held_until(&lanes, "both reports held", |held| held >= 2).await;
        let next = RecordingLeader::default();
        f.leader.send(Some(next.serve().await)).unwrap();
        f.forwarder.offer_report(report("gw", 3));
        next.wait_for(3).await;
        let received: Vec<u64> = next
            .received
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.sequence)
            .collect();
        assert_eq!(
            received,
            [1, 2, 3],
            "no_leader drops: {}",
            dropped_now(&f.counters, "no_leader")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_sent_again_after_a_hand_over_say_how_long_they_were_held() {
        let (f, _lanes) = unreachable_leader(RESEND_WITHIN);
        let taken = Instant::now();
        f.forwarder.offer_report(report("gw", 1));
        f.forwarder.offer_report(report("gw", 2));
        let held_at_least = Duration::from_millis(400);
        tokio::time::sleep(held_at_least).await;

        let next = RecordingLeader::default();
        f.leader.send(Some(next.serve().await)).unwrap();
        let resent = next.wait_for(2).await;
        let held_at_most = taken.elapsed();
        for report in &resent {
            let held = Duration::from_millis(report.held_ms);
            assert!(
                held >= held_at_least && held <= held_at_most,
                "report {} held {held:?}, taken {held_at_most:?} ago, at least {held_at_least:?}",
                report.sequence
            );
        }
        assert_eq!(
            resent.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            [1, 2]
        );

        // A report the open stream takes at once was not held.
        f.forwarder.offer_report(report("gw", 3));
        let all = next.wait_for(3).await;
        assert_eq!(all[2].sequence, 3);
        assert_eq!(all[2].held_ms, 0);
        assert_eq!(dropped_now(&f.counters, "send_failed"), 0);
    }
}
