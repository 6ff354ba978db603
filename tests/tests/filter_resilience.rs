//! The filter never breaks traffic: not when the control service is down, not with a bad
//! configuration (refused at load, with the field named), and every shipped config validates.

use flyball_local::client::{http_client, post};
use flyball_local::envoy::{
    ControlConnections, Envoy, EnvoyOptions, envoy_binary, filter_wasm, render_config, validate,
};
use flyball_local::{free_port, repo_root, wait_for};
use flyball_relay::Relay;
use flyball_sim::{SimConfig, SimServer};
use flyball_tests::receiver::Receiver;
use flyball_tests::streaming_chat;
use std::time::{Duration, Instant};

/// The report interval of the gateway [`sim_and_envoy_reporting_to`] starts.
const REPORT_INTERVAL_MS: u64 = 100;

async fn send(envoy: &Envoy, count: usize, model: &str) -> anyhow::Result<()> {
    let client = http_client();
    for i in 0..count {
        let headers = [
            ("x-sim-ttft-ms", "2".to_owned()),
            ("x-sim-itl-ms", "1".to_owned()),
            ("x-sim-output-tokens", (2 + i % 5).to_string()),
        ];
        let response = post(
            &client,
            envoy.listener(),
            "/v1/chat/completions",
            &streaming_chat(model),
            &headers,
            None,
        )
        .await?;
        anyhow::ensure!(
            response.status == 200,
            "request {i}: status {}",
            response.status
        );
        anyhow::ensure!(
            response.text().ends_with("data: [DONE]\n\n"),
            "request {i}: truncated stream"
        );
    }
    Ok(())
}

/// The simulator behind Envoy with the filter, reporting every `REPORT_INTERVAL_MS` to `receiver`.
async fn sim_and_envoy_reporting_to(receiver: &Receiver) -> anyhow::Result<(SimServer, Envoy)> {
    sim_and_envoy_configured(receiver, serde_json::json!({})).await
}

/// As [`sim_and_envoy_reporting_to`], with the plugin configuration's other fields `more`.
async fn sim_and_envoy_configured(
    receiver: &Receiver,
    more: serde_json::Value,
) -> anyhow::Result<(SimServer, Envoy)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let mut config = serde_json::json!({
        "controlCluster": "flyball_control",
        "reportIntervalMs": REPORT_INTERVAL_MS
    });
    if let (Some(config), Some(more)) = (config.as_object_mut(), more.as_object()) {
        config.extend(more.clone());
    }
    let config = config.to_string();
    let envoy = Envoy::start(&EnvoyOptions::with_filter(
        sim.local_addr().port(),
        receiver.port(),
        &config,
    ))
    .await?;
    Ok((sim, envoy))
}

fn requests_in(receiver: &Receiver) -> u64 {
    receiver
        .totals()
        .keys
        .values()
        .map(|k| k.requests.unwrap_or_default().total())
        .sum()
}

