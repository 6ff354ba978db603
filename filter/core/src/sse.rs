//! Incremental parser for `text/event-stream` bodies that arrive in arbitrary chunks.
//!
//! Grammar (WHATWG HTML, "Server-sent events", section 9.2.5 "Parsing an event stream"):
//!
//! ```text
//! stream        = [ bom ] *event
//! event         = *( comment / field ) end-of-line
//! comment       = colon *any-char end-of-line
//! field         = 1*name-char [ colon [ space ] *any-char ] end-of-line
//! end-of-line   = ( cr lf / cr / lf )
//! ```
//!
//! and its interpretation (section 9.2.6): a blank line dispatches the event if its data buffer
//! is non-empty; a `data` field appends its value and a LF to the data buffer (the final LF is
//! removed at dispatch); one space after the colon is dropped; lines starting with a colon are
//! comments; other fields (`event`, `id`, `retry`) do not matter here; a leading U+FEFF is
//! ignored; an event still incomplete when the stream ends is discarded.
//!
//! Chunks may split anything: a line, a `\r\n` pair, a UTF-8 sequence, the JSON in a data field.
//! The parser copies only what it must carry across chunks (the partial line, and the data of an
//! event not yet complete), bounded by `max_bytes`; an event whose data is one line inside the
//! chunk is handed to the caller as a borrowed slice. Each event comes with its byte range in
//! the current chunk, which is what the response tracker needs to strip it.

use memchr::{memchr, memchr2};
use std::ops::Range;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The data buffer, `data:` lines joined with LF.
    pub data: &'a [u8],
    /// Where `data` lies in the current chunk, when it is one contiguous slice of it (a single
    /// `data:` line inside this chunk).
    pub data_range: Option<Range<usize>>,
    /// Where the event starts in the current chunk; `None` when it began in an earlier chunk.
    pub start: Option<usize>,
    /// Where it ends (exclusive), after the blank line that terminated it.
    pub end: usize,
}

/// What one call to [`SseParser::feed`] saw besides the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeedSummary {
    /// The end of the last blank line in this chunk: everything before it belongs to complete
    /// events (or to blank-line-terminated blocks without data).
    pub last_boundary: Option<usize>,
    /// The chunk started with the LF of a CRLF whose CR ended the previous chunk. That byte
    /// belongs to the previous chunk's last line.
    pub skipped_lf_at_start: bool,
    /// A line or an event's data grew past the bound: parsing has stopped for good.
    pub overflowed: bool,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct SseParser {
    max_bytes: usize,
    /// The partial line carried from earlier chunks.
    line: Vec<u8>,
    /// The event's data buffer when it cannot be borrowed from the chunk.
    data: Vec<u8>,
    /// The event's only data line so far, borrowed from the current chunk.
    data_in_chunk: Option<Range<usize>>,
    has_data: bool,
    /// Lines of the current event were consumed in earlier chunks.
    block_open: bool,
    /// The previous chunk ended with a CR: a LF starting this one completes that line ending.
    skip_lf: bool,
    /// The next line is the stream's first (a BOM may precede it).
    first_line: bool,
    seen_boundary: bool,
    overflowed: bool,
}

// === impl SseParser ===

impl SseParser {
    /// `max_bytes` bounds the carried partial line and the data of one event.
    pub fn new(max_bytes: usize) -> Self {
        SseParser {
            max_bytes,
            line: Vec::new(),
            data: Vec::new(),
            data_in_chunk: None,
            has_data: false,
            block_open: false,
            skip_lf: false,
            first_line: true,
            seen_boundary: false,
            overflowed: false,
        }
    }

