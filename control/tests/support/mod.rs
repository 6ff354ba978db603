//! A real control service on loopback ports, and a plain HTTP/1.1 client for its HTTP side.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::net::SocketAddr;

use clap::Parser;
use std::sync::Arc;

use flyball_control::config::ControlConfig;
use flyball_control::controller::Actuator;
use flyball_control::leader::Leadership;
use flyball_control::{Control, ControlArgs};
use flyball_proto::v1;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ControlArgs,
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// One autoscaler with one unified pool, fed by backend `vllm`.
pub const ONE_POOL: &str = r#"
autoscalers:
  - name: llama
    spec:
      selector: { backend: vllm }
      pools:
        unified: { scaleTargetRef: { name: llama }, maxReplicas: 10 }
      slo: { ttft: 500ms }
"#;

/// A report from `gateway`: `ok` requests and one client error for backend `vllm`, model
/// `llama`, with 100 input and 7 output tokens per ok request.
pub fn report(gateway: &str, sequence: u64, ok: u64) -> v1::ReportRequest {
    v1::ReportRequest {
        reporter: Some(v1::Reporter {
            gateway: gateway.into(),
            process_start_unix_ms: 1_000,
            filter_version: "test".into(),
        }),
        sequence,
        sent_at_unix_ms: 0,
        keys: vec![v1::KeyTelemetry {
            backend: "vllm".into(),
            model: "llama".into(),
            requests: Some(v1::RequestOutcomes {
                ok,
                client_error: 1,
                ..Default::default()
            }),
            tokens: Some(v1::TokenUsage {
                input: 100 * ok,
                output: 7 * ok,
                ..Default::default()
            }),
            ..Default::default()
        }],
        dropped: None,
        held_ms: 0,
        connections_closed: false,
    }
}

/// A running control service; stops when dropped.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), flyball_control::ControlError>>>,
}

