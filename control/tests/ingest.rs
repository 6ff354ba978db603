//! Ingest through its real wire: a tonic client against the real server on loopback, totals read
//! back from the real HTTP server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use flyball_proto::Sketch;
use flyball_proto::grpc::telemetry_service_client::TelemetryServiceClient;
use flyball_proto::v1;
use support::{Error, ONE_POOL};
use tonic::transport::Channel;

fn report(gateway: &str, start_ms: u64, sequence: u64, ok: u64) -> v1::ReportRequest {
    let mut ttft = Sketch::new();
    ttft.record(150_000.0 + sequence as f64 * 1_000.0);
    v1::ReportRequest {
        reporter: Some(v1::Reporter {
            gateway: gateway.into(),
            process_start_unix_ms: start_ms,
            filter_version: "test".into(),
        }),
        sequence,
        sent_at_unix_ms: 0,
        keys: vec![
            v1::KeyTelemetry {
                backend: "vllm".into(),
                model: "llama".into(),
                requests: Some(v1::RequestOutcomes {
                    ok,
                    server_error: 1,
                    ..Default::default()
                }),
                tokens: Some(v1::TokenUsage {
                    input: 100 * ok,
                    output: 10 * ok,
                    ..Default::default()
                }),
                ttft_us: Some(v1::Sketch::from(&ttft)),
                in_flight: Some(v1::InFlight {
                    waiting_first_token: 0,
                    decoding: 1,
                }),
                ..Default::default()
            },
            // Another backend: tracked, but in no pool.
            v1::KeyTelemetry {
                backend: "other".into(),
                model: "llama".into(),
                requests: Some(v1::RequestOutcomes {
                    ok: 1000,
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
        dropped: None,
        held_ms: 0,
        connections_closed: false,
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Expected {
    requests: u64,
    errors: u64,
    input_tokens: u64,
    output_tokens: u64,
    duplicates: u64,
    gaps: u64,
    missing: u64,
    restarts: u64,
}

impl Expected {
    fn merged(&mut self, ok: u64) {
        self.requests += ok + 1;
        self.errors += 1;
        self.input_tokens += 100 * ok;
        self.output_tokens += 10 * ok;
    }

    fn add(&mut self, other: Expected) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.duplicates += other.duplicates;
        self.gaps += other.gaps;
        self.missing += other.missing;
        self.restarts += other.restarts;
    }
}

/// How a test gateway reports: unary calls, or messages on one `ReportStream`.
enum Reporting {
    Unary(TelemetryServiceClient<Channel>),
    Stream {
        reports: tokio::sync::mpsc::Sender<v1::ReportRequest>,
        acks: tonic::Streaming<v1::ReportResponse>,
    },
}

impl Reporting {
    async fn stream(mut client: TelemetryServiceClient<Channel>) -> Result<Reporting, Error> {
        let (reports, outbound) = tokio::sync::mpsc::channel(1);
        let acks = client
            .report_stream(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok(Reporting::Stream { reports, acks })
    }

    /// Sends `gateway`'s reports (process 1, one ok request each) numbered `sequences`, each
    /// acknowledged in turn.
    async fn send_acked(
        &mut self,
        gateway: &str,
        sequences: std::ops::RangeInclusive<u64>,
    ) -> Result<(), Error> {
        for sequence in sequences {
            assert_eq!(self.send(report(gateway, 1, sequence, 1)).await?, sequence);
        }
        Ok(())
    }

    /// Sends one report; returns the sequence acknowledged, or the refusal.
    async fn send(&mut self, report: v1::ReportRequest) -> Result<u64, tonic::Status> {
        match self {
            Reporting::Unary(client) => {
                Ok(client.report(report).await?.get_ref().acknowledged_sequence)
            }
            Reporting::Stream { reports, acks } => {
                if reports.send(report).await.is_err() {
                    return Err(tonic::Status::unavailable("stream closed"));
                }
                match acks.message().await? {
                    Some(ack) => Ok(ack.acknowledged_sequence),
                    None => Err(tonic::Status::unavailable("stream ended without an ack")),
                }
            }
        }
    }
}

/// One gateway's 20 reports. Every tenth gateway resends every fifth report; another skips two
/// sequence numbers; another restarts halfway and counts from 1 again.
async fn gateway(mut client: Reporting, i: usize) -> Result<Expected, Error> {
    let name = format!("gw-{i}");
    let mut expected = Expected::default();
    let mut start_ms = 1_000;
    let mut sequence = 0;
    for k in 1..=20u64 {
        let ok = 1 + k % 3;
        sequence += 1;
        if i % 10 == 1 && k == 7 {
            sequence += 2;
            expected.gaps += 1;
            expected.missing += 2;
        }
        if i % 10 == 2 && k == 11 {
            start_ms = 2_000;
            sequence = 1;
            expected.restarts += 1;
        }
        let ack = client.send(report(&name, start_ms, sequence, ok)).await?;
        assert_eq!(ack, sequence);
        expected.merged(ok);
        if i.is_multiple_of(10) && k.is_multiple_of(5) {
            let again = client.send(report(&name, start_ms, sequence, ok)).await?;
            assert_eq!(again, sequence);
            expected.duplicates += 1;
        }
    }
    Ok(expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_reporters_add_up_exactly() -> Result<(), Error> {
    // Nobody goes stale while the counts are read.
    let control = support::start(ONE_POOL, &["--stale-after", "60s"]).await?;
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(Channel::from_shared(control.grpc_uri())?.connect().await?);
    }
    let mut tasks = tokio::task::JoinSet::new();
    // Half the gateways report on streams, half by unary calls, sharing connections.
    for i in 0..300 {
        let client = TelemetryServiceClient::new(channels[i % channels.len()].clone());
        let reporting = if i % 20 < 10 {
            Reporting::stream(client).await?
        } else {
            Reporting::Unary(client)
        };
        tasks.spawn(gateway(reporting, i));
    }
    let mut expected = Expected::default();
    while let Some(done) = tasks.join_next().await {
        expected.add(done??);
    }
    assert_eq!(expected.duplicates, 30 * 4);
    assert_eq!(expected.gaps, 30);
    assert_eq!(expected.restarts, 30);

    let pools = control.pools().await?;
    let pool = &pools["pools"][0];
    assert_eq!(pool["name"], "llama");
    assert_eq!(pool["autoscaler"], "llama");
    assert_eq!(pool["role"], "unified");
    assert_eq!(pool["requests"], expected.requests);
    assert_eq!(pool["errors"], expected.errors);
    assert_eq!(pool["input_tokens"], expected.input_tokens);
    assert_eq!(pool["output_tokens"], expected.output_tokens);
    // Each gateway's latest gauge is one request decoding; restarted gateways' old processes
    // are retired.
    assert_eq!(pool["in_flight"], 300);
    let p50 = pool["ttft_ms"]["p50"].as_f64().ok_or("no ttft p50")?;
    assert!((150.0..=175.0).contains(&p50), "{p50}");

    let total = |name: &str| {
        let control = &control;
        let series = format!("flyball_ingest_{name}_total");
        async move { control.metric(&series).await }
    };
    let reports_sent = 300 * 20;
    assert_eq!(total("reports").await?, Some(reports_sent as f64));
    assert_eq!(total("duplicates").await?, Some(expected.duplicates as f64));
    assert_eq!(total("gaps").await?, Some(expected.gaps as f64));
    assert_eq!(
        total("missing_reports").await?,
        Some(expected.missing as f64)
    );
    assert_eq!(total("restarts").await?, Some(expected.restarts as f64));
    // The 30 restarted gateways' old processes are not taken as gone for their gateway's
    // restart: live until they go quiet (then missing, as their connections, shared with other
    // gateways, say nothing of them when they close).
    assert_eq!(
        control.metric("flyball_reporters{state=\"live\"}").await?,
        Some(330.0)
    );
    assert_eq!(
        control.metric("flyball_reporters{state=\"stale\"}").await?,
        Some(0.0)
    );
    control.stop().await
}

/// Field 1 of a `ReportRequest` is the reporter, a message; here it is a number.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAReport {
    #[prost(uint64, tag = "1")]
    reporter: u64,
}

/// Sends bytes that do not decode as a `ReportRequest` to `Report`; returns the refusal.
async fn send_not_a_report(uri: String) -> tonic::Status {
    let channel = Channel::from_shared(uri).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<NotAReport, v1::ReportResponse>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/flyball.v1.TelemetryService/Report");
    grpc.unary(tonic::Request::new(NotAReport { reporter: 7 }), path, codec)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn garbage_is_refused_with_the_reason_and_merges_nothing() -> Result<(), Error> {
    let control = support::start(ONE_POOL, &["--max-report-bytes", "65536"]).await?;
    let mut client = TelemetryServiceClient::connect(control.grpc_uri()).await?;

    let mut bad_sketch = report("gw", 1, 1, 5);
    if let Some(sketch) = bad_sketch.keys[0].ttft_us.as_mut() {
        sketch.relative_accuracy = 0.01;
    }
    let status = client.report(bad_sketch).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("keys[0].ttft_us: relative_accuracy = 0.01: must be 0.02"),
        "{}",
        status.message()
    );

    // A sparse sketch whose gaps and counts do not pair up.
    let mut uneven = report("gw", 1, 1, 5);
    if let Some(sketch) = uneven.keys[0].ttft_us.as_mut() {
        sketch.counts.clear();
        (sketch.sparse_gaps, sketch.sparse_counts) = (vec![0, 3], vec![5]);
    }
    let status = client.report(uneven).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "keys[0].ttft_us: sparse_gaps has 2 entries and sparse_counts 1: one gap per count"
    );

    // A summary no recording produces: its quantiles would panic downstream.
    let mut swapped = report("gw", 1, 1, 5);
    if let Some(sketch) = swapped.keys[0].ttft_us.as_mut() {
        (sketch.min, sketch.max) = (sketch.max + 1.0, sketch.min);
    }
    let status = client.report(swapped).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("keys[0].ttft_us: min = "),
        "{}",
        status.message()
    );

    // A min its buckets contradict: every quantile of the window would be clamped up to it.
    let mut forged = report("gw", 1, 1, 5);
    if let Some(sketch) = forged.keys[0].ttft_us.as_mut() {
        (sketch.min, sketch.max) = (3_600e6, 3_600e6);
    }
    let status = client.report(forged).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("keys[0].ttft_us: min = 3600000000: its buckets put the min near "),
        "{}",
        status.message()
    );

    let status = client.report(report("gw", 1, 0, 5)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "sequence = 0: sequences start at 1");

    let status = client.report(report("", 1, 1, 5)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("gateway is empty"));

    let mut oversize = report("gw", 1, 1, 5);
    oversize.keys[0].ttft_us = Some(v1::Sketch {
        relative_accuracy: 0.02,
        counts: vec![u64::MAX; 100_000],
        ..Default::default()
    });
    let status = client.report(oversize).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("report over the size limit"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("65536"), "{}", status.message());

    let status = send_not_a_report(control.grpc_uri()).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("not a flyball.v1.ReportRequest: "),
        "{}",
        status.message()
    );

    // Only a forwarding replica says a gateway's connections closed.
    let mut word = report("other-gw", 1, 1, 0);
    word.keys.clear();
    word.connections_closed = true;
    let status = client.report(word).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("connections_closed: "),
        "{}",
        status.message()
    );

    // The connection is still good, and nothing refused was merged.
    client.report(report("gw", 1, 1, 5)).await?;
    let pools = control.pools().await?;
    assert_eq!(pools["pools"][0]["requests"], 6);
    for (reason, n) in [
        ("bad_sketch", 4.0),
        ("zero_sequence", 1.0),
        ("no_gateway", 1.0),
        ("oversize", 1.0),
        ("malformed", 1.0),
        ("connections_closed_not_forwarded", 1.0),
    ] {
        let series = format!("flyball_ingest_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(control.metric(&series).await?, Some(n), "{series}");
    }
    control.stop().await
}

#[tokio::test]
async fn a_refused_report_ends_its_stream_with_the_reason() -> Result<(), Error> {
    let control = support::start(ONE_POOL, &["--max-report-bytes", "65536"]).await?;
    let client = TelemetryServiceClient::connect(control.grpc_uri()).await?;

    let mut stream = Reporting::stream(client.clone()).await?;
    assert_eq!(stream.send(report("gw", 1, 1, 5)).await?, 1);
    let status = stream.send(report("gw", 1, 0, 5)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "sequence = 0: sequences start at 1");
    let closed = stream.send(report("gw", 1, 2, 5)).await.unwrap_err();
    assert_eq!(closed.code(), tonic::Code::Unavailable, "{closed:?}");

    // Over the size limit: refused as a unary call would be, with the limit named.
    let mut stream = Reporting::stream(client.clone()).await?;
    let mut oversize = report("gw", 1, 2, 5);
    oversize.keys[0].ttft_us = Some(v1::Sketch {
        relative_accuracy: 0.02,
        counts: vec![u64::MAX; 100_000],
        ..Default::default()
    });
    let status = stream.send(oversize).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("65536"), "{}", status.message());

    // A new stream carries on where the gateway left off.
    let mut stream = Reporting::stream(client).await?;
    assert_eq!(stream.send(report("gw", 1, 2, 5)).await?, 2);
    let pools = control.pools().await?;
    assert_eq!(pools["pools"][0]["requests"], 12);
    for (reason, n) in [("zero_sequence", 1.0), ("oversize", 1.0)] {
        let series = format!("flyball_ingest_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(control.metric(&series).await?, Some(n), "{series}");
    }
    control.stop().await
}

#[tokio::test]
async fn shutting_down_ends_open_report_streams() -> Result<(), Error> {
    let control = support::start(ONE_POOL, &[]).await?;
    let client = TelemetryServiceClient::connect(control.grpc_uri()).await?;
    let mut stream = Reporting::stream(client).await?;
    assert_eq!(stream.send(report("gw", 1, 1, 5)).await?, 1);
    let Reporting::Stream { reports, mut acks } = stream else {
        unreachable!("a stream")
    };
    // The stream stays open (its sender is alive) while the service stops.
    let stopped = tokio::spawn(control.stop());
    // Bounded, so that a stream the stop leaves open fails here rather than hangs the suite.
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), acks.message())
        .await
        .map_err(|_| "the open stream did not end within 10 s of the stop")?
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("shutting down"),
        "{}",
        status.message()
    );
    stopped.await??;
    drop(reports);
    Ok(())
}

