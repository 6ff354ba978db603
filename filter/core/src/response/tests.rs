#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::fuzzing::{
    EventSpec, STRIP_ALL, StreamStyle, render_stream, run_stream, split_by, sse_raw, sse_structured,
};
use proptest::prelude::*;

const MS: u64 = 1_000_000;

fn chunk(data: &str) -> Vec<u8> {
    format!("data: {data}\n\n").into_bytes()
}

fn content(text: &str) -> Vec<u8> {
    chunk(&format!(
        r#"{{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#
    ))
}

fn role() -> Vec<u8> {
    chunk(r#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#)
}

fn usage(prompt: u64, completion: u64) -> Vec<u8> {
    chunk(&format!(
        r#"{{"id":"c","choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
        prompt + completion
    ))
}

fn streaming_plan(strip: StripPlan) -> TrackPlan {
    TrackPlan {
        inspected: true,
        stream: true,
        estimated_input_tokens: 20,
        strip,
    }
}

fn sse_tracker(strip: StripPlan) -> ResponseTracker {
    let mut t = ResponseTracker::new(0, streaming_plan(strip), &FilterConfig::default());
    let verdict = t.on_response_headers(200, Some("text/event-stream"), None);
    assert_eq!(verdict.remove_content_length, strip.any());
    t
}

#[test]
fn ttft_runs_from_request_headers_to_the_first_content_not_the_role_chunk() {
    let mut t = sse_tracker(StripPlan::default());
    let mut out = Vec::new();
    let v = t.on_response_body(&role(), false, 40 * MS, &mut out);
    assert!(!v.first_content);
    assert_eq!(t.phase(), Phase::WaitingFirstToken);
    let v = t.on_response_body(b": keep-alive\n\n", false, 45 * MS, &mut out);
    assert!(!v.first_content);
    let v = t.on_response_body(&content("Hel"), false, 50 * MS, &mut out);
    assert!(v.first_content);
    assert_eq!(v.itl, None);
    assert_eq!(t.phase(), Phase::Decoding);
    let v = t.on_response_body(&content("lo"), false, 80 * MS, &mut out);
    assert!(!v.first_content);
    assert_eq!(v.itl, Some(30 * MS));
    let record = t.finish(100 * MS, Outcome::Ok);
    assert_eq!(record.ttft, Some(50 * MS));
    assert_eq!(record.e2e, 100 * MS);
}

#[test]
fn tpot_is_decode_time_over_tokens_after_the_first() {
    let mut t = sse_tracker(StripPlan::default());
    let mut out = Vec::new();
    t.on_response_body(&content("a"), false, 10 * MS, &mut out);
    t.on_response_body(&content("b"), false, 20 * MS, &mut out);
    t.on_response_body(&usage(7, 5), false, 30 * MS, &mut out);
    t.on_response_body(b"data: [DONE]\n\n", true, 31 * MS, &mut out);
    let record = t.finish(50 * MS, Outcome::Ok);
    assert_eq!((record.input_tokens, record.output_tokens), (7, 5));
    assert!(!record.input_estimated && !record.output_estimated && !record.unmeasured);
    // (50 - 10) ms over 4 tokens.
    assert_eq!(record.tpot, Some(10 * MS));
}

#[test]
fn without_usage_output_is_the_number_of_content_events_and_input_the_request_estimate() {
    let mut t = sse_tracker(StripPlan::default());
    let mut out = Vec::new();
    let mut body = role();
    body.extend(content("a"));
    body.extend(content(""));
    body.extend(content("b c"));
    t.on_response_body(&body, true, 10 * MS, &mut out);
    let record = t.finish(10 * MS, Outcome::Ok);
    assert_eq!((record.input_tokens, record.output_tokens), (20, 2));
    assert!(record.input_estimated && record.output_estimated);
    assert_eq!(record.tpot, Some(0));
}

#[test]
fn one_token_gives_no_tpot() {
    let mut t = sse_tracker(StripPlan::default());
    let mut out = Vec::new();
    t.on_response_body(&content("a"), true, 10 * MS, &mut out);
    assert_eq!(t.finish(20 * MS, Outcome::Ok).tpot, None);
}

#[test]
fn event_aligned_chunks_are_never_rewritten_except_the_usage_event() {
    let mut t = sse_tracker(STRIP_ALL);
    let mut out = Vec::new();
    for (i, c) in [role(), content("a"), content("b")].iter().enumerate() {
        let v = t.on_response_body(c, false, i as u64, &mut out);
        assert!(!v.rewrite, "chunk {i}");
    }
    let v = t.on_response_body(&usage(3, 2), false, 9, &mut out);
    assert!(v.rewrite);
    assert!(out.is_empty());
    let v = t.on_response_body(b"data: [DONE]\n\n", true, 10, &mut out);
    assert!(!v.rewrite);
    let record = t.finish(11, Outcome::Ok);
    assert_eq!(record.output_tokens, 2);
    assert!(!record.output_estimated);
}

#[test]
fn an_event_split_across_chunks_is_held_back_and_emitted_whole() {
    let mut t = sse_tracker(STRIP_ALL);
    let mut out = Vec::new();
    let a = content("a");
    let (head, tail) = a.split_at(10);
    let v = t.on_response_body(head, false, 1, &mut out);
    assert!(v.rewrite && out.is_empty() && !v.first_content);
    let v = t.on_response_body(tail, false, 2, &mut out);
    assert!(v.rewrite && v.first_content);
    assert_eq!(out, a);
    // A usage event split in three disappears entirely.
    let u = usage(1, 1);
    let mut received = Vec::new();
    for piece in [&u[..5], &u[5..40], &u[40..]] {
        let v = t.on_response_body(piece, false, 3, &mut out);
        if v.rewrite {
            received.extend_from_slice(&out);
        } else {
            received.extend_from_slice(piece);
        }
    }
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );
}

