//! The `lb-gateway` binary: see the library docs.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lb_gateway::{Config, SERVICE_NAME};
use service_kit::config::{exit_bad_config, parse_args_or_exit, parse_duration};
use service_kit::{probe, shutdown, telemetry};

/// The load-balancing gateway of the platform (placeholder: serves only
/// health and metrics).
#[derive(Debug, Parser)]
#[command(name = SERVICE_NAME, version, about)]
struct Cli {
    #[command(flatten)]
    config: Config,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Probe this service's /healthz on its admin address; exit 0 if it
    /// answers 200, 1 otherwise.
    Health {
        /// How long to wait for the answer, e.g. "500ms" or "2s".
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli: Cli = parse_args_or_exit();
    match cli.command {
        Some(Command::Health { timeout }) => health(&cli.config, timeout),
        None => serve(cli.config),
    }
}

fn health(config: &Config, timeout: Duration) -> ExitCode {
    let addr = probe::local_addr(config.admin_listen).to_string();
    match probe::check_health(&addr, "/healthz", timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("unhealthy: {err}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the Tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Inside the runtime: the OTLP exporter creates its channel here.
        let _telemetry = match telemetry::init(SERVICE_NAME, config.log_format) {
            Ok(guard) => guard,
            Err(err) => exit_bad_config(format!("{err:#}")),
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            admin_listen = %config.admin_listen,
            log_format = %config.log_format,
            "starting lb-gateway"
        );
        match lb_gateway::run(config, shutdown::token_on_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = format!("{err:#}"), "lb-gateway failed");
                ExitCode::FAILURE
            }
        }
    })
}
