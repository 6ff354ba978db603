//! Followers follow: the leader streams every report it merges to each follower, which merges it
//! too, so every replica's windows hold every gateway's load.
//!
//! leader: a report merged ([`crate::ingest`]) -> [`Replication::publish`] -> a ring of the last
//! [`BUFFER`] reports -> one `flyball.v1.ReplicationService/Follow` stream per follower, less the
//! reports that follower forwarded itself.
//! follower: [`Following::run`] -> `Follow` on the replica the Lease names -> each report merged
//! as a forwarded one ([`Telemetry::ingest_from`]; never forwarded again).
//!
//! Why: forwarding alone gives the leader the whole view and each follower only its own
//! gateways'. A follower that took the lead then sized pools on part of the load, for a stable
//! window, while the gateways of other replicas were missing from it. Following, a new leader
//! has every report the old one merged up to the moment it went, less what was on the wire:
//! gateways and followers send again what the old leader did not acknowledge, so a change of
//! leader loses at most the reports of one interval. Duplicates are harmless (ingest admits a
//! report once by reporter and sequence), so nothing needs to be exact about where a stream
//! starts or which replica a gateway's connection reaches.
//!
//! The cost is the leader sending each report once per follower, and every follower merging all
//! reports as the leader does. A follower that cannot keep up misses reports ([`BUFFER`] bounds
//! what the leader keeps for it), counted in `flyball_replication_lagged_total`; the restart hold
//! still keeps a new leader from scaling down until its stable window is full.

use std::sync::Arc;
use std::time::Duration;

use flyball_proto::grpc::replication_service_client::ReplicationServiceClient;
use flyball_proto::grpc::replication_service_server::{
    ReplicationService, ReplicationServiceServer,
};
use flyball_proto::v1;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::ingest::{Admission, Telemetry};
use crate::leader::leader_channel;
use crate::tls::GrpcTls;

/// Reports the leader keeps for followers that have not sent them on yet: a few seconds of a
/// thousand gateways, under a second of ten thousand (a follower on the same network keeps up
/// with what the leader merges; one that cannot misses reports rather than grow this).
pub const BUFFER: usize = 4096;

/// A follower opens a stream to the same leader at most this often, so a leader refusing it
/// (not leading yet, or a handshake failing) costs a call every half second, not a loop.
const REOPEN_EVERY: Duration = Duration::from_millis(500);

/// How long opening a stream to the leader may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// Replication counters, on `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ReplicationCounters {
    /// Leader: followers following now.
    pub followers: Gauge,
    /// Leader: reports a follower missed because it fell [`BUFFER`] reports behind.
    pub lagged: Counter,
    /// Follower: reports merged from the leader's stream (not counting duplicates and
    /// connections-closed words).
    pub followed: Counter,
}

/// A report the leader merged, and the replica that forwarded it, if one did.
#[derive(Debug)]
struct Published {
    report: v1::ReportRequest,
    forwarded_by: Option<Arc<str>>,
}

/// The leader's side: what it merged, for the followers following it.
#[derive(Debug)]
pub struct Replication {
    reports: broadcast::Sender<Arc<Published>>,
    leading: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
    counters: ReplicationCounters,
}

// === impl Replication ===

impl Replication {
    /// Publishes while `leading`; follow streams end when `stopping` turns true.
    pub fn new(
        leading: watch::Receiver<bool>,
        stopping: watch::Receiver<bool>,
        counters: ReplicationCounters,
    ) -> Self {
        let (reports, _) = broadcast::channel(BUFFER);
        Replication {
            reports,
            leading,
            stopping,
            counters,
        }
    }

    /// Whether a report merged now goes to followers: this replica leads and one follows it.
    /// Checked before merging, so a report is copied only when someone will read it.
    pub fn wanted(&self) -> bool {
        self.reports.receiver_count() > 0 && *self.leading.borrow()
    }