/// The control service goes down: requests are still served, reports that fail in a row are
/// put back further (not resent every interval at a service that cannot take them), and once it
/// is back every request is reported, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_keeps_serving_while_the_control_service_is_down_and_catches_up() -> anyhow::Result<()>
{
    let mut receiver = Receiver::start().await?;
    let (sim, envoy) = sim_and_envoy_reporting_to(&receiver).await?;

    send(&envoy, 20, "before").await?;
    wait_for(
        "the first 20 requests to be reported",
        Duration::from_secs(10),
        || {
            let n = requests_in(&receiver);
            async move { (n == 20).then_some(()) }
        },
    )
    .await?;

    let failed_before = envoy
        .metric_sum("flyball_reports_failed_total", &[])
        .await?;
    receiver.stop().await;
    // Every request still succeeds while reports fail.
    send(&envoy, 50, "during").await?;
    let failed_at_least = |count: f64| {
        let envoy = &envoy;
        async move {
            let failed = envoy
                .metric_sum("flyball_reports_failed_total", &[])
                .await
                .ok()?;
            (failed >= count).then_some((failed, Instant::now()))
        }
    };
    // From the fifth failure in a row on, each report is put back by 7 intervals: the next
    // attempts are 8 intervals apart (less half a tick), not one as while the service was up.
    let wait = Duration::from_secs(20);
    let five_in_a_row = failed_before + 5.0;
    let (seen, since) = wait_for("five reports to fail", wait, || {
        failed_at_least(five_in_a_row)
    })
    .await?;
    let (failed, until) =
        wait_for("four more to fail", wait, || failed_at_least(seen + 4.0)).await?;
    // `since` may be read just before the next failure: the span holds at least three gaps.
    let spent = until - since;
    println!(
        "reports failed while the receiver was down: {failed}; {} more in {:.2} s",
        failed - seen,
        spent.as_secs_f64()
    );
    let put_back = 7 * Duration::from_millis(REPORT_INTERVAL_MS);
    assert!(
        spent >= 3 * put_back,
        "{} failures in {spent:?}: the attempts were not put back",
        failed - seen
    );

    receiver.restart().await?;
    let back = Instant::now();
    wait_for(
        "the receiver to catch up with all 70 requests",
        Duration::from_secs(20),
        || {
            let n = requests_in(&receiver);
            async move { (n == 70).then_some(()) }
        },
    )
    .await?;
    // At most the 8 intervals a report is put back, and the time to connect.
    println!(
        "caught up {:.2} s after the receiver came back",
        back.elapsed().as_secs_f64()
    );
    let totals = receiver.totals();
    assert_eq!(
        totals.gaps, 0,
        "held-back deltas were delivered, not dropped"
    );
    let during = totals
        .keys
        .iter()
        .find(|((_, model), _)| model == "during")
        .map(|(_, k)| k.requests.unwrap_or_default().ok);
    assert_eq!(during, Some(50));
    // Reports went as messages on report streams, and a new stream was opened once the
    // receiver came back.
    let (streamed, streams) = (receiver.streamed_reports(), receiver.streams_opened());
    println!(
        "reports on streams: {streamed} of {}; streams opened: {streams}",
        totals.reports
    );
    assert!(
        streamed > 0 && streams >= 2,
        "{streamed} streamed, {streams} streams"
    );
    drop(sim);
    Ok(())
}

/// A gateway reporting every 100 ms to `receiver` through a relay, whose control connection has
/// gone half-open after 5 requests were reported: the relay stopped carrying its bytes and
/// nothing closes it, as when the control replica's node vanishes. 10 more requests are sent
/// after the cut.
struct HalfOpen {
    receiver: Receiver,
    relay: Relay,
    envoy: Envoy,
    _sim: SimServer,
}

impl HalfOpen {
    async fn start(control_connections: ControlConnections) -> anyhow::Result<HalfOpen> {
        Self::start_with("flyball_control", |options| {
            Ok(EnvoyOptions {
                control_connections,
                ..options
            })
        })
        .await
    }

    /// As [`HalfOpen::start`], with the filter reporting to `control_cluster` and Envoy's options
    /// as `configure` makes them (the relay's port is the control port).
    async fn start_with(
        control_cluster: &str,
        configure: impl FnOnce(EnvoyOptions) -> anyhow::Result<EnvoyOptions>,
    ) -> anyhow::Result<HalfOpen> {
        let receiver = Receiver::start().await?;
        let relay = Relay::start(([127, 0, 0, 1], receiver.port()).into()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sim = SimServer::start(SimConfig::default(), listener).await?;
        let config =
            serde_json::json!({"controlCluster": control_cluster, "reportIntervalMs": 100})
                .to_string();
        let envoy = Envoy::start(&configure(EnvoyOptions::with_filter(
            sim.local_addr().port(),
            relay.addr().port(),
            &config,
        ))?)
        .await?;
        send(&envoy, 5, "before").await?;
        wait_for("5 requests reported", Duration::from_secs(10), || {
            let seen = requests_in(&receiver);
            async move { (seen >= 5).then_some(()) }
        })
        .await?;
        relay.cut();
        send(&envoy, 10, "after").await?;
        Ok(HalfOpen {
            receiver,
            relay,
            envoy,
            _sim: sim,
        })
    }

    /// Waits for all 15 requests to be reported, through a connection opened after the cut.
    async fn all_reported_over_a_new_connection(&self) -> anyhow::Result<()> {
        let seen = wait_for(
            "the requests after the cut reported over a new connection",
            Duration::from_secs(20),
            || {
                let seen = requests_in(&self.receiver);
                async move { (seen >= 15).then_some(seen) }
            },
        )
        .await?;
        assert_eq!(seen, 15, "every request reported once");
        assert!(
            self.relay.accepted_since_cut() > 0,
            "no connection after the cut"
        );
        Ok(())
    }

    /// Connections `cluster` gave up for want of an answer to its pings.
    async fn ping_timeouts(&self, cluster: &str) -> anyhow::Result<f64> {
        self.envoy
            .metric_sum(
                "envoy_cluster_http2_keepalive_timeout",
                &[("envoy_cluster_name", cluster)],
            )
            .await
    }
}

/// The control replica a gateway reports to vanishes (its node lost): the connection goes
/// half-open and nothing closes it. The control cluster's HTTP/2 keepalive (`envoy/flyball.yaml`,
/// scaled down here) gives it up, and the filter's reports, the ones held meanwhile too, go over
/// a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_move_off_a_control_connection_gone_half_open() -> anyhow::Result<()> {
    let gateway = HalfOpen::start(ControlConnections::Pings {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
    })
    .await?;
    gateway.all_reported_over_a_new_connection().await?;
    // Moved by the pings, not by a report that happened to open a connection of its own.
    let timed_out = gateway.ping_timeouts("flyball_control").await?;
    assert!(timed_out >= 1.0, "keepalive timeouts: {timed_out}");
    Ok(())
}

