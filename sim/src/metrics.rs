//! `GET /metrics`: a few series under vLLM's names, in the Prometheus text format (0.0.4) as
//! vLLM's Python client writes it, so scrapers and autoscalers configured for vLLM read the
//! simulator unchanged. A counter vLLM declares as `vllm:x` is exposed as the sample
//! `vllm:x_total`, and prometheus_client's `generate_latest` writes its HELP and TYPE lines under
//! that sample name too (`# TYPE vllm:x_total counter`): a strict parser (Go's `expfmt`) reads a
//! TYPE line under `vllm:x` as a family with no samples and the samples as untyped.
//!
//! Written by hand rather than with the `prometheus-client` crate: that one writes OpenMetrics
//! (counters typed under the family name, which is what vLLM's output does not do), and these
//! are a few lines.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::pacing::LoadGauges;

pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the engine did, counted where it happens (the engine driver's steps, or a scripted
/// request's schedule), not where the response body hands it out: vLLM counts in its engine,
/// step by step, whatever the response's shape (`IterationStats.update_from_output` in
/// `vllm/v1/metrics/stats.py`), so a non-streaming answer's tokens show up as they are
/// generated, and those of a request whose client left stay counted.
///
/// The latency histograms are observed as vLLM observes them: the time to first token when a
/// request's first token is generated, the end-to-end latency when it finishes, both from its
/// arrival. A request cancelled before it finishes (the client left, or a reset knob) is never
/// observed in `vllm:e2e_request_latency_seconds`, as vLLM records only finished requests
/// there, but stays in `vllm:time_to_first_token_seconds` if its first token came first.
#[derive(Debug)]
pub(crate) struct EngineStats {
    prompt_tokens_total: AtomicU64,
    generation_tokens_total: AtomicU64,
    time_to_first_token: Mutex<Histogram>,
    e2e_request_latency: Mutex<Histogram>,
}

/// `vllm:time_to_first_token_seconds`' bucket bounds, in seconds (`PrometheusStatLogger` in
/// `vllm/v1/metrics/loggers.py`).
const TIME_TO_FIRST_TOKEN_BOUNDS_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// `vllm:e2e_request_latency_seconds`' bucket bounds, in seconds (vLLM's
/// `request_latency_buckets`, same file).
const E2E_REQUEST_LATENCY_BOUNDS_S: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus histogram over fixed upper bounds.
#[derive(Debug, Clone, PartialEq)]
struct Histogram {
    bounds_s: &'static [f64],
    /// Observations per bucket, not cumulative; one more than `bounds_s`, the last for `+Inf`.
    bucket_counts: Vec<u64>,
    sum_s: f64,
}

// === impl EngineStats ===

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            prompt_tokens_total: AtomicU64::new(0),
            generation_tokens_total: AtomicU64::new(0),
            time_to_first_token: Mutex::new(Histogram::new(TIME_TO_FIRST_TOKEN_BOUNDS_S)),
            e2e_request_latency: Mutex::new(Histogram::new(E2E_REQUEST_LATENCY_BOUNDS_S)),
        }
    }
}

impl EngineStats {
    /// A request's first token was generated, `ttft` after it arrived.
    pub(crate) fn first_token(&self, ttft: Duration) {
        self.time_to_first_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(ttft);
    }

    /// A request finished (its last token generated, or its prefill done with no output),
    /// `e2e` after it arrived.
    pub(crate) fn request_finished(&self, e2e: Duration) {
        self.e2e_request_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(e2e);
    }

    /// Observations of the TTFT and e2e histograms so far.
    #[cfg(test)]
    pub(crate) fn latency_counts(&self) -> (u64, u64) {
        let count = |h: &Mutex<Histogram>| {
            h.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .bucket_counts
                .iter()
                .sum()
        };
        (
            count(&self.time_to_first_token),
            count(&self.e2e_request_latency),
        )
    }

    /// A prompt's prefill completed; vLLM counts the whole prompt in the step that completes it
    /// (a queued or part-prefilled prompt is not counted yet).
    pub(crate) fn prefill_completed(&self, prompt_tokens: u64) {
        self.prompt_tokens_total
            .fetch_add(prompt_tokens, Ordering::Relaxed);
    }

    /// The engine produced `tokens` output tokens.
    pub(crate) fn tokens_generated(&self, tokens: u64) {
        self.generation_tokens_total
            .fetch_add(tokens, Ordering::Relaxed);
    }

    /// `(prompt, generation)` tokens counted so far.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.prompt_tokens_total.load(Ordering::Relaxed),
            self.generation_tokens_total.load(Ordering::Relaxed),
        )
    }
}

// === impl Histogram ===

impl Histogram {
    fn new(bounds_s: &'static [f64]) -> Self {
        Self {
            bounds_s,
            bucket_counts: vec![0; bounds_s.len() + 1],
            sum_s: 0.0,
        }
    }

    fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        // A bucket counts values up to and including its bound (`le`).
        let bucket = self.bounds_s.partition_point(|bound| *bound < seconds);
        if let Some(count) = self.bucket_counts.get_mut(bucket) {
            *count += 1;
        }
        self.sum_s += seconds;
    }

    /// `name_bucket` (cumulative, `le` after the other labels), `name_count` and `name_sum`, in
    /// the order prometheus_client writes them.
    fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        let bounds = self.bounds_s.iter().map(|bound| format!("{bound:?}"));
        for (bound, count) in bounds
            .chain(std::iter::once("+Inf".to_owned()))
            .zip(&self.bucket_counts)
        {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{model_name=\"{label}\",le=\"{bound}\"}} {cumulative}.0"
            );
        }
        let _ = writeln!(out, "{name}_count{{model_name=\"{label}\"}} {cumulative}.0");
        let _ = writeln!(out, "{name}_sum{{model_name=\"{label}\"}} {:?}", self.sum_s);
    }
}

pub(crate) fn render(model: &str, gauges: &LoadGauges, stats: &EngineStats) -> String {
    let label = escape_label(model);
    let running = gauges.engine_running.load(Ordering::Relaxed)
        + gauges.scripted_running.load(Ordering::Relaxed);
    let waiting = gauges.engine_waiting.load(Ordering::Relaxed);
    let prompt = stats.prompt_tokens_total.load(Ordering::Relaxed);
    let generation = stats.generation_tokens_total.load(Ordering::Relaxed);

    let mut out = String::new();
    let mut series = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name}{{model_name=\"{label}\"}} {value}.0");
    };
    series(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        running,
    );
    series(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        waiting,
    );
    series(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        prompt,
    );
    series(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        generation,
    );
    // Copied out, so that rendering never holds up the engine driver.
    let time_to_first_token = stats
        .time_to_first_token
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let e2e_request_latency = stats
        .e2e_request_latency
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    time_to_first_token.render(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &label,
    );
    e2e_request_latency.render(
        &mut out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &label,
    );
    out
}

/// Escapes a label value per the text exposition format: backslash, quote, newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_use_vllm_names_and_sum_scripted_and_engine_running() {
        let gauges = LoadGauges::default();
        gauges.engine_running.store(2, Ordering::Relaxed);
        gauges.scripted_running.store(1, Ordering::Relaxed);
        gauges.engine_waiting.store(4, Ordering::Relaxed);
        let stats = EngineStats::default();
        stats.prefill_completed(30);
        stats.tokens_generated(3);
        stats.tokens_generated(4);
        let text = render("m\"x", &gauges, &stats);
        assert!(text.contains("vllm:num_requests_running{model_name=\"m\\\"x\"} 3.0\n"));
        assert!(text.contains("vllm:num_requests_waiting{model_name=\"m\\\"x\"} 4.0\n"));
        assert!(text.contains("# HELP vllm:prompt_tokens_total Number of prefill tokens"));
        assert!(text.contains("# TYPE vllm:prompt_tokens_total counter\n"));
        assert!(text.contains("# TYPE vllm:generation_tokens_total counter\n"));
        assert!(!text.contains("# TYPE vllm:prompt_tokens counter"));
        assert!(text.contains("vllm:prompt_tokens_total{model_name=\"m\\\"x\"} 30.0\n"));
        assert!(text.contains("vllm:generation_tokens_total{model_name=\"m\\\"x\"} 7.0\n"));
    }

    #[test]
    fn latency_histograms_use_vllm_buckets_cumulatively_with_count_and_sum() {
        let stats = EngineStats::default();
        stats.first_token(Duration::from_millis(5));
        stats.first_token(Duration::from_millis(30));
        stats.first_token(Duration::from_secs(3_000));
        stats.request_finished(Duration::from_millis(300));
        let text = render("m", &LoadGauges::default(), &stats);
        let ttft = "vllm:time_to_first_token_seconds";
        assert!(text.contains(&format!("# TYPE {ttft} histogram\n")));
        // 5 ms lands in the bucket whose bound it equals; buckets are cumulative.
        for (le, count) in [
            ("0.001", 0),
            ("0.005", 1),
            ("0.02", 1),
            ("0.04", 2),
            ("2560.0", 2),
            ("+Inf", 3),
        ] {
            let line = format!("{ttft}_bucket{{model_name=\"m\",le=\"{le}\"}} {count}.0\n");
            assert!(text.contains(&line), "{line}in\n{text}");
        }
        assert!(text.contains(&format!("{ttft}_count{{model_name=\"m\"}} 3.0\n")));
        assert!(text.contains(&format!("{ttft}_sum{{model_name=\"m\"}} 3000.035\n")));
        let buckets = text.lines().filter(|l| l.starts_with(ttft)).count();
        assert_eq!(buckets, 22 + 1 + 2, "22 bounds, +Inf, count and sum");

        let e2e = "vllm:e2e_request_latency_seconds";
        assert!(text.contains(&format!(
            "{e2e}_bucket{{model_name=\"m\",le=\"0.3\"}} 1.0\n"
        )));
        assert!(text.contains(&format!(
            "{e2e}_bucket{{model_name=\"m\",le=\"7680.0\"}} 1.0\n"
        )));
        assert!(text.contains(&format!("{e2e}_count{{model_name=\"m\"}} 1.0\n")));
        assert!(text.contains(&format!("{e2e}_sum{{model_name=\"m\"}} 0.3\n")));
    }
}
