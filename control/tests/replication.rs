//! Followers follow: control services on loopback, gateways reporting over real gRPC to
//! different replicas, and every replica's totals read back from its real HTTP server. A follower
//! holds every gateway's load, not only its own gateways', so a change of leader, by stepping
//! down or by a crash, leaves the next leader the whole view.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use flyball_proto::codec::ReceivedReport;
use flyball_proto::grpc::telemetry_service_server::{TelemetryService, TelemetryServiceServer};
use flyball_proto::v1;
use flyball_relay::Relay;
use support::{Error, ONE_POOL, client, fixed, report, totals};
use tokio::sync::watch;

/// Long enough for loopback, short enough to fail fast.
const WAIT: Duration = Duration::from_secs(10);

/// What `support::report(_, _, ok)` adds to the totals.
fn report_totals(ok: u64) -> (u64, u64, u64, u64) {
    (ok + 1, 1, 100 * ok, 7 * ok)
}

fn add(a: (u64, u64, u64, u64), b: (u64, u64, u64, u64)) -> (u64, u64, u64, u64) {
    (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3)
}

/// `gateways` gateways named `{prefix}-{g}`, 25 reports each, to `uri`; what they sent.
async fn report_all(
    uri: String,
    prefix: &str,
    gateways: u64,
) -> Result<(u64, u64, u64, u64), Error> {
    let mut tasks = Vec::new();
    for g in 0..gateways {
        let mut grpc = client(uri.clone()).await?;
        let gateway = format!("{prefix}-{g}");
        tasks.push(tokio::spawn(async move {
            let mut sent = (0, 0, 0, 0);
            for sequence in 1..=25u64 {
                let ok = 1 + (g + sequence) % 4;
                grpc.report(report(&gateway, sequence, ok)).await.unwrap();
                sent = add(sent, report_totals(ok));
            }
            sent
        }));
    }
    let mut sent = (0, 0, 0, 0);
    for task in tasks {
        sent = add(sent, task.await?);
    }
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_holds_every_gateways_load_whichever_replica_it_reports_to()
-> Result<(), Error> {
    let leader = support::bind(ONE_POOL, &[]).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::spawn(leader.with_leadership(a))?;
    let (b, _b_leading, _b_leader) = fixed("b", false, Some(leader_uri.clone()));
    let b = support::start_led(ONE_POOL, &[], b).await?;
    let (c, _c_leading, _c_leader) = fixed("c", false, Some(leader_uri));
    let c = support::start_led(ONE_POOL, &[], c).await?;
    // A follower has what the leader merged since it started following.
    leader
        .wait_metric("flyball_replication_followers", 2.0, WAIT)
        .await?;

    // 4 gateways on each replica, concurrently.
    let (on_a, on_b, on_c) = tokio::try_join!(
        report_all(leader.grpc_uri(), "a", 4),
        report_all(b.grpc_uri(), "b", 4),
        report_all(c.grpc_uri(), "c", 4),
    )?;
    let sent = add(add(on_a, on_b), on_c);
    for replica in [&leader, &b, &c] {
        replica
            .wait_metric("flyball_ingest_reports_total", 300.0, WAIT)
            .await?;
        assert_eq!(totals(&replica.pools().await?), sent);
    }
    for follower in [&b, &c] {
        // Its own 100 it merged as they came, and the others' 200 from the leader, each once:
        // the leader does not send a follower back what it forwarded.
        assert_eq!(
            follower
                .metric("flyball_replication_followed_total")
                .await?,
            Some(200.0)
        );
        assert_eq!(
            follower.metric("flyball_ingest_duplicates_total").await?,
            Some(0.0)
        );
        assert_eq!(follower.pools().await?["leading"], false);
    }
    assert_eq!(
        leader.metric("flyball_replication_lagged_total").await?,
        Some(0.0)
    );
    leader.stop().await?;
    b.stop().await?;
    c.stop().await?;
    Ok(())
}

/// A rollout replaces the leader: it stops, the Lease goes to a follower, and what the old
/// leader acknowledged is in the new one's windows, to the last report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_steps_down_leaves_the_next_one_everything_it_merged() -> Result<(), Error> {
    let old = support::bind(ONE_POOL, &[]).await?;
    let old_uri = format!("http://{}", old.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let old = support::spawn(old.with_leadership(a))?;
    let (b, b_leading, b_leader) = fixed("b", false, Some(old_uri));
    let next = support::start_led(ONE_POOL, &[], b).await?;
    old.wait_metric("flyball_replication_followers", 1.0, WAIT)
        .await?;

    let on_old = report_all(old.grpc_uri(), "old", 6).await?;
    let on_next = report_all(next.grpc_uri(), "next", 2).await?;
    // Stopped at once, with reports perhaps still on their way to the follower.
    old.stop().await?;
    b_leader.send(None)?;
    b_leading.send(true)?;
    let sent = add(on_old, on_next);
    next.wait_metric("flyball_ingest_reports_total", 200.0, WAIT)
        .await?;
    assert_eq!(totals(&next.pools().await?), sent);
    assert_eq!(next.pools().await?["leading"], true);
    next.stop().await?;
    Ok(())
}

/// A gateway reporting every 50 ms to `first`, moving to `then` when a report to `first`
/// fails, and sending that report again there, as the filter does.
struct MovingGateway {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(u64, u64, u64, u64), Error>>,
}

impl MovingGateway {
    fn start(name: &'static str, first: String, then: String) -> MovingGateway {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut grpc = client(first).await?;
            let mut moved = false;
            let mut sent = (0, 0, 0, 0);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            for sequence in 1.. {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let ok = 1 + sequence % 3;
                while let Err(status) = grpc.report(report(name, sequence, ok)).await {
                    if moved {
                        return Err(format!("{name}: {status}").into());
                    }
                    moved = true;
                    grpc = client(then.clone()).await?;
                }
                sent = add(sent, report_totals(ok));
            }
            Ok(sent)
        });
        MovingGateway { stop, task }
    }

    /// Stops; what the control service acknowledged.
    async fn stop(self) -> Result<(u64, u64, u64, u64), Error> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// The leader's process dies with gateways reporting to it and to the follower: its gateways
