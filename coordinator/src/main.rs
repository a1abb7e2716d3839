//! The `coordinator` binary: see the library docs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use coordinator::Config;
use service_kit::config::{exit_bad_config, parse_args_or_exit, parse_duration};
use service_kit::{probe, process};

/// mimalloc instead of glibc's malloc: a put allocates many small, short-lived objects (the
/// gRPC frames and buffers, the command, sled's nodes and the Raft entry) on several threads,
/// where glibc's malloc and free took about 10 % of the leader's CPU under load
/// (`BENCHMARKS.md`, session 12).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Inspect or restore a snapshot written by `etcdctl snapshot save` (etcdutl's commands).
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotAction {
    /// Check a snapshot's checksums and print its hash, revision, total keys and total size.
    Status {
        /// The snapshot file.
        file: PathBuf,
        /// Output format: simple, table or json.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Write a fresh data directory for a new cluster member from a snapshot.
    Restore {
        /// The snapshot file.
        file: PathBuf,
        /// The new member's data directory (must not exist or be empty).
        #[arg(long = "data-dir")]
        data_dir: Option<PathBuf>,
        /// The new member's name.
        #[arg(long = "name", default_value = "default")]
        name: String,
        /// The new cluster: `name=peer-url,...` (default: this member alone).
        #[arg(long = "initial-cluster")]
        initial_cluster: Option<String>,
        /// This member's peer URLs.
        #[arg(
            long = "initial-advertise-peer-urls",
            default_value = "http://127.0.0.1:2380",
            value_delimiter = ','
        )]
        initial_advertise_peer_urls: Vec<String>,
        /// The new cluster's token.
        #[arg(long = "initial-cluster-token", default_value = "etcd-cluster")]
        initial_cluster_token: String,
    },
}

fn main() -> ExitCode {
    let cli: Cli = parse_args_or_exit();
    // Snapshot tools do not run a server: the server's flags do not matter to them.
    if let Some(Command::Snapshot { action }) = cli.command {
        return snapshot(action);
    }
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
        Some(Command::Snapshot { .. }) => ExitCode::FAILURE,
        None => serve(cli.config),
    }
}

fn snapshot(action: SnapshotAction) -> ExitCode {
    use coordinator::snapshot;
    let result = match action {
        SnapshotAction::Status { file, write_out } => snapshot::status(&file)
            .and_then(|info| snapshot::format_status(&info, &write_out))
            .map(|out| println!("{out}")),
        SnapshotAction::Restore {
            file,
            data_dir,
            name,
            initial_cluster,
            initial_advertise_peer_urls,
            initial_cluster_token,
        } => {
            let first_url = initial_advertise_peer_urls
                .first()
                .cloned()
                .unwrap_or_default();
            let opts = snapshot::RestoreOptions {
                file,
                data_dir: data_dir.unwrap_or_else(|| PathBuf::from(format!("{name}.etcd"))),
                initial_cluster: initial_cluster.unwrap_or_else(|| format!("{name}={first_url}")),
                name,
                initial_advertise_peer_urls,
                initial_cluster_token,
            };
            snapshot::restore(&opts).map(|r| {
                println!(
                    "restored snapshot {} (revision {}, {} entries) into {}: member {:016x} of cluster {:016x}",
                    opts.file.display(),
                    r.revision,
                    r.entries,
                    opts.data_dir.display(),
                    r.member_id,
                    r.cluster_id
                );
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> ExitCode {
    // One thread: the single-threaded scheduler, which answers a committed batch of puts with
    // fewer writes (see `process::runtime`).
    let runtime = process::runtime(config.worker_threads);
    let log_format = config.log_format;
    process::run(
        runtime,
        "coordinator",
        log_format,
        config,
        |config| tracing::info!(config = ?config, "starting coordinator"),
        coordinator::run,
    )
}
