//! Ingest under many gateways, over real gRPC: sustained reports/s, server CPU per report and
//! server RSS, against a baseline server that decodes and acknowledges reports but merges nothing.
//!
//!     cargo bench -p flyball-control --bench ingest               # 10,000 gateways at 1 Hz
//!     cargo bench -p flyball-control --bench ingest -- --quick    # 500 gateways, a few seconds
//!     cargo bench -p flyball-control --bench ingest -- --gateways 2000 --rate 10 --seconds 30
//!     cargo bench -p flyball-control --bench ingest -- --rpc unary  # one call per report
//!     cargo bench -p flyball-control --bench ingest -- --forward    # through a follower
//!     cargo bench -p flyball-control --bench ingest -- --followed   # a leader with a follower
//!     cargo bench -p flyball-control --bench ingest -- --dense-sketches  # sparseSketches off
//!     cargo bench -p flyball-control --bench ingest -- --merge-only  # ingest's own code alone
//!     cargo bench -p flyball-control --bench ingest -- --alloc-census  # where the memory goes
//!
//! Each server runs in a child process of this one (this binary again, `--child`) on a
//! current-thread runtime pinned to CPU 0 (the load generator to CPU 1), so its CPU and memory
//! are read from `/proc/<child>/stat` and `/proc/<child>/status` without the load generator's.
//! Timings here move by ~7% from run to run, so baseline and ingest alternate for `--rounds`
//! (default 3) and the table gives medians with their spread. Each synthetic
//! gateway has its own HTTP/2 connection (as real gateways do; `--connections` caps it) and sends
//! 4 keys with realistic TTFT/TPOT/ITL/e2e sketches, each report a message on its long-lived
//! `ReportStream` awaiting its acknowledgement (as the filter does), or with `--rpc unary` a
//! `Report` call of its own. The target: 10,000 gateways at 1 Hz on one
//! core at <= 25% CPU and <= 64 MB RSS. Nothing here asserts on time; it prints.
//!
//! `--forward` compares instead a leader taking every report (the baseline) with a follower
//! taking them and forwarding each to a leader in a third process (on CPU 1, beside the load
//! generator): the worst case of a Service that sent every gateway to a follower. It prints the
//! follower's CPU and memory, the reports it forwarded per second and any it dropped.
//!
//! `--followed` compares a leader alone (the baseline) with a leader that a follower (a third
//! process, on CPU 1) follows: what streaming every report to a follower costs the leader.
//!
//! `--merge-only` leaves gRPC out: in this process, on one core, the same reports, encoded, are
//! read and merged (`EncodedReport::decode`, `Telemetry::ingest_from`) as fast as they go, the
//! gateways taking turns as they do at 1 Hz, on a clock of the bench's own. The transport's share
//! of the figures above moves by more than ingest's own code costs; this shows that code's cost
//! apart, with less noise, and, run under `valgrind --tool=callgrind`, as instructions a report
//! that do not move from run to run (the clock is the bench's, so they do not depend on how fast
//! the reports go).
//!
//! `--alloc-census` has each server print its live allocations by size, per gateway, once every
//! gateway is connected and again under load: what each connection holds, by the size of each
//! buffer and state, beside RSS (which counts only the pages touched).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flyball_proto::Sketch;
use flyball_proto::codec::ReceivedReport;
use flyball_proto::grpc::telemetry_service_client::TelemetryServiceClient;
use flyball_proto::grpc::telemetry_service_server::{TelemetryService, TelemetryServiceServer};
use flyball_proto::v1;
use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};

/// The allocator the `flyball` binary runs the control service on (cli/src/main.rs), so the
/// figures are the product's; it counts allocations only for `--alloc-census`.
#[global_allocator]
static ALLOCATOR: census::Counting = census::Counting;

type Error = Box<dyn std::error::Error + Send + Sync>;

const KEYS: usize = 4;

