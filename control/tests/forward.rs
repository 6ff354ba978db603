//! Followers forward: two control services on loopback, reports sent over real gRPC to the
//! follower, totals read back from the leader's real HTTP server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::{Error, ONE_POOL, client, fixed, report, totals};

/// Long enough for loopback, short enough to fail fast.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_sent_to_the_follower_reach_the_leader_totals_exactly() -> Result<(), Error> {
    let leader = support::bind(ONE_POOL, &[]).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::spawn(leader.with_leadership(a))?;
    let (b, _b_leading, _b_leader) = fixed("b", false, Some(leader_uri));
    let follower = support::start_led(ONE_POOL, &[], b).await?;

    // 12 gateways, 25 reports each, concurrently, all to the follower.
    let mut tasks = Vec::new();
    for g in 0..12 {
        let mut grpc = client(follower.grpc_uri()).await?;
        tasks.push(tokio::spawn(async move {
            let mut sent = (0u64, 0u64, 0u64, 0u64);
            for sequence in 1..=25u64 {
                let ok = 1 + (g + sequence) % 4;
                grpc.report(report(&format!("gw-{g}"), sequence, ok))
                    .await
                    .unwrap();
                sent.0 += ok + 1;
                sent.1 += 1;
                sent.2 += 100 * ok;
                sent.3 += 7 * ok;
            }
            sent
        }));
    }
    let mut sent = (0, 0, 0, 0);
    for task in tasks {
        let s = task.await?;
        sent = (sent.0 + s.0, sent.1 + s.1, sent.2 + s.2, sent.3 + s.3);
    }

    follower
        .wait_metric("flyball_forward_reports_total", 300.0, WAIT)
        .await?;
    leader
        .wait_metric("flyball_ingest_reports_total", 300.0, WAIT)
        .await?;
    assert_eq!(totals(&leader.pools().await?), sent);
    assert_eq!(totals(&follower.pools().await?), sent);
    assert_eq!(leader.pools().await?["leading"], true);
    assert_eq!(follower.pools().await?["leading"], false);
    assert_eq!(
        follower
            .metric("flyball_forward_dropped_total{reason=\"send_failed\"}")
            .await?,
        None
    );
    // The leader never forwards.
    assert_eq!(
        leader.metric("flyball_forward_reports_total").await?,
        Some(0.0)
    );
    leader.stop().await?;
    follower.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_report_that_reaches_the_leader_twice_is_merged_once() -> Result<(), Error> {
    let leader = support::bind(ONE_POOL, &[]).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::spawn(leader.with_leadership(a))?;
    let (b, _b_leading, _b_leader) = fixed("b", false, Some(leader_uri));
    let follower = support::start_led(ONE_POOL, &[], b).await?;

    // The gateway's connection moved: each report went to the follower, then to the leader.
    // (The other way round, the follower would have each already from the leader's stream, and
    // forward none.)
    let mut direct = client(leader.grpc_uri()).await?;
    let mut via_follower = client(follower.grpc_uri()).await?;
    for sequence in 1..=10 {
        via_follower.report(report("gw", sequence, 3)).await?;
        direct.report(report("gw", sequence, 3)).await?;
    }
    follower
        .wait_metric("flyball_forward_reports_total", 10.0, WAIT)
        .await?;
    leader
        .wait_metric("flyball_ingest_duplicates_total", 10.0, WAIT)
        .await?;
    assert_eq!(
        leader.metric("flyball_ingest_reports_total").await?,
        Some(10.0)
    );
    assert_eq!(totals(&leader.pools().await?), (40, 10, 3_000, 210));
    leader.stop().await?;
    follower.stop().await?;
    Ok(())
}

const NOT_LEADER: &str = "flyball_ingest_refused_total{reason=\"not_leader\"}";

