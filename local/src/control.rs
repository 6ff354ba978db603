//! flyball control in this process, on loopback ports, for the demo and the end-to-end tests.

use flyball_control::config::ControlConfig;
use flyball_control::{Control, ControlArgs};
use std::net::SocketAddr;

/// A control service serving in the background until [`LocalControl::stop`] (or drop).
pub struct LocalControl {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), flyball_control::ControlError>>>,
}

/// `flyball control`'s arguments as its command line would give them.
pub fn control_args(flags: &[&str]) -> anyhow::Result<ControlArgs> {
    use clap::{Args, FromArgMatches};
    let command = ControlArgs::augment_args(clap::Command::new("control"));
    let matches =
        command.try_get_matches_from(std::iter::once("control").chain(flags.iter().copied()))?;
    Ok(ControlArgs::from_arg_matches(&matches)?)
}

/// [`control_args`], listening on free loopback ports.
fn loopback_args(flags: &[&str]) -> anyhow::Result<ControlArgs> {
    let mut args = control_args(flags)?;
    args.grpc_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    args.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    Ok(args)
}

// === impl LocalControl ===

impl LocalControl {
    /// Starts control with the autoscalers of `config_yaml` (the `--config` file format) and
    /// `flags`, listening on free loopback ports.
    pub async fn start(config_yaml: &str, flags: &[&str]) -> anyhow::Result<LocalControl> {
        let args = loopback_args(flags)?;
        let control =
            Control::bind_with_config(&args, ControlConfig::from_yaml(config_yaml)?).await?;
        Self::serve(control)
    }

    /// Starts control as it runs in a cluster, through `client`: replicas read and set on
    /// `/scale` by the holder of the leader Lease, autoscalers from `--config` or
    /// FlyballAutoscalers (`--source kubernetes`), as `flags` say; on free loopback ports.
    pub async fn start_on_kubernetes(
        client: kube::Client,
        flags: &[&str],
    ) -> anyhow::Result<LocalControl> {
        let args = loopback_args(flags)?;
        Self::serve(Control::bind_kubernetes(&args, client).await?)
    }

    fn serve<A: flyball_control::controller::Actuator>(
        control: Control<A>,
    ) -> anyhow::Result<LocalControl> {
        let grpc = control
            .grpc_addr()
            .ok_or_else(|| anyhow::anyhow!("control has no gRPC address"))?;
        let http = control
            .http_addr()
            .ok_or_else(|| anyhow::anyhow!("control has no HTTP address"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(control.serve(async {
            let _ = stopped.await;
        }));
        Ok(LocalControl {
            grpc,
            http,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `GET /v1/pools` URL.
    pub fn pools_url(&self) -> String {
        format!("http://{}/v1/pools", self.http)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for LocalControl {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