/// move to the follower, which takes the Lease, and its windows miss at most one report per
/// gateway (one the old leader acknowledged and had not yet passed on when it died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_crashes_costs_the_next_one_at_most_one_report_per_gateway()
-> Result<(), Error> {
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let old = support::start_crashable(ONE_POOL, &[], a)?;
    let (b, b_leading, b_leader) = fixed("b", false, Some(old.grpc_uri()));
    let next = support::start_led(ONE_POOL, &[], b).await?;
    support::wait_metric(old.http, "flyball_replication_followers", 1.0, WAIT).await?;

    let gateways: Vec<MovingGateway> = ["gw-1", "gw-2", "gw-3"]
        .into_iter()
        .map(|name| MovingGateway::start(name, old.grpc_uri(), next.grpc_uri()))
        .chain(std::iter::once(MovingGateway::start(
            "gw-on-next",
            next.grpc_uri(),
            next.grpc_uri(),
        )))
        .collect();
    // Over a second of reports before the crash.
    support::wait_at_least(next.http, "flyball_replication_followed_total", 60.0, WAIT).await?;
    old.crash();
    // The Lease runs out and names the follower; the gateways go on, there.
    b_leader.send(None)?;
    b_leading.send(true)?;
    let at_crash = next
        .metric("flyball_ingest_reports_total")
        .await?
        .unwrap_or(0.0);
    support::wait_at_least(
        next.http,
        "flyball_ingest_reports_total",
        at_crash + 40.0,
        WAIT,
    )
    .await?;
    let mut sent = (0, 0, 0, 0);
    for gateway in gateways {
        sent = add(sent, gateway.stop().await?);
    }
    let reports_sent = sent.1;
    let kept = totals(&next.pools().await?);
    let lost_reports = reports_sent - kept.1;
    println!(
        "crash of the leader: the next leader kept {} of {reports_sent} reports ({lost_reports} \
         lost), {} of {} requests",
        kept.1, kept.0, sent.0
    );
    assert!(kept.0 <= sent.0 && kept.1 <= sent.1, "{kept:?} > {sent:?}");
    assert!(
        lost_reports <= 3,
        "lost {lost_reports} reports of 3 gateways: more than one each"
    );
    // Each report lost takes at most 4 requests (3 ok, 1 error) with it.
    assert!(sent.0 - kept.0 <= 4 * lost_reports);
    next.stop().await?;
    Ok(())
}