#[derive(Debug, Clone)]
struct Options {
    gateways: usize,
    rate_hz: f64,
    connections: usize,
    streaming: bool,
    /// Follower against leader, instead of ingest against decode-and-ack.
    forward: bool,
    /// Leader with a follower against leader alone.
    followed: bool,
    /// Every sketch in the dense form, as a filter with `sparseSketches` off sends them.
    dense: bool,
    rounds: usize,
    warmup: Duration,
    measure: Duration,
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        return child(&args[at + 1..]);
    }
    let quick = args.iter().any(|a| a == "--quick");
    census::ask(args.iter().any(|a| a == "--alloc-census"));
    if args.iter().any(|a| a == "--merge-only") {
        return merge_only(args.iter().any(|a| a == "--dense-sketches"));
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let gateways = value("--gateways").unwrap_or(if quick { 500.0 } else { 10_000.0 }) as usize;
    let options = Options {
        gateways,
        rate_hz: value("--rate").unwrap_or(1.0),
        connections: value("--connections")
            .map_or(gateways, |c| c as usize)
            .max(1),
        forward: args.iter().any(|a| a == "--forward"),
        followed: args.iter().any(|a| a == "--followed"),
        dense: args.iter().any(|a| a == "--dense-sketches"),
        rounds: value("--rounds")
            .map_or(if quick { 1 } else { 3 }, |r| r as usize)
            .max(1),
        streaming: match args
            .iter()
            .position(|a| a == "--rpc")
            .and_then(|i| args.get(i + 1))
        {
            None => true,
            Some(rpc) if rpc == "stream" => true,
            Some(rpc) if rpc == "unary" => false,
            Some(other) => return Err(format!("--rpc {other}: expected stream or unary").into()),
        },
        warmup: Duration::from_secs_f64(value("--warmup").unwrap_or(if quick { 2.0 } else { 5.0 })),
        measure: Duration::from_secs_f64(value("--seconds").unwrap_or(if quick {
            4.0
        } else {
            10.0
        })),
    };
    // The servers run on CPU 0 (see `spawn_child`), the load generator on CPU 1; set before
    // the runtime starts, so its threads inherit it.
    pin_to_cpu(std::process::id(), 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(parent(options))
}

// === the load generator ===

#[derive(Debug, Clone, Copy)]
struct Measured {
    reports_per_s: f64,
    cpu_per_report_us: f64,
    cpu_share: f64,
    rss_mb: f64,
    peak_rss_mb: f64,
    idle_rss_mb: f64,
    connected_rss_mb: f64,
    after_rss_mb: f64,
    errors: u64,
    /// Reports the follower forwarded, per second measured (`--forward` only).
    forwarded_per_s: f64,
    /// Reports the follower could not forward, all told (`--forward` only).
    forward_dropped: f64,
    /// Reports the follower missed for falling behind the leader, all told (`--followed` only).
    follower_missed: f64,
}

async fn parent(options: Options) -> Result<(), Error> {
    let (base_mode, mode) = if options.forward {
        ("leader", "follower")
    } else if options.followed {
        ("leader", "followed")
    } else {
        ("baseline", "ingest")
    };
    println!(
        "ingest bench: {} gateways x {} keys at {} Hz over {} connections, {}, sketches {}; {} \
         rounds of {base_mode} then {mode}, each warm-up {:?} + measure {:?}",
        options.gateways,
        KEYS,
        options.rate_hz,
        options.connections,
        if options.streaming {
            "a ReportStream each"
        } else {
            "unary Report calls"
        },
        if options.dense {
            "dense (--dense-sketches)"
        } else {
            "compact (dense or sparse, whichever is smaller, as the filter sends)"
        },
        options.rounds,
        options.warmup,
        options.measure
    );
    let mean_bytes = |bodies: &Bodies| {
        use prost::Message;
        bodies.0.iter().map(|b| b.encoded_len()).sum::<usize>() / bodies.0.len()
    };
    println!(
        "reports of {} bytes on average ({} with every sketch dense)",
        mean_bytes(&Bodies::new(64, options.dense)),
        mean_bytes(&Bodies::new(64, true)),
    );
    let clk_tck = clock_ticks_per_s();
    let (mut baseline, mut ingest) = (Vec::new(), Vec::new());
    for _ in 0..options.rounds {
        baseline.push(run_mode(base_mode, &options, clk_tck).await?);
        ingest.push(run_mode(mode, &options, clk_tck).await?);
    }
    let target_rate = options.gateways as f64 * options.rate_hz;
    println!();
    println!(
        "{:<24}{:>26}{:>26}{:>8}",
        "median [min..max]", base_mode, mode, "ratio"
    );
    let row = |name: &str, of: fn(&Measured) -> f64| {
        let b = Spread::of(baseline.iter().map(of));
        let i = Spread::of(ingest.iter().map(of));
        let ratio = if b.median > 0.0 {
            i.median / b.median
        } else {
            f64::NAN
        };
        println!(
            "{name:<24}{:>26}{:>26}{ratio:>8.2}",
            b.to_string(),
            i.to_string()
        );
        (b, i)
    };
    let (_, rate) = row("reports/s", |m| m.reports_per_s);
    let (base_cpu, cpu) = row("CPU per report (us)", |m| m.cpu_per_report_us);
    let (_, share) = row("CPU (% of one core)", |m| m.cpu_share * 100.0);
    let (base_idle, idle) = row("RSS idle (MB)", |m| m.idle_rss_mb);
    let (base_connected, connected) = row("RSS connected (MB)", |m| m.connected_rss_mb);
    row("RSS under load (MB)", |m| m.rss_mb);
    let (base_peak, peak) = row("RSS peak (MB)", |m| m.peak_rss_mb);
    row("RSS after load (MB)", |m| m.after_rss_mb);
    row("failed reports", |m| m.errors as f64);
    if options.forward {
        let (_, forwarded) = row("forwarded/s", |m| m.forwarded_per_s);
        let (_, dropped) = row("forward drops", |m| m.forward_dropped);
        println!();
        println!(
            "follower: {:.1} us CPU per report ({:+.1} us over the leader), forwarded {:.0}/s of \
             {:.0}/s taken, {:.0} dropped",
            cpu.median,
            cpu.median - base_cpu.median,
            forwarded.median,
            rate.median,
            dropped.median
        );
        return Ok(());
    }
    if options.followed {
        let (_, missed) = row("follower missed", |m| m.follower_missed);
        println!();
        println!(
            "leader followed by one follower: {:.1} us CPU per report ({:+.1} us over a leader \
             alone), {:.1}% of one core; the follower missed {:.0} reports",
            cpu.median,
            cpu.median - base_cpu.median,
            share.median,
            missed.median
        );
        return Ok(());
    }
    println!();
    println!(
        "merge cost: {:+.1} us CPU per report over decode-and-ack (medians)",
        cpu.median - base_cpu.median
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    if options.gateways != 10_000 || options.rate_hz != 1.0 {
        println!("(the CPU and RSS targets are set for 10,000 gateways at 1 Hz)");
    }
    println!(
        "target {:.0} reports/s: sustained {:.0} ({})",
        target_rate,
        rate.median,
        verdict(rate.median >= 0.97 * target_rate)
    );
    println!(
        "target <= 25% of one core: {:.1}% ({})",
        share.median,
        verdict(share.median <= 25.0)
    );
    // Per gateway: what the process holds above its RSS before the first connection.
    let per_gateway_kb =
        |mb: Spread, idle: Spread| (mb.median - idle.median) * 1024.0 / options.gateways as f64;
    println!(
        "target <= 64 MB RSS: peak {:.1} MB ({}); {:.1} KB per gateway, decode-and-ack only {:.1} KB",
        peak.median,
        verdict(peak.median <= 64.0),
        per_gateway_kb(peak, idle),
        per_gateway_kb(base_peak, base_idle),
    );
    println!(
        "before any report: {:.1} KB per gateway connected{} (decode-and-ack only: {:.1} KB)",
        per_gateway_kb(connected, idle),
        if options.streaming {
            " with its stream open"
        } else {
            ""
        },
        per_gateway_kb(base_connected, base_idle),
    );
    println!(
        "machine-readable: rpc={} gateways={} rate_hz={} connections={} rounds={} reports_per_s={:.1} \
         cpu_us_per_report={:.2} cpu_share={:.4} peak_rss_mb={:.1} baseline_cpu_us_per_report={:.2} \
         baseline_peak_rss_mb={:.1}",
        if options.streaming { "stream" } else { "unary" },
        options.gateways,
        options.rate_hz,
        options.connections,
        options.rounds,
        rate.median,
        cpu.median,
        share.median / 100.0,
        peak.median,
        base_cpu.median,
        base_peak.median,
    );
    Ok(())
}

/// The median of a few rounds, with the lowest and highest.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64>) -> Spread {
        let mut values: Vec<f64> = values.collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => values[n / 2],
            _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        };
        Spread {
            median,
            min: values.first().copied().unwrap_or(f64::NAN),
            max: values.last().copied().unwrap_or(f64::NAN),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} [{:.1}..{:.1}]", self.median, self.min, self.max)
    }
}

