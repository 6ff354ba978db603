//! `GET /metrics`: a few series under vLLM's names, in the Prometheus text format (0.0.4) as
//! vLLM's Python client writes it, so scrapers and autoscalers configured for vLLM read the
//! simulator unchanged. A counter vLLM declares as `vllm:x` is exposed as the sample
//! `vllm:x_total`, and prometheus_client's `generate_latest` writes its HELP and TYPE lines under
//! that sample name too (`# TYPE vllm:x_total counter`): a strict parser (Go's `expfmt`) reads a
//! TYPE line under `vllm:x` as a family with no samples and the samples as untyped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pacing::LoadGauges;

pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the engine did, counted where it happens (the engine driver's steps, or a scripted
/// request's schedule), not where the response body hands it out: vLLM counts in its engine,
/// step by step, whatever the response's shape (`IterationStats.update_from_output` in
/// `vllm/v1/metrics/stats.py`), so a non-streaming answer's tokens show up as they are
/// generated, and those of a request whose client left stay counted.
#[derive(Debug, Default)]
pub(crate) struct EngineStats {
    prompt_tokens_total: AtomicU64,
    generation_tokens_total: AtomicU64,
}

// === impl EngineStats ===

impl EngineStats {
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
}
