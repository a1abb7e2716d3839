//! The `lb-gateway` binary: see the library docs.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lb_gateway::{Config, SERVICE_NAME};
use service_kit::config::{exit_bad_config, parse_args_or_exit, parse_duration};
use service_kit::{probe, process};

/// mimalloc instead of glibc's malloc: the request path allocates small, short-lived objects
/// (header maps, buffers, futures) at a high rate, where glibc spent about 8% of the gateway's
/// CPU in the benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The load-balancing gateway of the platform: an HTTP/1.1, HTTP/2 and gRPC
/// reverse proxy routing by consistent hashing with bounded loads over the
/// registry's live instances.
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
    // A bad routes file is a bad configuration: exit 64 before anything starts.
    let routes = match config.load_routes() {
        Ok(routes) => routes,
        Err(err) => exit_bad_config(err),
    };
    if let Err(err) = config.check_routes(&routes) {
        exit_bad_config(format!("routes file: {err}"));
    }
    // The first worker's runtime: single-threaded, scheduling without cross-thread
    // synchronisation (as an nginx worker); `run` starts the other workers on threads of
    // their own.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    let runtime = builder.build();
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
                routes_file = %config.routes.as_ref().map_or("(none)".into(), |p| p.display().to_string()),
                routes = routes.routes.len(),
                registry_endpoints = %config.registry_endpoints.join(","),
                registry_token = config.registry_token_file.is_some(),
                backend_tls = config.backend_tls.configured(),
                backend_cert = config.backend_tls.backend_cert.is_some(),
                worker_threads = config.worker_threads.unwrap_or(0),
                max_connections = config.max_connections,
                max_header_bytes = config.max_header_bytes,
                header_read_timeout = ?config.header_read_timeout,
                access_log = config.access_log,
                shutdown_grace = ?config.shutdown_grace,
                dashboard_coordinator_endpoints = %config.dashboard_coordinator_endpoints.join(","),
                dashboard_config_url = %config.dashboard_config_url.join(","),
                dashboard_config_namespaces = %config.dashboard_config_namespaces.join(","),
                log_format = %config.log_format,
                "starting lb-gateway"
            );
            if config.routes.is_none() {
                tracing::warn!("no --routes file: every request will be answered 404");
            }
        },
        lb_gateway::run,
    )
}
