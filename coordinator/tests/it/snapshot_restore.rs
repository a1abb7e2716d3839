//! Snapshots end to end: saved with the real `etcdctl snapshot save`, inspected and restored
//! with the `coordinator snapshot status|restore` binary, served by members started on the
//! restored data directories (one member, and a fresh three-member cluster after the source
//! cluster was destroyed), and damaged files refused.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest,
};
use proto::mvccpb::KeyValue;
use tonic::transport::Channel;

use crate::harness::{Cluster, Process, Server, wait_until, within};

/// Runs the coordinator binary with `args`; returns (success, stdout, stderr).
pub(crate) fn coordinator(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(args)
        .output()
        .expect("run the coordinator binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) fn restore(
    file: &Path,
    data_dir: &Path,
    name: &str,
    cluster: &str,
    url: &str,
    token: &str,
) {
    let (ok, out, err) = coordinator(&[
        "snapshot",
        "restore",
        &file.display().to_string(),
        "--data-dir",
        &data_dir.display().to_string(),
        "--name",
        name,
        "--initial-cluster",
        cluster,
        "--initial-advertise-peer-urls",
        url,
        "--initial-cluster-token",
        token,
    ]);
    assert!(ok, "restore failed:\n{out}\n{err}");
}

/// Every key (all of them) as the member serves it, and the store revision.
/// Restores `file` into `data` for one member with the binary's defaults (name "default",
/// etcd's peer URL, cluster token `token`), starts it with its logs in `logs`, and connects.
pub(crate) async fn restore_and_start(
    file: &Path,
    data: &Path,
    logs: &Path,
    token: &str,
) -> (Process, Channel) {
    restore(
        file,
        data,
        "default",
        "default=http://127.0.0.1:2380",
        "http://127.0.0.1:2380",
        token,
    );
    let p = Process::start(data, logs).await;
    let ch = crate::harness::channel(&p.url()).await;
    (p, ch)
}

pub(crate) async fn all_keys(
    kv: &mut KvClient<Channel>,
    serializable: bool,
) -> (i64, Vec<KeyValue>) {
    let r = within(
        Duration::from_secs(10),
        "range of every key",
        kv.range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            serializable,
            ..Default::default()
        }),
    )
    .await
    .expect("range every key")
    .into_inner();
    (r.header.expect("header").revision, r.kvs)
}

