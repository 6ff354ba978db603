//! The OpenAI wire shapes vLLM speaks: requests in, completion objects and SSE chunks out.
//!
//! Shapes follow vLLM's `entrypoints/openai` serving code, field order included: chunks carry no
//! `usage` key unless usage is being reported (vLLM dumps them with `exclude_unset`), the chat
//! role chunk is `{"role":"assistant","content":""}`, only the chat finish chunk carries
//! `stop_reason`, legacy chunks always do, and usage lists `prompt_tokens, total_tokens,
//! completion_tokens` in that order. Unknown request fields are ignored, as vLLM does.

use serde::{Deserialize, Serialize, Serializer};

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions` (legacy)
    Completions,
}

/// What the simulator needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`; legacy completions default to 16 as in vLLM.
    pub max_tokens: Option<u64>,
    /// All prompt text, concatenated: the token seed.
    pub prompt_text: String,
    pub prompt_tokens: u64,
}

/// A body the simulator refuses, with vLLM-like wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadRequest(pub String);

/// As vLLM declares it: `include_usage: bool | None = True`, so an object without the key asks
/// for usage and an explicit `null` does not; `continuous_usage_stats` defaults to false.
#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default = "usage_by_default")]
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

fn usage_by_default() -> Option<bool> {
    Some(true)
}

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u64>,
}

#[derive(Deserialize)]
struct ChatMessage {
    /// Required, as vLLM requires it; the simulator has no use for it.
    #[serde(rename = "role")]
    _role: String,
    content: Option<MessageContent>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    text: Option<String>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Prompt,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    n: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    TokenIds(Vec<u64>),
    TokenIdBatches(Vec<Vec<u64>>),
}

/// Prompt tokens are estimated, not tokenized: a quarter of the characters (Unicode scalar
/// values), rounded up, plus 4 per chat message for the chat template's role markers.
pub(crate) const CHARS_PER_TOKEN: u64 = 4;
/// See [`CHARS_PER_TOKEN`].
pub(crate) const TEMPLATE_TOKENS_PER_MESSAGE: u64 = 4;
/// vLLM's default `max_tokens` for legacy completions.
pub(crate) const LEGACY_DEFAULT_MAX_TOKENS: u64 = 16;

fn tokens_for_chars(chars: u64) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN)
}

