//! HTTP: path routing, faults, RBAC, and dispatch to the store.
//!
//! request -> record -> route -> injected fault? -> RBAC -> store -> `Status`, object or watch

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;

use crate::control::{Fault, FaultAction, Rbac, RecordedRequest, Verb};
use crate::errors::ApiError;
use crate::resources::{self, ResourceType};
use crate::store::{Caller, PatchKind, Store, parse_body};
use crate::watch::{DEFAULT_BOOKMARK_INTERVAL, Watch, query_flag};

pub(crate) struct Inner {
    pub store: Store,
    pub log: Vec<RecordedRequest>,
    pub faults: Vec<Fault>,
    pub rbac: Rbac,
    pub user: String,
    /// The bookmark interval new watches get.
    pub watch_bookmark_interval: Duration,
    /// Set when the handle is dropped: open watches end.
    pub stopped: bool,
}

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every recorded request and every answer, so waiters re-check.
    pub changes: watch::Sender<u64>,
    pub server_address: String,
}

// === impl Shared ===

impl Shared {
    pub fn new(server_address: String) -> Self {
        Self {
            inner: Mutex::new(Inner {
                store: Store::new(),
                log: Vec::new(),
                faults: Vec::new(),
                rbac: Rbac::default(),
                user: "system:serviceaccount:flyball-system:flyball".into(),
                watch_bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
                stopped: false,
            }),
            changes: watch::Sender::new(0),
            server_address,
        }
    }

    /// A panic while holding the lock (a bug in the fake) must not hide every later request.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// End every open watch; graceful shutdown would otherwise wait for them.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.notify();
    }
}

/// Where a request goes.
#[derive(Clone, Debug)]
enum Route {
    CoreVersions,
    Groups,
    Group(String),
    Resources { group: String, version: String },
    Object(Box<ObjRoute>),
    NotFound,
}

#[derive(Clone, Debug)]
struct ObjRoute {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn route(store: &Store, path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["api"] => Route::CoreVersions,
        ["apis"] => Route::Groups,
        ["api", v] => Route::Resources {
            group: String::new(),
            version: v.to_string(),
        },
        ["apis", g] => Route::Group(g.to_string()),
        ["apis", g, v] => Route::Resources {
            group: g.to_string(),
            version: v.to_string(),
        },
        ["api", v, rest @ ..] => object_route(store, "", v, rest),
        ["apis", g, v, rest @ ..] => object_route(store, g, v, rest),
        _ => Route::NotFound,
    }
}

fn object_route(store: &Store, group: &str, version: &str, rest: &[&str]) -> Route {
    let obj = |rt: ResourceType, ns: Option<&str>, tail: &[&str]| -> Route {
        if tail.len() > 2 {
            return Route::NotFound;
        }
        let sub = tail.get(1).map(|s| s.to_string());
        if let Some(s) = &sub
            && !rt.has_subresource(s)
        {
            return Route::NotFound;
        }
        Route::Object(Box::new(ObjRoute {
            rt,
            namespace: ns.map(str::to_string),
            name: tail.first().map(|s| s.to_string()),
            sub,
        }))
    };
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(rt) = store.lookup(group, version, plural)
        && rt.namespaced
    {
        return obj(rt, Some(ns), tail);
    }
    match rest {
        [plural, tail @ ..] => match store.lookup(group, version, plural) {
            // A namespaced kind without a namespace: only the all-namespaces list exists.
            Some(rt) if rt.namespaced && !tail.is_empty() => Route::NotFound,
            Some(rt) => obj(rt, None, tail),
            None => Route::NotFound,
        },
        [] => Route::NotFound,
    }
}

fn verb_of(method: &Method, route: &Route, query: Option<&str>) -> Verb {
    let named = matches!(route, Route::Object(o) if o.name.is_some());
    let watch = query_param(query, "watch").is_some_and(|v| query_flag(&v));
    match *method {
        Method::GET if watch && matches!(route, Route::Object(_)) => Verb::Watch,
        Method::GET if named || !matches!(route, Route::Object(_)) => Verb::Get,
        Method::GET => Verb::List,
        Method::POST => Verb::Create,
        Method::PUT => Verb::Update,
        Method::PATCH => Verb::Patch,
        Method::DELETE if named => Verb::Delete,
        Method::DELETE => Verb::DeleteCollection,
        _ => Verb::Get,
    }
}

/// An answer: status code, content type, JSON body.
struct Reply {
    code: u16,
    content_type: &'static str,
    body: Value,
}

impl Reply {
    fn ok(code: u16, body: Value) -> Self {
        Self {
            code,
            content_type: "application/json",
            body,
        }
    }

    fn err(e: ApiError) -> Self {
        Self::ok(e.code, e.body())
    }
}

