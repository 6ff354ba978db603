//! The filter inside real Envoy (2 worker threads) in front of the simulator, with a test
//! receiver for its gRPC reports. Totals are asserted against ground truth: what the clients
//! saw and what the simulator says it sent.

use flyball_local::client::{Response, http_client, http2_client, post};
use flyball_local::envoy::{Envoy, EnvoyOptions, prometheus_sum};
use flyball_local::wait_for;
use flyball_sim::{Outcome as TruthOutcome, RequestTruth, SimConfig, SimServer};
use flyball_tests::receiver::{ReceivedTotals, Receiver};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const MODELS: [&str; 3] = ["llama-3.1-8b", "qwen2.5-7b", "mistral-7b"];
const BACKEND: &str = "llm";

/// One request of the mixed workload, and what its client expects.
#[derive(Debug, Clone)]
struct Planned {
    id: String,
    path: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    model: &'static str,
    expect: Expect,
    abort_after_bytes: Option<usize>,
    http2: bool,
    /// The client asked for a stream and did not ask for usage: the filter injects it.
    injected: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Expect {
    Ok,
    ClientError,
    ServerError,
    UpstreamReset,
    ClientCancel,
}

impl Expect {
    fn label(self) -> &'static str {
        match self {
            Expect::Ok => "ok",
            Expect::ClientError => "client_error",
            Expect::ServerError => "server_error",
            Expect::UpstreamReset => "upstream_reset",
            Expect::ClientCancel => "client_cancel",
        }
    }
}

fn chat_body(model: &str, stream: bool, include_usage: bool, words: usize) -> Vec<u8> {
    let prompt = "tell me about the governor of a steam engine ".repeat(words.max(1));
    let mut body = serde_json::json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": prompt}
        ],
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

fn completion_body(model: &str, stream: bool, words: usize) -> Vec<u8> {
    let prompt = "once upon a time ".repeat(words.max(1));
    serde_json::to_vec(&serde_json::json!({"model": model, "prompt": prompt, "stream": stream}))
        .unwrap_or_default()
}

