//! Fuzz entry points (the cargo-fuzz targets in `fuzz/` call these) and the stream builders the
//! property tests share with them. Compiled only under `cfg(fuzzing)` and in tests. A failed
//! check panics: that is how a fuzzer learns about it.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use crate::config::FilterConfig;
use crate::request::StripPlan;
use crate::response::{Outcome, RequestRecord, ResponseTracker, TrackPlan};

/// Strip everything the filter can inject.
pub const STRIP_ALL: StripPlan = StripPlan {
    usage_chunk: true,
    usage_null: true,
    continuous_usage: true,
};

/// The result of running a stream through a tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// What the client received.
    pub output: Vec<u8>,
    pub record: RequestRecord,
    /// Chunks the tracker reported as carrying content.
    pub content_chunks: usize,
    /// Chunks the tracker rewrote.
    pub rewrites: usize,
}

/// Runs `chunks` (the last one with `end_of_stream`) through a streaming tracker, one
/// nanosecond per chunk.
pub fn run_stream(chunks: &[&[u8]], strip: StripPlan, max_sse_line_bytes: usize) -> Run {
    let config = FilterConfig {
        max_sse_line_bytes,
        ..FilterConfig::default()
    };
    let plan = TrackPlan {
        inspected: true,
        stream: true,
        estimated_input_tokens: 11,
        strip,
    };
    let mut tracker = ResponseTracker::new(0, plan, &config);
    let headers = tracker.on_response_headers(200, Some("text/event-stream; charset=utf-8"), None);
    assert_eq!(headers.remove_content_length, strip.any());
    let mut output = Vec::new();
    let mut out = Vec::new();
    let mut content_chunks = 0;
    let mut rewrites = 0;
    let last = chunks.len().saturating_sub(1);
    for (i, chunk) in chunks.iter().enumerate() {
        let verdict = tracker.on_response_body(chunk, i == last, i as u64 + 1, &mut out);
        if verdict.rewrite {
            rewrites += 1;
            output.extend_from_slice(&out);
        } else {
            output.extend_from_slice(chunk);
        }
        if verdict.first_content {
            assert_eq!(content_chunks, 0, "first content reported twice");
        }
        if verdict.first_content || verdict.itl.is_some() {
            content_chunks += 1;
        }
        assert!(!(verdict.first_content && verdict.itl.is_some()));
    }
    if chunks.is_empty() {
        tracker.on_response_body(&[], true, 1, &mut out);
    }
    let record = tracker.finish(chunks.len() as u64 + 2, Outcome::Ok);
    Run {
        output,
        record,
        content_chunks,
        rewrites,
    }
}

/// Cuts `data` into chunks whose sizes cycle through `sizes` (each taken modulo 64): a zero
/// gives an empty chunk, which Envoy can deliver too.
pub fn split_by<'a>(data: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    if sizes.is_empty() {
        return vec![data];
    }
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let mut size = usize::from(sizes[i % sizes.len()] % 64);
        if chunks.len() > 2 * data.len() + 8 {
            // Only empty sizes: stop producing empty chunks.
            size = data.len() - at;
        }
        let end = (at + size).min(data.len());
        chunks.push(&data[at..end]);
        at = end;
        i += 1;
    }
    chunks
}

/// Raw bytes: the first bytes choose the chunk sizes, the rest is the stream. Checks that the
/// tracker never panics, that without a strip plan the client gets the exact input, and that with
/// one the output and the figures do not depend on where the chunks were cut.
pub fn sse_raw(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let max = stream.len() + 16;
    let chunks = split_by(stream, sizes);

    let plain = run_stream(&chunks, StripPlan::default(), max);
    assert_eq!(
        plain.output, stream,
        "a tracker without a strip plan changed the stream"
    );
    assert_eq!(plain.rewrites, 0);

    let whole = run_stream(&[stream], STRIP_ALL, max);
    let split = run_stream(&chunks, STRIP_ALL, max);
    assert_eq!(split.output, whole.output, "output depends on the chunking");
    assert!(split.output.len() <= stream.len());
    assert_eq!(split.record.output_tokens, whole.record.output_tokens);
    assert_eq!(split.record.input_tokens, whole.record.input_tokens);
    assert_eq!(split.record.unmeasured, whole.record.unmeasured);

    // A small bound must fail open, never panic or lose bytes it did not strip on purpose.
    let tight = run_stream(&chunks, STRIP_ALL, 8);
    assert!(tight.output.len() <= stream.len());
}