    /// Sends `report`, merged here, to every follower but the one that forwarded it.
    pub fn publish(&self, report: v1::ReportRequest, forwarded_by: Option<Arc<str>>) {
        // No receiver is not an error: nobody follows.
        let _ = self.reports.send(Arc::new(Published {
            report,
            forwarded_by,
        }));
    }

    /// The tonic server answering followers.
    pub fn into_server(self: Arc<Self>) -> ReplicationServiceServer<FollowService> {
        ReplicationServiceServer::new(FollowService { replication: self })
    }

    pub fn counters(&self) -> &ReplicationCounters {
        &self.counters
    }
}

/// `flyball.v1.ReplicationService` on the leader.
#[derive(Debug, Clone)]
pub struct FollowService {
    replication: Arc<Replication>,
}

/// One follower's stream: what it still has to be sent, and its place among the followers.
struct FollowStream {
    follower: String,
    reports: broadcast::Receiver<Arc<Published>>,
    leading: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
    counters: ReplicationCounters,
}

impl Drop for FollowStream {
    fn drop(&mut self) {
        self.counters.followers.dec();
    }
}

impl FollowStream {
    /// The next report for this follower; `None` when the stream is over (`Err` first if it
    /// ended because this replica stopped leading).
    async fn next(&mut self) -> Option<Result<v1::ReportRequest, tonic::Status>> {
        loop {
            tokio::select! {
                // Reports first: what was merged before this replica stopped leading, or before
                // the service stopped, still goes out.
                biased;
                received = self.reports.recv() => match received {
                    Ok(published) => {
                        if published.forwarded_by.as_deref() == Some(self.follower.as_str()) {
                            continue;
                        }
                        return Some(Ok(published.report.clone()));
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.counters.lagged.inc_by(missed);
                        tracing::debug!(
                            follower = %self.follower,
                            missed,
                            "a follower fell behind the leader's reports"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = stops_leading(&mut self.leading) => {
                    return Some(Err(not_leading()));
                }
                _ = self.stopping.wait_for(|stop| *stop) => return None,
            }
        }
    }
}

fn not_leading() -> tonic::Status {
    tonic::Status::unavailable("not the leader: follow the Lease holder")
}

/// The reports of one `Follow` call, in the order the leader merged them.
pub type FollowedStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::ReportRequest, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ReplicationService for FollowService {
    type FollowStream = FollowedStream;

    async fn follow(
        &self,
        request: tonic::Request<v1::FollowRequest>,
    ) -> Result<tonic::Response<FollowedStream>, tonic::Status> {
        let replication = &self.replication;
        if !*replication.leading.borrow() {
            return Err(not_leading());
        }
        let follower = request.into_inner().follower;
        tracing::info!(%follower, "a follower follows this replica's reports");
        replication.counters.followers.inc();
        let stream = FollowStream {
            follower,
            reports: replication.reports.subscribe(),
            leading: replication.leading.clone(),
            stopping: replication.stopping.clone(),
            counters: replication.counters.clone(),
        };
        let reports = futures::stream::unfold(Some(stream), |stream| async move {
            let mut stream = stream?;
            let next = stream.next().await?;
            // An error is the stream's last word.
            let stream = next.is_ok().then_some(stream);
            Some((next, stream))
        });
        Ok(tonic::Response::new(Box::pin(reports)))
    }
}

/// The follower's side: one task following whichever replica the Lease names.
#[derive(Debug)]
pub struct Following {
    /// This replica's Lease identity, as it forwards with it.
    pub identity: String,
    pub leading: watch::Receiver<bool>,
    /// The leader's gRPC URI, when known and not this replica.
    pub leader: watch::Receiver<Option<String>>,
    pub telemetry: Arc<Telemetry>,
    pub tls: Option<Arc<GrpcTls>>,
    pub counters: ReplicationCounters,
}

/// Why a stream to the leader ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("the leader address is not a URI: {0}")]
    Address(#[from] tonic::transport::Error),
    #[error("no answer within {OPEN_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Status(#[from] tonic::Status),
}

impl Following {
    /// Follows the leader while this replica does not lead, for as long as it runs.
    pub async fn run(mut self) {
        let mut last_opened: Option<(String, Instant)> = None;
        // A failure is a warning once, until a stream works again.
        let mut warned = false;
        loop {
            let uri = self.wait_for_leader().await;
            if let Some((last, at)) = &last_opened
                && *last == uri
            {
                tokio::time::sleep_until(*at + REOPEN_EVERY).await;
                if *self.leading.borrow() || self.leader.borrow().as_deref() != Some(&uri) {
                    continue;
                }
            }
            last_opened = Some((uri.clone(), Instant::now()));
            match self.follow(&uri, &mut warned).await {
                Ok(()) => tracing::debug!(%uri, "stopped following the leader"),
                Err(error) if !warned => {
                    warned = true;
                    tracing::warn!(
                        %uri,
                        %error,
                        "cannot follow the leader's reports; this replica's windows miss other \
                         replicas' gateways until it can"
                    );
                }
                Err(error) => tracing::debug!(%uri, %error, "cannot follow the leader's reports"),
            }
        }
    }

    /// The leader to follow, once this replica does not lead and the Lease names another one.
    async fn wait_for_leader(&mut self) -> String {
        loop {
            if !*self.leading.borrow()
                && let Some(uri) = self.leader.borrow().clone()
            {
                return uri;
            }
            tokio::select! {
                () = next_change(&mut self.leading) => {}
                () = next_change(&mut self.leader) => {}
            }
        }
    }

    /// Merges the reports `uri` streams until it ends, this replica leads, or the Lease names
    /// another leader.
    async fn follow(&mut self, uri: &str, warned: &mut bool) -> Result<(), Ended> {
        let channel = leader_channel(uri, self.tls.as_deref(), OPEN_TIMEOUT)?;
        let mut client = ReplicationServiceClient::new(channel)
            .max_decoding_message_size(self.telemetry.config().max_report_bytes);
        let request = v1::FollowRequest {
            follower: self.identity.clone(),
        };
        let mut reports = tokio::time::timeout(OPEN_TIMEOUT, client.follow(request))
            .await
            .map_err(|_| Ended::Timeout)??
            .into_inner();
        if std::mem::take(warned) {
            tracing::info!(%uri, "following the leader's reports again");
        }
        loop {
            tokio::select! {
                received = reports.message() => match received? {
                    Some(report) => self.take(report),
                    None => return Ok(()),
                },
                () = next_change(&mut self.leading) => {
                    if *self.leading.borrow() {
                        return Ok(());
                    }
                }
                () = next_change(&mut self.leader) => {
                    if self.leader.borrow().as_deref() != Some(uri) {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn take(&self, report: v1::ReportRequest) {
        match self.telemetry.ingest_from(report, Instant::now(), true) {
            Ok(merged) => {
                if matches!(merged.admission, Admission::Fresh { .. } | Admission::Late) {
                    self.counters.followed.inc();
                }
            }
            // Counted by ingest, as every refusal is. Rare: the leader took it under the same
            // limits, unless the replicas' flags differ.
            Err(refusal) => tracing::debug!(%refusal, "a report from the leader was refused"),
        }
    }
}

/// Returns when `leading` turns false; never, once its sender is gone while true (leadership
/// set once).
async fn stops_leading(leading: &mut watch::Receiver<bool>) {
    if leading.wait_for(|leading| !*leading).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Returns when `value` changes; never, once its sender is gone (the value is then fixed, as
/// with leadership set once by a test or another election).
async fn next_change<T>(value: &mut watch::Receiver<T>) {
    if value.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn report(gateway: &str, sequence: u64) -> v1::ReportRequest {
        v1::ReportRequest {
            reporter: Some(v1::Reporter {
                gateway: gateway.into(),
                process_start_unix_ms: 1,
                filter_version: String::new(),
            }),
            sequence,
            ..v1::ReportRequest::default()
        }
    }

    fn stream_of(replication: &Replication, follower: &str) -> FollowStream {
        replication.counters.followers.inc();
        FollowStream {
            follower: follower.into(),
            reports: replication.reports.subscribe(),
            leading: replication.leading.clone(),
            stopping: replication.stopping.clone(),
            counters: replication.counters.clone(),
        }
    }

    fn sequence(next: Option<Result<v1::ReportRequest, tonic::Status>>) -> u64 {
        next.expect("a report").expect("not an error").sequence
    }

    #[tokio::test]
    async fn a_follower_gets_every_report_but_those_it_forwarded_in_order() {
        let (_leading_tx, leading) = watch::channel(true);
        let (_stop_tx, stopping) = watch::channel(false);
        let replication = Replication::new(leading, stopping, ReplicationCounters::default());
        assert!(!replication.wanted(), "nobody follows yet");
        let mut b = stream_of(&replication, "b");
        assert!(replication.wanted());
        replication.publish(report("gw-1", 1), None);
        replication.publish(report("gw-2", 1), Some("b".into()));
        replication.publish(report("gw-3", 7), Some("c".into()));
        assert_eq!(sequence(b.next().await), 1);
        assert_eq!(
            sequence(b.next().await),
            7,
            "b's own forwarded report skipped"
        );
        assert_eq!(replication.counters.followers.get(), 1);
        drop(b);
        assert_eq!(replication.counters.followers.get(), 0);
        assert!(!replication.wanted());
    }

    #[tokio::test]
    async fn a_follower_too_far_behind_misses_the_oldest_reports_and_they_are_counted() {
        let (_leading_tx, leading) = watch::channel(true);
        let (_stop_tx, stopping) = watch::channel(false);
        let replication = Replication::new(leading, stopping, ReplicationCounters::default());
        let mut b = stream_of(&replication, "b");
        let extra = 10;
        for sequence in 1..=(BUFFER as u64 + extra) {
            replication.publish(report("gw", sequence), None);
        }
        assert_eq!(sequence(b.next().await), extra + 1);
        assert_eq!(replication.counters.lagged.get(), extra);
    }

    #[tokio::test]
    async fn the_stream_ends_unavailable_when_the_leader_stops_leading() {
        let (leading_tx, leading) = watch::channel(true);
        let (_stop_tx, stopping) = watch::channel(false);
        let replication = Replication::new(leading, stopping, ReplicationCounters::default());
        let mut b = stream_of(&replication, "b");
        leading_tx.send(false).unwrap();
        assert!(!replication.wanted(), "a follower publishes nothing");
        let status = b.next().await.expect("a last word").unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    /// Leadership set once (a test's, or another election's that keeps no sender): the stream
    /// goes on; a closed channel is not a change of leader.
    #[tokio::test]
    async fn leadership_fixed_for_good_keeps_the_stream_going() {
        let (leading_tx, leading) = watch::channel(true);
        let (_stop_tx, stopping) = watch::channel(false);
        let replication = Replication::new(leading, stopping, ReplicationCounters::default());
        let mut b = stream_of(&replication, "b");
        drop(leading_tx);
        let next = tokio::spawn(async move { b.next().await.map(|r| r.map(|r| r.sequence)) });
        tokio::task::yield_now().await;
        replication.publish(report("gw", 3), None);
        assert_eq!(next.await.unwrap().unwrap().unwrap(), 3);
    }

    #[tokio::test]
    async fn the_stream_ends_when_the_service_stops() {
        let (_leading_tx, leading) = watch::channel(true);
        let (stop_tx, stopping) = watch::channel(false);
        let replication = Replication::new(leading, stopping, ReplicationCounters::default());
        let mut b = stream_of(&replication, "b");
        stop_tx.send(true).unwrap();
        assert!(b.next().await.is_none());
    }
}