pub(crate) fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<ParsedRequest, BadRequest> {
    let (model, stream, stream_options, max_tokens, n, prompt_text, prompt_tokens) = match endpoint
    {
        Endpoint::Chat => {
            let req: ChatRequest = serde_json::from_slice(body).map_err(invalid_json)?;
            if req.messages.is_empty() {
                return Err(BadRequest(
                    "messages: must hold at least one message".to_owned(),
                ));
            }
            let mut text = String::new();
            for message in &req.messages {
                match &message.content {
                    None => {}
                    Some(MessageContent::Text(t)) => text.push_str(t),
                    Some(MessageContent::Parts(parts)) => {
                        parts
                            .iter()
                            .filter_map(|p| p.text.as_deref())
                            .for_each(|t| text.push_str(t));
                    }
                }
            }
            let messages = req.messages.len() as u64;
            let tokens = tokens_for_chars(text.chars().count() as u64)
                .saturating_add(TEMPLATE_TOKENS_PER_MESSAGE.saturating_mul(messages));
            let max = req.max_completion_tokens.or(req.max_tokens);
            (
                req.model,
                req.stream,
                req.stream_options,
                max,
                req.n,
                text,
                tokens,
            )
        }
        Endpoint::Completions => {
            let req: CompletionRequest = serde_json::from_slice(body).map_err(invalid_json)?;
            // Several prompts would be several choices in vLLM; the simulator answers them as
            // one prompt, one choice.
            let (text, tokens) = match req.prompt {
                Prompt::Text(t) => {
                    let n = tokens_for_chars(t.chars().count() as u64);
                    (t, n)
                }
                Prompt::Texts(ts) => {
                    let t = ts.concat();
                    let n = tokens_for_chars(t.chars().count() as u64);
                    (t, n)
                }
                Prompt::TokenIds(ids) => (join_ids(&ids), ids.len() as u64),
                Prompt::TokenIdBatches(batches) => {
                    let ids: Vec<u64> = batches.concat();
                    (join_ids(&ids), ids.len() as u64)
                }
            };
            let max = Some(req.max_tokens.unwrap_or(LEGACY_DEFAULT_MAX_TOKENS));
            (
                req.model,
                req.stream,
                req.stream_options,
                max,
                req.n,
                text,
                tokens,
            )
        }
    };
    // As vLLM's sampling parameters check them.
    if max_tokens == Some(0) {
        return Err(BadRequest(
            "max_tokens must be at least 1, got 0.".to_owned(),
        ));
    }
    // vLLM would answer n choices; the simulator plans one, and says so rather than pass
    // silently.
    if n.is_some_and(|n| n != 1) {
        return Err(BadRequest(format!(
            "n = {}: the simulator answers one choice per request (n = 1)",
            n.unwrap_or_default()
        )));
    }
    let stream = stream.unwrap_or(false);
    // vLLM's request validator refuses stream_options on a non-streaming request.
    if stream_options.is_some() && !stream {
        return Err(BadRequest(
            "Stream options can only be defined when `stream=True`.".to_owned(),
        ));
    }
    let include_usage = stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let continuous_usage = stream_options
        .as_ref()
        .and_then(|o| o.continuous_usage_stats)
        .unwrap_or(false);
    Ok(ParsedRequest {
        endpoint,
        model,
        stream,
        include_usage,
        continuous_usage,
        max_tokens,
        prompt_text,
        prompt_tokens,
    })
}

fn join_ids(ids: &[u64]) -> String {
    ids.iter().map(|id| format!("{id},")).collect()
}

fn invalid_json(err: serde_json::Error) -> BadRequest {
    BadRequest(format!("invalid request body: {err}"))
}

// --- responses ---

/// Serializes as JSON `null`: for fields vLLM always sends as null (`logprobs`, `stop_reason`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Null;

impl Serialize for Null {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            completion_tokens,
        }
    }
}

/// One streamed object: `chat.completion.chunk` or `text_completion`.
#[derive(Serialize)]
pub(crate) struct StreamChunk<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Serialize)]
pub(crate) struct ChatStreamChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Null,
    pub finish_reason: Option<&'static str>,
    /// Present (as null) on the finish chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Null>,
}

#[derive(Serialize)]
pub(crate) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    pub content: &'a str,
}

#[derive(Serialize)]
pub(crate) struct TextStreamChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Null,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Null,
}

/// A choice type for the usage-only chunk, whose `choices` is empty.
#[derive(Serialize)]
pub(crate) enum NoChoice {}

#[derive(Serialize)]
pub(crate) struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChatChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Serialize)]
pub(crate) struct ChatChoice<'a> {
    pub index: u32,
    pub message: Message<'a>,
    pub logprobs: Null,
    pub finish_reason: &'static str,
    pub stop_reason: Null,
}

#[derive(Serialize)]
pub(crate) struct Message<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Serialize)]
pub(crate) struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [TextChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Serialize)]
pub(crate) struct TextChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Null,
    pub finish_reason: &'static str,
    pub stop_reason: Null,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInfo<'a>,
}

#[derive(Serialize)]
struct ErrorInfo<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Null,
    code: u16,
}

/// The `model` a request body names, if it is a JSON object naming one; nothing else is checked.
pub(crate) fn named_model(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

/// vLLM's error type names, by status.
pub(crate) fn error_type(status: u16) -> &'static str {
    match status {
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        408 => "RequestTimeoutError",
        413 => "RequestEntityTooLargeError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        500 => "InternalServerError",
        501 => "NotImplementedError",
        503 => "ServiceUnavailableError",
        // 400 and the rest of 4xx
        400..=499 => "BadRequestError",
        _ => "InternalServerError",
    }
}

