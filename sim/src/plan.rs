//! A response, planned in full before any byte is written: every SSE event (or the one JSON body)
//! with the token count it waits for. Pure: the same request and knobs give the same plan, byte
//! for byte, which is what makes the simulator's output reproducible.
//!
//! request + knobs -> [`Plan`] -> (pacer waits each gate) -> body stream -> hyper

use bytes::Bytes;

use crate::knobs::Knobs;
use crate::openai::{
    self, ChatChoice, ChatCompletion, ChatStreamChoice, Delta, Endpoint, Message, NoChoice, Null,
    ParsedRequest, StreamChunk, TextChoice, TextCompletion, TextStreamChoice, Usage,
};
use crate::tokens;

/// Content tokens an answer runs to on its own, when neither a knob nor the request bounds it
/// (a chat request without `max_tokens`): the simulator's stand-in for a model's natural stop.
pub(crate) const DEFAULT_OUTPUT_TOKENS: u64 = 16;

/// When an event may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// At once.
    Now,
    /// Once this many content tokens have been generated.
    Tokens(u64),
    /// Once generation is over (all tokens, or the prefill when there are none).
    Finished,
}

/// One write of the response body, and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlannedEvent {
    pub gate: Gate,
    pub bytes: Bytes,
    /// Content tokens in this event.
    pub content_tokens: u64,
    /// Whether this event reports the final usage (usage-only chunk, or the full JSON body).
    pub final_usage: bool,
}

/// Everything the server will send for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// When the status line and headers may go out: at once for streams and errors, after the
    /// whole generation for a non-streaming answer (as vLLM, which answers only when done).
    pub headers_gate: Gate,
    pub status: u16,
    pub content_type: &'static str,
    /// Set for non-streaming bodies, so HTTP/1.1 sends `content-length` rather than chunks.
    pub content_length: Option<usize>,
    pub events: Vec<PlannedEvent>,
    /// After the events, abort instead of ending the body.
    pub reset: bool,
    pub completion_tokens_planned: u64,
}

/// The fixed identity of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// `chatcmpl-<request id>` or `cmpl-<request id>`.
    pub id: String,
    pub created_unix_s: u64,
    pub model: String,
    /// Ground-truth key; seeds the token text.
    pub request_id: String,
}

pub(crate) const SSE_CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";
pub(crate) const JSON_CONTENT_TYPE: &str = "application/json";

/// How long an answer is, and why it ends there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutputLength {
    /// Content tokens the request will generate.
    pub tokens: u64,
    /// `length` when a bound cut the answer (the request's `max_tokens`, or the context), `stop`
    /// when it ended on its own.
    pub finish_reason: &'static str,
}

/// The answer's length within a context of `max_model_len` tokens, or the message vLLM refuses
/// the request with (`OpenAIServing._validate_input` in `vllm/entrypoints/openai/serving_engine.py`).
///
/// With a bound (the output-tokens knob, `max_tokens`, or a legacy completion's default of 16),
/// prompt plus bound must fit. Without one (a chat request), only a prompt that fills the context
/// alone is refused; vLLM then defaults `max_tokens` to what the context has left, so the answer
/// runs to its natural length or stops there with `length`.
pub(crate) fn output_length(
    req: &ParsedRequest,
    knobs: &Knobs,
    max_model_len: u64,
) -> Result<OutputLength, String> {
    let Some(bound) = knobs.output_tokens.or(req.max_tokens) else {
        if req.prompt_tokens >= max_model_len {
            return Err(format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {} tokens in the messages, Please reduce the length of the messages.",
                req.prompt_tokens
            ));
        }
        let context_left = max_model_len - req.prompt_tokens;
        return Ok(if DEFAULT_OUTPUT_TOKENS > context_left {
            OutputLength {
                tokens: context_left,
                finish_reason: "length",
            }
        } else {
            OutputLength {
                tokens: DEFAULT_OUTPUT_TOKENS,
                finish_reason: "stop",
            }
        });
    };
    let requested = req.prompt_tokens.saturating_add(bound);
    if requested > max_model_len {
        return Err(format!(
            "This model's maximum context length is {max_model_len} tokens. However, you requested \
             {requested} tokens ({} in the messages, {bound} in the completion). Please reduce the \
             length of the messages or completion.",
            req.prompt_tokens
        ));
    }
    // "length" when the output hit the request's bound, "stop" when it ended on its own (a knob
    // shorter than max_tokens).
    let finish_reason = if req.max_tokens == Some(bound) {
        "length"
    } else {
        "stop"
    };
    Ok(OutputLength {
        tokens: bound,
        finish_reason,
    })
}

