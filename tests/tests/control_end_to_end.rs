//! The whole data path: real Envoy with the filter reports to the real ingest of flyball control
//! (file configuration, dry-run actuator) in front of the simulator. A load step must produce the
//! scale-up recommendation its spec makes of it, and the control service's totals (failures
//! included) must equal the simulator's ground truth exactly. Then the same path actuating: load steps at the gateway become `PATCH`es of a
//! Deployment's `/scale` on the in-process API server.

use flyball_local::client::{HttpClient, Response, get, http_client, post};
use flyball_local::envoy::{ControlConnections, ControlTls, Envoy, EnvoyOptions};
use flyball_local::wait_for;
use flyball_relay::Relay;
use flyball_sim::{Outcome, SimConfig, SimServer};
use flyball_tests::LocalControl;
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
autoscalers:
  - name: e2e
    spec:
      selector: { backend: llm }
      pools:
        unified:
          scaleTargetRef: { apiVersion: apps/v1, kind: Deployment, name: llama-e2e }
          minReplicas: 1
          maxReplicas: 10
          capacity: { concurrentSequences: 2, decodeTokensPerSecond: 200 }
      slo: { ttft: 400ms, tpot: 50ms, percentile: 95 }
      dryRun: true
"#;

/// Request `i` of a test. Request 3 names a model longer than the control service takes (a
/// client's typo or attack): the filter labels it `other`, so the report carrying it, and every
/// other request in that report, is still taken.
fn chat(i: usize) -> Vec<u8> {
    let model = if i == 3 {
        "llama-".repeat(400)
    } else {
        "llama-e2e".to_owned()
    };
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "the flyball governor ".repeat(1 + i % 30)}],
        "stream": !i.is_multiple_of(5),
    }))
    .unwrap_or_default()
}

async fn pools(url: &str) -> Option<serde_json::Value> {
    let (status, body) = get(&http_client(), url).await.ok()?;
    if status != 200 {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(&body).ok()?;
    value["pools"].as_array()?.first().cloned()
}

/// Waits up to 10 s for `/v1/pools` at `url` to show a pool `done` accepts (`None`: a field it
/// reads is missing yet); returns that pool.
async fn wait_for_pool(
    what: &str,
    url: &str,
    done: impl Fn(&serde_json::Value) -> Option<bool>,
) -> anyhow::Result<serde_json::Value> {
    wait_for(what, Duration::from_secs(10), || async {
        let pool = pools(url).await?;
        done(&pool)?.then_some(pool)
    })
    .await
}

/// Windows a test can fill in seconds.
const QUICK_WINDOWS: [&str; 6] = [
    "--bucket",
    "250ms",
    "--short-window",
    "2s",
    "--stable-window",
    "10s",
];

/// Envoy with the filter in front of `sim`, reporting every 100 ms as `gateway` to `control`.
fn gateway(sim: &SimServer, control: &LocalControl, gateway: &str) -> EnvoyOptions {
    let plugin = serde_json::json!({
        "controlCluster": "flyball_control",
        "reportIntervalMs": 100,
        "gateway": gateway
    })
    .to_string();
    EnvoyOptions::with_filter(sim.local_addr().port(), control.grpc.port(), &plugin)
}

/// Sends `count` streaming chats of 4 tokens through `envoy`, each answered 200.
async fn send_chats(envoy: &Envoy, count: usize) -> anyhow::Result<()> {
    let client = http_client();
    for i in 0..count {
        let r = post(
            &client,
            envoy.listener(),
            "/v1/chat/completions",
            &chat(i),
            &[("x-sim-output-tokens", "4".to_owned())],
            None,
        )
        .await?;
        anyhow::ensure!(r.status == 200, "request: {}", r.status);
    }
    Ok(())
}

/// The value of `series` (name and labels, exactly as exposed) on `control`'s `/metrics`.
async fn control_metric(control: &LocalControl, series: &str) -> Option<f64> {
    let metrics = format!("http://{}/metrics", control.http);
    let (_, text) = get(&http_client(), &metrics).await.ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series)
            .then(|| value.parse::<f64>().ok())
            .flatten()
    })
}

