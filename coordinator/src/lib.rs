//! The coordinator: a key-value store for coordination that speaks the etcd v3 gRPC API, so
//! `etcdctl` and every etcd client library work against it unchanged.
//!
//! # Layout
//! - [`config`]: etcd-style flags and environment variables.
//! - [`command`] (from `coord-log`, with the rest of the log format): the replicated command —
//!   the log's format, separate from the wire API.
//! - [`state`]: `apply`, the only code that changes the key space; leases as state.
//! - [`mvcc`]: revisions, ranges, compaction over sled ([`mvcc::backend`]).
//! - [`wal`]: the fsynced write-ahead log (CRC per record, torn tails truncated).
//! - [`node`]: the single-member pipeline that orders, logs, applies and answers (group commit).
//! - [`raft`]: the replicated mode: openraft over our log, state machine and peer service.
//! - [`member`]: what the adapters call, in either mode.
//! - [`watch`]: fan-out of events to watchers, with catch-up from history.
//! - [`lease`]: lease deadlines (the leader's clock).
//! - [`auth`]: users, roles, permissions and tokens (etcd's auth), checked on every request.
//! - [`rpc`]: thin gRPC adapters; [`error`]: the one error type and its gRPC mapping.
//! - [`backup`]: scheduled backups (`--backup-dir`): a snapshot every interval, the newest K
//!   kept.
//! - [`snapshot`]: `coordinator snapshot status|restore` (etcdutl's commands) for the files
//!   `Maintenance.Snapshot` writes.
//! - [`gateway`]: etcd's JSON gateway (`POST /v3/kv/range`, …) on the client port, calling
//!   the same [`rpc`] services in process.
//!
//! # Guarantees
//! - A write is acknowledged only after the log entry holding it was fsynced; after a crash
//!   (`kill -9` or power loss) the state machine is rebuilt from sled plus the log.
//! - Revisions, versions, compares, compaction and watch semantics follow etcd 3.4/3.5.
//! - `Defragment` rewrites sled into a fresh directory and swaps it in; a crash at any point
//!   leaves the old or the new database whole ([`mvcc::SledBackend`]).
//!
//! # Caveats
//! - One member only: replication (Raft) is the next step; the `--initial-*` and peer flags are
//!   accepted so that etcd scripts run unchanged.
//! - Leases get a full TTL again after a restart (etcd without lease checkpoints does the same).
//! - `Snapshot` streams our own format, not etcd's bolt file: `coordinator snapshot
//!   status|restore` reads it, `etcdctl snapshot status|restore` cannot.
//! - TLS (rustls, [`service_kit::tls`]) is on per port when its certificate flags are given
//!   (`--cert-file …` for clients, `--peer-cert-file …` between members); without them, auth
//!   passwords and tokens cross the network in clear text. Peers are checked by CA and by
//!   name (a member's name in the certificate's CN or DNS SAN).

pub mod auth;
pub mod backup;
// The replicated command (the log's content) lives in `coord-log`, so the fuzz targets can
// build the log format without the server; re-exported here under its old path.
pub use coord_log::command;
pub mod config;
pub mod error;
pub mod gateway;
pub mod lease;
pub mod member;
pub mod metrics;
pub mod mvcc;
pub mod node;
pub mod raft;
pub mod rpc;
pub mod snapshot;
pub mod state;
pub mod wal;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::RwLock;
use proto::etcdserverpb::auth_server::AuthServer;
use proto::etcdserverpb::cluster_server::ClusterServer;
use proto::etcdserverpb::kv_server::KvServer;
use proto::etcdserverpb::lease_server::LeaseServer;
use proto::etcdserverpb::maintenance_server::MaintenanceServer;
use proto::etcdserverpb::watch_server::WatchServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::lease::Lessor;
use crate::member::Member;
use crate::metrics::CoordinatorMetrics;
use crate::mvcc::{Backend, SledBackend};
use crate::node::{Node, NodeParts};
use crate::rpc::{Ctx, Identity, Limits};
use crate::state::StateMachine;
use crate::wal::Wal;
use crate::watch::{HeaderTemplate, WatchHub};

/// The etcd API version this server reports in `Status`.
pub const API_VERSION: &str = "3.5.0";

