//! What a leader keeps for its followers costs about what its bound counts: reports over real
//! gRPC, the process's heap measured by a counting allocator (in a test binary of its own, so
//! no other test allocates meanwhile).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Only for the counting allocator, which passes every call on to the system allocator.
#![allow(unsafe_code)]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use flyball_proto::v1;
use prost::Message;
use support::{Error, ONE_POOL, client, fixed, report};

/// Bytes allocated and not yet freed, by anything in this test process.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as the caller's contract for `GlobalAlloc::alloc`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as the caller's contract for `GlobalAlloc::dealloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as the caller's contract for `GlobalAlloc::alloc_zeroed`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as the caller's contract for `GlobalAlloc::realloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Long enough for loopback, short enough to fail fast.
const WAIT: Duration = Duration::from_secs(10);

/// A report of `gateway` with `keys` (backend, model) keys, each with a request and tokens: what a
/// gateway fronting many models sends every second.
fn wide_report(gateway: &str, sequence: u64, keys: usize) -> v1::ReportRequest {
    let mut report = report(gateway, sequence, 1);
    let key = report.keys[0].clone();
    report.keys = (0..keys)
        .map(|k| v1::KeyTelemetry {
            model: format!("model-{k}"),
            ..key.clone()
        })
        .collect();
    report
}

/// A leader keeps 30 s of what it merged (at most `RETAIN_BYTES`, 32 MiB), whether or not anyone
/// follows it. Kept decoded, a report of 20 keys took 16 times its encoded size, so the bound
/// would have meant about 514 MiB, over the chart's 512Mi memory limit. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_leader_keeps_costs_about_what_its_bound_counts() -> Result<(), Error> {
    let (a, _a_leading, _a_leader) = fixed("a", true, None);
    let leader = support::start_led(ONE_POOL, &[], a).await?;
    let mut grpc = client(leader.grpc_uri()).await?;
    const KEYS: usize = 20;
    // Warm up: keys, windows, connections and buffers in place.
    for sequence in 1..=50 {
        grpc.report(wide_report("gw", sequence, KEYS)).await?;
    }
    leader
        .wait_metric("flyball_ingest_reports_total", 50.0, WAIT)
        .await?;
    let before = LIVE_BYTES.load(Ordering::Relaxed);

    const REPORTS: u64 = 2_000;
    let mut encoded = 0;
    let reports: Vec<_> = (51..51 + REPORTS)
        .map(|sequence| wide_report("gw", sequence, KEYS))
        .collect();
    for report in &reports {
        encoded += report.encoded_len();
    }
    let acks = grpc
        .report_stream(futures::stream::iter(reports))
        .await?
        .into_inner();
    let acked: Vec<_> = futures::StreamExt::collect(acks).await;
    assert!(acked.iter().all(Result::is_ok));
    assert_eq!(acked.len() as u64, REPORTS);
    leader
        .wait_metric("flyball_ingest_reports_total", (50 + REPORTS) as f64, WAIT)
        .await?;
    let grown = LIVE_BYTES.load(Ordering::Relaxed) - before;
    assert!(
        grown <= 2 * encoded as i64,
        "{REPORTS} reports of {} encoded bytes ({encoded} in all) grew the heap by {grown} bytes \
         ({:.1}x): at the 32 MiB bound, {:.0} MiB",
        encoded as u64 / REPORTS,
        grown as f64 / encoded as f64,
        32.0 * grown as f64 / encoded as f64
    );
    leader.stop().await?;
    Ok(())
}
