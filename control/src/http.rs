//! The HTTP side: `/metrics`, `/healthz`, `/readyz`, `GET /v1/pools` and `GET /v1/decisions`.
//!
//! `/v1/pools` is the service's state at a glance, one entry per pool:
//!
//! ```json
//! {"pools":[{"name":"llama","namespace":"default","autoscaler":"llama","role":"unified",
//!   "requests":120,"errors":2,"input_tokens":4800,"output_tokens":36000,
//!   "ttft_ms":{"p50":180.2,"p95":420.0,"p99":610.5},"tpot_ms":{"p50":21.0,"p95":30.1,"p99":35.9},
//!   "in_flight":7,"replicas":{"current":2,"ready":2,"desired":3},
//!   "last_decision":{"at":"2025-01-31T12:00:00.250Z","from":2,"to":3,"reason":"..."}}],
//!  "leading":true}
//! ```
//!
//! Request, error and token counts are totals since the service started; quantiles cover the short
//! window and are `null` without samples; replica counts are `null` until first read. `leading` is
//! there with leader election only: a follower's decisions are what it would do, never applied. A
//! pool's `warnings` (absent when empty) say what the actuator found, e.g. an HPA on the target.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flyball_sketch::Sketch;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{LiveConfig, PoolDef};
use crate::controller::{DecisionRecord, Status};
use crate::ingest::Telemetry;
use crate::metrics::Metrics;

/// What the handlers read.
#[derive(Debug)]
pub struct AppState {
    pub config: Arc<LiveConfig>,
    pub telemetry: Arc<Telemetry>,
    pub status: Arc<Status>,
    pub metrics: Metrics,
    /// Set once the gRPC server is serving.
    pub serving: AtomicBool,
    /// Set once the autoscalers are known (at once from a file; after the first list of
    /// FlyballAutoscalers with `--source kubernetes`).
    pub configured: AtomicBool,
    /// Whether this replica leads; `None` without leader election.
    pub leading: Option<tokio::sync::watch::Receiver<bool>>,
}

/// `GET /v1/pools`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolsResponse {
    pub pools: Vec<PoolEntry>,
    /// Whether this replica sets replicas (holds the leader Lease); absent without leader
    /// election. A follower's decisions are what it would do, never applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leading: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolEntry {
    pub name: String,
    /// The scale target's namespace: with `name`, what identifies the pool.
    pub namespace: String,
    pub autoscaler: String,
    pub role: String,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub ttft_ms: Quantiles,
    pub tpot_ms: Quantiles,
    pub in_flight: u64,
    pub replicas: Replicas,
    pub last_decision: Option<LastDecision>,
    /// e.g. a HorizontalPodAutoscaler scales the same target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Replicas {
    pub current: Option<u32>,
    pub ready: Option<u32>,
    pub desired: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastDecision {
    pub at: String,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// `GET /v1/decisions[?pool=NAME[&namespace=NS]]`: each pool's decision log, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionsResponse {
    pub pools: Vec<PoolDecisions>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolDecisions {
    pub name: String,
    pub namespace: String,
    pub autoscaler: String,
    pub role: String,
    pub decisions: Vec<DecisionRecord>,
}

#[derive(Debug, Deserialize)]
pub struct DecisionsQuery {
    pub pool: Option<String>,
    pub namespace: Option<String>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/pools", get(pools))
        .route("/v1/decisions", get(decisions))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready once ingest is serving and the autoscalers are read. Not gated on reading every
/// pool's replicas: readiness decides whether gateways' reports reach this replica at all, and
/// one autoscaler with a bad target (404, 403) must not take them from every other pool. A
/// pool whose replicas cannot be read is not decided on, and says so in its log and in
/// `flyball_actuator_errors_total{pool,kind}`.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.serving.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "ingest not serving yet\n").into_response();
    }
    if !state.configured.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "autoscalers not read yet\n",
        )
            .into_response();
    }
    "ok\n".into_response()
}

fn quantiles_ms(sketch: &Sketch) -> Quantiles {
    let q = |q| sketch.quantile(q).map(|us| us / 1000.0);
    Quantiles {
        p50: q(0.5),
        p95: q(0.95),
        p99: q(0.99),
    }
}

/// The `/v1/pools` body at `now`.
pub fn pools_response(state: &AppState, now: Instant) -> PoolsResponse {
    let pools = state
        .config
        .current()
        .pools()
        .iter()
        .map(|pool| pool_entry(state, pool, now))
        .collect();
    PoolsResponse {
        pools,
        leading: state.leading.as_ref().map(|rx| *rx.borrow()),
    }
}

fn pool_entry(state: &AppState, pool: &PoolDef, now: Instant) -> PoolEntry {
    let view = state.telemetry.pool(pool.id, now).unwrap_or_default();
    let status = state.status.get(pool.id).unwrap_or_default();
    PoolEntry {
        name: pool.name.clone(),
        namespace: pool.target.namespace.clone(),
        autoscaler: pool.autoscaler_name.clone(),
        role: pool.role.as_str().to_owned(),
        requests: view.totals.requests,
        errors: view.totals.errors,
        input_tokens: view.totals.input_tokens,
        output_tokens: view.totals.output_tokens,
        ttft_ms: quantiles_ms(&view.short.latency.ttft_us),
        tpot_ms: quantiles_ms(&view.short.latency.tpot_us),
        in_flight: view.in_flight.total(),
        replicas: Replicas {
            current: status.replicas.map(|r| r.current),
            ready: status.replicas.map(|r| r.ready),
            desired: status.desired,
        },
        last_decision: status.decisions.back().map(|d| LastDecision {
            at: d.at.clone(),
            from: d.from,
            to: d.to,
            reason: d.reason.clone(),
        }),
        warnings: status.warnings,
    }
}

async fn pools(State(state): State<Arc<AppState>>) -> axum::Json<PoolsResponse> {
    axum::Json(pools_response(&state, Instant::now()))
}

async fn decisions(
    State(state): State<Arc<AppState>>,
    Query(query): Query<DecisionsQuery>,
) -> Response {
    let pools: Vec<PoolDecisions> = state
        .config
        .current()
        .pools()
        .iter()
        .filter(|p| query.pool.as_ref().is_none_or(|name| *name == p.name))
        .filter(|p| {
            query
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == p.target.namespace)
        })
        .map(|pool| PoolDecisions {
            name: pool.name.clone(),
            namespace: pool.target.namespace.clone(),
            autoscaler: pool.autoscaler_name.clone(),
            role: pool.role.as_str().to_owned(),
            decisions: state
                .status
                .get(pool.id)
                .map(|s| s.decisions.into_iter().collect())
                .unwrap_or_default(),
        })
        .collect();
    if pools.is_empty()
        && let Some(name) = query.pool
    {
        let place = query
            .namespace
            .map(|ns| format!(" in namespace {ns:?}"))
            .unwrap_or_default();
        return (
            StatusCode::NOT_FOUND,
            format!("no pool named {name:?}{place}\n"),
        )
            .into_response();
    }
    axum::Json(DecisionsResponse { pools }).into_response()
}