#[tokio::test]
async fn health_and_readiness_answer_once_serving() -> Result<(), Error> {
    let control = support::start(ONE_POOL, &[]).await?;
    assert_eq!(control.get("/healthz").await?.0, 200);
    // Ready once ingest serves and the autoscalers are read: poll for it, never sleep-and-hope.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut ready = control.get("/readyz").await?;
    while ready.0 != 200 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        ready = control.get("/readyz").await?;
    }
    assert_eq!(ready, (200, "ok\n".to_owned()));
    let (status, body) = control.get("/v1/decisions?pool=nope").await?;
    assert_eq!(status, 404, "{body}");
    control.stop().await
}

#[tokio::test]
async fn pools_json_has_exactly_the_documented_shape() -> Result<(), Error> {
    let control = support::start(ONE_POOL, &[]).await?;
    let mut client = TelemetryServiceClient::connect(control.grpc_uri()).await?;
    client.report(report("gw", 1, 1, 3)).await?;
    // Wait for the control loop's first decision after the report.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let pool = loop {
        let pools = control.pools().await?;
        let pool = pools["pools"][0].clone();
        if !pool["last_decision"].is_null() && pool["replicas"]["desired"].is_u64() {
            break pool;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no decision: {pools}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let keys = |v: &serde_json::Value| {
        let mut keys: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(&pool),
        [
            "autoscaler",
            "errors",
            "in_flight",
            "input_tokens",
            "last_decision",
            "name",
            "namespace",
            "output_tokens",
            "replicas",
            "requests",
            "role",
            "tpot_ms",
            "ttft_ms"
        ]
    );
    assert_eq!(keys(&pool["ttft_ms"]), ["p50", "p95", "p99"]);
    assert_eq!(keys(&pool["tpot_ms"]), ["p50", "p95", "p99"]);
    assert!(
        pool["tpot_ms"]["p50"].is_null(),
        "no TPOT samples were sent"
    );
    assert_eq!(keys(&pool["replicas"]), ["current", "desired", "ready"]);
    assert_eq!(keys(&pool["last_decision"]), ["at", "from", "reason", "to"]);
    assert_eq!(pool["requests"], 4);
    assert_eq!(pool["in_flight"], 1);
    let at = pool["last_decision"]["at"].as_str().unwrap_or_default();
    assert!(at.ends_with('Z') && at.len() == 24, "{at}");

    let (status, body) = control.get("/v1/decisions?pool=llama").await?;
    assert_eq!(status, 200);
    let decisions: serde_json::Value = serde_json::from_str(&body)?;
    let first = &decisions["pools"][0]["decisions"][0];
    assert!(
        first["rule"].is_string() && first["details"].is_object(),
        "{first}"
    );
    control.stop().await
}

/// Every latency the gateways measure reaches `/metrics` as short-window quantiles, labelled
/// with the pool's identity, next to the gauge that explains a `silent_reporter_hold`.
#[tokio::test]
async fn pool_metrics_carry_each_latency_and_the_pool_identity() -> Result<(), Error> {
    let control = support::start(ONE_POOL, &[]).await?;
    let mut client = TelemetryServiceClient::connect(control.grpc_uri()).await?;
    let sketch = |us: f64| {
        let mut sketch = Sketch::new();
        sketch.record(us);
        Some(v1::Sketch::from(&sketch))
    };
    let mut measured = report("gw", 1, 1, 1);
    let key = &mut measured.keys[0];
    key.tpot_us = sketch(20_000.0);
    key.itl_us = sketch(40_000.0);
    key.e2e_us = sketch(3_000_000.0);
    client.report(measured).await?;

    let pool = r#"autoscaler="llama",namespace="default",pool="llama",role="unified""#;
    let quantile = |name: &str| format!(r#"{name}{{{pool},quantile="0.5"}}"#);
    let expected = [
        ("flyball_pool_ttft_seconds", 0.151),
        ("flyball_pool_tpot_seconds", 0.020),
        ("flyball_pool_itl_seconds", 0.040),
        ("flyball_pool_e2e_seconds", 3.0),
    ];
    for (name, seconds) in expected {
        let value = control.metric(&quantile(name)).await?;
        let value = value.unwrap_or_else(|| panic!("{name} missing"));
        // The sketches' 2% relative accuracy.
        assert!(
            (value / seconds - 1.0).abs() <= 0.02,
            "{name}: {value} vs {seconds}"
        );
    }
    let silent = format!("flyball_pool_silent_reporters{{{pool}}}");
    assert_eq!(control.metric(&silent).await?, Some(0.0));

    // The report: 1 ok and 1 server error, 100 input and 10 output tokens, 1 decoding. The
    // rates share the short window's divisor, so their ratios are the report's.
    let rate = |name: &str| format!("{name}{{{pool}}}");
    let per_second =
        |value: Option<f64>, name: &str| value.unwrap_or_else(|| panic!("{name} missing"));
    let requests = per_second(
        control
            .metric(&rate("flyball_pool_requests_per_second"))
            .await?,
        "requests",
    );
    assert!(requests > 0.0, "{requests}");
    for (name, per_request) in [
        ("flyball_pool_errors_per_second", 0.5),
        ("flyball_pool_input_tokens_per_second", 50.0),
        ("flyball_pool_output_tokens_per_second", 5.0),
    ] {
        let value = per_second(control.metric(&rate(name)).await?, name);
        assert!(
            (value / requests - per_request).abs() < 1e-9,
            "{name}: {value} for {requests} requests/s"
        );
    }
    let in_flight = |state: &str| format!(r#"flyball_pool_in_flight{{{pool},state="{state}"}}"#);
    assert_eq!(control.metric(&in_flight("decoding")).await?, Some(1.0));
    assert_eq!(
        control.metric(&in_flight("waiting_first_token")).await?,
        Some(0.0)
    );
    control.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_connection_closed_is_gone_when_quiet_one_cut_off_is_missing()
-> Result<(), Error> {
    let control = support::start(ONE_POOL, &["--stale-after", "1s"]).await?;
    let pool = r#"autoscaler="llama",namespace="default",pool="llama",role="unified""#;
    let silent = format!("flyball_pool_silent_reporters{{{pool}}}");
    // Each gateway on its own connection, as each Envoy has.
    let mut gateways = Vec::new();
    for gateway in ["exits", "cut-off", "stream-reset"] {
        let channel = Channel::from_shared(control.grpc_uri())?.connect().await?;
        let mut stream = Reporting::stream(TelemetryServiceClient::new(channel.clone())).await?;
        stream.send_acked(gateway, 1..=3).await?;
        gateways.push((channel, stream));
    }
    // "exits" closes its connection, as Envoy does when it exits; "cut-off" goes quiet with its
    // stream and connection open, as behind a partition; "stream-reset" ends its stream (as the
    // filter does after a report timed out) and goes quiet with its connection open.
    let (reset_channel, reset_stream) = gateways.pop().unwrap();
    drop(reset_stream);
    let cut_off = gateways.pop();
    drop(gateways);
    let wait = std::time::Duration::from_secs(10);
    control
        .wait_metric("flyball_reporters{state=\"live\"}", 0.0, wait)
        .await?;
    assert_eq!(
        control.metric("flyball_reporters{state=\"stale\"}").await?,
        Some(2.0)
    );
    assert_eq!(
        control.metric("flyball_ingest_departed_total").await?,
        Some(1.0)
    );
    assert_eq!(
        control.metric(&silent).await?,
        Some(2.0),
        "cut-off and stream-reset hold"
    );
    drop((cut_off, reset_channel));
    control.stop().await
}

/// A gateway cut off one way: its reports arrive, this service's acknowledgements do not. The
/// kernel gives its connection up (what was sent is not taken for `--grpc-keepalive` plus
/// `--grpc-keepalive-timeout`: on loopback a zero window, which Linux 5.11 and later give up on)
/// while the gateway is live; that close says nothing of whether the gateway lives, so it is
/// held for as missing, not taken as gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_its_gateway_is_live_leaves_the_gateway_missing_not_gone()
-> Result<(), Error> {
    let flags = [
        "--stale-after",
        "6s",
        "--grpc-keepalive",
        "1s",
        "--grpc-keepalive-timeout",
        "1s",
    ];
    let control = support::start(ONE_POOL, &flags).await?;
    let pool = r#"autoscaler="llama",namespace="default",pool="llama",role="unified""#;
    let relay = flyball_relay::Relay::start(control.grpc).await?;
    let channel = Channel::from_shared(relay.uri())?.connect().await?;
    let mut stream = Reporting::stream(TelemetryServiceClient::new(channel.clone())).await?;
    stream.send_acked("cut-one-way", 1..=3).await?;
    let Reporting::Stream { reports, .. } = &stream else {
        unreachable!("a stream")
    };

    relay.cut_replies();
    // Reports go on arriving; the acknowledgements pile up unread.
    let reports = reports.clone();
    let flood = tokio::spawn(async move {
        for sequence in 4..100_000 {
            if reports
                .send(report("cut-one-way", 1, sequence, 1))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    });
    let wait = std::time::Duration::from_secs(10);
    let lost = r#"flyball_grpc_connections_closed_total{how="lost"}"#;
    control.wait_metric(lost, 1.0, wait).await?;
    assert_eq!(
        control.metric("flyball_reporters{state=\"live\"}").await?,
        Some(1.0),
        "lost while the gateway was live"
    );
    flood.abort();
    control
        .wait_metric("flyball_reporters{state=\"stale\"}", 1.0, wait)
        .await?;
    assert_eq!(
        control.metric("flyball_ingest_departed_total").await?,
        Some(0.0)
    );
    assert_eq!(
        control
            .metric(&format!("flyball_pool_silent_reporters{{{pool}}}"))
            .await?,
        Some(1.0),
        "the cut-off gateway holds its pool"
    );
    drop((stream, channel));
    control.stop().await
}

/// A gateway silent past `--forget-after` with its connection still open is forgotten; when it
/// reports again on that connection and then exits, its exit is seen as for any gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_forgotten_then_back_on_its_open_connection_is_gone_when_it_exits()
-> Result<(), Error> {
    let control =
        support::start(ONE_POOL, &["--stale-after", "2s", "--forget-after", "4s"]).await?;
    let wait = std::time::Duration::from_secs(10);
    let channel = Channel::from_shared(control.grpc_uri())?.connect().await?;
    let mut stream = Reporting::stream(TelemetryServiceClient::new(channel.clone())).await?;
    stream.send_acked("gw", 1..=3).await?;
    control
        .wait_metric("flyball_ingest_forgotten_total", 1.0, wait)
        .await?;
    stream.send_acked("gw", 4..=5).await?;
    assert_eq!(
        control.metric("flyball_reporters{state=\"live\"}").await?,
        Some(1.0)
    );
    // Envoy exits: its connection closes.
    drop((stream, channel));
    control
        .wait_metric("flyball_ingest_departed_total", 1.0, wait)
        .await?;
    assert_eq!(
        control.metric("flyball_reporters{state=\"stale\"}").await?,
        Some(0.0)
    );
    control.stop().await
}

/// A connection that carries several gateways is a proxy's (a sidecar in front of the control
/// service): when it closes, none of them is taken as gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_sharing_a_connection_that_closes_are_missing_when_quiet() -> Result<(), Error> {
    let control = support::start(ONE_POOL, &["--stale-after", "1s"]).await?;
    let channel = Channel::from_shared(control.grpc_uri())?.connect().await?;
    let mut streams = Vec::new();
    for gateway in ["behind-proxy-a", "behind-proxy-b"] {
        let mut stream = Reporting::stream(TelemetryServiceClient::new(channel.clone())).await?;
        stream.send_acked(gateway, 1..=3).await?;
        streams.push(stream);
    }
    drop((streams, channel));
    let wait = std::time::Duration::from_secs(10);
    control
        .wait_metric("flyball_reporters{state=\"stale\"}", 2.0, wait)
        .await?;
    assert_eq!(
        control.metric("flyball_ingest_departed_total").await?,
        Some(0.0)
    );
    control.stop().await
}

#[tokio::test]
async fn a_keepalive_under_a_second_is_refused_naming_the_flag() {
    let refused = refusal(&["--grpc-keepalive-timeout", "500ms"]).await;
    assert!(
        refused.contains("--grpc-keepalive-timeout") && refused.contains("whole seconds"),
        "{refused}"
    );
}

/// What `flags` make binding refuse, or "" when the service binds.
async fn refusal(flags: &[&str]) -> String {
    match support::bind(ONE_POOL, flags).await {
        Ok(_) => String::new(),
        Err(error) => error.to_string(),
    }
}

#[tokio::test]
async fn a_zero_max_keys_per_report_is_refused_naming_that_flag() {
    // `--max-keys` is 10,000 here: the message must name the flag that is 0.
    let error = refusal(&["--max-keys-per-report", "0"]).await;
    assert!(
        error.starts_with("--max-keys-per-report = 0: "),
        "refused as {error:?}"
    );
}

#[tokio::test]
async fn a_report_size_limit_of_zero_is_refused_rather_than_refusing_every_report() {
    // Every report encodes to more than 0 bytes: the service would start, and then refuse each
    // one RESOURCE_EXHAUSTED, while `--max-keys 0` is refused at start.
    let error = refusal(&["--max-report-bytes", "0"]).await;
    assert!(
        error.starts_with("--max-report-bytes = 0: "),
        "refused as {error:?} (\"\": accepted)"
    );
}

#[tokio::test]
async fn a_shared_gpu_budget_below_the_pools_minimum_is_refused_as_a_spec_gpu_budget_is() {
    // ONE_POOL keeps at least 1 replica of 1 GPU. `spec.gpuBudget: 0` is refused ("must be >= the
    // GPUs of all pools at minReplicas (1)"); the same budget given for every autoscaler of the
    // file is taken, and each decision then cuts growth to nothing.
    let error = refusal(&["--gpu-budget", "0"]).await;
    assert!(
        error.starts_with("--gpu-budget = 0: "),
        "refused as {error:?} (\"\": accepted)"
    );
}