#[tokio::test]
async fn replicas_that_each_think_the_other_leads_do_not_bounce_reports() -> Result<(), Error> {
    let a = support::bind(ONE_POOL, &[]).await?;
    let b = support::bind(ONE_POOL, &[]).await?;
    let a_uri = format!("http://{}", a.grpc_addr().unwrap());
    let b_uri = format!("http://{}", b.grpc_addr().unwrap());
    let (a_led, _a_leading, _a_leader) = fixed("a", false, Some(b_uri));
    let (b_led, _b_leading, _b_leader) = fixed("b", false, Some(a_uri));
    let a = support::spawn(a.with_leadership(a_led))?;
    let b = support::spawn(b.with_leadership(b_led))?;

    let mut grpc = client(b.grpc_uri()).await?;
    for sequence in 1..=5 {
        grpc.report(report("gw", sequence, 1)).await?;
    }
    // a does not lead: it refuses what b forwards, so there is nothing it could send back.
    support::wait_at_least(a.http, NOT_LEADER, 1.0, WAIT).await?;
    assert_eq!(a.metric("flyball_ingest_reports_total").await?, Some(0.0));
    assert_eq!(a.metric("flyball_forward_reports_total").await?, Some(0.0));
    assert_eq!(b.metric("flyball_forward_reports_total").await?, Some(0.0));
    assert_eq!(
        b.metric("flyball_ingest_duplicates_total").await?,
        Some(0.0)
    );
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

/// The Lease still names a replica that stopped leading (its renewals fail): it refuses what
/// followers forward, which wait and go to the next leader, and it still takes its own
/// gateways' reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_forwarded_to_a_replica_that_no_longer_leads_reach_the_next_leader()
-> Result<(), Error> {
    let old = support::bind(ONE_POOL, &[]).await?;
    let old_uri = format!("http://{}", old.grpc_addr().unwrap());
    // The Lease names `old` itself: it knows no other leader.
    let (a, _a_leading, old_leader) = fixed("a", false, None);
    let old = support::spawn(old.with_leadership(a))?;
    let (b, _b_leading, leader) = fixed("b", false, Some(old_uri));
    let follower = support::start_led(ONE_POOL, &[], b).await?;

    let mut grpc = client(follower.grpc_uri()).await?;
    for sequence in 1..=5 {
        grpc.report(report("gw", sequence, 1)).await?;
    }
    support::wait_at_least(old.http, NOT_LEADER, 1.0, WAIT).await?;
    assert_eq!(old.metric("flyball_ingest_reports_total").await?, Some(0.0));
    assert_eq!(
        follower.metric("flyball_forward_reports_total").await?,
        Some(0.0)
    );
    // A gateway of its own is still heard.
    let mut direct = client(old.grpc_uri()).await?;
    direct.report(report("gw-old", 1, 1)).await?;
    assert_eq!(old.metric("flyball_ingest_reports_total").await?, Some(1.0));

    let next = support::bind(ONE_POOL, &[]).await?;
    let next_uri = format!("http://{}", next.grpc_addr().unwrap());
    let (c, _c_leading, _c_leader) = fixed("c", true, None);
    let next = support::spawn(next.with_leadership(c))?;
    leader.send(Some(next_uri.clone()))?;
    old_leader.send(Some(next_uri))?;
    follower
        .wait_metric("flyball_forward_reports_total", 5.0, WAIT)
        .await?;
    // `old` kept its own gateway's report for the next leader too.
    old.wait_metric("flyball_forward_reports_total", 1.0, WAIT)
        .await?;
    next.wait_metric("flyball_ingest_reports_total", 6.0, WAIT)
        .await?;
    assert_eq!(totals(&next.pools().await?), (12, 6, 600, 42));
    for replica in [&follower, &old] {
        assert_eq!(replica.metric("flyball_forward_dropped_total").await?, None);
    }
    // Following the next leader, `old` merged the follower's five from its stream (and not its
    // own one again).
    old.wait_metric("flyball_replication_followed_total", 5.0, WAIT)
        .await?;
    assert_eq!(old.metric("flyball_ingest_reports_total").await?, Some(6.0));
    assert_eq!(totals(&old.pools().await?), (12, 6, 600, 42));
    old.stop().await?;
    next.stop().await?;
    follower.stop().await?;
    Ok(())
}

/// No leader named (a Lease read failed at start, or the Lease names a replica that no longer
/// leads): what a follower takes meanwhile waits for the next leader, as unacknowledged reports
/// do, rather than being dropped at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_without_a_known_leader_keeps_what_it_took_for_the_next_one() -> Result<(), Error>
{
    let (b, _leading, leader) = fixed("b", false, None);
    let follower = support::start_led(ONE_POOL, &[], b).await?;
    let mut grpc = client(follower.grpc_uri()).await?;
    for sequence in 1..=3 {
        grpc.report(report("gw", sequence, 1)).await?;
    }
    // Its own windows have everything all the same.
    assert_eq!(totals(&follower.pools().await?), (6, 3, 300, 21));

    let next = support::bind(ONE_POOL, &[]).await?;
    let next_uri = format!("http://{}", next.grpc_addr().unwrap());
    let (c, _c_leading, _c_leader) = fixed("c", true, None);
    let next = support::spawn(next.with_leadership(c))?;
    leader.send(Some(next_uri))?;
    follower
        .wait_metric("flyball_forward_reports_total", 3.0, WAIT)
        .await?;
    assert_eq!(totals(&next.pools().await?), (6, 3, 300, 21));
    assert_eq!(
        follower.metric("flyball_forward_dropped_total").await?,
        None
    );
    next.stop().await?;
    follower.stop().await?;
    Ok(())
}

/// A change of leader loses nothing the follower took: reports it could not deliver wait (up to
/// `RESEND_WITHIN`) and go to the next leader once the Lease names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_taken_while_the_leader_is_gone_reach_the_next_one() -> Result<(), Error> {
    let first = support::bind(ONE_POOL, &[]).await?;
    let first_uri = format!("http://{}", first.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let first = support::spawn(first.with_leadership(a))?;
    let (b, _b_leading, leader) = fixed("b", false, Some(first_uri));
    let follower = support::start_led(ONE_POOL, &[], b).await?;
    let mut grpc = client(follower.grpc_uri()).await?;
    let mut sequence = 0;
    let mut send = async |n: u64| -> Result<(), Error> {
        for _ in 0..n {
            sequence += 1;
            grpc.report(report("gw", sequence, 1)).await?;
        }
        Ok(())
    };
    let forwarded = "flyball_forward_reports_total";

    send(10).await?;
    follower.wait_metric(forwarded, 10.0, WAIT).await?;
    first.stop().await?;
    // The leader is gone and the Lease still names it: these wait.
    send(5).await?;

    let next = support::bind(ONE_POOL, &[]).await?;
    let next_uri = format!("http://{}", next.grpc_addr().unwrap());
    let (c, _c_leading, _c_leader) = fixed("c", true, None);
    let next = support::spawn(next.with_leadership(c))?;
    leader.send(Some(next_uri))?;
    send(7).await?;
    follower.wait_metric(forwarded, 22.0, WAIT).await?;
    next.wait_metric("flyball_ingest_reports_total", 12.0, WAIT)
        .await?;
    assert_eq!(
        follower.metric("flyball_forward_dropped_total").await?,
        None
    );
    // The next leader has all twelve, each once.
    assert_eq!(totals(&next.pools().await?), (24, 12, 1_200, 84));
    assert_eq!(totals(&follower.pools().await?), (44, 22, 2_200, 154));
    next.stop().await?;
    follower.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_connection_to_a_follower_closed_is_gone_at_the_leader_too()
-> Result<(), Error> {
    let fast = ["--stale-after", "1s"];
    let leader = support::bind(ONE_POOL, &fast).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::spawn(leader.with_leadership(a))?;
    let (b, _b_leading, _b_leader) = fixed("b", false, Some(leader_uri));
    let follower = support::start_led(ONE_POOL, &fast, b).await?;

    // Two gateways on streams of their own to the follower.
    let mut streams = Vec::new();
    for gateway in ["exits", "cut-off"] {
        let (reports, outbound) = tokio::sync::mpsc::channel(4);
        let mut acks = client(follower.grpc_uri())
            .await?
            .report_stream(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await?
            .into_inner();
        for sequence in 1..=3 {
            reports.send(report(gateway, sequence, 1)).await?;
            assert_eq!(
                acks.message().await?.unwrap().acknowledged_sequence,
                sequence
            );
        }
        streams.push((reports, acks));
    }
    leader
        .wait_metric("flyball_ingest_reports_total", 6.0, WAIT)
        .await?;
    // "exits" closes its connection (Envoy exited); "cut-off" goes quiet with its stream open.
    let cut_off = streams.pop();
    drop(streams);
    leader
        .wait_metric("flyball_ingest_departed_total", 1.0, WAIT)
        .await?;
    leader
        .wait_metric("flyball_reporters{state=\"stale\"}", 1.0, WAIT)
        .await?;
    let pool = r#"autoscaler="llama",namespace="default",pool="llama",role="unified""#;
    let silent = format!("flyball_pool_silent_reporters{{{pool}}}");
    assert_eq!(
        leader.metric(&silent).await?,
        Some(1.0),
        "only cut-off holds"
    );
    // The follower counts it too, once it sweeps for quiet reporters.
    follower
        .wait_metric("flyball_ingest_departed_total", 1.0, WAIT)
        .await?;
    drop(cut_off);
    leader.stop().await?;
    follower.stop().await?;
    Ok(())
}

/// A follower that shuts down closes its gateways' connections itself: that says nothing of the
/// gateways, which report to another replica from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_shutting_down_says_nothing_of_its_gateways() -> Result<(), Error> {
    let fast = ["--stale-after", "1s"];
    let leader = support::bind(ONE_POOL, &fast).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::spawn(leader.with_leadership(a))?;
    let (b, _b_leading, _b_leader) = fixed("b", false, Some(leader_uri));
    let follower = support::start_led(ONE_POOL, &fast, b).await?;

    let (reports, outbound) = tokio::sync::mpsc::channel(4);
    let mut acks = client(follower.grpc_uri())
        .await?
        .report_stream(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await?
        .into_inner();
    for sequence in 1..=3 {
        reports.send(report("gw", sequence, 1)).await?;
        assert_eq!(
            acks.message().await?.unwrap().acknowledged_sequence,
            sequence
        );
    }
    leader
        .wait_metric("flyball_ingest_reports_total", 3.0, WAIT)
        .await?;
    follower.stop().await?;
    // The gateway, cut off from every replica now, is missing at the leader, not gone.
    leader
        .wait_metric("flyball_reporters{state=\"stale\"}", 1.0, WAIT)
        .await?;
    assert_eq!(
        leader.metric("flyball_ingest_departed_total").await?,
        Some(0.0)
    );
    drop((reports, acks));
    leader.stop().await
}

/// A follower with no room for a new gateway (`--max-reporters`) refuses its reports and holds
/// the pools they feed; so must the leader, which sets replicas, and which never heard of the
/// gateway: the follower forwards the refused report, the leader refuses it too, and holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_a_follower_has_no_room_for_makes_the_leader_hold_too() -> Result<(), Error> {
    let one = ["--max-reporters", "1"];
    let leader = support::bind(ONE_POOL, &one).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::spawn(leader.with_leadership(a))?;
    let (b, _b_leading, _b_leader) = fixed("b", false, Some(leader_uri));
    let follower = support::start_led(ONE_POOL, &one, b).await?;
    leader
        .wait_metric("flyball_replication_followers", 1.0, WAIT)
        .await?;

    // The one gateway there is room for reports to the leader; the follower has it from there.
    client(leader.grpc_uri())
        .await?
        .report(report("gw-1", 1, 1))
        .await?;
    follower
        .wait_metric("flyball_replication_followed_total", 1.0, WAIT)
        .await?;
    let refused = client(follower.grpc_uri())
        .await?
        .report(report("gw-2", 1, 5))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);

    let too_many = "flyball_ingest_refused_total{reason=\"too_many_reporters\"}";
    leader.wait_metric(too_many, 1.0, WAIT).await?;
    follower
        .wait_metric("flyball_forward_reports_total", 1.0, WAIT)
        .await?;
    assert_eq!(
        follower.metric("flyball_forward_dropped_total").await?,
        None
    );
    // The leader's pool knows load goes unseen.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = leader.get("/v1/decisions").await?;
        let log: serde_json::Value = serde_json::from_str(&body)?;
        let last = log["pools"][0]["decisions"]
            .as_array()
            .and_then(|d| d.last().cloned())
            .unwrap_or_default();
        if last["details"]["freshness"]
            .to_string()
            .contains("keys_over_limit\":true")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader's last decision does not hold for the unseen load: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its one gateway's figures only.
    assert_eq!(totals(&leader.pools().await?), (2, 1, 100, 7));
    leader.stop().await?;
    follower.stop().await?;
    Ok(())
}