/// An error answer, sent at once.
pub(crate) fn error_plan(status: u16, message: &str) -> Plan {
    let body = Bytes::from(openai::error_json(status, message));
    Plan {
        headers_gate: Gate::Now,
        status,
        content_type: JSON_CONTENT_TYPE,
        content_length: Some(body.len()),
        events: vec![PlannedEvent {
            gate: Gate::Now,
            bytes: body,
            content_tokens: 0,
            final_usage: false,
        }],
        reset: false,
        completion_tokens_planned: 0,
    }
}

/// The answer to an accepted completion request, `output` long (from [`output_length`]).
pub(crate) fn plan(
    req: &ParsedRequest,
    knobs: &Knobs,
    identity: &Identity,
    output: OutputLength,
) -> Plan {
    let OutputLength {
        tokens: total,
        finish_reason,
    } = output;
    let writer = Writer {
        req,
        knobs,
        identity,
        seed: tokens::seed(&identity.request_id, &req.prompt_text),
        finish_reason,
        total,
    };
    if req.stream {
        writer.stream()
    } else {
        writer.full()
    }
}

struct Writer<'a> {
    req: &'a ParsedRequest,
    knobs: &'a Knobs,
    identity: &'a Identity,
    seed: u64,
    finish_reason: &'static str,
    total: u64,
}

// === impl Writer ===

