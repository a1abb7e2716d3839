//! The command line: global flags (each with an environment variable) and the subcommands.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// platformctl: the platform's registry, configuration, gateway rings and cluster health from
/// one command line.
///
/// Addresses default to the ports of the compose stack and of scripts/stack-local.sh, so on the
/// machine that runs either, no flag is needed. Every command prints a table for people, or
/// JSON with `-o json` for scripts. Exit codes: 0 success, 1 an error (one line on stderr),
/// 2 bad usage, 3 `cluster status` found something unhealthy.
#[derive(Debug, Parser)]
#[command(name = "platformctl", version)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Coordinator endpoints (etcd v3 API), comma-separated `host:port` or `http://host:port`.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_COORDINATOR",
        default_value = "127.0.0.1:2379",
        value_delimiter = ',',
        value_name = "ENDPOINTS"
    )]
    pub coordinator: Vec<String>,

    /// registry-svc gRPC endpoints, comma-separated.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_REGISTRY",
        default_value = "127.0.0.1:9200",
        value_delimiter = ',',
        value_name = "ENDPOINTS"
    )]
    pub registry: Vec<String>,

    /// config-svc gRPC endpoints, comma-separated.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_CONFIG",
        default_value = "127.0.0.1:9300",
        value_delimiter = ',',
        value_name = "ENDPOINTS"
    )]
    pub config: Vec<String>,

    /// lb-gateway's admin server (the `/admin/...` JSON API, health and metrics).
    #[arg(
        long,
        global = true,
        env = "PLATFORM_GATEWAY_ADMIN",
        default_value = "127.0.0.1:9103",
        value_name = "ADDR"
    )]
    pub gateway_admin: String,

    /// Admin servers of the coordinator members, for `cluster status` health probes.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_COORDINATOR_ADMIN",
        default_value = "127.0.0.1:2381,127.0.0.1:2481,127.0.0.1:2581",
        value_delimiter = ',',
        value_name = "ADDRS"
    )]
    pub coordinator_admin: Vec<String>,

    /// Admin servers of the registry-svc replicas, for `cluster status` health probes.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_REGISTRY_ADMIN",
        default_value = "127.0.0.1:9101",
        value_delimiter = ',',
        value_name = "ADDRS"
    )]
    pub registry_admin: Vec<String>,

    /// Admin servers of the config-svc replicas, for `cluster status` health probes.
    #[arg(
        long,
        global = true,
        env = "PLATFORM_CONFIG_ADMIN",
        default_value = "127.0.0.1:9102",
        value_delimiter = ',',
        value_name = "ADDRS"
    )]
    pub config_admin: Vec<String>,

    /// Bearer token sent to registry-svc and config-svc (when their auth is on).
    #[arg(
        long,
        global = true,
        env = "PLATFORM_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,

    /// File whose first line is the bearer token (instead of `--token`, which other users of
    /// the machine can see in the process list).
    #[arg(long, global = true, env = "PLATFORM_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// CA bundle (PEM) the services' certificates are checked against. With it, the
    /// coordinator, registry-svc and config-svc are dialled over TLS (as etcdctl's `--cacert`);
    /// admin addresses written `https://host:port` use it too.
    #[arg(long, global = true, env = "PLATFORM_CACERT", value_name = "FILE")]
    pub cacert: Option<std::path::PathBuf>,

    /// Client certificate (PEM) for services that require one (`--client-cert-auth`).
    #[arg(
        id = "tls_cert",
        long = "cert",
        global = true,
        env = "PLATFORM_CERT",
        value_name = "FILE"
    )]
    pub cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of `--cert`. (Its id is `tls_key`: `ring` has a positional `key`.)
    #[arg(
        id = "tls_key",
        long = "key",
        global = true,
        env = "PLATFORM_KEY",
        value_name = "FILE"
    )]
    pub key: Option<std::path::PathBuf>,

    /// Namespace of services and configuration items.
    #[arg(
        short,
        long,
        global = true,
        env = "PLATFORM_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,

    /// Output format.
    #[arg(short, long, global = true, env = "PLATFORM_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// How long one call may take before it is given up, e.g. "5s".
    #[arg(long, global = true, env = "PLATFORM_TIMEOUT", default_value = "10s",
          value_parser = service_kit::config::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (one document; streams print one document per line).
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The services of the namespace, with their instance counts.
    Services,
    /// The instances of a service.
    Instances {
        /// The service.
        service: String,
        /// Only instances the registry's health checks find healthy.
        #[arg(long)]
        healthy_only: bool,
        /// Only instances with every one of these tags.
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Only instances in this zone.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Registers an instance. It lives for its TTL unless `--keep` heart-beats it.
    Register(RegisterArgs),
    /// Removes an instance at once.
    Deregister {
        /// The service.
        service: String,
        /// The instance id.
        instance_id: String,
    },
    /// Prints a service's instances, then every change, until Ctrl-C (or `--count` changes).
    Watch {
        /// The service ("" for the whole namespace).
        service: String,
        /// Stop after this many changes (the initial listing does not count).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Configuration items: read, publish, history, diff, rollback, watch, staged rollout.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Where lb-gateway sends a key, and why. Without a key: the route's ring (members and
    /// their shares); without a route: every route.
    Ring {
        /// The route name (as in the gateway's routes file).
        route: Option<String>,
        /// The key the route hashes (header, cookie or query value, path, or client IP).
        key: Option<String>,
    },
    /// The cluster as a whole.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Prints a shell completion script, e.g. `platformctl completions bash > /etc/bash_completion.d/platformctl`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The service.
    pub service: String,
    /// The address clients reach the instance at (IP or DNS name).
    #[arg(long)]
    pub address: String,
    /// The port.
    #[arg(long)]
    pub port: u16,
    /// The instance id (generated if not given).
    #[arg(long = "id", value_name = "ID")]
    pub instance_id: Option<String>,
    /// Lease TTL in seconds: the instance goes away this long after its last heartbeat.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub ttl: u32,
    /// What the instance speaks (and how it is health-checked).
    #[arg(long, value_enum, default_value_t = Protocol::Http)]
    pub protocol: Protocol,
    /// The zone.
    #[arg(long)]
    pub zone: Option<String>,
    /// Weight in the gateway's hashing (default 100).
    #[arg(long)]
    pub weight: Option<u32>,
    /// A tag (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Metadata `key=value` (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub metadata: Vec<(String, String)>,
    /// Stay in the foreground heart-beating until Ctrl-C, then deregister.
    #[arg(long)]
    pub keep: bool,
}

/// An instance's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Http,
    Grpc,
    Tcp,
}

