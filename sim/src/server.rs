//! HTTP glue: one listener speaking HTTP/1.1 and HTTP/2 with prior knowledge (h2c), the routes,
//! and the completion handler that turns a request into a plan, a pacer and a body.
//!
//! accept -> hyper auto (h1 | h2c) -> axum router -> handler -> plan + pacer -> ResponseBody -> hyper

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::SimError;
use crate::body::{self, ResponseBody};
use crate::engine::EngineModel;
use crate::knobs::{self, Knobs};
use crate::metrics::{self, EngineStats};
use crate::openai::{self, Endpoint};
use crate::pacing::{EngineDriver, EngineHandle, LoadGauges, Pacer, Schedule};
use crate::plan::{self, Identity, Plan};
use crate::truth::{Recorder, RequestTruth, TruthLog};

/// Request bodies above this are refused; prompts in tests are far smaller.
const MAX_REQUEST_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Pause after a failed accept (out of file descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How the simulator presents itself and times its engine.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Served model name: listed by `/v1/models`, labels `/metrics`, answers a request that
    /// names no model.
    pub model: String,
    /// Further names served, as vLLM's `--served-model-name` takes several; answered under
    /// `model`, as vLLM answers under the first.
    pub aliases: Vec<String>,
    /// Answer a request naming a model not served 404, as vLLM does. Off in this default, for
    /// tests where one simulator stands in for every model a gateway routes to it, each echoed
    /// back; `flyball sim` turns it on unless `--serve-any-model` is given.
    pub refuse_other_models: bool,
    /// Timing of requests that carry no timing knobs.
    pub engine: EngineModel,
    /// Context length, as vLLM's `--max-model-len`; reported by `/v1/models`. As vLLM, a request
    /// whose prompt plus `max_tokens` (or output-tokens knob) exceeds it is refused (400); one
    /// with no bound is refused only when its prompt alone fills it, else its answer stops where
    /// the context ends.
    pub max_model_len: u64,
    /// On shutdown, how long open responses may run before their connections are cut.
    pub shutdown_grace: Duration,
}

/// A simulator serving in the background; dropping it stops it too.
#[derive(Debug)]
pub struct SimServer {
    local_addr: SocketAddr,
    app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct App {
    config: SimConfig,
    truth: Arc<TruthLog>,
    stats: Arc<EngineStats>,
    gauges: Arc<LoadGauges>,
    engine: EngineHandle,
    next_request: AtomicU64,
    started_unix_s: u64,
}

// === impl SimConfig ===

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            model: "sim-llama-3-8b".to_owned(),
            aliases: Vec::new(),
            refuse_other_models: false,
            engine: EngineModel::default(),
            max_model_len: 32_768,
            shutdown_grace: Duration::from_secs(1),
        }
    }
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), SimError> {
        if self.model.trim().is_empty() {
            return Err(SimError::InvalidConfig {
                field: "model",
                value: format!("{:?}", self.model),
                rule: "must not be empty",
            });
        }
        if let Some(alias) = self.aliases.iter().find(|a| a.trim().is_empty()) {
            return Err(SimError::InvalidConfig {
                field: "aliases",
                value: format!("{alias:?}"),
                rule: "must not be empty",
            });
        }
        self.engine.validate()
    }

    /// Whether a request naming `model` is answered.
    pub fn serves(&self, model: &str) -> bool {
        !self.refuse_other_models || model == self.model || self.aliases.iter().any(|a| a == model)
    }

    /// The name an answer carries: vLLM answers under its first served name whichever alias was
    /// asked for; serving any model, the name asked for is echoed.
    fn answered_as(&self, asked: Option<&str>) -> String {
        match asked {
            Some(asked) if !self.refuse_other_models => asked.to_owned(),
            _ => self.model.clone(),
        }
    }
}

// === impl SimServer ===

