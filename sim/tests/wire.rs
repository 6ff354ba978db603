//! The simulator through its real wire: a real listener, hyper clients over TCP (HTTP/1.1 and
//! HTTP/2 with prior knowledge), assertions on the bytes received and on the ground truth.

// Tests fail loudly on the first broken expectation; that is what `expect` is for here.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use flyball_sim::{EngineModel, Outcome, RequestTruth, SimConfig, SimServer, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Safety net against hangs; never an assertion about speed.
const PATIENCE: Duration = Duration::from_secs(10);

async fn start() -> SimServer {
    start_with(SimConfig::default()).await
}

async fn start_with(config: SimConfig) -> SimServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    SimServer::start(config, listener).await.expect("start")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
}

struct Sent {
    response: Response<Incoming>,
    connection: JoinHandle<()>,
}

async fn send(
    server: &SimServer,
    proto: Proto,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Sent {
    let stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let io = TokioIo::new(stream);
    let uri = match proto {
        Proto::H1 => path.to_owned(),
        Proto::H2 => format!("{}{path}", server.base_url()),
    };
    let mut builder = Request::builder().method(method).uri(uri);
    if proto == Proto::H1 {
        builder = builder.header("host", server.local_addr().to_string());
    }
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    {
        builder = builder.header("content-type", "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("request");
    let (response, connection) = match proto {
        Proto::H1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("h1 handshake");
            let connection = tokio::spawn(async move {
                let _ = conn.await;
            });
            (
                tokio::time::timeout(PATIENCE, sender.send_request(request)).await,
                connection,
            )
        }
        Proto::H2 => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
            let connection = tokio::spawn(async move {
                let _ = conn.await;
            });
            (
                tokio::time::timeout(PATIENCE, sender.send_request(request)).await,
                connection,
            )
        }
    };
    let response = response.expect("response in time").expect("response");
    Sent {
        response,
        connection,
    }
}

/// Body frames as received, and the error that ended the body early, if any.
async fn frames(response: Response<Incoming>) -> (Vec<Bytes>, Option<hyper::Error>) {
    let mut body = response.into_body();
    let mut frames = Vec::new();
    loop {
        let next = tokio::time::timeout(PATIENCE, body.frame())
            .await
            .expect("frame in time");
        match next {
            None => return (frames, None),
            Some(Err(err)) => return (frames, Some(err)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                }
            }
        }
    }
}

async fn body_text(response: Response<Incoming>) -> String {
    let (frames, err) = frames(response).await;
    assert!(err.is_none(), "body failed: {err:?}");
    String::from_utf8(frames.concat()).expect("utf-8 body")
}

/// SSE events (`data: ` stripped; comments kept whole), split on blank lines.
fn sse(body: &str, eol: &str) -> Vec<String> {
    let separator = format!("{eol}{eol}");
    assert!(
        body.ends_with(&separator),
        "stream does not end with a blank line: {body:?}"
    );
    body.split(&separator)
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_owned())
        .collect()
}

fn json_events(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.starts_with('{'))
        .map(|e| serde_json::from_str(e).expect("event is JSON"))
        .collect()
}

fn chat_body(extra: Value) -> String {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "Say something, simulator."}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body.to_string()
}

async fn truth(server: &SimServer, id: &str) -> RequestTruth {
    tokio::time::timeout(PATIENCE, server.wait_for_request(id))
        .await
        .expect("ground truth in time")
}

fn content(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .or(e["choices"][0]["text"].as_str())
        })
        .collect()
}

const FAST: [(&str, &str); 2] = [(header::TTFT_MS, "0"), (header::ITL_MS, "0")];

fn knobs<'a>(id: &'a str, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = vec![(header::REQUEST_ID, id), (header::CREATED, "1700000000")];
    all.extend_from_slice(&FAST);
    all.extend_from_slice(more);
    all
}

