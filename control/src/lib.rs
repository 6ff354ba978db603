//! flyball's control service: one process every gateway reports to, which sizes model-server pools.
//!
//! gateways --gRPC Report--> [`ingest`] -> [`window`]s per key and pool -> [`controller`]
//! (`flyball_policy::decide`, at most every 100 ms per autoscaler) -> [`controller::Actuator`]
//! (Kubernetes `/scale` in flyball-k8s, or [`controller::DryRunActuator`]).
//!
//! The same gRPC port serves KEDA's external scaler ([`keda`]) for clusters that scale through
//! KEDA; the HTTP port serves `/metrics`, `/healthz`, `/readyz`, `/v1/pools` and `/v1/decisions`
//! ([`http`]). Autoscalers come from a YAML file ([`config`]) with the CRD's rules.
//!
//! It never trusts a gateway's clock, never lets a gateway grow its memory beyond the gateway's
//! identity and latest gauges, never panics on a report (bad ones are refused with the reason),
//! and never scales down on stale or missing telemetry (the policy holds).
#![forbid(unsafe_code)]

pub mod config;
pub mod controller;
pub mod http;
pub mod ingest;
pub mod keda;
pub mod metrics;
pub mod window;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{ConfigError, ControlConfig};
use crate::controller::{Actuator, Clock, DryRunActuator, LoopConfig, Status};
use crate::http::AppState;
use crate::ingest::{IngestConfig, IngestService, Telemetry};
use crate::keda::KedaScaler;
use crate::metrics::Metrics;
use crate::window::{WindowConfig, WindowConfigError};

/// `flyball control`'s flags.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ControlArgs {
    /// Where gateways report (flyball.v1.TelemetryService) and KEDA asks (externalscaler).
    #[arg(long, env = "FLYBALL_GRPC_LISTEN", default_value = "0.0.0.0:9090")]
    pub grpc_listen: SocketAddr,
    /// /metrics, /healthz, /readyz, /v1/pools, /v1/decisions.
    #[arg(long, env = "FLYBALL_HTTP_LISTEN", default_value = "0.0.0.0:9091")]
    pub http_listen: SocketAddr,
    /// YAML file of autoscalers (see the README). Without it, ingest runs with no pools.
    #[arg(long, env = "FLYBALL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Decide and report, never change replicas.
    #[arg(long, env = "FLYBALL_DRY_RUN")]
    pub dry_run: bool,
    /// A gateway silent this long (or 3 of its report intervals, if longer) is stale: its
    /// in-flight requests stop counting.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub stale_after: Duration,
    /// A gateway silent this long is forgotten.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub forget_after: Duration,
    /// Width of one window bucket.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub bucket: Duration,
    /// The short window (panic decisions).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub short_window: Duration,
    /// The stable window (steady sizing and scale-down).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub stable_window: Duration,
    /// Evaluations of one autoscaler are at least this far apart.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub min_evaluation_interval: Duration,
    /// And at most this far apart, with or without traffic.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub max_evaluation_interval: Duration,
    /// Reports larger than this (encoded) are refused.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_report_bytes: usize,
    /// Keys (backend, model) in one report.
    #[arg(long, default_value_t = 1024)]
    pub max_keys_per_report: usize,
    /// Distinct keys tracked; telemetry for more is dropped and counted.
    #[arg(long, default_value_t = 10_000)]
    pub max_keys: usize,
    /// Decisions kept per pool for /v1/decisions.
    #[arg(long, default_value_t = 100)]
    pub decision_log: usize,
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("--config {0}")]
    Config(#[source] ConfigError),
    #[error("windows: {0}")]
    Windows(#[source] WindowConfigError),
    #[error("--{flag} = {value}: {rule}")]
    Flag {
        flag: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[source] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    #[error("a server task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A bound, configured control service, ready to serve.
#[derive(Debug)]
pub struct Control<A = DryRunActuator> {
    grpc: TcpListener,
    http: TcpListener,
    config: Arc<ControlConfig>,
    telemetry: Arc<Telemetry>,
    status: Arc<Status>,
    app: Arc<AppState>,
    actuator: Arc<A>,
    clock: Clock,
    loop_config: LoopConfig,
    sweep_every: Duration,
}

/// HTTP/2 flow-control windows of the gRPC server (hyper's defaults are 1 MiB).
const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;

/// How long servers get to finish in-flight calls after shutdown before they are cut off.
const DRAIN: Duration = Duration::from_secs(5);

/// Parses `--stale-after 3s` and friends with the configuration's duration grammar.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    flyball_policy::duration::parse_duration(text).map_err(|e| e.to_string())
}

// === impl ControlError ===

impl ControlError {
    /// Whether the error is the operator's to fix (exit 64) rather than the environment's.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ControlError::Config(_) | ControlError::Windows(_) | ControlError::Flag { .. }
        )
    }
}