/// Pins a process (its main thread, and the threads it starts afterwards) to one CPU, where
/// the machine has it and `taskset` is installed; otherwise runs unpinned and says so.
fn pin_to_cpu(pid: u32, cpu: usize) {
    let pinned = Command::new("taskset")
        .args(["-cp", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status();
    if !matches!(pinned, Ok(status) if status.success()) {
        eprintln!("could not pin to CPU {cpu} (taskset missing, or no such CPU): running unpinned");
    }
}

async fn run_mode(mode: &str, options: &Options, clk_tck: f64) -> Result<Measured, Error> {
    // A follower forwards to a leader of its own, and a followed leader has a follower, in a
    // process on the load generator's CPU.
    let mut leader = None;
    let mut follower = None;
    let (mut child, addr, http) = match mode {
        "follower" => {
            let (upstream, grpc, _) = spawn_child("leader", 1, &[])?;
            leader = Some(upstream);
            spawn_child(mode, 0, &[&grpc])?
        }
        "followed" => {
            let (measured, grpc, http) = spawn_child("leader", 0, &[])?;
            let (downstream, _, _) = spawn_child("follower", 1, &[&grpc])?;
            follower = Some(downstream);
            let http = http.as_deref().ok_or("the leader has no HTTP address")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while metric(http, "flyball_replication_followers").await? < 1.0 {
                if Instant::now() > deadline {
                    return Err("the follower did not follow the leader within 10 s".into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (measured, grpc, Some(http.to_owned()))
        }
        _ => spawn_child(mode, 0, &[])?,
    };
    let pid = child.id();
    let idle_rss_mb = rss_mb(pid, "VmRSS:").unwrap_or(0.0);

    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
    let mut channels = Vec::with_capacity(options.connections);
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..options.connections {
        let endpoint = endpoint.clone();
        let connecting = connecting.clone();
        pending.spawn(async move {
            let _permit = connecting.acquire().await;
            (i, endpoint.connect().await)
        });
    }
    let mut slots: Vec<Option<Channel>> = vec![None; options.connections];
    while let Some(done) = pending.join_next().await {
        let (i, channel) = done?;
        slots[i] = Some(channel?);
    }
    channels.extend(slots.into_iter().flatten());

    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let bodies = Arc::new(Bodies::new(64, options.dense));
    let period = Duration::from_secs_f64(1.0 / options.rate_hz);
    // Every gateway connects (and opens its stream) first; the reports start together once the
    // server's RSS with idle connections has been read: the gRPC stack's floor, in this run.
    let ready = Arc::new(AtomicU64::new(0));
    let (start, started) = tokio::sync::watch::channel(false);
    let mut gateways = tokio::task::JoinSet::new();
    for g in 0..options.gateways {
        let client = TelemetryServiceClient::new(channels[g % channels.len()].clone());
        let (sent, errors, bodies) = (sent.clone(), errors.clone(), bodies.clone());
        let phase = period.mul_f64(g as f64 / options.gateways as f64);
        let schedule = Schedule {
            index: g,
            phase,
            period,
            ready: ready.clone(),
            started: started.clone(),
        };
        if options.streaming {
            gateways.spawn(streaming_gateway(client, schedule, bodies, sent, errors));
        } else {
            gateways.spawn(unary_gateway(client, schedule, bodies, sent, errors));
        }
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::Relaxed) < options.gateways as u64 {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} gateways connected within 60 s",
                ready.load(Ordering::Relaxed),
                options.gateways
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_rss_mb = rss_mb(pid, "VmRSS:").unwrap_or(0.0);
    census::request(&mut child, "connected", options.gateways).await?;
    start.send_replace(true);

    tokio::time::sleep(options.warmup).await;
    let forwarded = async || match (&leader, &http) {
        (Some(_), Some(http)) => metric(http, "flyball_forward_reports_total").await,
        _ => Ok(0.0),
    };
    let forwarded0 = forwarded().await?;
    let cpu0 = cpu_ticks(pid)?;
    let sent0 = sent.load(Ordering::Relaxed);
    let errors0 = errors.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(options.measure).await;
    let cpu1 = cpu_ticks(pid)?;
    let sent1 = sent.load(Ordering::Relaxed);
    let errors1 = errors.load(Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let forwarded1 = forwarded().await?;
    let forward_dropped = match (&leader, &http) {
        (Some(_), Some(http)) => metric(http, "flyball_forward_dropped_total").await?,
        _ => 0.0,
    };
    let follower_missed = match (&follower, &http) {
        (Some(_), Some(http)) => metric(http, "flyball_replication_lagged_total").await?,
        _ => 0.0,
    };
    let rss = rss_mb(pid, "VmRSS:").unwrap_or(0.0);
    let peak = rss_mb(pid, "VmHWM:").unwrap_or(0.0);
    census::request(&mut child, "under load", options.gateways).await?;
    gateways.shutdown().await;
    drop(channels);
    // What stays once every connection is gone: the service's own state (and the allocator's
    // reluctance to give memory back).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_rss_mb = rss_mb(pid, "VmRSS:").unwrap_or(0.0);
    for process in std::iter::once(&mut child)
        .chain(leader.as_mut())
        .chain(follower.as_mut())
    {
        let _ = process.kill();
        let _ = process.wait();
    }

    let reports = (sent1 - sent0) as f64;
    let cpu_s = (cpu1 - cpu0) as f64 / clk_tck;
    let measured = Measured {
        reports_per_s: reports / elapsed,
        cpu_per_report_us: if reports > 0.0 {
            cpu_s / reports * 1e6
        } else {
            f64::NAN
        },
        cpu_share: cpu_s / elapsed,
        rss_mb: rss,
        peak_rss_mb: peak,
        idle_rss_mb,
        connected_rss_mb,
        after_rss_mb,
        errors: errors1 - errors0,
        forwarded_per_s: (forwarded1 - forwarded0) / elapsed,
        forward_dropped,
        follower_missed,
    };
    println!("{mode:>8}: {measured:?}");
    Ok(measured)
}

#[derive(Debug, Clone)]
struct Schedule {
    index: usize,
    phase: Duration,
    period: Duration,
    /// Counts gateways connected and ready to report.
    ready: Arc<AtomicU64>,
    /// Turns true when reporting starts.
    started: tokio::sync::watch::Receiver<bool>,
}

impl Schedule {
    /// Says this gateway is connected, and waits for the reports to start.
    async fn connected(&mut self) {
        self.ready.fetch_add(1, Ordering::Relaxed);
        let _ = self.started.wait_for(|started| *started).await;
    }

    /// Reports of this gateway, one per period, each stamped with its identity and sequence.
    fn reports(
        &self,
        bodies: Arc<Bodies>,
    ) -> impl futures::Stream<Item = v1::ReportRequest> + use<> {
        let name = format!("gateway-{:05}", self.index);
        let (index, phase, period) = (self.index, self.phase, self.period);
        futures::stream::unfold(
            (None::<tokio::time::Interval>, 1u64),
            move |(tick, sequence)| {
                let (name, bodies) = (name.clone(), bodies.clone());
                async move {
                    let mut tick = match tick {
                        Some(tick) => tick,
                        None => {
                            tokio::time::sleep(phase).await;
                            let mut tick = tokio::time::interval(period);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            tick
                        }
                    };
                    tick.tick().await;
                    let mut report = bodies.pick(index as u64 ^ sequence);
                    report.reporter = Some(v1::Reporter {
                        gateway: name,
                        process_start_unix_ms: 1_700_000_000_000,
                        filter_version: "bench".into(),
                    });
                    report.sequence = sequence;
                    Some((report, (Some(tick), sequence + 1)))
                }
            },
        )
    }
}

async fn unary_gateway(
    mut client: TelemetryServiceClient<Channel>,
    schedule: Schedule,
    bodies: Arc<Bodies>,
    sent: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    let mut schedule = schedule;
    schedule.connected().await;
    let reports = schedule.reports(bodies);
    futures::pin_mut!(reports);
    while let Some(report) = reports.next().await {
        match client.report(report).await {
            Ok(_) => sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Like the filter: one report at a time on the stream, the next sent once the previous one is
/// acknowledged; a broken stream is counted and opened again.
async fn streaming_gateway(
    mut client: TelemetryServiceClient<Channel>,
    schedule: Schedule,
    bodies: Arc<Bodies>,
    sent: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    let mut schedule = schedule;
    let reports = schedule.reports(bodies);
    futures::pin_mut!(reports);
    let mut waiting_to_start = true;
    loop {
        let (outbound, outbound_rx) = tokio::sync::mpsc::channel::<v1::ReportRequest>(1);
        let opened = client
            .report_stream(tokio_stream::wrappers::ReceiverStream::new(outbound_rx))
            .await;
        let mut acks = match opened {
            Ok(response) => response.into_inner(),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(schedule.period).await;
                continue;
            }
        };
        if std::mem::take(&mut waiting_to_start) {
            schedule.connected().await;
        }
        loop {
            let Some(report) = reports.next().await else {
                return;
            };
            let sequence = report.sequence;
            if outbound.send(report).await.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            match acks.message().await {
                Ok(Some(ack)) if ack.acknowledged_sequence == sequence => {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// Pre-built report bodies, so the load generator spends its CPU sending, not sampling.
struct Bodies(Vec<v1::ReportRequest>);

impl Bodies {
    fn new(n: usize, dense: bool) -> Self {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        Bodies((0..n).map(|_| synthetic_report(&mut rng, dense)).collect())
    }

    fn pick(&self, i: u64) -> v1::ReportRequest {
        self.0[(i as usize) % self.0.len()].clone()
    }
}

/// One second of a busy gateway: per key a handful of requests, latencies spread as real ones.
/// Sketches go in the form the filter sends: the smaller of dense and sparse, or dense.
fn synthetic_report(rng: &mut Rng, dense: bool) -> v1::ReportRequest {
    let wire = |sketch: &Sketch| {
        Some(if dense {
            v1::Sketch::from(sketch)
        } else {
            v1::Sketch::compact(sketch)
        })
    };
    let keys = (0..KEYS)
        .map(|k| {
            let requests = 2 + rng.below(8);
            let mut ttft = Sketch::new();
            let mut tpot = Sketch::new();
            let mut itl = Sketch::new();
            let mut e2e = Sketch::new();
            let mut output = 0;
            for _ in 0..requests {
                let ttft_us = rng.log_uniform(50_000.0, 2_000_000.0);
                let tpot_us = rng.log_uniform(15_000.0, 80_000.0);
                let tokens = 20 + rng.below(400);
                ttft.record(ttft_us);
                tpot.record(tpot_us);
                for _ in 0..8 {
                    itl.record(tpot_us * rng.log_uniform(0.5, 2.0));
                }
                e2e.record(ttft_us + tpot_us * tokens as f64);
                output += tokens;
            }
            v1::KeyTelemetry {
                backend: format!("vllm-{k}"),
                model: format!("model-{k}"),
                requests: Some(v1::RequestOutcomes {
                    ok: requests,
                    server_error: u64::from(rng.below(20) == 0),
                    ..Default::default()
                }),
                tokens: Some(v1::TokenUsage {
                    input: requests * (200 + rng.below(2_000)),
                    output,
                    ..Default::default()
                }),
                ttft_us: wire(&ttft),
                tpot_us: wire(&tpot),
                itl_us: wire(&itl),
                e2e_us: wire(&e2e),
                in_flight: Some(v1::InFlight {
                    waiting_first_token: rng.below(3),
                    decoding: rng.below(10),
                }),
            }
        })
        .collect();
    v1::ReportRequest {
        reporter: None,
        sequence: 0,
        sent_at_unix_ms: 0,
        keys,
        dropped: None,
        held_ms: 0,
        connections_closed: false,
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln())).exp()
    }
}

// === the server, in a child process ===

/// Starts a server process on `cpu`; returns it with its gRPC address and, for a control
/// service, its HTTP address. `FLYBALL_BENCH_WRAP` runs the server under a profiler, e.g.
/// `heaptrack` or `perf record -g`.
fn spawn_child(
    mode: &str,
    cpu: usize,
    extra: &[&str],
) -> Result<(Child, String, Option<String>), Error> {
    let exe = std::env::current_exe()?;
    let wrapper = std::env::var("FLYBALL_BENCH_WRAP").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(&exe);
            command
        }
        None => Command::new(&exe),
    };
    census::pass_on(&mut command);
    let mut child = command
        .args(["--child", mode, &cpu.to_string()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    // A wrapper may print first; the server's own line is the one that says where it listens.
    let (grpc, http) = loop {
        let line = lines.next().ok_or("the server exited before listening")??;
        if let Some(addrs) = line.strip_prefix("LISTEN ") {
            let mut addrs = addrs.split_whitespace().map(str::to_owned);
            break (addrs.next().ok_or("no address")?, addrs.next());
        }
    };
    Ok((child, grpc, http))
}

/// The sum of a metric's samples on a control service's `/metrics` (all label sets).
async fn metric(http: &str, name: &str) -> Result<f64, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(http).await?;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    Ok(body
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value))
}

/// Serves on one core until killed: `--child MODE CPU [LEADER]`.
fn child(args: &[String]) -> Result<(), Error> {
    let mode = args.first().map_or("", String::as_str);
    let cpu = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let leader = args.get(2).map(|grpc| format!("http://{grpc}"));
    pin_to_cpu(std::process::id(), cpu);
    census::serve();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match mode {
            "baseline" => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                announce(&listener.local_addr()?.to_string())?;
                // The same server settings as the control service's.
                flyball_control::grpc_server()
                    .add_service(TelemetryServiceServer::new(AckOnly))
                    .serve_with_incoming(flyball_control::grpc_incoming(
                        listener,
                        flyball_control::GrpcKeepalive::default(),
                    ))
                    .await?;
            }
            _ => {
                let config = flyball_control::config::ControlConfig::from_yaml(&bench_config())?;
                let args = <Cli as clap::Parser>::parse_from([
                    "bench",
                    "--grpc-listen",
                    "127.0.0.1:0",
                    "--http-listen",
                    "127.0.0.1:0",
                ])
                .args;
                let control = flyball_control::Control::bind_with_config(&args, config).await?;
                let grpc = control.grpc_addr().ok_or("no address")?;
                let http = control.http_addr().ok_or("no address")?;
                // Given a leader's address, a follower forwarding to it; otherwise the leader.
                let (_leading, leading_rx) = tokio::sync::watch::channel(leader.is_none());
                let (_leader, leader_rx) = tokio::sync::watch::channel(leader);
                let control = control.with_leadership(
                    flyball_control::leader::Leadership::from_channels(mode, leading_rx, leader_rx),
                );
                announce(&format!("{grpc} {http}"))?;
                control.serve(std::future::pending()).await?;
            }
        }
        Ok(())
    })
}

/// `--merge-only`: see the module documentation.
fn merge_only(dense: bool) -> Result<(), Error> {
    use flyball_control::ingest::{IngestConfig, Telemetry};
    use flyball_proto::codec::EncodedReport;
    const GATEWAYS: u64 = 10_000;
    const ROUNDS: u64 = 15;
    pin_to_cpu(std::process::id(), 0);
    let config = flyball_control::config::ControlConfig::from_yaml(&bench_config())?;
    // The gateways report at 1 Hz, spread over each second, on a clock of the bench's own: what
    // ingest does then depends on nothing else (under `valgrind --tool=callgrind`, 50 times
    // slower, the same instructions run, and each report is not a silent gateway's backlog).
    let epoch = tokio::time::Instant::now();
    let at = |round: u64, gateway: u64| {
        epoch + Duration::from_secs(round) + Duration::from_micros(gateway * 1_000_000 / GATEWAYS)
    };
    let telemetry = Telemetry::new(
        IngestConfig::default(),
        flyball_control::window::WindowConfig::default(),
        config.selectors(),
        epoch,
    );
    let bodies = Bodies::new(64, dense);
    let encoded_round = |round: u64| -> Vec<EncodedReport> {
        (0..GATEWAYS)
            .map(|gateway| {
                let sequence = round + 1;
                let mut report = bodies.pick(gateway ^ sequence);
                report.reporter = Some(v1::Reporter {
                    gateway: format!("gateway-{gateway:05}"),
                    process_start_unix_ms: 1_700_000_000_000,
                    filter_version: "bench".into(),
                });
                report.sequence = sequence;
                EncodedReport::encode(&report)
            })
            .collect()
    };
    let mut per_report_us = Vec::new();
    for round in 0..ROUNDS {
        let reports = encoded_round(round);
        let started = Instant::now();
        for (gateway, encoded) in (0..GATEWAYS).zip(&reports) {
            let report = encoded.decode()?;
            telemetry
                .ingest_from(report, at(round, gateway), false)
                .map_err(|refusal| refusal.to_string())?;
        }
        let us = started.elapsed().as_secs_f64() * 1e6 / GATEWAYS as f64;
        // The first rounds meet every gateway for the first time.
        if round >= 3 {
            per_report_us.push(us);
        }
    }
    per_report_us.sort_by(f64::total_cmp);
    let median = per_report_us[per_report_us.len() / 2];
    println!(
        "merge only ({} sketches): {median:.2} us per report read and merged, median of {} rounds \
         of {GATEWAYS} gateways [{:.2}..{:.2}]",
        if dense { "dense" } else { "compact" },
        per_report_us.len(),
        per_report_us[0],
        per_report_us[per_report_us.len() - 1],
    );
    Ok(())
}

fn announce(addr: &str) -> Result<(), Error> {
    let mut out = std::io::stdout();
    writeln!(out, "LISTEN {addr}")?;
    out.flush()?;
    Ok(())
}

/// One autoscaler per key, so every report feeds four pools and the control loop runs.
fn bench_config() -> String {
    let mut yaml = String::from("autoscalers:\n");
    for k in 0..KEYS {
        yaml.push_str(&format!(
            "  - name: pool-{k}\n    spec:\n      selector: {{ backend: vllm-{k} }}\n      \
             pools: {{ unified: {{ scaleTargetRef: {{ name: pool-{k} }}, maxReplicas: 100 }} }}\n      \
             slo: {{ ttft: 500ms, tpot: 50ms }}\n"
        ));
    }
    yaml
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: flyball_control::ControlArgs,
}

struct AckOnly;

#[tonic::async_trait]
impl TelemetryService for AckOnly {
    async fn report(
        &self,
        request: tonic::Request<ReceivedReport>,
    ) -> Result<tonic::Response<v1::ReportResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::ReportResponse {
            acknowledged_sequence: request.get_ref().report.sequence,
        }))
    }

    type ReportStreamStream =
        futures::stream::BoxStream<'static, Result<v1::ReportResponse, tonic::Status>>;

    async fn report_stream(
        &self,
        request: tonic::Request<tonic::Streaming<ReceivedReport>>,
    ) -> Result<tonic::Response<Self::ReportStreamStream>, tonic::Status> {
        let acks = request.into_inner().map(|report| {
            report.map(|received| v1::ReportResponse {
                acknowledged_sequence: received.report.sequence,
            })
        });
        Ok(tonic::Response::new(Box::pin(acks)))
    }
}

// === --alloc-census ===

#[allow(unsafe_code)] // Only for the counting allocator, which passes every call on to jemalloc.
mod census {
    use std::alloc::{GlobalAlloc, Layout};
    use std::io::{BufRead, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use tikv_jemallocator::Jemalloc;

    /// Set in the servers by the environment, so counting costs the other runs one load a call.
    static COUNTING: AtomicBool = AtomicBool::new(false);
    const ASKED: &str = "FLYBALL_BENCH_ALLOC_CENSUS";
    /// Live allocations by size, in 16-byte classes up to 64 KiB; the last class holds every
    /// larger one.
    const CLASS_BYTES: usize = 16;
    const CLASSES: usize = 4098;
    static LIVE: [AtomicU64; CLASSES] = [const { AtomicU64::new(0) }; CLASSES];
    /// Live bytes, exactly: in all, and in the last class.
    static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);
    static LARGE_BYTES: AtomicU64 = AtomicU64::new(0);

    fn class(size: usize) -> usize {
        size.div_ceil(CLASS_BYTES).min(CLASSES - 1)
    }

    fn count(size: usize, delta: i64) {
        if COUNTING.load(Ordering::Relaxed) {
            // Wrapping, as two's complement: counting starts in the server before its runtime
            // (`serve`), and a block allocated before then (its arguments) takes its class below
            // zero when freed; such classes are left out of the census.
            let class = class(size);
            let bytes = (size as i64 * delta) as u64;
            LIVE[class].fetch_add(delta as u64, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
            if class == CLASSES - 1 {
                LARGE_BYTES.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }

    pub struct Counting;

    // SAFETY: every call is passed on to jemalloc unchanged; only sizes are counted.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size(), 1);
            // SAFETY: as the caller's contract for `GlobalAlloc::alloc`.
            unsafe { Jemalloc.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(layout.size(), -1);
            // SAFETY: as the caller's contract for `GlobalAlloc::dealloc`.
            unsafe { Jemalloc.dealloc(ptr, layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size(), 1);
            // SAFETY: as the caller's contract for `GlobalAlloc::alloc_zeroed`.
            unsafe { Jemalloc.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(layout.size(), -1);
            count(new_size, 1);
            // SAFETY: as the caller's contract for `GlobalAlloc::realloc`.
            unsafe { Jemalloc.realloc(ptr, layout, new_size) }
        }
    }

    /// In the load generator: whether the servers it starts take a census.
    static ASKED_OF_SERVERS: AtomicBool = AtomicBool::new(false);

    pub fn ask(asked: bool) {
        ASKED_OF_SERVERS.store(asked, Ordering::Relaxed);
    }

    /// In the load generator: has `server` take a census if asked to.
    pub fn pass_on(server: &mut std::process::Command) {
        if ASKED_OF_SERVERS.load(Ordering::Relaxed) {
            server.env(ASKED, "1");
        }
    }

    /// In a server: counts from now on if asked to, and answers each line on stdin
    /// (`<when> <gateways>`) with the census on stderr.
    pub fn serve() {
        if std::env::var_os(ASKED).is_none() {
            return;
        }
        COUNTING.store(true, Ordering::Relaxed);
        std::thread::spawn(|| {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                let (when, gateways) = line.rsplit_once(' ').unwrap_or((&line, "1"));
                print(when, gateways.parse().unwrap_or(1));
            }
        });
    }

    /// In the load generator: asks `server` for its census, if the servers take one.
    pub async fn request(
        server: &mut std::process::Child,
        when: &str,
        gateways: usize,
    ) -> Result<(), super::Error> {
        if ASKED_OF_SERVERS.load(Ordering::Relaxed)
            && let Some(stdin) = server.stdin.as_mut()
        {
            writeln!(stdin, "{when} {gateways}")?;
            // The census is taken while the load goes on; give it a moment to be.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Ok(())
    }

    fn print(when: &str, gateways: u64) {
        let mut rows: Vec<(usize, u64)> = LIVE
            .iter()
            .enumerate()
            .map(|(class, live)| (class * CLASS_BYTES, live.load(Ordering::Relaxed)))
            .filter(|&(_, live)| live > 0 && live < u64::MAX / 2)
            .collect();
        let large = (CLASSES - 1) * CLASS_BYTES;
        // A class's bytes at its upper bound (up to 15 B a block over), the last one's exact.
        let bytes = |&(size, live): &(usize, u64)| {
            if size == large {
                LARGE_BYTES.load(Ordering::Relaxed)
            } else {
                size as u64 * live
            }
        };
        let total = LIVE_BYTES.load(Ordering::Relaxed);
        rows.sort_by_key(|row| std::cmp::Reverse(bytes(row)));
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "allocation census, {when}: {:.1} MB live ({:.1} KB a gateway); largest classes:",
            total as f64 / 1e6,
            total as f64 / 1e3 / gateways as f64
        );
        for row in rows.iter().take(16) {
            let size = if row.0 == large {
                format!("over {} KiB", (large - CLASS_BYTES) / 1024)
            } else {
                format!("{} B or less", row.0)
            };
            let _ = writeln!(
                err,
                "  {size:>16}: {:>5.2} a gateway, {:>6.1} MB",
                row.1 as f64 / gateways as f64,
                bytes(row) as f64 / 1e6
            );
        }
    }
}

// === /proc ===

fn clock_ticks_per_s() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').ok_or("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11).ok_or("no utime")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("no stime")?.parse()?;
    Ok(utime + stime)
}

fn rss_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