/// A rollout: the leader stops and gives the Lease up; while it changes hands, a gateway goes on
/// reporting to the replica that takes it next, which holds those reports for the leader to
/// come, then finds it is that leader. The other follower follows it from then on, and must have
/// those reports too: if the new leader goes next (the rolling update moves on to it), that
/// follower takes over, and must not size pools on a view short of them. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_the_next_leader_took_during_the_hand_over_reach_its_followers() -> Result<(), Error>
{
    let old = support::bind(ONE_POOL, &[]).await?;
    let old_uri = format!("http://{}", old.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let old = support::spawn(old.with_leadership(a))?;
    let next = support::bind(ONE_POOL, &[]).await?;
    let next_uri = format!("http://{}", next.grpc_addr().unwrap());
    let (b, b_leading, b_leader) = fixed("b", false, Some(old_uri.clone()));
    let next = support::spawn(next.with_leadership(b))?;
    let (c, _c_leading, c_leader) = fixed("c", false, Some(old_uri));
    let other = support::start_led(ONE_POOL, &[], c).await?;
    old.wait_metric("flyball_replication_followers", 2.0, WAIT)
        .await?;

    // The old leader goes; nobody holds the Lease for a moment.
    old.stop().await?;
    b_leader.send(None)?;
    c_leader.send(None)?;
    let mut grpc = client(next.grpc_uri()).await?;
    for sequence in 1..=5 {
        grpc.report(report("gw", sequence, 3)).await?;
    }
    // `next` takes the Lease; `other` follows it.
    b_leading.send(true)?;
    c_leader.send(Some(next_uri))?;
    next.wait_metric("flyball_replication_followers", 1.0, WAIT)
        .await?;
    for sequence in 6..=10 {
        grpc.report(report("gw", sequence, 3)).await?;
    }
    next.wait_metric("flyball_ingest_reports_total", 10.0, WAIT)
        .await?;
    let at_next = totals(&next.pools().await?);
    assert_eq!(at_next, (40, 10, 3000, 210));
    // Every report the new leader merged, in the follower's windows too.
    let waited = other
        .wait_metric("flyball_ingest_reports_total", 10.0, WAIT)
        .await;
    assert_eq!(
        totals(&other.pools().await?),
        at_next,
        "the follower of the new leader misses what it took during the hand-over ({waited:?})"
    );
    next.stop().await?;
    other.stop().await?;
    Ok(())
}

/// A leader ("a", run with `leader_flags`) and a follower ("b") following it through a
/// [`Relay`], once the leader counts the follower.
struct FollowedThroughRelay {
    leader: support::Running,
    follower: support::Running,
    relay: Relay,
    /// What keeps both replicas' leadership fixed.
    _fixed: [(watch::Sender<bool>, watch::Sender<Option<String>>); 2],
}

async fn followed_through_relay(leader_flags: &[&str]) -> Result<FollowedThroughRelay, Error> {
    let (a, a_leading, a_leader) = fixed("a", true, None);
    let leader = support::start_led(ONE_POOL, leader_flags, a).await?;
    let relay = Relay::start(leader.grpc).await?;
    let (b, b_leading, b_leader) = fixed("b", false, Some(relay.uri()));
    let follower = support::start_led(ONE_POOL, &[], b).await?;
    leader
        .wait_metric("flyball_replication_followers", 1.0, WAIT)
        .await?;
    Ok(FollowedThroughRelay {
        leader,
        follower,
        relay,
        _fixed: [(a_leading, a_leader), (b_leading, b_leader)],
    })
}

/// Reports from `gateway` to `uri`, one every `every`, until aborted.
fn keep_reporting(
    uri: String,
    gateway: &'static str,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut grpc) = client(uri).await else {
            return;
        };
        for sequence in 1.. {
            let _ = grpc.report(report(gateway, sequence, 1)).await;
            tokio::time::sleep(every).await;
        }
    })
}

