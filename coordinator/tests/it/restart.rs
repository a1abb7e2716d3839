//! Durability: what the server acknowledged survives SIGKILL of the process, with the same
//! revisions, and the revision counter and leases carry on after restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::etcdserverpb::request_op::Request;
use proto::etcdserverpb::{
    DeleteRangeRequest, HashKvRequest, LeaseGrantRequest, LeaseLeasesRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use proto::mvccpb::KeyValue;
use tonic::transport::Channel;

use crate::harness::{Process, Server, channel, put, wait_until, within};

const T: Duration = Duration::from_secs(10);

/// What a key must look like after restart.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

impl From<&KeyValue> for Expected {
    fn from(kv: &KeyValue) -> Self {
        Expected {
            value: kv.value.clone(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// A model of the key space built from acknowledged responses only.
#[derive(Default)]
struct Model {
    keys: BTreeMap<Vec<u8>, Expected>,
    last_revision: i64,
}

impl Model {
    fn put(&mut self, key: &str, value: &str, lease: i64, revision: i64) {
        assert!(revision >= self.last_revision, "revisions never go back");
        self.last_revision = revision;
        let entry = self.keys.entry(key.as_bytes().to_vec());
        let e = entry.or_insert(Expected {
            value: Vec::new(),
            create_revision: revision,
            mod_revision: revision,
            version: 0,
            lease,
        });
        e.value = value.as_bytes().to_vec();
        e.mod_revision = revision;
        e.version += 1;
        e.lease = lease;
    }

    fn delete(&mut self, key: &str, revision: i64) {
        self.last_revision = revision;
        self.keys.remove(key.as_bytes());
    }
}

async fn all_keys(kv: &mut KvClient<Channel>) -> (BTreeMap<Vec<u8>, Expected>, i64) {
    let resp = within(
        T,
        "range of all keys",
        kv.range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        }),
    )
    .await
    .expect("range of all keys")
    .into_inner();
    let map = resp
        .kvs
        .iter()
        .map(|kv| (kv.key.clone(), Expected::from(kv)))
        .collect();
    (map, resp.header.expect("header").revision)
}

/// Writes a mix of puts, overwrites, deletes and a multi-op txn, recording every ack.
async fn write_history(kv: &mut KvClient<Channel>, model: &mut Model, lease_id: i64, round: usize) {
    for i in 0..150 {
        let key = format!("k/{:03}", i % 60);
        let value = format!("r{round}-{i}");
        let rev = put(kv, &key, &value).await;
        model.put(&key, &value, 0, rev);
    }
    let req = PutRequest {
        key: format!("leased/{round}").into_bytes(),
        value: b"held".to_vec(),
        lease: lease_id,
        ..Default::default()
    };
    let rev = kv
        .put(req)
        .await
        .expect("put with lease")
        .into_inner()
        .header
        .expect("h")
        .revision;
    model.put(&format!("leased/{round}"), "held", lease_id, rev);

    for i in (0..60).step_by(7) {
        let key = format!("k/{i:03}");
        let resp = kv
            .delete_range(DeleteRangeRequest {
                key: key.clone().into_bytes(),
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_inner();
        assert_eq!(resp.deleted, 1);
        model.delete(&key, resp.header.expect("h").revision);
    }

    // Several writes in one txn: one revision for all.
    let ops: Vec<RequestOp> = (0..5)
        .map(|i| RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: format!("txn/{round}/{i}").into_bytes(),
                value: b"t".to_vec(),
                ..Default::default()
            })),
        })
        .collect();
    let resp = kv
        .txn(TxnRequest {
            success: ops,
            ..Default::default()
        })
        .await
        .expect("txn")
        .into_inner();
    let rev = resp.header.expect("h").revision;
    for i in 0..5 {
        model.put(&format!("txn/{round}/{i}"), "t", 0, rev);
    }
}

/// Puts unique keys from several tasks until the connection dies; returns every acked (key, rev).
fn spawn_inflight_writers(
    url: &str,
    acked: Arc<Mutex<Vec<(String, i64)>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|w| {
            let url = url.to_string();
            let acked = acked.clone();
            tokio::spawn(async move {
                let mut kv = KvClient::new(channel(&url).await);
                for i in 0.. {
                    let key = format!("inflight/{w}/{i:06}");
                    let req = PutRequest {
                        key: key.clone().into_bytes(),
                        value: b"x".to_vec(),
                        ..Default::default()
                    };
                    match tokio::time::timeout(T, kv.put(req)).await {
                        Ok(Ok(resp)) => {
                            let rev = resp.into_inner().header.map(|h| h.revision).unwrap_or(0);
                            acked.lock().expect("lock").push((key, rev));
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

/// Maintenance.HashKV at `revision`.
async fn hash_kv(url: &str, revision: i64) -> u32 {
    let mut m = MaintenanceClient::new(channel(url).await);
    within(T, "HashKV", m.hash_kv(HashKvRequest { revision }))
        .await
        .expect("HashKV")
        .into_inner()
        .hash
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_and_leases_survive_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut model = Model::default();

    let process = Process::start(&data, dir.path()).await;
    let mut kv = KvClient::new(channel(&process.url()).await);
    let mut lease = LeaseClient::new(channel(&process.url()).await);
    let lease_id = lease
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id;
    write_history(&mut kv, &mut model, lease_id, 0).await;

    // The history's hash at this revision must not change across the kill.
    let hash_rev = model.last_revision;
    let hash_before = hash_kv(&process.url(), hash_rev).await;

    // Kill while writes are in flight: every acked one must survive.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers = spawn_inflight_writers(&process.url(), acked.clone());
    wait_until(T, "200 in-flight puts acknowledged", || {
        let n = acked.lock().expect("lock").len();
        async move { n >= 200 }
    })
    .await;
    process.kill9();
    for w in writers {
        within(T, "writers to notice the kill", w)
            .await
            .expect("writer task");
    }
    let inflight = acked.lock().expect("lock").clone();
    let max_acked = inflight
        .iter()
        .map(|(_, r)| *r)
        .max()
        .unwrap_or(0)
        .max(model.last_revision);

    // Restart on the same directory.
    let process = Process::start(&data, dir.path()).await;
    let mut kv = KvClient::new(channel(&process.url()).await);
    let mut lease = LeaseClient::new(channel(&process.url()).await);
    let (found, header_rev) = all_keys(&mut kv).await;
    assert!(
        header_rev >= max_acked,
        "revision went back: {header_rev} < acked {max_acked}"
    );

    for (key, want) in &model.keys {
        assert_eq!(
            found.get(key),
            Some(want),
            "acked key {} lost or changed by kill -9",
            String::from_utf8_lossy(key)
        );
    }
    for (key, rev) in &inflight {
        let got = found.get(key.as_bytes()).map(|e| e.mod_revision);
        assert_eq!(
            got,
            Some(*rev),
            "acked in-flight put of {key} at revision {rev}"
        );
    }
    for key in found.keys() {
        let k = String::from_utf8_lossy(key);
        assert!(
            model.keys.contains_key(key) || k.starts_with("inflight/"),
            "a key that was deleted came back: {k}"
        );
    }

    assert_eq!(
        hash_kv(&process.url(), hash_rev).await,
        hash_before,
        "HashKV at revision {hash_rev} changed across kill -9"
    );

    // The counter continues.
    let next = put(&mut kv, "after-restart", "1").await;
    assert!(
        next > header_rev,
        "next put got {next}, store was at {header_rev}"
    );
    assert!(next > max_acked);

    // The lease survived with its keys.
    let ttl = lease
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: lease_id,
            keys: true,
        })
        .await
        .expect("time to live")
        .into_inner();
    assert_eq!(ttl.granted_ttl, 600, "{ttl:?}");
    assert!(
        ttl.ttl > 0 && ttl.ttl <= 600,
        "the lease is alive after restart: {ttl:?}"
    );
    assert_eq!(ttl.keys, [b"leased/0".to_vec()], "{ttl:?}");
    let leases = lease
        .lease_leases(LeaseLeasesRequest {})
        .await
        .expect("leases")
        .into_inner();
    assert!(leases.leases.iter().any(|l| l.id == lease_id), "{leases:?}");

    // A second round on the restarted process, killed again: its writes are durable too.
    model.put("after-restart", "1", 0, next);
    write_history(&mut kv, &mut model, lease_id, 1).await;
    process.kill9();
    let process = Process::start(&data, dir.path()).await;
    let mut kv = KvClient::new(channel(&process.url()).await);
    let mut lease = LeaseClient::new(channel(&process.url()).await);
    let (found, header_rev) = all_keys(&mut kv).await;
    assert!(header_rev >= model.last_revision);
    for (key, want) in &model.keys {
        assert_eq!(
            found.get(key),
            Some(want),
            "after the second kill: {}",
            String::from_utf8_lossy(key)
        );
    }

    // Revoking the restored lease deletes both of its keys in one revision.
    let revoked = lease
        .lease_revoke(LeaseRevokeRequest { id: lease_id })
        .await
        .expect("revoke the restored lease")
        .into_inner();
    let (found, _) = all_keys(&mut kv).await;
    assert!(
        !found.keys().any(|k| k.starts_with(b"leased/")),
        "revoke removed the leased keys"
    );
    assert!(revoked.header.expect("h").revision > header_rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_in_process_keeps_data_and_revision() {
    let server = Server::start().await;
    let mut kv = server.kv().await;
    let mut revs = Vec::new();
    for i in 0..20 {
        revs.push(put(&mut kv, &format!("g/{i}"), &i.to_string()).await);
    }
    drop(kv);
    let server = server.restart().await;
    let mut kv = server.kv().await;
    let (found, header_rev) = all_keys(&mut kv).await;
    assert_eq!(header_rev, *revs.last().expect("revs"));
    for (i, rev) in revs.iter().enumerate() {
        let e = found
            .get(format!("g/{i}").as_bytes())
            .expect("key survived a graceful restart");
        assert_eq!(
            (e.mod_revision, e.value.as_slice()),
            (*rev, i.to_string().as_bytes())
        );
    }
    assert_eq!(put(&mut kv, "g/next", "x").await, header_rev + 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_keep_expiring_after_kill_9_and_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let process = Process::start(&data, dir.path()).await;
    let mut kv = KvClient::new(channel(&process.url()).await);
    let mut lease = LeaseClient::new(channel(&process.url()).await);
    let short = lease
        .lease_grant(LeaseGrantRequest { ttl: 3, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id;
    let long = lease
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id;
    for (key, id) in [("short/a", short), ("short/b", short), ("long/a", long)] {
        let req = PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            lease: id,
            ..Default::default()
        };
        kv.put(req).await.expect("put with lease");
    }
    process.kill9();

    let process = Process::start(&data, dir.path()).await;
    let mut kv = KvClient::new(channel(&process.url()).await);
    // The short lease still expires (a restart gives it at most a fresh TTL), deleting its keys.
    wait_until(
        Duration::from_secs(15),
        "the short lease to expire after restart",
        || {
            let mut kv = kv.clone();
            async move {
                let req = RangeRequest {
                    key: b"short/".to_vec(),
                    range_end: b"short0".to_vec(),
                    ..Default::default()
                };
                kv.range(req)
                    .await
                    .is_ok_and(|r| r.into_inner().kvs.is_empty())
            }
        },
    )
    .await;
    let (found, _) = all_keys(&mut kv).await;
    assert!(
        found.contains_key(&b"long/a"[..]),
        "the long lease's key stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_takes_its_configuration_from_etcd_environment_variables() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let process = Process::start_from_env(&data, dir.path()).await;
    let mut kv = KvClient::new(channel(&process.url()).await);
    assert_eq!(put(&mut kv, "env", "1").await, 2);
    assert!(data.exists(), "ETCD_DATA_DIR was used");
    process.kill9();
}
