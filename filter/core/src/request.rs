//! Request body inspection: the model, whether the response streams, an input-token estimate, and
//! the rewrite that asks the server for usage in the stream.
//!
//! The glue buffers the request body (up to `maxRequestBodyBytes`) and calls [`inspect_request`]
//! once. A body that is not a JSON object is an error and the glue fails open: the request goes on
//! untouched and is measured as "unknown".

use serde::Deserialize;
use serde_json::value::RawValue;

/// Prompt tokens estimated per chat message for the role and the chat template's framing.
pub const TOKENS_PER_CHAT_MESSAGE: u64 = 4;

/// What to change in streaming requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RewriteOptions {
    /// Ask for `stream_options.include_usage` when the client did not.
    pub inject_include_usage: bool,
    /// Also ask for `stream_options.continuous_usage_stats` (vLLM).
    pub continuous_usage: bool,
}

/// What the response tracker must remove from the stream so the client receives exactly what
/// the server would have sent without the options the filter added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StripPlan {
    /// Remove the usage-only event (`"choices":[]` with a `usage` object).
    pub usage_chunk: bool,
    /// Remove `"usage":null` members (OpenAI adds one to every chunk under include_usage).
    pub usage_null: bool,
    /// Remove `"usage":{...}` members from events that carry choices.
    pub continuous_usage: bool,
}

impl StripPlan {
    pub fn any(&self) -> bool {
        self.usage_chunk || self.usage_null || self.continuous_usage
    }
}

/// What the request body says, and the body to send instead when it must change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInspection {
    /// The body's `model`, when it is a string.
    pub model: Option<String>,
    /// `"stream": true`.
    pub stream: bool,
    /// The client set `stream_options.include_usage: true` itself.
    pub client_asked_usage: bool,
    /// See [`estimate_prompt_tokens`].
    pub estimated_input_tokens: u64,
    /// The new body; `Some` only when it differs from the original.
    pub rewritten: Option<Vec<u8>>,
    pub strip: StripPlan,
}

/// Why a request body could not be inspected. The glue fails open on any of them.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not a JSON object")]
    NotAnObject,
    #[error("request body is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
}

impl RequestError {
    /// A short name for logs and stat labels.
    pub fn label(&self) -> &'static str {
        match self {
            RequestError::NotAnObject => "not_an_object",
            RequestError::NotJson(_) => "not_json",
        }
    }
}

/// The input-token estimate used when the server reports no usage: `ceil(chars / 4)` over the
/// text of every message content (or the prompt), plus [`TOKENS_PER_CHAT_MESSAGE`] per chat
/// message. Characters are Unicode scalar values; prompts given as token ids count exactly. The
/// simulator must use this same function (it may depend on this crate), so that its ground truth
/// and the filter's estimate agree.
pub fn estimate_prompt_tokens(text_chars: u64, chat_messages: u64) -> u64 {
    text_chars
        .div_ceil(4)
        .saturating_add(chat_messages.saturating_mul(TOKENS_PER_CHAT_MESSAGE))
}

/// The output-token estimate of a non-streaming response without usage: `ceil(chars / 4)`.
pub fn estimate_completion_tokens(text_chars: u64) -> u64 {
    text_chars.div_ceil(4)
}

// Every field is kept raw: only the few we need are parsed further, and `deserialize_with`
// keeps an explicit `null` as present (plain `Option` would turn it into "absent", and the
// cheap rewrite would then add a second `stream_options` key).
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    model: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    prompt: Option<&'a RawValue>,
}