#[tokio::test]
async fn streaming_chat_without_include_usage_sends_role_chunk_tokens_and_done_without_usage() {
    let server = start().await;
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("s1", &[]),
        &chat_body(json!({"stream": true, "max_tokens": 5})),
    )
    .await;
    assert_eq!(sent.response.status(), StatusCode::OK);
    assert_eq!(
        sent.response.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let events = sse(&body_text(sent.response).await, "\n");
    assert_eq!(events.len(), 1 + 5 + 1);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks = json_events(&events);
    assert_eq!(
        chunks[0],
        json!({"id":"chatcmpl-s1","object":"chat.completion.chunk","created":1_700_000_000u64,"model":"m",
               "choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]})
    );
    for (i, chunk) in chunks[1..].iter().enumerate() {
        assert!(
            chunk.get("usage").is_none(),
            "usage without include_usage: {chunk}"
        );
        let choice = &chunk["choices"][0];
        assert!(choice["delta"].get("role").is_none());
        assert!(
            !choice["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        );
        let expected = if i == 4 { json!("length") } else { Value::Null };
        assert_eq!(choice["finish_reason"], expected);
    }

    let t = truth(&server, "s1").await;
    assert_eq!(
        (
            t.outcome,
            t.status,
            t.stream,
            t.completion_tokens_sent,
            t.usage_reported
        ),
        (Outcome::Ok, 200, true, 5, false)
    );
    assert_eq!(t.prompt_tokens, 7 + 4, "ceil(25 / 4) + 4 per message");
    assert_eq!(t.path, "/v1/chat/completions");
    assert!(
        t.first_content_offset_us
            .is_some_and(|f| f <= t.completed_offset_us)
    );
}

#[tokio::test]
async fn streaming_chat_with_include_usage_ends_with_a_usage_only_chunk() {
    let server = start().await;
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("s2", &[]),
        &chat_body(
            json!({"stream": true, "max_tokens": 4, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    let events = sse(&body_text(sent.response).await, "\n");
    let chunks = json_events(&events);
    assert_eq!(events.len(), 1 + 4 + 1 + 1);
    assert!(chunks[..5].iter().all(|c| c.get("usage").is_none()));
    assert_eq!(
        chunks[5],
        json!({"id":"chatcmpl-s2","object":"chat.completion.chunk","created":1_700_000_000u64,"model":"m",
               "choices":[],"usage":{"prompt_tokens":11,"total_tokens":15,"completion_tokens":4}})
    );
    let t = truth(&server, "s2").await;
    assert!(t.include_usage_requested && t.usage_reported && !t.continuous_usage_requested);
}

#[tokio::test]
async fn continuous_usage_stats_put_running_usage_on_every_chunk() {
    let server = start().await;
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("s3", &[]),
        &chat_body(json!({"stream": true, "max_tokens": 3,
                          "stream_options": {"include_usage": true, "continuous_usage_stats": true}})),
    )
    .await;
    let chunks = json_events(&sse(&body_text(sent.response).await, "\n"));
    let completion: Vec<u64> = chunks
        .iter()
        .map(|c| {
            c["usage"]["completion_tokens"]
                .as_u64()
                .expect("usage on every chunk")
        })
        .collect();
    assert_eq!(completion, vec![0, 1, 2, 3, 3]);
    assert!(chunks.iter().all(|c| c["usage"]["prompt_tokens"] == 11));
    assert!(truth(&server, "s3").await.continuous_usage_requested);
}

#[tokio::test]
async fn legacy_completions_stream_text_without_a_role_chunk() {
    let server = start().await;
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/completions",
        &knobs("l1", &[]),
        &json!({"model": "m", "prompt": ["Once upon", " a time"], "stream": true,
                "stream_options": {"include_usage": true}})
        .to_string(),
    )
    .await;
    let events = sse(&body_text(sent.response).await, "\n");
    let chunks = json_events(&events);
    // Legacy max_tokens defaults to 16, as in vLLM.
    assert_eq!(chunks.len(), 16 + 1);
    // Field order as vLLM writes it (serde_json::Value would sort the keys, so look at the text).
    assert!(
        events[0].contains(r#""choices":[{"index":0,"text":""#),
        "{}",
        events[0]
    );
    assert!(
        events[0].ends_with(r#","logprobs":null,"finish_reason":null,"stop_reason":null}]}"#),
        "{}",
        events[0]
    );
    for chunk in &chunks[..16] {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["id"], "cmpl-l1");
        assert!(chunk["choices"][0].get("delta").is_none());
    }
    assert_eq!(chunks[15]["choices"][0]["finish_reason"], "length");
    // ceil(16 chars / 4), no per-message overhead.
    assert_eq!(
        chunks[16]["usage"],
        json!({"prompt_tokens":4,"total_tokens":20,"completion_tokens":16})
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn non_streaming_answers_carry_the_same_text_as_the_stream_and_usage() {
    let server = start().await;
    let request = |stream: bool| chat_body(json!({"stream": stream, "max_tokens": 9}));
    let streamed = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("n1", &[]),
        &request(true),
    )
    .await;
    let streamed_text = content(&json_events(&sse(
        &body_text(streamed.response).await,
        "\n",
    )));

    let full = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("n1", &[]),
        &request(false),
    )
    .await;
    assert_eq!(full.response.headers()["content-type"], "application/json");
    let length: usize = full.response.headers()["content-length"]
        .to_str()
        .ok()
        .and_then(|l| l.parse().ok())
        .expect("content-length");
    let text = body_text(full.response).await;
    assert_eq!(text.len(), length);
    let body: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["id"], "chatcmpl-n1");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"].as_str(),
        Some(streamed_text.as_str())
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens":11,"total_tokens":20,"completion_tokens":9})
    );

    let legacy = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/completions",
        &knobs("n2", &[(header::OUTPUT_TOKENS, "3")]),
        &json!({"prompt": "abc", "max_tokens": 8}).to_string(),
    )
    .await;
    let body: Value = serde_json::from_str(&body_text(legacy.response).await).expect("json");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["id"], "cmpl-n2");
    assert!(body["choices"][0]["text"].is_string());
    // Fewer tokens than max_tokens: the model "stopped".
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 3);

    let entries: Vec<RequestTruth> = server.ground_truth();
    let full_truth = entries
        .iter()
        .find(|t| t.request_id == "n1" && !t.stream)
        .expect("entry");
    assert_eq!(
        (full_truth.completion_tokens_sent, full_truth.usage_reported),
        (9, true)
    );
}

#[tokio::test]
async fn no_usage_knob_omits_usage_even_when_asked() {
    let server = start().await;
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("u1", &[(header::NO_USAGE, "1")]),
        &chat_body(json!({"stream": true, "max_tokens": 3,
                          "stream_options": {"include_usage": true, "continuous_usage_stats": true}})),
    )
    .await;
    let chunks = json_events(&sse(&body_text(sent.response).await, "\n"));
    assert_eq!(chunks.len(), 4);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));

    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("u2", &[(header::NO_USAGE, "1")]),
        &chat_body(json!({"max_tokens": 3})),
    )
    .await;
    let body: Value = serde_json::from_str(&body_text(sent.response).await).expect("json");
    assert!(body.get("usage").is_none());
    assert!(!truth(&server, "u1").await.usage_reported);
    assert!(!truth(&server, "u2").await.usage_reported);
}

