//! Scheduled backups: a member started with `--backup-dir --backup-interval 1s --backup-keep 2`
//! writes snapshot files and keeps only the newest two; each passes `coordinator snapshot
//! status` and restores (`coordinator snapshot restore`) into a data dir whose member serves
//! the keys written before it. A backup directory that cannot be written is counted as a
//! failure while the member keeps serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::etcdserverpb::kv_client::KvClient;

use crate::admin::get;
use crate::harness::{Server, put, wait_until};
use crate::snapshot_restore::{all_keys, restore_and_start, status_json};

/// The value of the metric line starting with `name ` (0 if absent).
async fn metric(server: &Server, name: &str) -> f64 {
    let (code, body) = get(server.metrics_addr(), "/metrics").await;
    assert_eq!(code, 200);
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn backups(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn name(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_are_pruned_to_keep_and_each_restores_the_keys() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let dir = scratch.path().join("backups");
    let dir_arg = dir.display().to_string();
    let server = Server::start_with(&[
        "--backup-dir",
        &dir_arg,
        "--backup-interval",
        "1s",
        "--backup-keep",
        "2",
    ])
    .await;
    let mut kv = server.kv().await;
    let mut rev = 0;
    for i in 0..20 {
        rev = put(&mut kv, &format!("backup/{i:02}"), &format!("v{i}")).await;
    }
    let (_, before) = all_keys(&mut kv, false).await;
    let written_before = metric(&server, "coordinator_backup_written_total").await;

    // Four more backups after the writes, and only the newest two left.
    wait_until(
        Duration::from_secs(30),
        "four backups after the writes, two kept",
        || async {
            metric(&server, "coordinator_backup_written_total").await >= written_before + 4.0
                && backups(&dir).len() == 2
        },
    )
    .await;
    assert_eq!(
        metric(&server, "coordinator_backup_failures_total").await,
        0.0
    );
    let size = metric(&server, "coordinator_backup_last_size_bytes").await;
    assert!(size > 0.0, "last size {size}");
    let last_ok = metric(&server, "coordinator_backup_last_success_timestamp_seconds").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        (now - last_ok).abs() < 30.0,
        "last success {last_ok}, now {now}"
    );
    assert_eq!(
        metric(&server, "coordinator_backup_last_revision").await,
        rev as f64
    );
    server.shutdown().await;

    let files = backups(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    for (i, file) in files.iter().enumerate() {
        let n = name(file);
        assert!(
            n.starts_with("snapshot-") && n.ends_with(&format!("-rev{rev}.db")),
            "file name {n}"
        );
        // Checked end to end (SHA-256, CRC, framing) by the status command.
        let st = status_json(file);
        assert_eq!(st["revision"], serde_json::json!(rev), "{n}: {st}");
        let bytes = std::fs::metadata(file).expect("size").len();
        assert_eq!(st["totalSize"], serde_json::json!(bytes), "{n}: {st}");
        assert_eq!(
            bytes % 512,
            32,
            "etcd's framing: padded to 512, then the SHA-256"
        );

        let data = scratch.path().join(format!("restored-{i}"));
        let (p, ch) = restore_and_start(file, &data, scratch.path(), "backup-drill").await;
        let mut kv = KvClient::new(ch);
        let (rev2, after) = all_keys(&mut kv, false).await;
        assert_eq!(
            rev2, rev,
            "{n}: the restored member is at the backup's revision"
        );
        assert_eq!(after, before, "{n}: every key written before the backup");
        p.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_cannot_be_written_is_counted_and_the_member_keeps_serving() {
    let scratch = tempfile::tempdir().expect("temp dir");
    // A regular file where the backup directory should be: nothing can be created under it.
    let blocker = scratch.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").expect("write");
    let dir_arg = blocker.join("backups").display().to_string();
    let server = Server::start_with(&["--backup-dir", &dir_arg, "--backup-interval", "1s"]).await;
    wait_until(Duration::from_secs(20), "two failed backups", || async {
        metric(&server, "coordinator_backup_failures_total").await >= 2.0
    })
    .await;
    assert_eq!(
        metric(&server, "coordinator_backup_written_total").await,
        0.0
    );
    let mut kv = server.kv().await;
    let r1 = put(&mut kv, "still", "serving").await;
    assert!(put(&mut kv, "still", "writing").await > r1);
    server.shutdown().await;
}

#[test]
fn backup_flags_are_checked() {
    use clap::Parser as _;
    let parse = |extra: &[&str]| {
        let mut args = vec!["coordinator", "--backup-dir", "/tmp/x"];
        args.extend_from_slice(extra);
        coordinator::Config::try_parse_from(args).map(|c| c.validate())
    };
    assert_eq!(
        parse(&["--backup-keep", "0"]).expect("parses"),
        Err("--backup-keep must be at least 1".into())
    );
    assert_eq!(
        parse(&["--backup-interval", "500ms"]).expect("parses"),
        Err("--backup-interval must be at least 1s".into())
    );
    assert!(
        parse(&["--backup-interval", "soon"]).is_err(),
        "not a duration"
    );
    let ok = coordinator::Config::try_parse_from([
        "coordinator",
        "--backup-dir",
        "/b",
        "--backup-interval",
        "15m",
    ])
    .expect("parses");
    let b = ok.backup().expect("backups on");
    assert_eq!((b.interval, b.keep), (Duration::from_secs(900), 7));
}
