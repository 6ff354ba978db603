//! The response body: planned events, paced, cut into pieces, timed as hyper takes them.
//!
//! Every piece is its own write and flush: after handing hyper a piece the stream returns
//! `Pending` once (waking itself at once), which makes hyper's HTTP/1 dispatcher flush before it
//! asks for more, and lets the HTTP/2 connection task send the frame. Without that, events that
//! are ready together would leave in one write, and a body error would discard bytes hyper still
//! buffered. With `x-sim-fragment-bytes`, events that are ready together are also cut across
//! their boundaries (the tail of one and the head of the next in one piece); an event never
//! waits for a later one to fill its last piece.

use std::collections::VecDeque;
use std::io;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use futures::stream::{self, BoxStream, StreamExt};

use crate::pacing::Pacer;
use crate::plan::PlannedEvent;
use crate::truth::{Outcome, Recorder};

/// Planned events, each released when its gate opens; then the reset error, if planned.
pub(crate) fn paced_events(
    events: Vec<PlannedEvent>,
    pacer: Option<Pacer>,
    reset: bool,
) -> BoxStream<'static, io::Result<PlannedEvent>> {
    struct State {
        events: VecDeque<PlannedEvent>,
        pacer: Option<Pacer>,
        reset: bool,
    }
    let state = State {
        events: events.into(),
        pacer,
        reset,
    };
    stream::unfold(state, |mut st| async move {
        if let Some(event) = st.events.pop_front() {
            if let Some(pacer) = st.pacer.as_mut() {
                pacer.wait(event.gate).await;
            }
            return Some((Ok(event), st));
        }
        if std::mem::take(&mut st.reset) {
            let err = io::Error::new(
                io::ErrorKind::ConnectionReset,
                "simulated upstream reset (x-sim-reset-after-tokens)",
            );
            return Some((Err(err), st));
        }
        None
    })
    .boxed()
}

/// Metadata of an event whose bytes are (partly) buffered: where it ends in the byte stream.
struct Pending {
    end_offset: u64,
    content_tokens: u64,
    final_usage: bool,
}

/// The body stream handed to axum/hyper.
pub(crate) struct ResponseBody {
    events: BoxStream<'static, io::Result<PlannedEvent>>,
    events_done: bool,
    error: Option<io::Error>,
    fragment_bytes: Option<NonZeroUsize>,
    buffer: BytesMut,
    /// Bytes handed to hyper so far.
    sent_offset: u64,
    /// Events not yet fully handed over, in order.
    pending: VecDeque<Pending>,
    yield_first: bool,
    /// Declared `content-length`: hyper drops the body once that many bytes are out, without
    /// polling it to the end, so reaching it is the end.
    content_length: Option<u64>,
    recorder: Recorder,
}

// === impl ResponseBody ===

impl ResponseBody {
    pub(crate) fn new(
        events: BoxStream<'static, io::Result<PlannedEvent>>,
        fragment_bytes: Option<NonZeroUsize>,
        content_length: Option<u64>,
        recorder: Recorder,
    ) -> Self {
        Self {
            events,
            events_done: false,
            error: None,
            fragment_bytes,
            buffer: BytesMut::new(),
            sent_offset: 0,
            pending: VecDeque::new(),
            // Yielding before the first piece gets the headers flushed on their own, so even a
            // body that fails at once (a reset before any byte) reaches the client as one.
            yield_first: true,
            content_length,
            recorder,
        }
    }

    fn hand_over(&mut self, piece: Bytes) -> Poll<Option<io::Result<Bytes>>> {
        self.sent_offset += piece.len() as u64;
        while let Some(front) = self.pending.front() {
            if front.end_offset > self.sent_offset {
                break;
            }
            let (tokens, usage) = (front.content_tokens, front.final_usage);
            self.pending.pop_front();
            self.recorder.event_sent(tokens, usage);
        }
        if self
            .content_length
            .is_some_and(|len| self.sent_offset >= len)
            && self.error.is_none()
        {
            self.recorder.finish_normally();
        }
        self.yield_first = true;
        Poll::Ready(Some(Ok(piece)))
    }

    /// The next full-size fragment, if the buffer holds one.
    fn ready_piece(&mut self) -> Option<Bytes> {
        let n = self.fragment_bytes?.get();
        (self.buffer.len() >= n).then(|| self.buffer.split_to(n).freeze())
    }
}