/// The follower's connection to the leader goes half-open (no FIN, no RST: a conntrack entry
/// expired, a node's network vanished and came back) while the leader goes on leading and the
/// Lease goes on naming it. The follower only reads on that stream, so only its HTTP/2 pings
/// tell it the stream is dead; it then follows again, over a new connection, and misses nothing
/// the leader kept. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_stream_went_half_open_follows_the_leader_again() -> Result<(), Error> {
    let FollowedThroughRelay {
        leader,
        follower,
        relay,
        _fixed,
    } = followed_through_relay(&[]).await?;
    let mut grpc = client(leader.grpc_uri()).await?;
    grpc.report(report("gw-before", 1, 1)).await?;
    follower
        .wait_metric("flyball_replication_followed_total", 1.0, WAIT)
        .await?;

    relay.cut();
    let reporting = keep_reporting(leader.grpc_uri(), "gw-after", Duration::from_millis(100));
    // Well over any keepalive a fix would choose, and twice the default Lease duration.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut followed = None;
    while tokio::time::Instant::now() < deadline {
        followed = follower
            .metric("flyball_replication_followed_total")
            .await?;
        if followed.is_some_and(|n| n >= 3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reporting.abort();
    let merged_at_leader = leader.metric("flyball_ingest_reports_total").await?;
    assert!(
        followed.is_some_and(|n| n >= 3.0),
        "30 s after its stream went half-open the follower has followed {followed:?} reports \
         (the leader merged {merged_at_leader:?})"
    );
    follower.stop().await?;
    leader.stop().await?;
    Ok(())
}

/// A follower's node vanishes: its connection to the leader goes half-open and nothing closes
/// it. What the leader streams to it is not taken, so the kernel gives the connection up
/// (`--grpc-keepalive` plus `--grpc-keepalive-timeout`) and the follower's place (one of
/// `MAX_FOLLOWERS`) is free again, not held until TCP gives up (~15 min). On loopback the relay's
/// kernel still acknowledges, so what the leader meets is a zero window, which Linux 5.11 and
/// later give up on as on unacknowledged data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_vanished_frees_its_place_at_the_leader() -> Result<(), Error> {
    let keepalive = ["--grpc-keepalive", "1s", "--grpc-keepalive-timeout", "1s"];
    let FollowedThroughRelay {
        leader,
        follower,
        relay,
        _fixed,
    } = followed_through_relay(&keepalive).await?;
    // Reports flow to the follower as it vanishes.
    let reporting = keep_reporting(leader.grpc_uri(), "gw", Duration::from_millis(2));
    support::wait_at_least(
        follower.http,
        "flyball_replication_followed_total",
        1.0,
        WAIT,
    )
    .await?;
    relay.cut();
    // Its last words (a GOAWAY, a FIN) go nowhere.
    follower.stop().await?;
    leader
        .wait_metric("flyball_replication_followers", 0.0, WAIT)
        .await?;
    support::wait_at_least(
        leader.http,
        r#"flyball_grpc_connections_closed_total{how="lost"}"#,
        1.0,
        WAIT,
    )
    .await?;
    reporting.abort();
    leader.stop().await
}

/// The first sample of the metric `name` (whatever its labels) on the service at `http`.
async fn first_sample(http: std::net::SocketAddr, name: &str) -> Result<f64, Error> {
    let (_, text) = support::get(http, "/metrics").await?;
    let prefix = format!("{name}{{");
    text.lines()
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            series.starts_with(&prefix).then(|| value.parse().ok())?
        })
        .ok_or_else(|| format!("no sample of {name}").into())
}

/// Small buckets and a 1 s short window, so a test sees the short window's rate in seconds.
const FAST_WINDOWS: &[&str] = &[
    "--bucket",
    "100ms",
    "--short-window",
    "1s",
    "--stable-window",
    "10s",
];

