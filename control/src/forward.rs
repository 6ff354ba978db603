//! Followers forward: a follower merges each report it receives AND sends it, unchanged, to the
//! leader.
//!
//! report at a follower -> [`Forwarder::offer`] (bounded queue; full: dropped and counted) ->
//! one of [`LANES`] tasks -> a message on that lane's `TelemetryService/ReportStream` to the
//! leader's advertised address, opened with [`FORWARDED_BY`] so its reports are never forwarded
//! again. A lane sends without waiting for each acknowledgement (the leader acknowledges in
//! order, and HTTP/2 flow control bounds what is outstanding), so its throughput is not one report
//! per round trip; it counts a report forwarded when the leader acknowledges it.
//!
//! Why forward rather than have gateways find the leader: gateways reach the control service
//! through its Kubernetes Service, which spreads their connections over every replica, and a
//! gateway knows nothing of leases. Rather than teach each gateway to chase the leader, every
//! replica takes every report it is given, merges it into its own windows, and a follower passes
//! it on. A follower's windows hold only its own gateways' reports (nothing comes back from the
//! leader), so a follower that becomes leader starts on partial windows: the restart hold keeps
//! it from scaling down for a stable window, and it scales up only on load it has seen. Reports
//! other followers forward to a leader that died are lost until its Lease expires (counted as
//! dropped). Forwarding is idempotent because the leader admits
//! reports by (reporter, sequence) as ingest always does: a report that reaches it twice (sent
//! directly and forwarded) is merged once. What it cannot undo is order: a forwarded report
//! that arrives after a newer one from the same gateway sent directly is taken as a resend and
//! dropped, which only happens while a gateway's connection moves between replicas.
//!
//! The leader's address comes from the Lease: a holder identity `name@host:port` (see
//! [`identity`]) names where its gRPC server listens. Forwarding never blocks ingest: reports
//! wait in a bounded queue per lane, and when the queue is full, when no leader is known or when
//! the leader does not answer, the report is dropped and counted in
//! `flyball_forward_dropped_total{reason}`. Lanes are chosen by gateway so one gateway's reports
//! keep their order.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flyball_proto::grpc::telemetry_service_client::TelemetryServiceClient;
use flyball_proto::v1;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

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
/// open, before it counts as failed (and the reports it holds as dropped).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Forwarding counters, on `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ForwardCounters {
    pub forwarded: Counter,
    pub dropped: Family<DroppedLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `queue_full`, `no_leader` or `send_failed`.
    pub reason: &'static str,
}

/// The follower's side of forwarding, shared by every ingest call.
#[derive(Debug)]
pub struct Forwarder {
    lanes: Vec<mpsc::Sender<v1::ReportRequest>>,
    leading: watch::Receiver<bool>,
    hasher: RandomState,
    counters: ForwardCounters,
}

/// One sending task; run it with [`Lane::run`].
#[derive(Debug)]
pub struct Lane {
    queue: mpsc::Receiver<v1::ReportRequest>,
    leader: watch::Receiver<Option<String>>,
    refresh: Arc<Notify>,
    identity: String,
    counters: ForwardCounters,
    timeout: Duration,
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
    pub fn new(
        identity: &str,
        leading: watch::Receiver<bool>,
        leader: watch::Receiver<Option<String>>,
        refresh: Arc<Notify>,
        counters: ForwardCounters,
    ) -> (Self, Vec<Lane>) {
        Self::with_capacity(
            identity,
            leading,
            leader,
            refresh,
            counters,
            QUEUE_PER_LANE,
            SEND_TIMEOUT,
        )
    }

