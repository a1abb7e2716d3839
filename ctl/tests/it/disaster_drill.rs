//! The disaster drill of the operations runbook, for the services' data: a three-member
//! coordinator cluster with registry-svc and config-svc on it takes registrations and config
//! versions through the services' gRPC APIs; `etcdctl snapshot save` (the real one) saves it;
//! every member is stopped and its data dir deleted; the coordinator's `snapshot restore`
//! writes three fresh data dirs for a new cluster (new peer URLs, new token); fresh
//! registry-svc and config-svc replicas on the new cluster then serve every acknowledged
//! registration and every config version with its history, unchanged.
//!
//! Why here: the drill needs registry-svc, config-svc and the coordinator together, and `ctl`
//! is the crate that already depends on both services (and on the coordinator for its tests).
//! Putting it in registry-svc's or config-svc's tests would make one service a dev-dependency
//! of the other for this one test; the coordinator's own drill
//! (`coordinator/tests/it/snapshot_restore.rs`) cannot depend on the services, which depend on
//! it through coord-client. The members and services run in this process (this crate's tests
//! cannot rely on the coordinator binary being built), so the restore is
//! `coordinator::snapshot::restore`, the function behind `coordinator snapshot restore`.
//!
//! Leases. Registrations are lease-bound, and a snapshot holds the leases with their granted
//! TTL and their keys, as etcd's does; what it cannot hold is *when* each would have expired.
//! Like etcd (`etcdutl snapshot restore` keeps leases; a new leader gives every lease a full
//! TTL), the restored cluster gives every lease its full TTL from the moment it has a leader.
//! So what an etcd user expects, and what this drill asserts:
//! - right after the restore every acknowledged registration is there, with the same lease ID
//!   and granted TTL, none expired early;
//! - an instance whose owner heartbeats again (through the fresh registry-svc, which finds the
//!   lease from the record) stays registered: its lease is alive and renewable;
//! - an instance whose owner is gone expires one TTL later, as after any coordinator restart:
//!   the restore does not resurrect dead instances for good, nor keep them forever;
//! - an acknowledged deregistration stays done.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use clap::Parser as _;
use proto::config_v1 as cpb;
use proto::config_v1::config_client::ConfigClient;
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::{LeaseTimeToLiveRequest, RangeRequest};
use proto::registry_v1 as rpb;
use proto::registry_v1::registry_client::RegistryClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::coord::{Members, wait_until, within};
use crate::harness::{T, http_get};

const NAMES: [&str; 3] = ["drill-1", "drill-2", "drill-3"];
/// Instances of `orders` live long; those of `batch` are short-lived, to see expiry.
const LONG_TTL: u32 = 600;
const SHORT_TTL: u32 = 15;

/// registry-svc and config-svc in this process on `endpoints`, until [`Services::stop`].
struct Services {
    registry: RegistryClient<Channel>,
    config: ConfigClient<Channel>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    within(
        T,
        "connect",
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect(),
    )
    .await
    .expect("connect")
}

impl Services {
    async fn start(endpoints: &str) -> Services {
        let shutdown = CancellationToken::new();
        let reg = registry_svc::Config::try_parse_from([
            "registry-svc",
            "--coordinator-endpoints",
            endpoints,
            "--replica-ttl",
            "2s",
        ])
        .expect("registry config");
        let reg_l = registry_svc::Listeners {
            admin: bind().await,
            grpc: bind().await,
            http: bind().await,
        };
        let (reg_grpc, reg_admin) = (
            reg_l.grpc.local_addr().expect("addr"),
            reg_l.admin.local_addr().expect("addr"),
        );
        let cfg = config_svc::Config::try_parse_from([
            "config-svc",
            "--coordinator-endpoints",
            endpoints,
        ])
        .expect("config-svc config");
        let cfg_l = config_svc::Listeners {
            admin: bind().await,
            grpc: bind().await,
            http: bind().await,
        };
        let (cfg_grpc, cfg_admin) = (
            cfg_l.grpc.local_addr().expect("addr"),
            cfg_l.admin.local_addr().expect("addr"),
        );
        let tasks = vec![
            tokio::spawn(registry_svc::run_with_listeners(
                reg,
                reg_l,
                shutdown.clone(),
            )),
            tokio::spawn(config_svc::run_with_listeners(cfg, cfg_l, shutdown.clone())),
        ];
        for (what, admin) in [("registry-svc", reg_admin), ("config-svc", cfg_admin)] {
            wait_until(T, &format!("{what} to be ready"), || async move {
                http_get(admin, "/readyz").await.0 == 200
            })
            .await;
        }
        Services {
            registry: RegistryClient::new(channel(reg_grpc).await),
            config: ConfigClient::new(channel(cfg_grpc).await),
            shutdown,
            tasks,
        }
    }

