//! Benchmark: the same streaming workload through Envoy without the flyball filter (baseline)
//! and with it, in one run, alternating baseline and candidate, and printing ratios. It asserts
//! nothing on time: timings here move by ~7% between runs, so it reports medians and spread.
//!
//! Envoy runs with one worker thread pinned to CPU 0; the simulator and the load generator run
//! in this process, pinned to CPU 1 (the binary re-executes itself under `taskset`). Each round
//! measures, for each Envoy:
//! - latency: sequential requests, client time to first byte (p50, p99);
//! - throughput: `--concurrency` streams for `--seconds`, requests/s and Envoy's CPU time
//!   (utime + stime from /proc/<pid>/stat) per streamed event;
//! - Envoy's RSS after the round (memory must stay flat across rounds).
//!
//!     cargo run --release -p flyball-tests --bin filter-bench [-- --quick]

use flyball_local::client::{http_client, post};
use flyball_local::envoy::{Envoy, EnvoyOptions};
use flyball_sim::{SimConfig, SimServer};
use std::time::{Duration, Instant};

struct Args {
    rounds: usize,
    seconds: f64,
    concurrency: usize,
    latency_requests: usize,
    tokens: usize,
    plugin_config: String,
}

impl Args {
    fn parse() -> Args {
        let quick = std::env::args().any(|a| a == "--quick");
        let mut args = if quick {
            Args {
                rounds: 3,
                seconds: 2.0,
                concurrency: 32,
                latency_requests: 60,
                tokens: 256,
                plugin_config: String::new(),
            }
        } else {
            Args {
                rounds: 5,
                seconds: 6.0,
                concurrency: 64,
                latency_requests: 200,
                tokens: 256,
                plugin_config: String::new(),
            }
        };
        let argv: Vec<String> = std::env::args().collect();
        for pair in argv.windows(2) {
            match pair[0].as_str() {
                "--rounds" => args.rounds = pair[1].parse().unwrap_or(args.rounds),
                "--seconds" => args.seconds = pair[1].parse().unwrap_or(args.seconds),
                "--concurrency" => args.concurrency = pair[1].parse().unwrap_or(args.concurrency),
                "--tokens" => args.tokens = pair[1].parse().unwrap_or(args.tokens),
                // The filter's plugin configuration (JSON), e.g. to measure without usage injection.
                "--plugin-config" => args.plugin_config = pair[1].clone(),
                _ => {}
            }
        }
        args
    }
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0)
}

/// (CPU seconds used so far, RSS bytes) of a process, from /proc.
fn process_usage(pid: u32, ticks: f64) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the ')' field 2.
    let cpu = (field(11) + field(12)) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (cpu, rss_kb * 1024)
}

fn body() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "bench-model",
        "messages": [{"role": "user", "content": "stream as fast as you can"}],
        "stream": true
    }))
    .unwrap_or_default()
}

fn headers(tokens: usize) -> Vec<(&'static str, String)> {
    vec![
        ("x-sim-ttft-ms", "0".to_owned()),
        ("x-sim-itl-ms", "0".to_owned()),
        ("x-sim-output-tokens", tokens.to_string()),
        ("x-sim-role-with-first-token", "1".to_owned()),
    ]
}

struct RoundResult {
    ttfb_p50_us: f64,
    ttfb_p99_us: f64,
    requests_per_s: f64,
    cpu_us_per_event: f64,
    rss_bytes: u64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn round(envoy: &Envoy, args: &Args, ticks: f64) -> anyhow::Result<RoundResult> {
    let client = http_client();
    let body = body();
    let headers = headers(args.tokens);
    // Latency: one request at a time.
    let mut ttfb = Vec::with_capacity(args.latency_requests);
    for _ in 0..args.latency_requests {
        let r = post(
            &client,
            envoy.listener(),
            "/v1/chat/completions",
            &body,
            &headers,
            None,
        )
        .await?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        if let Some(t) = r.first_byte_after {
            ttfb.push(t.as_secs_f64() * 1e6);
        }
    }
    ttfb.sort_by(f64::total_cmp);

    // Throughput: many streams at once, Envoy's single worker saturated.
    let (cpu_before, _) = process_usage(envoy.pid(), ticks);
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let client = client.clone();
        let body = body.clone();
        let headers = headers.clone();
        let addr = envoy.listener();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                match post(&client, addr, "/v1/chat/completions", &body, &headers, None).await {
                    Ok(r) if r.status == 200 => done += 1,
                    _ => break,
                }
            }
            done
        }));
    }
    let mut completed = 0u64;
    for task in tasks {
        completed += task.await.unwrap_or(0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu_after, rss_bytes) = process_usage(envoy.pid(), ticks);
    // Events per response: the role chunk, one per token, the final empty chunk is folded into
    // the last token by the simulator, and [DONE].
    let events = completed as f64 * (args.tokens as f64 + 2.0);
    Ok(RoundResult {
        ttfb_p50_us: percentile(&ttfb, 0.5),
        ttfb_p99_us: percentile(&ttfb, 0.99),
        requests_per_s: completed as f64 / elapsed,
        cpu_us_per_event: (cpu_after - cpu_before) * 1e6 / events.max(1.0),
        rss_bytes,
    })
}

fn median_and_spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let median = percentile(&values, 0.5);
    (
        median,
        values.first().copied().unwrap_or(f64::NAN),
        values.last().copied().unwrap_or(f64::NAN),
    )
}

