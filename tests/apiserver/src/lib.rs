#![forbid(unsafe_code)]
//! flyball's one fake: an in-process Kubernetes API server on loopback.
//!
//! Input: HTTP requests from an ordinary `kube::Client` (plain HTTP on `127.0.0.1`, no TLS, no
//! auth). Output: answers shaped as the real API server gives them (objects with
//! `resourceVersion`, `uid`, `generation`, `managedFields`; failures as `metav1.Status`), plus a
//! log of every request for tests to assert on.
//!
//! request -> record -> route -> injected fault? -> RBAC table -> object store -> answer
//!
//! It serves discovery, the objects flyball touches (Deployments, StatefulSets, HPAs, Leases,
//! Events, CustomResourceDefinitions and the custom resources they declare), the `/status` and
//! `/scale` subresources, merge / strategic / JSON patches, server-side apply, and watches, so
//! `kube::runtime::watcher` and reflectors run against it. It must never answer a request it does
//! not understand with a plausible success: anything it does not implement (streaming lists,
//! watching one object by name, some patch directives) fails loudly with a 500 that says so.
//!
//! Watch follows the real server's watch cache. Every committed change is kept in a history
//! (the last 1,000 by default, see [`ApiServer::set_watch_history`]). A collection `GET` with
//! `watch=true` streams one `{"type":...,"object":...}` line per event on an HTTP 200 chunked
//! body: with `resourceVersion` "" or "0", an ADDED for every current object first; with `N`,
//! every change after `N`, or a single `410 Expired` ERROR event if that history is gone. Then
//! live changes (ADDED, MODIFIED, DELETED, objects as a GET would return them; a change that makes
//! an object leave the `labelSelector` / `fieldSelector` arrives as DELETED), BOOKMARKs every
//! [`ApiServer::set_watch_bookmark_interval`] with `allowWatchBookmarks=true`, until
//! `timeoutSeconds` (30 minutes when absent) or the server stops.
//!
//! [`TestCluster`] runs the same test against a real cluster when `KUBECONFIG` is set.
//!
//! ```text
//! let server = ApiServer::start().await?;
//! server.seed_deployment("default", "vllm", 2, 1)?;        // as the controller left it
//! server.fail_next(Some(Verb::Patch), "/apis/apps/v1/", 2, 500);
//! code_under_test(server.client()).await;                // an ordinary kube::Client
//! let patch = server.requests().into_iter().find(|r| r.method == "PATCH");
//! server.set_ready_replicas("apps/v1", "Deployment", "default", "vllm", 2)?;
//! ```

mod cluster;
mod control;
mod errors;
mod fields;
mod patch;
mod resources;
mod server;
mod store;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;

pub use cluster::TestCluster;
pub use control::{RbacRule, RecordedRequest, Verb, WaitTimeout};
pub use resources::{ResourceType, ScalePaths, ScaleSelector};

use control::{Fault, FaultAction};
use server::Shared;

