//! Bounded retries around one API call: conflicts retried a few times, transient failures
//! (429, 5xx, broken connections, no answer in time) retried with exponential backoff and
//! jitter, everything else returned at once.
//!
//! `kube::Client` already retries 429/503/504 itself (kube's default `RetryPolicy`); this layer
//! adds 500/502, transport errors, a per-attempt deadline and conflicts, and bounds the whole.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{self, Class, Error, TransientCause};

/// How hard to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all while the answer is 409 Conflict.
    pub conflict_attempts: u32,
    /// Tries in all while the failure is transient.
    pub transient_attempts: u32,
    /// Backoff before the first retry; doubles each time.
    pub base_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
    /// Deadline for one try; past it the try counts as a transient failure.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 5 conflict tries and 4 transient tries, 100 ms doubling to at most 2 s (about 1.5 s of
    /// backoff in the worst case), 10 s per try. A scaling decision is re-made every evaluation,
    /// so giving up soon is cheaper than acting late on old numbers.
    fn default() -> Self {
        Self {
            conflict_attempts: 5,
            transient_attempts: 4,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

/// Backoff before retry number `retry` (1 for the first retry), with `jitter` in `[0, 1)`:
/// half the capped exponential delay, plus up to the other half at random, so that instances
/// retrying together spread out but never wait less than half the delay.
pub fn backoff(policy: &RetryPolicy, retry: u32, jitter: f64) -> Duration {
    let exp = policy.base_backoff.saturating_mul(
        1u32.checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX),
    );
    let capped = exp.min(policy.max_backoff);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    capped / 2 + capped.mul_f64(jitter / 2.0)
}

/// How the retry loop waits; tests inject one that records instead of sleeping.
pub type SleepFn = Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub(crate) fn tokio_sleep() -> SleepFn {
    Arc::new(|d| Box::pin(tokio::time::sleep(d)))
}

/// A jitter source without a dependency: a randomly keyed hash of a counter.
#[derive(Debug)]
pub(crate) struct Jitter {
    state: RandomState,
    counter: AtomicU64,
}

impl Jitter {
    pub fn new() -> Self {
        Self {
            state: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }

    /// Uniform-ish in `[0, 1)`.
    pub fn next(&self) -> f64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // 53 bits: exactly representable in an f64 mantissa.
        (self.state.hash_one(n) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Run `call` until it succeeds, fails for good, or the policy's budget is spent.
/// Returns the value and the number of tries it took.
pub(crate) async fn with_retries<T, F, Fut>(
    target: &str,
    policy: &RetryPolicy,
    sleep: &SleepFn,
    jitter: &Jitter,
    mut call: F,
) -> Result<(T, u32), Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut attempts = 0u32;
    let mut conflicts = 0u32;
    let mut transients = 0u32;
    loop {
        attempts += 1;
        let outcome = tokio::time::timeout(policy.attempt_timeout, call()).await;
        let (retry, class) = match outcome {
            Ok(Ok(value)) => return Ok((value, attempts)),
            Err(_elapsed) => {
                transients += 1;
                if transients >= policy.transient_attempts {
                    return Err(Error::Transient {
                        target: target.to_string(),
                        attempts,
                        source: TransientCause::Timeout(policy.attempt_timeout),
                    });
                }
                tracing::debug!(%target, attempts, "no answer in time; retrying");
                (transients, Class::Transient)
            }
            Ok(Err(e)) => match error::classify(&e) {
                Class::Conflict if conflicts + 1 < policy.conflict_attempts => {
                    conflicts += 1;
                    tracing::debug!(%target, attempts, "conflict; retrying");
                    (conflicts, Class::Conflict)
                }
                Class::Transient if transients + 1 < policy.transient_attempts => {
                    transients += 1;
                    tracing::debug!(%target, attempts, error = %e, "transient failure; retrying");
                    (transients, Class::Transient)
                }
                _ => return Err(error::from_kube(target, attempts, e)),
            },
        };
        let delay = backoff(policy, retry, jitter.next());
        tracing::trace!(%target, ?class, ?delay, "backing off");
        sleep(delay).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_within_half() {
        let p = RetryPolicy {
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        assert_eq!(backoff(&p, 1, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(&p, 2, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(&p, 3, 0.0), Duration::from_millis(200));
        assert_eq!(backoff(&p, 10, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(&p, 1, 0.5), Duration::from_millis(75));
        assert!(backoff(&p, 1, 0.999_999) < Duration::from_millis(100));
        assert_eq!(backoff(&p, 40, 0.5), Duration::from_millis(750));
    }

    #[test]
    fn nonsense_jitter_never_yields_a_longer_wait_than_the_cap() {
        let p = RetryPolicy::default();
        for j in [f64::NAN, f64::INFINITY, -3.0, 7.0] {
            assert!(backoff(&p, 3, j) <= p.max_backoff);
        }
    }

    #[test]
    fn jitter_samples_are_in_the_unit_interval_and_vary() {
        let j = Jitter::new();
        let samples: Vec<f64> = (0..100).map(|_| j.next()).collect();
        assert!(samples.iter().all(|s| (0.0..1.0).contains(s)));
        assert!(samples.windows(2).any(|w| w[0] != w[1]));
    }
}