    /// Stops both services and waits for them to end (they hold coordinator streams open).
    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            within(T, "a service to stop", t)
                .await
                .expect("service task")
                .expect("service ended with an error");
        }
    }
}

fn instance(svc: &str, id: &str, port: u32, ttl: u32) -> rpb::Instance {
    rpb::Instance {
        namespace: "drill".into(),
        service: svc.into(),
        instance_id: id.into(),
        address: "10.1.0.7".into(),
        port,
        ttl_seconds: ttl,
        zone: format!("zone-{}", port % 2),
        tags: vec!["drill".into()],
        metadata: [("build".to_owned(), format!("b{port}"))].into(),
        ..Default::default()
    }
}

fn iref(svc: &str, id: &str) -> rpb::InstanceRef {
    rpb::InstanceRef {
        namespace: "drill".into(),
        service: svc.into(),
        instance_id: id.into(),
    }
}

fn item(key: &str) -> cpb::ItemRef {
    cpb::ItemRef {
        namespace: "drill".into(),
        group: "app".into(),
        key: key.into(),
    }
}

/// Every instance of `svc`, sorted by ID.
async fn discover(g: &mut RegistryClient<Channel>, svc: &str) -> Vec<rpb::Instance> {
    let mut v = within(
        T,
        "Discover",
        g.discover(rpb::DiscoverRequest {
            namespace: "drill".into(),
            service: svc.into(),
            ..Default::default()
        }),
    )
    .await
    .expect("discover")
    .into_inner()
    .instances;
    v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    v
}