/// The control cluster Envoy Gateway users add by `EnvoyPatchPolicy`, as shipped but for its
/// address (the relay) and its pings (scaled down from 15 s and 30 s to 1 s and 2 s): the filter
/// reports through it, and it leaves a control connection gone half-open by its pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_gateway_control_cluster_carries_reports_and_leaves_a_half_open_connection()
-> anyhow::Result<()> {
    let path = repo_root().join("deploy/envoy-gateway/envoypatchpolicy-control-cluster.yaml");
    let policy: serde_json::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path)?)?;
    let mut cluster = policy["spec"]["jsonPatches"][0]["operation"]["value"].clone();
    let name = cluster["name"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{}: no cluster name", path.display()))?
        .to_owned();
    let keepalive = cluster
        .pointer_mut(
            "/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\
             /explicit_http_config/http2_protocol_options/connection_keepalive",
        )
        .ok_or_else(|| anyhow::anyhow!("{}: no HTTP/2 pings", path.display()))?;
    *keepalive = serde_json::json!({"interval": "1s", "timeout": "2s"});
    let gateway = HalfOpen::start_with(&name, |options| {
        let address = cluster
            .pointer_mut("/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address")
            .ok_or_else(|| anyhow::anyhow!("{}: no endpoint address", path.display()))?;
        *address = serde_json::json!({
            "socket_address": {"address": "127.0.0.1", "port_value": options.control_port}
        });
        Ok(EnvoyOptions {
            control_cluster: Some(cluster),
            ..options
        })
    })
    .await?;
    gateway.all_reported_over_a_new_connection().await?;
    let timed_out = gateway.ping_timeouts(&name).await?;
    assert!(timed_out >= 1.0, "keepalive timeouts: {timed_out}");
    Ok(())
}

/// Istio's outbound cluster has no HTTP/2 pings, and a DestinationRule cannot add them. With
/// `deploy/istio/destinationrule.yaml` (one request a connection, as Istio renders it into the
/// cluster), the stream the filter reopens after a report times out needs a connection of its
/// own, and the reports get through within seconds of the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reach_a_new_connection_from_an_istio_gateway_with_the_destination_rule()
-> anyhow::Result<()> {
    let path = repo_root().join("deploy/istio/destinationrule.yaml");
    let rule: serde_json::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path)?)?;
    let policy = &rule["spec"]["trafficPolicy"];
    let max_requests = policy["connectionPool"]["http"]["maxRequestsPerConnection"].as_u64();
    // Emulated here: that one setting; anything more in the rule would need emulating too.
    assert_eq!(
        policy,
        &serde_json::json!({"connectionPool": {"http": {"maxRequestsPerConnection": max_requests}}}),
        "{}",
        path.display()
    );
    let gateway = HalfOpen::start(ControlConnections::WithoutPings {
        max_requests_per_connection: max_requests.map(u32::try_from).transpose()?,
    })
    .await?;
    let cut_at = std::time::Instant::now();
    gateway.all_reported_over_a_new_connection().await?;
    println!(
        "all reported {:.1} s after the cut",
        cut_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        gateway.ping_timeouts("flyball_control").await?,
        0.0,
        "no pings configured"
    );
    Ok(())
}

