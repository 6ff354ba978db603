//! Followers follow: the leader streams every report it merges to each follower, which merges it
//! too, so every replica's windows hold every gateway's load.
//!
//! leader: a report merged ([`crate::ingest`]) -> [`Replication::publish`] -> the reports of the
//! last [`RETAIN`] (at most [`RETAIN_BYTES`]) -> one `flyball.v1.ReplicationService/Follow`
//! stream per follower, starting with what is kept, less the reports that follower forwarded
//! itself.
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
//! A stream starts with what the leader kept, not with what comes next: a follower that starts
//! following late (the Lease was read a few seconds after the hand-over, or the follower
//! restarted) still gets what was merged meanwhile, and so do the reports a new leader took while
//! it followed and could not pass on (no leader took them during the hand-over): it keeps them
//! for its followers when it takes the lead ([`crate::forward`]). Reports a follower has already
//! are merged once, as every resend is.
//!
//! The cost is the leader keeping a copy of each report for [`RETAIN`], sending each once per
//! follower, and every follower merging all reports as the leader does. A follower that falls
//! behind what is kept misses reports, counted in `flyball_replication_lagged_total`; the
//! restart hold still keeps a new leader from scaling down until its stable window is full.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flyball_proto::codec::EncodedReport;
use flyball_proto::grpc::replication_service_client::ReplicationServiceClient;
use flyball_proto::grpc::replication_service_server::{
    ReplicationService, ReplicationServiceServer,
};
use flyball_proto::v1;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::ingest::{Admission, MALFORMED, Telemetry};
use crate::leader::leader_channel;
use crate::tls::GrpcTls;

/// How long the leader keeps what it merged, for followers: longer than a hand-over of the
/// Lease (15 s by default, then the followers' next read of its holder), so that a follower
/// starting to follow a new leader gets what it merged since it took the lead.
pub const RETAIN: Duration = Duration::from_secs(30);

/// And at most this much of it (reports are kept encoded, as they go out): all of [`RETAIN`] at
/// a thousand reports a second of about 1 KB (a thousand gateways at 1 Hz, a few keys each),
/// about 3 s at ten thousand (a follower on the same network keeps up with what the leader
/// merges; one that cannot misses reports rather than grow this).
pub const RETAIN_BYTES: usize = 32 * 1024 * 1024;

/// What keeping one report costs beside its bytes (its entry, the shared buffer's header).
const KEPT_OVERHEAD_BYTES: usize = 128;

/// Follow streams the leader serves at once. Each costs a copy of every report, so the port's
/// other clients (any gateway can reach it) must not be able to multiply that without bound;
/// flyball runs two or three replicas.
pub const MAX_FOLLOWERS: usize = 16;

/// A `FollowRequest` is a name; anything larger is not one.
const MAX_FOLLOW_REQUEST_BYTES: usize = 4 * 1024;

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
    /// Leader: reports a follower missed because it fell behind what is kept.
    pub lagged: Counter,
    /// Follower: reports merged from the leader's stream (not counting duplicates and
    /// connections-closed words).
    pub followed: Counter,
}

/// A report the leader merged, and the replica that forwarded it, if one did.
#[derive(Debug)]
struct Published {
    report: EncodedReport,
    /// Its `held_ms` when merged: what it waited before it reached the leader.
    held_ms: u64,
    forwarded_by: Option<Arc<str>>,
}

/// What the leader merged lately, oldest first.
#[derive(Debug, Default)]
struct Kept {
    reports: VecDeque<KeptReport>,
    /// The position of `reports[0]` among all reports ever kept.
    first: u64,
    bytes: usize,
}

#[derive(Debug)]
struct KeptReport {
    at: Instant,
    bytes: usize,
    published: Arc<Published>,
}

impl Kept {
    fn next(&self) -> u64 {
        self.first + self.reports.len() as u64
    }

    fn push(&mut self, published: Published, now: Instant) {
        let bytes = published.report.len() + KEPT_OVERHEAD_BYTES;
        self.bytes += bytes;
        self.reports.push_back(KeptReport {
            at: now,
            bytes,
            published: Arc::new(published),
        });
        self.trim(now);
    }