    pub fn with_capacity(
        identity: &str,
        leading: watch::Receiver<bool>,
        leader: watch::Receiver<Option<String>>,
        refresh: Arc<Notify>,
        counters: ForwardCounters,
        queue_per_lane: usize,
        timeout: Duration,
    ) -> (Self, Vec<Lane>) {
        let mut senders = Vec::with_capacity(LANES);
        let mut lanes = Vec::with_capacity(LANES);
        for _ in 0..LANES {
            let (tx, rx) = mpsc::channel(queue_per_lane.max(1));
            senders.push(tx);
            lanes.push(Lane {
                queue: rx,
                leader: leader.clone(),
                refresh: refresh.clone(),
                identity: identity.to_owned(),
                counters: counters.clone(),
                timeout,
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

    /// Queues `report` for the leader; never waits.
    pub fn offer(&self, report: v1::ReportRequest) {
        let gateway = report
            .reporter
            .as_ref()
            .map(|r| r.gateway.as_str())
            .unwrap_or_default();
        let lane = (self.hasher.hash_one(gateway) % self.lanes.len().max(1) as u64) as usize;
        let Some(lane) = self.lanes.get(lane) else {
            return;
        };
        match lane.try_reserve() {
            Ok(permit) => permit.send(report),
            Err(_) => self.drop_report("queue_full"),
        }
    }

    fn drop_report(&self, reason: &'static str) {
        self.counters
            .dropped
            .get_or_create(&DroppedLabels { reason })
            .inc();
    }

    pub fn counters(&self) -> &ForwardCounters {
        &self.counters
    }
}

// === impl Lane ===

/// A lane's open stream to one leader.
#[derive(Debug)]
struct LeaderStream {
    uri: String,
    reports: mpsc::Sender<v1::ReportRequest>,
    state: Arc<Mutex<StreamState>>,
}

/// Shared by a lane and the task reading its stream's acknowledgements. Each report handed to
/// the stream is counted once: forwarded when acknowledged, or dropped when the stream ends
/// without acknowledging it. Once `over`, the lane hands the stream nothing more, so the count
/// the reading task takes at the end is final.
#[derive(Debug, Default)]
struct StreamState {
    unacked: u64,
    over: bool,
}

impl LeaderStream {
    /// Counts one more report on this stream, unless it is over.
    fn take_one(&self) -> bool {
        let mut state = lock(&self.state);
        if !state.over {
            state.unacked += 1;
        }
        !state.over
    }
}

fn lock(state: &Mutex<StreamState>) -> std::sync::MutexGuard<'_, StreamState> {
    // Counters only: a panic elsewhere cannot leave them half-updated.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Lane {
    /// Sends queued reports until every [`Forwarder`] handle is gone.
    pub async fn run(mut self) {
        let mut stream: Option<LeaderStream> = None;
        while let Some(report) = self.queue.recv().await {
            let Some(uri) = self.leader.borrow().clone() else {
                self.drop_report("no_leader");
                continue;
            };
            // Replacing a stream ends the old one once the leader has what was sent on it; its
            // reading task counts how that went.
            if !stream
                .as_ref()
                .is_some_and(|s| s.uri == uri && s.take_one())
            {
                stream = self.open(uri);
                if !stream.as_ref().is_some_and(LeaderStream::take_one) {
                    self.drop_report("no_leader");
                    continue;
                }
            }
            let Some(open) = stream.as_ref() else {
                continue;
            };
            let sent = tokio::time::timeout(self.timeout, open.reports.send(report)).await;
            if !matches!(sent, Ok(Ok(()))) {
                // The stream took nothing for a whole timeout, or is gone: the report counts as
                // unacknowledged on it, and the next report opens another.
                tracing::debug!(uri = %open.uri, "forwarding stream stalled; reopening");
                lock(&open.state).over = true;
            }
        }
    }

    /// Opens a stream to `uri` (in the background: the lane never waits for a connection).
    fn open(&self, uri: String) -> Option<LeaderStream> {
        let endpoint = match Endpoint::from_shared(uri.clone()) {
            Ok(endpoint) => endpoint,
            Err(error) => {
                tracing::warn!(%uri, %error, "leader address is not a URI; not forwarding");
                return None;
            }
        };
        let channel = endpoint
            .connect_timeout(self.timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Ok(value) = self.identity.parse() {
            request.metadata_mut().insert(FORWARDED_BY, value);
        }
        let stream = LeaderStream {
            uri: uri.clone(),
            reports: tx,
            state: Arc::default(),
        };
        let acks = Acknowledgements {
            uri,
            state: stream.state.clone(),
            refresh: self.refresh.clone(),
            counters: self.counters.clone(),
            timeout: self.timeout,
        };
        let mut grpc = TelemetryServiceClient::new(channel);
        tokio::spawn(async move {
            let opened = tokio::time::timeout(acks.timeout, grpc.report_stream(request)).await;
            acks.read(opened.ok()).await;
        });
        Some(stream)
    }

    fn drop_report(&self, reason: &'static str) {
        self.counters
            .dropped
            .get_or_create(&DroppedLabels { reason })
            .inc();
    }
}

/// Reads one stream's acknowledgements, counting each report forwarded.
struct Acknowledgements {
    uri: String,
    state: Arc<Mutex<StreamState>>,
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
        let failed = match opened {
            None => true,
            Some(Err(status)) => {
                tracing::debug!(%uri, %status, "opening a forwarding stream failed");
                true
            }
            Some(Ok(response)) => {
                let mut acks = response.into_inner();
                loop {
                    match tokio::time::timeout(self.timeout, acks.message()).await {
                        Ok(Ok(Some(_))) => {
                            let mut state = lock(&self.state);
                            state.unacked = state.unacked.saturating_sub(1);
                            self.counters.forwarded.inc();
                        }
                        // The lane closed the stream, or the leader ended it.
                        Ok(Ok(None)) => break lock(&self.state).unacked > 0,
                        Ok(Err(status)) => {
                            tracing::debug!(%uri, %status, "forwarding stream ended");
                            break true;
                        }
                        Err(_) if lock(&self.state).unacked == 0 => {}
                        Err(_) => {
                            tracing::debug!(%uri, "forwarded reports not acknowledged in time");
                            break true;
                        }
                    }
                }
            }
        };
        let lost = {
            let mut state = lock(&self.state);
            state.over = true;
            std::mem::take(&mut state.unacked)
        };
        if lost > 0 {
            self.counters
                .dropped
                .get_or_create(&DroppedLabels {
                    reason: "send_failed",
                })
                .inc_by(lost);
        }
        if failed {
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

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (_leading_tx, leading) = watch::channel(false);
        let (_leader_tx, leader) = watch::channel(None);
        let counters = ForwardCounters::default();
        let (forwarder, lanes) = Forwarder::with_capacity(
            "b",
            leading,
            leader,
            Arc::new(Notify::new()),
            counters.clone(),
            2,
            SEND_TIMEOUT,
        );
        assert!(forwarder.active());
        // Nothing drains the lanes: one gateway's reports all go to one lane of 2.
        for sequence in 1..=5 {
            forwarder.offer(report("gw", sequence));
        }
        let full = DroppedLabels {
            reason: "queue_full",
        };
        assert_eq!(counters.dropped.get_or_create(&full).get(), 3);
        let queued: usize = lanes.iter().map(|l| l.queue.len()).sum();
        assert_eq!(queued, 2);
    }

    #[tokio::test]
    async fn without_a_known_leader_reports_are_dropped_and_counted() {
        let (_leading_tx, leading) = watch::channel(false);
        let (_leader_tx, leader) = watch::channel(None);
        let counters = ForwardCounters::default();
        let (forwarder, lanes) = Forwarder::new(
            "b",
            leading,
            leader,
            Arc::new(Notify::new()),
            counters.clone(),
        );
        forwarder.offer(report("gw", 1));
        forwarder.offer(report("gw", 2));
        drop(forwarder);
        for lane in lanes {
            lane.run().await;
        }
        let none = DroppedLabels {
            reason: "no_leader",
        };
        assert_eq!(counters.dropped.get_or_create(&none).get(), 2);
        assert_eq!(counters.forwarded.get(), 0);
    }
}