    /// Back to the start of a new stream, keeping the buffers' storage.
    pub fn reset(&mut self) {
        self.line.clear();
        self.data.clear();
        *self = SseParser {
            line: std::mem::take(&mut self.line),
            data: std::mem::take(&mut self.data),
            ..SseParser::new(self.max_bytes)
        };
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes carried across chunks right now.
    pub fn carried_bytes(&self) -> usize {
        self.line.len() + self.data.len()
    }

    /// Forgets the incomplete event after the last blank line, as if the bytes after it had never
    /// been fed. The caller must feed those bytes again (the response tracker does, with the next
    /// chunk appended, when it holds back an incomplete event to strip it).
    pub fn rewind_to_last_boundary(&mut self) {
        self.line.clear();
        self.data.clear();
        self.data_in_chunk = None;
        self.has_data = false;
        self.block_open = false;
        self.skip_lf = false;
        if !self.seen_boundary {
            // The bytes to be fed again start at the beginning of the stream.
            self.first_line = true;
        }
    }

    /// Parses one chunk, calling `on_event` for every event it completes, in order.
    pub fn feed<F>(&mut self, chunk: &[u8], mut on_event: F) -> FeedSummary
    where
        F: FnMut(SseEvent<'_>),
    {
        let mut summary = FeedSummary::default();
        if self.overflowed {
            summary.overflowed = true;
            return summary;
        }
        if chunk.is_empty() {
            return summary;
        }
        let mut pos = 0;
        if self.skip_lf {
            self.skip_lf = false;
            if chunk.first() == Some(&b'\n') {
                pos = 1;
                summary.skipped_lf_at_start = true;
            }
        }
        let mut event_start = (!self.block_open && self.line.is_empty()).then_some(pos);

        while pos < chunk.len() {
            let rest = chunk.get(pos..).unwrap_or_default();
            let Some(rel) = memchr2(b'\n', b'\r', rest) else {
                if self.line.len() + rest.len() > self.max_bytes {
                    return self.overflow(summary);
                }
                self.line.extend_from_slice(rest);
                self.block_open = true;
                break;
            };
            let eol = pos + rel;
            let mut next = eol + 1;
            if chunk.get(eol) == Some(&b'\r') {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    None => self.skip_lf = true,
                    Some(_) => {}
                }
            }
            let piece = chunk.get(pos..eol).unwrap_or_default();
            let blank = if self.line.is_empty() {
                let (line, offset) = self.strip_bom(piece, pos);
                let blank = line.is_empty();
                if !blank && !self.field(line, Some(offset), chunk) {
                    return self.overflow(summary);
                }
                blank
            } else {
                if self.line.len() + piece.len() > self.max_bytes {
                    return self.overflow(summary);
                }
                self.line.extend_from_slice(piece);
                let carried = std::mem::take(&mut self.line);
                let (line, _) = self.strip_bom(&carried, 0);
                let blank = line.is_empty();
                let ok = blank || self.field(line, None, chunk);
                self.line = carried;
                self.line.clear();
                if !ok {
                    return self.overflow(summary);
                }
                blank
            };
            pos = next;
            if blank {
                if self.has_data {
                    let (data, data_range) = match &self.data_in_chunk {
                        Some(r) => (chunk.get(r.clone()).unwrap_or_default(), Some(r.clone())),
                        None => (self.data.as_slice(), None),
                    };
                    on_event(SseEvent {
                        data,
                        data_range,
                        start: event_start,
                        end: pos,
                    });
                }
                self.data.clear();
                self.data_in_chunk = None;
                self.has_data = false;
                self.block_open = false;
                self.seen_boundary = true;
                summary.last_boundary = Some(pos);
                event_start = Some(pos);
            } else {
                self.block_open = true;
            }
        }

        // The chunk goes away: an event still open keeps a copy of its borrowed data.
        if let Some(r) = self.data_in_chunk.take() {
            let borrowed = chunk.get(r).unwrap_or_default();
            if self.data.len() + borrowed.len() > self.max_bytes {
                return self.overflow(summary);
            }
            self.data.extend_from_slice(borrowed);
        }
        summary
    }

    fn strip_bom<'l>(&mut self, line: &'l [u8], offset: usize) -> (&'l [u8], usize) {
        if std::mem::replace(&mut self.first_line, false)
            && let Some(rest) = line.strip_prefix(BOM)
        {
            return (rest, offset + BOM.len());
        }
        (line, offset)
    }