/// A deterministic mix: ~1/3 injected-usage streams, the rest spread over every other kind.
fn plan(count: usize, prefix: &str, models: &[&'static str]) -> Vec<Planned> {
    (0..count)
        .map(|i| {
            let id = format!("{prefix}-{i:05}");
            let model = models[i % models.len()];
            let tokens = 3 + (i * 7) % 20;
            let mut headers = vec![
                ("x-request-id", id.clone()),
                ("x-sim-request-id", id.clone()),
                ("x-sim-created", "1700000000".to_owned()),
                ("x-sim-ttft-ms", (5 + (i * 13) % 25).to_string()),
                ("x-sim-itl-ms", (1 + i % 3).to_string()),
                ("x-sim-output-tokens", tokens.to_string()),
            ];
            let words = 1 + (i * 11) % 40;
            let mut planned = Planned {
                id,
                path: "/v1/chat/completions",
                body: chat_body(model, true, false, words),
                headers: Vec::new(),
                model,
                expect: Expect::Ok,
                abort_after_bytes: None,
                http2: i % 10 == 3,
                injected: true,
            };
            match i % 20 {
                // streaming chat, usage injected by the filter (plain, fragmented, CRLF, several
                // tokens per event, an SSE comment before the first token)
                0..=4 => {}
                5 => headers.push(("x-sim-fragment-bytes", (3 + i % 11).to_string())),
                6 => headers.push(("x-sim-line-ending", "crlf".to_owned())),
                7 => headers.push(("x-sim-tokens-per-event", "3".to_owned())),
                8 => headers.push(("x-sim-comment", "1".to_owned())),
                // streaming chat, the client asked for usage itself
                9 | 10 => {
                    planned.body = chat_body(model, true, true, words);
                    planned.injected = false;
                }
                // non-streaming chat
                11 | 12 => {
                    planned.body = chat_body(model, false, false, words);
                    planned.injected = false;
                }
                // legacy completions, streaming (injected) and not
                13 => {
                    planned.path = "/v1/completions";
                    planned.body = completion_body(model, true, words);
                }
                14 => {
                    planned.path = "/v1/completions";
                    planned.body = completion_body(model, false, words);
                    planned.injected = false;
                }
                // errors from the server
                15 => {
                    headers.push((
                        "x-sim-error",
                        if i % 40 == 15 { "429" } else { "400" }.to_owned(),
                    ));
                    planned.expect = Expect::ClientError;
                    planned.injected = false;
                }
                16 => {
                    headers.push((
                        "x-sim-error",
                        if i % 40 == 16 { "500" } else { "503" }.to_owned(),
                    ));
                    planned.expect = Expect::ServerError;
                    planned.injected = false;
                }
                // the client goes away mid-stream
                17 => {
                    // Four seconds of tokens: the client leaves long before the end, however
                    // late a busy machine lets it read. Replaced, not added: the simulator reads
                    // the first value of a repeated header, and a 22-token stream at 1 ms apart
                    // arrived whole before a stalled client got round to leaving.
                    set_header(&mut headers, "x-sim-output-tokens", "400");
                    set_header(&mut headers, "x-sim-itl-ms", "10");
                    planned.abort_after_bytes = Some(600);
                    planned.expect = Expect::ClientCancel;
                    planned.http2 = false;
                }
                // the server resets mid-stream
                18 => {
                    headers.push(("x-sim-reset-after-tokens", "2".to_owned()));
                    planned.expect = Expect::UpstreamReset;
                }
                // an old server that never reports usage: tokens are estimated
                _ => headers.push(("x-sim-no-usage", "1".to_owned())),
            }
            planned.headers = headers;
            planned
        })
        .collect()
}

/// Sets `name` to `value`, replacing any value it had.
fn set_header(headers: &mut Vec<(&'static str, String)>, name: &'static str, value: &str) {
    headers.retain(|(n, _)| *n != name);
    headers.push((name, value.to_owned()));
}

struct Outcome {
    planned: Planned,
    response: Result<Response, String>,
}

async fn run_workload(envoy: &Envoy, planned: Vec<Planned>, concurrency: usize) -> Vec<Outcome> {
    let h1 = http_client();
    let h2 = http2_client();
    let addr = envoy.listener();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for planned in planned {
        let client = if planned.http2 {
            h2.clone()
        } else {
            h1.clone()
        };
        let semaphore = semaphore.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let headers: Vec<(&str, String)> = planned
                .headers
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            let response = post(
                &client,
                addr,
                planned.path,
                &planned.body,
                &headers,
                planned.abort_after_bytes,
            )
            .await
            .map_err(|e| e.to_string());
            Outcome { planned, response }
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        if let Ok(outcome) = task.await {
            outcomes.push(outcome);
        }
    }
    outcomes
}

/// The body length once the first event carrying a token (chat `delta.content` or legacy
/// `text`) had arrived, blank line included: the moment a streaming client has its first token.
fn first_content_event_end(body: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(body).ok()?;
    let mut start = 0;
    while start < text.len() {
        let rest = &text[start..];
        let (event_len, separator_len) = match (rest.find("\r\n\r\n"), rest.find("\n\n")) {
            (Some(crlf), Some(lf)) if crlf < lf => (crlf, 4),
            (_, Some(lf)) => (lf, 2),
            (Some(crlf), None) => (crlf, 4),
            (None, None) => return None,
        };
        let end = start + event_len + separator_len;
        let has_token = rest[..event_len]
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data.trim()).ok())
            .any(|event| {
                event["choices"].as_array().is_some_and(|choices| {
                    choices.iter().any(|choice| {
                        [&choice["delta"]["content"], &choice["text"]]
                            .iter()
                            .any(|piece| piece.as_str().is_some_and(|s| !s.is_empty()))
                    })
                })
            });
        if has_token {
            return Some(end);
        }
        start = end;
    }
    None
}

/// Parses Envoy's JSON access log lines (written by `envoy/flyball.yaml`) into request id ->
/// the filter's TTFT in microseconds.
fn filter_ttfts(log: &str) -> HashMap<String, u64> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["access"] == "flyball")
        .filter_map(|v| {
            let id = v["request_id"].as_str()?.to_owned();
            let ttft = v["ttft_us"].as_str()?.parse::<u64>().ok()?;
            Some((id, ttft))
        })
        .collect()
}