fn present<'de, D>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&'de RawValue>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<Content<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(#[serde(borrow)] std::borrow::Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<Part<'a>>),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt<'a> {
    Text(#[serde(borrow)] std::borrow::Cow<'a, str>),
    Texts(#[serde(borrow)] Vec<std::borrow::Cow<'a, str>>),
    TokenIds(Vec<u64>),
    TokenIdBatches(Vec<Vec<u64>>),
    Other(serde::de::IgnoredAny),
}

/// Inspects a request body and, when the options ask for it, rewrites it.
///
/// Injection happens only for `"stream": true` requests whose client would not get usage
/// without it: no `stream_options`, a `null` one, or one whose `include_usage` is `false` or
/// `null` (an object without the key gets usage from vLLM, whose default is true). Without a
/// `stream_options` key the new member is inserted before the final `}` and every other byte is
/// kept; an existing `stream_options` object is edited in place (only its own bytes change).
pub fn inspect_request(
    body: &[u8],
    opts: &RewriteOptions,
) -> Result<RequestInspection, RequestError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(RequestError::NotAnObject);
    }
    let raw: RawRequest<'_> = serde_json::from_slice(body).map_err(RequestError::NotJson)?;

    let model = raw
        .model
        .and_then(|m| serde_json::from_str::<String>(m.get()).ok());
    let stream = raw.stream.is_some_and(|s| s.get() == "true");

    let estimated_input_tokens = estimate_from(&raw);

    // What the client already asked for.
    enum Options {
        Absent,
        Null,
        Object(serde_json::Map<String, serde_json::Value>),
        Unusable,
    }
    let options = match raw.stream_options {
        None => Options::Absent,
        Some(o) if o.get() == "null" => Options::Null,
        Some(o) => {
            match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(o.get()) {
                Ok(map) => Options::Object(map),
                Err(_) => Options::Unusable,
            }
        }
    };
    // Whether the server may send what `key` asks for without the filter's help: only an
    // explicit `false` or `null` (or its default, where that is false) rules it out. vLLM
    // defaults `include_usage` to true in a `stream_options` object (OpenAI to false), and both
    // take values such as `1` or `"true"` as true: injected and stripped, such a client would
    // lose the usage chunk it gets without the filter.
    let asked = |key: &str, default: bool| match &options {
        Options::Object(map) => match map.get(key) {
            None => default,
            Some(serde_json::Value::Bool(value)) => *value,
            Some(serde_json::Value::Null) => false,
            Some(_) => true,
        },
        _ => false,
    };
    let client_asked_usage = asked("include_usage", true);
    let client_asked_continuous = asked("continuous_usage_stats", false);

    let mut inspection = RequestInspection {
        model,
        stream,
        client_asked_usage,
        estimated_input_tokens,
        rewritten: None,
        strip: StripPlan::default(),
    };
    if !stream || matches!(options, Options::Unusable) {
        return Ok(inspection);
    }
    let add_usage = opts.inject_include_usage && !client_asked_usage;
    let add_continuous =
        opts.continuous_usage && !client_asked_continuous && (client_asked_usage || add_usage);
    if !add_usage && !add_continuous {
        return Ok(inspection);
    }

    let rewritten = match options {
        Options::Absent => insert_stream_options(body, add_usage, add_continuous),
        Options::Null => raw
            .stream_options
            .and_then(|o| replace_span(body, o, &options_literal(add_usage, add_continuous))),
        Options::Object(mut map) => {
            if add_usage {
                map.insert("include_usage".into(), serde_json::Value::Bool(true));
            }
            if add_continuous {
                map.insert(
                    "continuous_usage_stats".into(),
                    serde_json::Value::Bool(true),
                );
            }
            serde_json::to_vec(&map)
                .ok()
                .and_then(|new| raw.stream_options.and_then(|o| replace_span(body, o, &new)))
        }
        Options::Unusable => None,
    };
    if rewritten.is_some() {
        inspection.strip = StripPlan {
            usage_chunk: add_usage,
            usage_null: add_usage,
            continuous_usage: add_continuous,
        };
        inspection.rewritten = rewritten;
    }
    Ok(inspection)
}