/// What a request gets: one JSON answer, or a watch streamed from the store.
enum Answer {
    Reply(Reply),
    Watch(Box<Watch>),
}

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub(crate) fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    let probe = RecordedRequest {
        method: String::new(),
        path: String::new(),
        query: query.map(str::to_string),
        content_type: None,
        body: None,
        status: None,
        verb: Verb::Get,
        received_at: std::time::Instant::now(),
    };
    probe.query_param(key)
}

pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().map(str::to_string);
    let header = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(header::CONTENT_TYPE);
    let accept = header(header::ACCEPT).unwrap_or_default();
    let user_agent = header(header::USER_AGENT);
    let is_apply = content_type
        .as_deref()
        .is_some_and(|ct| ct.starts_with("application/apply-patch"));
    let parsed_body = if body.is_empty() {
        None
    } else {
        parse_body(&body, is_apply).ok()
    };

    let (index, route, fault) = {
        let mut inner = shared.lock();
        let route = route(&inner.store, &path);
        let verb = verb_of(&method, &route, query.as_deref());
        inner.log.push(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: parsed_body,
            status: None,
            verb,
            received_at: std::time::Instant::now(),
        });
        let index = inner.log.len() - 1;
        let fault = inner
            .faults
            .iter_mut()
            .find(|f| f.matches(verb, &path))
            .map(|f| {
                f.remaining -= 1;
                f.action.clone()
            });
        inner.faults.retain(|f| f.remaining > 0);
        (index, route, fault)
    };
    shared.notify();

    let answer = match fault {
        Some(FaultAction::Stall(d)) => {
            tokio::time::sleep(d).await;
            Answer::Reply(Reply::err(ApiError::injected(504)))
        }
        Some(FaultAction::Status(code)) => Answer::Reply(Reply::err(ApiError::injected(code))),
        Some(FaultAction::Conflict) => Answer::Reply(match &route {
            Route::Object(o) if o.name.is_some() => Reply::err(ApiError::conflict(
                &o.rt,
                o.name.as_deref().unwrap_or_default(),
            )),
            _ => Reply::err(ApiError::injected(409)),
        }),
        None => {
            let mut inner = shared.lock();
            let manager = query_param(query.as_deref(), "fieldManager")
                .or_else(|| {
                    user_agent
                        .as_deref()
                        .and_then(|ua| ua.split('/').next())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "unknown".into());
            let req = Request {
                method: &method,
                route: &route,
                query: query.as_deref(),
                content_type: content_type.as_deref(),
                accept: &accept,
                body: &body,
                caller: Caller { manager },
            };
            dispatch(&mut inner, &shared.server_address, req)
        }
    };

    // As `responsewriters.ErrorNegotiated`: a Status naming a delay carries it as a header too,
    // and that header is what clients (kube's retry layer among them) wait by.
    let mut retry_after = None;
    let (code, content_type, body) = match answer {
        Answer::Reply(reply) => {
            retry_after = reply
                .body
                .pointer("/details/retryAfterSeconds")
                .and_then(Value::as_i64)
                .filter(|&s| s > 0);
            (
                reply.code,
                reply.content_type,
                Body::from(serde_json::to_vec(&reply.body).unwrap_or_default()),
            )
        }
        // Failures after the watch has started travel inside the stream; the status stays 200.
        Answer::Watch(w) => (200, "application/json", w.into_body(shared.clone())),
    };
    {
        let mut inner = shared.lock();
        if let Some(r) = inner.log.get_mut(index) {
            r.status = Some(code);
        }
    }
    shared.notify();

    let mut response = Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, content_type);
    if let Some(seconds) = retry_after {
        response = response.header(header::RETRY_AFTER, seconds.to_string());
    }
    response
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

struct Request<'a> {
    method: &'a Method,
    route: &'a Route,
    query: Option<&'a str>,
    content_type: Option<&'a str>,
    accept: &'a str,
    body: &'a Bytes,
    caller: Caller,
}

fn dispatch(inner: &mut Inner, server_address: &str, req: Request<'_>) -> Answer {
    let wants_aggregated = req.accept.contains("as=APIGroupDiscoveryList");
    let discovery = |v: Option<Value>| match v {
        Some(v) => Reply::ok(200, v),
        None => Reply::err(ApiError::path_not_found()),
    };
    if !matches!(req.route, Route::Object(_)) && *req.method != Method::GET {
        return Answer::Reply(Reply::err(ApiError::method_not_allowed(
            req.method.as_str(),
        )));
    }
    let reply = match req.route {
        Route::CoreVersions if wants_aggregated => Reply {
            code: 200,
            content_type: AGGREGATED,
            body: resources::aggregated(&inner.store.types, true),
        },
        Route::CoreVersions => Reply::ok(200, resources::core_versions(server_address)),
        Route::Groups if wants_aggregated => Reply {
            code: 200,
            content_type: AGGREGATED,
            body: resources::aggregated(&inner.store.types, false),
        },
        Route::Groups => Reply::ok(200, resources::group_list(&inner.store.types)),
        Route::Group(g) => discovery(resources::group(&inner.store.types, g)),
        Route::Resources { group, version } => {
            discovery(resources::resource_list(&inner.store.types, group, version))
        }
        Route::NotFound => Reply::err(ApiError::path_not_found()),
        Route::Object(o) => match object(inner, o, &req) {
            Ok(answer) => return answer,
            Err(e) => Reply::err(e),
        },
    };
    Answer::Reply(reply)
}