#[test]
fn a_crlf_split_after_a_stripped_event_loses_its_lf_too() {
    let mut t = sse_tracker(STRIP_ALL);
    let mut out = Vec::new();
    let u = String::from_utf8_lossy(&usage(1, 1)).replace('\n', "\r\n");
    let mut first = u.clone().into_bytes();
    first.pop(); // the final LF goes to the next chunk
    let v = t.on_response_body(&first, false, 1, &mut out);
    assert!(v.rewrite && out.is_empty());
    // An empty chunk in between changes nothing.
    assert!(!t.on_response_body(b"", false, 2, &mut out).rewrite);
    let v = t.on_response_body(b"\ndata: [DONE]\r\n\r\n", true, 2, &mut out);
    assert!(v.rewrite);
    assert_eq!(out, b"data: [DONE]\r\n\r\n");
}

#[test]
fn openai_usage_null_members_are_removed() {
    let mut t = sse_tracker(STRIP_ALL);
    let mut out = Vec::new();
    let v = t.on_response_body(
        br#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}

"#,
        false,
        1,
        &mut out,
    );
    assert!(v.rewrite && v.first_content);
    assert_eq!(
        out,
        br#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}

"#
    );
}

#[test]
fn continuous_usage_is_read_and_stripped() {
    let strip = StripPlan {
        usage_chunk: false,
        usage_null: false,
        continuous_usage: true,
    };
    let mut t = sse_tracker(strip);
    let mut out = Vec::new();
    let v = t.on_response_body(
        br#"data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":4,"completion_tokens":1}}

"#,
        false,
        1,
        &mut out,
    );
    assert!(v.rewrite);
    assert_eq!(
        out,
        b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"
    );
    // The client asked for the final usage chunk itself: it stays.
    let u = usage(4, 2);
    let v = t.on_response_body(&u, true, 2, &mut out);
    assert!(!v.rewrite);
    let record = t.finish(3, Outcome::Ok);
    assert_eq!((record.input_tokens, record.output_tokens), (4, 2));
}

#[test]
fn compressed_streams_record_e2e_only_and_are_unmeasured() {
    let mut t = ResponseTracker::new(0, streaming_plan(STRIP_ALL), &FilterConfig::default());
    let v = t.on_response_headers(200, Some("text/event-stream"), Some("gzip"));
    assert!(!v.remove_content_length);
    assert!(!t.wants_body());
    let mut out = Vec::new();
    let v = t.on_response_body(&content("a"), true, 5, &mut out);
    assert_eq!(v, BodyVerdict::default());
    let record = t.finish(9, Outcome::Ok);
    assert_eq!(record.ttft, None);
    assert_eq!(record.e2e, 9);
    assert!(record.unmeasured);
    assert_eq!(record.output_tokens, 0);
    // The request estimate still stands for the input.
    assert_eq!((record.input_tokens, record.input_estimated), (20, true));
}