/// A follower that reads the Lease late (or restarts) is sent what the leader kept of the last
/// 30 s, all at once. Each goes out saying how long it was kept (`held_ms`), so the follower
/// places it where the leader did: merged into the bucket of their arrival, seconds of reports
/// would make its short window's rate several times what the gateways sent, and a follower that
/// takes the lead moments later (a rolling update) would scale up on that burst; the restart
/// hold only stops scale-down. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_follower_does_not_merge_the_kept_reports_as_one_burst() -> Result<(), Error> {
    let leader = support::bind(ONE_POOL, FAST_WINDOWS).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::spawn(leader.with_leadership(a))?;
    // Up well before the reports, so its short window covers a whole second.
    let (b, _b_leading, b_leader) = fixed("b", false, None);
    let follower = support::start_led(ONE_POOL, FAST_WINDOWS, b).await?;

    // One gateway, 4 requests every 100 ms for 3 s: 40 requests per second, steadily.
    let mut grpc = client(leader.grpc_uri()).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for sequence in 1..=30 {
        tick.tick().await;
        grpc.report(report("gw", sequence, 3)).await?;
    }
    // The follower reads the Lease now, and follows.
    b_leader.send(Some(leader_uri))?;
    support::Running::wait_metric(&follower, "flyball_ingest_reports_total", 30.0, WAIT).await?;
    let at_follower = first_sample(follower.http, "flyball_pool_requests_per_second").await?;
    let at_leader = first_sample(leader.http, "flyball_pool_requests_per_second").await?;
    assert_eq!(totals(&follower.pools().await?), (120, 30, 9000, 630));
    // At most 11 reports (44 requests) of this gateway fall in any 1.1 s.
    assert!(
        at_follower <= 50.0,
        "the follower's short-window rate is {at_follower} requests/s (the leader's {at_leader}) \
         for a gateway that sent 40 requests/s: 3 s of kept reports merged as one burst"
    );
    follower.stop().await?;
    leader.stop().await?;
    Ok(())
}

/// A follower's container restarts: same pod name, same pod IP, so the same Lease identity
/// (`pod@ip:port`). The leader's stream leaves out the reports a follower forwarded itself; the
/// restarted process is another forwarder (its forwarding name carries its start), so it is sent
/// the reports its predecessor forwarded, which died with it. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_gets_the_reports_it_forwarded_before_the_restart() -> Result<(), Error>
{
    let leader = support::bind(ONE_POOL, &[]).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::spawn(leader.with_leadership(a))?;
    let identity = "flyball-control-1@10.0.0.8:9090";
    let (b, _b_leading, _b_leader) = fixed(identity, false, Some(leader_uri.clone()));
    let before = support::start_led(ONE_POOL, &[], b).await?;
    leader
        .wait_metric("flyball_replication_followers", 1.0, WAIT)
        .await?;

    // A gateway of the follower's: its reports are forwarded to the leader.
    let mut grpc = client(before.grpc_uri()).await?;
    for sequence in 1..=10 {
        grpc.report(report("gw-on-b", sequence, 3)).await?;
    }
    leader
        .wait_metric("flyball_ingest_reports_total", 10.0, WAIT)
        .await?;
    drop(grpc);
    before.stop().await?;

    // The same pod, restarted: everything it had is gone.
    let (b, _b_leading, _b_leader) = fixed(identity, false, Some(leader_uri));
    let after = support::start_led(ONE_POOL, &[], b).await?;
    // Another gateway reports to the leader: the stream is in order, so once the follower has
    // it, it has been sent everything the leader kept before it.
    let mut grpc = client(leader.grpc_uri()).await?;
    grpc.report(report("gw-on-a", 1, 1_000)).await?;
    leader
        .wait_metric("flyball_ingest_reports_total", 11.0, WAIT)
        .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pools = after.pools().await?;
        let marked = pools["pools"][0]["requests"].as_u64() >= Some(1_001);
        if marked || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_leader = totals(&leader.pools().await?);
    assert_eq!(at_leader, (1_041, 11, 103_000, 7_210));
    assert_eq!(
        totals(&after.pools().await?),
        at_leader,
        "the restarted follower was sent the leader's kept reports but its own gateway's \
         (followed {:?})",
        after.metric("flyball_replication_followed_total").await?
    );
    after.stop().await?;
    leader.stop().await?;
    Ok(())
}

