//! Ground truth: what the simulator really sent, per request, for tests to hold a gateway's
//! measurements against.
//!
//! A [`Recorder`] follows one request from the handler's first line to the end of its body
//! stream. Times are taken where bytes are handed to hyper (returned from the body stream's
//! `poll_next`), the closest a server gets to "on the wire" without a packet capture. The entry
//! lands in the [`TruthLog`] when the body ends, fails, or is dropped; a drop before the end is
//! a client cancellation.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The whole response was handed to hyper.
    Ok,
    /// The simulator answered with an error status (a knob, or a bad request).
    Error,
    /// The simulator aborted the response on purpose (`x-sim-reset-after-tokens`).
    Reset,
    /// The response was dropped before it ended: the client (or proxy) went away.
    ClientCancelled,
}

/// What the simulator did for one completion request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestTruth {
    /// `x-sim-request-id`, or `sim-<n>` from a per-server counter.
    pub request_id: String,
    pub path: String,
    /// The model the request named (the gateway keys its telemetry by it), or the served name
    /// when it named none.
    pub model: String,
    pub stream: bool,
    pub include_usage_requested: bool,
    pub continuous_usage_requested: bool,
    pub status: u16,
    pub prompt_tokens: u64,
    /// Content tokens the request would have produced had it run to the end.
    pub completion_tokens_planned: u64,
    /// Content tokens whose events were handed to hyper in full.
    pub completion_tokens_sent: u64,
    /// Whether the final usage (usage-only chunk, or `usage` in the JSON body) was handed to hyper.
    pub usage_reported: bool,
    /// Wall-clock time the handler got the request.
    pub received_at_unix_us: u64,
    /// From the handler getting the request to the first content-bearing piece of the body being
    /// handed to hyper: the piece that completes the first event with a token in it. The pieces
    /// of one event go out back to back, so this is microseconds from the event's first byte.
    pub first_content_offset_us: Option<u64>,
    /// From the handler getting the request to the body ending, failing or being dropped.
    pub completed_offset_us: u64,
    pub outcome: Outcome,
}

/// Finished entries, in the order they finished.
#[derive(Debug)]
pub(crate) struct TruthLog {
    entries: Mutex<Vec<RequestTruth>>,
    changed: watch::Sender<u64>,
}

// === impl TruthLog ===

impl Default for TruthLog {
    fn default() -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
            changed: watch::Sender::new(0),
        }
    }
}

impl TruthLog {
    fn push(&self, entry: RequestTruth) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn snapshot(&self) -> Vec<RequestTruth> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn find(&self, request_id: &str) -> Option<RequestTruth> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .find(|e| e.request_id == request_id)
            .cloned()
    }

    /// Waits until an entry for `request_id` is final. Never times out: wrap it.
    pub(crate) async fn wait_for(&self, request_id: &str) -> RequestTruth {
        let mut changed = self.changed.subscribe();
        loop {
            if let Some(entry) = self.find(request_id) {
                return entry;
            }
            // The sender lives as long as `self`, so this cannot fail while we borrow it.
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Follows one request; writes its entry exactly once.
#[derive(Debug)]
pub(crate) struct Recorder {
    log: Arc<TruthLog>,
    received: Instant,
    entry: RequestTruth,
    done: bool,
}

// === impl Recorder ===

impl Recorder {
    pub(crate) fn new(
        log: Arc<TruthLog>,
        received: Instant,
        received_at: SystemTime,
        request_id: String,
        path: String,
    ) -> Self {
        let received_at_unix_us = received_at
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self {
            log,
            received,
            entry: RequestTruth {
                request_id,
                path,
                model: String::new(),
                stream: false,
                include_usage_requested: false,
                continuous_usage_requested: false,
                status: 200,
                prompt_tokens: 0,
                completion_tokens_planned: 0,
                completion_tokens_sent: 0,
                usage_reported: false,
                received_at_unix_us,
                first_content_offset_us: None,
                completed_offset_us: 0,
                outcome: Outcome::Ok,
            },
            done: false,
        }
    }

    pub(crate) fn entry_mut(&mut self) -> &mut RequestTruth {
        &mut self.entry
    }

    fn offset_us(&self) -> u64 {
        u64::try_from(self.received.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// An event's last byte was just handed to hyper.
    pub(crate) fn event_sent(&mut self, content_tokens: u64, final_usage: bool) {
        if content_tokens > 0 {
            if self.entry.first_content_offset_us.is_none() {
                self.entry.first_content_offset_us = Some(self.offset_us());
            }
            self.entry.completion_tokens_sent = self
                .entry
                .completion_tokens_sent
                .saturating_add(content_tokens);
        }
        self.entry.usage_reported |= final_usage;
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// The body ended (or failed); `outcome` says how.
    pub(crate) fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        self.entry.completed_offset_us = self.offset_us();
        self.entry.outcome = outcome;
        tracing::debug!(
            request_id = %self.entry.request_id,
            outcome = ?outcome,
            tokens = self.entry.completion_tokens_sent,
            "request finished"
        );
        self.log.push(self.entry.clone());
    }

    /// The body ended normally: `ok`, or `error` for an error status.
    pub(crate) fn finish_normally(&mut self) {
        let outcome = if self.entry.status >= 400 {
            Outcome::Error
        } else {
            Outcome::Ok
        };
        self.finish(outcome);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish(Outcome::ClientCancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(log: &Arc<TruthLog>, id: &str) -> Recorder {
        Recorder::new(
            log.clone(),
            Instant::now(),
            SystemTime::now(),
            id.to_owned(),
            "/v1/chat/completions".to_owned(),
        )
    }

    #[test]
    fn dropping_an_unfinished_recorder_records_a_client_cancellation() {
        let log = Arc::new(TruthLog::default());
        let mut rec = recorder(&log, "a");
        rec.event_sent(0, false);
        rec.event_sent(2, false);
        drop(rec);
        let entries = log.snapshot();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].outcome, Outcome::ClientCancelled);
        assert_eq!(entries[0].completion_tokens_sent, 2);
        assert!(entries[0].first_content_offset_us.is_some());
    }

    #[test]
    fn a_finished_recorder_writes_its_entry_once() {
        let log = Arc::new(TruthLog::default());
        let mut rec = recorder(&log, "b");
        rec.entry_mut().status = 503;
        rec.finish_normally();
        drop(rec);
        let entries = log.snapshot();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].outcome, Outcome::Error);
        assert_eq!(entries[0].first_content_offset_us, None);
    }

    #[test]
    fn outcome_serializes_in_snake_case() {
        let json =
            serde_json::to_string(&[Outcome::Ok, Outcome::ClientCancelled]).unwrap_or_default();
        assert_eq!(json, r#"["ok","client_cancelled"]"#);
    }

    #[tokio::test]
    async fn wait_for_returns_once_the_entry_lands() {
        let log = Arc::new(TruthLog::default());
        let waiter = tokio::spawn({
            let log = log.clone();
            async move { log.wait_for("late").await }
        });
        recorder(&log, "other").finish(Outcome::Ok);
        // The waiter runs, finds no entry for "late" and waits for one.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "returned before its entry landed");
        recorder(&log, "late").finish(Outcome::Reset);
        let entry = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .ok()
            .and_then(|joined| joined.ok())
            .map(|e| e.outcome);
        assert_eq!(entry, Some(Outcome::Reset));
    }
}