/// One event of a generated OpenAI-style stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSpec {
    /// `delta: {role: "assistant", content: ""}`: not a token.
    Role,
    /// A content delta (an empty text is not a token). `continuous` adds vLLM's continuous usage.
    Content {
        text: String,
        continuous: Option<(u64, u64)>,
    },
    Reasoning(String),
    ToolCall(String),
    /// The finish event: empty delta with a finish reason.
    Finish,
    /// The usage-only event include_usage adds: `choices: []` and `usage`.
    Usage {
        prompt: u64,
        completion: u64,
    },
    /// An SSE comment block.
    Comment(String),
    Done,
}

/// How the generated stream is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStyle {
    /// 0: `\n`, 1: `\r\n`, 2: `\r`.
    pub eol: u8,
    /// `data: ` rather than `data:`.
    pub space: bool,
    /// OpenAI-style `"usage":null` on every chunk.
    pub usage_null: bool,
    /// Legacy completions (`text`) instead of chat deltas.
    pub completions: bool,
}

/// A generated stream: what the server sends when the filter injected the options, what it
/// would have sent without them, and the figures the tracker must find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedStream {
    pub with_options: Vec<u8>,
    pub without_options: Vec<u8>,
    pub content_events: u64,
    /// The last usage in the stream: (prompt, completion).
    pub usage: Option<(u64, u64)>,
}