    /// Interprets one non-blank line; `offset` is where it lies in `chunk` when it is a slice of
    /// it. Returns false when the data buffer would outgrow the bound.
    fn field(&mut self, line: &[u8], offset: Option<usize>, chunk: &[u8]) -> bool {
        if line.first() == Some(&b':') {
            return true;
        }
        let (name, value_at) = match memchr(b':', line) {
            Some(colon) => {
                let space = usize::from(line.get(colon + 1) == Some(&b' '));
                (line.get(..colon).unwrap_or_default(), colon + 1 + space)
            }
            None => (line, line.len()),
        };
        if name != b"data" {
            return true;
        }
        let value = line.get(value_at..).unwrap_or_default();
        if !self.has_data {
            self.has_data = true;
            match offset {
                Some(offset) => self.data_in_chunk = Some(offset + value_at..offset + line.len()),
                None => {
                    if value.len() > self.max_bytes {
                        return false;
                    }
                    self.data.extend_from_slice(value);
                }
            }
            return true;
        }
        if let Some(r) = self.data_in_chunk.take() {
            self.data
                .extend_from_slice(chunk.get(r).unwrap_or_default());
        }
        if self.data.len() + 1 + value.len() > self.max_bytes {
            return false;
        }
        self.data.push(b'\n');
        self.data.extend_from_slice(value);
        true
    }

