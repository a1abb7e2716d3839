//! Command line and environment, in etcd's style so that scripts written for etcd run unchanged.
//!
//! Every flag also reads the environment variable etcd uses (`--data-dir` ↔ `ETCD_DATA_DIR`).
//! The peer and `--initial-*` flags are accepted and checked now; replication gives them their
//! full meaning. With no flags the server runs one member on 127.0.0.1:2379 with its data in
//! `./default.etcd`, ready for `etcdctl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use service_kit::config::{parse_duration, parse_listen_url};
use service_kit::telemetry::LogFormat;
use service_kit::tls::{ClientTlsFiles, ServerTlsFiles};

/// The coordinator's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "etcd v3 compatible coordination store"
)]
pub struct Config {
    /// Human-readable name of this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,

    /// Directory for the log and the key space (default: `<name>.etcd`).
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// URLs to serve clients on (comma-separated).
    #[arg(long, env = "ETCD_LISTEN_CLIENT_URLS", default_value = "http://127.0.0.1:2379",
          value_delimiter = ',', value_parser = parse_listen_url)]
    pub listen_client_urls: Vec<SocketAddr>,

    /// Client URLs announced to the cluster (default: the listen URLs).
    #[arg(long, env = "ETCD_ADVERTISE_CLIENT_URLS", value_delimiter = ',')]
    pub advertise_client_urls: Vec<String>,

    /// URLs to serve peers on (used once replication is on).
    #[arg(long, env = "ETCD_LISTEN_PEER_URLS", default_value = "http://127.0.0.1:2380",
          value_delimiter = ',', value_parser = parse_listen_url)]
    pub listen_peer_urls: Vec<SocketAddr>,

    /// Peer URLs announced to the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://127.0.0.1:2380",
        value_delimiter = ','
    )]
    pub initial_advertise_peer_urls: Vec<String>,

    /// Initial cluster: `name=peer-url,...` (default: this member alone).
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,

    /// `new` or `existing`.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,

    /// Token that makes cluster ids unique between clusters with the same members.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,

    /// URLs of the admin HTTP server: /metrics, /healthz, /readyz (comma-separated).
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", default_value = "http://127.0.0.1:2381",
          value_delimiter = ',', value_parser = parse_listen_url)]
    pub listen_metrics_urls: Vec<SocketAddr>,

    /// Largest request accepted, in bytes (etcd's default: 1.5 MiB).
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: usize,

    /// Most operations in one txn branch (etcd's default: 128).
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: usize,

    /// Most watchers on one watch stream; more are refused with a clear error.
    #[arg(long, env = "ETCD_MAX_WATCHERS_PER_STREAM", default_value_t = 4096)]
    pub max_watchers_per_stream: usize,

    /// Most leases alive at once; grants beyond it are refused (etcd has no cap; this one
    /// bounds the memory leases take).
    #[arg(long, env = "ETCD_MAX_LEASES", default_value_t = 1_000_000)]
    pub max_leases: usize,

    /// Largest gRPC metadata (HTTP/2 header list) of one request, in bytes; a larger one is
    /// answered HTTP 431 before it reaches a service.
    #[arg(long, env = "ETCD_MAX_METADATA_BYTES", default_value_t = 16 * 1024)]
    pub max_metadata_bytes: u32,

    /// Backend size at which the NOSPACE alarm is raised and writes refused (default 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub quota_backend_bytes: u64,

    /// Interval of progress notifications to watchers that asked for them.
    #[arg(long, env = "ETCD_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m",
          value_parser = parse_duration)]
    pub watch_progress_notify_interval: Duration,

    /// Heartbeat interval in milliseconds (used once replication is on).
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,

    /// Election timeout in milliseconds (used once replication is on).
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,

    /// Raft: applied commands between snapshots (after which the log behind a snapshot is purged).
    /// etcd's default. A snapshot copies the whole key space, so its cost grows with the
    /// store; at 20,000 (the earlier default) the copies took ~20 % of a saturated
    /// two-core machine's CPU under puts (BENCHMARKS.md).
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,

    /// sled page cache, in bytes.
    #[arg(long, env = "COORDINATOR_CACHE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub cache_bytes: u64,

    /// Auth tokens: `simple` (the default), or
    /// `jwt,priv-key=FILE,pub-key=FILE,sign-method=RS256|EdDSA|ES256|HS256|...,ttl=5m`.
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,

    /// Lifetime of simple tokens, in seconds (etcd's default: 300).
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,

    /// Certificate (PEM) of the client port; TLS is on there when set.
    #[arg(long, env = "ETCD_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<PathBuf>,

    /// Private key (PEM) of --cert-file.
    #[arg(long, env = "ETCD_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// CA bundle (PEM) client certificates are verified against.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE", value_name = "FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Require a client certificate signed by --trusted-ca-file; with auth enabled, a request
    /// without a token acts as the user named by the certificate's CN (as in etcd).
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,

    /// Certificate (PEM) of the peer port, also presented to other members; TLS between
    /// members is on when set.
    #[arg(long, env = "ETCD_PEER_CERT_FILE", value_name = "FILE")]
    pub peer_cert_file: Option<PathBuf>,

    /// Private key (PEM) of --peer-cert-file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE", value_name = "FILE")]
    pub peer_key_file: Option<PathBuf>,

    /// CA bundle (PEM) other members' certificates are verified against.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE", value_name = "FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Require other members to present a certificate signed by --peer-trusted-ca-file whose
    /// CN or a DNS SAN is a member's name (or --peer-cert-allowed-cn).
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH")]
    pub peer_client_cert_auth: bool,

    /// A certificate CN accepted from peers besides the members' names.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN", value_name = "CN")]
    pub peer_cert_allowed_cn: Option<String>,

    /// Scheduled backups: the directory each snapshot is written to (none without it).
    #[arg(long, env = "COORDINATOR_BACKUP_DIR", value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,

    /// Scheduled backups: the time between two snapshots, e.g. "15m".
    #[arg(long, env = "COORDINATOR_BACKUP_INTERVAL", default_value = "15m",
          value_name = "DURATION", value_parser = parse_duration)]
    pub backup_interval: Duration,

    /// Scheduled backups: how many of the newest snapshots are kept.
    #[arg(
        long,
        env = "COORDINATOR_BACKUP_KEEP",
        default_value_t = 7,
        value_name = "N"
    )]
    pub backup_keep: usize,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Threads that serve requests and run Raft (default: one per CPU). Members that share a
    /// machine's CPUs (a test cluster, a compose stack on one host) do better with fewer: on
    /// two cores, three members with one each carried 1–13 % more puts than with two each, the
    /// leader spending 7–14 % less CPU per put (BENCHMARKS.md, session 11). One thread runs
    /// Tokio's single-threaded scheduler, which answers a committed batch of puts with fewer
    /// writes (BENCHMARKS.md, session 12).
    #[arg(long, env = "COORDINATOR_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
}