#[tokio::test]
async fn fragmented_body_concatenates_to_the_unfragmented_bytes() {
    let server = start().await;
    let body = chat_body(
        json!({"stream": true, "max_tokens": 30, "stream_options": {"include_usage": true}}),
    );
    let whole = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("f", &[]),
        &body,
    )
    .await;
    let (whole_frames, err) = frames(whole.response).await;
    assert!(err.is_none());
    let whole_bytes = whole_frames.concat();
    assert!(
        std::str::from_utf8(&whole_bytes).is_ok_and(|s| s.chars().any(|c| c.len_utf8() > 1)),
        "the stream should carry multi-byte characters to split"
    );

    for n in ["1", "7", "64"] {
        let size: usize = n.parse().unwrap_or(1);
        let sent = send(
            &server,
            Proto::H1,
            "POST",
            "/v1/chat/completions",
            &knobs("f", &[(header::FRAGMENT_BYTES, n)]),
            &body,
        )
        .await;
        let (pieces, err) = frames(sent.response).await;
        assert!(err.is_none());
        assert!(
            pieces.iter().all(|p| p.len() <= size),
            "a piece above {n} bytes"
        );
        assert!(pieces.len() >= whole_bytes.len() / size);
        assert_eq!(pieces.concat(), whole_bytes, "fragment size {n}");
    }
    let split_mid_char = {
        let sent = send(
            &server,
            Proto::H1,
            "POST",
            "/v1/chat/completions",
            &knobs("f", &[(header::FRAGMENT_BYTES, "1")]),
            &body,
        )
        .await;
        let (pieces, _) = frames(sent.response).await;
        pieces.iter().any(|p| std::str::from_utf8(p).is_err())
    };
    assert!(
        split_mid_char,
        "1-byte pieces must cut multi-byte characters"
    );
}

#[tokio::test]
async fn identical_requests_get_identical_bytes_over_http1_and_http2() {
    let server = start().await;
    let body = chat_body(
        json!({"stream": true, "max_tokens": 40, "stream_options": {"include_usage": true}}),
    );
    let mut bodies = Vec::new();
    for proto in [Proto::H1, Proto::H1, Proto::H2] {
        let sent = send(
            &server,
            proto,
            "POST",
            "/v1/chat/completions",
            &knobs("d1", &[]),
            &body,
        )
        .await;
        bodies.push(body_text(sent.response).await);
    }
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(bodies[0], bodies[2]);

    let other = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("d2", &[]),
        &body,
    )
    .await;
    let other_text = content(&json_events(&sse(&body_text(other.response).await, "\n")));
    let first_text = content(&json_events(&sse(&bodies[0], "\n")));
    assert_ne!(
        other_text, first_text,
        "another request id seeds other tokens"
    );
}

#[tokio::test]
async fn http2_prior_knowledge_serves_streams_and_json() {
    let server = start().await;
    let sent = send(
        &server,
        Proto::H2,
        "POST",
        "/v1/chat/completions",
        &knobs("h2", &[]),
        &chat_body(json!({"stream": true, "max_tokens": 3})),
    )
    .await;
    assert_eq!(sent.response.version(), hyper::Version::HTTP_2);
    let events = sse(&body_text(sent.response).await, "\n");
    assert_eq!(events.len(), 5);
    let sent = send(&server, Proto::H2, "GET", "/v1/models", &[], "").await;
    let body: Value = serde_json::from_str(&body_text(sent.response).await).expect("json");
    assert_eq!(body["data"][0]["id"], "sim-llama-3-8b");
    assert_eq!(truth(&server, "h2").await.outcome, Outcome::Ok);
}

#[tokio::test]
async fn crlf_and_comment_knobs_shape_the_stream() {
    let server = start().await;
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs(
            "c1",
            &[(header::LINE_ENDING, "crlf"), (header::COMMENT, "1")],
        ),
        &chat_body(json!({"stream": true, "max_tokens": 30})),
    )
    .await;
    let text = body_text(sent.response).await;
    assert!(
        !text.replace("\r\n", "").contains('\n'),
        "a bare LF in a CRLF stream"
    );
    let events = sse(&text, "\r\n");
    assert!(events[0].contains("\"role\":\"assistant\""));
    assert_eq!(events[1], ": keep-alive");
    assert!(events[2].contains("\"content\""));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // Escaped newlines inside JSON are not line breaks.
    assert!(
        json_events(&events)
            .iter()
            .any(|c| c["choices"][0]["delta"]["content"] == "\n")
    );
}