/// `{"error":{"message":..,"type":..,"param":null,"code":<status>}}`
pub(crate) fn error_json(status: u16, message: &str) -> Vec<u8> {
    to_json(&ErrorBody {
        error: ErrorInfo {
            message,
            kind: error_type(status),
            param: Null,
            code: status,
        },
    })
}

/// Serializes a value the simulator built itself. These types hold only strings and integers,
/// so serde_json cannot fail on them; an empty object is the defensive fallback.
pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ParsedRequest, BadRequest> {
        parse_request(Endpoint::Chat, body.as_bytes())
    }

    fn legacy(body: &str) -> Result<ParsedRequest, BadRequest> {
        parse_request(Endpoint::Completions, body.as_bytes())
    }

    #[test]
    fn chat_prompt_tokens_are_quarter_chars_rounded_up_plus_four_per_message() {
        // 5 + 4 = 9 chars -> 3 tokens, plus 2 messages * 4.
        let req = chat(
            r#"{"messages":[{"role":"system","content":"hello"},{"role":"user","content":"日本語です"}]}"#,
        );
        assert_eq!(req.map(|r| r.prompt_tokens), Ok(3 + 8));
    }

    #[test]
    fn chat_content_parts_and_null_content_count_their_text() {
        let req = chat(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"e"}]},{"role":"assistant","content":null}]}"#,
        );
        assert_eq!(
            req.map(|r| (r.prompt_tokens, r.prompt_text)),
            Ok((2 + 8, "abcde".to_owned()))
        );
    }

    #[test]
    fn legacy_prompt_may_be_a_string_an_array_of_strings_or_token_ids() {
        assert_eq!(
            legacy(r#"{"prompt":"abcdefghi"}"#).map(|r| r.prompt_tokens),
            Ok(3)
        );
        assert_eq!(
            legacy(r#"{"prompt":["abcd","efgh","i"]}"#).map(|r| r.prompt_tokens),
            Ok(3)
        );
        assert_eq!(
            legacy(r#"{"prompt":[1,2,3,4,5]}"#).map(|r| r.prompt_tokens),
            Ok(5)
        );
        assert_eq!(
            legacy(r#"{"prompt":[[1,2],[3]]}"#).map(|r| r.prompt_tokens),
            Ok(3)
        );
    }

    #[test]
    fn max_completion_tokens_wins_and_legacy_defaults_to_sixteen() {
        let req = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":5,"max_completion_tokens":7}"#,
        );
        assert_eq!(req.map(|r| r.max_tokens), Ok(Some(7)));
        let req = chat(r#"{"messages":[{"role":"user","content":"x"}]}"#);
        assert_eq!(req.map(|r| r.max_tokens), Ok(None));
        assert_eq!(
            legacy(r#"{"prompt":"x"}"#).map(|r| r.max_tokens),
            Ok(Some(16))
        );
    }

    #[test]
    fn stream_options_are_read_and_refused_without_stream() {
        let req = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true},"unknown_field":1}"#,
        );
        assert_eq!(
            req.map(|r| (r.stream, r.include_usage, r.continuous_usage)),
            Ok((true, true, true))
        );
        let req = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
        );
        assert!(req.is_err());
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        for body in [
            "",
            "{",
            "[]",
            r#"{"messages":"hi"}"#,
            r#"{"messages":[]}"#,
            r#"{"model":"m"}"#,
        ] {
            assert!(chat(body).is_err(), "accepted {body:?}");
        }
        assert!(legacy(r#"{"prompt":{"a":1}}"#).is_err());
    }

    #[test]
    fn error_json_has_the_openai_shape() {
        let body = String::from_utf8(error_json(503, "busy")).unwrap_or_default();
        assert_eq!(
            body,
            r#"{"error":{"message":"busy","type":"ServiceUnavailableError","param":null,"code":503}}"#
        );
    }
}
