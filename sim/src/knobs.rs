//! Per-request knobs, read from `x-sim-*` request headers.
//!
//! Headers, because the gateway filter under test rewrites bodies at most and never headers, so a
//! test can script the upstream's behaviour through the proxy. Every knob is optional; a malformed
//! one is a 400 that names the header, the value and the rule.

use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};

/// Header names, in one place so docs, tests and the parser agree.
pub mod header {
    /// Ground-truth key; also the response id (`chatcmpl-<id>` / `cmpl-<id>`) and the token seed.
    pub const REQUEST_ID: &str = "x-sim-request-id";
    /// Delay from request receipt to the first content token, in ms. Either timing knob takes
    /// the request out of the engine model's batch; the other one then defaults to the value of
    /// an idle engine (`unloaded_ttft`, `decode_step_time(1)`).
    pub const TTFT_MS: &str = "x-sim-ttft-ms";
    /// Gap between content tokens, in ms (see [`TTFT_MS`] for what it does to batching).
    pub const ITL_MS: &str = "x-sim-itl-ms";
    /// Content tokens to generate (default: `max_completion_tokens`, `max_tokens`, else 16, cut
    /// to what the context has left). Like `max_tokens`, the prompt plus this must fit the
    /// context.
    pub const OUTPUT_TOKENS: &str = "x-sim-output-tokens";
    /// Content tokens packed into one SSE event (default 1).
    pub const TOKENS_PER_EVENT: &str = "x-sim-tokens-per-event";
    /// Write the body in pieces of at most N bytes, each its own write and flush.
    pub const FRAGMENT_BYTES: &str = "x-sim-fragment-bytes";
    /// `crlf` ends SSE lines with `\r\n` instead of `\n`.
    pub const LINE_ENDING: &str = "x-sim-line-ending";
    /// `1` sends an SSE comment (`: keep-alive`) right after the role chunk, before any token.
    pub const COMMENT: &str = "x-sim-comment";
    /// Reply this status (400..=599) at once, with an OpenAI-style error body.
    pub const ERROR: &str = "x-sim-error";
    /// Abort the response after at most N content tokens (an upstream reset, as a proxy sees it).
    pub const RESET_AFTER_TOKENS: &str = "x-sim-reset-after-tokens";
    /// The `created` field, in unix seconds (default: now).
    pub const CREATED: &str = "x-sim-created";
    /// `1` omits usage everywhere, as servers that predate `stream_options` do.
    pub const NO_USAGE: &str = "x-sim-no-usage";
    /// `1` holds the chat role chunk back until the first token is ready, as vLLM itself does;
    /// by default it goes out at once, so a gateway that mistakes it for a token is caught.
    pub const ROLE_WITH_FIRST_TOKEN: &str = "x-sim-role-with-first-token";
}

/// How SSE lines end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum LineEnding {
    #[default]
    Lf,
    CrLf,
}

/// The parsed knobs of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Knobs {
    pub request_id: Option<String>,
    pub ttft: Option<Duration>,
    pub itl: Option<Duration>,
    pub output_tokens: Option<u64>,
    pub tokens_per_event: NonZeroU64,
    pub fragment_bytes: Option<NonZeroUsize>,
    pub line_ending: LineEnding,
    pub comment: bool,
    pub error_status: Option<StatusCode>,
    pub reset_after_tokens: Option<u64>,
    pub created_unix_s: Option<u64>,
    pub no_usage: bool,
    pub role_with_first_token: bool,
}

/// A knob header that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {header} = {value:?}: {rule}")]
pub(crate) struct KnobError {
    pub header: &'static str,
    pub value: String,
    pub rule: &'static str,
}

// === impl Knobs ===

impl Default for Knobs {
    fn default() -> Self {
        Self {
            request_id: None,
            ttft: None,
            itl: None,
            output_tokens: None,
            tokens_per_event: NonZeroU64::MIN,
            fragment_bytes: None,
            line_ending: LineEnding::Lf,
            comment: false,
            error_status: None,
            reset_after_tokens: None,
            created_unix_s: None,
            no_usage: false,
            role_with_first_token: false,
        }
    }
}

impl Knobs {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Self, KnobError> {
        let read = Reader(headers);
        let request_id = match read.text(header::REQUEST_ID)? {
            Some("") => {
                return Err(KnobError {
                    header: header::REQUEST_ID,
                    value: String::new(),
                    rule: "must not be empty",
                });
            }
            other => other.map(str::to_owned),
        };
        let tokens_per_event = match read.number(header::TOKENS_PER_EVENT)? {
            None => NonZeroU64::MIN,
            Some(n) => NonZeroU64::new(n)
                .ok_or_else(|| read.bad(header::TOKENS_PER_EVENT, "must be >= 1"))?,
        };
        let fragment_bytes = match read.number(header::FRAGMENT_BYTES)? {
            None => None,
            Some(n) => Some(
                usize::try_from(n)
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .ok_or_else(|| read.bad(header::FRAGMENT_BYTES, "must be >= 1"))?,
            ),
        };
        let line_ending = match read.text(header::LINE_ENDING)? {
            None => LineEnding::Lf,
            Some(v) if v.eq_ignore_ascii_case("lf") => LineEnding::Lf,
            Some(v) if v.eq_ignore_ascii_case("crlf") => LineEnding::CrLf,
            Some(_) => return Err(read.bad(header::LINE_ENDING, "must be `lf` or `crlf`")),
        };
        let error_status = match read.number(header::ERROR)? {
            None => None,
            Some(n) => Some(
                u16::try_from(n)
                    .ok()
                    .filter(|n| (400..=599).contains(n))
                    .and_then(|n| StatusCode::from_u16(n).ok())
                    .ok_or_else(|| {
                        read.bad(header::ERROR, "must be an HTTP status in 400..=599")
                    })?,
            ),
        };
        Ok(Self {
            request_id,
            ttft: read.number(header::TTFT_MS)?.map(Duration::from_millis),
            itl: read.number(header::ITL_MS)?.map(Duration::from_millis),
            output_tokens: read.number(header::OUTPUT_TOKENS)?,
            tokens_per_event,
            fragment_bytes,
            line_ending,
            comment: read.flag(header::COMMENT)?,
            error_status,
            reset_after_tokens: read.number(header::RESET_AFTER_TOKENS)?,
            created_unix_s: read.number(header::CREATED)?,
            no_usage: read.flag(header::NO_USAGE)?,
            role_with_first_token: read.flag(header::ROLE_WITH_FIRST_TOKEN)?,
        })
    }