#[tokio::test]
async fn tokens_per_event_packs_several_tokens_into_one_chunk() {
    let server = start().await;
    let body = chat_body(json!({"stream": true, "max_tokens": 7}));
    let single = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("p1", &[]),
        &body,
    )
    .await;
    let single = json_events(&sse(&body_text(single.response).await, "\n"));
    let packed = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("p1", &[(header::TOKENS_PER_EVENT, "3")]),
        &body,
    )
    .await;
    let packed = json_events(&sse(&body_text(packed.response).await, "\n"));
    assert_eq!(packed.len(), 1 + 3, "role + ceil(7 / 3) token chunks");
    assert_eq!(content(&packed), content(&single));
    assert_eq!(truth(&server, "p1").await.completion_tokens_sent, 7);
}

#[tokio::test]
async fn error_knob_replies_that_status_with_an_openai_error() {
    let server = start().await;
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("e1", &[(header::ERROR, "503")]),
        &chat_body(json!({"stream": true})),
    )
    .await;
    assert_eq!(sent.response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = serde_json::from_str(&body_text(sent.response).await).expect("json");
    assert_eq!(body["error"]["type"], "ServiceUnavailableError");
    assert_eq!(body["error"]["code"], 503);
    assert!(body["error"]["message"].is_string());
    let t = truth(&server, "e1").await;
    assert_eq!(
        (t.outcome, t.status, t.completion_tokens_sent),
        (Outcome::Error, 503, 0)
    );
    assert_eq!(t.first_content_offset_us, None);
}

#[tokio::test]
async fn malformed_bodies_and_knobs_get_400_with_an_openai_error() {
    let server = start().await;
    type Headers<'a> = Vec<(&'a str, &'a str)>;
    let cases: [(&str, Headers, String); 4] = [
        ("b1", knobs("b1", &[]), "{not json".to_owned()),
        ("b2", knobs("b2", &[]), json!({"model": "m"}).to_string()),
        (
            "b3",
            knobs("b3", &[]),
            chat_body(json!({"stream_options": {"include_usage": true}})),
        ),
        (
            "sim-1",
            vec![(header::ITL_MS, "soon")],
            chat_body(json!({})),
        ),
    ];
    for (id, headers, body) in cases {
        let sent = send(
            &server,
            Proto::H1,
            "POST",
            "/v1/chat/completions",
            &headers,
            &body,
        )
        .await;
        assert_eq!(sent.response.status(), StatusCode::BAD_REQUEST, "{id}");
        let body: Value = serde_json::from_str(&body_text(sent.response).await).expect("json");
        assert_eq!(body["error"]["type"], "BadRequestError", "{id}");
        assert_eq!(body["error"]["code"], 400, "{id}");
        let t = truth(&server, id).await;
        assert_eq!((t.outcome, t.status), (Outcome::Error, 400), "{id}");
    }
}

#[tokio::test]
async fn reset_knob_aborts_the_body_after_n_tokens() {
    let server = start().await;
    for proto in [Proto::H1, Proto::H2] {
        let id = format!("r-{proto:?}");
        let sent = send(
            &server,
            proto,
            "POST",
            "/v1/chat/completions",
            &knobs(&id, &[(header::RESET_AFTER_TOKENS, "3")]),
            &chat_body(json!({"stream": true, "max_tokens": 10, "stream_options": {"include_usage": true}})),
        )
        .await;
        let (pieces, err) = frames(sent.response).await;
        assert!(err.is_some(), "{proto:?}: the body must fail, not end");
        let t = truth(&server, &id).await;
        assert_eq!(
            (t.outcome, t.completion_tokens_sent, t.usage_reported),
            (Outcome::Reset, 3, false)
        );
        if proto == Proto::H1 {
            // HTTP/1.1 delivers everything written before the close.
            let text = String::from_utf8(pieces.concat()).expect("utf-8");
            let events = sse(&text, "\n");
            assert_eq!(events.len(), 1 + 3);
            assert!(!text.contains("[DONE]"));
        }
    }

    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &knobs("r-full", &[(header::RESET_AFTER_TOKENS, "2")]),
        &chat_body(json!({"max_tokens": 10})),
    )
    .await;
    assert_eq!(sent.response.status(), StatusCode::OK);
    let (_, err) = frames(sent.response).await;
    assert!(err.is_some(), "a non-streaming body must fail too");
    assert_eq!(truth(&server, "r-full").await.outcome, Outcome::Reset);
}