fn plugin_config(control_port_cluster: &str, interval_ms: u64) -> String {
    serde_json::json!({
        "controlCluster": control_port_cluster,
        "reportIntervalMs": interval_ms,
        "gateway": "e2e-gateway",
    })
    .to_string()
}

struct Stack {
    sim: SimServer,
    receiver: Receiver,
    envoy: Envoy,
}

async fn start_stack(interval_ms: u64) -> anyhow::Result<Stack> {
    let receiver = Receiver::start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let options = EnvoyOptions::with_filter(
        sim.local_addr().port(),
        receiver.port(),
        &plugin_config("flyball_control", interval_ms),
    );
    let envoy = Envoy::start(&options).await?;
    Ok(Stack {
        sim,
        receiver,
        envoy,
    })
}

fn key_total(totals: &ReceivedTotals) -> u64 {
    totals
        .keys
        .values()
        .map(|k| k.requests.unwrap_or_default().total())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_traffic_through_two_workers_is_measured_exactly() -> anyhow::Result<()> {
    let stack = start_stack(200).await?;
    // Warm up: the first requests of a fresh Envoy open upstream connections and run the filter
    // before V8 has optimised it. They are measured and reported like any other (model
    // "warmup"), but only steady-state TTFTs are checked against the simulator's and the client's.
    let warmup = plan(48, "warmup", &["warmup"]);
    let warmup_count = warmup.len() as u64;
    let warmed = run_workload(&stack.envoy, warmup, 16).await;
    assert_eq!(warmed.len() as u64, warmup_count);
    let planned = plan(1_000, "req", &MODELS);
    let total = planned.len() as u64;
    // 8 at a time: enough to overlap every kind of request on both workers, while leaving the
    // 2-core machine room so that scheduling noise stays small beside the TTFTs measured.
    let outcomes = run_workload(&stack.envoy, planned, 8).await;
    assert_eq!(outcomes.len() as u64, total, "every request task finished");

    // The truth, from the clients' side.
    let mut expected: BTreeMap<(String, Expect), u64> = BTreeMap::new();
    for outcome in &outcomes {
        let planned = &outcome.planned;
        let response = match &outcome.response {
            Ok(r) => r,
            Err(error) => anyhow::bail!("{}: request failed: {error}", planned.id),
        };
        match planned.expect {
            Expect::Ok => {
                assert_eq!(response.status, 200, "{}: {}", planned.id, response.text());
                assert!(response.body_error.is_none(), "{}: body error", planned.id);
            }
            Expect::ClientError => assert!((400..500).contains(&response.status)),
            Expect::ServerError => assert!((500..600).contains(&response.status)),
            Expect::UpstreamReset => assert!(
                response.body_error.is_some(),
                "{}: the client should see the reset stream",
                planned.id
            ),
            Expect::ClientCancel => assert!(response.aborted_by_client),
        }
        *expected
            .entry((planned.model.to_owned(), planned.expect))
            .or_default() += 1;
    }

    // Ground truth from the simulator, once it has seen every request end.
    let truths: HashMap<String, RequestTruth> = wait_for(
        "the simulator to log every request",
        Duration::from_secs(20),
        || {
            let log = stack.sim.ground_truth();
            async move { (log.len() as u64 >= total + warmup_count).then_some(log) }
        },
    )
    .await?
    .into_iter()
    .map(|t| (t.request_id.clone(), t))
    .collect();
    // Each request ended at the simulator as planned: a workload that plans a client cancel the
    // simulator finished first would hold the filter to an outcome that never happened.
    for outcome in &outcomes {
        let id = &outcome.planned.id;
        let at_simulator = truths
            .get(id)
            .map(|t| t.outcome)
            .ok_or_else(|| anyhow::anyhow!("{id}: the simulator has no record"))?;
        let planned = match outcome.planned.expect {
            Expect::Ok => TruthOutcome::Ok,
            Expect::ClientError | Expect::ServerError => TruthOutcome::Error,
            Expect::UpstreamReset => TruthOutcome::Reset,
            Expect::ClientCancel => TruthOutcome::ClientCancelled,
        };
        assert_eq!(at_simulator, planned, "{id}: how the simulator saw it end");
    }

    // 1. Injected-usage streams reach the client byte-identical to a direct request without
    //    include_usage, and with no usage chunk.
    let direct = http_client();
    let mut compared = 0;
    for outcome in outcomes
        .iter()
        .filter(|o| o.planned.injected && o.planned.expect == Expect::Ok)
    {
        let planned = &outcome.planned;
        let Ok(via_envoy) = &outcome.response else {
            continue;
        };
        let headers: Vec<(&str, String)> = planned
            .headers
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let again = post(
            &direct,
            stack.sim.local_addr(),
            planned.path,
            &planned.body,
            &headers,
            None,
        )
        .await?;
        assert_eq!(
            via_envoy.text(),
            again.text(),
            "{}: the client must receive exactly the stream the server sends without the filter",
            planned.id
        );
        assert!(
            !via_envoy.text().contains("\"usage\""),
            "{}: usage chunk leaked",
            planned.id
        );
        compared += 1;
        if compared >= 60 {
            break;
        }
    }
    assert!(compared >= 30, "compared {compared} injected streams");
    // The replays above are extra simulator requests; they do not pass through Envoy.

    // 2. Every streamed request's TTFT, as the filter measured it, lies between the simulator's
    //    (which starts later, when the request reached it, and ends sooner, when it handed the
    //    first token's event to its socket) and the client's (which starts sooner, before
    //    sending, and ends later, when that event arrived). Those bounds hold however the
    //    machine schedules the three processes; only how far apart they fall depends on load,
    //    so closeness to the simulator is judged on the median, which a few preempted requests
    //    on a busy 2-core machine cannot move.
    let ttfts = wait_for(
        "Envoy's access log to cover every request",
        Duration::from_secs(10),
        || {
            let ttfts = filter_ttfts(&stack.envoy.log());
            // Every streamed request with a first token by name: a count could be met by a
            // line the checks below skip while one they need is still in Envoy's log buffer.
            let complete = outcomes.iter().all(|o| {
                !truths
                    .get(&o.planned.id)
                    .is_some_and(|t| t.first_content_offset_us.is_some() && t.stream)
                    || ttfts.contains_key(&o.planned.id)
            });
            async move { complete.then_some(ttfts) }
        },
    )
    .await?;
    // The filter reads Envoy's wall clock, the others a monotonic one: allow for the two
    // ticking at slightly different rates over a few tens of milliseconds.
    const CLOCK_SLACK_US: i64 = 1_000;
    let mut over_simulator_us = Vec::new();
    let mut violations = Vec::new();
    for outcome in &outcomes {
        let id = &outcome.planned.id;
        let Some(truth) = truths.get(id) else {
            continue;
        };
        let (Some(sim_first_us), true) = (truth.first_content_offset_us, truth.stream) else {
            continue;
        };
        let filter_us = *ttfts
            .get(id)
            .ok_or_else(|| anyhow::anyhow!("{id}: no TTFT in the access log"))?;
        let client_first_us = outcome
            .response
            .as_ref()
            .ok()
            .and_then(|r| r.arrived_by(first_content_event_end(&r.body)?))
            .map(|at| at.as_micros() as i64)
            .ok_or_else(|| anyhow::anyhow!("{id}: the client never received a token"))?;
        let (filter_us, sim_first_us) = (filter_us as i64, sim_first_us as i64);
        if filter_us < sim_first_us - CLOCK_SLACK_US || filter_us > client_first_us + CLOCK_SLACK_US
        {
            violations.push(format!(
                "{id}: filter TTFT {filter_us} us outside [simulator {sim_first_us} us, \
                 client {client_first_us} us]"
            ));
        }
        over_simulator_us.push(filter_us - sim_first_us);
    }
    over_simulator_us.sort_unstable();
    let checked = over_simulator_us.len();
    let quantile = |q: f64| over_simulator_us[((checked - 1) as f64 * q) as usize];
    println!(
        "TTFT checked on {checked} streams; filter - simulator: median {} us, p99 {} us, max {} us",
        quantile(0.5),
        quantile(0.99),
        quantile(1.0)
    );
    assert!(checked > 500, "only {checked} streams to check");
    assert!(
        violations.is_empty(),
        "{} of {checked} outside their bounds:\n{}",
        violations.len(),
        violations.join("\n")
    );

    // 3. The reports (each (reporter, sequence) once) add up to the truth, per model and
    //    outcome, with nothing in flight at the end.
    let totals = wait_for(
        "reports to cover every request",
        Duration::from_secs(20),
        || {
            let totals = stack.receiver.totals();
            async move {
                let idle = totals
                    .last_in_flight
                    .values()
                    .all(|&(w, d)| w == 0 && d == 0);
                (key_total(&totals) >= total + warmup_count && idle).then_some(totals)
            }
        },
    )
    .await?;
    assert_eq!(totals.gaps, 0, "no report lost");
    // Every report travelled on a report stream (one per worker that sent, plus reopenings).
    let received = stack.receiver.reports().len() as u64;
    println!(
        "reports: {received} received, {} on {} streams",
        stack.receiver.streamed_reports(),
        stack.receiver.streams_opened()
    );
    assert_eq!(stack.receiver.streamed_reports(), received);
    for model in MODELS {
        let key = (BACKEND.to_owned(), model.to_owned());
        let got = totals
            .keys
            .get(&key)
            .and_then(|k| k.requests)
            .unwrap_or_default();
        for expect in [
            Expect::Ok,
            Expect::ClientError,
            Expect::ServerError,
            Expect::UpstreamReset,
            Expect::ClientCancel,
        ] {
            let want = expected
                .get(&(model.to_owned(), expect))
                .copied()
                .unwrap_or(0);
            let have = match expect {
                Expect::Ok => got.ok,
                Expect::ClientError => got.client_error,
                Expect::ServerError => got.server_error,
                Expect::UpstreamReset => got.upstream_reset,
                Expect::ClientCancel => got.client_cancel,
            };
            assert_eq!(have, want, "reports: {model} {}", expect.label());
        }
    }

    // 4. Token sums are exact where the server reported usage.
    let mut reported_input = 0u64;
    let mut reported_output = 0u64;
    for truth in truths.values().filter(|t| t.usage_reported) {
        reported_input += truth.prompt_tokens;
        reported_output += truth.completion_tokens_sent;
    }
    let mut measured_input = 0u64;
    let mut measured_output = 0u64;
    for key in totals.keys.values() {
        let tokens = key.tokens.unwrap_or_default();
        measured_input += tokens.input - tokens.input_estimated;
        measured_output += tokens.output - tokens.output_estimated;
    }
    assert_eq!(
        measured_input, reported_input,
        "input tokens from server usage"
    );
    assert_eq!(
        measured_output, reported_output,
        "output tokens from server usage"
    );

    // 5. Envoy's own stats say the same.
    let prometheus = stack.envoy.prometheus().await?;
    for model in MODELS {
        for expect in [
            Expect::Ok,
            Expect::ClientError,
            Expect::ServerError,
            Expect::UpstreamReset,
            Expect::ClientCancel,
        ] {
            let want = expected
                .get(&(model.to_owned(), expect))
                .copied()
                .unwrap_or(0) as f64;
            // Envoy stat names cannot carry dots, so the label has them as underscores.
            let have = prometheus_sum(
                &prometheus,
                "flyball_requests_total",
                &[
                    ("backend", BACKEND),
                    ("model", &model.replace('.', "_")),
                    ("outcome", expect.label()),
                ],
            );
            assert_eq!(have, want, "Envoy stats: {model} {}", expect.label());
        }
    }
    let stats_input = prometheus_sum(
        &prometheus,
        "flyball_tokens_total",
        &[("token_type", "input")],
    );
    let stats_input_estimated = prometheus_sum(
        &prometheus,
        "flyball_tokens_estimated_total",
        &[("token_type", "input")],
    );
    assert_eq!((stats_input - stats_input_estimated) as u64, reported_input);
    let in_flight = prometheus_sum(&prometheus, "flyball_requests_in_flight", &[]);
    assert_eq!(in_flight, 0.0, "Envoy in-flight gauge back to zero");

    // 6. Every TTFT the filter measured is in the access log, in Envoy's histogram (after a stats
    //    flush) and in the reported sketches: the three counts agree.
    let reported_ttfts: u64 = totals
        .keys
        .values()
        .filter_map(|k| k.ttft_us.as_ref())
        .filter_map(|s| flyball_sketch::Sketch::try_from(s).ok())
        .map(|s| s.count())
        .sum();
    let logged_ttfts = filter_ttfts(&stack.envoy.log()).len() as u64;
    assert_eq!(
        reported_ttfts, logged_ttfts,
        "reported TTFT samples vs access log"
    );
    let envoy = &stack.envoy;
    wait_for(
        "Envoy's TTFT histogram to flush",
        Duration::from_secs(10),
        || async move {
            let count = envoy
                .metric_sum("flyball_time_to_first_token_ms_count", &[])
                .await
                .ok()?;
            (count as u64 == logged_ttfts).then_some(())
        },
    )
    .await?;
    Ok(())
}

/// An HTTP/2 model server whose streamed answer ends with trailers.
async fn h2_server_ending_in_trailers() -> anyhow::Result<u16> {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::{Frame, Incoming};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<Incoming>| async {
                    let _ = req.into_body().collect().await;
                    let body: &'static [u8] = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("x-done", hyper::header::HeaderValue::from_static("1"));
                    let frames = [
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(body))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    hyper::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(StreamBody::new(futures::stream::iter(frames)))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    Ok(port)
}

/// A response that ends in trailers (no body callback sees the end of the stream) is complete:
/// counted `ok`, not `server_error`, and the client gets all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ending_in_trailers_is_counted_ok() -> anyhow::Result<()> {
    let upstream = h2_server_ending_in_trailers().await?;
    let mut options = EnvoyOptions::with_filter(upstream, flyball_local::free_port()?, "{}");
    options.upstream_http2 = true;
    let envoy = Envoy::start(&options).await?;
    let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = post(
        &http_client(),
        envoy.listener(),
        "/v1/chat/completions",
        body,
        &[],
        None,
    )
    .await?;
    assert_eq!(response.status, 200);
    assert!(
        response.text().ends_with("data: [DONE]\n\n"),
        "{:?}",
        response.text()
    );
    let outcomes = wait_for("the request to be counted", Duration::from_secs(10), || {
        let envoy = &envoy;
        async move {
            let count = async |outcome| {
                envoy
                    .metric_sum("flyball_requests_total", &[("outcome", outcome)])
                    .await
                    .ok()
            };
            let (ok, failed) = (count("ok").await?, count("server_error").await?);
            (ok + failed >= 1.0).then_some((ok, failed))
        }
    })
    .await?;
    assert_eq!(outcomes, (1.0, 0.0), "(ok, server_error)");
    Ok(())
}

/// `maxModelsPerBackend` caps a backend's model labels for the gateway ("labels are capped
/// (`maxModelsPerBackend`, then `other`)"): the Envoy stats (process-wide, never expiring) and
/// the reports (one per process) carry at most that many models per backend. Each worker's VM
/// interns labels in its own `Labels`, so every worker admits its own first models: with 2
/// workers and a cap of 1, two models get labels of their own, and a model that is "other" on
/// one worker has its own label on the other, its figures split between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_cap_holds_for_the_whole_envoy_not_per_worker() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let config = serde_json::json!({
        "controlCluster": "flyball_control",
        "reportIntervalMs": 100,
        "maxModelsPerBackend": 1,
    })
    .to_string();
    let envoy = Envoy::start(&EnvoyOptions::with_filter(
        sim.local_addr().port(),
        receiver.port(),
        &config,
    ))
    .await?;
    // One connection per request (a client of its own each), so the kernel spreads them over
    // both workers' listeners.
    let count = 32_u64;
    for i in 0..count {
        let headers = [
            ("x-sim-ttft-ms", "1".to_owned()),
            ("x-sim-itl-ms", "1".to_owned()),
            ("x-sim-output-tokens", "2".to_owned()),
        ];
        let model = format!("capped-{i:02}");
        let response = post(
            &http_client(),
            envoy.listener(),
            "/v1/chat/completions",
            &chat_body(&model, true, false, 1),
            &headers,
            None,
        )
        .await?;
        assert_eq!(response.status, 200, "{model}");
    }
    let totals = wait_for(
        "every request to be reported",
        Duration::from_secs(10),
        || {
            let totals = receiver.totals();
            async move { (key_total(&totals) == count).then_some(totals) }
        },
    )
    .await?;
    let special = |m: &str| m == "other" || m == "unknown";
    let reported: Vec<(String, u64)> = totals
        .keys
        .iter()
        .filter(|((_, model), _)| !special(model))
        .map(|((_, model), k)| (model.clone(), k.requests.unwrap_or_default().total()))
        .collect();

    let prometheus = envoy.prometheus().await?;
    let mut in_stats = std::collections::BTreeSet::new();
    for line in prometheus.lines() {
        let Some(rest) = line.strip_prefix("flyball_requests_total{") else {
            continue;
        };
        if let Some((_, after)) = rest.split_once("model=\"")
            && let Some((model, _)) = after.split_once('"')
            && !special(model)
        {
            in_stats.insert(model.to_owned());
        }
    }
    // The first model met is admitted, on whichever worker; every later one is "other".
    assert!(
        reported.len() == 1 && in_stats.len() == 1,
        "maxModelsPerBackend = 1, but the reports carried {} models of their own {reported:?} \
         and Envoy's stats {} {in_stats:?}",
        reported.len(),
        in_stats.len()
    );
    drop(envoy);
    drop(sim);
    Ok(())
}