/// A running coordinator.
pub struct Running {
    client_addrs: Vec<SocketAddr>,
    metrics_addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    member: Member,
}

impl Running {
    /// The first bound client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addrs[0]
    }

    /// The first bound admin (metrics) address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addrs[0]
    }

    /// The member (for tests and tools in process).
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// Resolves when the server was asked to stop.
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await
    }

    /// Stop serving and wait for the servers to finish.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        // Streams end on the token; anything still running after a grace period is aborted.
        let grace = tokio::time::Instant::now() + Duration::from_secs(5);
        for mut t in self.tasks {
            if tokio::time::timeout_at(grace, &mut t).await.is_err() {
                t.abort();
            }
        }
        self.member.stop().await;
    }
}

/// Run until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let running = start(config).await?;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = running.stopped() => tracing::warn!("stopping: this member was removed from the cluster"),
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// Open the data directory, replay the log, bind the listeners and serve.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    config.validate().map_err(|e| anyhow::anyhow!(e))?;
    let tokens = config.token_config().map_err(|e| anyhow::anyhow!(e))?;
    // Certificates are read now, so that a bad file fails the start with a clear message.
    let client_tls = config
        .client_tls()
        .server_config()
        .context("client TLS (--cert-file, --key-file, --trusted-ca-file)")?;
    // Peers are authenticated by certificate (the peer CA) and by name, both ways: a
    // certificate from the right CA whose names hold no member's name is refused at the
    // handshake, whether that member dials or is dialled.
    let peer_names = PeerNames {
        live: Arc::new(std::sync::OnceLock::new()),
        initial: config
            .initial_members()
            .map_err(|e| anyhow::anyhow!(e))?
            .into_iter()
            .map(|(n, _)| n)
            .collect(),
        allowed_cn: config.peer_cert_allowed_cn.clone(),
    };
    let peer_client_tls = config
        .peer_client_tls()
        .client_config_checked(Some(peer_names.check()))
        .context("peer TLS (--peer-cert-file, --peer-key-file, --peer-trusted-ca-file)")?;
    if client_tls.is_some() || peer_client_tls.is_some() {
        service_kit::tls::reload_on_sighup();
    }
    let data_dir = config.data_dir();
    let member_dir = data_dir.join("member");
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("cannot create data dir {}", member_dir.display()))?;

    let started = std::time::Instant::now();
    let backend: Arc<dyn Backend> = Arc::new(
        SledBackend::open(&member_dir.join("snap").join("db"), config.cache_bytes)
            .context("cannot open the key space (sled)")?,
    );
    let mut state = StateMachine::open(backend.clone()).context("cannot load the key space")?;

    // Identity: derived once from name, peer URLs and token, then kept in the data dir.
    let members = config.initial_members().map_err(|e| anyhow::anyhow!(e))?;
    let peer_urls = config.initial_advertise_peer_urls.clone();
    let (cluster_id, member_id) = identity(&backend, &config, &members, &peer_urls)?;

    // A cluster of several members (or a data dir that already holds a Raft log) runs Raft;
    // one member alone orders commands itself.
    let raft_dir = member_dir.join("raft");
    let raft_mode = members.len() > 1 || raft_dir.exists();
    let mut single = None;
    let mut replayed = 0;
    let mut term = 0;
    if !raft_mode {
        let (wal, entries) =
            Wal::open(&member_dir.join("wal")).context("cannot open the write-ahead log")?;
        replayed =
            node::replay(&mut state, &entries).context("cannot replay the write-ahead log")?;
        term = entries
            .last()
            .map(|e| e.term)
            .unwrap_or(0)
            .max(state.applied_term())
            + 1;
        drop(entries);
        single = Some(wal);
    }

    let mut client_listeners = Vec::new();
    for addr in &config.listen_client_urls {
        client_listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        );
    }
    let client_addrs: Vec<SocketAddr> = client_listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let mut metrics_listeners = Vec::new();
    for addr in &config.listen_metrics_urls {
        metrics_listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        );
    }
    let metrics_addrs: Vec<SocketAddr> = metrics_listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let mut peer_listeners = Vec::new();
    if raft_mode {
        for addr in &config.listen_peer_urls {
            peer_listeners.push(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for peers on {addr}"))?,
            );
        }
    }

    let admin_metrics = service_kit::admin::Metrics::new();
    let metrics = CoordinatorMetrics::register(&admin_metrics);
    let health = service_kit::admin::Health::new();

    let lessor = Arc::new(Lessor::new());
    let revision = state.revision();
    let leases: Vec<(i64, i64)> = state.leases().iter().map(|(id, l)| (*id, l.ttl)).collect();
    let auth_gate = Arc::new(auth::Gate::new(state.auth_shared(), tokens));
    let state = Arc::new(RwLock::new(state));
    let hub = WatchHub::new(
        state.clone(),
        HeaderTemplate {
            cluster_id,
            member_id,
            raft_term: term,
        },
        tokio::runtime::Handle::current(),
    );
    let shutdown = CancellationToken::new();
    // A removed member stops serving: the token ends `run`.
    let removed = shutdown.clone();
    let mut tasks = Vec::new();
    let member = match single {
        Some(wal) => {
            lessor.promote(leases.into_iter(), Duration::ZERO);
            let node = Node::start(NodeParts {
                state: state.clone(),
                wal,
                backend: backend.clone(),
                term,
                hub: hub.clone(),
                lessor: lessor.clone(),
                metrics: metrics.clone(),
            });
            // Every term starts with an entry of its own.
            node.propose(command::Command::Noop)
                .await
                .context("cannot write the first log entry")?;
            Member::Single(node)
        }
        None => {
            let mut io = raft::RaftIo::production(raft_dir);
            if let Some(tls) = &peer_client_tls {
                io.connect = raft::network::tls(tls.clone());
            }
            let token = config.initial_cluster_token.clone();
            let initial = members
                .iter()
                .map(|(n, u)| {
                    (
                        rpc::member_id_for(u, &token),
                        raft::MemberNode {
                            name: n.clone(),
                            peer_url: u.clone(),
                        },
                    )
                })
                .collect();
            let r = raft::RaftMember::start(raft::RaftParts {
                id: member_id,
                me: raft::MemberNode {
                    name: config.name.clone(),
                    peer_url: peer_urls.first().cloned().unwrap_or_default(),
                },
                initial,
                bootstrap: config.initial_cluster_state == "new",
                token: token.clone(),
                snapshot_count: config.snapshot_count,
                removed: removed.clone(),
                io,
                election_timeout: Duration::from_millis(config.election_timeout),
                heartbeat: Duration::from_millis(config.heartbeat_interval),
                state: state.clone(),
                hub: hub.clone(),
                lessor: lessor.clone(),
                metrics: metrics.clone(),
            })
            .await
            .context("cannot start Raft")?;
            let _ = peer_names.live.set((r.clone(), state.clone()));
            let peer_tls = config
                .peer_tls()
                .server_config_checked(Some(peer_names.check()))
                .context("peer TLS (--peer-cert-file, --peer-key-file, --peer-trusted-ca-file)")?;
            for listener in peer_listeners {
                let svc = proto::peerpb::peer_server::PeerServer::new(r.peer_service())
                    .max_decoding_message_size(256 * 1024 * 1024)
                    .max_encoding_message_size(256 * 1024 * 1024);
                let stop = shutdown.clone();
                let router = tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(svc);
                let tls = peer_tls.clone();
                tasks.push(tokio::spawn(async move {
                    // tonic's tcp_nodelay applies only to listeners it binds itself; without
                    // it, Nagle + delayed ACK hold small Raft messages for ~40 ms (serve_tonic
                    // sets it on every accepted connection).
                    let res = service_kit::tls::serve_tonic(
                        router,
                        listener,
                        tls,
                        stop.cancelled_owned(),
                    )
                    .await;
                    if let Err(e) = res {
                        tracing::error!(error = %e, "peer server failed");
                    }
                }));
            }
            // Publish our client URLs once a leader exists (as etcd members publish attributes).
            let urls = config.client_urls(&client_addrs);
            let name = config.name.clone();
            let publisher = Member::Raft(r.clone());
            let stop = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let cmd = command::Command::MemberAttrs {
                        id: member_id,
                        name: name.clone(),
                        client_urls: urls.clone(),
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        res = publisher.propose(cmd) => if res.is_ok() { return },
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }));
            Member::Raft(r)
        }
    };

    if let Some(backup) = config.backup() {
        let metrics = backup::BackupMetrics::register(&admin_metrics);
        tasks.push(tokio::spawn(backup::run(
            state.clone(),
            backup,
            metrics,
            shutdown.clone(),
        )));
    }

    let ctx = Ctx {
        member: member.clone(),
        state: state.clone(),
        hub: hub.clone(),
        lessor: lessor.clone(),
        metrics: metrics.clone(),
        id: Arc::new(Identity {
            cluster_id,
            member_id,
            name: config.name.clone(),
            peer_urls,
            client_urls: config.client_urls(&client_addrs),
        }),
        limits: Limits {
            max_request_bytes: config.max_request_bytes,
            max_txn_ops: config.max_txn_ops,
            max_watchers_per_stream: config.max_watchers_per_stream,
            max_leases: config.max_leases,
            quota_backend_bytes: config.quota_backend_bytes,
        },
        nospace: Arc::new(AtomicBool::new(false)),
        auth: auth_gate.clone(),
        next_stream: Arc::new(AtomicU64::new(1)),
        shutdown: shutdown.clone(),
        version: API_VERSION,
    };

    // gRPC's own limit sits above ours so that etcd's "request is too large" is what clients see.
    let max_msg = config.max_request_bytes + 512 * 1024;
    for listener in client_listeners {
        let ctx = ctx.clone();
        let stop = shutdown.clone();
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            // gRPC metadata: hyper answers a larger header list 431 on the stream.
            .http2_max_header_list_size(config.max_metadata_bytes)
            // HTTP/1.1 too: the JSON gateway shares the port, as in etcd; the layer sends
            // non-gRPC requests to it.
            .accept_http1(true)
            .layer(tower::util::MapResponseLayer::new(rpc::too_large_as_etcd))
            .layer(gateway::GatewayLayer::new(ctx.clone()).with_cert_cn(config.client_cert_auth))
            .add_service(
                KvServer::new(rpc::kv::KvService::new(ctx.clone()))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(
                WatchServer::new(rpc::watch::WatchService::new(ctx.clone()))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(
                LeaseServer::new(rpc::lease::LeaseService::new(ctx.clone()))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(
                MaintenanceServer::new(rpc::maintenance::MaintenanceService::new(ctx.clone()))
                    .max_decoding_message_size(max_msg)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(AuthServer::new(rpc::auth::AuthService::new(ctx.clone())))
            .add_service(ClusterServer::new(
                rpc::maintenance::MaintenanceService::new(ctx.clone()),
            ));
        let tls = client_tls.clone();
        tasks.push(tokio::spawn(async move {
            let res =
                service_kit::tls::serve_tonic(router, listener, tls, stop.cancelled_owned()).await;
            if let Err(e) = res {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));
    }
    for listener in metrics_listeners {
        let router = service_kit::admin::router(health.clone(), admin_metrics.clone());
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = service_kit::admin::serve(listener, router, stop).await {
                tracing::error!(error = %e, "admin server failed");
            }
        }));
    }
    tasks.push(tokio::spawn(rpc::lease::expiry_loop(
        ctx.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(housekeeping(
        ctx.clone(),
        health.clone(),
        config.watch_progress_notify_interval,
        shutdown.clone(),
    )));

    health.set_ready(true);
    tracing::info!(
        name = %config.name,
        data_dir = %data_dir.display(),
        client = ?client_addrs,
        metrics = ?metrics_addrs,
        member_id = format!("{member_id:016x}"),
        cluster_id = format!("{cluster_id:016x}"),
        revision,
        term,
        replayed,
        auth = ?auth_gate,
        client_tls = client_tls.is_some(),
        client_cert_auth = config.client_cert_auth,
        peer_tls = peer_client_tls.is_some(),
        startup_ms = started.elapsed().as_millis() as u64,
        "coordinator ready"
    );
    Ok(Running {
        client_addrs,
        metrics_addrs,
        shutdown,
        tasks,
        member,
    })
}

/// Which names a peer certificate may carry: each member's name, as the live membership and
/// the members' published attributes know it; for a member added with `member add` that has
/// not started yet (no name), the host of its peer URL. Until this member knows a membership
/// (before Raft starts, or while joining), the `--initial-cluster` names. Plus
/// `--peer-cert-allowed-cn`.
#[derive(Clone)]
struct PeerNames {
    live: Arc<std::sync::OnceLock<(raft::RaftMember, Arc<RwLock<StateMachine>>)>>,
    initial: Vec<String>,
    allowed_cn: Option<String>,
}

impl PeerNames {
    fn check(&self) -> service_kit::tls::NameCheck {
        let me = self.clone();
        Arc::new(move |names: &[String]| {
            let members = me.names();
            names
                .iter()
                .any(|n| members.contains(n) || me.allowed_cn.as_deref() == Some(n.as_str()))
        })
    }

    fn names(&self) -> Vec<String> {
        let Some((r, state)) = self.live.get() else {
            return self.initial.clone();
        };
        let members = r.members();
        if members.is_empty() {
            return self.initial.clone();
        }
        let attrs = state.read().member_attrs();
        let mut out = Vec::new();
        for (id, node, _) in members {
            let published = attrs
                .get(&id)
                .map(|(n, _)| n.clone())
                .filter(|n| !n.is_empty());
            let unnamed = node.name.is_empty() && published.is_none();
            if !node.name.is_empty() {
                out.push(node.name.clone());
            }
            out.extend(published);
            if unnamed && let Some(host) = service_kit::tls::url_host(&node.peer_url) {
                out.push(host.to_owned());
            }
        }
        out
    }
}

fn identity(
    backend: &Arc<dyn Backend>,
    config: &Config,
    members: &[(String, String)],
    peer_urls: &[String],
) -> anyhow::Result<(u64, u64)> {
    let stored_c = backend.get(mvcc::keys::META_CLUSTER_ID)?;
    let stored_m = backend.get(mvcc::keys::META_MEMBER_ID)?;
    if let (Some(c), Some(m)) = (stored_c, stored_m) {
        return Ok((
            mvcc::keys::decode_i64(&c)? as u64,
            mvcc::keys::decode_i64(&m)? as u64,
        ));
    }
    let my_url = peer_urls.first().cloned().unwrap_or_default();
    let member_id = rpc::member_id_for(&my_url, &config.initial_cluster_token);
    let mut cluster_parts: Vec<Vec<u8>> = members
        .iter()
        .map(|(n, u)| format!("{n}={u}").into_bytes())
        .collect();
    cluster_parts.sort();
    cluster_parts.push(config.initial_cluster_token.clone().into_bytes());
    let refs: Vec<&[u8]> = cluster_parts.iter().map(|v| v.as_slice()).collect();
    let cluster_id = rpc::fnv64(&refs);
    let mut b = mvcc::Batch::default();
    b.put(
        mvcc::keys::META_CLUSTER_ID.to_vec(),
        (cluster_id as i64).to_le_bytes().to_vec(),
    );
    b.put(
        mvcc::keys::META_MEMBER_ID.to_vec(),
        (member_id as i64).to_le_bytes().to_vec(),
    );
    backend.apply(b)?;
    backend.flush()?;
    Ok((cluster_id, member_id))
}

/// Periodic chores: quota alarm, progress notifications, gauges.
async fn housekeeping(
    ctx: Ctx,
    health: service_kit::admin::Health,
    progress_every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_progress = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Ready means able to serve linearizable requests: a leader is known.
        health.set_ready(ctx.member.leader(ctx.id.member_id).is_some());
        let size = ctx.state.read().store().backend().size_on_disk();
        ctx.metrics.db_bytes.set(size as i64);
        if size > ctx.limits.quota_backend_bytes && !ctx.nospace.swap(true, Ordering::AcqRel) {
            tracing::error!(
                size,
                quota = ctx.limits.quota_backend_bytes,
                "database space exceeded: NOSPACE alarm raised"
            );
        }
        if last_progress.elapsed() >= progress_every {
            last_progress = tokio::time::Instant::now();
            ctx.hub.notify_progress();
        }
    }
}