impl SimServer {
    /// Validates `config` and serves on `listener` in a background task.
    pub async fn start(config: SimConfig, listener: TcpListener) -> Result<SimServer, SimError> {
        let local_addr = listener.local_addr().map_err(SimError::LocalAddr)?;
        let (app, driver) = App::new(config)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(app.clone(), driver, listener, async move {
            // A dropped sender means stop, too.
            let _ = stopped.await;
        }));
        Ok(SimServer {
            local_addr,
            app,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<local addr>`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Finished requests, in the order they finished.
    pub fn ground_truth(&self) -> Vec<RequestTruth> {
        self.app.truth.snapshot()
    }

    /// Waits until the request with this `x-sim-request-id` is finished and returns its entry.
    /// Never times out on its own: wrap it in `tokio::time::timeout`.
    pub async fn wait_for_request(&self, request_id: &str) -> RequestTruth {
        self.app.truth.wait_for(request_id).await
    }

    /// Forgets every finished request (as `POST /sim/reset`).
    pub fn reset_ground_truth(&self) {
        self.app.truth.clear();
    }

    /// Stops accepting, lets open responses run for `shutdown_grace`, then cuts the rest.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(err) = task.await
        {
            tracing::warn!(error = %err, "simulator task failed");
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves until `shutdown` completes, then drains as [`SimServer::shutdown`] does.
/// For the `flyball sim` subcommand.
pub async fn serve(
    config: SimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SimError> {
    let (app, driver) = App::new(config)?;
    run(app, driver, listener, shutdown).await;
    Ok(())
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(
    app: Arc<App>,
    driver: EngineDriver,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) {
    let _driver = AbortOnDrop(tokio::spawn(driver.run()));
    let router = router(app.clone());
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, model = %app.config.model, "simulator listening (HTTP/1.1 and h2c)");
    }

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                // Without it, Nagle holds small SSE writes behind the peer's delayed ACK and
                // every measured gap is off by up to 40 ms.
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %err, "set_nodelay failed");
                }
                let service = TowerToHyperService::new(router.clone());
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                connections.spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(app.config.shutdown_grace) => {
            tracing::debug!("shutdown grace over; cutting open connections");
        }
    }
    connections.shutdown().await;
}

// === impl App ===

impl App {
    fn new(config: SimConfig) -> Result<(Arc<App>, EngineDriver), SimError> {
        config.validate()?;
        let gauges = Arc::new(LoadGauges::default());
        let stats = Arc::new(EngineStats::default());
        let (engine, driver) =
            EngineHandle::new(config.engine.clone(), gauges.clone(), stats.clone());
        let app = App {
            config,
            truth: Arc::new(TruthLog::default()),
            stats,
            gauges,
            engine,
            next_request: AtomicU64::new(1),
            started_unix_s: unix_now_s(),
        };
        Ok((Arc::new(app), driver))
    }

    fn next_request_id(&self) -> String {
        format!("sim-{}", self.next_request.fetch_add(1, Ordering::Relaxed))
    }
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/sim/requests", get(sim_requests))
        .route("/sim/reset", post(sim_reset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn chat_completions(State(app): State<Arc<App>>, request: Request) -> Response {
    completion(app, Endpoint::Chat, request).await
}

async fn completions(State(app): State<Arc<App>>, request: Request) -> Response {
    completion(app, Endpoint::Completions, request).await
}

/// Whether the request's media type is `application/json` (parameters such as a charset
/// aside), as vLLM requires of a completion request.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"))
}

async fn completion(app: Arc<App>, endpoint: Endpoint, request: Request) -> Response {
    // Both clocks are read first: offsets in the ground truth count from this line.
    let received = std::time::Instant::now();
    let received_tokio = tokio::time::Instant::now();
    let received_at = SystemTime::now();

    let (parts, body) = request.into_parts();
    let knobs = Knobs::from_headers(&parts.headers);
    let request_id = knobs
        .as_ref()
        .ok()
        .and_then(|k| k.request_id.clone())
        .unwrap_or_else(|| app.next_request_id());
    let mut recorder = Recorder::new(
        app.truth.clone(),
        received,
        received_at,
        request_id.clone(),
        parts.uri.path().to_owned(),
    );
    recorder.entry_mut().model = app.config.model.clone();

    let knobs = match knobs {
        Ok(knobs) => knobs,
        Err(err) => {
            return respond(
                plan::error_plan(400, &err.to_string()),
                None,
                &Knobs::default(),
                recorder,
            );
        }
    };
    let bytes = match axum::body::to_bytes(body, MAX_REQUEST_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(err) => {
            let message = format!("reading the request body: {err}");
            return respond(plan::error_plan(400, &message), None, &knobs, recorder);
        }
    };
    // Parsed once, here: the truth keeps the name the gateway saw in the request (its telemetry
    // is keyed by it) also for a request refused below, before its parse is looked at.
    let parsed = openai::parse_request(endpoint, &bytes);
    let asked = match &parsed {
        Ok(req) => req.model.clone(),
        Err(_) => openai::named_model(&bytes),
    };
    if let Some(asked) = asked {
        recorder.entry_mut().model = asked;
    }
    // vLLM refuses on the media type before it parses the body (its `validate_json_request`).
    if !is_json(&parts.headers) {
        let message = "Unsupported Media Type: Only 'application/json' is allowed";
        return respond(plan::error_plan(400, message), None, &knobs, recorder);
    }
    if let Some(status) = knobs.error_status {
        let message = format!(
            "simulated error ({} = {})",
            knobs::header::ERROR,
            status.as_u16()
        );
        return respond(
            plan::error_plan(status.as_u16(), &message),
            None,
            &knobs,
            recorder,
        );
    }
    let req = match parsed {
        Ok(req) => req,
        Err(err) => return respond(plan::error_plan(400, &err.0), None, &knobs, recorder),
    };
    if let Some(other) = req.model.as_deref().filter(|m| !app.config.serves(m)) {
        let message = format!("The model `{other}` does not exist.");
        return respond(plan::error_plan(404, &message), None, &knobs, recorder);
    }
    // Each answer is planned whole before its first byte, so this bound is also what keeps one
    // request's memory bounded (`max_tokens: 4000000000` took the process down).
    let output = match plan::output_length(&req, &knobs, app.config.max_model_len) {
        Ok(output) => output,
        Err(message) => return respond(plan::error_plan(400, &message), None, &knobs, recorder),
    };

    let model = app.config.answered_as(req.model.as_deref());
    let identity = Identity {
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{request_id}"),
            Endpoint::Completions => format!("cmpl-{request_id}"),
        },
        created_unix_s: knobs.created_unix_s.unwrap_or_else(unix_now_s),
        model: model.clone(),
        request_id,
    };
    let plan = plan::plan(&req, &knobs, &identity, output);
    let entry = recorder.entry_mut();
    entry.stream = req.stream;
    entry.include_usage_requested = req.include_usage;
    entry.continuous_usage_requested = req.continuous_usage;
    entry.prompt_tokens = req.prompt_tokens;
    entry.completion_tokens_planned = plan.completion_tokens_planned;

    let mut pacer = if knobs.scripts_timing() {
        // A missing half of the script comes from the engine model, unloaded.
        let engine = &app.config.engine;
        let schedule = Schedule {
            start: received_tokio,
            ttft: knobs
                .ttft
                .unwrap_or_else(|| engine.unloaded_ttft(req.prompt_tokens)),
            itl: knobs.itl.unwrap_or_else(|| engine.decode_step_time(1)),
            prompt_tokens: req.prompt_tokens,
            output_tokens: plan.completion_tokens_planned,
        };
        Pacer::scripted(schedule, app.gauges.clone(), app.stats.clone())
    } else {
        app.engine.submit(
            received_tokio,
            req.prompt_tokens,
            plan.completion_tokens_planned,
        )
    };
    // Dropping this future (the client left before the headers) drops the recorder: a
    // client cancellation.
    pacer.wait(plan.headers_gate).await;
    respond(plan, Some(pacer), &knobs, recorder)
}

fn respond(plan: Plan, pacer: Option<Pacer>, knobs: &Knobs, mut recorder: Recorder) -> Response {
    recorder.entry_mut().status = plan.status;
    let status = StatusCode::from_u16(plan.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let events = body::paced_events(plan.events, pacer, plan.reset);
    let content_length = plan.content_length.map(|len| len as u64);
    let body = ResponseBody::new(events, knobs.fragment_bytes, content_length, recorder);
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(plan.content_type),
    );
    if let Some(length) = plan.content_length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let model = &app.config.model;
    // vLLM lists every served name, each rooted at the one model behind them.
    let cards: Vec<serde_json::Value> = std::iter::once(model)
        .chain(&app.config.aliases)
        .map(|name| {
            serde_json::json!({
                "id": name,
                "object": "model",
                "created": app.started_unix_s,
                "owned_by": "vllm",
                "root": model,
                "parent": null,
                "max_model_len": app.config.max_model_len,
                "permission": [],
            })
        })
        .collect();
    let body = serde_json::json!({ "object": "list", "data": cards });
    axum::Json(body).into_response()
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let text = metrics::render(&app.config.model, &app.gauges, &app.stats);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn sim_requests(State(app): State<Arc<App>>) -> Response {
    axum::Json(app.truth.snapshot()).into_response()
}

async fn sim_reset(State(app): State<Arc<App>>) -> StatusCode {
    app.truth.clear();
    StatusCode::NO_CONTENT
}

/// FastAPI's answer for an unknown path, which is what vLLM clients see.
async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"detail": "Not Found"})),
    )
        .into_response()
}

/// FastAPI's answer for a known path and the wrong method.
async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(serde_json::json!({"detail": "Method Not Allowed"})),
    )
        .into_response()
}