/// Flags as the binary would parse them, on loopback ports chosen by the OS.
pub fn args(extra: &[&str]) -> ControlArgs {
    let mut argv = vec![
        "flyball-control",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    Cli::parse_from(argv).args
}

pub async fn start(yaml: &str, extra: &[&str]) -> Result<Running, Error> {
    let config = ControlConfig::from_yaml(yaml)?;
    let control = Control::bind_with_config(&args(extra), config).await?;
    spawn(control)
}

/// As [`start`], with another actuator.
pub async fn start_with<A: Actuator>(
    yaml: &str,
    extra: &[&str],
    actuator: Arc<A>,
) -> Result<Running, Error> {
    let config = ControlConfig::from_yaml(yaml)?;
    let control = Control::bind_with_config(&args(extra), config)
        .await?
        .with_actuator(actuator, false);
    spawn(control)
}

/// As [`start`], acting and forwarding as `leadership` says.
pub async fn start_led(
    yaml: &str,
    extra: &[&str],
    leadership: Leadership,
) -> Result<Running, Error> {
    let config = ControlConfig::from_yaml(yaml)?;
    let control = Control::bind_with_config(&args(extra), config)
        .await?
        .with_leadership(leadership);
    spawn(control)
}

/// As [`bind`], with the gRPC listener at `grpc`: a replica restarted where the Lease names it
/// (a container restart keeps the pod's IP, and its identity).
pub async fn bind_at(yaml: &str, grpc: SocketAddr, extra: &[&str]) -> Result<Control, Error> {
    let config = ControlConfig::from_yaml(yaml)?;
    let grpc = grpc.to_string();
    let mut argv = vec![
        "flyball-control",
        "--grpc-listen",
        grpc.as_str(),
        "--http-listen",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    let args = Cli::parse_from(argv).args;
    Ok(Control::bind_with_config(&args, config).await?)
}

/// Binds the gRPC listener first, so `leadership` can name this replica's address.
pub async fn bind(yaml: &str, extra: &[&str]) -> Result<Control, Error> {
    let config = ControlConfig::from_yaml(yaml)?;
    Ok(Control::bind_with_config(&args(extra), config).await?)
}

pub fn spawn<A: Actuator>(control: Control<A>) -> Result<Running, Error> {
    let grpc = control.grpc_addr().ok_or("no gRPC address")?;
    let http = control.http_addr().ok_or("no HTTP address")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(control.serve(async move {
        let _ = stopped.await;
    }));
    Ok(Running {
        grpc,
        http,
        stop: Some(stop),
        task: Some(task),
    })
}

impl Running {
    pub fn grpc_uri(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Stops the service and returns how `serve` ended.
    pub async fn stop(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String), Error> {
        get(self.http, path).await
    }

    /// Polls `/metrics` until `series` reads `value`, or fails after `timeout` with what it read.
    pub async fn wait_metric(
        &self,
        series: &str,
        value: f64,
        timeout: std::time::Duration,
    ) -> Result<(), Error> {
        wait_metric(self.http, series, value, timeout).await
    }

    /// `GET /v1/pools` as JSON.
    pub async fn pools(&self) -> Result<serde_json::Value, Error> {
        let (status, body) = self.get("/v1/pools").await?;
        assert_eq!(status, 200, "{body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// One sample's value from `/metrics`, by its full series text (name and labels).
    pub async fn metric(&self, series: &str) -> Result<Option<f64>, Error> {
        metric(self.http, series).await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8(body.to_vec())?))
}

/// A file of the test PKI in `tests/tls/`.
pub fn tls_fixture(name: &str) -> std::path::PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "tests", "tls", name]
        .iter()
        .collect()
}

/// The gRPC port's TLS files as a mounted Secret holds them (`tls.crt`, `tls.key`, `ca.crt`), in
/// a directory of one test's own, starting with the replica certificate of `tests/tls/`.
pub struct MountedSecret {
    pub dir: std::path::PathBuf,
}

impl MountedSecret {
    /// `name` tells the tests' directories apart (with this process's id).
    pub fn new(name: &str) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("flyball-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let secret = MountedSecret { dir };
        secret.mount("replica.crt", "tls.crt")?;
        secret.mount("replica.key", "tls.key")?;
        secret.mount("ca.crt", "ca.crt")?;
        Ok(secret)
    }

    /// Puts the fixture `from` in place as the Secret's file `to`, as a renewal does.
    pub fn mount(&self, from: &str, to: &str) -> std::io::Result<()> {
        std::fs::copy(tls_fixture(from), self.dir.join(to)).map(drop)
    }

    /// The flags serving the Secret's files, read again every 50 ms.
    pub fn flags(&self) -> Vec<String> {
        let mounted = |name: &str| self.dir.join(name).to_str().unwrap().to_owned();
        vec![
            "--grpc-tls-cert".to_owned(),
            mounted("tls.crt"),
            "--grpc-tls-key".to_owned(),
            mounted("tls.key"),
            "--grpc-tls-ca".to_owned(),
            mounted("ca.crt"),
            "--grpc-tls-reload-every".to_owned(),
            "50ms".to_owned(),
        ]
    }
}

/// A replica in a runtime of its own: [`Crashable::crash`] ends every task and connection of it
/// at once, mid-way, as when the process dies (a stop lets it finish what it was doing, and a
/// task aborted in the test's runtime leaves its connections served).
pub struct Crashable {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

/// As [`start_led`], in a runtime of its own, on its own thread.
pub fn start_crashable(
    yaml: &str,
    extra: &[&str],
    leadership: Leadership,
) -> Result<Crashable, Error> {
    let config = ControlConfig::from_yaml(yaml)?;
    let args = args(extra);
    std::thread::spawn(move || -> Result<Crashable, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let control = runtime.block_on(Control::bind_with_config(&args, config))?;
        let control = control.with_leadership(leadership);
        let grpc = control.grpc_addr().ok_or("no gRPC address")?;
        let http = control.http_addr().ok_or("no HTTP address")?;
        runtime.spawn(control.serve(std::future::pending()));
        Ok(Crashable {
            grpc,
            http,
            runtime: Some(runtime),
        })
    })
    .join()
    .map_err(|_| "the replica's thread panicked")?
}

impl Crashable {
    pub fn grpc_uri(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Everything of this replica stops where it is; its sockets close.
    pub fn crash(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    pub async fn metric(&self, series: &str) -> Result<Option<f64>, Error> {
        metric(self.http, series).await
    }
}

impl Drop for Crashable {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One sample's value from the `/metrics` of the service at `http`.
pub async fn metric(http: SocketAddr, series: &str) -> Result<Option<f64>, Error> {
    let (_, text) = get(http, "/metrics").await?;
    Ok(text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    }))
}

/// A gRPC client of the service at `uri`, connected.
pub async fn client(
    uri: String,
) -> Result<
    flyball_proto::grpc::telemetry_service_client::TelemetryServiceClient<
        tonic::transport::Channel,
    >,
    Error,
> {
    let channel = tonic::transport::Channel::from_shared(uri)?
        .connect()
        .await?;
    Ok(flyball_proto::grpc::telemetry_service_client::TelemetryServiceClient::new(channel))
}

/// Leadership fixed by the test: `leading`, and the leader at `leader`; the senders change them.
pub fn fixed(
    identity: &str,
    leading: bool,
    leader: Option<String>,
) -> (
    Leadership,
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Sender<Option<String>>,
) {
    let (leading_tx, leading_rx) = tokio::sync::watch::channel(leading);
    let (leader_tx, leader_rx) = tokio::sync::watch::channel(leader);
    (
        Leadership::from_channels(identity, leading_rx, leader_rx),
        leading_tx,
        leader_tx,
    )
}

/// Requests, errors, input and output tokens since start of the first pool in `/v1/pools`.
pub fn totals(pools: &serde_json::Value) -> (u64, u64, u64, u64) {
    let pool = &pools["pools"][0];
    let n = |k: &str| pool[k].as_u64().unwrap();
    (
        n("requests"),
        n("errors"),
        n("input_tokens"),
        n("output_tokens"),
    )
}

/// Polls the `/metrics` of the service at `http` until `series` reads a value `done` accepts, or
/// fails after `timeout` with what it read and `wanted`.
async fn wait_metric_for(
    http: SocketAddr,
    series: &str,
    timeout: std::time::Duration,
    wanted: &str,
    done: impl Fn(f64) -> bool,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = metric(http, series).await?;
        if now.is_some_and(&done) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{series} = {now:?} after {timeout:?}, wanted {wanted}").into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Polls the `/metrics` of the service at `http` until `series` reads `value`.
pub async fn wait_metric(
    http: SocketAddr,
    series: &str,
    value: f64,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    wait_metric_for(http, series, timeout, &value.to_string(), |v| v == value).await
}

/// Polls the `/metrics` of the service at `http` until `series` reads at least `min`.
pub async fn wait_at_least(
    http: SocketAddr,
    series: &str,
    min: f64,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    wait_metric_for(http, series, timeout, &format!("{min} or more"), |v| {
        v >= min
    })
    .await
}