/// A control service that takes reports and never answers (cut off one way, or stalled with its
/// connections open), with the DestinationRule's one request a connection: each report the
/// filter gives up on leaves a stream half-closed, and its connection, open; at most
/// `MAX_LEFT_STREAMS` (4) wait, so the connections do not grow with every report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_left_unanswered_are_bounded() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let relay = Relay::start(([127, 0, 0, 1], receiver.port()).into()).await?;
    relay.cut_all_replies();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let config = serde_json::json!({"controlCluster": "flyball_control", "reportIntervalMs": 100})
        .to_string();
    let envoy = Envoy::start(&EnvoyOptions {
        // One worker: each worker's reports go on streams of their own.
        worker_threads: 1,
        control_connections: ControlConnections::WithoutPings {
            max_requests_per_connection: Some(1),
        },
        ..EnvoyOptions::with_filter(sim.local_addr().port(), relay.addr().port(), &config)
    })
    .await?;
    send(&envoy, 3, "unanswered").await?;
    let cluster = [("envoy_cluster_name", "flyball_control")];
    let opened = wait_for(
        "eight connections to the control service",
        Duration::from_secs(30),
        || async {
            let opened = envoy
                .metric_sum("envoy_cluster_upstream_cx_total", &cluster)
                .await
                .ok()?;
            (opened >= 8.0).then_some(opened)
        },
    )
    .await?;
    let open = envoy
        .metric_sum("envoy_cluster_upstream_cx_active", &cluster)
        .await?;
    println!(
        "{opened} connections opened, {open} open; {} streams reached the control service",
        receiver.streams_opened()
    );
    // The streams left, the current one, and one being closed as its stream is reset.
    assert!(open <= 6.0, "{open} of {opened} connections still open");
    Ok(())
}

/// The same Istio cluster without the DestinationRule: each stream the filter reopens goes into
/// the half-open connection (on a real vanished node, until TCP gives up, ~15 min; through this
/// relay, for ever), so the rule above is what moves the reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_destination_rule_an_istio_gateway_reopens_streams_on_the_dead_connection()
-> anyhow::Result<()> {
    let gateway = HalfOpen::start(ControlConnections::WithoutPings {
        max_requests_per_connection: None,
    })
    .await?;
    // Each failed report abandoned its stream and the next one opened another.
    wait_for(
        "three reports to time out after the cut",
        Duration::from_secs(20),
        || {
            let envoy = &gateway.envoy;
            async move {
                let failed = envoy
                    .metric_sum("flyball_reports_failed_total", &[])
                    .await
                    .ok()?;
                (failed >= 3.0).then_some(())
            }
        },
    )
    .await?;
    assert_eq!(
        gateway.relay.accepted_since_cut(),
        0,
        "connections since the cut"
    );
    assert_eq!(requests_in(&gateway.receiver), 5, "requests reported");
    // The streams were reopened, on the one connection.
    let cluster = [("envoy_cluster_name", "flyball_control")];
    let envoy = &gateway.envoy;
    let streams = envoy
        .metric_sum("envoy_cluster_upstream_rq_total", &cluster)
        .await?;
    let connections = envoy
        .metric_sum("envoy_cluster_upstream_cx_total", &cluster)
        .await?;
    assert!(streams >= 4.0, "{streams} streams");
    assert_eq!(connections, 1.0, "connections");
    Ok(())
}

/// A control service that answers, but later than `reportTimeoutMs` (overloaded, or far away):
/// each report is given up on and its stream left half-closed, and the acknowledgement that
/// still comes there counts. Without that, the gateway resent the same report, never taken as
/// answered, until retention dropped it a minute later, and nothing newer went meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_service_that_answers_late_still_gets_every_report() -> anyhow::Result<()> {
    const TIMEOUT_MS: u64 = 200;
    let receiver = Receiver::start_slow(Duration::from_millis(3 * TIMEOUT_MS)).await?;
    let more = serde_json::json!({"reportTimeoutMs": TIMEOUT_MS});
    let (sim, envoy) = sim_and_envoy_configured(&receiver, more).await?;
    // Each batch needs a report newer than the last one answered late.
    for batch in 1..=3 {
        send(&envoy, 5, "answered-late").await?;
        wait_for(
            &format!("batch {batch} reported"),
            Duration::from_secs(15),
            || {
                let seen = requests_in(&receiver);
                async move { (seen == 5 * batch).then_some(()) }
            },
        )
        .await?;
    }
    let failed = envoy
        .metric_sum("flyball_reports_failed_total", &[])
        .await?;
    let dropped = envoy
        .metric_sum("flyball_reports_dropped_total", &[])
        .await?;
    let totals = receiver.totals();
    println!(
        "reports: {} (+{} resent), {failed} given up on unanswered, {dropped} dropped",
        totals.reports, totals.duplicates
    );
    assert!(
        failed >= 1.0,
        "every report answered in time: nothing came late"
    );
    assert_eq!(dropped, 0.0, "reports dropped");
    assert_eq!(totals.gaps, 0, "sequences missing");
    drop(sim);
    Ok(())
}

