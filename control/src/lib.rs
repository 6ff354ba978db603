//! flyball's control service: one process every gateway reports to, which sizes model-server pools.
//!
//! gateways --gRPC Report--> [`ingest`] -> [`window`]s per key and pool -> [`controller`]
//! (`flyball_policy::decide`, at most every 100 ms per autoscaler) -> [`controller::Actuator`]
//! (Kubernetes `/scale` through [`actuator::KubeActuator`], or [`controller::DryRunActuator`]).
//!
//! The same gRPC port serves KEDA's external scaler ([`keda`]) for clusters that scale through
//! KEDA; the HTTP port serves `/metrics`, `/healthz`, `/readyz`, `/v1/pools` and `/v1/decisions`
//! ([`http`]). Autoscalers come from a YAML file ([`config`]) or from `FlyballAutoscaler`
//! resources ([`source`]), with the same rules. On Kubernetes every replica ingests and decides;
//! only the holder of the leader Lease ([`leader`]) sets replicas, followers forward what they
//! receive to it ([`forward`]), and it streams what it merges back to them ([`replication`]), so
//! any of them can take over with complete windows. Every gRPC connection is tracked ([`connection`]), so a gateway
//! whose connections closed (Envoy exited) is told from one cut off.
//!
//! It never trusts a gateway's clock, never lets a gateway grow its memory beyond the gateway's
//! identity and latest gauges, never panics on a report (bad ones are refused with the reason),
//! never scales down on stale or missing telemetry (the policy holds), and never sets replicas
//! unless it leads.
#![forbid(unsafe_code)]

