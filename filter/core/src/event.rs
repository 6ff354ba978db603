//! Classifies the data of one SSE event of an OpenAI-compatible stream, without building a tree.
//!
//! The response tracker calls [`classify`] once per event, so it is on the per-chunk path. It
//! walks the JSON once (RFC 8259 structure; scalars are skipped, not validated), jumps through
//! strings with `memchr`, and reports what accounting and stripping need: does a choice carry
//! generated content, is `choices` empty, and where is the top-level `usage` member. Only the small
//! `usage` object is ever handed to serde. Walking the structure (rather than searching for
//! `"content":`) is what keeps `\"content\":\"x\"` inside a string value from counting as a key.

use memchr::memchr2;
use std::ops::Range;

/// Deeper documents are refused, so recursion is bounded on any input.
const MAX_DEPTH: u32 = 32;

/// What one event's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// `[DONE]`, the end-of-stream sentinel.
    Done,
    /// A JSON object.
    Json(JsonEvent),
    /// Anything else (not JSON, or not an object): passed through, not counted.
    Other,
}

/// The parts of a JSON event accounting and stripping care about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonEvent {
    /// A choice carries generated content: a delta with non-empty `content`, `reasoning_content`,
    /// `reasoning`, `refusal`, `tool_calls` or `function_call`, or a non-empty completion `text`.
    pub content: bool,
    /// The choice of index 0 (or one naming no index) carries generated content: inter-token
    /// gaps are timed on that one stream, since with `n > 1` the other choices' tokens of the
    /// same decode step arrive a moment apart.
    pub first_choice_content: bool,
    /// `"choices": []`.
    pub choices_empty: bool,
    /// The highest choice `index` in the event plus one (0 when no choice names one): with
    /// `n > 1` the choices are decoded side by side and streamed as separate events.
    pub choices_seen: u32,
    /// A top-level `error` member that is not `null`: the server failed the request after it had
    /// started streaming (vLLM, SGLang and TGI send such an event, then end the stream normally).
    /// Older vLLM sends a flat `{"object":"error",..}` instead. Its `code` is not trusted: older
    /// vLLM and SGLang send 400 for an engine failure.
    pub error: bool,
    /// The top-level `usage` member, if any.
    pub usage: Option<UsageMember>,
}

/// Where the top-level `usage` member sits in the event data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageMember {
    /// `null`, an object, or something else.
    pub value: UsageValue,
    /// The value's bytes.
    pub value_span: Range<usize>,
    /// The bytes to delete to remove the member and one adjacent comma, leaving valid JSON.
    pub removal: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageValue {
    Null,
    Object,
    Other,
}

/// Token counts from a `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

impl Usage {
    /// Parses a `usage` object; `None` when it is not one or names neither count.
    pub fn parse(bytes: &[u8]) -> Option<Usage> {
        let usage: Usage = serde_json::from_slice(bytes).ok()?;
        (usage.prompt_tokens.is_some() || usage.completion_tokens.is_some()).then_some(usage)
    }
}

/// Classifies one event's data (already joined across `data:` lines).
pub fn classify(data: &[u8]) -> EventKind {
    let start = ws(data, 0);
    match data.get(start) {
        Some(b'{') => match top_level(data, start) {
            Some(event) => EventKind::Json(event),
            None => EventKind::Other,
        },
        Some(b'[') if is_done(data, start) => EventKind::Done,
        _ => EventKind::Other,
    }
}

fn is_done(data: &[u8], start: usize) -> bool {
    data.get(start..start + 6) == Some(b"[DONE]".as_slice()) && ws(data, start + 6) == data.len()
}