impl Stream for ResponseBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.recorder.is_done() {
            return Poll::Ready(None);
        }
        if std::mem::take(&mut this.yield_first) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        loop {
            if let Some(piece) = this.ready_piece() {
                return this.hand_over(piece);
            }
            if this.events_done || this.error.is_some() {
                if !this.buffer.is_empty() {
                    let rest = this.buffer.split().freeze();
                    return this.hand_over(rest);
                }
                return match this.error.take() {
                    Some(err) => {
                        this.recorder.finish(Outcome::Reset);
                        Poll::Ready(Some(Err(err)))
                    }
                    None => {
                        this.recorder.finish_normally();
                        Poll::Ready(None)
                    }
                };
            }
            match this.events.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    this.buffer.extend_from_slice(&event.bytes);
                    let buffered_end = this.sent_offset + this.buffer.len() as u64;
                    this.pending.push_back(Pending {
                        end_offset: buffered_end,
                        content_tokens: event.content_tokens,
                        final_usage: event.final_usage,
                    });
                    if this.fragment_bytes.is_none() {
                        let whole = this.buffer.split().freeze();
                        return this.hand_over(whole);
                    }
                }
                Poll::Ready(Some(Err(err))) => this.error = Some(err),
                Poll::Ready(None) => this.events_done = true,
                Poll::Pending => {
                    // Nothing more is ready: a short last piece goes now rather than wait.
                    if !this.buffer.is_empty() {
                        let rest = this.buffer.split().freeze();
                        return this.hand_over(rest);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Instant, SystemTime};

    use super::*;
    use crate::plan::Gate;
    use crate::truth::TruthLog;

    fn event(text: &str, content_tokens: u64) -> PlannedEvent {
        PlannedEvent {
            gate: Gate::Now,
            bytes: Bytes::copy_from_slice(text.as_bytes()),
            content_tokens,
            final_usage: false,
        }
    }

    fn body(
        events: Vec<PlannedEvent>,
        reset: bool,
        fragment: usize,
        log: &Arc<TruthLog>,
    ) -> ResponseBody {
        let recorder = Recorder::new(
            log.clone(),
            Instant::now(),
            SystemTime::now(),
            "r".to_owned(),
            "/p".to_owned(),
        );
        ResponseBody::new(
            paced_events(events, None, reset),
            NonZeroUsize::new(fragment),
            None,
            recorder,
        )
    }

    async fn drain(mut body: ResponseBody) -> (Vec<Bytes>, Option<io::Error>) {
        let mut pieces = Vec::new();
        while let Some(item) = body.next().await {
            match item {
                Ok(piece) => pieces.push(piece),
                Err(err) => return (pieces, Some(err)),
            }
        }
        (pieces, None)
    }

    fn events() -> Vec<PlannedEvent> {
        vec![
            event("data: role\n\n", 0),
            event("data: é✓\n\n", 1),
            event("data: [DONE]\n\n", 0),
        ]
    }

    #[tokio::test]
    async fn unfragmented_body_hands_over_one_piece_per_event() {
        let log = Arc::new(TruthLog::default());
        let (pieces, err) = drain(body(events(), false, 0, &log)).await;
        assert!(err.is_none());
        let expected: Vec<Bytes> = events().into_iter().map(|e| e.bytes).collect();
        assert_eq!(pieces, expected);
        let truth = log.snapshot();
        assert_eq!(truth[0].outcome, Outcome::Ok);
        assert_eq!(truth[0].completion_tokens_sent, 1);
    }

    #[tokio::test]
    async fn any_fragment_size_concatenates_to_the_same_bytes_in_bounded_pieces() {
        let whole: Vec<u8> = events()
            .into_iter()
            .flat_map(|e| e.bytes.to_vec())
            .collect();
        for n in 1..=whole.len() + 1 {
            let log = Arc::new(TruthLog::default());
            let (pieces, err) = drain(body(events(), false, n, &log)).await;
            assert!(err.is_none());
            assert!(
                pieces.iter().all(|p| !p.is_empty() && p.len() <= n),
                "fragment {n}"
            );
            assert_eq!(pieces.concat(), whole, "fragment {n}");
            assert_eq!(log.snapshot()[0].completion_tokens_sent, 1);
        }
    }

    #[tokio::test]
    async fn reset_flushes_every_planned_byte_then_fails() {
        let log = Arc::new(TruthLog::default());
        let (pieces, err) = drain(body(events(), true, 4, &log)).await;
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
        let whole: Vec<u8> = events()
            .into_iter()
            .flat_map(|e| e.bytes.to_vec())
            .collect();
        assert_eq!(pieces.concat(), whole);
        assert_eq!(log.snapshot()[0].outcome, Outcome::Reset);
    }

    #[tokio::test]
    async fn a_token_counts_as_sent_only_once_its_event_is_complete() {
        let log = Arc::new(TruthLog::default());
        let mut b = body(events(), false, 3, &log);
        // "data: role\n\n" is 12 bytes; "data: é✓\n\n" ends at byte 12 + 13 = 25.
        let mut sent = 0;
        while sent < 24 {
            let next = b.next().await;
            assert!(
                matches!(next, Some(Ok(_))),
                "the body gave {next:?} at byte {sent}"
            );
            sent += next.and_then(Result::ok).map_or(0, |piece| piece.len());
        }
        drop(b);
        let truth = log.snapshot();
        assert_eq!(truth[0].outcome, Outcome::ClientCancelled);
        assert_eq!(truth[0].completion_tokens_sent, 0);
        assert_eq!(truth[0].first_content_offset_us, None);
    }
}