impl Config {
    /// The scheduled backups asked for, if any.
    pub fn backup(&self) -> Option<crate::backup::BackupConfig> {
        self.backup_dir
            .as_ref()
            .map(|dir| crate::backup::BackupConfig {
                dir: dir.clone(),
                interval: self.backup_interval,
                keep: self.backup_keep,
            })
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)))
    }

    /// The initial cluster as (name, peer URL) pairs.
    pub fn initial_members(&self) -> Result<Vec<(String, String)>, String> {
        let spec = match &self.initial_cluster {
            Some(s) => s.clone(),
            None => {
                let url = self
                    .initial_advertise_peer_urls
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "http://127.0.0.1:2380".into());
                format!("{}={}", self.name, url)
            }
        };
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (n, u) = part
                .split_once('=')
                .ok_or_else(|| format!("--initial-cluster entry {part:?} is not name=url"))?;
            if n.is_empty() || u.is_empty() {
                return Err(format!("--initial-cluster entry {part:?} is not name=url"));
            }
            out.push((n.to_string(), u.to_string()));
        }
        Ok(out)
    }

    /// Check what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("--name must not be empty".into());
        }
        if self.listen_client_urls.is_empty() {
            return Err("--listen-client-urls needs at least one URL".into());
        }
        if !matches!(self.initial_cluster_state.as_str(), "new" | "existing") {
            return Err(format!(
                "--initial-cluster-state must be new or existing, not {:?}",
                self.initial_cluster_state
            ));
        }
        let members = self.initial_members()?;
        if !members.iter().any(|(n, _)| n == &self.name) {
            return Err(format!(
                "--initial-cluster has no member named {:?} (this member's --name)",
                self.name
            ));
        }
        if self.max_request_bytes < 1024 || self.max_request_bytes > 64 * 1024 * 1024 {
            return Err("--max-request-bytes must be between 1 KiB and 64 MiB".into());
        }
        if self.snapshot_count == 0 {
            return Err("--snapshot-count must be at least 1".into());
        }
        if self.backup_keep == 0 {
            return Err("--backup-keep must be at least 1".into());
        }
        if self.backup_interval < Duration::from_secs(1) {
            return Err("--backup-interval must be at least 1s".into());
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(format!(
                "--election-timeout ({} ms) must be at least 5 × --heartbeat-interval ({} ms)",
                self.election_timeout, self.heartbeat_interval
            ));
        }
        if self.max_txn_ops == 0 {
            return Err("--max-txn-ops must be at least 1".into());
        }
        if self.max_watchers_per_stream == 0 {
            return Err("--max-watchers-per-stream must be at least 1".into());
        }
        if self.max_leases == 0 {
            return Err("--max-leases must be at least 1".into());
        }
        if self.max_metadata_bytes < 1024 {
            return Err("--max-metadata-bytes must be at least 1024".into());
        }
        if self.worker_threads == Some(0) {
            return Err("--worker-threads must be at least 1".into());
        }
        if self.auth_token_ttl == 0 {
            return Err("--auth-token-ttl must be at least 1 second".into());
        }
        self.token_config()?;
        self.client_tls().validate("")?;
        self.peer_tls().validate("peer-")?;
        if self.peer_tls().enabled() && self.peer_trusted_ca_file.is_none() {
            return Err(
                "--peer-cert-file needs --peer-trusted-ca-file (the CA that signed the \
                        other members' certificates)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The client port's TLS files.
    pub fn client_tls(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            trusted_ca_file: self.trusted_ca_file.clone(),
            client_cert_auth: self.client_cert_auth,
        }
    }

    /// The peer port's TLS files (its certificate is also the one presented when dialling).
    pub fn peer_tls(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert_file: self.peer_cert_file.clone(),
            key_file: self.peer_key_file.clone(),
            trusted_ca_file: self.peer_trusted_ca_file.clone(),
            client_cert_auth: self.peer_client_cert_auth,
        }
    }

    /// How this member dials the others: the peer CA, and the peer certificate as client
    /// certificate.
    pub fn peer_client_tls(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca_file: self.peer_trusted_ca_file.clone(),
            cert_file: self.peer_cert_file.clone(),
            key_file: self.peer_key_file.clone(),
        }
    }

    /// Token settings from `--auth-token` and `--auth-token-ttl` (key files are read here).
    pub fn token_config(&self) -> Result<crate::auth::TokenConfig, String> {
        crate::auth::TokenConfig::parse(&self.auth_token, Duration::from_secs(self.auth_token_ttl))
    }

    /// Client URLs announced in member lists.
    pub fn client_urls(&self, bound: &[SocketAddr]) -> Vec<String> {
        if self.advertise_client_urls.is_empty() {
            let scheme = if self.cert_file.is_some() {
                "https"
            } else {
                "http"
            };
            bound.iter().map(|a| format!("{scheme}://{a}")).collect()
        } else {
            self.advertise_client_urls.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_one_member_on_the_etcd_port() {
        let c = Config::parse_from(["coordinator"]);
        c.validate().expect("defaults are valid");
        assert_eq!(
            c.listen_client_urls,
            vec!["127.0.0.1:2379".parse().expect("addr")]
        );
        assert_eq!(c.data_dir(), PathBuf::from("default.etcd"));
        assert_eq!(c.initial_members().expect("members").len(), 1);
    }

    #[test]
    fn initial_cluster_must_name_this_member() {
        let c = Config::parse_from([
            "coordinator",
            "--name",
            "n1",
            "--initial-cluster",
            "n2=http://x:2380",
        ]);
        assert!(
            c.validate()
                .expect_err("this member is not in the initial cluster")
                .contains("n1")
        );
    }

    #[test]
    fn worker_threads_default_to_tokios_choice_and_zero_is_refused() {
        let c = Config::parse_from(["coordinator"]);
        assert_eq!(c.worker_threads, None);
        let c = Config::parse_from(["coordinator", "--worker-threads", "1"]);
        c.validate().expect("one worker is valid");
        assert_eq!(c.worker_threads, Some(1));
        let c = Config::parse_from(["coordinator", "--worker-threads", "0"]);
        assert!(
            c.validate()
                .expect_err("zero workers serve nothing")
                .contains("--worker-threads")
        );
    }
}