fn top_level(b: &[u8], open: usize) -> Option<JsonEvent> {
    let mut event = JsonEvent::default();
    let end = walk_object(
        b,
        open,
        MAX_DEPTH,
        |key, key_start, value_start, prev_comma| match key {
            Key::Choices => {
                let v = ws(b, value_start);
                if b.get(v) != Some(&b'[') {
                    return skip_value(b, v, MAX_DEPTH - 1);
                }
                let (listed, end) = choices(b, v)?;
                event.choices_empty = listed.empty;
                event.content |= listed.content;
                event.first_choice_content |= listed.first_choice_content;
                event.choices_seen = listed.seen;
                Some(end)
            }
            Key::Error => {
                let v = ws(b, value_start);
                let end = skip_value(b, v, MAX_DEPTH - 1)?;
                event.error |= b.get(v) != Some(&b'n');
                Some(end)
            }
            Key::Object => {
                // Older vLLM's ErrorResponse is flat: `{"object":"error","message":..}`.
                let v = ws(b, value_start);
                let end = skip_value(b, v, MAX_DEPTH - 1)?;
                event.error |= b.get(v..end) == Some(b"\"error\"".as_slice());
                Some(end)
            }
            Key::Usage => {
                let v = ws(b, value_start);
                let end = skip_value(b, v, MAX_DEPTH - 1)?;
                let value = match b.get(v) {
                    Some(b'n') => UsageValue::Null,
                    Some(b'{') => UsageValue::Object,
                    _ => UsageValue::Other,
                };
                let after = ws(b, end);
                let removal = match (prev_comma, b.get(after)) {
                    (Some(comma), _) => comma..end,
                    (None, Some(b',')) => key_start..ws(b, after + 1),
                    (None, _) => key_start..end,
                };
                event.usage = Some(UsageMember {
                    value,
                    value_span: v..end,
                    removal,
                });
                Some(end)
            }
            _ => skip_value(b, value_start, MAX_DEPTH - 1),
        },
    )?;
    // Only trailing whitespace may follow the object.
    (ws(b, end) == b.len()).then_some(event)
}

