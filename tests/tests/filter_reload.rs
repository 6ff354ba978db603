//! The filter's figures across a plugin configuration reload, as Istio makes one whenever a
//! `WasmPlugin`'s configuration changes: a new listener configuration arrives (here from a
//! watched LDS file, as a control plane would push it), Envoy creates a new filter configuration
//! and new root contexts in the same VMs, new connections use them, and connections already open
//! drain on the old ones until Envoy's drain time ends and it closes what is left.
//!
//! What must hold: requests are counted once each, on whichever configuration they ran, the
//! in-flight gauges the control service receives come back to zero once every request is over,
//! and the reports keep one valid sequence for the one reporter identity.

use flyball_local::client::{Response, http_client, post};
use flyball_local::envoy::{Envoy, EnvoyOptions, prometheus_sum};
use flyball_local::wait_for;
use flyball_proto::v1::ReportRequest;
use flyball_sim::{SimConfig, SimServer};
use flyball_tests::receiver::{ReceivedTotals, Receiver};
use flyball_tests::streaming_chat;
use prost::Message;
use std::collections::BTreeMap;
use std::time::Duration;

const BACKEND: &str = "llm";
const GATEWAY: &str = "reload-gateway";

fn plugin_config(interval_ms: u64, max_models_per_backend: u64) -> String {
    serde_json::json!({
        "controlCluster": "flyball_control",
        "reportIntervalMs": interval_ms,
        "gateway": GATEWAY,
        "maxModelsPerBackend": max_models_per_backend,
    })
    .to_string()
}

/// How the simulator answers one request.
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttft_ms: u64,
    itl_ms: u64,
    tokens: u64,
}

const QUICK: Timing = Timing {
    ttft_ms: 2,
    itl_ms: 1,
    tokens: 3,
};

/// Sends one streamed chat request on a connection of its own (a fresh client), so that it
/// runs on the listener configuration current when it starts.
async fn request(envoy_addr: std::net::SocketAddr, model: &str, timing: Timing) -> Response {
    let headers = [
        ("x-sim-ttft-ms", timing.ttft_ms.to_string()),
        ("x-sim-itl-ms", timing.itl_ms.to_string()),
        ("x-sim-output-tokens", timing.tokens.to_string()),
    ];
    let sent = post(
        &http_client(),
        envoy_addr,
        "/v1/chat/completions",
        &streaming_chat(model),
        &headers,
        None,
    )
    .await;
    sent.unwrap_or_else(|error| Response {
        status: 0,
        headers: Vec::new(),
        body: Vec::new(),
        first_byte_after: None,
        arrivals: Vec::new(),
        aborted_by_client: false,
        body_error: Some(error.to_string()),
    })
}

fn complete(response: &Response) -> bool {
    response.status == 200 && response.text().ends_with("data: [DONE]\n\n")
}

