//! Per-request response tracking: timing, tokens, and stripping what the filter added.
//!
//! headers -> [`ResponseTracker::on_response_headers`] picks a mode (SSE, JSON, or pass through);
//! each body chunk -> [`ResponseTracker::on_response_body`] (SSE: parse, classify each event, note
//! the first token and inter-token gaps, strip; JSON: copy up to a bound); `on_log` ->
//! [`ResponseTracker::finish`] -> one [`RequestRecord`].
//!
//! Definitions (the README repeats them):
//! - TTFT: from `started_at` (request headers at the filter) to the body chunk that completes the
//!   first event carrying generated content (see [`crate::event::JsonEvent::content`]). Streaming
//!   only. A role-only chunk, a comment or an empty delta is not a token.
//! - ITL: the gap between consecutive chunks carrying content of the first choice (with `n > 1`
//!   the other choices' tokens of one decode step arrive a moment apart, not a step apart).
//! - TPOT: `(e2e - ttft) / (tokens_per_choice - 1)` when `tokens_per_choice >= 2` (vLLM's
//!   benchmark definition; usage counts every choice, and with `n > 1` the choices the stream
//!   numbered are decoded side by side).
//! - Outcome: Envoy's, except that a complete 200 stream carrying an `error` event failed.
//! - e2e: from `started_at` to `finish`.
//! - Tokens: the server's `usage` when it sent one (the last one seen in a stream); otherwise
//!   output is estimated as the number of content events (streaming) or `ceil(chars / 4)` of the
//!   generated text (non-streaming), and input is the request estimate. A body that cannot be
//!   read (compressed, unknown type, over a bound) leaves the figure unmeasured.
//!
//! Stripping: when the filter injected `include_usage`, the usage-only event and `"usage":null`
//! members are removed (and `"usage":{...}` members when it injected continuous usage), so the
//! client receives exactly the stream the server would have sent otherwise. An event split across
//! chunks is completed first: the incomplete tail of a chunk is held back and emitted at the start
//! of the next chunk's output. That happens only while stripping; when chunks end at event
//! boundaries (vLLM's usual case) nothing is copied or rewritten.

use crate::Nanos;
use crate::config::FilterConfig;
use crate::event::{EventKind, Usage, UsageValue, classify};
use crate::request::{RequestInspection, StripPlan, estimate_completion_tokens};
use crate::sse::{SseEvent, SseParser};
use std::ops::Range;

/// Where a request is in its life, for the in-flight gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    WaitingFirstToken,
    Decoding,
}

/// How a request ended. The names are the `flyball.v1.RequestOutcomes` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx or 3xx, response complete.
    Ok,
    /// 4xx.
    ClientError,
    /// 5xx from the server or Envoy, or a response that stopped without an upstream reset or a
    /// client disconnect (a timeout).
    ServerError,
    /// The upstream connection failed or was reset, before or during the response.
    UpstreamReset,
    /// The client went away before the response completed.
    ClientCancel,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::UpstreamReset => "upstream_reset",
            Outcome::ClientCancel => "client_cancel",
        }
    }
}

/// Envoy's response flag bits, as the `response.flags` property reports them
/// (`StreamInfo::legacyResponseFlags()`; envoy `envoy/stream_info/stream_info.h`).
pub mod response_flags {
    /// UT: the upstream request timed out.
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    /// UR: the upstream reset the stream.
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    /// UF: the upstream connection could not be established.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    /// UC: the upstream connection was terminated.
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
    /// DC: the downstream connection was terminated.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000;
    /// DR: the downstream reset the stream (newer Envoy).
    pub const DOWNSTREAM_REMOTE_RESET: u64 = 0x1000_0000;

    pub(crate) const UPSTREAM_FAILED: u64 =
        UPSTREAM_REMOTE_RESET | UPSTREAM_CONNECTION_FAILURE | UPSTREAM_CONNECTION_TERMINATION;
    pub(crate) const DOWNSTREAM_GONE: u64 =
        DOWNSTREAM_CONNECTION_TERMINATION | DOWNSTREAM_REMOTE_RESET;
}