impl Writer<'_> {
    fn usage_allowed(&self) -> bool {
        !self.knobs.no_usage
    }

    fn continuous_usage(&self, completion_tokens: u64) -> Option<Usage> {
        // vLLM honours continuous_usage_stats only together with include_usage.
        (self.usage_allowed() && self.req.include_usage && self.req.continuous_usage)
            .then(|| Usage::new(self.req.prompt_tokens, completion_tokens))
    }

    fn object(&self) -> &'static str {
        match self.req.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        }
    }

    fn sse(&self, json: &[u8]) -> Bytes {
        let eol = self.knobs.line_ending.as_str();
        let mut out = Vec::with_capacity(json.len() + 12);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(json);
        out.extend_from_slice(eol.as_bytes());
        out.extend_from_slice(eol.as_bytes());
        Bytes::from(out)
    }

    fn chunk<C: serde::Serialize>(&self, choices: Vec<C>, usage: Option<Usage>) -> Bytes {
        self.sse(&openai::to_json(&StreamChunk {
            id: &self.identity.id,
            object: self.object(),
            created: self.identity.created_unix_s,
            model: &self.identity.model,
            choices,
            usage,
        }))
    }

    /// The token events' bodies, `(tokens in event, cumulative tokens, bytes)`.
    fn token_events(&self) -> Vec<(u64, u64, Bytes)> {
        let per_event = self.knobs.tokens_per_event.get();
        let mut events = Vec::new();
        let mut from: u64 = 0;
        loop {
            let to = from.saturating_add(per_event).min(self.total);
            let last = to == self.total;
            let text = tokens::text(self.seed, from, to);
            let finish_reason = last.then_some(self.finish_reason);
            let usage = self.continuous_usage(to);
            let bytes = match self.req.endpoint {
                Endpoint::Chat => self.chunk(
                    vec![ChatStreamChoice {
                        index: 0,
                        delta: Delta {
                            role: None,
                            content: &text,
                        },
                        logprobs: Null,
                        finish_reason,
                        stop_reason: last.then_some(Null),
                    }],
                    usage,
                ),
                Endpoint::Completions => self.chunk(
                    vec![TextStreamChoice {
                        index: 0,
                        text: &text,
                        logprobs: Null,
                        finish_reason,
                        stop_reason: Null,
                    }],
                    usage,
                ),
            };
            events.push((to - from, to, bytes));
            if last {
                return events;
            }
            from = to;
        }
    }

    fn stream(&self) -> Plan {
        let mut events = Vec::new();
        let first_token_gate = if self.total == 0 {
            Gate::Finished
        } else {
            Gate::Tokens(1)
        };

        if self.req.endpoint == Endpoint::Chat {
            let role = self.chunk(
                vec![ChatStreamChoice {
                    index: 0,
                    delta: Delta {
                        role: Some("assistant"),
                        content: "",
                    },
                    logprobs: Null,
                    finish_reason: None,
                    stop_reason: None,
                }],
                self.continuous_usage(0),
            );
            events.push(PlannedEvent {
                gate: if self.knobs.role_with_first_token {
                    first_token_gate
                } else {
                    Gate::Now
                },
                bytes: role,
                content_tokens: 0,
                final_usage: false,
            });
        }
        if self.knobs.comment {
            let eol = self.knobs.line_ending.as_str();
            events.push(PlannedEvent {
                gate: Gate::Now,
                bytes: Bytes::from(format!(": keep-alive{eol}{eol}")),
                content_tokens: 0,
                final_usage: false,
            });
        }

        let limit = self.knobs.reset_after_tokens;
        let mut reset = false;
        for (tokens, cumulative, bytes) in self.token_events() {
            if limit.is_some_and(|n| cumulative > n) {
                reset = true;
                break;
            }
            events.push(PlannedEvent {
                gate: if cumulative == self.total {
                    Gate::Finished
                } else {
                    Gate::Tokens(cumulative)
                },
                bytes,
                content_tokens: tokens,
                final_usage: false,
            });
        }
        // A reset that allows every token still cuts the stream before usage and [DONE].
        reset |= limit.is_some();

        if !reset {
            if self.usage_allowed() && self.req.include_usage {
                let usage = Some(Usage::new(self.req.prompt_tokens, self.total));
                events.push(PlannedEvent {
                    gate: Gate::Finished,
                    bytes: self.chunk(Vec::<NoChoice>::new(), usage),
                    content_tokens: 0,
                    final_usage: true,
                });
            }
            let eol = self.knobs.line_ending.as_str();
            events.push(PlannedEvent {
                gate: Gate::Finished,
                bytes: Bytes::from(format!("data: [DONE]{eol}{eol}")),
                content_tokens: 0,
                final_usage: false,
            });
        }

        Plan {
            headers_gate: Gate::Now,
            status: 200,
            content_type: SSE_CONTENT_TYPE,
            content_length: None,
            events,
            reset,
            completion_tokens_planned: self.total,
        }
    }

    fn full(&self) -> Plan {
        let text = tokens::text(self.seed, 0, self.total);
        let usage = self
            .usage_allowed()
            .then(|| Usage::new(self.req.prompt_tokens, self.total));
        let id = &self.identity.id;
        let created = self.identity.created_unix_s;
        let model = &self.identity.model;
        let body = Bytes::from(match self.req.endpoint {
            Endpoint::Chat => openai::to_json(&ChatCompletion {
                id,
                object: "chat.completion",
                created,
                model,
                choices: [ChatChoice {
                    index: 0,
                    message: Message {
                        role: "assistant",
                        content: &text,
                    },
                    logprobs: Null,
                    finish_reason: self.finish_reason,
                    stop_reason: Null,
                }],
                usage,
            }),
            Endpoint::Completions => openai::to_json(&TextCompletion {
                id,
                object: "text_completion",
                created,
                model,
                choices: [TextChoice {
                    index: 0,
                    text: &text,
                    logprobs: Null,
                    finish_reason: self.finish_reason,
                    stop_reason: Null,
                }],
                usage,
            }),
        });
        let content_length = Some(body.len());
        match self.knobs.reset_after_tokens {
            // The headers (with the full length) go out after N tokens, then the body aborts.
            Some(n) => Plan {
                headers_gate: Gate::Tokens(n.min(self.total)),
                status: 200,
                content_type: JSON_CONTENT_TYPE,
                content_length,
                events: Vec::new(),
                reset: true,
                completion_tokens_planned: self.total,
            },
            None => Plan {
                headers_gate: Gate::Finished,
                status: 200,
                content_type: JSON_CONTENT_TYPE,
                content_length,
                events: vec![PlannedEvent {
                    gate: Gate::Now,
                    bytes: body,
                    content_tokens: self.total,
                    final_usage: usage.is_some(),
                }],
                reset: false,
                completion_tokens_planned: self.total,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use serde_json::{Value, json};

    use super::*;
    use crate::openai::parse_request;

    fn identity() -> Identity {
        Identity {
            id: "chatcmpl-r1".to_owned(),
            created_unix_s: 1_700_000_000,
            model: "m".to_owned(),
            request_id: "r1".to_owned(),
        }
    }

    /// Plans within a context no test prompt comes near.
    fn planned(req: &ParsedRequest, knobs: &Knobs, identity: &Identity) -> Plan {
        let output = output_length(req, knobs, u64::MAX)
            .unwrap_or_else(|e| unreachable!("test request refused: {e}"));
        super::plan(req, knobs, identity, output)
    }

    fn chat(body: Value) -> ParsedRequest {
        parse_request(Endpoint::Chat, body.to_string().as_bytes())
            .unwrap_or_else(|e| unreachable!("test body refused: {e}"))
    }

    fn events_json(plan: &Plan, knobs: &Knobs) -> Vec<Value> {
        let eol = knobs.line_ending.as_str();
        plan.events
            .iter()
            .filter_map(|e| {
                let text = std::str::from_utf8(&e.bytes).ok()?;
                let data = text
                    .strip_prefix("data: ")?
                    .strip_suffix(&format!("{eol}{eol}"))?;
                serde_json::from_str(data).ok()
            })
            .collect()
    }

    #[test]
    fn chat_stream_without_include_usage_has_no_usage_key_anywhere() {
        let req =
            chat(json!({"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":3}));
        let knobs = Knobs::default();
        let plan = planned(&req, &knobs, &identity());
        let events = events_json(&plan, &knobs);
        assert_eq!(events.len(), 4, "role + 3 tokens");
        assert!(events.iter().all(|e| e.get("usage").is_none()));
        assert_eq!(
            events[0],
            json!({"id":"chatcmpl-r1","object":"chat.completion.chunk","created":1_700_000_000u64,"model":"m",
                   "choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]})
        );
        assert_eq!(events[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(events[3]["choices"][0]["stop_reason"], Value::Null);
        assert!(events[1]["choices"][0].get("stop_reason").is_none());
        assert_eq!(
            plan.events.last().map(|e| &e.bytes[..]),
            Some(&b"data: [DONE]\n\n"[..])
        );
        assert_eq!(plan.events[3].gate, Gate::Finished);
        assert_eq!(plan.events[2].gate, Gate::Tokens(2));
    }

    #[test]
    fn continuous_usage_counts_running_tokens_and_needs_include_usage() {
        let req = chat(
            json!({"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":2,
                              "stream_options":{"include_usage":true,"continuous_usage_stats":true}}),
        );
        let knobs = Knobs::default();
        let plan = planned(&req, &knobs, &identity());
        let usage: Vec<Value> = events_json(&plan, &knobs)
            .iter()
            .map(|e| e["usage"].clone())
            .collect();
        // prompt: ceil(2/4) + 4 = 5
        assert_eq!(
            usage,
            vec![
                json!({"prompt_tokens":5,"total_tokens":5,"completion_tokens":0}),
                json!({"prompt_tokens":5,"total_tokens":6,"completion_tokens":1}),
                json!({"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}),
                json!({"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}),
            ]
        );

        let req = chat(
            json!({"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":2,
                              "stream_options":{"include_usage":false,"continuous_usage_stats":true}}),
        );
        let plan = planned(&req, &knobs, &identity());
        assert!(
            events_json(&plan, &knobs)
                .iter()
                .all(|e| e.get("usage").is_none())
        );
        // As vLLM, a `stream_options` object without `include_usage` includes it.
        let req = chat(
            json!({"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":2,
                              "stream_options":{"continuous_usage_stats":true}}),
        );
        let plan = planned(&req, &knobs, &identity());
        let with_usage = events_json(&plan, &knobs)
            .iter()
            .filter(|e| e.get("usage").is_some_and(|u| !u.is_null()))
            .count();
        assert_eq!(with_usage, 4);
    }

    #[test]
    fn tokens_per_event_packs_tokens_and_gates_on_the_last_one() {
        let req =
            chat(json!({"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":5}));
        let knobs = Knobs {
            tokens_per_event: NonZeroU64::new(2).unwrap_or(NonZeroU64::MIN),
            ..Knobs::default()
        };
        let plan = planned(&req, &knobs, &identity());
        let counted: Vec<(Gate, u64)> = plan
            .events
            .iter()
            .map(|e| (e.gate, e.content_tokens))
            .collect();
        assert_eq!(
            counted,
            vec![
                (Gate::Now, 0),
                (Gate::Tokens(2), 2),
                (Gate::Tokens(4), 2),
                (Gate::Finished, 1),
                (Gate::Finished, 0),
            ]
        );
    }

    #[test]
    fn reset_keeps_at_most_n_tokens_and_drops_usage_and_done() {
        let req = chat(
            json!({"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":5,
                              "stream_options":{"include_usage":true}}),
        );
        for (n, kept) in [(0, 0), (2, 2), (5, 5), (9, 5)] {
            let knobs = Knobs {
                reset_after_tokens: Some(n),
                ..Knobs::default()
            };
            let plan = planned(&req, &knobs, &identity());
            assert!(plan.reset);
            assert_eq!(
                plan.events.iter().map(|e| e.content_tokens).sum::<u64>(),
                kept
            );
            assert!(
                plan.events
                    .iter()
                    .all(|e| !e.final_usage && !e.bytes.starts_with(b"data: [DONE]"))
            );
        }
    }

    #[test]
    fn a_chat_without_max_tokens_runs_to_its_natural_length_or_to_the_end_of_the_context() {
        // "hi": 1 token + 4 for the message.
        let req = chat(json!({"messages":[{"role":"user","content":"hi"}]}));
        let knobs = Knobs::default();
        assert_eq!(
            output_length(&req, &knobs, 1_000),
            Ok(OutputLength {
                tokens: DEFAULT_OUTPUT_TOKENS,
                finish_reason: "stop"
            })
        );
        assert_eq!(
            output_length(&req, &knobs, 7),
            Ok(OutputLength {
                tokens: 2,
                finish_reason: "length"
            })
        );
        assert_eq!(
            output_length(&req, &knobs, 5),
            Err(
                "This model's maximum context length is 5 tokens. However, you requested 5 \
                 tokens in the messages, Please reduce the length of the messages."
                    .to_owned()
            )
        );
    }

    #[test]
    fn a_bound_that_overflows_the_context_is_refused_naming_both_parts() {
        let req = chat(json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":10}));
        assert_eq!(
            output_length(&req, &Knobs::default(), 14),
            Err(
                "This model's maximum context length is 14 tokens. However, you requested 15 \
                 tokens (5 in the messages, 10 in the completion). Please reduce the length of \
                 the messages or completion."
                    .to_owned()
            )
        );
        // The knob is a bound too, even without max_tokens: it is never cut to fit.
        let req = chat(json!({"messages":[{"role":"user","content":"hi"}]}));
        let knobs = Knobs {
            output_tokens: Some(10),
            ..Knobs::default()
        };
        assert!(output_length(&req, &knobs, 14).is_err());
        assert_eq!(
            output_length(&req, &knobs, 15),
            Ok(OutputLength {
                tokens: 10,
                finish_reason: "stop"
            })
        );
    }

    #[test]
    fn zero_output_tokens_still_finishes_with_an_empty_delta() {
        let req = chat(json!({"messages":[{"role":"user","content":"hi"}],"stream":true}));
        let knobs = Knobs {
            output_tokens: Some(0),
            ..Knobs::default()
        };
        let plan = planned(&req, &knobs, &identity());
        let events = events_json(&plan, &knobs);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1]["choices"][0]["delta"], json!({"content":""}));
        assert_eq!(events[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(plan.completion_tokens_planned, 0);
    }

    #[test]
    fn non_streaming_waits_for_the_whole_generation_and_omits_usage_on_request() {
        let req = chat(json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":4}));
        let plan_with = planned(&req, &Knobs::default(), &identity());
        assert_eq!(plan_with.headers_gate, Gate::Finished);
        assert_eq!(
            plan_with.content_length,
            Some(plan_with.events[0].bytes.len())
        );
        let body: Value = serde_json::from_slice(&plan_with.events[0].bytes).unwrap_or_default();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens":5,"total_tokens":9,"completion_tokens":4})
        );
        let knobs = Knobs {
            no_usage: true,
            ..Knobs::default()
        };
        let plan_without = planned(&req, &knobs, &identity());
        let body: Value = serde_json::from_slice(&plan_without.events[0].bytes).unwrap_or_default();
        assert!(body.get("usage").is_none());
        assert!(!plan_without.events[0].final_usage);
    }
}
