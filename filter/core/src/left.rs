//! Report streams a worker gave up on and half-closed, waiting for an answer that may still come.
//!
//! The glue leaves a stream (half-closes it) rather than resetting it when a report goes
//! unanswered past `reportTimeoutMs`: with one request a connection, a reset closes the
//! connection, and the control service reads a closed connection as the gateway gone. Left
//! streams are bounded in number and in time, so that a control service that stalls with its
//! connections open does not collect a stream (and a connection) per report. This is the
//! bookkeeping; the glue half-closes, resets and reads answers.

use std::collections::VecDeque;

use crate::Nanos;

/// Streams a worker keeps waiting: past that the oldest is reset.
pub const MAX_LEFT_STREAMS: usize = 4;

/// How long a left stream waits for the control service's answer before it is reset: above the
/// control service's own give-up on a silent connection (20 s with its defaults), so that, cut
/// off one way, it gives the connection up first and holds for this gateway.
pub const LEFT_STREAM_DEADLINE_NS: Nanos = 60_000_000_000;

/// One stream left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftStream {
    /// The host's token of the stream.
    pub token: u32,
    /// The report given up on, if one was on it: an answer that comes after all still counts.
    pub sequence: Option<u64>,
    /// When it was left, by the monotonic clock: a step of the wall clock must not reset it early.
    pub left_at: Nanos,
}

/// The streams a worker left, oldest first.
#[derive(Debug, Clone, Default)]
pub struct LeftStreams {
    streams: VecDeque<LeftStream>,
}

impl LeftStreams {
    /// Records a stream left at `now`; returns the oldest one when that makes one too many,
    /// which the caller resets.
    pub fn leave(&mut self, token: u32, sequence: Option<u64>, now: Nanos) -> Option<LeftStream> {
        self.streams.push_back(LeftStream {
            token,
            sequence,
            left_at: now,
        });
        if self.streams.len() > MAX_LEFT_STREAMS {
            self.streams.pop_front()
        } else {
            None
        }
    }

    /// Takes the oldest stream if it has waited [`LEFT_STREAM_DEADLINE_NS`] by `now`; the caller
    /// resets it, and asks again.
    pub fn take_expired(&mut self, now: Nanos) -> Option<LeftStream> {
        let oldest = self.streams.front()?;
        if now.saturating_sub(oldest.left_at) >= LEFT_STREAM_DEADLINE_NS {
            self.streams.pop_front()
        } else {
            None
        }
    }

    /// The stream of `token`, if it is one left.
    pub fn get(&self, token: u32) -> Option<&LeftStream> {
        self.streams.iter().find(|left| left.token == token)
    }

    /// The stream of `token` ended (the host lets go of its token): it is no longer waited on,
    /// so never reset. Returns it if it was one left.
    pub fn ended(&mut self, token: u32) -> Option<LeftStream> {
        let at = self.streams.iter().position(|left| left.token == token)?;
        self.streams.remove(at)
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const SECOND: Nanos = 1_000_000_000;

    #[test]
    fn one_stream_too_many_gives_the_oldest_back_to_be_reset() {
        let mut left = LeftStreams::default();
        for token in 1..=MAX_LEFT_STREAMS as u32 {
            assert_eq!(left.leave(token, Some(u64::from(token)), SECOND), None);
        }
        let evicted = left.leave(99, None, 2 * SECOND).unwrap();
        assert_eq!(evicted.token, 1, "the oldest goes first");
        assert_eq!(left.len(), MAX_LEFT_STREAMS);
        assert!(left.get(1).is_none());
        assert_eq!(left.get(99).unwrap().sequence, None);
    }

    #[test]
    fn a_stream_is_reset_once_it_has_waited_the_deadline_and_not_before() {
        let mut left = LeftStreams::default();
        left.leave(1, Some(7), 10 * SECOND);
        left.leave(2, Some(8), 30 * SECOND);
        let first_due = 10 * SECOND + LEFT_STREAM_DEADLINE_NS;
        assert_eq!(left.take_expired(first_due - 1), None);
        assert_eq!(left.take_expired(first_due).unwrap().token, 1);
        assert_eq!(
            left.take_expired(first_due),
            None,
            "the next is not due yet"
        );
        assert_eq!(
            left.take_expired(30 * SECOND + LEFT_STREAM_DEADLINE_NS)
                .unwrap()
                .token,
            2
        );
        assert!(left.is_empty());
    }

    #[test]
    fn a_stream_that_ended_is_never_given_back_to_be_reset() {
        let mut left = LeftStreams::default();
        left.leave(1, Some(7), 0);
        left.leave(2, None, SECOND);
        assert_eq!(left.ended(1).unwrap().sequence, Some(7));
        assert_eq!(left.ended(1), None, "once");
        let second = left.get(2).copied();
        assert_eq!(left.take_expired(Nanos::MAX), second);
        assert_eq!(left.take_expired(Nanos::MAX), None);
        // Nor by the cap: the ended one no longer takes a place.
        let mut left = LeftStreams::default();
        left.leave(1, None, 0);
        left.ended(1);
        for token in 2..=MAX_LEFT_STREAMS as u32 + 1 {
            assert_eq!(left.leave(token, None, 0), None);
        }
    }

    /// The control service gives up a silent connection after its keepalive and its keepalive
    /// timeout, 10 s each by default: a stream cut off one way must wait longer, so that the
    /// control service lets the connection go first and holds for the gateway.
    #[test]
    fn a_left_stream_outwaits_the_control_services_give_up() {
        let control_gives_up = 20 * SECOND;
        assert!(LEFT_STREAM_DEADLINE_NS >= 2 * control_gives_up);
        let mut left = LeftStreams::default();
        left.leave(1, None, 0);
        assert_eq!(left.take_expired(control_gives_up), None);
        assert_eq!(left.take_expired(60 * SECOND).map(|l| l.token), Some(1));
    }

    #[test]
    fn a_clock_read_before_the_stream_was_left_expires_nothing() {
        let mut left = LeftStreams::default();
        left.leave(1, None, 5 * SECOND);
        assert_eq!(left.take_expired(0), None);
    }
}