pub mod actuator;
pub mod config;
pub mod connection;
pub mod controller;
pub mod forward;
pub mod http;
pub mod ingest;
pub mod keda;
pub mod leader;
pub mod metrics;
pub mod replication;
pub mod source;
pub mod tls;
pub mod window;

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::actuator::KubeActuator;
use crate::config::{ConfigError, ControlConfig, LiveConfig};
use crate::connection::ConnectionCounters;
use crate::controller::{Actuator, Clock, DryRunActuator, LoopConfig, Status};
use crate::forward::{ForwardCounters, Forwarder};
use crate::http::AppState;
use crate::ingest::{IngestConfig, IngestService, Telemetry};
use crate::keda::KedaScaler;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::replication::{Following, Replication, ReplicationCounters};
use crate::source::KubernetesSource;
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
    /// Where autoscalers come from: `file` (--config) or `kubernetes` (FlyballAutoscaler
    /// resources).
    #[arg(long, env = "FLYBALL_SOURCE", value_enum, default_value_t = Source::File)]
    pub source: Source,
    /// YAML file of autoscalers (see the README), with `--source file`. Without it, ingest runs
    /// with no pools.
    #[arg(long, env = "FLYBALL_CONFIG")]
    pub config: Option<PathBuf>,
    /// With `--source kubernetes`: the namespace whose FlyballAutoscalers to serve (default:
    /// every namespace).
    #[arg(long, env = "FLYBALL_NAMESPACE")]
    pub namespace: Option<String>,
    /// With `--source kubernetes`: only FlyballAutoscalers matching this label selector.
    #[arg(long, env = "FLYBALL_LABEL_SELECTOR")]
    pub label_selector: Option<String>,
    /// Decide and report, never change replicas.
    #[arg(long, env = "FLYBALL_DRY_RUN")]
    pub dry_run: bool,
    /// This replica's name in the leader Lease and in Events (default: the host name and
    /// process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where other replicas reach this one's gRPC server, published in the Lease for followers
    /// to forward reports to (default: `$POD_IP` and the gRPC port, or the gRPC listen address
    /// when it names one).
    #[arg(long, env = "FLYBALL_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// The leader Lease: only its holder sets replicas.
    #[arg(long, env = "FLYBALL_LEASE_NAME", default_value = "flyball-control")]
    pub lease_name: String,
    /// The leader Lease's namespace (default: `$POD_NAMESPACE`, else the client's namespace).
    #[arg(long, env = "FLYBALL_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a leader's claim lasts without renewal: a crashed leader is replaced within
    /// this. Whole seconds, at least 2; renewed a third of it before expiry.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub lease_duration: Duration,
    /// A gateway silent this long (or 3 of its report intervals, if longer) is stale: its
    /// in-flight requests stop counting.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub stale_after: Duration,
    /// A gateway silent this long is forgotten.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub forget_after: Duration,
    /// Hold scale-down for every quiet gateway until --forget-after, even one whose own
    /// connections to this service closed while it reported (Envoy closes them when it exits).
    /// For a proxy in front of this service that keeps one upstream connection per gateway and
    /// may close them all at once while the gateways live on (connections shared by several
    /// gateways are recognised and never taken as a gateway leaving).
    #[arg(long, env = "FLYBALL_HOLD_FOR_CLOSED_GATEWAYS")]
    pub hold_for_closed_gateways: bool,
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
    /// GPUs shared by the pools of every autoscaler (each pool's `gpusPerReplica` a replica):
    /// when together they would grow past it, the growth is split by need. Never removes
    /// replicas. Each autoscaler's own `gpuBudget` applies first.
    #[arg(long)]
    pub gpu_budget: Option<u32>,
    /// Reports larger than this (encoded) are refused.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_report_bytes: usize,
    /// Keys (backend, model) in one report; a report with more is refused whole. The default
    /// takes whatever a gateway with the filter's default label caps sends.
    #[arg(long, default_value_t = flyball_proto::DEFAULT_MAX_KEYS_PER_REPORT)]
    pub max_keys_per_report: usize,
    /// Distinct keys tracked; telemetry for more is dropped and counted, and the pools it would
    /// feed do not scale down meanwhile. A key unreported for `--forget-after` plus the stable
    /// window frees its place.
    #[arg(long, default_value_t = 10_000)]
    pub max_keys: usize,
    /// Gateway processes remembered (each until --forget-after); a report of one more is refused
    /// (RESOURCE_EXHAUSTED, counted), and the pools it would feed do not scale down meanwhile.
    #[arg(long, default_value_t = 100_000)]
    pub max_reporters: usize,
    /// Decisions kept per pool for /v1/decisions.
    #[arg(long, default_value_t = 100)]
    pub decision_log: usize,
    /// A gRPC connection idle this long is probed (TCP keepalive), and given up once nothing
    /// has come from its peer for --grpc-keepalive-timeout more, or what was sent on it went
    /// unacknowledged (or unread) that long (TCP_USER_TIMEOUT, both together): a follower or
    /// gateway gone without closing its connection (a node lost, a partition) frees what it
    /// holds. Such a connection is lost, not closed: its gateway is held for as a quiet one is
    /// (until --forget-after). Whole seconds.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub grpc_keepalive: Duration,
    /// See --grpc-keepalive.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub grpc_keepalive_timeout: Duration,
    /// PEM certificate (chain) of the gRPC port: with `--grpc-tls-key`, the port speaks TLS only.
    #[arg(long, env = "FLYBALL_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of `--grpc-tls-cert`.
    #[arg(long, env = "FLYBALL_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate they signed (mutual TLS), and
    /// followers verify the leader by them when forwarding.
    #[arg(long, env = "FLYBALL_GRPC_TLS_CA")]
    pub grpc_tls_ca: Option<PathBuf>,
    /// The name in the replicas' certificate that followers check when forwarding to the
    /// leader (they connect to its pod address).
    #[arg(
        long,
        env = "FLYBALL_GRPC_TLS_SERVER_NAME",
        default_value = "flyball-control"
    )]
    pub grpc_tls_server_name: String,
    /// How often the `--grpc-tls-*` files are read again; a change serves new connections
    /// (renewed certificates need no restart).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub grpc_tls_reload_every: Duration,
}