/// A report the control service refuses as invalid is dropped and counted at once, not resent
/// until retention passes (60 s, while nothing after it got through), and the next report says
/// what was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_the_control_service_refuses_is_dropped_not_resent() -> anyhow::Result<()> {
    let receiver = Receiver::start_refusing("refused-model").await?;
    let (sim, envoy) = sim_and_envoy_reporting_to(&receiver).await?;
    send(&envoy, 3, "refused-model").await?;
    wait_for("the refusal", Duration::from_secs(10), || {
        let refused = receiver.refused().len();
        async move { (refused >= 1).then_some(()) }
    })
    .await?;
    send(&envoy, 4, "llama").await?;
    // Well within the 60 s the refused report would have been resent for, blocking these. The
    // three requests may have been split over two reports: what was not refused was taken.
    let requests_of = |model: &str| -> u64 {
        receiver
            .totals()
            .keys
            .iter()
            .filter(|((_, m), _)| m == model)
            .map(|(_, k)| k.requests.unwrap_or_default().total())
            .sum()
    };
    let (taken, dropped) = wait_for(
        "the next reports to be taken",
        Duration::from_secs(10),
        || {
            let llama = requests_of("llama");
            let taken = requests_of("refused-model");
            let dropped = receiver.reports().last().and_then(|r| r.dropped);
            async move {
                let dropped = dropped.unwrap_or_default();
                (llama == 4 && taken + dropped.requests == 3).then_some((taken, dropped))
            }
        },
    )
    .await?;
    let refused = receiver.refused();
    assert_eq!(refused.len(), 1, "resent: {refused:?}");
    assert_eq!(dropped.reports, 1);
    assert!(dropped.requests >= 1, "taken {taken}, dropped {dropped:?}");
    let counted = envoy
        .metric_sum("flyball_reports_dropped_total", &[])
        .await?;
    assert_eq!(counted, 1.0);
    drop(envoy);
    drop(sim);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_service_without_report_streams_gets_unary_reports() -> anyhow::Result<()> {
    let receiver = Receiver::start_unary_only().await?;
    let (sim, envoy) = sim_and_envoy_reporting_to(&receiver).await?;
    send(&envoy, 30, "older-control").await?;
    wait_for(
        "all 30 requests to be reported by unary calls",
        Duration::from_secs(10),
        || {
            let n = requests_in(&receiver);
            async move { (n == 30).then_some(()) }
        },
    )
    .await?;
    let totals = receiver.totals();
    assert_eq!(totals.gaps, 0);
    assert_eq!(receiver.streamed_reports(), 0);
    println!(
        "unary reports: {} (+{} resent after the refused stream)",
        totals.reports, totals.duplicates
    );
    drop(sim);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_over_the_inspection_cap_passes_unread_and_is_still_counted() -> anyhow::Result<()>
{
    let receiver = Receiver::start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let config = serde_json::json!({
        "controlCluster": "flyball_control",
        "reportIntervalMs": 100,
        "maxRequestBodyBytes": 4096
    })
    .to_string();
    let envoy = Envoy::start(&EnvoyOptions::with_filter(
        sim.local_addr().port(),
        receiver.port(),
        &config,
    ))
    .await?;
    let huge = serde_json::to_vec(&serde_json::json!({
        "model": "big-prompt",
        "messages": [{"role": "user", "content": "lorem ipsum ".repeat(4000)}],
        "stream": true
    }))?;
    let headers = [("x-sim-output-tokens", "5".to_owned())];
    let response = post(
        &http_client(),
        envoy.listener(),
        "/v1/chat/completions",
        &huge,
        &headers,
        None,
    )
    .await?;
    assert_eq!(response.status, 200);
    assert!(response.text().ends_with("data: [DONE]\n\n"));
    // Unread, so no usage was injected: the client got exactly what the server sent.
    assert!(!response.text().contains("\"usage\""));
    let uninspected = wait_for("the request to be counted", Duration::from_secs(10), || {
        let envoy = &envoy;
        async move {
            let n = envoy
                .metric_sum("flyball_requests_uninspected_total", &[])
                .await
                .ok()?;
            (n == 1.0).then_some(n)
        }
    })
    .await?;
    assert_eq!(uninspected, 1.0);
    wait_for(
        "the report to count it under model unknown",
        Duration::from_secs(10),
        || {
            let found = receiver.totals().keys.iter().any(|((_, model), k)| {
                model == "unknown" && k.requests.unwrap_or_default().ok == 1
            });
            async move { found.then_some(()) }
        },
    )
    .await?;
    drop(sim);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_plugin_configuration_is_refused_at_load_naming_the_field() -> anyhow::Result<()> {
    let bad =
        serde_json::json!({"controlCluster": "flyball_control", "reportIntervalMs": 5}).to_string();
    let options = EnvoyOptions::with_filter(free_port()?, free_port()?, &bad);
    let error = match Envoy::start(&options).await {
        Ok(_) => anyhow::bail!("Envoy started with reportIntervalMs = 5"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("reportIntervalMs"),
        "the log should name the field; got:\n{error}"
    );

    let typo = serde_json::json!({"reportIntervall": 100}).to_string();
    let options = EnvoyOptions::with_filter(free_port()?, free_port()?, &typo);
    let error = match Envoy::start(&options).await {
        Ok(_) => anyhow::bail!("Envoy started with an unknown field"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("reportIntervall"),
        "unknown field named; got:\n{error}"
    );
    Ok(())
}

/// The README's Istio control cluster (`outbound|9090||flyball-control.flyball-system.svc.cluster.local`,
/// 63 bytes) with `controlAuthority` left to its default (the cluster name) is a valid
/// configuration: the core accepts it, and a missing cluster is an ordinary failed call. The
/// glue serializes `GrpcService { envoy_grpc { cluster_name, authority } }` into the `&str` the
/// SDK takes, which is UTF-8 only while every length varint is under 128, so any cluster name of
/// 62 bytes or more without an authority (or cluster and authority over about 120 bytes together)
/// makes `on_configure` refuse the whole listener, blaming `controlCluster` with "must be shorter
/// than 120 bytes" for a 63-byte name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_control_cluster_name_without_an_authority_is_accepted() -> anyhow::Result<()> {
    let cluster = "outbound|9090||flyball-control.flyball-system.svc.cluster.local";
    let config =
        serde_json::json!({"controlCluster": cluster, "reportIntervalMs": 100}).to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let envoy = match Envoy::start(&EnvoyOptions::with_filter(
        sim.local_addr().port(),
        free_port()?,
        &config,
    ))
    .await
    {
        Ok(envoy) => envoy,
        Err(error) => anyhow::bail!(
            "Envoy refused controlCluster {cluster:?} ({} bytes, valid by the documented rules):\n{error}",
            cluster.len()
        ),
    };
    // Traffic passes; reports to the absent cluster fail like any failed call.
    send(&envoy, 3, "istio-cluster").await?;
    drop(envoy);
    drop(sim);
    Ok(())
}

#[test]
fn every_envoy_config_in_the_repository_validates() -> anyhow::Result<()> {
    // The configs name the filter by its path in the build tree.
    filter_wasm()?;
    let _ = envoy_binary()?;
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("envoy"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let output = validate(&path)?;
            assert!(
                output.status.success(),
                "{} does not validate:\n{}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "checked {checked} configs");
    // The configs the tests render (other ports, absolute wasm path) validate too.
    let options = EnvoyOptions::with_filter(8000, 9090, r#"{"controlCluster":"flyball_control"}"#);
    let rendered = render_config(&options, 9901, 10000, Some(&filter_wasm()?))?;
    let path = std::env::temp_dir().join(format!("flyball-rendered-{}.yaml", std::process::id()));
    std::fs::write(&path, rendered)?;
    let output = validate(&path);
    let _ = std::fs::remove_file(&path);
    let output = output?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn the_benchmark_baseline_is_flyball_yaml_without_the_filter() -> anyhow::Result<()> {
    // The benchmark's ratios are only fair if the two Envoys differ by the filter alone.
    let dir = repo_root().join("envoy");
    let with_filter = std::fs::read_to_string(dir.join("flyball.yaml"))?;
    let baseline = std::fs::read_to_string(dir.join("baseline.yaml"))?;
    let start = with_filter
        .find("                  - name: flyball\n")
        .ok_or_else(|| anyhow::anyhow!("no flyball filter in flyball.yaml"))?;
    let end = with_filter
        .find("                  - name: envoy.filters.http.router")
        .ok_or_else(|| anyhow::anyhow!("no router in flyball.yaml"))?;
    let without: String = format!("{}{}", &with_filter[..start], &with_filter[end..]);
    let body = |text: &str| -> String {
        text.lines()
            .skip_while(|l| l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&without), body(&baseline));
    Ok(())
}

/// Each Envoy worker has its own connections to the control cluster, and every worker ticks:
/// the worker that sent the latest report sends the next one too, so one Envoy keeps one report
/// stream (one connection) open to the control service, not one per worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_envoy_reports_on_one_stream_whatever_its_worker_count() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let config = serde_json::json!({"controlCluster": "flyball_control", "reportIntervalMs": 100})
        .to_string();
    let mut options = EnvoyOptions::with_filter(sim.local_addr().port(), receiver.port(), &config);
    options.worker_threads = 4;
    let envoy = Envoy::start(&options).await?;
    // A trickle over about 5 s (50 report intervals), served by every worker.
    for _ in 0..25 {
        send(&envoy, 2, "one-stream").await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for("50 reports", Duration::from_secs(20), || {
        let reports = receiver.totals().reports;
        async move { (reports >= 50).then_some(()) }
    })
    .await?;
    let (reports, streams) = (receiver.streamed_reports(), receiver.streams_opened());
    println!("4 workers and the main thread: {reports} reports on {streams} report streams");
    // One, or a few should a busy worker have been half a second late (the takeover delay) once
    // or twice; five, one per thread, without a worker keeping the sending.
    assert!(streams <= 3, "{reports} reports on {streams} streams");
    drop(envoy);
    drop(sim);
    Ok(())
}

/// Whether process `pid` has ended (gone, or a zombie no one has reaped yet).
fn has_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Envoy started by a process that is then killed outright (SIGKILL, so no `Drop` runs: a
/// demo's terminal closed, a test runner's timeout) goes with it, rather than keeping its ports
/// and its report stream to a control service that is gone. The test runs itself again as
/// that process.
#[test]
fn envoy_ends_with_the_process_that_started_it() -> anyhow::Result<()> {
    const AS_THE_STARTER: &str = "FLYBALL_TEST_START_ENVOY_THEN_WAIT";
    const NAME: &str = "envoy_ends_with_the_process_that_started_it";
    if std::env::var_os(AS_THE_STARTER).is_some() {
        let runtime = tokio::runtime::Runtime::new()?;
        let options = EnvoyOptions {
            plugin_config: None,
            ..EnvoyOptions::with_filter(free_port()?, free_port()?, "{}")
        };
        let envoy = runtime.block_on(Envoy::start(&options))?;
        println!("envoy pid {}", envoy.pid());
        std::thread::sleep(Duration::from_secs(300));
        return Ok(());
    }
    use std::io::BufRead;
    let mut starter = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(AS_THE_STARTER, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = starter
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            // After libtest's "test <name> ... ", on the same line.
            if let Some((_, pid)) = line.split_once("envoy pid ") {
                let _ = said.send(pid.trim().parse::<u32>());
            }
        }
    });
    let heard = heard.recv_timeout(Duration::from_secs(60));
    let starter_pid = starter.id();
    starter.kill()?;
    starter.wait()?;
    // Killed, the starter left Envoy's config and log behind (its `Drop` never ran).
    let left = format!("flyball-envoy-{starter_pid}-");
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&left) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let envoy = heard.map_err(|_| {
        anyhow::anyhow!("the starter never said Envoy's pid (Envoy did not start?)")
    })??;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !has_ended(envoy) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ended = has_ended(envoy);
    if !ended {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &envoy.to_string()])
            .status();
    }
    anyhow::ensure!(
        ended,
        "Envoy (pid {envoy}) still ran 20 s after the process that started it was killed"
    );
    Ok(())
}