#[test]
fn identity_encoding_is_not_compression() {
    let mut t = ResponseTracker::new(
        0,
        streaming_plan(StripPlan::default()),
        &FilterConfig::default(),
    );
    t.on_response_headers(200, Some("TEXT/EVENT-STREAM"), Some("identity"));
    assert!(t.wants_body());
}

#[test]
fn error_responses_count_time_but_no_tokens() {
    let mut t = ResponseTracker::new(0, streaming_plan(STRIP_ALL), &FilterConfig::default());
    t.on_response_headers(503, Some("application/json"), None);
    let mut out = Vec::new();
    t.on_response_body(br#"{"error":"overloaded"}"#, true, 3, &mut out);
    let record = t.finish(4, Outcome::ServerError);
    assert_eq!((record.input_tokens, record.output_tokens), (0, 0));
    assert!(!record.unmeasured && !record.input_estimated);
    assert_eq!(record.e2e, 4);
}

#[test]
fn a_request_reset_before_headers_has_e2e_only() {
    let mut t = ResponseTracker::new(5, streaming_plan(STRIP_ALL), &FilterConfig::default());
    let record = t.finish(12, Outcome::UpstreamReset);
    assert_eq!(record.e2e, 7);
    assert_eq!(record.outcome, Outcome::UpstreamReset);
    assert_eq!(t.phase(), Phase::WaitingFirstToken);
}

fn json_tracker(limit: usize) -> ResponseTracker {
    let config = FilterConfig {
        max_response_json_bytes: limit,
        ..FilterConfig::default()
    };
    let plan = TrackPlan {
        inspected: true,
        stream: false,
        estimated_input_tokens: 9,
        strip: StripPlan::default(),
    };
    let mut t = ResponseTracker::new(0, plan, &config);
    t.on_response_headers(200, Some("application/json; charset=utf-8"), None);
    t
}

#[test]
fn non_streaming_usage_comes_from_the_body_split_anywhere() {
    let body = br#"{"choices":[{"message":{"role":"assistant","content":"hello"}}],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}"#;
    let mut t = json_tracker(1 << 20);
    let mut out = Vec::new();
    let (a, b) = body.split_at(37);
    assert!(!t.on_response_body(a, false, 1, &mut out).rewrite);
    assert!(!t.on_response_body(b, true, 2, &mut out).rewrite);
    let record = t.finish(3, Outcome::Ok);
    assert_eq!((record.input_tokens, record.output_tokens), (12, 2));
    assert_eq!((record.ttft, record.tpot), (None, None));
}

#[test]
fn non_streaming_without_usage_estimates_a_quarter_of_the_characters() {
    let mut t = json_tracker(1 << 20);
    let mut out = Vec::new();
    t.on_response_body(
        r#"{"choices":[{"message":{"content":"abcdefghi","tool_calls":[{"function":{"arguments":"{}"}}]}},{"text":"é"}]}"#.as_bytes(),
        true,
        1,
        &mut out,
    );
    let record = t.finish(2, Outcome::Ok);
    // 9 + 2 + 1 characters.
    assert_eq!(record.output_tokens, 3);
    assert!(record.output_estimated && record.input_estimated);
    assert_eq!(record.input_tokens, 9);
}

#[test]
fn non_streaming_refusals_and_function_calls_are_generated_text_too() {
    let mut t = json_tracker(1 << 20);
    let mut out = Vec::new();
    t.on_response_body(
        r#"{"choices":[{"message":{"content":null,"refusal":"No, sorry"}},{"message":{"content":null,"function_call":{"name":"f","arguments":"{\"a\":1}"}}}]}"#.as_bytes(),
        true,
        1,
        &mut out,
    );
    let record = t.finish(2, Outcome::Ok);
    // 9 + 7 characters.
    assert_eq!(record.output_tokens, 4);
    assert!(record.output_estimated);
}

#[test]
fn an_oversized_json_body_is_not_copied_and_counts_as_unmeasured() {
    let mut t = json_tracker(16);
    let mut out = Vec::new();
    t.on_response_body(b"{\"choices\":[],\"usage\":", false, 1, &mut out);
    assert!(!t.wants_body());
    t.on_response_body(b"{\"completion_tokens\":3}}", true, 2, &mut out);
    let record = t.finish(3, Outcome::Ok);
    assert!(record.unmeasured);
    assert_eq!(record.output_tokens, 0);
}

#[test]
fn unknown_content_types_are_unmeasured() {
    let mut t = json_tracker(1 << 20);
    t.on_response_headers(200, Some("text/plain"), None);
    assert!(!t.wants_body());
    assert!(t.finish(1, Outcome::Ok).unmeasured);
    let mut t = json_tracker(1 << 20);
    t.on_response_headers(200, None, None);
    assert!(t.finish(1, Outcome::Ok).unmeasured);
    let mut t = json_tracker(1 << 20);
    t.on_response_headers(200, Some("application/vnd.api+json"), None);
    assert!(t.wants_body());
}

#[test]
fn uninspected_requests_take_input_from_usage_or_leave_it_unmeasured() {
    let mut t = ResponseTracker::for_uninspected(0);
    assert!(
        !t.on_response_headers(200, Some("text/event-stream"), None)
            .remove_content_length
    );
    let mut out = Vec::new();
    t.on_response_body(&content("a"), true, 1, &mut out);
    let record = t.finish(2, Outcome::Ok);
    assert!(record.unmeasured);
    assert_eq!((record.input_tokens, record.output_tokens), (0, 1));

    let mut t = ResponseTracker::for_uninspected(0);
    t.on_response_headers(200, Some("text/event-stream"), None);
    let mut body = content("a");
    body.extend(usage(30, 1));
    t.on_response_body(&body, true, 1, &mut out);
    let record = t.finish(2, Outcome::Ok);
    assert!(!record.unmeasured);
    assert_eq!(record.input_tokens, 30);
}

#[test]
fn an_overlong_event_fails_open_with_every_byte_delivered() {
    let config = FilterConfig {
        max_sse_line_bytes: 1024,
        ..FilterConfig::default()
    };
    let mut t = ResponseTracker::new(0, streaming_plan(STRIP_ALL), &config);
    t.on_response_headers(200, Some("text/event-stream"), None);
    let long = content(&"x".repeat(3000));
    let mut received = Vec::new();
    let mut out = Vec::new();
    let chunks = split_by(&long, &[63]);
    let last = chunks.len() - 1;
    for (i, c) in chunks.iter().enumerate() {
        let v = t.on_response_body(c, i == last, i as u64, &mut out);
        received.extend_from_slice(if v.rewrite { &out } else { c });
    }
    assert_eq!(received, long);
    let record = t.finish(100, Outcome::Ok);
    assert!(record.unmeasured);
}

#[test]
fn outcomes_follow_envoy_flags_and_details() {
    use response_flags::*;
    assert_eq!(
        classify_outcome(Some(200), true, "via_upstream", 0),
        Outcome::Ok
    );
    assert_eq!(
        classify_outcome(Some(429), true, "via_upstream", 0),
        Outcome::ClientError
    );
    assert_eq!(
        classify_outcome(Some(500), true, "via_upstream", 0),
        Outcome::ServerError
    );
    assert_eq!(
        classify_outcome(
            Some(503),
            true,
            "upstream_reset_before_response_started{connection_failure}",
            UPSTREAM_CONNECTION_FAILURE
        ),
        Outcome::UpstreamReset
    );
    assert_eq!(
        classify_outcome(
            Some(200),
            false,
            "upstream_reset_after_response_started{remote_reset}",
            0
        ),
        Outcome::UpstreamReset
    );
    assert_eq!(
        classify_outcome(Some(503), true, "", UPSTREAM_REMOTE_RESET),
        Outcome::UpstreamReset
    );
    assert_eq!(
        classify_outcome(
            None,
            false,
            "downstream_remote_disconnect",
            DOWNSTREAM_CONNECTION_TERMINATION
        ),
        Outcome::ClientCancel
    );
    assert_eq!(
        classify_outcome(
            Some(200),
            false,
            "via_upstream",
            DOWNSTREAM_CONNECTION_TERMINATION
        ),
        Outcome::ClientCancel
    );
    assert_eq!(
        classify_outcome(Some(200), false, "via_upstream", DOWNSTREAM_REMOTE_RESET),
        Outcome::ClientCancel
    );
    // A client that closes right after the last byte did not cancel anything.
    assert_eq!(
        classify_outcome(
            Some(200),
            true,
            "downstream_remote_disconnect",
            DOWNSTREAM_CONNECTION_TERMINATION
        ),
        Outcome::Ok
    );
    // Stopped without a reset or a departed client: a timeout on the server side.
    assert_eq!(
        classify_outcome(Some(200), false, "stream_idle_timeout", 0),
        Outcome::ServerError
    );
    assert_eq!(
        classify_outcome(
            Some(504),
            true,
            "response_timeout",
            UPSTREAM_REQUEST_TIMEOUT
        ),
        Outcome::ServerError
    );
    assert_eq!(
        classify_outcome(Some(0), false, "", 0),
        Outcome::ServerError
    );
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z ]{1,6}",
        1 => Just(String::new()),
        1 => "[\"\\\\é\u{1F600}\n\r:]{1,4}",
        1 => Just("data: \"usage\":null".to_string()),
    ]
}