/// `count` quick requests, `concurrency` at a time; all must complete.
async fn send_quick(envoy: &Envoy, model: &str, count: usize) -> anyhow::Result<()> {
    let addr = envoy.listener();
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let model = model.to_owned();
            tokio::spawn(async move { request(addr, &model, QUICK).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let response = task.await?;
        anyhow::ensure!(complete(&response), "{model} request {i}: {response:?}");
    }
    Ok(())
}

/// Starts `count` requests with `timing` in the background.
fn start_long(
    envoy: &Envoy,
    model: &str,
    count: usize,
    timing: Timing,
) -> Vec<tokio::task::JoinHandle<Response>> {
    let addr = envoy.listener();
    (0..count)
        .map(|_| {
            let model = model.to_owned();
            tokio::spawn(async move { request(addr, &model, timing).await })
        })
        .collect()
}

fn requests_of(totals: &ReceivedTotals, model: &str) -> u64 {
    totals
        .keys
        .get(&(BACKEND.to_owned(), model.to_owned()))
        .map_or(0, |k| k.requests.unwrap_or_default().total())
}

fn total_requests(totals: &ReceivedTotals) -> u64 {
    totals
        .keys
        .values()
        .map(|k| k.requests.unwrap_or_default().total())
        .sum()
}

/// The in-flight gauges of the latest report, summed over keys: (waiting, decoding).
fn in_flight(totals: &ReceivedTotals) -> (u64, u64) {
    totals
        .last_in_flight
        .values()
        .fold((0, 0), |(w, d), &(kw, kd)| (w + kw, d + kd))
}

fn in_flight_of(totals: &ReceivedTotals, model: &str) -> (u64, u64) {
    totals
        .last_in_flight
        .get(&(BACKEND.to_owned(), model.to_owned()))
        .copied()
        .unwrap_or((0, 0))
}

/// Every (reporter, sequence) the receiver got more than once came with the same content (a
/// resend), never as two different reports the control service would take one of and drop the
/// other as a duplicate. Returns (reporter identities, distinct sequences, resends).
fn check_sequences(reports: &[ReportRequest]) -> (usize, usize, usize) {
    let mut seen: BTreeMap<(String, u64, u64), Vec<u8>> = BTreeMap::new();
    let mut resends = 0;
    for report in reports {
        let reporter = report.reporter.clone().unwrap_or_default();
        assert_eq!(reporter.gateway, GATEWAY);
        let id = (
            reporter.gateway,
            reporter.process_start_unix_ms,
            report.sequence,
        );
        let bytes = report.encode_to_vec();
        match seen.get(&id) {
            Some(first) => {
                assert_eq!(
                    first, &bytes,
                    "two different reports with the same reporter and sequence {id:?}"
                );
                resends += 1;
            }
            None => {
                seen.insert(id, bytes);
            }
        }
    }
    let identities: std::collections::BTreeSet<_> = seen
        .keys()
        .map(|(g, start, _)| (g.clone(), *start))
        .collect();
    (identities.len(), seen.len(), resends)
}

struct Stack {
    sim: SimServer,
    receiver: Receiver,
    envoy: Envoy,
}

async fn start_stack(drain_time: Duration) -> anyhow::Result<Stack> {
    let receiver = Receiver::start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let options = options(&sim, &receiver, &plugin_config(100, 8));
    let envoy = Envoy::start_with_listener_file(&options, drain_time).await?;
    Ok(Stack {
        sim,
        receiver,
        envoy,
    })
}

fn options(sim: &SimServer, receiver: &Receiver, plugin: &str) -> EnvoyOptions {
    EnvoyOptions::with_filter(sim.local_addr().port(), receiver.port(), plugin)
}

async fn wait_for_in_flight(
    receiver: &Receiver,
    model: &str,
    want: (u64, u64),
) -> anyhow::Result<()> {
    wait_for(
        &format!("{model}: {want:?} in flight (waiting, decoding) in a report"),
        Duration::from_secs(10),
        || {
            let now = in_flight_of(&receiver.totals(), model);
            async move { (now == want).then_some(()) }
        },
    )
    .await
}

/// Waits until the reports cover `sent` requests with nothing in flight; fails naming what
/// they showed instead.
async fn wait_for_settled(receiver: &Receiver, sent: u64) -> anyhow::Result<ReceivedTotals> {
    let settled = wait_for(
        "reports to cover every request with nothing in flight",
        Duration::from_secs(15),
        || {
            let totals = receiver.totals();
            async move {
                (total_requests(&totals) >= sent && in_flight(&totals) == (0, 0)).then_some(totals)
            }
        },
    )
    .await;
    settled.map_err(|error| {
        let totals = receiver.totals();
        anyhow::anyhow!(
            "{error}: reported {} of {sent} requests, in flight (waiting, decoding) {:?}, per key {:?}",
            total_requests(&totals),
            in_flight(&totals),
            totals.last_in_flight
        )
    })
}

fn print_reports(receiver: &Receiver) {
    let reports = receiver.reports();
    let (identities, sequences, resends) = check_sequences(&reports);
    let totals = receiver.totals();
    println!(
        "reports: {} received, {sequences} distinct sequences of {identities} reporter, {resends} resent, gaps {}, dropped {:?}",
        reports.len(),
        totals.gaps,
        reports.last().and_then(|r| r.dropped)
    );
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The median gap (ms) between the ten reports that follow the first two after `from` (the
/// first after a reload may still come from the old configuration's sender, on its schedule),
/// and the sorted gaps.
async fn median_gap_after(receiver: &Receiver, from: usize) -> anyhow::Result<(u64, Vec<u64>)> {
    let after = wait_for(
        "ten reports after the reload",
        Duration::from_secs(10),
        || {
            let reports = receiver.reports();
            async move { (reports.len() >= from + 12).then_some(reports) }
        },
    )
    .await?;
    let mut gaps: Vec<u64> = after[from + 2..from + 12]
        .windows(2)
        .map(|w| w[1].sent_at_unix_ms.saturating_sub(w[0].sent_at_unix_ms))
        .collect();
    gaps.sort_unstable();
    println!("gaps between reports after the reload (ms): {gaps:?}");
    Ok((gaps.get(gaps.len() / 2).copied().unwrap_or_default(), gaps))
}

/// A configuration rolled back while the one it replaced still drains: Envoy reuses its root
/// contexts without a call into the VM (its thread-local plugin is cached by configuration), so
/// nothing tells them they are current again, and the edit they replaced keeps reporting until
/// it has drained (README); then the rolled-back one takes over. A (100 ms) -> B (300 ms) -> A,
/// within an 8 s drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_rolled_back_within_the_drain_reports_once_the_edit_has_drained()
-> anyhow::Result<()> {
    let drain = Duration::from_secs(8);
    let stack = start_stack(drain).await?;
    let (envoy, receiver) = (&stack.envoy, &stack.receiver);
    let a = plugin_config(100, 8);
    let b = plugin_config(300, 8);
    send_quick(envoy, "on-a", 5).await?;

    envoy
        .reload_listener(&options(&stack.sim, receiver, &b))
        .await?;
    let (median, gaps) = median_gap_after(receiver, receiver.reports().len()).await?;
    assert!(
        (250..=600).contains(&median),
        "B (300 ms) reports after the first reload: {gaps:?}"
    );
    send_quick(envoy, "on-b", 5).await?;

    envoy
        .reload_listener(&options(&stack.sim, receiver, &a))
        .await?;
    let rolled_back = std::time::Instant::now();
    let rolled_back_unix_ms = unix_ms();
    let rolled_back_at = receiver.reports().len();
    // The premise: A's root contexts were reused, not configured again (a fresh A would be the
    // newest configuration and report every 100 ms at once).
    let (median, gaps) = median_gap_after(receiver, rolled_back_at).await?;
    anyhow::ensure!(
        median >= 250,
        "A reported at once after the rollback ({gaps:?}): its root contexts were not reused"
    );
    send_quick(envoy, "on-a-again", 5).await?;

    let admin = http_client();
    wait_for("B's filter chain to drain", drain * 3, || {
        let admin = admin.clone();
        async move {
            let n = envoy
                .admin_stat(&admin, "listener_manager.total_filter_chains_draining")
                .await?;
            (n == 0).then_some(())
        }
    })
    .await?;
    // B reported at its own interval for as long as it drained (to a second before its end).
    let draining_until = rolled_back_unix_ms + drain.as_millis() as u64 - 1_000;
    let during: Vec<u64> = receiver.reports()[rolled_back_at + 1..]
        .iter()
        .map(|r| r.sent_at_unix_ms)
        .take_while(|&sent| sent <= draining_until)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    println!("gaps while B drained (ms): {during:?}");
    assert!(
        during.len() >= 15 && during.iter().all(|&gap| gap >= 150),
        "B (300 ms) reports until it has drained: {during:?}"
    );
    let drained = receiver.reports().len();
    let (median, gaps) = median_gap_after(receiver, drained).await?;
    println!(
        "A reports every {median} ms again, {:.1} s after the rollback",
        rolled_back.elapsed().as_secs_f64()
    );
    assert!(
        (50..=200).contains(&median),
        "A (100 ms) reports once B has drained: {gaps:?}"
    );
    let totals = wait_for_settled(receiver, 15).await?;
    print_reports(receiver);
    for model in ["on-a", "on-b", "on-a-again"] {
        assert_eq!(requests_of(&totals, model), 5, "{model}");
    }
    assert_eq!(totals.gaps, 0);
    Ok(())
}

/// Streams in flight when the plugin configuration changes finish on the old configuration
/// (Envoy's drain time outlasts them); new requests run on the new one. Twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_flight_across_a_plugin_reload_are_counted_once_and_leave_nothing_in_flight()
-> anyhow::Result<()> {
    let stack = start_stack(Duration::from_secs(120)).await?;
    let (envoy, receiver) = (&stack.envoy, &stack.receiver);

    send_quick(envoy, "before", 10).await?;
    let waiting = Timing {
        ttft_ms: 2_500,
        itl_ms: 10,
        tokens: 3,
    };
    let decoding = Timing {
        ttft_ms: 10,
        itl_ms: 100,
        tokens: 35,
    };
    let mut long = start_long(envoy, "across-waiting", 4, waiting);
    long.extend(start_long(envoy, "across-decoding", 4, decoding));
    wait_for_in_flight(receiver, "across-waiting", (4, 0)).await?;
    wait_for_in_flight(receiver, "across-decoding", (0, 4)).await?;
    println!("before the reload: 4 waiting and 4 decoding in flight, reported");

    // A new plugin configuration: another report interval, another cap.
    envoy
        .reload_listener(&options(&stack.sim, receiver, &plugin_config(200, 9)))
        .await?;
    let draining = envoy
        .admin_stat(
            &http_client(),
            "listener_manager.total_filter_chains_draining",
        )
        .await;
    println!("reloaded; filter chains draining: {draining:?}");
    let reloaded_at = receiver.reports().len();
    // The streams were still going when the new configuration took over: else this would test
    // nothing across a reload.
    let still_going = long.iter().filter(|task| !task.is_finished()).count();
    println!("streams still going after the reload: {still_going} of 8");
    anyhow::ensure!(still_going > 0, "every stream ended before the reload");
    send_quick(envoy, "after", 10).await?;
    for (i, task) in long.into_iter().enumerate() {
        let response = task.await?;
        anyhow::ensure!(complete(&response), "long request {i}: {response:?}");
    }
    let totals = wait_for_settled(receiver, 28).await?;
    print_reports(receiver);
    for (model, sent) in [
        ("before", 10),
        ("across-waiting", 4),
        ("across-decoding", 4),
        ("after", 10),
    ] {
        assert_eq!(requests_of(&totals, model), sent, "{model}");
    }
    assert_eq!(total_requests(&totals), 28, "nothing counted twice");
    assert_eq!(totals.gaps, 0);

    // Reports after the reload come at the new configuration's interval.
    let (median, gaps) = median_gap_after(receiver, reloaded_at).await?;
    // At least 150 ms tells 200 ms from the old 100; the upper bound is generous, for a busy
    // machine, and still catches reports held back.
    assert!(
        (150..=400).contains(&median),
        "the new configuration (200 ms) reports, not the old one (100 ms): {gaps:?}"
    );

    // Again, with one stream across it, back to the first configuration's interval.
    let mut long = start_long(envoy, "across-again", 1, decoding);
    wait_for_in_flight(receiver, "across-again", (0, 1)).await?;
    envoy
        .reload_listener(&options(&stack.sim, receiver, &plugin_config(100, 10)))
        .await?;
    send_quick(envoy, "after-again", 5).await?;
    if let Some(task) = long.pop() {
        let response = task.await?;
        anyhow::ensure!(complete(&response), "long request: {response:?}");
    }
    let totals = wait_for_settled(receiver, 34).await?;
    print_reports(receiver);
    assert_eq!(total_requests(&totals), 34, "nothing counted twice");
    assert_eq!(requests_of(&totals, "across-again"), 1);
    assert_eq!(requests_of(&totals, "after-again"), 5);
    assert_eq!(totals.gaps, 0);
    let (identities, _, _) = check_sequences(&receiver.reports());
    assert_eq!(identities, 1, "one reporter identity across reloads");

    let prometheus = envoy.prometheus().await?;
    let stats_requests = prometheus_sum(&prometheus, "flyball_requests_total", &[]);
    let stats_in_flight = prometheus_sum(&prometheus, "flyball_requests_in_flight", &[]);
    println!("Envoy stats: {stats_requests} requests, {stats_in_flight} in flight");
    assert_eq!(stats_requests, 34.0);
    assert_eq!(stats_in_flight, 0.0);
    Ok(())
}

/// Streams still going when the old configuration's drain time ends are cut by Envoy, and the
/// old root contexts go with the old configuration: what those streams did is still reported,
/// and nothing stays in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_when_the_old_configuration_drains_are_accounted() -> anyhow::Result<()> {
    let drain = Duration::from_secs(2);
    let stack = start_stack(drain).await?;
    let (envoy, receiver) = (&stack.envoy, &stack.receiver);

    send_quick(envoy, "before", 10).await?;
    // Far longer than the drain time.
    let waiting = Timing {
        ttft_ms: 30_000,
        itl_ms: 10,
        tokens: 3,
    };
    let decoding = Timing {
        ttft_ms: 10,
        itl_ms: 200,
        tokens: 150,
    };
    let mut long = start_long(envoy, "cut-waiting", 3, waiting);
    long.extend(start_long(envoy, "cut-decoding", 3, decoding));
    wait_for_in_flight(receiver, "cut-waiting", (3, 0)).await?;
    wait_for_in_flight(receiver, "cut-decoding", (0, 3)).await?;

    envoy
        .reload_listener(&options(&stack.sim, receiver, &plugin_config(200, 9)))
        .await?;
    send_quick(envoy, "after", 10).await?;
    let mut cut = 0;
    for task in long {
        let response = tokio::time::timeout(Duration::from_secs(20), task).await??;
        if !complete(&response) {
            cut += 1;
        }
    }
    println!("streams cut by the drain: {cut} of 6");
    anyhow::ensure!(cut == 6, "the drain time did not cut the long streams");
    let admin = http_client();
    let draining = wait_for(
        "the old filter chain to be gone",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                let n = envoy
                    .admin_stat(&admin, "listener_manager.total_filter_chains_draining")
                    .await?;
                (n == 0).then_some(n)
            }
        },
    )
    .await?;
    println!("filter chains draining: {draining}");
    // More requests after the old configuration is gone, so reports keep coming.
    send_quick(envoy, "later", 5).await?;

    let totals = wait_for_settled(receiver, 31).await?;
    print_reports(receiver);
    for (model, sent) in [
        ("before", 10),
        ("cut-waiting", 3),
        ("cut-decoding", 3),
        ("after", 10),
        ("later", 5),
    ] {
        assert_eq!(requests_of(&totals, model), sent, "{model}");
    }
    assert_eq!(totals.gaps, 0);
    let prometheus = envoy.prometheus().await?;
    let stats_requests = prometheus_sum(&prometheus, "flyball_requests_total", &[]);
    let stats_in_flight = prometheus_sum(&prometheus, "flyball_requests_in_flight", &[]);
    println!("Envoy stats: {stats_requests} requests, {stats_in_flight} in flight");
    assert_eq!(stats_requests, 31.0);
    assert_eq!(stats_in_flight, 0.0);
    Ok(())
}