/// Serves until `shutdown` resolves, recording recommendations only (no actuator is built into
/// this crate: flyball-k8s provides the Kubernetes one; see [`Control::with_actuator`]).
pub async fn run(
    args: ControlArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    Control::bind(&args).await?.serve(shutdown).await
}

// === impl Control ===

impl Control<DryRunActuator> {
    /// Reads the configuration and binds both listeners; nothing is served yet.
    pub async fn bind(args: &ControlArgs) -> Result<Self, ControlError> {
        let config = match &args.config {
            Some(path) => ControlConfig::load(path).map_err(ControlError::Config)?,
            None => ControlConfig::default(),
        };
        Self::bind_with_config(args, config).await
    }

    /// As [`Control::bind`], with the autoscalers given rather than read from `--config`.
    pub async fn bind_with_config(
        args: &ControlArgs,
        config: ControlConfig,
    ) -> Result<Self, ControlError> {
        let windows = WindowConfig::try_new(args.bucket, args.short_window, args.stable_window)
            .map_err(ControlError::Windows)?;
        let flag = |flag, value: &dyn std::fmt::Display, rule| ControlError::Flag {
            flag,
            value: value.to_string(),
            rule,
        };
        if args.min_evaluation_interval.is_zero() {
            return Err(flag("min-evaluation-interval", &"0", "must be above 0"));
        }
        if args.max_evaluation_interval < args.min_evaluation_interval {
            return Err(flag(
                "max-evaluation-interval",
                &format_args!("{:?}", args.max_evaluation_interval),
                "must be >= --min-evaluation-interval",
            ));
        }
        if args.stale_after.is_zero() {
            return Err(flag("stale-after", &"0", "must be above 0"));
        }
        if args.forget_after < args.stale_after {
            return Err(flag(
                "forget-after",
                &format_args!("{:?}", args.forget_after),
                "must be >= --stale-after",
            ));
        }
        if args.max_keys_per_report == 0 || args.max_keys == 0 {
            return Err(flag("max-keys", &0, "must be >= 1"));
        }
        let ingest = IngestConfig {
            stale_after: args.stale_after,
            forget_after: args.forget_after,
            max_report_bytes: args.max_report_bytes,
            max_keys_per_report: args.max_keys_per_report,
            max_keys: args.max_keys,
            ..IngestConfig::default()
        };
        let grpc = TcpListener::bind(args.grpc_listen)
            .await
            .map_err(|source| ControlError::Bind {
                what: "gRPC",
                addr: args.grpc_listen,
                source,
            })?;
        let http = TcpListener::bind(args.http_listen)
            .await
            .map_err(|source| ControlError::Bind {
                what: "HTTP",
                addr: args.http_listen,
                source,
            })?;

        let epoch = Instant::now();
        let config = Arc::new(config);
        let telemetry = Arc::new(Telemetry::new(ingest, windows, config.selectors(), epoch));
        let status = Arc::new(Status::new(config.pools().len()));
        let metrics = Metrics::new(config.clone(), telemetry.clone(), status.clone());
        let app = Arc::new(AppState {
            config: config.clone(),
            telemetry: telemetry.clone(),
            status: status.clone(),
            metrics,
            serving: Default::default(),
        });
        let actuator = Arc::new(DryRunActuator::for_config(&config));
        Ok(Control {
            grpc,
            http,
            config,
            telemetry,
            status,
            app,
            actuator,
            clock: Clock::new(epoch),
            loop_config: LoopConfig {
                min_interval: args.min_evaluation_interval,
                idle_interval: args.max_evaluation_interval,
                decision_log: args.decision_log,
                // The dry-run actuator records what it is asked; with a real one, --dry-run
                // means read replicas but never set them (see `with_actuator`).
                dry_run: false,
                stale_after: args.stale_after,
            },
            sweep_every: (args.stale_after / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(1)),
        })
    }

    /// Uses `actuator` instead of the dry-run one. With `dry_run`, it is only read, never set.
    pub fn with_actuator<B: Actuator>(self, actuator: Arc<B>, dry_run: bool) -> Control<B> {
        Control {
            grpc: self.grpc,
            http: self.http,
            config: self.config,
            telemetry: self.telemetry,
            status: self.status,
            app: self.app,
            actuator,
            clock: self.clock,
            loop_config: LoopConfig {
                dry_run,
                ..self.loop_config
            },
            sweep_every: self.sweep_every,
        }
    }
}

impl<A: Actuator> Control<A> {
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.local_addr().ok()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    pub fn actuator(&self) -> &Arc<A> {
        &self.actuator
    }

