//! Watch: the store's change history replayed, then followed live, as newline-delimited JSON.
//!
//! options -> starting point (current objects as ADDED, or history after resourceVersion N)
//! -> live changes and bookmarks -> end at `timeoutSeconds`, on server stop, or when the kind goes
//!
//! Events follow the real watch cache (`cacheWatcher.convertToWatchEvent`): a change that makes
//! an object match the selector arrives as ADDED, one that makes it stop matching as DELETED.
//! Failures found once the watch has started (`resourceVersion` older than the history) are one
//! ERROR event on an HTTP 200 stream, as the real server sends them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::errors::ApiError;
use crate::resources::ResourceType;
use crate::server::{Shared, query_param};
use crate::store::{Change, ChangeType, Selector, Store};

/// The real server picks 30-60 minutes when `timeoutSeconds` is absent or 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How often the real watch cache sends bookmarks.
pub(crate) const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// A query flag as the real server decodes it: anything but `0`, `f` or `false` is true.
pub(crate) fn query_flag(value: &str) -> bool {
    !(value == "0" || value.eq_ignore_ascii_case("f") || value.eq_ignore_ascii_case("false"))
}

/// One open watch: what it selects and what it has yet to send.
pub(crate) struct Watch {
    rt: ResourceType,
    namespace: Option<String>,
    selector: Selector,
    /// Rendered event lines not yet handed to the response body.
    pending: VecDeque<Bytes>,
    /// Every change up to this resourceVersion is in `pending` or did not concern this watch.
    seen_through: u64,
    finished: bool,
    deadline: Instant,
    /// `None` unless the client sent `allowWatchBookmarks=true`.
    bookmark_interval: Option<Duration>,
    next_bookmark: Option<Instant>,
}

// === impl Watch ===