/// Starts `count` streams at once (numbered from `first`), each `output_tokens` tokens 20 ms
/// apart after a 50 ms first token.
fn start_streams(
    client: &HttpClient,
    envoy: &Envoy,
    first: usize,
    count: usize,
    output_tokens: u32,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<Response>>> {
    (first..first + count)
        .map(|i| {
            let client = client.clone();
            let addr = envoy.listener();
            let body = chat(i);
            tokio::spawn(async move {
                let headers = [
                    ("x-sim-ttft-ms", "50".to_owned()),
                    ("x-sim-itl-ms", "20".to_owned()),
                    ("x-sim-output-tokens", output_tokens.to_string()),
                ];
                post(&client, addr, "/v1/chat/completions", &body, &headers, None).await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_step_scales_up_and_control_totals_equal_the_simulator() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let control =
        LocalControl::start(CONFIG, &[&["--dry-run"][..], &QUICK_WINDOWS].concat()).await?;
    let envoy = Envoy::start(&gateway(&sim, &control, "e2e-control")).await?;
    let url = control.pools_url();

    // A trickle first: one request at a time, well within one replica's capacity.
    let client = http_client();
    let mut sent = 0usize;
    for _ in 0..10 {
        let headers = [
            ("x-sim-ttft-ms", "20".to_owned()),
            ("x-sim-itl-ms", "5".to_owned()),
            ("x-sim-output-tokens", "8".to_owned()),
        ];
        let r = post(
            &client,
            envoy.listener(),
            "/v1/chat/completions",
            &chat(sent),
            &headers,
            None,
        )
        .await?;
        anyhow::ensure!(r.status == 200, "trickle request: {}", r.status);
        sent += 1;
    }
    let before = wait_for_pool("control to see the trickle", &url, |pool| {
        Some(pool["requests"].as_u64()? >= 10)
    })
    .await?;
    let desired_before = before["replicas"]["desired"].as_u64().unwrap_or(0);
    assert_eq!(desired_before, 1, "a trickle needs one replica: {before}");

    // The step: 24 long streams at once, far over 2 sequences per replica.
    let step_started = Instant::now();
    let tasks = start_streams(&client, &envoy, sent, 24, 120);
    sent += 24;
    let scaled = wait_for_pool("a scale-up recommendation", &url, |pool| {
        Some(pool["replicas"]["desired"].as_u64()? > 1)
    })
    .await?;
    let decision_latency = step_started.elapsed();
    println!(
        "load step -> scale-up recommendation in {decision_latency:?} (reports every 100 ms): {}",
        scaled["last_decision"]
    );
    let desired = scaled["replicas"]["desired"].as_u64().unwrap_or(0);
    assert!(desired >= 2, "{scaled}");
    for task in tasks {
        let response = task.await??;
        anyhow::ensure!(response.status == 200, "step request: {}", response.status);
    }
    // The recommendation the spec makes of 24 sequences in flight: feed-forward 24 / 2 per
    // replica = 12, held to maxReplicas 10, reached by steps of at most maxStep 4 a second.
    let (status, body) = get(&client, &format!("http://{}/v1/decisions", control.http)).await?;
    anyhow::ensure!(status == 200, "/v1/decisions: {status}");
    let log: serde_json::Value = serde_json::from_str(&body)?;
    let decisions = log["pools"][0]["decisions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let at_the_peak = decisions.iter().find(|d| {
        let load = &d["details"]["load"];
        load["decoding_sequences"].as_u64().unwrap_or(0)
            + load["waiting_sequences"].as_u64().unwrap_or(0)
            == 24
    });
    let at_the_peak =
        at_the_peak.ok_or_else(|| anyhow::anyhow!("no decision saw the 24 sequences: {log}"))?;
    assert_eq!(
        at_the_peak["details"]["feed_forward_replicas"].as_u64(),
        Some(12),
        "{at_the_peak}"
    );
    assert_eq!(
        at_the_peak["details"]["recommended_replicas"].as_u64(),
        Some(10),
        "{at_the_peak}"
    );
    let ups: Vec<(u64, u64)> = decisions
        .iter()
        .filter(|d| d["action"] == "scaleUp")
        .map(|d| {
            (
                d["from"].as_u64().unwrap_or(0),
                d["to"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    anyhow::ensure!(
        ups.first().is_some_and(|(from, _)| *from == 1)
            && ups
                .iter()
                .all(|(from, to)| to > from && to - from <= 4 && *to <= 10)
            && ups.iter().any(|(_, to)| *to >= 5),
        "scale-ups from 1, each by at most 4 up to 10, reaching 1 + 4 at least: {ups:?}"
    );

    // Failures the simulator answers at once: 503s (server errors) and 429s (client errors, as
    // an overloaded server answers). Nothing is generated for them: they add requests and
    // errors, and no tokens.
    for status in [503u16, 503, 503, 429, 429] {
        let headers = [("x-sim-error", status.to_string())];
        let r = post(
            &client,
            envoy.listener(),
            "/v1/chat/completions",
            &chat(sent),
            &headers,
            None,
        )
        .await?;
        anyhow::ensure!(
            r.status == status,
            "failing request: {}, not {status}",
            r.status
        );
        sent += 1;
    }

    // Totals: exactly what the simulator's log says it did.
    let truth = wait_for(
        "the simulator to log every request",
        Duration::from_secs(10),
        || {
            let log = sim.ground_truth();
            async move { (log.len() >= sent).then_some(log) }
        },
    )
    .await?;
    assert_eq!(truth.len(), sent, "the simulator logged every request once");
    let served: Vec<_> = truth.iter().filter(|t| t.outcome == Outcome::Ok).collect();
    let want_errors = truth.len() - served.len();
    assert_eq!(
        want_errors, 5,
        "the simulator failed the five it was told to"
    );
    let want_input: u64 = served.iter().map(|t| t.prompt_tokens).sum();
    let want_output: u64 = truth.iter().map(|t| t.completion_tokens_sent).sum();
    assert!(
        served.iter().all(|t| t.usage_reported),
        "every request served here reports usage"
    );
    let pool = wait_for_pool("control totals to cover every request", &url, |pool| {
        Some(pool["requests"].as_u64()? >= truth.len() as u64 && pool["in_flight"].as_u64()? == 0)
    })
    .await?;
    assert_eq!(
        pool["requests"].as_u64(),
        Some(truth.len() as u64),
        "{pool}"
    );
    assert_eq!(pool["errors"].as_u64(), Some(want_errors as u64), "{pool}");
    assert_eq!(pool["input_tokens"].as_u64(), Some(want_input), "{pool}");
    assert_eq!(pool["output_tokens"].as_u64(), Some(want_output), "{pool}");
    let ttft_p50 = pool["ttft_ms"]["p50"].as_f64().unwrap_or(0.0);
    assert!(
        ttft_p50 >= 20.0,
        "TTFT p50 reflects the simulator's delays: {pool}"
    );

    drop(envoy);
    control.stop().await?;
    Ok(())
}

/// As [`CONFIG`], actuating: replicas set through the API server's `/scale`.
const ACTUATING: &str = r#"
autoscalers:
  - name: e2e-actuating
    spec:
      selector: { backend: llm }
      pools:
        unified:
          scaleTargetRef: { apiVersion: apps/v1, kind: Deployment, name: llama-e2e, namespace: default }
          minReplicas: 1
          maxReplicas: 40
          capacity: { concurrentSequences: 2, decodeTokensPerSecond: 200 }
      slo: { ttft: 400ms, tpot: 50ms, percentile: 95 }
      behavior:
        scaleUp: { stabilizationWindow: 0s, maxStep: 40, period: 1s }
"#;

/// The whole loop, as the mission states it: a load step at the gateway becomes a `PATCH` of the
/// Deployment's `/scale` on the API server (here the in-process one, through an ordinary
/// `kube::Client`, leader Lease and all), three times, each step larger than the replicas made
/// ready after the last. It prints how long each took; it asserts only that each step was
/// answered with enough replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_steps_at_the_gateway_set_replicas_on_the_api_server() -> anyhow::Result<()> {
    let api = flyball_apiserver::ApiServer::start().await?;
    api.seed_deployment("default", "llama-e2e", 1, 1)?;
    let config = std::env::temp_dir().join(format!("flyball-e2e-{}.yaml", std::process::id()));
    std::fs::write(&config, ACTUATING)?;
    let config_flag = config.display().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let control = LocalControl::start_on_kubernetes(
        api.client(),
        &[
            &[
                "--config",
                &config_flag,
                "--lease-namespace",
                "default",
                "--identity",
                "e2e",
            ][..],
            &QUICK_WINDOWS,
        ]
        .concat(),
    )
    .await;
    let _ = std::fs::remove_file(&config);
    let control = control?;
    let envoy = Envoy::start(&gateway(&sim, &control, "e2e-actuating")).await?;
    let client = http_client();
    let scale_path = "/apis/apps/v1/namespaces/default/deployments/llama-e2e/scale";

    let deployment_replicas = || {
        api.object("apps/v1", "Deployment", "default", "llama-e2e")
            .and_then(|d| d["spec"]["replicas"].as_u64())
    };
    let mut ready = 1u64;
    let mut took = Vec::new();
    let mut sent = 0usize;
    // 2 sequences per replica: each step needs twice the replicas made ready after the last.
    for streams in [4usize, 8, 16, 32, 64] {
        // Quiet first: control has seen the ready replicas and asks for no more, so the PATCH
        // below answers this step and nothing before it.
        wait_for_pool(
            "control to settle on the ready replicas",
            &control.pools_url(),
            |pool| {
                Some(
                    pool["replicas"]["ready"].as_u64()? == ready
                        && pool["replicas"]["desired"].as_u64()? == ready
                        && pool["in_flight"].as_u64()? == 0,
                )
            },
        )
        .await?;
        let seen = api.requests().len();
        let step_started = Instant::now();
        let tasks = start_streams(&client, &envoy, sent, streams, 50);
        sent += streams;
        let patched_at = wait_for(
            "a PATCH of the Deployment's /scale asking for more replicas",
            Duration::from_secs(10),
            || {
                let patch = api.requests().into_iter().skip(seen).find_map(|r| {
                    let replicas = r.body.as_ref()?["spec"]["replicas"].as_u64()?;
                    (r.method == "PATCH"
                        && r.path == scale_path
                        && r.status == Some(200)
                        && replicas > ready)
                        .then_some(r.received_at)
                });
                async move { patch }
            },
        )
        .await?;
        took.push(patched_at.saturating_duration_since(step_started));
        for task in tasks {
            let response = task.await??;
            anyhow::ensure!(response.status == 200, "step request: {}", response.status);
        }
        // The first PATCH may come from a report that saw only part of the step; by the time
        // control has seen the streams end, the replicas asked for cover all of it.
        wait_for_pool(
            "control to see the step end",
            &control.pools_url(),
            |pool| Some(pool["in_flight"].as_u64()? == 0),
        )
        .await?;
        let asked = deployment_replicas().unwrap_or(0);
        let needed = streams.div_ceil(2) as u64;
        assert!(
            asked >= needed,
            "{streams} streams at 2 per replica need {needed} replicas; {asked} asked for"
        );
        // The Deployment's pods come up: all of them ready before the next step.
        api.set_ready_replicas(
            "apps/v1",
            "Deployment",
            "default",
            "llama-e2e",
            i32::try_from(asked)?,
        )?;
        ready = asked;
    }
    let mut sorted = took.clone();
    sorted.sort_unstable();
    println!(
        "load step at the gateway -> PATCH /scale at the API server (reports every 100 ms): \
         median {} ms, min {} ms, max {} ms over {} steps ({})",
        sorted[sorted.len() / 2].as_millis(),
        sorted[0].as_millis(),
        sorted[sorted.len() - 1].as_millis(),
        took.len(),
        took.iter()
            .map(|d| format!("{} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    drop(envoy);
    control.stop().await?;
    Ok(())
}

/// A gateway that goes away (its pod deleted: SIGTERM to Envoy) is gone, not missing: Envoy
/// closes its report streams when it exits, so the control service does not hold its pools'
/// scale-down for it until `--forget-after`, as it would for a gateway merely gone quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_envoy_exits_is_gone_not_missing() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let control = LocalControl::start(CONFIG, &["--dry-run", "--stale-after", "1s"]).await?;
    let mut envoy = Envoy::start(&gateway(&sim, &control, "e2e-exits")).await?;
    send_chats(&envoy, 5).await?;
    let metric = |series: &'static str| control_metric(&control, series);
    let silent = r#"flyball_pool_silent_reporters{autoscaler="e2e",namespace="default",pool="llama-e2e",role="unified"}"#;
    let url = control.pools_url();
    wait_for_pool("control to see the requests", &url, |pool| {
        Some(pool["requests"].as_u64()? >= 5)
    })
    .await?;
    assert_eq!(metric("flyball_reporters{state=\"live\"}").await, Some(1.0));

    let status = envoy.terminate(Duration::from_secs(30)).await?;
    println!("Envoy exited ({status}) after SIGTERM");
    wait_for(
        "the gateway to be quiet",
        Duration::from_secs(10),
        || async { (metric("flyball_reporters{state=\"live\"}").await? == 0.0).then_some(()) },
    )
    .await?;
    let departed = metric("flyball_ingest_departed_total").await;
    let stale = metric("flyball_reporters{state=\"stale\"}").await;
    let holding = metric(silent).await;
    assert_eq!(departed, Some(1.0), "{}", envoy.log_tail(20));
    assert_eq!(stale, Some(0.0));
    assert_eq!(
        holding,
        Some(0.0),
        "nothing holds scale-down for a gateway that is gone"
    );
    drop(envoy);
    control.stop().await?;
    Ok(())
}

/// A gateway cut off one way from the control service (its reports arrive, the
/// acknowledgements do not, and no new connection completes) is held for, as a gateway cut off
/// is, not taken for gone: on Istio's cluster with `deploy/istio/destinationrule.yaml` (one
/// request a connection, no pings) Envoy closes a connection as soon as its stream is reset, so
/// the filter leaves an unanswered stream half-closed instead, and the connection stays open.
/// (With the stream reset, the control service saw the connection end while the gateway was
/// live, and took it for gone once quiet: `flyball_ingest_departed_total` 1, nothing held.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_one_way_is_held_for_not_taken_for_gone() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    // Quiet only well after the filter's 1 s report timeout: a connection the gateway ended then
    // would end while it was live, which is what reads as Envoy exiting.
    let control = LocalControl::start(CONFIG, &["--dry-run", "--stale-after", "3s"]).await?;
    let relay = Relay::start(control.grpc).await?;
    // One worker: each worker's reports go on a stream, so a connection, of its own.
    let options = EnvoyOptions {
        worker_threads: 1,
        control_port: relay.addr().port(),
        control_connections: ControlConnections::WithoutPings {
            max_requests_per_connection: Some(1),
        },
        ..gateway(&sim, &control, "e2e-one-way")
    };
    let envoy = Envoy::start(&options).await?;
    send_chats(&envoy, 5).await?;
    wait_for_pool(
        "control to see the requests",
        &control.pools_url(),
        |pool| Some(pool["requests"].as_u64()? >= 5),
    )
    .await?;
    let metric = |series: &'static str| control_metric(&control, series);
    assert_eq!(metric("flyball_reporters{state=\"live\"}").await, Some(1.0));

    relay.refuse_new_connections();
    relay.cut_replies();
    // The filter gives up on a report after 1 s; its next one finds no connection.
    wait_for(
        "two reports to fail at the gateway",
        Duration::from_secs(10),
        || async {
            let failed = envoy
                .metric_sum("flyball_reports_failed_total", &[])
                .await
                .ok()?;
            (failed >= 2.0).then_some(())
        },
    )
    .await?;
    wait_for(
        "the gateway to be quiet",
        Duration::from_secs(10),
        || async { (metric("flyball_reporters{state=\"live\"}").await? == 0.0).then_some(()) },
    )
    .await?;
    let silent = r#"flyball_pool_silent_reporters{autoscaler="e2e",namespace="default",pool="llama-e2e",role="unified"}"#;
    assert_eq!(
        metric("flyball_ingest_departed_total").await,
        Some(0.0),
        "taken for gone: {}",
        envoy.log_tail(20)
    );
    assert_eq!(
        metric("flyball_reporters{state=\"stale\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(silent).await,
        Some(1.0),
        "scale-down held for the gateway cut off"
    );
    // The gateway ended no connection. (Through the relay, whose kernel acknowledges what the
    // control service sends, the control service's own give-up does not come: not tested here.)
    let ended = metric("flyball_grpc_connections_closed_total{how=\"ended\"}").await;
    assert_eq!(ended.unwrap_or(0.0), 0.0, "connections ended");
    drop(envoy);
    control.stop().await?;
    Ok(())
}

/// The same path with mutual TLS between Envoy's control cluster and `flyball control`
/// (`--grpc-tls-*`): every request still lands, exactly once, and over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reach_control_over_mutual_tls() -> anyhow::Result<()> {
    let certs = flyball_local::repo_root().join("control/tests/tls");
    let cert = |name: &str| certs.join(name).display().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let (replica_crt, replica_key, ca) = (cert("replica.crt"), cert("replica.key"), cert("ca.crt"));
    let control = LocalControl::start(
        CONFIG,
        &[
            "--dry-run",
            "--grpc-tls-cert",
            &replica_crt,
            "--grpc-tls-key",
            &replica_key,
            "--grpc-tls-ca",
            &ca,
        ],
    )
    .await?;
    let mut options = gateway(&sim, &control, "e2e-tls");
    options.control_tls = Some(ControlTls {
        cert: certs.join("replica.crt"),
        key: certs.join("replica.key"),
        ca: certs.join("ca.crt"),
        server_name: "flyball-control".into(),
    });
    let envoy = Envoy::start(&options).await?;
    let url = control.pools_url();

    let client = http_client();
    let sent = 6;
    for i in 0..sent {
        let headers = [("x-sim-output-tokens", "4".to_owned())];
        let r = post(
            &client,
            envoy.listener(),
            "/v1/chat/completions",
            &chat(i),
            &headers,
            None,
        )
        .await?;
        anyhow::ensure!(r.status == 200, "request {i}: {}", r.status);
    }
    let pool = wait_for_pool("control to count every request", &url, |pool| {
        Some(pool["requests"].as_u64()? >= sent as u64)
    })
    .await?;
    assert_eq!(pool["requests"].as_u64(), Some(sent as u64), "{pool}");
    let handshakes = envoy
        .metric_sum(
            "envoy_cluster_ssl_handshake",
            &[("envoy_cluster_name", "flyball_control")],
        )
        .await?;
    assert!(
        handshakes >= 1.0,
        "the reports went over TLS: {handshakes} handshakes"
    );

    drop(envoy);
    control.stop().await?;
    Ok(())
}