/// Where autoscalers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The `--config` YAML file, read once.
    File,
    /// `FlyballAutoscaler` resources, watched.
    Kubernetes,
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("--config {0}")]
    Config(#[source] ConfigError),
    #[error("{0}")]
    Windows(#[source] WindowConfigError),
    #[error("--{flag} = {value}: {rule}")]
    Flag {
        flag: &'static str,
        value: String,
        rule: Cow<'static, str>,
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
    #[error("{0}")]
    Tls(#[source] tls::TlsError),
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    #[error("a server task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("no Kubernetes client (is KUBECONFIG set, or is this a pod?): {0}")]
    Kubernetes(#[source] kube::Error),
    #[error("leader election: {0}")]
    Lease(#[source] flyball_k8s::Error),
    #[error("listing FlyballAutoscalers: {0}")]
    Source(#[source] kube::Error),
}

/// A bound, configured control service, ready to serve.
#[derive(Debug)]
pub struct Control<A = DryRunActuator> {
    grpc: TcpListener,
    /// TLS on the gRPC port (and for forwarding to the leader); `None`: plaintext.
    tls: Option<Arc<tls::GrpcTls>>,
    tls_reload_every: Duration,
    keepalive: GrpcKeepalive,
    connections: ConnectionCounters,
    http: TcpListener,
    config: Arc<LiveConfig>,
    telemetry: Arc<Telemetry>,
    status: Arc<Status>,
    actuator: Arc<A>,
    clock: Clock,
    loop_config: LoopConfig,
    sweep_every: Duration,
    leadership: Leadership,
    source: Option<KubernetesSource>,
    forward: ForwardCounters,
    replication: ReplicationCounters,
    /// The autoscalers are known (false until a Kubernetes source has listed them).
    configured: bool,
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
            ControlError::Config(_)
                | ControlError::Windows(_)
                | ControlError::Flag { .. }
                | ControlError::Tls(_)
        )
    }
}

/// Serves until `shutdown` resolves. Replicas are set through Kubernetes `/scale` (by the
/// leader, see [`Control::bind_kubernetes`]) unless `--dry-run` is given or, reading a file, no
/// Kubernetes client can be built. `--dry-run` with `--source kubernetes` still reads the real
/// replica counts, elects a leader and writes the recommendations to each resource's status,
/// so a shadow trial on a cluster decides on what runs there; with a file it touches no cluster
/// ([`DryRunActuator`]: targets start at their minReplicas and are ready at once).
pub async fn run(
    args: ControlArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    const DRY: &str = "actuator: dry run (replicas are decided and reported, never set)";
    check_kubernetes_flags(&args)?;
    if args.source == Source::File && args.config.is_none() {
        // Nothing to scale: no lease, no client.
        tracing::info!("{DRY}: no --config, so no autoscalers");
        return Control::bind(&args).await?.serve(shutdown).await;
    }
    if args.dry_run && args.source == Source::File {
        tracing::info!("{DRY}: --dry-run, no cluster");
        return Control::bind(&args).await?.serve(shutdown).await;
    }
    if args.dry_run {
        tracing::info!("{DRY}: --dry-run, reading replicas through Kubernetes /scale");
        let client = kube::Client::try_default()
            .await
            .map_err(ControlError::Kubernetes)?;
        return Control::bind_kubernetes(&args, client)
            .await?
            .serve(shutdown)
            .await;
    }
    match kube::Client::try_default().await {
        Ok(client) => {
            tracing::info!(
                "actuator: Kubernetes /scale (set by the holder of the leader Lease only)"
            );
            Control::bind_kubernetes(&args, client)
                .await?
                .serve(shutdown)
                .await
        }
        Err(error) if args.source == Source::File => {
            tracing::warn!(%error, "{DRY}: no Kubernetes client");
            Control::bind(&args).await?.serve(shutdown).await
        }
        Err(error) => Err(ControlError::Kubernetes(error)),
    }
}

/// The smallest `--max-report-bytes` taken.
const MIN_REPORT_BYTES: usize = 1024;

const KUBERNETES_SOURCE_ONLY: &str =
    "only read with --source kubernetes (autoscalers come from --config here)";

/// The flags only Kubernetes reads, checked before any client is built.
fn check_kubernetes_flags(args: &ControlArgs) -> Result<(), ControlError> {
    if args.source == Source::Kubernetes
        && let Some(path) = &args.config
    {
        return Err(ControlError::Flag {
            flag: "config",
            value: path.display().to_string(),
            rule: "not with --source kubernetes (autoscalers come from FlyballAutoscalers)".into(),
        });
    }
    if args.lease_duration < Duration::from_secs(2) || args.lease_duration.subsec_nanos() != 0 {
        return Err(ControlError::Flag {
            flag: "lease-duration",
            value: format!("{:?}", args.lease_duration),
            rule: "must be whole seconds, at least 2s".into(),
        });
    }
    Ok(())
}

fn kubernetes_source(
    args: &ControlArgs,
    client: kube::Client,
) -> Result<KubernetesSource, ControlError> {
    check_kubernetes_flags(args)?;
    Ok(KubernetesSource::new(
        client,
        args.namespace.clone(),
        args.label_selector.clone(),
    ))
}

/// This replica's name: `--identity` (`$POD_NAME`), else the host name with the process id
/// (two processes on one host must not share a Lease identity).
fn instance_name(args: &ControlArgs) -> String {
    if let Some(name) = args.identity.as_ref().filter(|n| !n.is_empty()) {
        return name.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "flyball-control".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Where followers reach this replica: `--advertise-addr`, else `$POD_IP` with the gRPC port,
/// else the gRPC listen address when it names a host.
fn advertise_addr(args: &ControlArgs, grpc: Option<SocketAddr>) -> Option<String> {
    if let Some(addr) = args.advertise_addr.as_ref().filter(|a| !a.is_empty()) {
        return Some(addr.clone());
    }
    let grpc = grpc?;
    if let Some(ip) = std::env::var("POD_IP")
        .ok()
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
    {
        return Some(SocketAddr::new(ip, grpc.port()).to_string());
    }
    (!grpc.ip().is_unspecified()).then(|| grpc.to_string())
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
        let flag = |flag, value: &dyn std::fmt::Display, rule: &'static str| ControlError::Flag {
            flag,
            value: value.to_string(),
            rule: rule.into(),
        };
        // Read only from FlyballAutoscalers: with the file they would be dropped without a word.
        if args.source == Source::File {
            if let Some(namespace) = &args.namespace {
                return Err(flag("namespace", namespace, KUBERNETES_SOURCE_ONLY));
            }
            if let Some(selector) = &args.label_selector {
                return Err(flag("label-selector", selector, KUBERNETES_SOURCE_ONLY));
            }
        }
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
        if args.max_keys_per_report == 0 {
            return Err(flag("max-keys-per-report", &0, "must be >= 1"));
        }
        if args.max_keys == 0 {
            return Err(flag("max-keys", &0, "must be >= 1"));
        }
        if args.max_report_bytes < MIN_REPORT_BYTES {
            return Err(flag(
                "max-report-bytes",
                &args.max_report_bytes,
                "must be >= 1024: larger reports are refused, and even one of a single key takes \
                 hundreds of bytes",
            ));
        }
        if let Some(budget) = args.gpu_budget {
            let floor = config.gpus_at_min_replicas();
            if u64::from(budget) < floor {
                return Err(ControlError::Flag {
                    flag: "gpu-budget",
                    value: budget.to_string(),
                    rule: format!(
                        "must be >= the GPUs of every autoscaler's pools at minReplicas ({floor})"
                    )
                    .into(),
                });
            }
        }
        if args.max_reporters == 0 {
            return Err(flag("max-reporters", &0, "must be >= 1"));
        }
        if args.grpc_tls_reload_every.is_zero() {
            return Err(flag("grpc-tls-reload-every", &"0", "must be above 0"));
        }
        // The kernel takes keepalive times in whole seconds, up to 32767.
        for (name, value) in [
            ("grpc-keepalive", args.grpc_keepalive),
            ("grpc-keepalive-timeout", args.grpc_keepalive_timeout),
        ] {
            if value < Duration::from_secs(1)
                || value > Duration::from_secs(32_767)
                || value.subsec_nanos() != 0
            {
                return Err(flag(
                    name,
                    &format!("{value:?}"),
                    "must be whole seconds, from 1s to 32767s",
                ));
            }
        }
        let ingest = IngestConfig {
            stale_after: args.stale_after,
            forget_after: args.forget_after,
            max_report_bytes: args.max_report_bytes,
            max_keys_per_report: args.max_keys_per_report,
            max_keys: args.max_keys,
            max_reporters: args.max_reporters,
            departed_on_close: !args.hold_for_closed_gateways,
            ..IngestConfig::default()
        };
        let tls = tls::GrpcTls::load(tls::TlsFlags {
            cert: args.grpc_tls_cert.as_deref(),
            key: args.grpc_tls_key.as_deref(),
            ca: args.grpc_tls_ca.as_deref(),
            server_name: &args.grpc_tls_server_name,
        })
        .map_err(ControlError::Tls)?
        .map(Arc::new);
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
        let sweep_every = ingest.sweep_every();
        let telemetry = Arc::new(Telemetry::new(ingest, windows, config.selectors(), epoch));
        let status = Arc::new(Status::new(config.pools().len()));
        let actuator = Arc::new(DryRunActuator::for_config(&config));
        let config = Arc::new(LiveConfig::new(config));
        Ok(Control {
            grpc,
            tls,
            tls_reload_every: args.grpc_tls_reload_every,
            keepalive: GrpcKeepalive {
                every: args.grpc_keepalive,
                timeout: args.grpc_keepalive_timeout,
            },
            connections: ConnectionCounters::default(),
            http,
            config,
            telemetry,
            status,
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
                gpu_budget: args.gpu_budget,
            },
            sweep_every,
            leadership: Leadership::standalone(),
            source: None,
            forward: ForwardCounters::default(),
            replication: ReplicationCounters::default(),
            configured: true,
        })
    }
}

impl Control<KubeActuator> {
    /// `flyball control` on Kubernetes: autoscalers from `--config` or from FlyballAutoscalers
    /// (`--source kubernetes`), replicas set through `/scale` by the holder of the leader Lease
    /// (`--lease-name` in `--lease-namespace`) and by no one else (with `--dry-run`, read and
    /// recommended only), and followers forwarding the reports they receive to it. Nothing is
    /// served yet.
    pub async fn bind_kubernetes(
        args: &ControlArgs,
        client: kube::Client,
    ) -> Result<Self, ControlError> {
        check_kubernetes_flags(args)?;
        if args.grpc_tls_cert.is_some() && args.grpc_tls_ca.is_none() {
            // Replicas elect a leader here, and followers forward to it over TLS: they need the
            // CA to check its certificate by.
            return Err(ControlError::Flag {
                flag: "grpc-tls-ca",
                value: "(none)".into(),
                rule: "required with --grpc-tls-cert on Kubernetes: followers check the leader's \
                       certificate by it when they forward reports"
                    .into(),
            });
        }
        let source = match args.source {
            Source::Kubernetes => Some(kubernetes_source(args, client.clone())?),
            Source::File => None,
        };
        if let Some(why) = match &source {
            Some(source) => source.label_selector_refusal().await,
            None => None,
        } {
            return Err(ControlError::Flag {
                flag: "label-selector",
                value: args.label_selector.clone().unwrap_or_default(),
                rule: format!("refused by the API server: {why}").into(),
            });
        }
        let base = match source {
            Some(_) => Control::bind_with_config(args, ControlConfig::default()).await?,
            None => Control::bind(args).await?,
        };
        let secs = args.lease_duration.as_secs();
        let name = instance_name(args);
        if let Some(addr) = args.advertise_addr.as_ref().filter(|a| !a.is_empty())
            && forward::leader_uri(&forward::identity(&name, Some(addr))).is_none()
        {
            // Followers would find no address to forward to while this replica leads.
            return Err(ControlError::Flag {
                flag: "advertise-addr",
                value: addr.clone(),
                rule: "must be host:port (no scheme, no path): followers forward reports there"
                    .into(),
            });
        }
        let identity = forward::identity(&name, advertise_addr(args, base.grpc_addr()).as_deref());
        if !identity.contains('@') {
            tracing::warn!(
                %identity,
                "no address to advertise (--advertise-addr or $POD_IP): while this replica \
                 leads, followers cannot forward reports to it"
            );
        }
        let namespace = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let lease = flyball_k8s::LeaseConfig {
            lease_duration: Duration::from_secs(secs),
            renew_margin: Duration::from_secs((secs / 3).max(1)),
            ..flyball_k8s::LeaseConfig::new(&namespace, &args.lease_name, &identity)
        };
        let poll_every =
            (lease.lease_duration / 5).clamp(Duration::from_secs(1), Duration::from_secs(5));
        let leadership = Leadership::elect(client.clone(), &lease, poll_every)
            .await
            .map_err(ControlError::Lease)?;
        let actuator = Arc::new(KubeActuator::new(client, &identity));
        let control = base
            .with_actuator(actuator, args.dry_run)
            .with_leadership(leadership);
        match source {
            Some(source) => control.with_kubernetes_source(source).await,
            None => Ok(control),
        }
    }
}

impl<A: Actuator> Control<A> {
    /// Uses `actuator` instead of the dry-run one. With `dry_run`, it is only read, never set.
    pub fn with_actuator<B: Actuator>(self, actuator: Arc<B>, dry_run: bool) -> Control<B> {
        Control {
            grpc: self.grpc,
            tls: self.tls,
            tls_reload_every: self.tls_reload_every,
            keepalive: self.keepalive,
            connections: self.connections,
            http: self.http,
            config: self.config,
            telemetry: self.telemetry,
            status: self.status,
            actuator,
            clock: self.clock,
            loop_config: LoopConfig {
                dry_run,
                ..self.loop_config
            },
            sweep_every: self.sweep_every,
            leadership: self.leadership,
            source: self.source,
            forward: self.forward,
            replication: self.replication,
            configured: self.configured,
        }
    }

    /// Sets replicas only while `leadership` says so; with it, a follower forwards the reports
    /// it receives to the leader ([`forward`]). Released when serving ends.
    pub fn with_leadership(mut self, leadership: Leadership) -> Self {
        self.leadership = leadership;
        self
    }

    /// Takes the autoscalers from FlyballAutoscalers instead, listing them once now (a failed
    /// list is retried while serving; `/readyz` waits for one to succeed).
    pub async fn with_kubernetes_source(
        mut self,
        source: KubernetesSource,
    ) -> Result<Self, ControlError> {
        self.configured = false;
        match source.list().await {
            Ok(listed) => {
                let app = self.app_state();
                source.apply(&app, &listed, &mut Default::default());
                self.configured = true;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot list FlyballAutoscalers yet; retrying while serving");
            }
        }
        self.source = Some(source);
        Ok(self)
    }

    /// What the HTTP handlers and the source read.
    fn app_state(&self) -> Arc<AppState> {
        let metrics = Metrics::new(
            self.config.clone(),
            self.telemetry.clone(),
            self.status.clone(),
            &self.forward,
            &self.replication,
            &self.connections,
            self.tls.as_deref().map(tls::GrpcTls::counters),
        );
        Arc::new(AppState {
            config: self.config.clone(),
            telemetry: self.telemetry.clone(),
            status: self.status.clone(),
            metrics,
            serving: AtomicBool::new(false),
            configured: AtomicBool::new(self.configured),
            leading: self
                .leadership
                .forward
                .then(|| self.leadership.leading.clone()),
        })
    }

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

    /// The configuration in force now.
    pub fn config(&self) -> Arc<ControlConfig> {
        self.config.current()
    }

    pub fn leading(&self) -> &watch::Receiver<bool> {
        &self.leadership.leading
    }

    /// Serves gRPC, HTTP and the control loop until `shutdown` resolves or a server fails;
    /// then steps down from leadership, if held, so another replica takes over at once.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ControlError> {
        let app = self.app_state();
        let (stop_tx, stop_rx) = watch::channel(false);
        let keda = KedaScaler::new(
            self.config.clone(),
            self.status.clone(),
            self.leadership.leading.clone(),
            keda::LeaderLink::new(
                self.leadership.identity.clone(),
                self.leadership.leader.clone(),
                self.tls.clone(),
            ),
            stop_rx.clone(),
        );
        let ingest_stop = stop_rx.clone();
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let mut tasks = tokio::task::JoinSet::new();

        let mut ingest = IngestService::new(self.telemetry.clone(), ingest_stop.clone());
        let mut replication = None;
        if self.leadership.forward {
            let leader_side = Arc::new(Replication::new(
                self.leadership.leading.clone(),
                ingest_stop,
                self.replication.clone(),
            ));
            let defaults = forward::ForwardSettings::default();
            let settings = forward::ForwardSettings {
                tls: self.tls.clone(),
                // A longer --lease-duration makes a longer hand-over, and reports held through it
                // must still reach the next leader.
                resend_within: self
                    .leadership
                    .hand_over
                    .map_or(defaults.resend_within, |h| h.max(defaults.resend_within)),
                replication: Some(leader_side.clone()),
                ..defaults
            };
            // Reports are forwarded, and followed, under this name: the Lease identity of this
            // process. A restart keeps the identity (the pod's name and IP), and the leader must
            // not take the reports this process's predecessor forwarded for its own.
            let forwarding_as = format!(
                "{}#{}",
                self.leadership.identity,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            );
            let (forwarder, lanes) = Forwarder::with_settings(
                &forwarding_as,
                self.leadership.leading.clone(),
                self.leadership.leader.clone(),
                self.leadership.refresh.clone(),
                self.forward.clone(),
                settings,
            );
            ingest = ingest
                .with_forwarder(Arc::new(forwarder))
                .with_replication(leader_side.clone());
            replication = Some(leader_side);
            for lane in lanes {
                let stop = stopped();
                tasks.spawn(async move {
                    tokio::select! {
                        () = lane.run() => {}
                        () = stop => {}
                    }
                    Ok(())
                });
            }
            let following = Following {
                identity: forwarding_as,
                leading: self.leadership.leading.clone(),
                leader: self.leadership.leader.clone(),
                refresh: self.leadership.refresh.clone(),
                telemetry: self.telemetry.clone(),
                tls: self.tls.clone(),
                counters: self.replication.clone(),
            };
            let stop = stopped();
            tasks.spawn(async move {
                tokio::select! {
                    () = following.run() => {}
                    () = stop => {}
                }
                Ok(())
            });
        }
        let telemetry = self.telemetry.clone();
        let oversize = tower::util::MapResponseLayer::new(
            move |response: axum::http::Response<tonic::body::Body>| {
                refuse_oversize(response, &telemetry)
            },
        );
        let router = grpc_server()
            .layer(oversize)
            .add_service(ingest.into_server())
            .add_service(keda.into_server())
            .add_optional_service(replication.map(Replication::into_server));
        let incoming = grpc_incoming(self.grpc, self.keepalive);
        match self.tls.clone() {
            Some(tls) => {
                let incoming = futures::StreamExt::map(
                    tls.clone().incoming(incoming),
                    tracked(self.connections.clone()),
                );
                let grpc = router.serve_with_incoming_shutdown(incoming, stopped());
                tasks.spawn(async move { grpc.await.map_err(ControlError::Grpc) });
                let (every, stop) = (self.tls_reload_every, stopped());
                tasks.spawn(async move {
                    tls.reload_every(every, stop).await;
                    Ok(())
                });
            }
            None => {
                let incoming = futures::StreamExt::map(incoming, tracked(self.connections.clone()));
                let grpc = router.serve_with_incoming_shutdown(incoming, stopped());
                tasks.spawn(async move { grpc.await.map_err(ControlError::Grpc) });
            }
        }
        app.serving.store(true, Ordering::Release);

        let router = http::router(app.clone());
        let http = axum::serve(self.http, router).with_graceful_shutdown(stopped());
        tasks.spawn(async move { http.await.map_err(ControlError::Http) });

        let control_loop = controller::run(
            self.config.subscribe(),
            self.telemetry.clone(),
            self.status.clone(),
            self.actuator.clone(),
            self.clock,
            self.loop_config,
            self.leadership.leading.clone(),
            stopped(),
        );
        // What acts on the cluster (sets replicas, writes status), apart from the servers: once
        // these are done, the Lease can go, whatever the servers still have to drain.
        let mut actors = tokio::task::JoinSet::new();
        actors.spawn(async move {
            control_loop.await;
            Ok(())
        });

        if let Some(source) = self.source.clone() {
            let leading = self.leadership.leading.clone();
            let run = source.run(app.clone(), leading, stopped());
            actors.spawn(async move {
                run.await;
                Ok(())
            });
        }

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

        let config = self.config.current();
        tracing::info!(
            pools = config.pools().len(),
            autoscalers = config.autoscalers().len(),
            source = if self.source.is_some() {
                "kubernetes"
            } else {
                "file"
            },
            "control service serving"
        );
        let first = tokio::select! {
            () = shutdown => Ok(()),
            Some(done) = tasks.join_next() => flatten(done),
            Some(done) = actors.join_next() => flatten(done),
        };
        let _ = stop_tx.send(true);
        // The Lease goes as soon as nothing acts any more, not once the servers have drained: a
        // stream that cannot drain (a follower that stopped reading fills its HTTP/2 window, and
        // graceful shutdown waits for it) must not keep the next leader waiting.
        let leadership = self.leadership;
        let give_up_the_lease = async {
            let mut result = Ok(());
            if tokio::time::timeout(DRAIN, join_all(&mut actors, &mut result))
                .await
                .is_err()
            {
                tracing::debug!("still acting after {DRAIN:?}; cutting it off");
                actors.shutdown().await;
            }
            leadership.step_down().await;
            result
        };
        let drain_the_servers = async {
            let mut result = Ok(());
            if tokio::time::timeout(DRAIN, join_all(&mut tasks, &mut result))
                .await
                .is_err()
            {
                tracing::debug!("servers still busy after {DRAIN:?}; cutting them off");
                tasks.shutdown().await;
            }
            result
        };
        let (acting, serving) = tokio::join!(give_up_the_lease, drain_the_servers);
        first.and(acting).and(serving)
    }
}

/// How the gRPC port finds connections whose peer vanished without closing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcKeepalive {
    /// A connection idle this long is probed.
    pub every: Duration,
    /// And given up when its peer acknowledges nothing for this long more; what was sent on
    /// any connection, when unacknowledged for both together.
    pub timeout: Duration,
}

impl Default for GrpcKeepalive {
    fn default() -> Self {
        GrpcKeepalive {
            every: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The gRPC server's settings. Thousands of gateways hold a connection each, so per-connection
/// buffering is what memory is made of: small flow-control windows keep a burst from growing a
/// connection's buffers (a report is a few KB; larger ones just take more round trips).
/// No HTTP/2 keepalive: hyper's cost about a microsecond a report (its clock and lock on each
/// frame; the ingest bench's decode-and-ack baseline took 19.0 against 17.9 us); the kernel's
/// finds lost peers without a cost per report.
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
}

/// Accepted gRPC connections: replies are small and latency matters (an ack releases the
/// gateway's buffer), so no Nagle. A peer that vanished is found by the kernel: by keepalive
/// probes when the connection is idle, by TCP_USER_TIMEOUT when what was sent to it goes
/// unacknowledged (a leader streaming to a follower whose node is gone, which keepalive skips),
/// or it stops reading for that long. Else such a connection stays until TCP gives up (~15 min
/// with data in flight, never when idle), holding a follower's place at the leader.
pub fn grpc_incoming(
    listener: TcpListener,
    keepalive: GrpcKeepalive,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + Unpin + 'static {
    let unacknowledged_limit = keepalive.every + keepalive.timeout;
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(keepalive.every))
        // Probes often enough that the limit, not the probes' spacing, decides when to give up.
        .with_keepalive_interval(Some((keepalive.timeout / 3).max(Duration::from_secs(1))))
        .with_keepalive_retries(Some(3));
    futures::StreamExt::map(incoming, move |accepted| {
        if let Ok(stream) = &accepted {
            limit_unacknowledged(stream, unacknowledged_limit);
        }
        accepted
    })
}

/// Sets TCP_USER_TIMEOUT where the system has it; a connection without it still works.
fn limit_unacknowledged(stream: &tokio::net::TcpStream, limit: Duration) {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(limit)) {
        tracing::debug!(%error, "TCP_USER_TIMEOUT not set on an accepted gRPC connection");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
    let _ = (stream, limit);
}

/// Each accepted connection, tracked: ingest learns when, and how, a gateway's connection closes.
fn tracked<IO, E>(
    counters: ConnectionCounters,
) -> impl FnMut(Result<IO, E>) -> Result<connection::Tracked<IO>, E> {
    move |accepted| accepted.map(|io| connection::Tracked::new(io, counters.clone()))
}

/// Waits for every task of `set`, keeping the first failure in `result`.
async fn join_all(
    set: &mut tokio::task::JoinSet<Result<(), ControlError>>,
    result: &mut Result<(), ControlError>,
) {
    while let Some(done) = set.join_next().await {
        if result.is_ok() {
            *result = flatten(done);
        }
    }
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
    if let Some(reason) = rewrite_refusal(&mut parts.headers) {
        telemetry.count_refusal(reason);
    }
    let telemetry = telemetry.clone();
    let body = body.map_frame(move |mut frame| {
        if let Some(reason) = frame.trailers_mut().and_then(rewrite_refusal) {
            telemetry.count_refusal(reason);
        }
        frame
    });
    axum::http::Response::from_parts(parts, tonic::body::Body::new(body))
}

/// tonic refuses what it cannot decode before ingest sees it: a report over the size limit
/// (OUT_OF_RANGE) or bytes that are not a `ReportRequest` (INTERNAL, which tells a client the
/// fault is the server's). Both become the status ingest gives a report it refuses, naming
/// why, and are counted; returns the refusal reason.
fn rewrite_refusal(headers: &mut axum::http::HeaderMap) -> Option<&'static str> {
    let code = headers.get("grpc-status")?.as_bytes();
    if code != b"11" && code != b"13" {
        return None;
    }
    let status = tonic::Status::from_header_map(headers)?;
    let (reason, refusal) = if let Some((_, detail)) =
        status.message().split_once("message length too large: ")
    {
        (
            ingest::OVERSIZE,
            tonic::Status::resource_exhausted(format!(
                "report over the size limit (--max-report-bytes): {detail}"
            )),
        )
    } else if let Some((_, detail)) = status
        .message()
        .split_once("failed to decode Protobuf message: ")
    {
        (
            ingest::MALFORMED,
            tonic::Status::invalid_argument(format!("not a flyball.v1.ReportRequest: {detail}")),
        )
    } else {
        return None;
    };
    refusal.add_header(headers).ok().map(|()| reason)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A peer lost while data to it is unacknowledged is found by the kernel (TCP_USER_TIMEOUT):
    /// loopback cannot lose a peer, so this checks what accepted connections are given.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_give_up_on_unacknowledged_data_after_the_keepalive() {
        use futures::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let keepalive = GrpcKeepalive {
            every: Duration::from_secs(7),
            timeout: Duration::from_secs(4),
        };
        let mut incoming = grpc_incoming(listener, keepalive);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(11))
        );
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert!(socket.tcp_nodelay().unwrap());
    }
}