impl Watch {
    /// Check the options of a collection watch and take its starting point, atomically with
    /// every write (the caller holds the server lock).
    pub fn start(
        store: &Store,
        rt: &ResourceType,
        namespace: Option<&str>,
        query: Option<&str>,
        bookmark_interval: Duration,
    ) -> Result<Self, ApiError> {
        let param = |key: &str| query_param(query, key);
        let selector = Selector::parse(
            param("labelSelector").as_deref(),
            param("fieldSelector").as_deref(),
        )?;
        let send_initial_events = param("sendInitialEvents").map(|v| query_flag(&v));
        let version_match = param("resourceVersionMatch").filter(|m| !m.is_empty());
        // apimachinery's validateWatchOptions, in its order.
        let forbidden = match (send_initial_events, version_match.as_deref()) {
            (Some(_), m) if m != Some("NotOlderThan") => {
                Some("sendInitialEvents requires setting resourceVersionMatch to NotOlderThan")
            }
            (None, Some(_)) => Some(
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ),
            _ => None,
        };
        if let Some(rule) = forbidden {
            return Err(ApiError::invalid(
                "ListOptions.meta.k8s.io",
                "meta.k8s.io",
                "",
                "resourceVersionMatch",
                format!("Forbidden: {rule}"),
            ));
        }
        if send_initial_events == Some(true) {
            return Err(ApiError::internal(
                "flyball fake apiserver does not implement sendInitialEvents=true (streaming lists)",
            ));
        }
        let timeout = match param("timeoutSeconds") {
            None => DEFAULT_TIMEOUT,
            Some(s) => match s.parse::<i64>() {
                Ok(0) => DEFAULT_TIMEOUT,
                // A negative timeout has already passed.
                Ok(secs) => Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "strconv.ParseInt: parsing {s:?}: invalid syntax"
                    )));
                }
            },
        };
        let bookmarks = param("allowWatchBookmarks").is_some_and(|v| query_flag(&v));
        let now = Instant::now();
        let mut watch = Self {
            rt: rt.clone(),
            namespace: namespace.filter(|_| rt.namespaced).map(str::to_string),
            selector,
            pending: VecDeque::new(),
            seen_through: store.resource_version(),
            finished: false,
            deadline: now + timeout,
            bookmark_interval: bookmarks.then_some(bookmark_interval),
            next_bookmark: bookmarks.then_some(now + bookmark_interval),
        };
        let resource_version = param("resourceVersion").unwrap_or_default();
        match resource_version.as_str() {
            // Without sendInitialEvents, "" and "0" start with the current state (the legacy
            // contract); with sendInitialEvents=false they start from now.
            "" | "0" if send_initial_events.is_none() => {
                let current: Vec<Bytes> = store
                    .objects_of(rt, namespace)
                    .filter(|o| watch.selector.matches(o))
                    .map(|o| event_line(ChangeType::Added.as_str(), &Store::present(rt, o)))
                    .collect();
                watch.pending.extend(current);
            }
            "" | "0" => {}
            n => {
                let n: u64 = n.parse().map_err(|_| {
                    ApiError::invalid(
                        &rt.qualified(),
                        &rt.group,
                        "",
                        "resourceVersion",
                        format!(
                            "Invalid value: {n:?}: strconv.ParseUint: parsing {n:?}: invalid syntax"
                        ),
                    )
                })?;
                let floor = store.history_floor();
                if n < floor {
                    let expired =
                        ApiError::expired(format!("too old resource version: {n} ({floor})"));
                    watch
                        .pending
                        .push_back(event_line("ERROR", &expired.body()));
                    watch.finished = true;
                } else {
                    watch.seen_through = n;
                    watch.catch_up(store);
                }
            }
        }
        Ok(watch)
    }

    /// Render every change since the last call. A watcher whose unread changes fell out of the
    /// history is ended, as the real server ends a watcher that cannot keep up; its client then
    /// re-watches from its last resourceVersion and gets `410 Expired`.
    fn catch_up(&mut self, store: &Store) {
        if self.seen_through < store.history_floor() {
            self.finished = true;
            return;
        }
        let lines: Vec<Bytes> = store
            .changes_after(self.seen_through)
            .filter_map(|c| self.render(c))
            .collect();
        self.pending.extend(lines);
        self.seen_through = self.seen_through.max(store.resource_version());
        // Removing a CRD ends the watches on its kind, after the deletions of its objects.
        if store
            .lookup(&self.rt.group, &self.rt.version, &self.rt.plural)
            .is_none()
        {
            self.finished = true;
        }
    }

    fn render(&self, change: &Change) -> Option<Bytes> {
        let key = &change.key;
        if key.group != self.rt.group
            || key.plural != self.rt.plural
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != key.namespace)
        {
            return None;
        }
        let matches_now =
            change.change_type != ChangeType::Deleted && self.selector.matches(&change.object);
        let matched_before = change
            .previous
            .as_ref()
            .is_some_and(|p| self.selector.matches(p));
        let (event_type, object) = match (matches_now, matched_before) {
            (false, false) => return None,
            (true, false) => (ChangeType::Added, change.object.clone()),
            (true, true) => (ChangeType::Modified, change.object.clone()),
            (false, true) => {
                // The object as this watcher last saw it, at the change's resourceVersion.
                let mut gone = change.previous.clone().unwrap_or(Value::Null);
                gone["metadata"]["resourceVersion"] = json!(change.resource_version.to_string());
                (ChangeType::Deleted, gone)
            }
        };
        Some(event_line(
            event_type.as_str(),
            &Store::present(&self.rt, &object),
        ))
    }

    fn bookmark(&self) -> Bytes {
        event_line(
            "BOOKMARK",
            &json!({
                "kind": self.rt.kind,
                "apiVersion": self.rt.api_version(),
                "metadata": {"resourceVersion": self.seen_through.to_string()},
            }),
        )
    }

    /// The next line to send, waiting for a change or a bookmark; `None` ends the stream.
    async fn next_line(
        &mut self,
        shared: &Shared,
        changes: &mut watch::Receiver<u64>,
    ) -> Option<Bytes> {
        let mut bookmark_due = false;
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(line);
            }
            if self.finished || Instant::now() >= self.deadline {
                return None;
            }
            // Mark the current generation seen before reading, so a write after the read wakes us.
            changes.borrow_and_update();
            {
                let inner = shared.lock();
                if inner.stopped {
                    return None;
                }
                self.catch_up(&inner.store);
            }
            if bookmark_due && !self.finished {
                // After catching up, so the bookmark never claims a change not yet sent.
                self.pending.push_back(self.bookmark());
                bookmark_due = false;
                self.next_bookmark = self
                    .next_bookmark
                    .zip(self.bookmark_interval)
                    .map(|(at, every)| at + every);
            }
            if !self.pending.is_empty() || self.finished {
                continue;
            }
            let next_bookmark = self.next_bookmark;
            let bookmark_timer = async move {
                match next_bookmark {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changes.changed() => {}
                () = tokio::time::sleep_until(self.deadline) => return None,
                () = bookmark_timer => bookmark_due = true,
            }
        }
    }

    /// The chunked response body: one line per event, sent as it happens.
    pub fn into_body(self, shared: Arc<Shared>) -> Body {
        let changes = shared.changes.subscribe();
        let lines = futures::stream::unfold(
            (self, shared, changes),
            |(mut watch, shared, mut changes)| async move {
                let line = watch.next_line(&shared, &mut changes).await?;
                Some((Ok::<Bytes, Infallible>(line), (watch, shared, changes)))
            },
        );
        Body::from_stream(lines)
    }
}

/// `{"type":...,"object":...}` and a newline, keys in the real server's order.
fn event_line(event_type: &str, object: &Value) -> Bytes {
    Bytes::from(format!(
        "{{\"type\":\"{event_type}\",\"object\":{object}}}\n"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn query_flags_decode_as_the_real_server_does() {
        for truthy in ["true", "1", "True", "t", "yes", ""] {
            assert!(query_flag(truthy), "{truthy:?}");
        }
        for falsy in ["false", "0", "FALSE", "f", "F"] {
            assert!(!query_flag(falsy), "{falsy:?}");
        }
    }

    #[test]
    fn event_lines_put_type_first_and_end_in_a_newline() {
        let line = event_line("ADDED", &json!({"kind": "Lease"}));
        assert_eq!(
            &line[..],
            b"{\"type\":\"ADDED\",\"object\":{\"kind\":\"Lease\"}}\n"
        );
    }
}