/// `group/key` of a configuration item (its namespace is `--namespace`).
#[derive(Debug, Clone)]
pub struct Item {
    pub group: String,
    pub key: String,
}

fn parse_item(s: &str) -> Result<Item, String> {
    match s.split_once('/') {
        Some((group, key)) if !group.is_empty() && !key.is_empty() => Ok(Item {
            group: group.to_owned(),
            key: key.to_owned(),
        }),
        _ => Err(format!(
            "{s:?} is not GROUP/KEY (e.g. demo-svc/settings.json)"
        )),
    }
}

/// Parses `key=value`.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Where new content comes from.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Content {
    /// Read the content from this file ("-" for standard input).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<std::path::PathBuf>,
    /// The content itself.
    #[arg(long, value_name = "TEXT")]
    pub content: Option<String>,
}

/// How a version is published.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub content: Content,
    /// json, yaml, toml, properties or text (default: the item's format, or the key's extension
    /// for a new item).
    #[arg(long)]
    pub format: Option<String>,
    /// Why (kept in the history).
    #[arg(long, short = 'm', default_value = "")]
    pub message: String,
    /// Who (default: $USER).
    #[arg(long)]
    pub author: Option<String>,
    /// Compare-and-set: fail unless the current version is this (0: the item must be new).
    #[arg(long, value_name = "N")]
    pub expected_version: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// A version of an item (the current one by default) with its content.
    Get {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
        /// This version instead of the current one.
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        /// Print only the content (tables only; JSON always has everything).
        #[arg(long)]
        content_only: bool,
    },
    /// Publishes a new version and makes it current.
    Put {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
        #[command(flatten)]
        publish: PublishArgs,
    },
    /// The items of the namespace.
    List {
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// An item's versions, newest first.
    History {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
    },
    /// What changed between two versions (to: the current one by default).
    Diff {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
        /// The older version.
        from: u64,
        /// The newer version (default: current).
        to: Option<u64>,
    },
    /// Publishes a new version with the content of an older one.
    Rollback {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
        /// The version whose content comes back.
        version: u64,
        /// Why (kept in the history).
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Prints the items' current versions, then every new one, until Ctrl-C (or `--count`).
    Watch {
        /// Items to watch (default: every item of the namespace, or of `--group`).
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        items: Vec<Item>,
        /// Watch every item of this group (with no items given).
        #[arg(long)]
        group: Option<String>,
        /// Stop after this many new versions (those held at the start do not count).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Staged rollout: show, start, promote or abort.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// The rollout in progress (candidate, base, rule), if any.
    Show {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
    },
    /// Publishes a candidate that only the selected clients get.
    Start {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
        #[command(flatten)]
        publish: PublishArgs,
        /// Clients whose id hashes into the first P percent (0..=100).
        #[arg(long, value_name = "P")]
        percentage: Option<u32>,
        /// Clients with this label (repeatable; all must match).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
        labels: Vec<(String, String)>,
    },
    /// Makes the candidate current for everyone.
    Promote {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
    },
    /// Ends the rollout; selected clients go back to the current version.
    Abort {
        #[arg(value_parser = parse_item, value_name = "GROUP/KEY")]
        item: Item,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Coordinator members (leader, term, Raft index, revision, size) and the health of
    /// every service's admin server.
    Status,
}
