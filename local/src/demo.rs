//! `flyball demo`: the whole data path on one machine, with real Envoy.
//!
//! simulator <- Envoy (2 workers, the flyball filter) <- demo clients
//!                 `--> reports every 200 ms --> flyball control (dry-run) --> /v1/pools
//!
//! It sends a few waves of OpenAI-compatible requests (streaming chat, non-streaming chat,
//! legacy completions, an error), then prints what the filter measured, as Envoy stats and as
//! the control service's merged view and scaling recommendation. `--keep-running` leaves the
//! stack up for your own curl requests.

use crate::client::{get, http_client, post};
use crate::control::LocalControl;
use crate::envoy::{Envoy, EnvoyOptions, prometheus_sum};
use crate::wait_for;
use flyball_sim::{SimConfig, SimServer};
use std::time::{Duration, Instant};

/// The autoscaler the demo's control service runs (dry-run: there is no cluster here).
const DEMO_CONTROL_CONFIG: &str = r#"
autoscalers:
  - name: demo
    spec:
      selector: { backend: llm }
      pools:
        unified:
          scaleTargetRef: { apiVersion: apps/v1, kind: Deployment, name: llama-demo }
          minReplicas: 1
          maxReplicas: 8
          capacity: { concurrentSequences: 4, decodeTokensPerSecond: 400 }
      slo: { ttft: 300ms, tpot: 30ms, percentile: 95 }
      dryRun: true
"#;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Streaming requests in the load wave.
    #[arg(long, default_value_t = 60)]
    pub requests: usize,
    /// Requests in flight at once during the wave.
    #[arg(long, default_value_t = 12)]
    pub concurrency: usize,
    /// Keep Envoy, the simulator and control running until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

/// The models the demo's gateway routes to (the simulator serves both).
const DEMO_MODELS: [&str; 2] = ["llama-3.1-8b", "qwen2.5-7b"];

fn chat(model: &str, stream: bool, words: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "explain the flyball governor ".repeat(words)}],
        "stream": stream,
        "max_tokens": 48
    }))
    .unwrap_or_default()
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    // One simulator serves both models under their names, refusing others as vLLM would.
    let sim_config = SimConfig {
        model: DEMO_MODELS[0].to_owned(),
        aliases: DEMO_MODELS[1..].iter().map(|m| (*m).to_owned()).collect(),
        refuse_other_models: true,
        ..SimConfig::default()
    };
    let sim = SimServer::start(sim_config, listener).await?;
    println!("simulator      http://{}", sim.local_addr());

    let control = LocalControl::start(DEMO_CONTROL_CONFIG, &["--dry-run"]).await?;
    let (grpc, http) = (control.grpc, control.http);
    println!("flyball control gRPC {grpc}, HTTP http://{http}/v1/pools");

    let plugin = serde_json::json!({
        "controlCluster": "flyball_control",
        "reportIntervalMs": 200,
        "gateway": "demo-envoy"
    })
    .to_string();
    let envoy = Envoy::start(&EnvoyOptions::with_filter(
        sim.local_addr().port(),
        grpc.port(),
        &plugin,
    ))
    .await?;
    println!(
        "envoy          http://{} (admin http://127.0.0.1:{}/stats/prometheus)",
        envoy.listener(),
        envoy.admin_port
    );

    let client = http_client();
    let addr = envoy.listener();
    println!(
        "\n== {} streaming chat requests, {} at a time",
        args.requests, args.concurrency
    );
    let started = Instant::now();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::new();
    for i in 0..args.requests {
        let client = client.clone();
        let semaphore = semaphore.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let model = DEMO_MODELS[i % DEMO_MODELS.len()];
            post(
                &client,
                addr,
                "/v1/chat/completions",
                &chat(model, true, 5 + i % 50),
                &[],
                None,
            )
            .await
        }));
    }
    let mut ok = 0;
    let mut client_ttfb = Vec::new();
    for task in tasks {
        if let Ok(Ok(response)) = task.await {
            if response.status == 200 {
                ok += 1;
            }
            client_ttfb.extend(response.first_byte_after);
        }
    }
    client_ttfb.sort();
    println!(
        "{ok}/{} ok in {:.1}s; client time to first byte p50 {:?}",
        args.requests,
        started.elapsed().as_secs_f64(),
        client_ttfb
            .get(client_ttfb.len() / 2)
            .copied()
            .unwrap_or_default()
    );

    println!("== a non-streaming chat, a legacy completion, and a 503 from the server");
    let plain = post(
        &client,
        addr,
        "/v1/chat/completions",
        &chat(DEMO_MODELS[0], false, 3),
        &[],
        None,
    )
    .await?;
    println!(
        "non-streaming chat: {} ({} bytes)",
        plain.status,
        plain.body.len()
    );
    let legacy = serde_json::to_vec(
        &serde_json::json!({"model": DEMO_MODELS[1], "prompt": "once upon a time", "stream": true}),
    )?;
    let legacy = post(&client, addr, "/v1/completions", &legacy, &[], None).await?;
    println!(
        "legacy completion stream: {} ({} bytes)",
        legacy.status,
        legacy.body.len()
    );
    let error = post(
        &client,
        addr,
        "/v1/chat/completions",
        &chat(DEMO_MODELS[0], true, 1),
        &[("x-sim-error", "503".to_owned())],
        None,
    )
    .await?;
    println!("forced server error: {}", error.status);
    let expected = args.requests as f64 + 3.0;

    // Reports go out every 200 ms; wait until control has merged every request.
    let pools_url = format!("http://{http}/v1/pools");
    let pools = wait_for(
        "control to merge every request",
        Duration::from_secs(15),
        || {
            let client = client.clone();
            let url = pools_url.clone();
            async move {
                let (_, body) = get(&client, &url).await.ok()?;
                let pools: serde_json::Value = serde_json::from_str(&body).ok()?;
                let requests: f64 = pools["pools"]
                    .as_array()?
                    .iter()
                    .filter_map(|p| p["requests"].as_f64())
                    .sum();
                (requests >= expected).then_some(pools)
            }
        },
    )
    .await?;

    let stats = envoy.prometheus().await?;
    println!("\n== Envoy stats (GET /stats/prometheus, flyball_*)");
    for line in stats
        .lines()
        .filter(|l| l.starts_with("flyball_") && !l.contains("_bucket"))
    {
        println!("  {line}");
    }
    println!(
        "  => requests ok {} / server errors {}",
        prometheus_sum(&stats, "flyball_requests_total", &[("outcome", "ok")]),
        prometheus_sum(
            &stats,
            "flyball_requests_total",
            &[("outcome", "server_error")]
        )
    );
    println!("\n== flyball control: GET /v1/pools");
    println!("{}", serde_json::to_string_pretty(&pools)?);

    if args.keep_running {
        println!(
            "\nrunning; try:\n  curl -N http://{addr}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"llama-3.1-8b\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'\nCtrl-C to stop"
        );
        // Until Ctrl-C or SIGTERM, which `flyball demo` races this with (dropping all of it).
        std::future::pending::<()>().await;
    }
    drop(envoy);
    control.stop().await?;
    sim.shutdown().await;
    Ok(())
}