/// The filter sends each sketch in the smaller of its two forms (`sparseSketches`, on by
/// default), and only dense with it off. Requests whose TTFTs lie far apart (1 ms to 400 ms)
/// share a report's sketch: a few buckets across a wide range, which goes sparse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sketches_go_in_their_smaller_form_unless_sparse_sketches_is_off() -> anyhow::Result<()> {
    for sparse in [true, false] {
        let receiver = Receiver::start().await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sim = SimServer::start(SimConfig::default(), listener).await?;
        let config = serde_json::json!({
            "controlCluster": "flyball_control",
            "reportIntervalMs": 500,
            "sparseSketches": sparse,
        })
        .to_string();
        let envoy = Envoy::start(&EnvoyOptions::with_filter(
            sim.local_addr().port(),
            receiver.port(),
            &config,
        ))
        .await?;
        let count = 12_u64;
        let requests = (0..count).map(|i| {
            let envoy = &envoy;
            async move {
                let ttft_ms = [1, 40, 400][i as usize % 3];
                let headers = [
                    ("x-sim-ttft-ms", ttft_ms.to_string()),
                    ("x-sim-itl-ms", "1".to_owned()),
                    ("x-sim-output-tokens", "2".to_owned()),
                ];
                post(
                    &http_client(),
                    envoy.listener(),
                    "/v1/chat/completions",
                    &chat_body("m", true, false, 1),
                    &headers,
                    None,
                )
                .await
            }
        });
        for response in futures::future::join_all(requests).await {
            assert_eq!(response?.status, 200);
        }
        wait_for(
            "every request to be reported",
            Duration::from_secs(10),
            || {
                let totals = receiver.totals();
                async move { (key_total(&totals) == count).then_some(()) }
            },
        )
        .await?;
        let sketches: Vec<flyball_proto::v1::Sketch> = receiver
            .reports()
            .iter()
            .flat_map(|r| &r.keys)
            .flat_map(|k| [&k.ttft_us, &k.tpot_us, &k.itl_us, &k.e2e_us])
            .flatten()
            .cloned()
            .collect();
        for wire in &sketches {
            let sketch = flyball_sketch::Sketch::try_from(wire)?;
            let expected = if sparse {
                flyball_proto::v1::Sketch::compact(&sketch)
            } else {
                flyball_proto::v1::Sketch::from(&sketch)
            };
            assert_eq!(wire, &expected, "sparseSketches = {sparse}");
        }
        let sparse_sent = sketches.iter().filter(|s| !s.sparse_counts.is_empty());
        if sparse {
            assert!(
                sparse_sent.count() > 0,
                "no sketch went sparse: {sketches:?}"
            );
        } else {
            assert_eq!(sparse_sent.count(), 0);
        }
        drop(envoy);
        drop(sim);
    }
    Ok(())
}