fn arb_event() -> impl Strategy<Value = EventSpec> {
    prop_oneof![
        1 => Just(EventSpec::Role),
        6 => (arb_text(), proptest::option::of((0u64..500, 0u64..500)))
            .prop_map(|(text, continuous)| EventSpec::Content { text, continuous }),
        1 => arb_text().prop_map(EventSpec::Reasoning),
        1 => arb_text().prop_map(EventSpec::ToolCall),
        1 => Just(EventSpec::Finish),
        1 => (0u64..5000, 0u64..5000).prop_map(|(prompt, completion)| EventSpec::Usage { prompt, completion }),
        1 => "[a-z ]{0,5}".prop_map(EventSpec::Comment),
        1 => Just(EventSpec::Done),
    ]
}

fn arb_style() -> impl Strategy<Value = StreamStyle> {
    (0u8..3, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(eol, space, usage_null, completions)| StreamStyle {
            eol,
            space,
            usage_null,
            completions,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_split_of_a_stream_reaches_the_client_exactly_as_without_the_options(
        events in proptest::collection::vec(arb_event(), 0..12),
        style in arb_style(),
        sizes in proptest::collection::vec(any::<u8>(), 0..6),
    ) {
        sse_structured(&events, style, &sizes);
    }

    #[test]
    fn the_first_token_chunk_is_the_one_completing_the_first_content_event(
        events in proptest::collection::vec(arb_event(), 1..8),
        sizes in proptest::collection::vec(any::<u8>(), 1..4),
    ) {
        let g = render_stream(&events, StreamStyle::default());
        let chunks = split_by(&g.with_options, &sizes);
        let run = run_stream(&chunks, STRIP_ALL, 1 << 20);
        prop_assert_eq!(run.record.ttft.is_some(), g.content_events > 0);
        prop_assert!(run.content_chunks as u64 <= g.content_events);
    }

    #[test]
    fn raw_bytes_never_break_the_tracker(
        data in proptest::collection::vec(
            prop_oneof![
                Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), Just(b'{'), Just(b'}'), Just(b'"'),
                Just(b'['), Just(b']'), Just(b','), any::<u8>(),
            ],
            0..300,
        ),
    ) {
        sse_raw(&data);
    }

    #[test]
    fn sse_shaped_bytes_never_break_the_tracker(
        events in proptest::collection::vec(arb_event(), 0..8),
        style in arb_style(),
        noise in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        sizes in proptest::collection::vec(any::<u8>(), 0..6),
    ) {
        // A valid stream with a few bytes flipped: mostly valid, sometimes not.
        let mut bytes = render_stream(&events, style).with_options;
        for (at, byte) in noise {
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] = byte;
            }
        }
        let mut data = vec![sizes.len() as u8];
        data.extend_from_slice(&sizes);
        data.extend_from_slice(&bytes);
        sse_raw(&data);
    }
}