/// Classifies a finished request from what Envoy knows at `on_log`.
///
/// - an upstream failure or reset (flags UR/UF/UC, or `response.code_details`
///   `upstream_reset_before_response_started{..}` / `upstream_reset_after_response_started{..}`)
///   is [`Outcome::UpstreamReset`], even when Envoy then wrote a 503;
/// - an incomplete response whose client left (flags DC/DR, or `downstream_remote_disconnect`)
///   is [`Outcome::ClientCancel`]; a complete one stays `Ok` (clients often close right after
///   the last byte);
/// - otherwise the status decides; an incomplete 2xx/3xx, or no status at all, is a server-side
///   failure (a timeout).
pub fn classify_outcome(
    status: Option<u16>,
    response_complete: bool,
    code_details: &str,
    response_flags: u64,
) -> Outcome {
    if response_flags & response_flags::UPSTREAM_FAILED != 0
        || code_details.starts_with("upstream_reset_")
    {
        return Outcome::UpstreamReset;
    }
    let client_gone = response_flags & response_flags::DOWNSTREAM_GONE != 0
        || code_details.starts_with("downstream_remote_disconnect")
        || code_details.starts_with("downstream_remote_reset");
    if !response_complete && client_gone {
        return Outcome::ClientCancel;
    }
    match status.filter(|s| *s != 0) {
        Some(400..=499) => Outcome::ClientError,
        Some(500..) => Outcome::ServerError,
        Some(_) if response_complete => Outcome::Ok,
        _ => Outcome::ServerError,
    }
}

/// Returned by [`ResponseTracker::on_response_headers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeaderVerdict {
    /// The body may change: remove `content-length`.
    pub remove_content_length: bool,
}

/// Returned by [`ResponseTracker::on_response_body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BodyVerdict {
    /// Replace the chunk with the bytes written to `out` (possibly none).
    pub rewrite: bool,
    /// This chunk carried the first token: call `Accumulator::first_token`.
    pub first_content: bool,
    /// Nanoseconds since the previous content-carrying chunk.
    pub itl: Option<u64>,
}

/// Everything accounting needs about one finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRecord {
    pub outcome: Outcome,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `input_tokens` is the request estimate, not the server's count.
    pub input_estimated: bool,
    /// `output_tokens` is an estimate, not the server's count.
    pub output_estimated: bool,
    /// A token figure could not be measured or estimated at all (compressed or unreadable body,
    /// or an uninspected request without usage); what is missing counts as zero.
    pub unmeasured: bool,
    /// Nanoseconds; streaming responses with at least one content event only.
    pub ttft: Option<u64>,
    /// Nanoseconds per output token after the first.
    pub tpot: Option<u64>,
    /// Nanoseconds from request headers to `finish`.
    pub e2e: u64,
}

/// What the tracker needs from the request inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrackPlan {
    /// The request body was read (so `estimated_input_tokens` means something).
    pub inspected: bool,
    pub stream: bool,
    pub estimated_input_tokens: u64,
    pub strip: StripPlan,
}

impl From<&RequestInspection> for TrackPlan {
    fn from(inspection: &RequestInspection) -> Self {
        TrackPlan {
            inspected: true,
            stream: inspection.stream,
            estimated_input_tokens: inspection.estimated_input_tokens,
            strip: inspection.strip,
        }
    }
}

impl From<RequestInspection> for TrackPlan {
    fn from(inspection: RequestInspection) -> Self {
        TrackPlan::from(&inspection)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    AwaitingHeaders,
    Sse {
        stripping: bool,
    },
    Json,
    /// Not parsed: an error status, a compressed or unknown body, or a bound exceeded.
    Passthrough,
}

/// Per-request state. See the module docs.
#[derive(Debug, Clone)]
pub struct ResponseTracker {
    started_at: Nanos,
    plan: TrackPlan,
    max_json_bytes: usize,
    max_held_bytes: usize,
    mode: Mode,
    status: Option<u16>,
    parser: SseParser,
    /// The incomplete tail of the previous chunk, held back while stripping.
    held: Vec<u8>,
    edits: Vec<Range<usize>>,
    json: Vec<u8>,
    json_result: Option<Option<JsonResponse>>,
    stats: StreamStats,
}

#[derive(Debug, Clone, Copy, Default)]
struct StreamStats {
    first_token_at: Option<Nanos>,
    /// The last chunk carrying content of the first choice (see
    /// [`crate::event::JsonEvent::first_choice_content`]).
    last_content_at: Option<Nanos>,
    /// The chunk being read carries content of the first choice.
    first_choice_in_chunk: bool,
    content_events: u64,
    usage: Option<Usage>,
    /// The most choices any event numbered (`n > 1`: decoded side by side).
    choices: u32,
    /// The server reported a failure inside the stream.
    error: bool,
    /// The last event of the previous chunk was removed and ended with a CR whose LF may start
    /// the next chunk.
    drop_next_lf: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JsonResponse {
    usage: Option<Usage>,
    text_chars: u64,
}

// === impl ResponseTracker ===

impl ResponseTracker {
    /// A tracker for a request whose body was inspected (`&RequestInspection` or a [`TrackPlan`]).
    pub fn new(started_at: Nanos, plan: impl Into<TrackPlan>, limits: &FilterConfig) -> Self {
        ResponseTracker {
            started_at,
            plan: plan.into(),
            max_json_bytes: limits.max_response_json_bytes,
            max_held_bytes: limits.max_sse_line_bytes,
            mode: Mode::AwaitingHeaders,
            status: None,
            parser: SseParser::new(limits.max_sse_line_bytes),
            held: Vec::new(),
            edits: Vec::new(),
            json: Vec::new(),
            json_result: None,
            stats: StreamStats::default(),
        }
    }