/// Failures of the fake's own API (starting, seeding), not answers to HTTP requests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the fake API server to 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
    #[error("building a kube client for {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("{url} is not a valid URL: {source}")]
    Url {
        url: String,
        #[source]
        source: axum::http::uri::InvalidUri,
    },
    #[error("inferring a kube client from KUBECONFIG: {0}")]
    Kubeconfig(#[source] kube::Error),
    #[error("{code} {reason}: {message}")]
    Rejected {
        code: u16,
        reason: String,
        message: String,
    },
    #[error("kubernetes API call failed: {0}")]
    Api(#[source] kube::Error),
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl From<errors::ApiError> for Error {
    fn from(e: errors::ApiError) -> Self {
        Error::Rejected {
            code: e.code,
            reason: e.reason.to_string(),
            message: e.message,
        }
    }
}

/// A running fake API server. Dropping it stops the server.
pub struct ApiServer {
    shared: Arc<Shared>,
    client: kube::Client,
    url: String,
    shutdown: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("url", &self.url).finish()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// === impl ApiServer ===

impl ApiServer {
    /// Bind `127.0.0.1:0`, start serving, and build a client for it.
    pub async fn start() -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(Error::Bind)?;
        let addr = listener.local_addr().map_err(Error::Bind)?;
        let shared = Arc::new(Shared::new(addr.to_string()));
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "fake API server stopped");
            }
        });
        let url = format!("http://{addr}");
        let client = Self::client_for(&url)?;
        tracing::debug!(%url, "fake API server listening");
        Ok(Self {
            shared,
            client,
            url,
            shutdown: Some(tx),
        })
    }

    fn config_for(url: &str) -> Result<kube::Config, Error> {
        let uri = url.parse().map_err(|source| Error::Url {
            url: url.to_string(),
            source,
        })?;
        Ok(kube::Config::new(uri))
    }

    fn client_for(url: &str) -> Result<kube::Client, Error> {
        kube::Client::try_from(Self::config_for(url)?).map_err(|source| Error::Client {
            url: url.to_string(),
            source,
        })
    }

    /// A client for this server, configured as `kube::Config::new` does (including kube's
    /// default retry of 429/503/504), like the client flyball builds in a pod.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The configuration behind [`ApiServer::client`], to build a differently tuned client.
    pub fn config(&self) -> Result<kube::Config, Error> {
        Self::config_for(&self.url)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        &self.url
    }

    // --- resources ---

    /// Serve another kind (for example [`ResourceType::leader_worker_set`]).
    pub fn register(&self, rt: ResourceType) {
        self.shared.lock().store.register(rt);
    }

    // --- RBAC ---

    /// The user named in Forbidden messages.
    pub fn set_user(&self, user: &str) {
        self.shared.lock().user = user.to_string();
    }

    /// Deny `verb` on `resource[/subresource]` in `group` from now on (403 Forbidden).
    pub fn deny(&self, verb: Verb, group: &str, resource: &str, subresource: Option<&str>) {
        let resource = match subresource {
            Some(s) => format!("{resource}/{s}"),
            None => resource.to_string(),
        };
        self.shared
            .lock()
            .rbac
            .denied
            .push((verb, group.to_string(), resource));
    }

    /// Allow only what `rules` grant, as a Role bound to the client would.
    pub fn allow_only(&self, rules: impl IntoIterator<Item = RbacRule>) {
        self.shared.lock().rbac.allow_only = Some(rules.into_iter().collect());
    }

    // --- faults ---

    fn push_fault(&self, verb: Option<Verb>, path_prefix: &str, times: usize, action: FaultAction) {
        self.shared.lock().faults.push(Fault {
            verb,
            path_prefix: path_prefix.to_string(),
            remaining: times,
            action,
        });
    }

    /// The next `times` requests for `verb` (any verb when `None`) whose path starts with
    /// `path_prefix` answer `code` (500 InternalError, 503 ServiceUnavailable, 504 Timeout,
    /// 429 TooManyRequests) with a `Status` body, touching no object.
    pub fn fail_next(&self, verb: Option<Verb>, path_prefix: &str, times: usize, code: u16) {
        self.push_fault(verb, path_prefix, times, FaultAction::Status(code));
    }

    /// The next `times` matching requests answer 409 Conflict ("the object has been
    /// modified"), as when another writer won the race.
    pub fn conflict_next(&self, verb: Option<Verb>, path_prefix: &str, times: usize) {
        self.push_fault(verb, path_prefix, times, FaultAction::Conflict);
    }

    /// The next `times` matching requests are held for `delay`, then answered 504 Timeout.
    pub fn stall_next(&self, verb: Option<Verb>, path_prefix: &str, times: usize, delay: Duration) {
        self.push_fault(verb, path_prefix, times, FaultAction::Stall(delay));
    }

    // --- watch ---

    /// Keep only the last `events` changes for watchers (1,000 by default); trims at once. A
    /// watch from a resourceVersion whose changes are gone gets a `410 Expired` ERROR event, and
    /// an open watch that has not yet sent a change that falls out is ended, as the real server
    /// ends a watcher that cannot keep up; its client re-watches and gets the 410.
    pub fn set_watch_history(&self, events: usize) {
        self.shared.lock().store.set_history_limit(events);
        self.shared.notify();
    }

    /// How often watches opened from now on with `allowWatchBookmarks=true` get a BOOKMARK
    /// (60 s by default, as the real watch cache).
    pub fn set_watch_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().watch_bookmark_interval = interval;
    }

    // --- the request log ---

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().log.clone()
    }

    /// Forget the requests so far (for example after seeding through the API).
    pub fn clear_requests(&self) {
        self.shared.lock().log.clear();
    }

    /// Wait until `predicate` holds for the request log, or fail after `timeout` showing the
    /// log. Wakes on every request and answer; never polls on a timer.
    pub async fn wait_for<F>(
        &self,
        predicate: F,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>, WaitTimeout>
    where
        F: Fn(&[RecordedRequest]) -> bool,
    {
        let mut changes = self.shared.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changes.borrow_and_update();
            let snapshot = self.requests();
            if predicate(&snapshot) {
                return Ok(snapshot);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let log: Vec<String> = snapshot
                        .iter()
                        .map(|r| {
                            format!(
                                "{} {}{} -> {:?}",
                                r.method,
                                r.path,
                                r.query
                                    .as_deref()
                                    .map(|q| format!("?{q}"))
                                    .unwrap_or_default(),
                                r.status
                            )
                        })
                        .collect();
                    return Err(WaitTimeout {
                        what: "the request predicate".into(),
                        waited: timeout,
                        seen: snapshot.len(),
                        log: log.join("; "),
                    });
                }
            }
        }
    }

    // --- objects, bypassing HTTP (what controllers and kubectl would have done) ---

    /// Store an object as its controller would have left it, status included; creates its
    /// namespace if needed.
    pub fn seed(&self, object: Value) -> Result<Value, Error> {
        let result = self.shared.lock().store.seed(object);
        self.shared.notify();
        Ok(result?)
    }

    /// A Deployment `name` (label `app: name`) with `replicas` wanted and `ready_replicas`
    /// ready. Zero counters are omitted from status, as the real controller's JSON does.
    pub fn seed_deployment(
        &self,
        namespace: &str,
        name: &str,
        replicas: i32,
        ready_replicas: i32,
    ) -> Result<Value, Error> {
        self.seed(workload(
            "Deployment",
            namespace,
            name,
            replicas,
            ready_replicas,
        ))
    }

    /// A StatefulSet, as [`ApiServer::seed_deployment`].
    pub fn seed_statefulset(
        &self,
        namespace: &str,
        name: &str,
        replicas: i32,
        ready_replicas: i32,
    ) -> Result<Value, Error> {
        self.seed(workload(
            "StatefulSet",
            namespace,
            name,
            replicas,
            ready_replicas,
        ))
    }

    /// The stored object, as a GET would return it.
    pub fn object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let inner = self.shared.lock();
        let rt = inner.store.lookup_kind(api_version, kind)?;
        inner.store.get(&rt, Some(namespace), name).ok()
    }

    /// Replace an object's status, as its controller would (bumps resourceVersion).
    pub fn set_status(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        status: Value,
    ) -> Result<Value, Error> {
        let result = {
            let mut inner = self.shared.lock();
            let rt = inner
                .store
                .lookup_kind(api_version, kind)
                .ok_or_else(|| Error::Rejected {
                    code: 404,
                    reason: "NotFound".into(),
                    message: format!("no resource is registered for {api_version} {kind}"),
                })?;
            inner.store.set_status(&rt, Some(namespace), name, status)
        };
        self.shared.notify();
        Ok(result?)
    }

    /// Set `status.readyReplicas` (and `availableReplicas`) of a workload, as pods becoming
    /// ready would. Zero removes the fields, as `omitempty` does.
    pub fn set_ready_replicas(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        ready_replicas: i32,
    ) -> Result<Value, Error> {
        let current = self
            .object(api_version, kind, namespace, name)
            .ok_or_else(|| Error::Rejected {
                code: 404,
                reason: "NotFound".into(),
                message: format!("{kind} {namespace}/{name} not found"),
            })?;
        let mut status = current.get("status").cloned().unwrap_or_else(|| json!({}));
        if !status.is_object() {
            status = json!({});
        }
        for field in ["readyReplicas", "availableReplicas"] {
            if ready_replicas == 0 {
                if let Value::Object(m) = &mut status {
                    m.remove(field);
                }
            } else {
                status[field] = json!(ready_replicas);
            }
        }
        self.set_status(api_version, kind, namespace, name, status)
    }
}

/// A Deployment or StatefulSet with a pause container, as a controller would report it.
fn workload(kind: &str, namespace: &str, name: &str, replicas: i32, ready: i32) -> Value {
    let mut status = json!({"observedGeneration": 1});
    // StatefulSetStatus.replicas has no omitempty; DeploymentStatus counters all do.
    if replicas != 0 || kind == "StatefulSet" {
        status["replicas"] = json!(replicas);
    }
    if ready != 0 {
        status["readyReplicas"] = json!(ready);
        status["availableReplicas"] = json!(ready);
    }
    let mut spec = json!({
        "replicas": replicas,
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "server", "image": "registry.k8s.io/pause:3.10"}]},
        },
    });
    if kind == "StatefulSet" {
        spec["serviceName"] = json!(name);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
        "status": status,
    })
}
