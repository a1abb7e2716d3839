//! registry-svc over a three-member Raft coordinator whose leader goes away.
//!
//! The members run in this process (the registry's tests cannot rely on the coordinator binary
//! being built); "killed" here means the leader member stops serving at once, client and peer
//! ports included, and never comes back during the test. Durability of acknowledged writes across
//! a real `kill -9` is proven in the coordinator's own process-level tests; what this file proves
//! is the registry's side: registrations made before survive, the registry keeps serving through
//! the survivors, and a watch resumes with every change once and in order.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser as _;
use proto::etcdserverpb::StatusRequest;
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::registry_v1 as pb;
use proto::registry_v1::watch_response::Event;

use crate::coord::{wait_until, within};
use crate::harness::{Registry, T, discover, ids, instance, register};

/// Three coordinator members in this process.
struct RaftCluster {
    members: Vec<Option<coordinator::Running>>,
    clients: Vec<SocketAddr>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl RaftCluster {
    async fn start() -> RaftCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let names = ["m1", "m2", "m3"];
        let peers: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let initial = names
            .iter()
            .zip(&peers)
            .map(|(n, p)| format!("{n}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (name, peer) in names.iter().zip(&peers) {
            let data = dir.path().join(name).display().to_string();
            let peer_url = format!("http://127.0.0.1:{peer}");
            let config = coordinator::Config::parse_from([
                "coordinator",
                "--name",
                name,
                "--data-dir",
                &data,
                "--listen-client-urls",
                "http://127.0.0.1:0",
                "--listen-metrics-urls",
                "http://127.0.0.1:0",
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                "registry-failover",
            ]);
            let running = within(T, "member start", coordinator::start(config))
                .await
                .expect("coordinator::start");
            members.push(running);
        }
        let clients = members.iter().map(|m| m.client_addr()).collect();
        RaftCluster {
            members: members.into_iter().map(Some).collect(),
            clients,
            _dir: dir,
        }
    }

    /// `http://a,http://b,http://c`: what `--coordinator-endpoints` takes.
    fn endpoints(&self) -> String {
        self.clients
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the member every live member names as leader, once they agree.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + T;
        loop {
            let mut seen = Vec::new();
            for (i, addr) in self.clients.iter().enumerate() {
                if self.members[i].is_none() {
                    continue;
                }
                let status = async {
                    let mut m = MaintenanceClient::connect(format!("http://{addr}"))
                        .await
                        .ok()?;
                    m.status(StatusRequest {})
                        .await
                        .ok()
                        .map(|r| r.into_inner())
                };
                if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(2), status).await {
                    seen.push((i, s.header.map(|h| h.member_id).unwrap_or(0), s.leader));
                }
            }
            let live = self.members.iter().filter(|m| m.is_some()).count();
            if seen.len() == live
                && seen[0].2 != 0
                && seen.iter().all(|s| s.2 == seen[0].2)
                && let Some(l) = seen.iter().find(|s| s.1 == seen[0].2)
            {
                return l.0;
            }
            assert!(Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops member `i` for good.
    async fn kill(&mut self, i: usize) {
        let running = self.members[i].take().expect("running");
        within(T, "member stop", running.shutdown()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_leader_killed_registrations_survive_and_watches_resume_without_gaps() {
    let mut cluster = RaftCluster::start().await;
    let old_leader = cluster.leader().await;
    let r = Registry::start(&cluster.endpoints()).await;

    // One instance kept alive by the client library (TTL 3 s: it must outlive the failover),
    // one registered once with a long TTL.
    let client = r.client();
    let mut kept = instance("lk", "svc", "kept", 1);
    kept.ttl_seconds = 3;
    let _reg = client.register(kept).await.expect("register");
    let mut g = r.grpc().await;
    let mut expected = vec![
        register(&mut g, instance("lk", "svc", "before", 1))
            .await
            .revision,
    ];

    let mut s = g
        .watch(pb::WatchRequest {
            namespace: "lk".into(),
            service: "svc".into(),
            after_revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    match within(T, "snapshot", s.message())
        .await
        .expect("ok")
        .expect("open")
        .event
    {
        Some(Event::Snapshot(snap)) => {
            let mut present: Vec<String> = snap
                .instances
                .iter()
                .map(|i| i.instance_id.clone())
                .collect();
            present.sort();
            assert_eq!(present, vec!["before", "kept"]);
        }
        other => panic!("expected a snapshot first, got {other:?}"),
    }

    cluster.kill(old_leader).await;
    let killed_at = Instant::now();

    // Registrations right after the loss of the leader: the registry's coordinator client
    // moves to a survivor and retries until a new leader commits them.
    for n in 0..3 {
        expected.push(
            register(&mut g, instance("lk", "svc", &format!("after{n}"), 1))
                .await
                .revision,
        );
    }
    let recovered = killed_at.elapsed();
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, old_leader, "a survivor leads");

    // The watch opened before the failover sees every change after its snapshot once, in order.
    let mut got = Vec::new();
    while got.len() < expected.len() - 1 {
        let msg = within(T, "watch change", s.message())
            .await
            .expect("ok")
            .expect("open");
        match msg.event {
            Some(Event::Change(ch)) => {
                let id = ch.instance.map(|i| i.instance_id).unwrap_or_default();
                if id != "kept" {
                    got.push(ch.revision);
                }
            }
            // A fresh snapshot would mean the registry lost its place; here the history is intact.
            Some(Event::Snapshot(_)) => panic!("unexpected re-snapshot after a leader change"),
            _ => {}
        }
    }
    assert_eq!(
        got,
        expected[1..].to_vec(),
        "every change after the snapshot once, in order, across the leader change"
    );

    // Everything registered before and after is there, and the kept instance outlives its TTL.
    let want = vec!["after0", "after1", "after2", "before", "kept"];
    assert_eq!(ids(&discover(&mut g, "lk", "svc", false).await), want);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let present = ids(&discover(&mut g, "lk", "svc", false).await);
        assert!(present.contains(&"kept".to_string()), "{present:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A watch resumed from a revision taken before the failover replays the rest, no snapshot.
    let mut resumed = g
        .watch(pb::WatchRequest {
            namespace: "lk".into(),
            service: "svc".into(),
            after_revision: expected[0],
        })
        .await
        .expect("resume")
        .into_inner();
    let mut replayed = Vec::new();
    while replayed.len() < expected.len() - 1 {
        let msg = within(T, "resumed change", resumed.message())
            .await
            .expect("ok")
            .expect("open");
        match msg.event {
            Some(Event::Change(ch)) => {
                let id = ch.instance.map(|i| i.instance_id).unwrap_or_default();
                if id != "kept" {
                    replayed.push(ch.revision);
                }
            }
            Some(Event::Snapshot(_)) => panic!("a resume from a live revision must not snapshot"),
            _ => {}
        }
    }
    assert_eq!(replayed, expected[1..].to_vec());
    eprintln!("registrations flowed again {recovered:?} after the leader was stopped");

    wait_until(T, "the registry to stay ready", || async {
        crate::harness::http_call(r.admin, "GET", "/readyz", None)
            .await
            .0
            == 200
    })
    .await;
    r.stop().await;
    for i in 0..3 {
        if cluster.members[i].is_some() {
            cluster.kill(i).await;
        }
    }
}
