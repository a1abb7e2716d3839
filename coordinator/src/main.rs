//! The `coordinator` binary: see the library docs.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use coordinator::Config;
use service_kit::config::{exit_bad_config, parse_args_or_exit, parse_duration};
use service_kit::{probe, shutdown, telemetry};

/// etcd v3 compatible coordination store.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about)]
struct Cli {
    #[command(flatten)]
    config: Config,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Probe this member's /healthz on its metrics address; exit 0 if it answers 200.
    Health {
        /// How long to wait, e.g. "500ms" or "2s".
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli: Cli = parse_args_or_exit();
    if let Err(e) = cli.config.validate() {
        exit_bad_config(e);
    }
    match cli.command {
        Some(Command::Health { timeout }) => {
            let Some(addr) = cli.config.listen_metrics_urls.first() else {
                exit_bad_config("--listen-metrics-urls is empty");
            };
            match probe::check_health(&probe::local_addr(*addr).to_string(), "/healthz", timeout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => serve(cli.config),
    }
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let _telemetry = match telemetry::init("coordinator", config.log_format) {
            Ok(g) => g,
            Err(e) => exit_bad_config(format!("{e:#}")),
        };
        tracing::info!(config = ?config, "starting coordinator");
        match coordinator::run(config, shutdown::token_on_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "coordinator failed");
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