/// The input estimate of a request: see [`estimate_prompt_tokens`].
fn estimate_from(raw: &RawRequest<'_>) -> u64 {
    let mut chars: u64 = 0;
    let mut messages: u64 = 0;
    let mut exact_tokens: u64 = 0;
    if let Some(list) = raw
        .messages
        .and_then(|m| serde_json::from_str::<Vec<Message<'_>>>(m.get()).ok())
    {
        for message in &list {
            messages += 1;
            match &message.content {
                Some(Content::Text(text)) => chars += text.chars().count() as u64,
                Some(Content::Parts(parts)) => {
                    for part in parts {
                        if let Some(text) = &part.text {
                            chars += text.chars().count() as u64;
                        }
                    }
                }
                Some(Content::Other(_)) | None => {}
            }
        }
    } else if let Some(prompt) = raw
        .prompt
        .and_then(|p| serde_json::from_str::<Prompt<'_>>(p.get()).ok())
    {
        match prompt {
            Prompt::Text(text) => chars += text.chars().count() as u64,
            Prompt::Texts(texts) => {
                chars += texts.iter().map(|t| t.chars().count() as u64).sum::<u64>()
            }
            // Token ids are the tokens themselves: no estimate needed.
            Prompt::TokenIds(ids) => exact_tokens += ids.len() as u64,
            Prompt::TokenIdBatches(batches) => {
                exact_tokens += batches.iter().map(|b| b.len() as u64).sum::<u64>()
            }
            Prompt::Other(_) => {}
        }
    }
    estimate_prompt_tokens(chars, messages).saturating_add(exact_tokens)
}

fn options_literal(usage: bool, continuous: bool) -> Vec<u8> {
    match (usage, continuous) {
        (true, true) => br#"{"include_usage":true,"continuous_usage_stats":true}"#.to_vec(),
        (true, false) => br#"{"include_usage":true}"#.to_vec(),
        (false, true) => br#"{"continuous_usage_stats":true}"#.to_vec(),
        (false, false) => b"{}".to_vec(),
    }
}

fn insert_stream_options(body: &[u8], usage: bool, continuous: bool) -> Option<Vec<u8>> {
    let close = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if body.get(close) != Some(&b'}') {
        return None;
    }
    let head = body.get(..close)?;
    // `{}` has no member to follow; `stream: true` means this never happens, but stay valid.
    let empty = head
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .and_then(|i| head.get(i))
        == Some(&b'{');
    let literal = options_literal(usage, continuous);
    let mut out = Vec::with_capacity(body.len() + literal.len() + 20);
    out.extend_from_slice(head);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(br#""stream_options":"#);
    out.extend_from_slice(&literal);
    out.extend_from_slice(body.get(close..)?);
    Some(out)
}

/// Replaces the bytes of `raw` (a value borrowed from `body`) with `new`.
fn replace_span(body: &[u8], raw: &RawValue, new: &[u8]) -> Option<Vec<u8>> {
    let text = raw.get().as_bytes();
    let start = (text.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(text.len())?;
    if body.get(start..end)? != text {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + new.len());
    out.extend_from_slice(body.get(..start)?);
    out.extend_from_slice(new);
    out.extend_from_slice(body.get(end..)?);
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    const INJECT: RewriteOptions = RewriteOptions {
        inject_include_usage: true,
        continuous_usage: false,
    };

    fn inspect(body: &str, opts: RewriteOptions) -> RequestInspection {
        match inspect_request(body.as_bytes(), &opts) {
            Ok(i) => i,
            Err(e) => panic!("{body}: {e}"),
        }
    }

    fn rewritten(i: &RequestInspection) -> String {
        String::from_utf8(i.rewritten.clone().unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn streaming_request_without_stream_options_gets_a_member_and_keeps_every_other_byte() {
        let body = "{ \"model\" : \"llama\",\n \"stream\": true, \"messages\":[{\"role\":\"user\",\"content\":\"hi\"}] }\n";
        let i = inspect(body, INJECT);
        assert_eq!(i.model.as_deref(), Some("llama"));
        assert!(i.stream);
        assert!(!i.client_asked_usage);
        assert_eq!(
            rewritten(&i),
            "{ \"model\" : \"llama\",\n \"stream\": true, \"messages\":[{\"role\":\"user\",\"content\":\"hi\"}] ,\"stream_options\":{\"include_usage\":true}}\n"
        );
        assert_eq!(
            i.strip,
            StripPlan {
                usage_chunk: true,
                usage_null: true,
                continuous_usage: false
            }
        );
    }

    #[test]
    fn a_client_that_asked_for_usage_is_left_alone() {
        let i = inspect(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            INJECT,
        );
        assert!(i.client_asked_usage);
        assert!(i.rewritten.is_none());
        assert!(!i.strip.any());
    }

    #[test]
    fn non_streaming_requests_are_never_rewritten() {
        for body in [
            r#"{"model":"m","messages":[]}"#,
            r#"{"model":"m","stream":false}"#,
            r#"{"model":"m","stream":"true"}"#,
        ] {
            let i = inspect(body, INJECT);
            assert!(!i.stream, "{body}");
            assert!(i.rewritten.is_none(), "{body}");
        }
    }

    #[test]
    fn existing_stream_options_are_edited_in_place() {
        let body = r#"{"stream_options":{"include_usage":false,"x":1},"stream":true,"model":"m"}"#;
        let i = inspect(body, INJECT);
        assert_eq!(
            rewritten(&i),
            r#"{"stream_options":{"include_usage":true,"x":1},"stream":true,"model":"m"}"#
        );
        assert!(i.strip.usage_chunk);
    }

    #[test]
    fn null_stream_options_are_replaced_not_duplicated() {
        let i = inspect(r#"{"stream":true,"stream_options":null}"#, INJECT);
        assert_eq!(
            rewritten(&i),
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn unusable_stream_options_disable_injection() {
        let i = inspect(r#"{"stream":true,"stream_options":"yes"}"#, INJECT);
        assert!(i.rewritten.is_none());
        assert!(!i.strip.any());
    }

    #[test]
    fn continuous_usage_is_added_with_include_usage_and_stripped() {
        let opts = RewriteOptions {
            inject_include_usage: true,
            continuous_usage: true,
        };
        let i = inspect(r#"{"stream":true}"#, opts);
        assert_eq!(
            rewritten(&i),
            r#"{"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#
        );
        assert!(i.strip.usage_chunk && i.strip.continuous_usage);

        // The client wants the final usage itself: only the continuous part is ours to strip.
        let i = inspect(
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            opts,
        );
        assert_eq!(
            rewritten(&i),
            r#"{"stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":true}}"#
        );
        assert_eq!(
            i.strip,
            StripPlan {
                usage_chunk: false,
                usage_null: false,
                continuous_usage: true
            }
        );
    }

    #[test]
    fn disabled_injection_changes_nothing() {
        let i = inspect(r#"{"stream":true}"#, RewriteOptions::default());
        assert!(i.rewritten.is_none());
    }

    #[test]
    fn chat_estimate_is_a_quarter_of_the_characters_plus_four_per_message() {
        // 5 + 3 chars ("héllo" is 5 chars, 6 bytes) = 8 -> 2 tokens, + 2 messages * 4.
        let i = inspect(
            r#"{"messages":[{"role":"system","content":"héllo"},{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
            INJECT,
        );
        assert_eq!(i.estimated_input_tokens, 2 + 8);
        assert_eq!(estimate_prompt_tokens(9, 0), 3);
    }

    #[test]
    fn completion_prompts_are_estimated_and_token_ids_counted() {
        assert_eq!(
            inspect(r#"{"prompt":"abcdefghi"}"#, INJECT).estimated_input_tokens,
            3
        );
        assert_eq!(
            inspect(r#"{"prompt":["abcd","ef"]}"#, INJECT).estimated_input_tokens,
            2
        );
        assert_eq!(
            inspect(r#"{"prompt":[1,2,3]}"#, INJECT).estimated_input_tokens,
            3
        );
        assert_eq!(
            inspect(r#"{"prompt":[[1,2],[3]]}"#, INJECT).estimated_input_tokens,
            3
        );
    }

    #[test]
    fn a_stream_options_object_that_may_ask_for_usage_is_left_alone() {
        // vLLM declares `include_usage: bool | None = True`: these clients get the usage chunk
        // from vLLM, and stripping it would take it from them.
        for body in [
            r#"{"model":"m","stream":true,"stream_options":{}}"#,
            r#"{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true}}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":1}}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":"true"}}"#,
        ] {
            let i = inspect(body, INJECT);
            assert!(i.client_asked_usage, "{body}");
            assert!(
                !i.strip.usage_chunk,
                "{body}: its usage chunk would be stripped"
            );
        }
        // An explicit no is a no: injected, and the chunk it brings stripped.
        for body in [
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":null}}"#,
        ] {
            let i = inspect(body, INJECT);
            assert!(!i.client_asked_usage, "{body}");
            assert!(i.strip.usage_chunk, "{body}");
        }
    }

    #[test]
    fn odd_models_and_bodies_do_not_fail_the_request() {
        assert_eq!(inspect(r#"{"model":3}"#, INJECT).model, None);
        assert_eq!(
            inspect(r#"{"model":"a\"b"}"#, INJECT).model.as_deref(),
            Some("a\"b")
        );
        assert!(matches!(
            inspect_request(b"[1]", &INJECT),
            Err(RequestError::NotAnObject)
        ));
        assert!(matches!(
            inspect_request(b"", &INJECT),
            Err(RequestError::NotAnObject)
        ));
        assert!(matches!(
            inspect_request(br#"{"model":"#, &INJECT),
            Err(RequestError::NotJson(_))
        ));
        // Duplicate keys are ambiguous: refuse rather than guess which one the server reads.
        assert!(inspect_request(br#"{"stream":true,"stream":false}"#, &INJECT).is_err());
    }

    fn arb_body() -> impl Strategy<Value = Value> {
        let text = "[a-zA-Z0-9 \"\\\\é\n]{0,12}";
        (
            proptest::option::of(text),
            any::<bool>(),
            prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                any::<bool>().prop_map(|b| Some(json!({ "include_usage": b }))),
                Just(Some(json!({ "other": [1, 2] }))),
            ],
            proptest::collection::vec(text, 0..4),
        )
            .prop_map(|(model, stream, options, contents)| {
                let mut body = serde_json::Map::new();
                if let Some(model) = model {
                    body.insert("model".into(), Value::String(model));
                }
                body.insert("stream".into(), Value::Bool(stream));
                if let Some(options) = options {
                    body.insert("stream_options".into(), options);
                }
                let messages: Vec<Value> = contents
                    .into_iter()
                    .map(|c| json!({ "role": "user", "content": c }))
                    .collect();
                body.insert("messages".into(), Value::Array(messages));
                Value::Object(body)
            })
    }

    proptest! {
        #[test]
        fn rewrite_is_valid_json_asking_for_usage_and_otherwise_unchanged(
            body in arb_body(),
            pretty in any::<bool>(),
        ) {
            let bytes = if pretty {
                serde_json::to_vec_pretty(&body)?
            } else {
                serde_json::to_vec(&body)?
            };
            let i = inspect_request(&bytes, &INJECT).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let stream = body["stream"] == Value::Bool(true);
            // vLLM's default inside a `stream_options` object is to include usage.
            let asked = match body.get("stream_options") {
                Some(Value::Object(options)) => match options.get("include_usage") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(Value::Null) => false,
                    Some(_) => true,
                },
                _ => false,
            };
            prop_assert_eq!(i.stream, stream);
            prop_assert_eq!(i.client_asked_usage, asked);
            let model = body.get("model").and_then(Value::as_str).map(str::to_string);
            prop_assert_eq!(i.model, model);
            match &i.rewritten {
                Some(new) => {
                    prop_assert!(stream && !asked);
                    let mut parsed: Value = serde_json::from_slice(new)?;
                    prop_assert_eq!(&parsed["stream_options"]["include_usage"], &Value::Bool(true));
                    // Apart from the option, the body is what the client sent.
                    let mut expected = body.clone();
                    if let (Some(p), Some(e)) = (parsed.as_object_mut(), expected.as_object_mut()) {
                        p.remove("stream_options");
                        e.remove("stream_options");
                    }
                    prop_assert_eq!(parsed, expected);
                }
                None => prop_assert!(!stream || asked),
            }
        }
    }
}