    /// A tracker for a request whose body was not inspected (too big, not JSON): no stripping,
    /// input tokens only from the server's usage. Uses the default limits.
    pub fn for_uninspected(started_at: Nanos) -> Self {
        Self::new(started_at, TrackPlan::default(), &FilterConfig::default())
    }

    /// Like [`ResponseTracker::for_uninspected`] with the configured limits.
    pub fn for_uninspected_with(started_at: Nanos, limits: &FilterConfig) -> Self {
        Self::new(started_at, TrackPlan::default(), limits)
    }

    pub fn started_at(&self) -> Nanos {
        self.started_at
    }

    pub fn phase(&self) -> Phase {
        if self.stats.first_token_at.is_some() {
            Phase::Decoding
        } else {
            Phase::WaitingFirstToken
        }
    }

    /// Whether body chunks matter; when false the glue may skip reading them from the host.
    pub fn wants_body(&self) -> bool {
        matches!(self.mode, Mode::Sse { .. } | Mode::Json)
    }

    pub fn on_response_headers(
        &mut self,
        status: u16,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
    ) -> HeaderVerdict {
        self.status = Some(status);
        let encoded = content_encoding
            .map(str::trim)
            .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
        let media = content_type
            .and_then(|t| t.split(';').next())
            .map(str::trim)
            .unwrap_or_default();
        self.mode = if !(200..300).contains(&status) {
            // Nothing generated: timing only, and no tokens to measure.
            Mode::Passthrough
        } else if encoded {
            Mode::Passthrough
        } else if media.eq_ignore_ascii_case("text/event-stream") {
            Mode::Sse {
                stripping: self.plan.strip.any(),
            }
        } else if media.eq_ignore_ascii_case("application/json")
            || media
                .get(media.len().saturating_sub(5)..)
                .is_some_and(|s| s.eq_ignore_ascii_case("+json"))
        {
            Mode::Json
        } else {
            Mode::Passthrough
        };
        HeaderVerdict {
            remove_content_length: self.mode == Mode::Sse { stripping: true },
        }
    }

    /// Feeds one response body chunk. When the verdict says `rewrite`, `out` holds the bytes to
    /// send instead of `chunk` (it is cleared and reused; the glue owns it).
    pub fn on_response_body(
        &mut self,
        chunk: &[u8],
        end_of_stream: bool,
        now: Nanos,
        out: &mut Vec<u8>,
    ) -> BodyVerdict {
        match self.mode {
            Mode::AwaitingHeaders | Mode::Passthrough => BodyVerdict::default(),
            Mode::Json => {
                if self.json.len() + chunk.len() > self.max_json_bytes {
                    self.json.clear();
                    self.mode = Mode::Passthrough;
                } else {
                    self.json.extend_from_slice(chunk);
                    if end_of_stream {
                        self.parse_json();
                    }
                }
                BodyVerdict::default()
            }
            Mode::Sse { stripping: false } => {
                let stats = &mut self.stats;
                let mut content = false;
                let summary = self.parser.feed(chunk, |ev| {
                    content |= on_event(stats, &ev, None);
                });
                if summary.overflowed {
                    self.mode = Mode::Passthrough;
                }
                self.timing(content, now)
            }
            Mode::Sse { stripping: true } => self.strip_chunk(chunk, end_of_stream, now, out),
        }
    }