/// Renders events into both streams.
pub fn render_stream(events: &[EventSpec], style: StreamStyle) -> GeneratedStream {
    let eol: &[u8] = match style.eol % 3 {
        0 => b"\n",
        1 => b"\r\n",
        _ => b"\r",
    };
    let data_prefix: &[u8] = if style.space { b"data: " } else { b"data:" };
    let object = if style.completions {
        "text_completion"
    } else {
        "chat.completion.chunk"
    };
    let mut g = GeneratedStream {
        with_options: Vec::new(),
        without_options: Vec::new(),
        content_events: 0,
        usage: None,
    };
    // `prefix: false` writes the line as is (comments).
    let mut write = |with: Option<String>, without: Option<String>, prefix: bool| {
        for (line, into) in [
            (with, &mut g.with_options),
            (without, &mut g.without_options),
        ] {
            if let Some(line) = line {
                if prefix {
                    into.extend_from_slice(data_prefix);
                }
                into.extend_from_slice(line.as_bytes());
                into.extend_from_slice(eol);
                into.extend_from_slice(eol);
            }
        }
    };
    let head =
        format!(r#"{{"id":"cmpl-1","object":"{object}","created":1,"model":"m","choices":["#);
    let null_usage = if style.usage_null {
        r#","usage":null"#
    } else {
        ""
    };
    for event in events {
        let choice = |payload: String| -> String {
            if style.completions {
                format!(r#"{{"index":0,"text":{payload},"logprobs":null,"finish_reason":null}}"#)
            } else {
                format!(r#"{{"index":0,"delta":{payload},"logprobs":null,"finish_reason":null}}"#)
            }
        };
        let text_json = |t: &str| serde_json::to_string(t).unwrap();
        match event {
            EventSpec::Role => {
                let payload = if style.completions {
                    text_json("")
                } else {
                    r#"{"role":"assistant","content":""}"#.to_string()
                };
                let base = format!("{head}{}]", choice(payload));
                write(
                    Some(format!("{base}{null_usage}}}")),
                    Some(format!("{base}}}")),
                    true,
                );
            }
            EventSpec::Content { text, continuous } => {
                let payload = if style.completions {
                    text_json(text)
                } else {
                    format!(r#"{{"content":{}}}"#, text_json(text))
                };
                if !text.is_empty() {
                    g.content_events += 1;
                }
                let base = format!("{head}{}]", choice(payload));
                let with = match continuous {
                    Some((p, c)) => {
                        g.usage = Some((*p, *c));
                        format!(
                            r#"{base},"usage":{{"prompt_tokens":{p},"total_tokens":{},"completion_tokens":{c}}}}}"#,
                            p + c
                        )
                    }
                    None => format!("{base}{null_usage}}}"),
                };
                write(Some(with), Some(format!("{base}}}")), true);
            }
            EventSpec::Reasoning(text) | EventSpec::ToolCall(text) if !style.completions => {
                let payload = match event {
                    EventSpec::Reasoning(_) => {
                        format!(r#"{{"reasoning_content":{}}}"#, text_json(text))
                    }
                    _ => format!(
                        r#"{{"tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}}"#,
                        text_json(text)
                    ),
                };
                if !text.is_empty() || matches!(event, EventSpec::ToolCall(_)) {
                    g.content_events += 1;
                }
                let base = format!("{head}{}]", choice(payload));
                write(
                    Some(format!("{base}{null_usage}}}")),
                    Some(format!("{base}}}")),
                    true,
                );
            }
            EventSpec::Reasoning(_) | EventSpec::ToolCall(_) => {}
            EventSpec::Finish => {
                let payload = if style.completions {
                    text_json("")
                } else {
                    "{}".to_string()
                };
                let base = format!(
                    "{head}{}]",
                    choice(payload).replace(r#""finish_reason":null"#, r#""finish_reason":"stop""#)
                );
                write(
                    Some(format!("{base}{null_usage}}}")),
                    Some(format!("{base}}}")),
                    true,
                );
            }
            EventSpec::Usage { prompt, completion } => {
                g.usage = Some((*prompt, *completion));
                write(
                    Some(format!(
                        r#"{head}],"usage":{{"prompt_tokens":{prompt},"total_tokens":{},"completion_tokens":{completion}}}}}"#,
                        prompt + completion
                    )),
                    None,
                    true,
                );
            }
            EventSpec::Comment(text) => {
                let text: String = text.chars().filter(|c| *c != '\r' && *c != '\n').collect();
                let line = format!(":{text}");
                write(Some(line.clone()), Some(line), false);
            }
            EventSpec::Done => write(Some("[DONE]".into()), Some("[DONE]".into()), true),
        }
    }
    g
}

/// Structured: a generated stream, cut by `sizes`, must reach the client exactly as the server
/// would have sent it without the injected options, with the server's figures.
pub fn sse_structured(events: &[EventSpec], style: StreamStyle, sizes: &[u8]) {
    let g = render_stream(events, style);
    let chunks = split_by(&g.with_options, sizes);
    let run = run_stream(&chunks, STRIP_ALL, 1 << 20);
    assert_eq!(
        String::from_utf8_lossy(&run.output),
        String::from_utf8_lossy(&g.without_options),
        "stripped stream differs from the stream without options"
    );
    match g.usage {
        Some((prompt, completion)) => {
            assert_eq!(run.record.output_tokens, completion);
            assert_eq!(run.record.input_tokens, prompt);
            assert!(!run.record.output_estimated && !run.record.input_estimated);
        }
        None => {
            assert_eq!(run.record.output_tokens, g.content_events);
            assert!(run.record.output_estimated && run.record.input_estimated);
        }
    }
    assert_eq!(run.record.ttft.is_some(), g.content_events > 0);

    // Without stripping the client receives the server's bytes untouched, with no copy.
    let plain = run_stream(&chunks, StripPlan::default(), 1 << 20);
    assert_eq!(plain.output, g.with_options);
    assert_eq!(plain.rewrites, 0);
    assert_eq!(plain.record.output_tokens, run.record.output_tokens);
}
