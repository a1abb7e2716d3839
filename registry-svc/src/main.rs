//! The `registry-svc` binary: see the library docs.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use registry_svc::{Config, SERVICE_NAME};
use service_kit::config::{exit_bad_config, parse_args_or_exit, parse_duration};
use service_kit::{probe, process};

/// The service registry of the platform: registration, discovery, health
/// checking and watches over the coordinator.
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
    probe::exit_code(config.admin_listen, "/healthz", timeout, "unhealthy")
}

fn serve(config: Config) -> ExitCode {
    if let Err(err) = config.validate() {
        exit_bad_config(err);
    }
    let runtime = tokio::runtime::Runtime::new();
    let log_format = config.log_format;
    process::run(
        runtime,
        SERVICE_NAME,
        log_format,
        config,
        |config| {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                admin_listen = %config.admin_listen,
                grpc_listen = %config.grpc_listen,
                http_listen = %config.http_listen,
                coordinator_endpoints = %config.coordinator_endpoints.join(","),
                replica_id = %config.replica_id,
                replica_ttl = ?config.replica_ttl,
                log_format = %config.log_format,
                auth_mode = %config.auth.modes(),
                check_cacert = ?config.check_tls.check_cacert,
                "starting registry-svc"
            );
        },
        registry_svc::run,
    )
}