#[tokio::test]
async fn client_cancel_is_recorded_with_the_tokens_it_got() {
    let server = start().await;
    for proto in [Proto::H1, Proto::H2] {
        let id = format!("x-{proto:?}");
        // The second token is a minute away: the request can only end by the client leaving.
        let sent = send(
            &server,
            proto,
            "POST",
            "/v1/chat/completions",
            &[
                (header::REQUEST_ID, id.as_str()),
                (header::TTFT_MS, "0"),
                (header::ITL_MS, "60000"),
            ],
            &chat_body(json!({"stream": true, "max_tokens": 3})),
        )
        .await;
        let mut body = sent.response.into_body();
        let mut received = String::new();
        // Role chunk and first token: two complete events (JSON escapes every newline in them).
        while received.matches("\n\n").count() < 2 {
            let frame = tokio::time::timeout(PATIENCE, body.frame())
                .await
                .expect("frame in time")
                .expect("body still open")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                received.push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
        drop(body);
        sent.connection.abort();
        let t = truth(&server, &id).await;
        assert_eq!(
            (t.outcome, t.completion_tokens_sent),
            (Outcome::ClientCancelled, 1),
            "{proto:?}"
        );
    }
}

#[tokio::test]
async fn ttft_knob_delays_the_first_token_and_truth_records_when_it_left() {
    let server = start().await;
    let asked = Instant::now();
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &[
            (header::REQUEST_ID, "t1"),
            (header::TTFT_MS, "150"),
            (header::ITL_MS, "5"),
        ],
        &chat_body(json!({"stream": true, "max_tokens": 4})),
    )
    .await;
    let (pieces, _) = frames(sent.response).await;
    assert!(asked.elapsed() >= Duration::from_millis(150 + 3 * 5));
    assert_eq!(pieces.len(), 1 + 4 + 1, "one chunk per event");
    let t = truth(&server, "t1").await;
    let first = t.first_content_offset_us.expect("a first token");
    assert!(first >= 150_000, "first content at {first} us");
    // Token deadlines count from receipt (ttft + 3 gaps), not from when the first one left.
    assert!(t.completed_offset_us >= 165_000);
}

#[tokio::test]
async fn engine_model_times_requests_that_carry_no_timing_knobs() {
    let engine = EngineModel {
        prefill_tokens_per_s: 1_000.0,
        step_base: Duration::from_millis(20),
        step_per_sequence: Duration::from_millis(1),
        max_running_sequences: 4,
        max_tokens_per_step: 2048,
    };
    let server = start_with(SimConfig {
        engine: engine.clone(),
        ..SimConfig::default()
    })
    .await;
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &[(header::REQUEST_ID, "g1")],
        &chat_body(json!({"stream": true, "max_tokens": 3})),
    )
    .await;
    let events = sse(&body_text(sent.response).await, "\n");
    assert_eq!(events.len(), 5);
    let t = truth(&server, "g1").await;
    let first = t.first_content_offset_us.expect("a first token");
    let unloaded_ttft =
        u64::try_from(engine.unloaded_ttft(t.prompt_tokens).as_micros()).unwrap_or(u64::MAX);
    assert!(
        first >= unloaded_ttft,
        "first content at {first} us, model says {unloaded_ttft} us"
    );
    let two_steps = 2 * u64::try_from(engine.decode_step_time(1).as_micros()).unwrap_or(u64::MAX);
    // Steps run back to back from the submission: prefill, then two decode steps.
    assert!(t.completed_offset_us >= unloaded_ttft + two_steps);
}

#[tokio::test]
async fn side_endpoints_answer_like_vllm_and_expose_ground_truth() {
    let server = start().await;
    let health = send(&server, Proto::H1, "GET", "/health", &[], "").await;
    assert_eq!(health.response.status(), StatusCode::OK);

    let _ = body_text(
        send(
            &server,
            Proto::H1,
            "POST",
            "/v1/chat/completions",
            &knobs("m1", &[]),
            &chat_body(json!({"stream": true, "max_tokens": 6})),
        )
        .await
        .response,
    )
    .await;
    let _ = truth(&server, "m1").await;

    let metrics = body_text(
        send(&server, Proto::H1, "GET", "/metrics", &[], "")
            .await
            .response,
    )
    .await;
    assert!(metrics.contains("vllm:num_requests_running{model_name=\"sim-llama-3-8b\"} 0.0"));
    assert!(metrics.contains("vllm:num_requests_waiting{model_name=\"sim-llama-3-8b\"} 0.0"));
    assert!(metrics.contains("vllm:prompt_tokens_total{model_name=\"sim-llama-3-8b\"} 11.0"));
    assert!(metrics.contains("vllm:generation_tokens_total{model_name=\"sim-llama-3-8b\"} 6.0"));

    let listed = body_text(
        send(&server, Proto::H1, "GET", "/sim/requests", &[], "")
            .await
            .response,
    )
    .await;
    let listed: Vec<RequestTruth> = serde_json::from_str(&listed).expect("ground truth JSON");
    assert_eq!(listed, server.ground_truth());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].request_id, "m1");

    let reset = send(&server, Proto::H1, "POST", "/sim/reset", &[], "").await;
    assert_eq!(reset.response.status(), StatusCode::NO_CONTENT);
    assert!(server.ground_truth().is_empty());

    let wrong_method = send(&server, Proto::H1, "GET", "/v1/chat/completions", &[], "").await;
    assert_eq!(
        wrong_method.response.status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        body_text(wrong_method.response).await,
        r#"{"detail":"Method Not Allowed"}"#
    );

    let missing = send(&server, Proto::H1, "GET", "/nope", &[], "").await;
    assert_eq!(missing.response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        body_text(missing.response).await,
        r#"{"detail":"Not Found"}"#
    );
}