/// A server that fails while generating has already sent `200` and `text/event-stream`, so it
/// reports the failure as an event in the stream and then ends it normally:
/// - vLLM, `serving_chat.py` `chat_completion_stream_generator` (and `serving_completion.py`):
///   `except Exception as e: data = self.create_streaming_error_response(e); yield f"data:
///   {data}\n\n"` then `yield "data: [DONE]\n\n"`; `create_error_response` maps an unknown
///   exception (the engine died, a generation error) to `{"error":{"message":..,
///   "type":"InternalServerError","param":null,"code":500}}`.
/// - SGLang, `serving_chat.py` `_generate_chat_stream`: a request the scheduler aborts yields
///   `create_streaming_error_response(message, code.name, code.value)` (500 by default).
/// - TGI, `router/src/server.rs`: `impl From<InferError> for Event` sends
///   `{"error":"Request failed during generation: ..","error_type":"generation"}`.
///
/// The client saw a failure: the OpenAI SDK raises `APIError` on any event whose data has an
/// `error` member (`openai/_streaming.py`, `_raise_streaming_error`). Envoy saw a complete 200,
/// so the outcome the glue passes in is `Ok`; the tracker, the only one that read the stream,
/// must not let it stand.
#[test]
fn a_stream_that_ends_in_an_error_event_is_a_server_error_not_ok() {
    for error in [
        r#"{"error":{"message":"EngineCore encountered an issue.","type":"InternalServerError","param":null,"code":500}}"#,
        r#"{"error":{"object":"error","message":"Generation aborted.","type":"INTERNAL_SERVER_ERROR","param":null,"code":500}}"#,
        r#"{"error":"Request failed during generation: Server error: CUDA out of memory","error_type":"generation"}"#,
        // Older vLLM's create_streaming_error_response(str(e)) defaults to BadRequestError/400
        // for whatever failed in the engine.
        r#"{"object":"error","message":"Background loop has errored already.","type":"BadRequestError","param":null,"code":400}"#,
    ] {
        let mut t = sse_tracker(StripPlan::default());
        let mut out = Vec::new();
        t.on_response_body(&role(), false, 10 * MS, &mut out);
        t.on_response_body(&content("Hel"), false, 20 * MS, &mut out);
        t.on_response_body(&chunk(error), false, 30 * MS, &mut out);
        t.on_response_body(b"data: [DONE]\n\n", true, 31 * MS, &mut out);
        // What the glue computes from Envoy's view: a 200 that ended normally.
        let outcome = classify_outcome(Some(200), true, "via_upstream", 0);
        assert_eq!(outcome, Outcome::Ok);
        let record = t.finish(32 * MS, outcome);
        assert_eq!(
            record.outcome,
            Outcome::ServerError,
            "a stream the server ended with {error} was counted as {:?}",
            record.outcome
        );
    }
}