fn pin_self_to_cpu1() -> anyhow::Result<bool> {
    if std::env::var_os("FLYBALL_BENCH_PINNED").is_some() {
        return Ok(false);
    }
    let taskset = std::process::Command::new("sh")
        .args(["-c", "command -v taskset"])
        .output()?;
    if !taskset.status.success() {
        eprintln!("taskset not found: running unpinned");
        return Ok(false);
    }
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(exe)
        .args(std::env::args().skip(1))
        .env("FLYBALL_BENCH_PINNED", "1")
        .status()?;
    std::process::exit(status.code().unwrap_or(1));
}

fn main() -> anyhow::Result<()> {
    pin_self_to_cpu1()?;
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ticks = clock_ticks_per_second();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = SimServer::start(SimConfig::default(), listener).await?;
    let upstream = sim.local_addr().port();
    let control = flyball_local::free_port()?; // nobody listens: reports fail, as they may
    let mut baseline_options = EnvoyOptions::with_filter(upstream, control, "{}");
    baseline_options.plugin_config = None;
    baseline_options.worker_threads = 1;
    baseline_options.cpu_list = Some("0".to_owned());
    let plugin_config = if args.plugin_config.is_empty() {
        r#"{"controlCluster":"flyball_control","reportIntervalMs":1000}"#.to_owned()
    } else {
        args.plugin_config.clone()
    };
    println!("filter configuration: {plugin_config}");
    let mut filter_options = EnvoyOptions::with_filter(upstream, control, &plugin_config);
    filter_options.worker_threads = 1;
    filter_options.cpu_list = Some("0".to_owned());
    let baseline = Envoy::start(&baseline_options).await?;
    let with_filter = Envoy::start(&filter_options).await?;

    println!(
        "filter-bench: {} rounds, {} tokens/stream, {} streams for {}s, {} sequential for latency; Envoy 1 worker on CPU 0",
        args.rounds, args.tokens, args.concurrency, args.seconds, args.latency_requests
    );
    let mut base_rounds = Vec::new();
    let mut filter_rounds = Vec::new();
    for i in 0..args.rounds {
        // Alternate which goes first so drift does not favour one side.
        let (b, f) = if i % 2 == 0 {
            let b = round(&baseline, &args, ticks).await?;
            (b, round(&with_filter, &args, ticks).await?)
        } else {
            let f = round(&with_filter, &args, ticks).await?;
            (round(&baseline, &args, ticks).await?, f)
        };
        println!(
            "round {i}: rps {:.0} vs {:.0} (ratio {:.3}), ttfb p50 {:.0} vs {:.0} us, cpu/event {:.2} vs {:.2} us, filter RSS {:.1} MiB",
            b.requests_per_s,
            f.requests_per_s,
            f.requests_per_s / b.requests_per_s,
            b.ttfb_p50_us,
            f.ttfb_p50_us,
            b.cpu_us_per_event,
            f.cpu_us_per_event,
            f.rss_bytes as f64 / 1048576.0
        );
        base_rounds.push(b);
        filter_rounds.push(f);
    }
    let ratio = median_and_spread(
        base_rounds
            .iter()
            .zip(&filter_rounds)
            .map(|(b, f)| f.requests_per_s / b.requests_per_s)
            .collect(),
    );
    let added_p50 = median_and_spread(
        base_rounds
            .iter()
            .zip(&filter_rounds)
            .map(|(b, f)| f.ttfb_p50_us - b.ttfb_p50_us)
            .collect(),
    );
    let added_p99 = median_and_spread(
        base_rounds
            .iter()
            .zip(&filter_rounds)
            .map(|(b, f)| f.ttfb_p99_us - b.ttfb_p99_us)
            .collect(),
    );
    let cpu_base = median_and_spread(base_rounds.iter().map(|r| r.cpu_us_per_event).collect());
    let cpu_filter = median_and_spread(filter_rounds.iter().map(|r| r.cpu_us_per_event).collect());
    let added_cpu = median_and_spread(
        base_rounds
            .iter()
            .zip(&filter_rounds)
            .map(|(b, f)| f.cpu_us_per_event - b.cpu_us_per_event)
            .collect(),
    );
    let rss: Vec<f64> = filter_rounds
        .iter()
        .map(|r| r.rss_bytes as f64 / 1048576.0)
        .collect();
    println!(
        "--- filter-bench summary (median [min..max] over {} rounds)",
        args.rounds
    );
    println!(
        "requests/s ratio (filter / plain Envoy): {:.3} [{:.3}..{:.3}]   target >= 0.97",
        ratio.0, ratio.1, ratio.2
    );
    println!(
        "added p50 time to first byte: {:.1} us [{:.1}..{:.1}]   target <= 10 us",
        added_p50.0, added_p50.1, added_p50.2
    );
    println!(
        "added p99 time to first byte: {:.1} us [{:.1}..{:.1}]",
        added_p99.0, added_p99.1, added_p99.2
    );
    println!(
        "Envoy CPU per streamed event: plain {:.2} us, with filter {:.2} us, added {:.2} us [{:.2}..{:.2}]   target <= 1 us",
        cpu_base.0, cpu_filter.0, added_cpu.0, added_cpu.1, added_cpu.2
    );
    println!(
        "Envoy (with filter) RSS after each round: {} MiB; growth first->last {:+.1} MiB",
        rss.iter()
            .map(|r| format!("{r:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        rss.last().unwrap_or(&0.0) - rss.first().unwrap_or(&0.0)
    );
    drop(sim);
    Ok(())
}