    /// Lets go of what is older than [`RETAIN`], and the oldest beyond [`RETAIN_BYTES`].
    fn trim(&mut self, now: Instant) {
        while let Some(oldest) = self.reports.front()
            && (self.bytes > RETAIN_BYTES || now.saturating_duration_since(oldest.at) > RETAIN)
        {
            self.bytes -= oldest.bytes;
            self.first += 1;
            self.reports.pop_front();
        }
    }
}

/// The leader's side: what it merged, for the followers following it.
#[derive(Debug)]
pub struct Replication {
    kept: Mutex<Kept>,
    /// Wakes the follow streams when a report is kept.
    published: Arc<Notify>,
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
        Replication {
            kept: Mutex::default(),
            published: Arc::new(Notify::new()),
            leading,
            stopping,
            counters,
        }
    }

    /// Whether a report merged now is kept for followers: this replica leads. Checked before
    /// merging, so a follower copies nothing.
    pub fn wanted(&self) -> bool {
        *self.leading.borrow()
    }

    /// Keeps `report`, merged here, for every follower but the one that forwarded it.
    pub fn publish(&self, report: &v1::ReportRequest, forwarded_by: Option<Arc<str>>) {
        self.keep(EncodedReport::encode(report), report.held_ms, forwarded_by);
    }

    /// As [`Replication::publish`], for a report encoded already (before ingest took it), whose
    /// `held_ms` was `held_ms`.
    pub fn keep(&self, report: EncodedReport, held_ms: u64, forwarded_by: Option<Arc<str>>) {
        let published = Published {
            report,
            held_ms,
            forwarded_by,
        };
        self.lock().push(published, Instant::now());
        self.published.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Plain data: a panic elsewhere cannot leave it half-updated.
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The tonic server answering followers.
    pub fn into_server(self: Arc<Self>) -> ReplicationServiceServer<FollowService> {
        ReplicationServiceServer::new(FollowService { replication: self })
            .max_decoding_message_size(MAX_FOLLOW_REQUEST_BYTES)
    }

    pub fn counters(&self) -> &ReplicationCounters {
        &self.counters
    }

    /// A stream of what is merged from now on for `follower`, if there is room for one more.
    fn stream_for(self: &Arc<Self>, follower: String) -> Result<FollowStream, tonic::Status> {
        if follower.len() > flyball_proto::MAX_NAME_BYTES {
            return Err(tonic::Status::invalid_argument(format!(
                "follower: {} bytes, at most {}",
                follower.len(),
                flyball_proto::MAX_NAME_BYTES
            )));
        }
        // Counted and checked at once, so that followers coming together cannot pass the bound.
        if self.counters.followers.inc() >= MAX_FOLLOWERS as i64 {
            self.counters.followers.dec();
            return Err(tonic::Status::resource_exhausted(format!(
                "{MAX_FOLLOWERS} followers follow this replica already"
            )));
        }
        tracing::info!(%follower, "a follower follows this replica's reports");
        let first = {
            let mut kept = self.lock();
            // A replica that led before keeps what it merged then: not for a term that ended
            // longer ago than RETAIN.
            kept.trim(Instant::now());
            kept.first
        };
        Ok(FollowStream {
            follower,
            replication: self.clone(),
            // Everything kept: what was merged before this follower came is new to it too.
            next: first,
            leading: self.leading.clone(),
            stopping: self.stopping.clone(),
            counters: self.counters.clone(),
        })
    }
}

/// `flyball.v1.ReplicationService` on the leader.
#[derive(Debug, Clone)]
pub struct FollowService {
    replication: Arc<Replication>,
}

/// One follower's stream: where it is in what the leader kept.
struct FollowStream {
    follower: String,
    replication: Arc<Replication>,
    /// The position of the next report to send.
    next: u64,
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
    async fn next(&mut self) -> Option<Result<EncodedReport, tonic::Status>> {
        loop {
            // Registered before looking, so a report kept after the look wakes it.
            let published = self.replication.published.clone();
            let kept_one = published.notified();
            tokio::pin!(kept_one);
            kept_one.as_mut().enable();
            if let Some(report) = self.take_kept() {
                return Some(Ok(report));
            }
            // Reports first: what was merged before this replica stopped leading, or before the
            // service stopped, still goes out.
            let last_word = tokio::select! {
                biased;
                () = kept_one => continue,
                () = stops_leading(&mut self.leading) => Some(Err(not_leading())),
                _ = self.stopping.wait_for(|stop| *stop) => None,
            };
            if self.all_sent() {
                return last_word;
            }
        }
    }

