//! `platformctl`: one command line for the platform.
//!
//! It is a client only: every command is one or a few calls to the services' own APIs, made
//! with the same client libraries the services use (`registry_svc::client`,
//! `config_svc::client`, `coord-client`) and lb-gateway's admin JSON API.
//!
//! # Layout
//! - `cli`: the flags (each with a `PLATFORM_*` environment variable) and subcommands (clap).
//! - `registry`: `services`, `instances`, `register`, `deregister`, `watch`.
//! - `config`: `config get|put|list|history|diff|rollback|watch|rollout`.
//! - `ring`: `ring [route [key]]`, from lb-gateway's `/admin/*`.
//! - `cluster`: `cluster status` (coordinator members and every admin server's health).
//! - `output`: tables and JSON; `http`: a GET client for admin servers; `error`: the one
//!   error type, printed as one line.
//!
//! # Behaviour every command shares
//! - Tables by default, `-o json` for scripts (streams print one JSON document per line).
//! - Every call is bounded by `--timeout`; an unreachable service is named with its address.
//! - TLS as etcdctl: `--cacert` (and `--cert`/`--key` for services that require a client
//!   certificate) dials the coordinator, registry-svc and config-svc over TLS; admin addresses
//!   written `https://` use the same files. `--token` or `--token-file`: the bearer token for
//!   registry-svc and config-svc.
//! - Exit codes: 0 success, 1 error, 2 usage, 3 `cluster status` found something unhealthy.
//! - Streams (`watch`, `config watch`) run until Ctrl-C, or until `--count` events.

mod cli;
mod cluster;
mod config;
mod error;
mod http;
mod output;
mod registry;
mod ring;

use std::future::Future;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

use crate::cli::{Cli, Command, Global};
use crate::error::{CtlError, Result};

/// What every command needs: the global flags, and how to bound and describe calls.
pub struct Ctx {
    /// The global flags (`token` holds the token of `--token-file` when that was given).
    pub global: Global,
    /// TLS from `--cacert`, `--cert`, `--key`; `None`: plain TCP.
    pub tls: Option<std::sync::Arc<service_kit::tls::rustls::ClientConfig>>,
}

/// The context of `global`: the token file read, the TLS files loaded. A file that cannot be
/// read, or flags that do not fit together, are a usage error naming them.
fn context(mut global: Global) -> Result<Ctx> {
    if let Some(path) = &global.token_file {
        let token = service_kit::authn::read_token_file(Some(path))
            .map_err(|e| CtlError::Usage(format!("--token-file: {e}")))?;
        global.token = Some(token);
    }
    let files = service_kit::tls::ClientTlsFiles {
        ca_file: global.cacert.clone(),
        cert_file: global.cert.clone(),
        key_file: global.key.clone(),
    };
    files.validate("--").map_err(CtlError::Usage)?;
    let tls = files
        .client_config()
        .map_err(|e| CtlError::Usage(format!("TLS files: {e}")))?;
    Ok(Ctx { global, tls })
}

impl Ctx {
    /// Awaits `fut` for at most `--timeout`; a timeout names `service` and `addr`.
    pub async fn bounded<T>(
        &self,
        service: &'static str,
        addr: &str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.global.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CtlError::Timeout {
                service,
                addr: addr.to_owned(),
                timeout: self.global.timeout,
            }),
        }
    }
}

/// The command's success: 0, or 3 when a status command found something unhealthy.
pub enum Done {
    /// Everything as expected.
    Ok,
    /// The command ran, and what it reports is unhealthy.
    Unhealthy,
}

async fn run(cli: Cli) -> Result<Done> {
    let ctx = context(cli.global)?;
    match cli.command {
        Command::Services => registry::services(&ctx).await,
        Command::Instances {
            service,
            healthy_only,
            tags,
            zone,
        } => registry::instances(&ctx, &service, healthy_only, tags, zone).await,
        Command::Register(args) => registry::register(&ctx, args).await,
        Command::Deregister {
            service,
            instance_id,
        } => registry::deregister(&ctx, &service, &instance_id).await,
        Command::Watch { service, count } => registry::watch(&ctx, &service, count).await,
        Command::Config(cmd) => config::run(&ctx, cmd).await,
        Command::Ring { route, key } => ring::run(&ctx, route, key).await,
        Command::Cluster(cli::ClusterCommand::Status) => cluster::status(&ctx).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "platformctl",
                &mut std::io::stdout(),
            );
            Ok(Done::Ok)
        }
    }
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("platformctl: internal error: {info}");
    }));
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("platformctl: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    // Do not wait for background tasks (lazy channels, heartbeats) to wind down.
    runtime.shutdown_background();
    match result {
        Ok(Done::Ok) => ExitCode::SUCCESS,
        Ok(Done::Unhealthy) => ExitCode::from(3),
        Err(e) => {
            eprintln!("platformctl: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
