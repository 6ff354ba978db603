//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flyball_apiserver::RecordedRequest;
use flyball_k8s::{RetryPolicy, SleepFn};

/// Generous bound for waits that normally finish in milliseconds.
pub const WAIT: Duration = Duration::from_secs(10);

/// A sleep that records what it was asked to wait and returns at once, so retries are
/// asserted on exactly and cost no time.
#[derive(Clone, Default)]
pub struct RecordedSleeps(Arc<Mutex<Vec<Duration>>>);

impl RecordedSleeps {
    pub fn sleep_fn(&self) -> SleepFn {
        let log = self.0.clone();
        Arc::new(move |d| {
            log.lock().unwrap().push(d);
            Box::pin(async {})
        })
    }

    pub fn taken(&self) -> Vec<Duration> {
        self.0.lock().unwrap().clone()
    }
}

/// The default policy with a short per-try deadline, for tests that stall the server.
pub fn policy() -> RetryPolicy {
    RetryPolicy {
        attempt_timeout: Duration::from_secs(1),
        ..RetryPolicy::default()
    }
}

/// `(method, path)` of each request, for exact sequence assertions.
pub fn calls(reqs: &[RecordedRequest]) -> Vec<(String, String)> {
    reqs.iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect()
}

pub fn call(method: &str, path: &str) -> (String, String) {
    (method.to_string(), path.to_string())
}