/// OpenAI streams two kinds of generated output that are neither `content` nor `tool_calls`
/// (`openai-python` `types/chat/chat_completion_chunk.py`, `ChoiceDelta`, generated from the API
/// spec):
/// - `function_call` ("Deprecated and replaced by `tool_calls`. The name and arguments of a
///   function that should be called, as generated by the model"), what a request with the
///   legacy `functions` parameter gets, ending with `finish_reason: "function_call"`;
/// - `refusal` ("The refusal message generated by the model"), sent instead of `content` when a
///   model refuses under structured outputs.
///
/// Both are tokens the model generated: the first one is the first token, and an answer made of
/// them is decoding, not waiting, for its whole length.
#[test]
fn openai_function_call_and_refusal_deltas_are_generated_tokens() {
    let function_call = [
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":null,"function_call":{"name":"get_current_weather","arguments":""}},"finish_reason":null}]}"#,
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"function_call":{"arguments":"{\n"}},"finish_reason":null}]}"#,
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"function_call":{"arguments":"\"location\": \"Boston\"}"}},"finish_reason":null}]}"#,
    ];
    let refusal = [
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":null,"refusal":""},"finish_reason":null}]}"#,
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"refusal":"I'm sorry,"},"finish_reason":null}]}"#,
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"refusal":" I cannot help with that."},"finish_reason":null}]}"#,
    ];
    for (name, events, finish) in [
        ("function_call", function_call, "function_call"),
        ("refusal", refusal, "stop"),
    ] {
        let mut t = sse_tracker(StripPlan::default());
        let mut out = Vec::new();
        let mut first_at = None;
        for (i, data) in events.iter().enumerate() {
            let now = (i as u64 + 1) * 10 * MS;
            if t.on_response_body(&chunk(data), false, now, &mut out)
                .first_content
            {
                first_at.get_or_insert(now);
            }
        }
        let end = chunk(&format!(
            r#"{{"id":"c","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{}},"finish_reason":"{finish}"}}]}}"#
        ));
        t.on_response_body(&end, false, 40 * MS, &mut out);
        assert_eq!(
            t.phase(),
            Phase::Decoding,
            "{name}: still waiting for a first token after the whole answer"
        );
        t.on_response_body(&usage(80, 12), false, 41 * MS, &mut out);
        t.on_response_body(b"data: [DONE]\n\n", true, 42 * MS, &mut out);
        let record = t.finish(50 * MS, Outcome::Ok);
        // The first event with generated text: the name of the function, or the refusal's
        // first words (its first event has an empty refusal, like a role chunk's empty content).
        let expected_first = if name == "function_call" { 10 } else { 20 } * MS;
        assert_eq!(first_at, Some(expected_first), "{name}: first token chunk");
        assert_eq!(record.ttft, Some(expected_first), "{name}: TTFT");
        assert!(
            record.tpot.is_some(),
            "{name}: no TPOT for 12 output tokens"
        );
    }
}

