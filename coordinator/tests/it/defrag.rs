//! `etcdctl defrag` gives the space of deleted and compacted data back (the sled database is
//! rewritten into a fresh directory and swapped in), keeps every key, value and revision, and
//! leaves a data dir that starts whatever moment the process dies; with `--quota-backend-bytes`
//! it is the way out of the NOSPACE alarm, as in etcd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::etcdserverpb::PutRequest;
use proto::etcdserverpb::kv_client::KvClient;
use serde_json::Value;
use tonic::transport::Channel;

use crate::harness::{Etcdctl, Process, Server, channel, within};

const T: Duration = Duration::from_secs(10);
const VALUE_BYTES: usize = 100_000;

/// Bytes the files under `p` occupy on disk (allocated blocks, as `du` counts them).
fn disk_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())) {
        let entry = entry.expect("dir entry");
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            total += disk_bytes(&entry.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// The sled directory of a data dir.
fn sled_dir(data: &Path) -> PathBuf {
    data.join("member").join("snap").join("db")
}

/// Asserts that no piece of a defragmentation is left beside the sled directory.
fn assert_no_leftovers(data: &Path) {
    let snap = data.join("member").join("snap");
    let names: Vec<String> = std::fs::read_dir(&snap)
        .expect("read snap dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["db"], "only the database in {}", snap.display());
}

/// A value of `len` bytes that differs per `seed`, so nothing shares or compresses it.
fn value(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

async fn put_bytes(kv: &mut KvClient<Channel>, key: &str, value: Vec<u8>) {
    within(
        T,
        "Put",
        kv.put(PutRequest {
            key: key.into(),
            value,
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("expected an integer, got {v}"))
}

/// Every key with its value and revisions, and the header revision, as `etcdctl get` sees them.
async fn everything(ctl: &Etcdctl) -> (Vec<(String, String, i64, i64, i64)>, i64) {
    let got = ctl.json(&["get", "", "--prefix"]).await;
    let kvs = got["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    (
                        kv["key"].as_str().expect("key").to_string(),
                        kv["value"].as_str().unwrap_or("").to_string(),
                        int(&kv["create_revision"]),
                        int(&kv["mod_revision"]),
                        int(&kv["version"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (kvs, int(&got["header"]["revision"]))
}

/// `endpoint status -w json`'s dbSize and dbSizeInUse.
async fn db_size(ctl: &Etcdctl) -> (i64, i64) {
    let status = ctl.json(&["endpoint", "status"]).await;
    let s = &status[0]["Status"];
    (int(&s["dbSize"]), int(&s["dbSizeInUse"]))
}

/// Writes `n` values of [`VALUE_BYTES`] under `big/` and two versions of 20 small keys under
/// `keep/`, deletes `big/` and compacts at the head: the sled directory is then large, nearly
/// all of it dead. Returns the compaction revision.
async fn fill_delete_compact(ctl: &Etcdctl, kv: &mut KvClient<Channel>, n: u64) -> i64 {
    for i in 0..n {
        put_bytes(kv, &format!("big/{i:04}"), value(i, VALUE_BYTES)).await;
    }
    for round in 1..=2 {
        for i in 0..20 {
            put_bytes(kv, &format!("keep/{i:02}"), format!("v{round}-{i}").into()).await;
        }
    }
    assert_eq!(
        ctl.ok(&["del", "--prefix", "big/"]).await.trim(),
        n.to_string()
    );
    let (_, rev) = everything(ctl).await;
    assert_eq!(
        ctl.ok(&["compaction", "--physical", &rev.to_string()])
            .await
            .trim(),
        format!("compacted revision {rev}")
    );
    rev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defrag_gives_space_back_keeps_every_key_and_survives_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let process = Process::start(&data, dir.path()).await;
    let ctl = Etcdctl::new(process.endpoint());
    let mut kv = KvClient::new(channel(&process.url()).await);

    let compacted = fill_delete_compact(&ctl, &mut kv, 400).await;
    let before = disk_bytes(&sled_dir(&data));
    let (status_before, _) = db_size(&ctl).await;
    assert!(
        before > 30_000_000,
        "40 MB of values made the sled dir only {before} bytes"
    );
    let (keys, revision) = everything(&ctl).await;
    assert_eq!(keys.len(), 20, "{keys:?}");
    let mut watch = ctl.spawn(&["watch", "--prefix", "w/"]);

    let out = ctl.ok(&["defrag"]).await;
    assert!(
        out.contains(&format!(
            "Finished defragmenting etcd member[{}]",
            process.endpoint()
        )),
        "{out}"
    );
    let after = disk_bytes(&sled_dir(&data));
    let (status_after, in_use) = db_size(&ctl).await;
    eprintln!(
        "sled dir on disk: {before} bytes before defrag (status dbSize {status_before}), \
         {after} after (status dbSize {status_after}, dbSizeInUse {in_use})"
    );
    assert!(
        after < before / 2,
        "defrag shrank {before} bytes only to {after}"
    );
    // Status measures the same directory.
    assert!(
        (status_after - after as i64).abs() <= 1 << 20,
        "status says {status_after} bytes, the disk {after}"
    );
    assert!(in_use <= status_after, "{in_use} > {status_after}");
    assert_no_leftovers(&data);
    assert_eq!(
        everything(&ctl).await,
        (keys.clone(), revision),
        "every key, value and the revision are unchanged"
    );

    // The member still takes writes, and the watch opened before sees them.
    ctl.ok(&["put", "w/1", "after-defrag"]).await;
    assert_eq!(
        watch.lines(3, T).await,
        ["PUT", "w/1", "after-defrag"],
        "the watch delivers a write made after the defrag"
    );
    watch.kill().await;
    let (keys_now, rev_now) = everything(&ctl).await;
    assert_eq!(rev_now, revision + 1);

    // kill -9 and start again: the defragmented data dir holds everything.
    drop(kv);
    process.kill9();
    let process = Process::start(&data, dir.path()).await;
    let ctl = Etcdctl::new(process.endpoint());
    assert_eq!(everything(&ctl).await, (keys_now, rev_now));
    let old = ctl
        .run(&["get", "keep/00", &format!("--rev={}", compacted - 1)])
        .await;
    assert!(
        old.stderr.contains("required revision has been compacted"),
        "the compaction is remembered: {old:?}"
    );
    let restarted = disk_bytes(&sled_dir(&data));
    assert!(
        restarted < before / 2,
        "after the restart the dir is {restarted} bytes again"
    );
    ctl.ok(&["put", "w/2", "after-restart"]).await;
    assert_no_leftovers(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_then_delete_compact_defrag_and_disarm_lets_writes_in_again() {
    const QUOTA: u64 = 12_000_000;
    let server = Server::start_with(&["--quota-backend-bytes", &QUOTA.to_string()]).await;
    let ctl = server.etcdctl();
    let data = server.scratch().join("data");
    let fresh = disk_bytes(&sled_dir(&data));
    assert!(fresh < QUOTA / 4, "a fresh member uses {fresh} bytes");

    // Fill until the quota check (once a second) raises the alarm and a put is refused.
    let v = String::from_utf8(value(7, VALUE_BYTES)).expect("ascii");
    let mut refused = None;
    for i in 0..1000 {
        let out = ctl.run(&["put", &format!("fill/{i:04}"), &v]).await;
        if !out.status.success() {
            refused = Some(out.stderr);
            break;
        }
    }
    let refused = refused.expect("puts were refused before 100 MB");
    assert!(
        refused.contains("etcdserver: mvcc: database space exceeded"),
        "{refused}"
    );
    let alarms = ctl.ok(&["alarm", "list"]).await;
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");
    let (full, _) = db_size(&ctl).await;
    assert!(full as u64 > QUOTA, "over the quota: {full}");

    // Writes are refused, reads and deletes allowed.
    let put = ctl.run(&["put", "x", "y"]).await;
    assert!(
        put.stderr.contains("database space exceeded"),
        "{}",
        put.stderr
    );
    assert_eq!(
        ctl.ok(&["get", "fill/0000", "--print-value-only"])
            .await
            .trim(),
        v
    );
    let deleted: u64 = ctl
        .ok(&["del", "--prefix", "fill/"])
        .await
        .trim()
        .parse()
        .expect("a count");
    assert!(deleted > 10, "{deleted}");
    let rev = int(&ctl.json(&["get", "x"]).await["header"]["revision"]);
    ctl.ok(&["compaction", "--physical", &rev.to_string()])
        .await;

    // Still alarmed until an operator disarms it, as in etcd.
    let still = ctl.run(&["put", "x", "y"]).await;
    assert!(!still.status.success(), "{still:?}");

    let out = ctl.ok(&["defrag"]).await;
    assert!(out.contains("Finished defragmenting"), "{out}");
    let (after, _) = db_size(&ctl).await;
    let on_disk = disk_bytes(&sled_dir(&data));
    eprintln!(
        "quota {QUOTA}: fresh {fresh} bytes, full {full}, after delete+compact+defrag {after} \
         (disk {on_disk})"
    );
    assert!(
        (after as u64) < QUOTA / 2,
        "defrag left {after} bytes under a quota of {QUOTA}"
    );

    ctl.ok(&["alarm", "disarm"]).await;
    assert_eq!(ctl.ok(&["alarm", "list"]).await.trim(), "");
    assert_eq!(ctl.ok(&["put", "x", "y"]).await.trim(), "OK");
    assert_eq!(lines_of(&ctl.ok(&["get", "x"]).await), ["x", "y"]);
    server.shutdown().await;
}

fn lines_of(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_point_of_the_swap_leaves_a_data_dir_that_starts_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let process = Process::start(&data, dir.path()).await;
    let ctl = Etcdctl::new(process.endpoint());
    let mut kv = KvClient::new(channel(&process.url()).await);
    fill_delete_compact(&ctl, &mut kv, 60).await;
    let want = everything(&ctl).await;
    drop(kv);
    process.kill9();

    // A copy left by a crash during the copy (before it was complete) is deleted at start.
    let leftover = data.join("member").join("snap").join("db.defrag");
    std::fs::create_dir_all(&leftover).expect("mkdir");
    std::fs::write(leftover.join("db"), b"half a database").expect("write");

    for point in [
        "before-marker",
        "after-marker",
        "between-renames",
        "before-marker-removed",
    ] {
        let mut process = Process::start_with_env(
            &data,
            dir.path(),
            &[(coordinator::mvcc::backend::CRASH_POINT_ENV, point)],
        )
        .await;
        assert_no_leftovers(&data);
        let ctl = Etcdctl::new(process.endpoint());
        assert_eq!(everything(&ctl).await, want, "before the crash at {point}");
        let out = ctl.run(&["defrag"]).await;
        assert!(!out.status.success(), "the member died at {point}: {out:?}");
        let status = process.wait_exit(T).await;
        assert!(!status.success(), "{point}: {status}");
        assert!(
            process
                .log()
                .contains(&format!("COORDINATOR_DEFRAG_CRASH={point}: aborting")),
            "crashed at {point}:\n{}",
            process.log()
        );
        drop(process);

        let process = Process::start(&data, dir.path()).await;
        let ctl = Etcdctl::new(process.endpoint());
        assert_no_leftovers(&data);
        assert_eq!(
            everything(&ctl).await,
            want,
            "a crash at {point} lost or changed data"
        );
        process.kill9();
    }

    // And a defrag that runs through still works on the recovered dir.
    let process = Process::start(&data, dir.path()).await;
    let ctl = Etcdctl::new(process.endpoint());
    ctl.ok(&["defrag"]).await;
    assert_eq!(everything(&ctl).await, want);
    assert_eq!(ctl.ok(&["put", "z", "1"]).await.trim(), "OK");
    assert_no_leftovers(&data);
}