/// A leader that takes forwarded reports and acknowledges them only when the test says so.
#[derive(Clone)]
struct StallingLeader {
    received: Arc<AtomicI64>,
    acks: Arc<tokio::sync::Semaphore>,
}

#[tonic::async_trait]
impl TelemetryService for StallingLeader {
    async fn report(
        &self,
        _request: tonic::Request<ReceivedReport>,
    ) -> Result<tonic::Response<v1::ReportResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("streams only"))
    }

    type ReportStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<v1::ReportResponse, tonic::Status>> + Send>,
    >;

    async fn report_stream(
        &self,
        request: tonic::Request<tonic::Streaming<ReceivedReport>>,
    ) -> Result<tonic::Response<Self::ReportStreamStream>, tonic::Status> {
        let (taken, sequences) = tokio::sync::mpsc::unbounded_channel();
        let (mut reports, received) = (request.into_inner(), self.received.clone());
        tokio::spawn(async move {
            while let Ok(Some(report)) = reports.message().await {
                received.fetch_add(1, Ordering::SeqCst);
                if taken.send(report.report.sequence).is_err() {
                    return;
                }
            }
        });
        let gate = self.acks.clone();
        let acks = futures::stream::unfold((sequences, gate), |(mut sequences, gate)| async move {
            let sequence = sequences.recv().await?;
            gate.acquire().await.ok()?.forget();
            let ack = v1::ReportResponse {
                acknowledged_sequence: sequence,
            };
            Some((Ok(ack), (sequences, gate)))
        });
        Ok(tonic::Response::new(Box::pin(acks)))
    }
}

/// A follower's lane has reports on a stream to the leader, unacknowledged, when this replica
/// briefly takes the lead (two replicas both lead for a moment): the lane gives them to its
/// followers. It stops leading, and a report it takes while no leader is named waits for the
/// next; the old leader's late acknowledgements (of the reports given away) must not take that
/// report, or it would be counted forwarded, never sent, and lost. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_from_the_old_stream_does_not_take_a_report_held_for_the_next_leader()
-> Result<(), Error> {
    let stalling = StallingLeader {
        received: Arc::default(),
        acks: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let stalling_uri = format!("http://{}", listener.local_addr()?);
    let serve = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TelemetryServiceServer::new(stalling.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let (c, _c_leading, _c_leader) = fixed("c", true, None);
    let next = support::start_led(ONE_POOL, &[], c).await?;
    let (b, b_leading, b_leader) = fixed("b", false, Some(stalling_uri));
    let follower = support::start_led(ONE_POOL, &[], b).await?;

    // Two reports forwarded to the old leader, which does not acknowledge them yet.
    let mut grpc = client(follower.grpc_uri()).await?;
    grpc.report(report("gw", 1, 1)).await?;
    grpc.report(report("gw", 2, 1)).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while stalling.received.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "never forwarded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The follower leads for a moment: the lane takes what it held.
    b_leading.send(true)?;
    follower
        .wait_metric(
            "flyball_forward_dropped_total{reason=\"leading\"}",
            2.0,
            WAIT,
        )
        .await?;
    // ...and no longer; the Lease is changing hands. A report taken now waits for the next
    // leader.
    b_leader.send(None)?;
    b_leading.send(false)?;
    grpc.report(report("gw", 3, 1)).await?;
    // The old leader's acknowledgements of reports 1 and 2 come in late.
    stalling.acks.add_permits(2);
    // The next leader is named; the gateway goes on.
    b_leader.send(Some(next.grpc_uri()))?;
    grpc.report(report("gw", 4, 1)).await?;
    let waited = next
        .wait_metric("flyball_ingest_reports_total", 2.0, WAIT)
        .await;
    assert!(
        waited.is_ok(),
        "the next leader has {:?} of reports 3 and 4 ({waited:?}); the follower counts {:?} \
         forwarded",
        next.metric("flyball_ingest_reports_total").await?,
        follower.metric("flyball_forward_reports_total").await?
    );
    follower.stop().await?;
    next.stop().await?;
    serve.abort();
    Ok(())
}