    /// Whether every report kept has been sent (or skipped).
    fn all_sent(&self) -> bool {
        self.replication.lock().next() <= self.next
    }

    /// The next kept report for this follower, if there is one; counts what it fell behind.
    fn take_kept(&mut self) -> Option<EncodedReport> {
        let mut kept = self.replication.lock();
        let now = Instant::now();
        kept.trim(now);
        if self.next < kept.first {
            let missed = kept.first - self.next;
            self.counters.lagged.inc_by(missed);
            tracing::debug!(
                follower = %self.follower,
                missed,
                "a follower fell behind the leader's reports"
            );
            self.next = kept.first;
        }
        while let Some(entry) = kept.reports.get((self.next - kept.first) as usize) {
            self.next += 1;
            let published = &entry.published;
            if published.forwarded_by.as_deref() == Some(self.follower.as_str()) {
                continue;
            }
            // Kept a while (a follower that came late, or caught up): the follower places it
            // where the leader did, not as a burst of now.
            let kept_ms = u64::try_from(now.saturating_duration_since(entry.at).as_millis())
                .unwrap_or(u64::MAX);
            return Some(if kept_ms == 0 {
                published.report.clone()
            } else {
                published
                    .report
                    .with_held_ms(published.held_ms.saturating_add(kept_ms))
            });
        }
        None
    }
}

fn not_leading() -> tonic::Status {
    tonic::Status::unavailable("not the leader: follow the Lease holder")
}