    fn strip_chunk(
        &mut self,
        chunk: &[u8],
        end_of_stream: bool,
        now: Nanos,
        out: &mut Vec<u8>,
    ) -> BodyVerdict {
        if chunk.is_empty() && !end_of_stream {
            // Nothing to parse, and the state about the previous chunk's end must survive.
            return BodyVerdict::default();
        }
        let mut held = std::mem::take(&mut self.held);
        let from_held = !held.is_empty();
        if from_held {
            held.extend_from_slice(chunk);
        }
        let work: &[u8] = if from_held { &held } else { chunk };

        self.edits.clear();
        let mut content = false;
        let strip = self.plan.strip;
        let (stats, edits) = (&mut self.stats, &mut self.edits);
        let summary = self.parser.feed(work, |ev| {
            content |= on_event(stats, &ev, Some((strip, &mut *edits)));
        });

        if summary.overflowed {
            // Fail open: the rest of the stream passes untouched, held bytes included.
            self.mode = Mode::Passthrough;
            let verdict = self.timing(content, now);
            if from_held {
                out.clear();
                out.extend_from_slice(work);
            }
            held.clear();
            self.held = held;
            return BodyVerdict {
                rewrite: from_held,
                ..verdict
            };
        }

        if summary.skipped_lf_at_start && self.stats.drop_next_lf {
            self.edits.insert(0, 0..1);
        }
        let mut keep_end = if end_of_stream {
            work.len()
        } else {
            summary.last_boundary.unwrap_or(0)
        };
        if summary.skipped_lf_at_start {
            keep_end = keep_end.max(1);
        }
        // An event removed up to a final CR: the LF completing that line ending may come next.
        self.stats.drop_next_lf = !end_of_stream
            && keep_end == work.len()
            && work.last() == Some(&b'\r')
            && self.edits.last().is_some_and(|e| e.end == work.len());

        let mut give_up = false;
        if work.len() - keep_end > self.max_held_bytes {
            // An event too long to hold: emit everything and stop stripping.
            keep_end = work.len();
            give_up = true;
        }

        let rewrite = from_held || !self.edits.is_empty() || keep_end < work.len();
        if rewrite {
            out.clear();
            let mut at = 0;
            for edit in &self.edits {
                if edit.start >= keep_end || edit.start < at {
                    continue;
                }
                out.extend_from_slice(work.get(at..edit.start).unwrap_or_default());
                at = edit.end.min(keep_end);
            }
            out.extend_from_slice(work.get(at..keep_end).unwrap_or_default());
        }

        if keep_end < work.len() {
            if from_held {
                held.drain(..keep_end);
            } else {
                held.clear();
                held.extend_from_slice(chunk.get(keep_end..).unwrap_or_default());
            }
            self.parser.rewind_to_last_boundary();
        } else {
            held.clear();
        }
        self.held = held;

        if give_up {
            self.mode = Mode::Passthrough;
        }
        BodyVerdict {
            rewrite,
            ..self.timing(content, now)
        }
    }

    fn timing(&mut self, content: bool, now: Nanos) -> BodyVerdict {
        let first_choice = std::mem::take(&mut self.stats.first_choice_in_chunk);
        if !content {
            return BodyVerdict::default();
        }
        let first_content = self.stats.first_token_at.is_none();
        if first_content {
            self.stats.first_token_at = Some(now);
        }
        let mut itl = None;
        if first_choice {
            itl = self
                .stats
                .last_content_at
                .map(|last| now.saturating_sub(last));
            self.stats.last_content_at = Some(now);
        }
        BodyVerdict {
            rewrite: false,
            first_content,
            itl,
        }
    }

    fn parse_json(&mut self) {
        if self.json_result.is_none() {
            self.json_result = Some(parse_json_response(&self.json));
        }
    }