    fn overflow(&mut self, mut summary: FeedSummary) -> FeedSummary {
        self.overflowed = true;
        self.line.clear();
        self.data.clear();
        self.data_in_chunk = None;
        summary.overflowed = true;
        summary
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Seen {
        data: Vec<u8>,
        /// Absolute stream offsets of the event, when known.
        range: Range<usize>,
    }

    /// Feeds `chunks` and returns every event with its absolute byte range.
    fn parse(chunks: &[&[u8]], max: usize) -> (Vec<Seen>, bool) {
        let mut parser = SseParser::new(max);
        let mut seen = Vec::new();
        let mut base = 0;
        let mut open_start = 0;
        let mut overflowed = false;
        for chunk in chunks {
            let summary = parser.feed(chunk, |ev| {
                let start = ev.start.map_or(open_start, |s| base + s);
                if let Some(r) = &ev.data_range {
                    assert_eq!(chunk.get(r.clone()), Some(ev.data));
                }
                seen.push(Seen {
                    data: ev.data.to_vec(),
                    range: start..base + ev.end,
                });
                open_start = base + ev.end;
            });
            if summary.skipped_lf_at_start {
                // That LF ended the previous chunk's last line: credit it to the event it closed.
                if let Some(prev) = seen.iter_mut().rev().find(|s| s.range.end == base) {
                    prev.range.end += 1;
                }
                if open_start == base {
                    open_start = base + 1;
                }
            }
            if let Some(b) = summary.last_boundary {
                open_start = base + b;
            }
            overflowed |= summary.overflowed;
            base += chunk.len();
        }
        (seen, overflowed)
    }

    fn datas(chunks: &[&[u8]]) -> Vec<String> {
        parse(chunks, 1 << 20)
            .0
            .into_iter()
            .map(|s| String::from_utf8_lossy(&s.data).into_owned())
            .collect()
    }

    #[test]
    fn events_with_and_without_the_space_and_every_line_ending() {
        assert_eq!(
            datas(&[b"data: a\n\ndata:b\r\n\r\ndata: c\r\rdata:  d\n\n"]),
            vec!["a", "b", "c", " d"]
        );
    }

    #[test]
    fn comments_other_fields_and_empty_blocks_dispatch_nothing() {
        assert_eq!(
            datas(&[b": ping\n\nevent: x\nid: 3\nretry: 10\n\n\n\ndata\n\n"]),
            vec![""]
        );
    }

    #[test]
    fn multi_line_data_joins_with_lf() {
        assert_eq!(datas(&[b"data: a\ndata:\ndata: b\n\n"]), vec!["a\n\nb"]);
    }

    #[test]
    fn a_leading_bom_is_ignored_even_when_split() {
        assert_eq!(datas(&[b"\xEF\xBB", b"\xBFdata: a\n\n"]), vec!["a"]);
        assert_eq!(
            datas(&[b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n"]).len(),
            1
        );
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_ending() {
        let (seen, _) = parse(&[b"data: a\r\n\r", b"\ndata: b\r\n\r\n"], 1 << 20);
        assert_eq!(seen.len(), 2);
        // The LF after the split is the first event's last byte (the helper credits it).
        assert_eq!(seen[0].range, 0..11);
        assert_eq!(seen[1].range, 11..22);
    }

    #[test]
    fn an_incomplete_event_at_the_end_is_not_dispatched() {
        assert_eq!(datas(&[b"data: a\n\ndata: b\n"]), vec!["a"]);
    }

    #[test]
    fn ranges_cover_the_event_bytes() {
        let stream = b": hi\n\ndata: a\n\ndata: b\r\n\r\n";
        let (seen, _) = parse(&[stream], 1 << 20);
        assert_eq!(seen[0].range, 6..15);
        assert_eq!(seen[1].range, 15..stream.len());
    }

    #[test]
    fn an_overlong_line_overflows_and_stops_parsing() {
        let (seen, overflowed) = parse(&[b"data: 0123456789", b"0123456789\n\ndata: x\n\n"], 16);
        assert!(overflowed);
        assert!(seen.is_empty());
        let (_, overflowed) = parse(&[b"data: 0123\ndata: 0123\ndata: 0123\ndata: 0123\n\n"], 16);
        assert!(overflowed);
    }

    #[test]
    fn single_line_events_inside_a_chunk_are_borrowed_not_copied() {
        let mut parser = SseParser::new(1024);
        let mut borrowed = 0;
        parser.feed(b"data: a\n\ndata: b\n\ndata: c", |ev| {
            borrowed += usize::from(ev.data_range.is_some());
        });
        assert_eq!(borrowed, 2);
        // Only the partial last line is carried.
        assert_eq!(parser.carried_bytes(), b"data: c".len());
    }

    #[test]
    fn rewinding_and_feeding_again_gives_the_same_events() {
        let mut parser = SseParser::new(1024);
        let mut seen = Vec::new();
        let first = b"data: a\n\ndata: b\r";
        let s = parser.feed(first, |ev| seen.push(ev.data.to_vec()));
        let held = first
            .get(s.last_boundary.unwrap_or(0)..)
            .unwrap_or_default()
            .to_vec();
        parser.rewind_to_last_boundary();
        let mut again = held;
        again.extend_from_slice(b"\n\r\n");
        parser.feed(&again, |ev| {
            assert_eq!(ev.start, Some(0));
            seen.push(ev.data.to_vec());
        });
        assert_eq!(seen, vec![b"a".to_vec(), b"b".to_vec()]);
    }

    fn arb_stream() -> impl Strategy<Value = (Vec<u8>, Vec<String>)> {
        let eol = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        let line = prop_oneof![
            "[a-z{}\":, é\u{1F600}]{0,10}".prop_map(|v| format!("data: {v}")),
            "[a-z{}\":, ]{0,10}".prop_map(|v| format!("data:{v}")),
            "[a-z ]{0,10}".prop_map(|v| format!(":{v}")),
            Just("event: message".to_string()),
        ];
        proptest::collection::vec(
            (proptest::collection::vec((line, eol.clone()), 0..4), eol),
            0..6,
        )
        .prop_map(|events| {
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            for (lines, end) in events {
                let mut data: Option<String> = None;
                for (line, eol) in &lines {
                    bytes.extend_from_slice(line.as_bytes());
                    bytes.extend_from_slice(eol.as_bytes());
                    let value = line
                        .strip_prefix("data: ")
                        .or_else(|| line.strip_prefix("data:"));
                    if let Some(v) = value {
                        data = Some(match data {
                            Some(d) => format!("{d}\n{v}"),
                            None => v.to_string(),
                        });
                    }
                }
                // A CR that ends the last line followed by a LF as the blank line would read as
                // one CRLF: keep the generated stream unambiguous.
                let last_cr = lines.last().is_some_and(|(_, e)| *e == "\r");
                let end = if last_cr && end == "\n" { "\r" } else { end };
                bytes.extend_from_slice(end.as_bytes());
                if let Some(d) = data {
                    expected.push(d);
                }
            }
            (bytes, expected)
        })
    }

    fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts {
            out.push(bytes.get(at..c).unwrap_or_default().to_vec());
            at = c;
        }
        out.push(bytes.get(at..).unwrap_or_default().to_vec());
        out
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_events_and_ranges(
            (bytes, expected) in arb_stream(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let (whole, _) = parse(&[&bytes], 1 << 20);
            let got: Vec<String> = whole.iter().map(|s| String::from_utf8_lossy(&s.data).into_owned()).collect();
            prop_assert_eq!(&got, &expected);
            let chunks = split(&bytes, &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let (pieces, _) = parse(&refs, 1 << 20);
            prop_assert_eq!(pieces, whole);
        }

        #[test]
        fn parser_never_panics(
            bytes in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b':'), Just(b' '), any::<u8>()], 0..200),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            max in 1usize..64,
        ) {
            let chunks = split(&bytes, &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let _ = parse(&refs, max);
        }
    }
}