async fn put(kv: &mut KvClient<Channel>, k: &str, v: &str, lease: i64) -> i64 {
    kv.put(PutRequest {
        key: k.as_bytes().to_vec(),
        value: v.as_bytes().to_vec(),
        lease,
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .expect("header")
    .revision
}

pub(crate) fn status_json(file: &Path) -> serde_json::Value {
    let (ok, out, err) = coordinator(&[
        "snapshot",
        "status",
        &file.display().to_string(),
        "-w",
        "json",
    ]);
    assert!(ok, "snapshot status failed:\n{out}\n{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshot_save_then_status_and_restore_into_one_member() {
    let server = Server::start().await;
    let mut kv = server.kv().await;
    let mut lease = server.lease().await;
    for i in 0..40 {
        put(&mut kv, &format!("key/{i:02}"), &format!("v{i}"), 0).await;
    }
    let old_rev = put(&mut kv, "key/00", "second", 0).await;
    put(&mut kv, "key/00", "third", 0).await;
    kv.delete_range(DeleteRangeRequest {
        key: b"key/39".to_vec(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let l = lease
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id;
    put(&mut kv, "leased", "x", l).await;
    let (rev, before) = all_keys(&mut kv, false).await;
    assert_eq!(before.len(), 40);

    // The real etcdctl saves it (it checks the SHA-256 trailer itself).
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("snap.db");
    server
        .etcdctl()
        .ok(&["snapshot", "save", &file.display().to_string()])
        .await;
    let size = std::fs::metadata(&file).expect("snapshot file").len();

    let st = status_json(&file);
    assert_eq!(st["revision"], serde_json::json!(rev), "{st}");
    assert_eq!(st["totalSize"], serde_json::json!(size), "{st}");
    assert!(st["totalKey"].as_u64().is_some_and(|n| n > 40), "{st}");
    let (ok, simple, _) = coordinator(&["snapshot", "status", &file.display().to_string()]);
    assert!(ok);
    let hash = format!("{:08x}", st["hash"].as_u64().expect("hash"));
    assert!(
        simple.starts_with(&format!("{hash}, {rev}, ")),
        "simple output: {simple}"
    );
    let (ok, table, _) = coordinator(&[
        "snapshot",
        "status",
        &file.display().to_string(),
        "-w",
        "table",
    ]);
    assert!(
        ok && table.contains("TOTAL KEYS") && table.contains(&hash),
        "{table}"
    );
    server.shutdown().await;

    // Restore for a member with the binary's defaults (name "default", etcd's peer URL).
    let data = dir.path().join("restored");
    let (p, ch) = restore_and_start(&file, &data, dir.path(), "etcd-cluster").await;
    let mut kv = KvClient::new(ch);
    let (rev2, after) = all_keys(&mut kv, false).await;
    assert_eq!(
        rev2, rev,
        "the restored member serves the snapshot's revision"
    );
    assert_eq!(
        after, before,
        "every key with its revisions, version and lease"
    );
    // History came along: an older revision of a key is still readable.
    let at_old = kv
        .range(RangeRequest {
            key: b"key/00".to_vec(),
            revision: old_rev,
            ..Default::default()
        })
        .await
        .expect("range at an old revision")
        .into_inner();
    assert_eq!(at_old.kvs[0].value, b"second");
    // The lease and its key.
    let mut lease = LeaseClient::new(crate::harness::channel(&p.url()).await);
    let ttl = lease
        .lease_time_to_live(LeaseTimeToLiveRequest { id: l, keys: true })
        .await
        .expect("time to live")
        .into_inner();
    assert_eq!(ttl.granted_ttl, 600);
    assert!(ttl.ttl > 0, "{ttl:?}");
    assert_eq!(ttl.keys, vec![b"leased".to_vec()]);
    // Writes go on from the snapshot's revision.
    assert_eq!(put(&mut kv, "after", "restore", 0).await, rev + 1);

    // Restoring into a data dir that holds something is refused.
    let (ok, _, err) = coordinator(&[
        "snapshot",
        "restore",
        &file.display().to_string(),
        "--data-dir",
        &data.display().to_string(),
    ]);
    assert!(!ok);
    assert!(err.contains("exists and is not empty"), "{err}");
    p.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_or_truncated_snapshots_are_refused() {
    let server = Server::start().await;
    let mut kv = server.kv().await;
    for i in 0..20 {
        put(&mut kv, &format!("k{i}"), &"v".repeat(100), 0).await;
    }
    let good = server.scratch().join("good.db");
    server
        .etcdctl()
        .ok(&["snapshot", "save", &good.display().to_string()])
        .await;
    let bytes = std::fs::read(&good).expect("read snapshot");
    let dir = tempfile::tempdir().expect("temp dir");

    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    let mut flipped_trailer = bytes.clone();
    let last = flipped_trailer.len() - 1;
    flipped_trailer[last] ^= 0x80;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a flipped bit", flipped, "corrupted or truncated"),
        (
            "a damaged trailer",
            flipped_trailer,
            "corrupted or truncated",
        ),
        (
            "truncated",
            bytes[..bytes.len() - 100].to_vec(),
            "corrupted or truncated",
        ),
        (
            "cut at 512",
            bytes[..512.min(bytes.len() - 1)].to_vec(),
            "corrupted or truncated",
        ),
        ("empty", Vec::new(), "not a coordinator snapshot"),
        (
            "a bolt file",
            b"\0\0\0\0\0\0\0\0\x04\0\0\0\0\0\0\0\xed\xda\x0c\xed".to_vec(),
            "not a coordinator snapshot",
        ),
    ];
    for (what, content, expect) in cases {
        let f = dir.path().join("bad.db");
        std::fs::write(&f, &content).expect("write bad snapshot");
        let (ok, out, err) = coordinator(&["snapshot", "status", &f.display().to_string()]);
        assert!(!ok, "{what}: status accepted it: {out}");
        assert!(err.contains(expect), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        let target = dir.path().join("never");
        let (ok, _, err) = coordinator(&[
            "snapshot",
            "restore",
            &f.display().to_string(),
            "--data-dir",
            &target.display().to_string(),
        ]);
        assert!(!ok, "{what}: restore accepted it");
        assert!(err.contains(expect), "{what}: {err}");
        assert!(
            !target.exists(),
            "{what}: a refused restore wrote {target:?}"
        );
    }
    let (ok, _, err) = coordinator(&["snapshot", "status", "/nonexistent/snap.db"]);
    assert!(!ok && err.contains("cannot read snapshot"), "{err}");
    // The good file is still fine.
    status_json(&good);
    server.shutdown().await;
}

/// The disaster drill: a three-member cluster takes writes and leases; a snapshot is saved
/// with etcdctl; the cluster is destroyed; three fresh members restored from the file form a
/// new cluster that holds every acknowledged write, at its revision, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_drill_restore_into_a_fresh_three_member_cluster() {
    let keep = tempfile::tempdir().expect("temp dir");
    let file = keep.path().join("drill.db");
    let mut acked: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let (rev, before, leases, old_ids) = {
        let c = Cluster::start(3).await;
        let leader = c.wait_leader(Duration::from_secs(20)).await;
        let mut lease = c.lease(leader);
        let mut leases = Vec::new();
        for ttl in [300, 900] {
            let id = lease
                .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                .await
                .expect("grant")
                .into_inner()
                .id;
            leases.push((id, ttl));
        }
        // Writes through every member (followers forward), some keys written several times.
        for i in 0..90 {
            let mut kv = c.kv(i % 3);
            let k = format!("drill/{:02}", i % 60);
            let v = format!("value-{i}");
            let l = if i % 10 == 0 {
                leases[(i / 10) % 2].0
            } else {
                0
            };
            let r = put(&mut kv, &k, &v, l).await;
            acked.insert(k, (v, r));
        }
        let mut kv = c.kv(leader);
        let (rev, before) = all_keys(&mut kv, false).await;
        c.etcdctl(leader)
            .ok(&["snapshot", "save", &file.display().to_string()])
            .await;
        let ids: Vec<u64> = (0..3).map(|i| c.member_id(i)).collect();
        (rev, before, leases, ids)
        // The cluster is dropped here: every process killed, every data dir deleted.
    };
    assert_eq!(before.len(), 60);
    assert_eq!(status_json(&file)["revision"], serde_json::json!(rev));

    let c = Cluster::start_prepared(3, &[], |name, data_dir, initial, url, token| {
        restore(&file, data_dir, name, initial, url, token);
    })
    .await;
    for i in 0..3 {
        // New ids, from the new cluster's flags (its peer URLs differ from the old ones).
        let st = c.status(i).await.expect("status");
        assert_eq!(st.member_id, c.member_id(i));
        assert!(
            !old_ids.contains(&st.member_id),
            "member {i} kept an old id"
        );
        // Every member holds the whole key space, at the snapshot's revision, at once.
        let mut kv = c.kv(i);
        let (r, after) = all_keys(&mut kv, true).await;
        assert_eq!(r, rev, "member {i}");
        assert_eq!(
            after, before,
            "member {i}: every key, value, revision, version, lease"
        );
        for (k, (v, mod_rev)) in &acked {
            let kv = after
                .iter()
                .find(|kv| kv.key == k.as_bytes())
                .unwrap_or_else(|| panic!("member {i} lost acknowledged write {k}"));
            assert_eq!(kv.value, v.as_bytes(), "member {i}: {k}");
            assert_eq!(kv.mod_revision, *mod_rev, "member {i}: {k}");
        }
    }
    // The leases came along with their keys.
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let mut lease = c.lease(leader);
    for (id, ttl) in &leases {
        let t = lease
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: *id,
                keys: true,
            })
            .await
            .expect("time to live")
            .into_inner();
        assert_eq!(t.granted_ttl, *ttl);
        assert!(t.ttl > 0, "{t:?}");
        assert!(!t.keys.is_empty(), "lease {id} lost its keys");
    }
    // The new cluster goes on from the snapshot's revision, on every member.
    let mut kv = c.kv(leader);
    let next = put(&mut kv, "drill/after", "restore", 0).await;
    assert_eq!(next, rev + 1);
    for i in 0..3 {
        let kv = c.kv(i);
        wait_until(
            Duration::from_secs(10),
            "the new write on every member",
            || {
                let mut kv = kv.clone();
                async move {
                    kv.range(RangeRequest {
                        key: b"drill/after".to_vec(),
                        serializable: true,
                        ..Default::default()
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().kvs.len() == 1)
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_state_survives_save_and_restore() {
    use proto::etcdserverpb::auth_client::AuthClient;
    use proto::etcdserverpb::{
        AuthEnableRequest, AuthUserAddRequest, AuthUserGrantRoleRequest, AuthenticateRequest,
    };
    let server = Server::start().await;
    let mut kv = server.kv().await;
    put(&mut kv, "guarded", "g", 0).await;
    let mut auth = AuthClient::new(crate::harness::channel(&server.url()).await);
    auth.user_add(AuthUserAddRequest {
        name: "root".into(),
        password: "root-secret-1".into(),
        ..Default::default()
    })
    .await
    .expect("user add");
    auth.user_grant_role(AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .expect("grant root");
    auth.auth_enable(AuthEnableRequest {})
        .await
        .expect("auth enable");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("auth.db");
    // Snapshot is root's while auth is on.
    let denied = server
        .etcdctl()
        .run(&[
            "snapshot",
            "save",
            &dir.path().join("x.db").display().to_string(),
        ])
        .await;
    assert!(
        !denied.status.success(),
        "an anonymous snapshot was allowed"
    );
    server
        .etcdctl()
        .ok(&[
            "--user=root:root-secret-1",
            "snapshot",
            "save",
            &file.display().to_string(),
        ])
        .await;
    server.shutdown().await;

    let data = dir.path().join("restored");
    let (p, ch) = restore_and_start(&file, &data, dir.path(), "etcd-cluster").await;
    // Auth is still on: anonymous reads are refused.
    let e = KvClient::new(ch.clone())
        .range(RangeRequest {
            key: b"guarded".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("anonymous read with auth on");
    assert_eq!(e.message(), "etcdserver: user name is empty");
    // The root user and its password came along.
    let mut auth = AuthClient::new(ch.clone());
    let bad = auth
        .authenticate(AuthenticateRequest {
            name: "root".into(),
            password: "wrong-password".into(),
        })
        .await;
    assert!(bad.is_err());
    let token = auth
        .authenticate(AuthenticateRequest {
            name: "root".into(),
            password: "root-secret-1".into(),
        })
        .await
        .expect("root logs in on the restored member")
        .into_inner()
        .token;
    let mut req = tonic::Request::new(RangeRequest {
        key: b"guarded".to_vec(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("token", token.parse().expect("token metadata"));
    let r = KvClient::new(ch)
        .range(req)
        .await
        .expect("root reads")
        .into_inner();
    assert_eq!(r.kvs[0].value, b"g");
    p.kill9();
}

/// A snapshot is one point in time even though writes go on while it is copied (the state
/// lock is released once the backend has fixed the point): restored, it holds every put
/// acknowledged at or below its revision and none above, and its revision is the store's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_saved_while_writes_go_on_holds_one_point_in_time() {
    let server = Server::start().await;
    let mut kv = server.kv().await;
    // Enough data that the copy takes a while.
    let filler = "f".repeat(1024);
    for i in 0..2_000 {
        put(&mut kv, &format!("fill/{i:04}"), &filler, 0).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let mut kv = server.kv().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let key = format!("w{w}/{n:06}");
                acked.push((key.clone(), put(&mut kv, &key, "v", 0).await));
                n += 1;
            }
            acked
        }));
    }
    // Some writes before the save starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("snap.db");
    server
        .etcdctl()
        .ok(&["snapshot", "save", &file.display().to_string()])
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    server.shutdown().await;
    let rev = status_json(&file)["revision"].as_i64().expect("revision");
    let (below, above): (Vec<_>, Vec<_>) = acked.iter().partition(|(_, r)| *r <= rev);
    assert!(
        !below.is_empty() && !above.is_empty(),
        "the writers must run before and after the save ({} puts, snapshot at {rev})",
        acked.len()
    );

    let data = dir.path().join("restored");
    let (p, ch) = restore_and_start(&file, &data, dir.path(), "etcd-cluster").await;
    let mut kv = KvClient::new(ch);
    let (restored_rev, kvs) = all_keys(&mut kv, false).await;
    assert_eq!(
        restored_rev, rev,
        "the restored member serves the snapshot's revision"
    );
    let restored: BTreeMap<Vec<u8>, i64> = kvs
        .into_iter()
        .filter(|kv| kv.key.starts_with(b"w"))
        .map(|kv| (kv.key, kv.mod_revision))
        .collect();
    for (key, r) in &below {
        assert_eq!(
            restored.get(key.as_bytes()),
            Some(r),
            "{key}, acknowledged at {r} (snapshot at {rev}), is missing or different"
        );
    }
    assert_eq!(
        restored.len(),
        below.len(),
        "the snapshot holds writes made after its point"
    );
    drop(p);
}