#[tokio::test]
async fn requests_without_an_id_are_numbered_and_stamped_with_the_current_time() {
    let server = start().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &FAST,
        &chat_body(json!({"max_tokens": 1})),
    )
    .await;
    let body: Value = serde_json::from_str(&body_text(sent.response).await).expect("json");
    assert_eq!(body["id"], "chatcmpl-sim-1");
    assert!(body["created"].as_u64().is_some_and(|c| c >= before));
    assert_eq!(body["model"], "m", "the request's model is echoed");
    assert_eq!(truth(&server, "sim-1").await.outcome, Outcome::Ok);
}

/// Why a server with `engine` does not start, or `None` when it does.
async fn engine_refusal(engine: EngineModel) -> Option<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = SimConfig {
        engine,
        ..SimConfig::default()
    };
    SimServer::start(config, listener)
        .await
        .err()
        .map(|e| e.to_string())
}

#[tokio::test]
async fn invalid_config_is_refused_naming_field_value_and_rule() {
    let err = engine_refusal(EngineModel {
        max_running_sequences: 0,
        ..EngineModel::default()
    })
    .await;
    assert_eq!(
        err.as_deref(),
        Some("engine.max_running_sequences = 0: must be >= 1")
    );
    let err = engine_refusal(EngineModel {
        max_tokens_per_step: 0,
        ..EngineModel::default()
    })
    .await;
    assert_eq!(
        err.as_deref(),
        Some(
            "engine.max_tokens_per_step = 0: must be >= engine.max_running_sequences (each \
             running sequence takes a token of every step)"
        )
    );
}