    pub fn config(&self) -> &Arc<ControlConfig> {
        &self.config
    }

    /// Serves gRPC, HTTP and the control loop until `shutdown` resolves or a server fails.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ControlError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let keda = KedaScaler::new(self.config.clone(), self.status.clone(), stop_rx.clone());
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let mut tasks = tokio::task::JoinSet::new();

        let telemetry = self.telemetry.clone();
        let oversize = tower::util::MapResponseLayer::new(
            move |response: axum::http::Response<tonic::body::Body>| {
                refuse_oversize(response, &telemetry)
            },
        );
        let grpc = grpc_server()
            .layer(oversize)
            .add_service(IngestService::new(self.telemetry.clone()).into_server())
            .add_service(keda.into_server())
            .serve_with_incoming_shutdown(grpc_incoming(self.grpc), stopped());
        tasks.spawn(async move { grpc.await.map_err(ControlError::Grpc) });
        self.app.serving.store(true, Ordering::Release);

        let router = http::router(self.app.clone());
        let http = axum::serve(self.http, router).with_graceful_shutdown(stopped());
        tasks.spawn(async move { http.await.map_err(ControlError::Http) });

        let control_loop = controller::run(
            self.config.clone(),
            self.telemetry.clone(),
            self.status.clone(),
            self.actuator.clone(),
            self.clock,
            self.loop_config,
            stopped(),
        );
        tasks.spawn(async move {
            control_loop.await;
            Ok(())
        });

        let telemetry = self.telemetry.clone();
        let sweep_every = self.sweep_every;
        let stop = stopped();
        tasks.spawn(async move {
            let sweep = async {
                let mut tick = tokio::time::interval(sweep_every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    telemetry.sweep(Instant::now());
                }
            };
            tokio::select! {
                () = sweep => {}
                () = stop => {}
            }
            Ok(())
        });

        tracing::info!(
            pools = self.config.pools().len(),
            autoscalers = self.config.autoscalers().len(),
            "control service serving"
        );
        let mut result = tokio::select! {
            () = shutdown => Ok(()),
            Some(done) = tasks.join_next() => flatten(done),
        };
        let _ = stop_tx.send(true);
        let drain = async {
            while let Some(done) = tasks.join_next().await {
                if result.is_ok() {
                    result = flatten(done);
                }
            }
        };
        if tokio::time::timeout(DRAIN, drain).await.is_err() {
            tracing::debug!("servers still busy after {DRAIN:?}; cutting them off");
            tasks.shutdown().await;
        }
        result
    }
}

/// The gRPC server's settings. Thousands of gateways hold a connection each, so per-connection
/// buffering is what memory is made of: small flow-control windows keep a burst from growing a
/// connection's buffers (a report is a few KB; larger ones just take more round trips).
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
}

/// Accepted gRPC connections: replies are small and latency matters (an ack releases the
/// gateway's buffer), so no Nagle; keepalive finds gateways that vanished without a FIN.
pub fn grpc_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

fn flatten(
    done: Result<Result<(), ControlError>, tokio::task::JoinError>,
) -> Result<(), ControlError> {
    done.map_err(ControlError::Task).and_then(|r| r)
}

/// tonic refuses a message over `max_decoding_message_size` before any handler sees it, with
/// OUT_OF_RANGE in the trailers; ingest's contract is RESOURCE_EXHAUSTED with the reason, and the
/// refusal must be counted, so the status is rewritten on its way out.
fn refuse_oversize(
    response: axum::http::Response<tonic::body::Body>,
    telemetry: &Arc<Telemetry>,
) -> axum::http::Response<tonic::body::Body> {
    use http_body_util::BodyExt;
    let (mut parts, body) = response.into_parts();
    // A trailers-only response carries the status in its headers.
    if rewrite_oversize(&mut parts.headers) {
        telemetry.count_refusal(ingest::OVERSIZE);
    }
    let telemetry = telemetry.clone();
    let body = body.map_frame(move |mut frame| {
        if let Some(trailers) = frame.trailers_mut()
            && rewrite_oversize(trailers)
        {
            telemetry.count_refusal(ingest::OVERSIZE);
        }
        frame
    });
    axum::http::Response::from_parts(parts, tonic::body::Body::new(body))
}

fn rewrite_oversize(headers: &mut axum::http::HeaderMap) -> bool {
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == b"11");
    if !out_of_range {
        return false;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return false;
    };
    let Some((_, detail)) = status.message().split_once("message length too large: ") else {
        return false;
    };
    let refusal = tonic::Status::resource_exhausted(format!(
        "report over the size limit (--max-report-bytes): {detail}"
    ));
    refusal.add_header(headers).is_ok()
}