async fn heartbeat(g: &mut RegistryClient<Channel>, svc: &str, id: &str) -> u32 {
    within(
        T,
        "Heartbeat",
        g.heartbeat(rpb::HeartbeatRequest {
            instance: Some(iref(svc, id)),
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("heartbeat of {svc}/{id}: {e}"))
    .into_inner()
    .ttl_seconds
}

/// An item's whole history, with contents, newest first, and its current version.
async fn history(
    g: &mut ConfigClient<Channel>,
    key: &str,
) -> (Vec<cpb::Version>, cpb::GetResponse) {
    let h = within(
        T,
        "History",
        g.history(cpb::HistoryRequest {
            item: Some(item(key)),
            page_size: 100,
            include_content: true,
            ..Default::default()
        }),
    )
    .await
    .expect("history")
    .into_inner();
    assert!(
        h.next_page_token.is_empty(),
        "{key}: history has more pages"
    );
    let current = within(
        T,
        "Get",
        g.get(cpb::GetRequest {
            item: Some(item(key)),
            ..Default::default()
        }),
    )
    .await
    .expect("get")
    .into_inner();
    (h.versions, current)
}

/// The lease of `key` in the coordinator and its granted and remaining TTL.
async fn lease_of(endpoint: &str, key: &str) -> (i64, i64, i64) {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the coordinator");
    let r = KvClient::new(ch.clone())
        .range(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    let lease = r
        .kvs
        .first()
        .unwrap_or_else(|| panic!("{key} is missing"))
        .lease;
    let t = LeaseClient::new(ch)
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: lease,
            keys: false,
        })
        .await
        .expect("lease time to live")
        .into_inner();
    (lease, t.granted_ttl, t.ttl)
}

fn etcdctl_snapshot_save(endpoint: &str, file: &Path) {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            endpoint.trim_start_matches("http://"),
            "snapshot",
            "save",
            &file.display().to_string(),
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run etcdctl ({e}): the drill needs etcdctl 3.4 on PATH (.ci/run installs it)")
        });
    assert!(
        out.status.success(),
        "etcdctl snapshot save failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_drill_registrations_and_config_versions_survive_into_a_fresh_cluster() {
    let keep = tempfile::tempdir().expect("temp dir");
    let file = keep.path().join("drill.db");

    // What the services acknowledged, and how the old cluster served it.
    let mut acked_instances: BTreeMap<(String, String), rpb::Instance> = BTreeMap::new();
    let mut acked_versions: BTreeMap<String, Vec<cpb::Version>> = BTreeMap::new();
    let mut served_before = BTreeMap::new();
    let mut histories_before = BTreeMap::new();
    let mut leases_before = BTreeMap::new();
    {
        let members = Members::start(&NAMES, "drill-old").await;
        let leader = members.leader().await;
        let mut s = Services::start(&members.endpoints()).await;

        // Config: three items, several versions each, one rolled back, one compare-and-set.
        let contents: [(&str, cpb::Format, &[&str]); 3] = [
            (
                "db.json",
                cpb::Format::Json,
                &[
                    r#"{"pool": 8}"#,
                    r#"{"pool": 16, "timeout_ms": 500}"#,
                    r#"{"pool": 32, "timeout_ms": 250}"#,
                ],
            ),
            (
                "flags.yaml",
                cpb::Format::Yaml,
                &[
                    "beta: false\n",
                    "beta: true\nlimit: 3\n",
                    "beta: true\nlimit: 5\n",
                    "beta: true\nlimit: 9\n",
                ],
            ),
            ("motd.txt", cpb::Format::Text, &["hello", "bonjour"]),
        ];
        for (key, format, versions) in contents {
            for (n, content) in versions.iter().enumerate() {
                let r = within(
                    T,
                    "Publish",
                    s.config.publish(cpb::PublishRequest {
                        item: Some(item(key)),
                        format: format as i32,
                        content: (*content).into(),
                        author: "drill".into(),
                        message: format!("version {}", n + 1),
                        expected_version: Some(n as u64),
                        ..Default::default()
                    }),
                )
                .await
                .unwrap_or_else(|e| panic!("publish {key}: {e}"))
                .into_inner();
                let mut v = r.version.expect("version");
                assert_eq!(v.number, n as u64 + 1);
                // The answer acknowledges the version without echoing the content: what was
                // acknowledged is what was sent.
                if v.content.is_empty() {
                    v.content = (*content).into();
                }
                acked_versions.entry(key.into()).or_default().push(v);
            }
        }
        // db.json goes back to its first version: version 4, a copy of version 1.
        let rb = within(
            T,
            "Rollback",
            s.config.rollback(cpb::RollbackRequest {
                item: Some(item("db.json")),
                version: 1,
                author: "drill".into(),
                message: "roll back".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("rollback")
        .into_inner()
        .version
        .expect("version");
        assert_eq!((rb.number, rb.rollback_of), (4, 1));
        let mut rb = rb;
        if rb.content.is_empty() {
            rb.content = acked_versions["db.json"][0].content.clone();
        }
        acked_versions.get_mut("db.json").expect("db.json").push(rb);

        // Registry: long-lived instances of orders, short-lived ones of batch, one deregistered.
        for (svc, ttl, n) in [("orders", LONG_TTL, 6), ("batch", SHORT_TTL, 4)] {
            for i in 0..n {
                let id = format!("{svc}-{i}");
                let stored = within(
                    T,
                    "Register",
                    s.registry.register(rpb::RegisterRequest {
                        instance: Some(instance(svc, &id, 8000 + i, ttl)),
                    }),
                )
                .await
                .unwrap_or_else(|e| panic!("register {id}: {e}"))
                .into_inner()
                .instance
                .expect("instance");
                acked_instances.insert((svc.into(), id), stored);
            }
        }
        let gone = within(
            T,
            "Deregister",
            s.registry.deregister(rpb::DeregisterRequest {
                instance: Some(iref("orders", "orders-5")),
            }),
        )
        .await
        .expect("deregister")
        .into_inner();
        assert!(gone.existed);
        acked_instances.remove(&("orders".to_owned(), "orders-5".to_owned()));

        for svc in ["orders", "batch"] {
            served_before.insert(svc, discover(&mut s.registry, svc).await);
        }
        for key in acked_versions.keys() {
            histories_before.insert(key.clone(), history(&mut s.config, key).await);
        }
        // The short-lived instances are renewed just before the save, so that none of them
        // expires while the drill runs on the old cluster.
        for i in 0..4 {
            assert_eq!(
                heartbeat(&mut s.registry, "batch", &format!("batch-{i}")).await,
                SHORT_TTL
            );
        }
        for (svc, id) in acked_instances.keys() {
            let key = registry_svc::keys::instance("drill", svc, id);
            leases_before.insert(key.clone(), lease_of(&members.url(leader), &key).await.0);
        }
        etcdctl_snapshot_save(&members.url(leader), &file);

        // Disaster: the services go, then every member and its data dir.
        s.stop().await;
        members.destroy().await;
    }
    // Sanity of what was acknowledged (so the comparisons below compare something).
    assert_eq!(acked_instances.len(), 9);
    assert_eq!(acked_versions.values().map(Vec::len).sum::<usize>(), 10);
    for ((svc, id), stored) in &acked_instances {
        let served = &served_before[svc.as_str()];
        assert!(
            served.contains(stored),
            "{svc}/{id} was not served before the drill"
        );
    }

    // A fresh cluster from the file: new peer URLs, new token.
    let members = Members::start_prepared(&NAMES, "drill-new", |name, data_dir, initial, peer| {
        coordinator::snapshot::restore(&coordinator::snapshot::RestoreOptions {
            file: file.clone(),
            data_dir: data_dir.to_path_buf(),
            name: name.into(),
            initial_cluster: initial.into(),
            initial_advertise_peer_urls: vec![peer.into()],
            initial_cluster_token: "drill-new".into(),
        })
        .unwrap_or_else(|e| panic!("restore of {name}: {e}"));
    })
    .await;
    let leader = members.leader().await;
    let mut s = Services::start(&members.endpoints()).await;

    // Every acknowledged registration, as it was served (same revision, same record), and the
    // deregistered one still gone.
    for svc in ["orders", "batch"] {
        let after = discover(&mut s.registry, svc).await;
        assert_eq!(
            after, served_before[svc],
            "{svc}: the restored registry differs"
        );
    }
    for ((svc, id), stored) in &acked_instances {
        let after = discover(&mut s.registry, svc).await;
        assert!(
            after.contains(stored),
            "lost acknowledged registration {svc}/{id}"
        );
    }
    assert!(
        !discover(&mut s.registry, "orders")
            .await
            .iter()
            .any(|i| i.instance_id == "orders-5"),
        "a deregistered instance came back"
    );
    // Same leases, same granted TTL, none expired.
    for ((svc, id), stored) in &acked_instances {
        let key = registry_svc::keys::instance("drill", svc, id);
        let (lease, granted, ttl) = lease_of(&members.url(leader), &key).await;
        assert_eq!(lease, leases_before[&key], "{key}: another lease");
        assert_eq!(granted, i64::from(stored.ttl_seconds), "{key}");
        assert!(ttl > 0, "{key}: lease expired ({ttl})");
    }

    // Every config version, with its history and the current one, as acknowledged.
    for (key, versions) in &acked_versions {
        let (hist, current) = history(&mut s.config, key).await;
        assert_eq!(
            (&hist, &current),
            (&histories_before[key].0, &histories_before[key].1),
            "{key}"
        );
        let mut oldest_first = hist.clone();
        oldest_first.reverse();
        assert_eq!(oldest_first.len(), versions.len(), "{key}: versions lost");
        for (got, acked) in oldest_first.iter().zip(versions) {
            assert_eq!(
                (
                    got.number,
                    &got.content,
                    &got.checksum,
                    got.rollback_of,
                    &got.message
                ),
                (
                    acked.number,
                    &acked.content,
                    &acked.checksum,
                    acked.rollback_of,
                    &acked.message
                ),
                "{key}"
            );
        }
        let cur = current.version.expect("current version");
        assert_eq!(
            cur.number,
            versions.last().expect("a version").number,
            "{key}"
        );
        assert_eq!(
            cur.content,
            versions.last().expect("a version").content,
            "{key}"
        );
    }
    let db_current = history(&mut s.config, "db.json")
        .await
        .1
        .version
        .expect("version");
    assert_eq!((db_current.number, db_current.rollback_of), (4, 1));
    assert_eq!(db_current.content, r#"{"pool": 8}"#);

    // The new cluster goes on: a new version after the restored ones, a new registration.
    let next = within(
        T,
        "Publish",
        s.config.publish(cpb::PublishRequest {
            item: Some(item("motd.txt")),
            content: "hallo".into(),
            author: "drill".into(),
            expected_version: Some(2),
            ..Default::default()
        }),
    )
    .await
    .expect("publish after restore")
    .into_inner();
    assert_eq!(next.version.expect("version").number, 3);
    within(
        T,
        "Register",
        s.registry.register(rpb::RegisterRequest {
            instance: Some(instance("orders", "orders-new", 9000, LONG_TTL)),
        }),
    )
    .await
    .expect("register after restore");

    // Leases: batch-0's owner is back and heartbeats through the fresh registry-svc; the other
    // batch owners are gone, so their instances expire one TTL after the restore; the
    // long-lived orders stay.
    assert_eq!(
        heartbeat(&mut s.registry, "batch", "batch-0").await,
        SHORT_TTL
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(u64::from(SHORT_TTL) * 4);
    loop {
        heartbeat(&mut s.registry, "batch", "batch-0").await;
        let ids: Vec<String> = discover(&mut s.registry, "batch")
            .await
            .into_iter()
            .map(|i| i.instance_id)
            .collect();
        if ids == ["batch-0"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the unrenewed batch instances did not expire: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let orders: Vec<String> = discover(&mut s.registry, "orders")
        .await
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(
        orders,
        [
            "orders-0",
            "orders-1",
            "orders-2",
            "orders-3",
            "orders-4",
            "orders-new"
        ]
    );
    s.stop().await;
    members.destroy().await;
}