#[tokio::test]
async fn serve_returns_once_shutdown_completes_and_stops_listening() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(flyball_sim::serve(
        SimConfig::default(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    // Readiness: the health check answers.
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let health = Request::get("/health")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(health).await.expect("health");
    assert_eq!(response.status(), StatusCode::OK);
    drop(sender);

    let _ = stop.send(());
    let result = tokio::time::timeout(PATIENCE, serving)
        .await
        .expect("serve returned in time");
    assert!(matches!(result, Ok(Ok(()))));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
}

/// A chat request over HTTP/1.1: the status and the whole body.
async fn post_chat(server: &SimServer, body: &Value) -> (StatusCode, String) {
    let sent = send(
        server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &[],
        &body.to_string(),
    )
    .await;
    let status = sent.response.status();
    (status, body_text(sent.response).await)
}

/// What vLLM refuses, the simulator refuses, with vLLM's status: output past the context length
/// (which also bounds what one answer holds in memory: `max_tokens: 4000000000` took the
/// process down), `max_tokens: 0`, and `n` above 1, which it would answer with one choice.
#[tokio::test]
async fn requests_vllm_refuses_are_refused() {
    let server = start().await;
    for (body, refusal) in [
        (
            json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":4_000_000_000u64}),
            "This model's maximum context length is 32768 tokens. However, you requested 4000000005 tokens",
        ),
        (
            json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":0}),
            "max_tokens must be at least 1, got 0.",
        ),
        (
            json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"n":2}),
            "n = 2: the simulator answers one choice per request (n = 1)",
        ),
    ] {
        let (status, text) = post_chat(&server, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        assert!(text.contains(refusal), "{body}: {text}");
    }
    // Up to the context length, taken (4 + ceil(2 / 4) prompt tokens): its headers come at once,
    // and the stream is dropped rather than read for minutes.
    let body =
        json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":32_763,"stream":true});
    let sent = send(
        &server,
        Proto::H1,
        "POST",
        "/v1/chat/completions",
        &[],
        &body.to_string(),
    )
    .await;
    assert_eq!(sent.response.status(), StatusCode::OK);
}

/// With `refuse_other_models`, a request naming a model the simulator does not serve gets vLLM's
/// 404; a served name, an alias, or none is answered, under the first served name as vLLM
/// answers; `/v1/models` lists every served name.
#[tokio::test]
async fn another_model_is_not_found_when_only_the_served_ones_are() {
    let server = start_with(SimConfig {
        aliases: vec!["llama-alias".to_owned()],
        refuse_other_models: true,
        ..SimConfig::default()
    })
    .await;
    let ask = |model: Option<&str>| {
        let mut body = json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":2});
        if let Some(model) = model {
            body["model"] = json!(model);
        }
        let server = &server;
        async move { post_chat(server, &body).await }
    };
    let (status, text) = ask(Some("gpt-4")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        error["error"]["message"],
        "The model `gpt-4` does not exist."
    );
    assert_eq!(error["error"]["type"], "NotFoundError");
    for model in [Some("sim-llama-3-8b"), Some("llama-alias"), None] {
        let (status, text) = ask(model).await;
        assert_eq!(status, StatusCode::OK, "{model:?}: {text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer["model"], "sim-llama-3-8b", "{model:?}");
    }
    let sent = send(&server, Proto::H1, "GET", "/v1/models", &[], "").await;
    let (frames, _) = frames(sent.response).await;
    let models: Value = serde_json::from_slice(&frames.concat()).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|card| card["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sim-llama-3-8b", "llama-alias"]);
    // The ground truth keeps the name each request gave, as the gateway keys its telemetry.
    let truth: Vec<String> = server
        .ground_truth()
        .iter()
        .map(|t| t.model.clone())
        .collect();
    assert_eq!(
        truth,
        ["gpt-4", "sim-llama-3-8b", "llama-alias", "sim-llama-3-8b"]
    );
}

/// vLLM answers a completion request whose media type is not JSON with a 400 before reading it
/// (curl's `-d` sends `application/x-www-form-urlencoded`); a charset parameter is fine.
#[tokio::test]
async fn a_body_that_is_not_json_by_its_media_type_is_refused() {
    let server = start().await;
    let body = json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":2}).to_string();
    for (content_type, expected) in [
        (
            Some("application/x-www-form-urlencoded"),
            StatusCode::BAD_REQUEST,
        ),
        (Some("text/plain"), StatusCode::BAD_REQUEST),
        (None, StatusCode::BAD_REQUEST),
        (Some("Application/JSON; charset=utf-8"), StatusCode::OK),
    ] {
        let headers: Vec<(&str, &str)> = match content_type {
            Some(value) => vec![("content-type", value)],
            // Named, but empty: `send` adds JSON only when no content type is given.
            None => vec![("content-type", "")],
        };
        let sent = send(
            &server,
            Proto::H1,
            "POST",
            "/v1/chat/completions",
            &headers,
            &body,
        )
        .await;
        assert_eq!(sent.response.status(), expected, "{content_type:?}");
        if expected == StatusCode::BAD_REQUEST {
            let (frames, _) = frames(sent.response).await;
            let text: Vec<u8> = frames.concat();
            let error: Value = serde_json::from_slice(&text).unwrap();
            assert_eq!(
                error["error"]["message"],
                "Unsupported Media Type: Only 'application/json' is allowed"
            );
            assert_eq!(error["error"]["type"], "BadRequestError");
        }
    }
}

/// The ground truth keeps the model each request named, as the gateway keys its telemetry by it
/// (`RequestTruth::model`): a request refused before its body is read (an injected error, or a
/// media type that is not JSON) named a model too.
#[tokio::test]
async fn the_truth_keeps_the_named_model_of_a_request_refused_before_its_body_is_read() {
    let server = start_with(SimConfig {
        aliases: vec!["qwen2.5-7b".to_owned()],
        refuse_other_models: true,
        ..SimConfig::default()
    })
    .await;
    let body =
        json!({"model":"qwen2.5-7b","messages":[{"role":"user","content":"hi"}],"max_tokens":2})
            .to_string();
    for headers in [
        vec![("x-sim-error", "503")],
        vec![("content-type", "text/plain")],
    ] {
        let sent = send(
            &server,
            Proto::H1,
            "POST",
            "/v1/chat/completions",
            &headers,
            &body,
        )
        .await;
        let _ = frames(sent.response).await;
    }
    let truth: Vec<String> = server
        .ground_truth()
        .iter()
        .map(|t| t.model.clone())
        .collect();
    assert_eq!(truth, ["qwen2.5-7b", "qwen2.5-7b"]);
}

/// A chat request that sets no `max_tokens` is refused only when its prompt alone fills the
/// context; otherwise vLLM answers it, its output bounded by what the context has left
/// (`vllm/entrypoints/openai/serving_engine.py`, `OpenAIServing._validate_input`: with
/// `max_tokens is None` it raises only for `token_num >= self.max_model_len`; the sampling
/// parameters then default `max_tokens` to `max_model_len - prompt tokens`).
#[tokio::test]
async fn a_chat_prompt_near_the_context_length_without_max_tokens_is_answered_within_it() {
    let server = start_with(SimConfig {
        max_model_len: 64,
        ..SimConfig::default()
    })
    .await;
    // 232 characters: ceil(232 / 4) + 4 for the message = 62 prompt tokens, 2 left.
    let prompt = "x".repeat(232);
    let (status, text) = post_chat(
        &server,
        &json!({"messages":[{"role":"user","content":prompt}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["usage"]["prompt_tokens"], 62);
    assert!(
        answer["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|total| total <= 64),
        "{text}"
    );
    // A prompt that fills the context alone is refused, as vLLM refuses it.
    let prompt = "x".repeat(240);
    let (status, text) = post_chat(
        &server,
        &json!({"messages":[{"role":"user","content":prompt}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
}
/// `GET /metrics` as text.
async fn scrape(server: &SimServer) -> String {
    body_text(
        send(server, Proto::H1, "GET", "/metrics", &[], "")
            .await
            .response,
    )
    .await
}

/// The value of one sample line of `/metrics`, by its name and labels.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Sends a chat request in the background and holds the response until the task is aborted
/// (the client going away).
fn hold_chat(server: &SimServer, id: &'static str, body: String) -> JoinHandle<()> {
    let addr = server.local_addr();
    tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        let request = Request::post("/v1/chat/completions")
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .header(header::REQUEST_ID, id)
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let response = sender.send_request(request).await;
        std::future::pending::<()>().await;
        drop(response);
    })
}

/// vLLM counts tokens in the engine, step by step, whatever the response's shape: each step's
/// new tokens go to `vllm:generation_tokens` and a prompt goes to `vllm:prompt_tokens` when its
/// prefill is done (`vllm/v1/metrics/stats.py`, `IterationStats.update_from_output`;
/// `vllm/v1/metrics/loggers.py`, `PrometheusStatLogger.record` adds them each step). A scraper
/// reading token throughput off `rate(vllm:generation_tokens_total)` sees a non-streaming
/// request's tokens as they are generated, and the tokens of one whose client left.
#[tokio::test]
async fn token_counters_follow_the_engine_steps_not_the_response_body() {
    let server = start_with(SimConfig {
        engine: EngineModel {
            max_running_sequences: 1,
            ..EngineModel::default()
        },
        ..SimConfig::default()
    })
    .await;
    let generation = "vllm:generation_tokens_total{model_name=\"sim-llama-3-8b\"}";
    let prompt = "vllm:prompt_tokens_total{model_name=\"sim-llama-3-8b\"}";
    // ~10 ms a step: 400 tokens take about 4 s; this one holds the only slot.
    let decoding = hold_chat(
        &server,
        "nonstream",
        chat_body(json!({"stream": false, "max_tokens": 400})),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Queued behind it, not prefilled.
    let queued = hold_chat(
        &server,
        "queued",
        chat_body(json!({"stream": true, "max_tokens": 4})),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = scrape(&server).await;
    decoding.abort();
    let _ = decoding.await;
    let _ = truth(&server, "nonstream").await;
    let after = scrape(&server).await;
    queued.abort();

    let generated = sample(&during, generation).unwrap_or_default();
    assert!(
        generated >= 50.0,
        "after ~1 s of decoding (~90 steps) vllm:generation_tokens_total read {generated}"
    );
    let kept = sample(&after, generation).unwrap_or_default();
    assert!(
        kept >= generated && kept >= 50.0,
        "the tokens generated for a client that left are not counted: {kept}"
    );
    assert_eq!(
        sample(&during, prompt),
        Some(11.0),
        "only the prompt that was prefilled counts; the queued one has not been"
    );
}

/// vLLM's `/metrics` is prometheus_client's `generate_latest`, which writes a counter's HELP and
/// TYPE lines under the sample's name (`# TYPE vllm:prompt_tokens_total counter`: "Munging from
/// OpenMetrics into Prometheus format", `mname = mname + '_total'` for counters, in
/// `prometheus_client/exposition.py`). A strict text parser (Go's `expfmt.TextParser`) reads
/// `# TYPE vllm:prompt_tokens counter` followed by `vllm:prompt_tokens_total ...` as a counter
/// family with no samples, which it drops, and an untyped `vllm:prompt_tokens_total`.
#[tokio::test]
async fn counters_are_typed_under_their_sample_names_as_vllm_writes_them() {
    let server = start().await;
    let metrics = scrape(&server).await;
    for counter in ["vllm:prompt_tokens_total", "vllm:generation_tokens_total"] {
        assert!(
            metrics.contains(&format!("# TYPE {counter} counter\n")),
            "no TYPE line for {counter}:\n{metrics}"
        );
    }
}

/// vLLM exports its request latencies as histograms, one observation per request
/// (`vllm/v1/metrics/loggers.py`, `PrometheusStatLogger`: `vllm:time_to_first_token_seconds`
/// observed in `record` from `IterationStats.time_to_first_tokens_iter`, and
/// `vllm:e2e_request_latency_seconds` for each finished request). Autoscaling on TTFT from
/// Prometheus (a KEDA `prometheus` trigger on `histogram_quantile(0.95, ...
/// vllm:time_to_first_token_seconds_bucket ...)`) reads these; against the simulator it reads
/// nothing.
#[tokio::test]
async fn latency_histograms_count_every_served_request() {
    let server = start().await;
    for id in ["h1", "h2"] {
        let sent = send(
            &server,
            Proto::H1,
            "POST",
            "/v1/chat/completions",
            &[(header::REQUEST_ID, id)],
            &chat_body(json!({"stream": true, "max_tokens": 3})),
        )
        .await;
        let _ = body_text(sent.response).await;
        let _ = truth(&server, id).await;
    }
    let metrics = scrape(&server).await;
    for histogram in [
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {histogram} histogram\n")),
            "no {histogram} histogram:\n{metrics}"
        );
        // Labels as the simulator's other series, plus any vLLM adds (`engine`).
        let count = metrics.lines().find_map(|line| {
            let rest = line.strip_prefix(&format!("{histogram}_count{{"))?;
            let (labels, value) = rest.rsplit_once("} ")?;
            labels
                .contains("model_name=\"sim-llama-3-8b\"")
                .then(|| value.parse::<f64>().ok())?
        });
        assert_eq!(count, Some(2.0), "{histogram}:\n{metrics}");
    }
}