/// A JSON integer of at most 9 digits.
fn small_integer(b: &[u8], start: usize, end: usize) -> Option<u32> {
    let digits = b.get(start..end)?;
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// What a `choices` array holds.
struct Choices {
    empty: bool,
    content: bool,
    /// Content in the choice of index 0 (or one naming no index).
    first_choice_content: bool,
    /// Highest `index` plus one.
    seen: u32,
}

/// Returns what the `choices` array opening at `open` holds, and its end.
fn choices(b: &[u8], open: usize) -> Option<(Choices, usize)> {
    let mut listed = Choices {
        empty: true,
        content: false,
        first_choice_content: false,
        seen: 0,
    };
    let end = walk_array(b, open, MAX_DEPTH - 1, |element| {
        listed.empty = false;
        let v = ws(b, element);
        if b.get(v) != Some(&b'{') {
            return skip_value(b, v, MAX_DEPTH - 2);
        }
        // The index may follow the delta, so the choice is judged once walked.
        let mut content = false;
        let mut index = None;
        let end = walk_object(b, v, MAX_DEPTH - 2, |key, _, value_start, _| match key {
            Key::Index => {
                let i = ws(b, value_start);
                let end = skip_value(b, i, MAX_DEPTH - 3)?;
                index = small_integer(b, i, end);
                Some(end)
            }
            Key::Delta => {
                let d = ws(b, value_start);
                if b.get(d) == Some(&b'{') {
                    walk_object(b, d, MAX_DEPTH - 3, |key, _, value_start, _| {
                        let generated = matches!(
                            key,
                            Key::Content
                                | Key::ReasoningContent
                                | Key::Reasoning
                                | Key::Refusal
                                | Key::ToolCalls
                                | Key::FunctionCall
                        );
                        if !generated {
                            return skip_value(b, value_start, MAX_DEPTH - 4);
                        }
                        let (nonempty, end) = non_empty_value(b, value_start, MAX_DEPTH - 4)?;
                        content |= nonempty;
                        Some(end)
                    })
                } else {
                    skip_value(b, d, MAX_DEPTH - 3)
                }
            }
            Key::Text => {
                // Completions put the text in a string; anything else is not content.
                let t = ws(b, value_start);
                let end = skip_value(b, t, MAX_DEPTH - 3)?;
                content |= b.get(t) == Some(&b'"') && end - t > 2;
                Some(end)
            }
            _ => skip_value(b, value_start, MAX_DEPTH - 3),
        })?;
        if let Some(index) = index {
            listed.seen = listed.seen.max(index.saturating_add(1));
        }
        listed.content |= content;
        listed.first_choice_content |= content && index.unwrap_or(0) == 0;
        Some(end)
    })?;
    Some((listed, end))
}

/// Whether a value is a non-empty string, a non-empty array, or an object with a non-empty
/// string member (the shapes content comes in: `function_call` is `{name, arguments}`), and
/// where it ends.
fn non_empty_value(b: &[u8], start: usize, depth: u32) -> Option<(bool, usize)> {
    let v = ws(b, start);
    let end = skip_value(b, v, depth)?;
    let nonempty = match b.get(v) {
        // Any escape decodes to at least one character, so more than two raw bytes is non-empty.
        Some(b'"') => end - v > 2,
        Some(b'[') => b.get(ws(b, v + 1)) != Some(&b']'),
        Some(b'{') => {
            let mut any = false;
            walk_object(b, v, depth, |_, _, member, _| {
                let m = ws(b, member);
                let member_end = skip_value(b, m, depth - 1)?;
                any |= b.get(m) == Some(&b'"') && member_end - m > 2;
                Some(member_end)
            })?;
            any
        }
        _ => false,
    };
    Some((nonempty, end))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Choices,
    Usage,
    Error,
    Object,
    Index,
    Delta,
    Text,
    Content,
    ReasoningContent,
    Reasoning,
    Refusal,
    ToolCalls,
    FunctionCall,
    Other,
}

fn key_of(raw: &[u8]) -> Key {
    match raw {
        b"choices" => Key::Choices,
        b"usage" => Key::Usage,
        b"error" => Key::Error,
        b"object" => Key::Object,
        b"index" => Key::Index,
        b"delta" => Key::Delta,
        b"text" => Key::Text,
        b"content" => Key::Content,
        b"reasoning_content" => Key::ReasoningContent,
        b"reasoning" => Key::Reasoning,
        b"refusal" => Key::Refusal,
        b"tool_calls" => Key::ToolCalls,
        b"function_call" => Key::FunctionCall,
        _ => Key::Other,
    }
}

/// Walks the members of the object opening at `open`, calling `member(key, key_start,
/// value_start, preceding_comma)` which must return the end of the value. Returns the index after
/// the closing brace.
fn walk_object(
    b: &[u8],
    open: usize,
    depth: u32,
    mut member: impl FnMut(Key, usize, usize, Option<usize>) -> Option<usize>,
) -> Option<usize> {
    if depth == 0 || b.get(open) != Some(&b'{') {
        return None;
    }
    let mut i = ws(b, open + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    let mut prev_comma = None;
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_start = i;
        let key_end = skip_string(b, i)?;
        let raw = b.get(key_start + 1..key_end - 1)?;
        let key = if raw.contains(&b'\\') {
            // Escaped keys are rare enough to decode properly.
            match serde_json::from_slice::<String>(b.get(key_start..key_end)?) {
                Ok(decoded) => key_of(decoded.as_bytes()),
                Err(_) => return None,
            }
        } else {
            key_of(raw)
        };
        i = ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let end = member(key, key_start, i + 1, prev_comma)?;
        i = ws(b, end);
        match b.get(i) {
            Some(b',') => {
                prev_comma = Some(i);
                i = ws(b, i + 1);
            }
            Some(b'}') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Walks the elements of the array opening at `open`; `element(start)` returns each one's end.
fn walk_array(
    b: &[u8],
    open: usize,
    depth: u32,
    mut element: impl FnMut(usize) -> Option<usize>,
) -> Option<usize> {
    if depth == 0 || b.get(open) != Some(&b'[') {
        return None;
    }
    let mut i = ws(b, open + 1);
    if b.get(i) == Some(&b']') {
        return Some(i + 1);
    }
    loop {
        let end = element(i)?;
        i = ws(b, end);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b']') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Returns the index after the value starting at (or after whitespace from) `start`.
fn skip_value(b: &[u8], start: usize, depth: u32) -> Option<usize> {
    let i = ws(b, start);
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' => walk_object(b, i, depth, |_, _, v, _| skip_value(b, v, depth - 1)),
        b'[' => walk_array(b, i, depth, |e| skip_value(b, e, depth - 1)),
        _ => {
            let mut j = i;
            while let Some(c) = b.get(j) {
                if matches!(
                    c,
                    b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r' | b'"' | b'{' | b'[' | b':'
                ) {
                    break;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// `open` is a quote; returns the index after the closing quote.
fn skip_string(b: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    loop {
        let at = find_quote_or_backslash(b, i)?;
        if b.get(at) == Some(&b'"') {
            return Some(at + 1);
        }
        // A backslash escapes the next byte, whatever it is.
        i = at + 2;
    }
}

/// The first `"` or `\` at or after `from`.
///
/// Most strings in a chunk (keys, ids, one token of text) are short, where memchr's setup costs
/// more than the search, and wasm32 has no AVX2 for it anyway: the first bytes are checked eight
/// at a time in a u64 (the classic "has zero byte" test on `x ^ pattern`), longer strings go to
/// memchr.
fn find_quote_or_backslash(b: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    const QUOTES: u64 = ONES * b'"' as u64;
    const BACKSLASHES: u64 = ONES * b'\\' as u64;
    const SWAR_BYTES: usize = 64;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let mut i = from;
    let swar_end = from.saturating_add(SWAR_BYTES);
    while i < swar_end {
        let Some(word) = b.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) else {
            break;
        };
        let x = u64::from_le_bytes(word);
        let found = has_zero(x ^ QUOTES) | has_zero(x ^ BACKSLASHES);
        if found != 0 {
            // The lowest flagged byte is always a true match (false positives only sit above one).
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    Some(i + memchr2(b'"', b'\\', b.get(i..)?)?)
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(c) = b.get(i) {
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        } else {
            break;
        }
    }
    i
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn json_event(data: &str) -> JsonEvent {
        match classify(data.as_bytes()) {
            EventKind::Json(e) => e,
            other => panic!("{data}: {other:?}"),
        }
    }

    /// The slow, obviously right classifier the fast one must agree with.
    fn reference(data: &[u8]) -> EventKind {
        if let Ok(s) = std::str::from_utf8(data)
            && s.trim_matches([' ', '\t', '\n', '\r']) == "[DONE]"
        {
            return EventKind::Done;
        }
        let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(data) else {
            return EventKind::Other;
        };
        let non_empty = |v: Option<&Value>| match v {
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => o
                .values()
                .any(|m| m.as_str().is_some_and(|s| !s.is_empty())),
            _ => false,
        };
        let mut event = JsonEvent::default();
        if let Some(Value::Array(choices)) = top.get("choices") {
            event.choices_empty = choices.is_empty();
            for choice in choices {
                let delta = choice.get("delta");
                let delta_content = delta.is_some_and(|d| {
                    d.is_object()
                        && [
                            "content",
                            "reasoning_content",
                            "reasoning",
                            "refusal",
                            "tool_calls",
                            "function_call",
                        ]
                        .iter()
                        .any(|k| non_empty(d.get(*k)))
                });
                let index = choice
                    .get("index")
                    .and_then(Value::as_u64)
                    .filter(|i| *i < 1_000_000_000);
                if delta_content || non_empty(choice.get("text").filter(|t| t.is_string())) {
                    event.content = true;
                    event.first_choice_content |= index.unwrap_or(0) == 0;
                }
                if let Some(index) = index {
                    event.choices_seen = event.choices_seen.max(index as u32 + 1);
                }
            }
        }
        event.error = !matches!(top.get("error"), None | Some(Value::Null))
            || top.get("object").and_then(Value::as_str) == Some("error");
        event.usage = top.get("usage").map(|u| UsageMember {
            value: match u {
                Value::Null => UsageValue::Null,
                Value::Object(_) => UsageValue::Object,
                _ => UsageValue::Other,
            },
            value_span: 0..0,
            removal: 0..0,
        });
        EventKind::Json(event)
    }

    fn without_spans(kind: EventKind) -> EventKind {
        match kind {
            EventKind::Json(mut e) => {
                if let Some(u) = &mut e.usage {
                    u.value_span = 0..0;
                    u.removal = 0..0;
                }
                EventKind::Json(e)
            }
            other => other,
        }
    }

    #[test]
    fn vllm_content_chunk_carries_content() {
        let e = json_event(
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}"#,
        );
        assert!(e.content);
        assert!(!e.choices_empty);
        assert!(e.usage.is_none());
    }

    #[test]
    fn role_only_empty_and_null_deltas_are_not_tokens() {
        for data in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#,
        ] {
            assert!(!json_event(data).content, "{data}");
        }
    }

    #[test]
    fn whitespace_after_colons_and_reasoning_and_tool_calls_count() {
        assert!(json_event(r#"{ "choices" : [ { "delta" : { "content" : "x" } } ] }"#).content);
        assert!(json_event(r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#).content);
        assert!(json_event(r#"{"choices":[{"delta":{"reasoning":"hm"}}]}"#).content);
        assert!(
            json_event(r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#)
                .content
        );
        assert!(json_event(r#"{"choices":[{"index":0,"text":" the"}]}"#).content);
    }

    #[test]
    fn keys_inside_string_values_are_not_keys() {
        let e = json_event(
            r#"{"choices":[{"delta":{"role":"assistant","name":"\"content\":\"x\"","x":"\"usage\":{\"a\":1}\\"}}]}"#,
        );
        assert!(!e.content);
        assert!(e.usage.is_none());
    }

    #[test]
    fn usage_chunk_and_its_removal_span() {
        let data = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        let e = json_event(data);
        assert!(e.choices_empty);
        let usage = e.usage.clone().unwrap_or_else(|| panic!("usage"));
        assert_eq!(usage.value, UsageValue::Object);
        let value = data.get(usage.value_span.clone()).unwrap_or_default();
        assert_eq!(
            Usage::parse(value.as_bytes()),
            Some(Usage {
                prompt_tokens: Some(7),
                completion_tokens: Some(3)
            })
        );
        let mut stripped = data.to_string();
        stripped.replace_range(usage.removal, "");
        assert_eq!(stripped, r#"{"id":"c","choices":[]}"#);
    }

    #[test]
    fn removing_usage_leaves_valid_json_wherever_it_sits() {
        for (data, expected) in [
            (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
            (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
            (r#"{"usage" : null , "a":1}"#, r#"{"a":1}"#),
            (
                r#"{"a":1, "usage": {"x":[1,{}]} ,"b":2}"#,
                r#"{"a":1 ,"b":2}"#,
            ),
            (r#"{"usage":null}"#, r#"{}"#),
        ] {
            let e = json_event(data);
            let usage = e.usage.unwrap_or_else(|| panic!("{data}"));
            let mut stripped = data.to_string();
            stripped.replace_range(usage.removal, "");
            assert_eq!(stripped, expected, "{data}");
        }
    }

    #[test]
    fn done_and_garbage() {
        assert_eq!(classify(b"[DONE]"), EventKind::Done);
        assert_eq!(classify(b" [DONE] "), EventKind::Done);
        assert_eq!(classify(b"[DONE]x"), EventKind::Other);
        assert_eq!(classify(b""), EventKind::Other);
        assert_eq!(classify(b"{\"choices\":[}"), EventKind::Other);
        assert_eq!(classify(b"{\"a\":1} x"), EventKind::Other);
        assert_eq!(classify(b"{\"a\":\"\\"), EventKind::Other);
        assert_eq!(classify(&[b'['; 100_000]), EventKind::Other);
        assert_eq!(classify(&[b'{'; 100_000]), EventKind::Other);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(classify(deep.as_bytes()), EventKind::Other);
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z \"\\\\:{}\\[\\],é\u{1F600}]{0,8}",
            Just("\"content\":\"x\"".to_string()),
            Just("\\".to_string()),
        ]
    }

    fn arb_field() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            arb_text().prop_map(|t| Some(Value::String(t))),
            proptest::collection::vec(arb_text(), 0..2)
                .prop_map(|v| Some(Value::Array(v.into_iter().map(Value::String).collect()))),
            Just(Some(json!(1))),
        ]
    }

    /// `function_call`'s shape: an object of strings, or anything else a server might send.
    fn arb_call() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            arb_field(),
            (arb_text(), arb_text())
                .prop_map(|(name, arguments)| Some(json!({"name": name, "arguments": arguments}))),
            arb_text().prop_map(|arguments| Some(json!({"arguments": arguments, "n": {"x": "y"}}))),
        ]
    }

    fn arb_choice() -> impl Strategy<Value = Value> {
        (
            (arb_field(), arb_field(), arb_field(), arb_field()),
            (arb_call(), arb_field()),
            arb_field(),
            prop_oneof![
                Just(json!(0)),
                Just(json!(3)),
                Just(json!("1")),
                Just(json!(-1))
            ],
            any::<bool>(),
        )
            .prop_map(
                |(
                    (content, reasoning, tools, text),
                    (call, refusal),
                    role,
                    index,
                    delta_is_object,
                )| {
                    let mut delta = serde_json::Map::new();
                    for (k, v) in [
                        ("content", content),
                        ("reasoning_content", reasoning),
                        ("tool_calls", tools),
                        ("function_call", call),
                        ("refusal", refusal),
                        ("role", role),
                    ] {
                        if let Some(v) = v {
                            delta.insert(k.into(), v);
                        }
                    }
                    let mut choice = serde_json::Map::new();
                    choice.insert("index".into(), index);
                    if delta_is_object {
                        choice.insert("delta".into(), Value::Object(delta));
                    } else {
                        choice.insert("delta".into(), Value::Null);
                    }
                    if let Some(text) = text {
                        choice.insert("text".into(), text);
                    }
                    Value::Object(choice)
                },
            )
    }

    fn arb_event() -> impl Strategy<Value = Value> {
        (
            proptest::option::of(proptest::collection::vec(arb_choice(), 0..3)),
            prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                Just(Some(
                    json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
                )),
                Just(Some(json!("usage"))),
            ],
            prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                Just(Some(json!({"message": "m", "code": 500}))),
                Just(Some(json!({"message": "m", "code": 400, "param": null}))),
                Just(Some(json!({"code": "400"}))),
                Just(Some(json!("Request failed during generation"))),
            ],
            prop_oneof![
                Just(None),
                Just(Some(json!("error"))),
                Just(Some(json!("chat.completion.chunk"))),
                Just(Some(json!({"error": 1}))),
            ],
            arb_text(),
            any::<u8>(),
        )
            .prop_map(|(choices, usage, error, object_kind, id, order)| {
                let mut fields: Vec<(String, Value)> = vec![("id".into(), Value::String(id))];
                if let Some(kind) = object_kind {
                    fields.push(("object".into(), kind));
                }
                if let Some(choices) = choices {
                    fields.push(("choices".into(), Value::Array(choices)));
                }
                if let Some(error) = error {
                    fields.push(("error".into(), error));
                }
                if let Some(usage) = usage {
                    fields.push(("usage".into(), usage));
                }
                let len = fields.len();
                fields.rotate_left(usize::from(order) % len);
                let mut object = serde_json::Map::new();
                for (k, v) in fields {
                    object.insert(k, v);
                }
                Value::Object(object)
            })
    }

    /// Serializes with optional whitespace around the structural characters.
    fn render(value: &Value, spaced: bool) -> String {
        let compact = value.to_string();
        if !spaced {
            return compact;
        }
        serde_json::to_string_pretty(value).unwrap_or(compact)
    }

    proptest! {
        #[test]
        fn fast_classifier_agrees_with_serde(event in arb_event(), spaced in any::<bool>()) {
            let data = render(&event, spaced);
            prop_assert_eq!(without_spans(classify(data.as_bytes())), reference(data.as_bytes()), "{}", data);
        }

        #[test]
        fn removing_usage_keeps_json_valid_and_removes_only_usage(event in arb_event(), spaced in any::<bool>()) {
            let data = render(&event, spaced);
            if let EventKind::Json(JsonEvent { usage: Some(usage), .. }) = classify(data.as_bytes()) {
                let mut stripped = data.clone();
                stripped.replace_range(usage.removal, "");
                let mut expected = event.clone();
                if let Some(o) = expected.as_object_mut() {
                    o.remove("usage");
                }
                prop_assert_eq!(serde_json::from_str::<Value>(&stripped)?, expected);
            }
        }

        #[test]
        fn word_at_a_time_search_finds_the_first_quote_or_backslash(
            bytes in proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), Just(0u8), Just(0x80u8), any::<u8>()], 0..150),
            from in 0usize..160,
        ) {
            let naive = bytes
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, c)| **c == b'"' || **c == b'\\')
                .map(|(i, _)| i);
            prop_assert_eq!(find_quote_or_backslash(&bytes, from), naive);
        }

        #[test]
        fn classifier_never_panics_on_bytes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&data);
        }

        #[test]
        fn classifier_never_panics_on_json_like_bytes(data in "[{}\\[\\]\",:\\\\a-c0-9 ]{0,64}") {
            let _ = classify(data.as_bytes());
        }
    }
}