    /// Ends the request: call once, from `on_log` (which runs for every request, resets
    /// included). `now` is when the response ended as far as the filter knows.
    pub fn finish(&mut self, now: Nanos, outcome: Outcome) -> RequestRecord {
        if self.mode == Mode::Json {
            self.parse_json();
        }
        let e2e = now.saturating_sub(self.started_at);
        // Envoy saw a complete 200; the stream itself said the request failed.
        let outcome = match outcome {
            Outcome::Ok if self.stats.error => Outcome::ServerError,
            outcome => outcome,
        };
        let mut record = RequestRecord {
            outcome,
            input_tokens: 0,
            output_tokens: 0,
            input_estimated: false,
            output_estimated: false,
            unmeasured: false,
            ttft: None,
            tpot: None,
            e2e,
        };
        let success = self.status.is_some_and(|s| (200..300).contains(&s));
        if !success {
            // No response, or an error response: nothing was generated.
            return record;
        }

        let (usage, output_estimate) = match self.mode {
            Mode::Sse { .. } => (self.stats.usage, Some(self.stats.content_events)),
            Mode::Json => match self.json_result {
                Some(Some(json)) => (
                    json.usage,
                    Some(estimate_completion_tokens(json.text_chars)),
                ),
                _ => (None, None),
            },
            // A stream given up midway may still have seen the server's usage.
            Mode::Passthrough => (self.stats.usage, None),
            Mode::AwaitingHeaders => (None, None),
        };

        match usage.and_then(|u| u.prompt_tokens) {
            Some(tokens) => record.input_tokens = tokens,
            None if self.plan.inspected => {
                record.input_tokens = self.plan.estimated_input_tokens;
                record.input_estimated = true;
            }
            None => record.unmeasured = true,
        }
        match (usage.and_then(|u| u.completion_tokens), output_estimate) {
            (Some(tokens), _) => record.output_tokens = tokens,
            (None, Some(estimate)) => {
                record.output_tokens = estimate;
                record.output_estimated = true;
            }
            (None, None) => record.unmeasured = true,
        }

        if let Some(first) = self.stats.first_token_at {
            let ttft = first.saturating_sub(self.started_at);
            record.ttft = Some(ttft);
            // Usage counts the tokens of every choice; each client stream got its own share
            // one decode step at a time.
            let per_choice = record.output_tokens / u64::from(self.stats.choices.max(1));
            if per_choice >= 2 {
                record.tpot = Some(e2e.saturating_sub(ttft) / (per_choice - 1));
            }
        }
        record
    }
}

/// Accounts one event; with a strip plan, queues the deletions it needs. Returns whether the
/// event carried generated content.
fn on_event(
    stats: &mut StreamStats,
    ev: &SseEvent<'_>,
    strip: Option<(StripPlan, &mut Vec<Range<usize>>)>,
) -> bool {
    let EventKind::Json(event) = classify(ev.data) else {
        return false;
    };
    if event.content {
        stats.content_events += 1;
    }
    stats.choices = stats.choices.max(event.choices_seen);
    stats.first_choice_in_chunk |= event.first_choice_content;
    stats.error |= event.error;
    let Some(usage) = &event.usage else {
        return event.content;
    };
    if usage.value == UsageValue::Object
        && let Some(parsed) = ev.data.get(usage.value_span.clone()).and_then(Usage::parse)
    {
        stats.usage = Some(parsed);
    }
    if let Some((plan, edits)) = strip {
        let whole_event =
            plan.usage_chunk && event.choices_empty && usage.value == UsageValue::Object;
        let member = (plan.usage_null && usage.value == UsageValue::Null)
            || (plan.continuous_usage && !event.choices_empty && usage.value == UsageValue::Object);
        if whole_event {
            if let Some(start) = ev.start {
                edits.push(start..ev.end);
            }
        } else if member {
            // Only a data field that is one slice of the chunk can be edited in place; servers
            // never split their JSON over several data lines.
            if let Some(data) = &ev.data_range {
                edits.push(data.start + usage.removal.start..data.start + usage.removal.end);
            }
        }
    }
    event.content
}

fn parse_json_response(body: &[u8]) -> Option<JsonResponse> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let usage = value
        .get("usage")
        .and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok())
        .filter(|u| u.prompt_tokens.is_some() || u.completion_tokens.is_some());
    let chars = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str)
            .map_or(0, |s| s.chars().count() as u64)
    };
    let mut text_chars = 0u64;
    for choice in value
        .get("choices")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        text_chars += chars(choice.get("text"));
        if let Some(message) = choice.get("message") {
            for key in ["content", "reasoning_content", "reasoning", "refusal"] {
                text_chars += chars(message.get(key));
            }
            text_chars += chars(
                message
                    .get("function_call")
                    .and_then(|f| f.get("arguments")),
            );
            for call in message
                .get("tool_calls")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
            {
                text_chars += chars(call.get("function").and_then(|f| f.get("arguments")));
            }
        }
    }
    Some(JsonResponse { usage, text_chars })
}

#[cfg(test)]
mod tests;