fn object(inner: &mut Inner, o: &ObjRoute, req: &Request<'_>) -> Result<Answer, ApiError> {
    let verb = verb_of(req.method, req.route, req.query);
    let resource = match &o.sub {
        Some(s) => format!("{}/{s}", o.rt.plural),
        None => o.rt.plural.clone(),
    };
    if !inner
        .rbac
        .allows(verb, &o.rt.group, &resource, o.name.as_deref())
    {
        return Err(ApiError::forbidden(
            &inner.user,
            verb.as_str(),
            &o.rt,
            o.sub.as_deref(),
            o.namespace.as_deref().filter(|_| o.rt.namespaced),
            o.name.as_deref().unwrap_or(""),
        ));
    }
    if query_param(req.query, "dryRun").is_some() {
        // Persisting a dry run would be a plausible success that is wrong.
        return Err(ApiError::internal(
            "flyball fake apiserver does not implement dryRun",
        ));
    }
    let ns = o.namespace.as_deref();
    if verb == Verb::Watch {
        if o.name.is_some() {
            return Err(ApiError::internal(
                "flyball fake apiserver does not implement watching one object by name; \
                 watch the collection with fieldSelector=metadata.name=NAME",
            ));
        }
        let watch = Watch::start(
            &inner.store,
            &o.rt,
            ns,
            req.query,
            inner.watch_bookmark_interval,
        )?;
        return Ok(Answer::Watch(Box::new(watch)));
    }
    let store = &mut inner.store;
    let body = || parse_body(req.body, false);
    let reply = match (verb, o.name.as_deref()) {
        (Verb::List, None) => store
            .list(
                &o.rt,
                ns,
                query_param(req.query, "labelSelector").as_deref(),
                query_param(req.query, "fieldSelector").as_deref(),
            )
            .map(|v| Reply::ok(200, v)),
        (Verb::Get, Some(name)) => match o.sub.as_deref() {
            Some("scale") => store.get_scale(&o.rt, ns, name),
            _ => store.get(&o.rt, ns, name),
        }
        .map(|v| Reply::ok(200, v)),
        (Verb::Create, None) => store
            .create(&o.rt, ns, body()?, &req.caller)
            .map(|v| Reply::ok(201, v)),
        (Verb::Update, Some(name)) => store
            .replace(&o.rt, ns, name, o.sub.as_deref(), body()?, &req.caller)
            .map(|v| Reply::ok(200, v)),
        (Verb::Patch, Some(name)) => {
            let force = query_param(req.query, "force").as_deref() == Some("true");
            let ct = req.content_type.unwrap_or("");
            let kind = PatchKind::from_content_type(ct, force).ok_or_else(|| {
                ApiError::unsupported_media_type(
                    ct,
                    &[
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/apply-patch+yaml",
                        "application/strategic-merge-patch+json",
                    ],
                )
            })?;
            let is_apply = matches!(kind, PatchKind::Apply { .. });
            if force && !is_apply {
                return Err(ApiError::invalid(
                    "PatchOptions.meta.k8s.io",
                    "meta.k8s.io",
                    "",
                    "force",
                    "Forbidden: may not be specified for non-apply patch".into(),
                ));
            }
            if is_apply && query_param(req.query, "fieldManager").is_none() {
                return Err(ApiError::invalid(
                    "PatchOptions.meta.k8s.io",
                    "meta.k8s.io",
                    "",
                    "fieldManager",
                    "Required value: is required for apply patch".into(),
                ));
            }
            let patch = parse_body(req.body, is_apply)?;
            store
                .patch(&o.rt, ns, name, o.sub.as_deref(), kind, &patch, &req.caller)
                .map(|(code, v)| Reply::ok(code, v))
        }
        (Verb::Delete, Some(name)) if o.sub.is_none() => {
            store.delete(&o.rt, ns, name).map(|v| Reply::ok(200, v))
        }
        (Verb::DeleteCollection, None) => Err(ApiError::internal(
            "flyball fake apiserver does not implement deletecollection",
        )),
        _ => Err(ApiError::method_not_allowed(req.method.as_str())),
    };
    reply.map(Answer::Reply)
}
