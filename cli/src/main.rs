//! `flyball`: one binary, one subcommand per job. It parses arguments, starts the runtime, calls
//! the library that does the work, and turns errors into a message and an exit code (64 for bad
//! usage or configuration, as sysexits.h has it).
//!
//! - `flyball control`: the control service (flyball-control).
//! - `flyball sim`: the OpenAI-compatible model-server simulator (flyball-sim).
//! - `flyball demo`: simulator + real Envoy with the filter + control, on this machine
//!   (flyball-local).
#![forbid(unsafe_code)]

/// jemalloc rather than the system allocator: every report the control service takes is decoded
/// into a few dozen small allocations, and with glibc's malloc they were a sixth of its CPU.
/// Measured by `cargo bench -p flyball-control --bench ingest` (10,000 gateways at 1 Hz, the two
/// builds alternating): 29.5 and 29.9 us of CPU per report against 38.1 and 38.2 us, with 8%
/// more memory.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "flyball",
    version,
    about = "Token-latency autoscaling for LLM inference behind Envoy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control service: gateway telemetry in, replica counts out.
    Control(Box<flyball_control::ControlArgs>),
    /// Run the OpenAI-compatible model-server simulator (a vLLM stand-in without GPUs).
    Sim(SimArgs),
    /// Run a local demo: the simulator, real Envoy with the filter, and flyball control.
    Demo(flyball_local::demo::DemoArgs),
}

#[derive(clap::Args)]
struct SimArgs {
    /// Address to listen on (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Model names served, as vLLM's flag: answers carry the first; a request naming any other
    /// gets vLLM's 404.
    #[arg(long = "served-model-name", visible_alias = "model", value_name = "NAME", num_args = 1.., default_value = "sim-llama-3-8b")]
    served_model_names: Vec<String>,
    /// Answer a request naming any model, echoing the name (one simulator behind routes for
    /// several models); vLLM would answer 404.
    #[arg(long)]
    serve_any_model: bool,
    /// Prompt tokens prefilled per second.
    #[arg(long, default_value_t = 10_000.0)]
    prefill_tokens_per_s: f64,
    /// Fixed cost of one engine step, in milliseconds.
    #[arg(long = "step-base-ms", value_name = "MS", default_value = "10", value_parser = milliseconds)]
    step_base: Duration,
    /// Extra step cost per running sequence, in milliseconds.
    #[arg(long = "step-per-sequence-ms", value_name = "MS", default_value = "0.2", value_parser = milliseconds)]
    step_per_sequence: Duration,
    /// Most sequences running at once (vLLM's --max-num-seqs).
    #[arg(long, default_value_t = 64)]
    max_running_sequences: usize,
    /// Most tokens one engine step schedules, decodes and prefill chunks together (vLLM's
    /// --max-num-batched-tokens): longer prompts are prefilled over several steps.
    #[arg(long, visible_alias = "max-num-batched-tokens", default_value_t = 2048)]
    max_tokens_per_step: u64,
}

/// A duration in milliseconds, fractions allowed: finite, not negative, at most an hour.
fn milliseconds(text: &str) -> Result<Duration, String> {
    let ms: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if !(ms.is_finite() && (0.0..=3_600_000.0).contains(&ms)) {
        return Err("must be a number of milliseconds from 0 to 3600000".to_owned());
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

/// Exit code for bad usage or configuration (sysexits.h EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flyball: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Control(args) => flyball_control::run(*args, shutdown_signal())
                .await
                .map_err(anyhow::Error::from),
            Command::Sim(args) => run_sim(args).await,
            // Raced with Ctrl-C and SIGTERM so the demo is dropped, not killed: Envoy (a child
            // process, which SIGTERM to flyball alone would leave running) and its directory go.
            Command::Demo(args) => {
                let keep_running = args.keep_running;
                tokio::select! {
                    result = flyball_local::demo::run(args) => result,
                    () = shutdown_signal() => if keep_running {
                        Ok(())
                    } else {
                        Err(anyhow::anyhow!("interrupted"))
                    },
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flyball: {}", error_chain(&error));
            let usage = error.downcast_ref::<flyball_sim::SimError>().is_some()
                || error
                    .downcast_ref::<flyball_control::ControlError>()
                    .is_some_and(flyball_control::ControlError::is_usage);
            if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes, skipping a cause whose text the message before it already shows
/// (flyball's error types print their source inside their own message).
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn run_sim(args: SimArgs) -> anyhow::Result<()> {
    let mut names = args.served_model_names.into_iter();
    let config = flyball_sim::SimConfig {
        model: names.next().unwrap_or_default(),
        aliases: names.collect(),
        refuse_other_models: !args.serve_any_model,
        engine: flyball_sim::EngineModel {
            prefill_tokens_per_s: args.prefill_tokens_per_s,
            step_base: args.step_base,
            step_per_sequence: args.step_per_sequence,
            max_running_sequences: args.max_running_sequences,
            max_tokens_per_step: args.max_tokens_per_step,
        },
        ..flyball_sim::SimConfig::default()
    };
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %args.listen, "flyball sim serving");
    flyball_sim::serve(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Ctrl-C or SIGTERM (what Kubernetes sends before it kills a pod).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_times_are_milliseconds_a_duration_can_hold() {
        assert_eq!(milliseconds("0.2"), Ok(Duration::from_micros(200)));
        // `Duration::from_secs_f64` panics on each of these.
        for bad in ["-1", "NaN", "inf", "1e30", "ten"] {
            assert!(milliseconds(bad).is_err(), "{bad}");
        }
    }
}
