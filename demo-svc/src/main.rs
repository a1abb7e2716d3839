//! The `demo-svc` binary: see the library docs.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use demo_svc::{Config, SERVICE_NAME};
use service_kit::config::{exit_bad_config, parse_args_or_exit, parse_duration};
use service_kit::{probe, process};

/// The demo application of the platform: registers itself, reads its settings from config-svc,
/// and answers HTTP and gRPC with its instance id.
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
    /// Probe this instance's /readyz on its admin address (ready = registered); exit 0 if it
    /// answers 200, 1 otherwise. For container health checks.
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
    probe::exit_code(config.admin_listen, "/readyz", timeout, "not ready")
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
                listen = %config.listen,
                admin_listen = %config.admin_listen,
                instance_id = %config.instance_id,
                advertise_address = %config.advertise_address,
                registry_endpoints = %config.registry_endpoints.join(","),
                config_endpoints = %config.config_endpoints.join(","),
                namespace = %config.namespace,
                service = %config.service,
                settings_item = %config.settings_item,
                ttl = ?config.ttl,
                health_check_interval = ?config.health_check_interval,
                log_format = %config.log_format,
                tls = config.tls.cert_file.is_some(),
                client_cert_auth = config.tls.client_cert_auth,
                "starting demo-svc"
            );
        },
        demo_svc::run,
    )
}