    /// Whether the request scripts its own timing instead of joining the engine's batch.
    pub(crate) fn scripts_timing(&self) -> bool {
        self.ttft.is_some() || self.itl.is_some()
    }
}

// === impl LineEnding ===

impl LineEnding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LineEnding::Lf => "\n",
            LineEnding::CrLf => "\r\n",
        }
    }
}

struct Reader<'a>(&'a HeaderMap);

// === impl Reader ===

impl Reader<'_> {
    /// Every value of `name`, comma-joined (a knob given twice shows both).
    fn raw(&self, name: &'static str) -> String {
        self.0
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn bad(&self, name: &'static str, rule: &'static str) -> KnobError {
        KnobError {
            header: name,
            value: self.raw(name),
            rule,
        }
    }

    fn text(&self, name: &'static str) -> Result<Option<&str>, KnobError> {
        // A repeated knob is refused rather than one value picked: a test that sets a knob on
        // top of a default it forgot about would otherwise run a workload it did not plan.
        if self.0.get_all(name).iter().nth(1).is_some() {
            return Err(self.bad(name, "must be given once"));
        }
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.trim()))
                .map_err(|_| self.bad(name, "must be visible ASCII")),
        }
    }

    fn number(&self, name: &'static str) -> Result<Option<u64>, KnobError> {
        match self.text(name)? {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| self.bad(name, "must be a non-negative integer")),
        }
    }

    fn flag(&self, name: &'static str) -> Result<bool, KnobError> {
        match self.text(name)? {
            None => Ok(false),
            Some("1" | "true") => Ok(true),
            Some("0" | "false") => Ok(false),
            Some(_) => Err(self.bad(name, "must be 1, 0, true or false")),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(v) = HeaderValue::from_str(value) {
                map.insert(*name, v);
            }
        }
        map
    }

    #[test]
    fn a_knob_given_twice_is_refused_naming_both_values() {
        let mut map = headers(&[(header::OUTPUT_TOKENS, "22")]);
        map.append(header::OUTPUT_TOKENS, HeaderValue::from_static("400"));
        assert_eq!(
            Knobs::from_headers(&map).map_err(|e| e.to_string()),
            Err("header x-sim-output-tokens = \"22, 400\": must be given once".to_owned())
        );
    }

    #[test]
    fn no_headers_means_default_knobs() {
        assert_eq!(Knobs::from_headers(&HeaderMap::new()), Ok(Knobs::default()));
    }

    #[test]
    fn every_knob_is_read_from_its_header() {
        let knobs = Knobs::from_headers(&headers(&[
            (header::REQUEST_ID, "r-1"),
            (header::TTFT_MS, "250"),
            (header::ITL_MS, "20"),
            (header::OUTPUT_TOKENS, "7"),
            (header::TOKENS_PER_EVENT, "3"),
            (header::FRAGMENT_BYTES, "5"),
            (header::LINE_ENDING, "CRLF"),
            (header::COMMENT, "1"),
            (header::ERROR, "503"),
            (header::RESET_AFTER_TOKENS, "2"),
            (header::CREATED, "1700000000"),
            (header::NO_USAGE, "true"),
            (header::ROLE_WITH_FIRST_TOKEN, "1"),
        ]));
        assert_eq!(
            knobs,
            Ok(Knobs {
                request_id: Some("r-1".to_owned()),
                ttft: Some(Duration::from_millis(250)),
                itl: Some(Duration::from_millis(20)),
                output_tokens: Some(7),
                tokens_per_event: NonZeroU64::new(3).unwrap_or(NonZeroU64::MIN),
                fragment_bytes: NonZeroUsize::new(5),
                line_ending: LineEnding::CrLf,
                comment: true,
                error_status: Some(StatusCode::SERVICE_UNAVAILABLE),
                reset_after_tokens: Some(2),
                created_unix_s: Some(1_700_000_000),
                no_usage: true,
                role_with_first_token: true,
            })
        );
    }

    #[test]
    fn malformed_knobs_name_the_header_value_and_rule() {
        let err = |pairs: &[(&'static str, &str)]| {
            Knobs::from_headers(&headers(pairs))
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(
            err(&[(header::ITL_MS, "fast")]).as_deref(),
            Some("header x-sim-itl-ms = \"fast\": must be a non-negative integer")
        );
        assert_eq!(
            err(&[(header::ERROR, "200")]).as_deref(),
            Some("header x-sim-error = \"200\": must be an HTTP status in 400..=599")
        );
        assert_eq!(
            err(&[(header::FRAGMENT_BYTES, "0")]).as_deref(),
            Some("header x-sim-fragment-bytes = \"0\": must be >= 1")
        );
        assert_eq!(
            err(&[(header::COMMENT, "yes")]).as_deref(),
            Some("header x-sim-comment = \"yes\": must be 1, 0, true or false")
        );
    }
}