/// The reports of one `Follow` call, in the order the leader merged them.
pub type FollowedStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<EncodedReport, tonic::Status>> + Send>>;

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
        let stream = replication.stream_for(follower)?;
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
    /// Asks for the Lease to be read again (the replica it names may no longer lead).
    pub refresh: Arc<Notify>,
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
            let followed = self.follow(&uri, &mut warned).await;
            if followed.is_err() {
                self.refresh.notify_one();
            }
            match followed {
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
                // What arrived is merged before a change of leader ends the stream.
                biased;
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

    fn take(&self, report: EncodedReport) {
        let report = match report.decode() {
            Ok(report) => report,
            Err(error) => {
                self.telemetry.count_refusal(MALFORMED);
                tracing::debug!(%error, "a report from the leader could not be decoded");
                return;
            }
        };
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

    /// A replication leading (as `leading` says, with the sender kept by the caller) and its
    /// stop switch.
    fn replication(leading: watch::Receiver<bool>) -> (Arc<Replication>, watch::Sender<bool>) {
        let (stop, stopping) = watch::channel(false);
        let replication = Replication::new(leading, stopping, ReplicationCounters::default());
        (Arc::new(replication), stop)
    }

    fn stream_of(replication: &Arc<Replication>, follower: &str) -> FollowStream {
        replication.stream_for(follower.into()).unwrap()
    }

    fn sequence(next: Option<Result<EncodedReport, tonic::Status>>) -> u64 {
        next.expect("a report")
            .expect("not an error")
            .decode()
            .expect("a report")
            .sequence
    }

    #[tokio::test]
    async fn a_follower_gets_every_report_but_those_it_forwarded_in_order() {
        let (_leading_tx, leading) = watch::channel(true);
        let (replication, _stop) = replication(leading);
        assert!(replication.wanted());
        let mut b = stream_of(&replication, "b");
        replication.publish(&report("gw-1", 1), None);
        replication.publish(&report("gw-2", 1), Some("b".into()));
        replication.publish(&report("gw-3", 7), Some("c".into()));
        assert_eq!(sequence(b.next().await), 1);
        assert_eq!(
            sequence(b.next().await),
            7,
            "b's own forwarded report skipped"
        );
        assert_eq!(replication.counters.followers.get(), 1);
        drop(b);
        assert_eq!(replication.counters.followers.get(), 0);
    }

    /// A follower that comes after reports were merged (it read the Lease late, or restarted)
    /// gets them too, from what the leader kept.
    #[tokio::test]
    async fn a_follower_starts_with_what_the_leader_kept() {
        let (_leading_tx, leading) = watch::channel(true);
        let (replication, _stop) = replication(leading);
        replication.publish(&report("gw", 1), None);
        replication.publish(&report("gw", 2), None);
        let mut late = stream_of(&replication, "late");
        assert_eq!(sequence(late.next().await), 1);
        assert_eq!(sequence(late.next().await), 2);
        let waiting = tokio::spawn(async move { sequence(late.next().await) });
        tokio::task::yield_now().await;
        replication.publish(&report("gw", 3), None);
        assert_eq!(waiting.await.unwrap(), 3);
    }

    /// What is kept is bounded by age (and size): reports older than `RETAIN` are gone, and a
    /// follower that had not been sent them counts them missed.
    #[tokio::test(start_paused = true)]
    async fn reports_older_than_retain_are_dropped_and_counted_for_a_follower_behind() {
        let (_leading_tx, leading) = watch::channel(true);
        let (replication, _stop) = replication(leading);
        let mut b = stream_of(&replication, "b");
        for sequence in 1..=10 {
            replication.publish(&report("gw", sequence), None);
        }
        tokio::time::advance(RETAIN + Duration::from_secs(1)).await;
        replication.publish(&report("gw", 11), None);
        assert_eq!(replication.lock().reports.len(), 1);
        assert_eq!(sequence(b.next().await), 11);
        assert_eq!(replication.counters.lagged.get(), 10);
        // A late follower gets only what is kept.
        let mut late = stream_of(&replication, "late");
        assert_eq!(sequence(late.next().await), 11);
        assert_eq!(replication.counters.lagged.get(), 10);
    }

    #[test]
    fn what_is_kept_is_bounded_by_size() {
        let mut kept = Kept::default();
        let now = Instant::now();
        let big = || Published {
            report: EncodedReport::encode(&v1::ReportRequest {
                reporter: Some(v1::Reporter {
                    gateway: "g".repeat(1024 * 1024),
                    ..v1::Reporter::default()
                }),
                ..v1::ReportRequest::default()
            }),
            held_ms: 0,
            forwarded_by: None,
        };
        for _ in 0..40 {
            kept.push(big(), now);
        }
        assert!(kept.bytes <= RETAIN_BYTES, "{}", kept.bytes);
        assert!(kept.reports.len() >= 30, "{}", kept.reports.len());
        assert_eq!(kept.first + kept.reports.len() as u64, 40);
    }

    #[tokio::test]
    async fn the_stream_ends_unavailable_when_the_leader_stops_leading_once_sent() {
        let (leading_tx, leading) = watch::channel(true);
        let (replication, _stop) = replication(leading);
        let mut b = stream_of(&replication, "b");
        replication.publish(&report("gw", 1), None);
        leading_tx.send(false).unwrap();
        assert!(!replication.wanted(), "a follower keeps nothing");
        assert_eq!(sequence(b.next().await), 1, "what was kept still goes");
        let status = b.next().await.expect("a last word").unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn followers_are_bounded_and_named_by_a_name() {
        let (_leading_tx, leading) = watch::channel(true);
        let (replication, _stop) = replication(leading);
        let streams: Vec<_> = (0..MAX_FOLLOWERS)
            .map(|i| stream_of(&replication, &format!("f-{i}")))
            .collect();
        let refused = replication.stream_for("one-more".into()).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        drop(streams);
        assert_eq!(replication.counters.followers.get(), 0);
        let long = "x".repeat(flyball_proto::MAX_NAME_BYTES + 1);
        let refused = replication.stream_for(long).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().starts_with("follower:"), "{refused}");
        assert!(replication.stream_for("f".into()).is_ok());
    }

    /// Leadership set once (a test's, or another election's that keeps no sender): the stream
    /// goes on; a closed channel is not a change of leader.
    #[tokio::test]
    async fn leadership_fixed_for_good_keeps_the_stream_going() {
        let (leading_tx, leading) = watch::channel(true);
        let (replication, _stop) = replication(leading);
        let mut b = stream_of(&replication, "b");
        drop(leading_tx);
        let next = tokio::spawn(async move { sequence(b.next().await) });
        tokio::task::yield_now().await;
        replication.publish(&report("gw", 3), None);
        assert_eq!(next.await.unwrap(), 3);
    }

    #[tokio::test]
    async fn the_stream_ends_when_the_service_stops() {
        let (_leading_tx, leading) = watch::channel(true);
        let (replication, stop) = replication(leading);
        let mut b = stream_of(&replication, "b");
        stop.send(true).unwrap();
        assert!(b.next().await.is_none());
    }
}