/// With `n > 1` (or a legacy completion whose `prompt` is a list), the choices are decoded side
/// by side, one token each per engine step, and streamed as separate events told apart by their
/// `index`: vLLM's `chat_completion_stream_generator` sends one role chunk per choice, then for
/// each engine output `for output in res.outputs: ... choices=[choice_data]` (one event per
/// choice), and reports `completion_tokens = sum(previous_num_tokens)`, the tokens of all choices
/// together (OpenAI's `usage` counts all choices too; `ChatCompletionChunk.choices` "can contain
/// more than one elements if `n` is greater than 1").
///
/// Each client stream then gets a token every decode step: two choices of 5 tokens, one step
/// every 10 ms after the first at 10 ms, is a TPOT of (50 - 10) / (5 - 1) = 10 ms. Dividing the
/// decode time by the tokens of both choices reports 4.4 ms: decode looks n times faster than
/// any client sees it, and the more requests use `n`, the faster the pool looks while it slows.
#[test]
fn tpot_of_a_request_with_several_choices_is_per_choice_not_over_all_their_tokens() {
    fn choice_event(index: u32, delta: &str) -> Vec<u8> {
        chunk(&format!(
            r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":null}}]}}"#
        ))
    }
    let mut t = sse_tracker(STRIP_ALL);
    let mut out = Vec::new();
    for index in 0..2 {
        t.on_response_body(
            &choice_event(index, r#"{"role":"assistant","content":""}"#),
            false,
            5 * MS,
            &mut out,
        );
    }
    for step in 1..=5u64 {
        for index in 0..2 {
            t.on_response_body(
                &choice_event(index, &format!(r#"{{"content":"t{step}"}}"#)),
                false,
                step * 10 * MS,
                &mut out,
            );
        }
    }
    // vLLM's usage chunk: 5 + 5 completion tokens.
    let v = t.on_response_body(&usage(12, 10), false, 50 * MS, &mut out);
    assert!(v.rewrite && out.is_empty());
    t.on_response_body(b"data: [DONE]\n\n", true, 50 * MS, &mut out);
    let record = t.finish(50 * MS, Outcome::Ok);
    assert_eq!(record.output_tokens, 10);
    assert_eq!(record.ttft, Some(10 * MS));
    assert_eq!(
        record.tpot,
        Some(10 * MS),
        "each choice got a token every 10 ms, reported TPOT {:?} ns",
        record.tpot
    );
}

/// With `n > 1` each decode step streams one event per choice, a moment apart: gaps between
/// any two content chunks would be mostly ~0. Inter-token latency is the first choice's.
#[test]
fn itl_with_several_choices_is_timed_on_the_first_choice() {
    let event = |index: u32, text: &str| {
        chunk(&format!(
            r#"{{"id":"c","choices":[{{"index":{index},"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#
        ))
    };
    let mut t = sse_tracker(StripPlan::default());
    let mut out = Vec::new();
    let mut gaps = Vec::new();
    for step in 1..=4u64 {
        // Choice 1 first this time: the order within a step is the server's.
        for (index, offset) in [(1, 0), (0, MS / 10)] {
            let v =
                t.on_response_body(&event(index, "t"), false, step * 10 * MS + offset, &mut out);
            gaps.extend(v.itl);
        }
    }
    assert_eq!(gaps, [10 * MS, 10 * MS, 10 * MS]);
}
