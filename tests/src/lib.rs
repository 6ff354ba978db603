//! End-to-end test support: what only tests need on top of `flyball-local` (which starts real
//! Envoy and waits for it).
//!
//! - [`receiver`]: a gRPC `TelemetryService` that records every report it is sent, and can be
//!   taken down and brought back on the same port.
#![forbid(unsafe_code)]

pub mod receiver;

/// `flyball control`'s arguments as the command line would give them, for in-process instances.
pub fn control_args(flags: &[&str]) -> anyhow::Result<flyball_control::ControlArgs> {
    use clap::{Args, FromArgMatches};
    let command = flyball_control::ControlArgs::augment_args(clap::Command::new("control"));
    let matches =
        command.try_get_matches_from(std::iter::once("control").chain(flags.iter().copied()))?;
    Ok(flyball_control::ControlArgs::from_arg_matches(&matches)?)
}

pub use flyball_local::{client, envoy, free_port, repo_root, wait_for};
