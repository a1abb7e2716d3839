use std::time::Duration;

use coord_client::{Client, ClientConfig, Error, Txn};

use crate::harness::{Coordinator, dead_endpoint};

#[tokio::test]
async fn put_get_prefix_and_delete_round_trip_with_revisions() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");

    let r1 = client.put("/app/a", "1", 0).await.expect("put a");
    let r2 = client.put("/app/b", "2", 0).await.expect("put b");
    client.put("/other", "x", 0).await.expect("put other");
    assert!(r2 > r1, "each put is a new revision");

    let (kv, rev) = client.get("/app/a").await.expect("get");
    let kv = kv.expect("a exists");
    assert_eq!(kv.value, b"1");
    assert_eq!(kv.mod_revision, r1);
    assert!(rev >= r2);

    let all = client.get_prefix("/app/").await.expect("prefix");
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![b"/app/a".to_vec(), b"/app/b".to_vec()]);

    let (deleted, _) = client.delete_prefix("/app/").await.expect("delete");
    assert_eq!(deleted, 2);
    assert!(client.get("/app/a").await.expect("get").0.is_none());
    assert!(client.get("/other").await.expect("get").0.is_some());
}

#[tokio::test]
async fn a_prefix_read_larger_than_tonics_4_mib_default_is_answered_whole() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    // 6 values of 1 MiB: one Range answer of about 6 MiB, above tonic's default 4 MiB limit.
    let value = vec![b'v'; 1024 * 1024];
    for i in 0..6 {
        client
            .put(format!("/big/{i}"), value.clone(), 0)
            .await
            .expect("put 1 MiB");
    }
    let all = client
        .get_prefix("/big/")
        .await
        .expect("a 6 MiB range answer");
    assert_eq!(all.kvs.len(), 6);
    assert!(all.kvs.iter().all(|kv| kv.value == value));
}

#[tokio::test]
async fn guarded_txn_creates_a_key_only_once() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let txn = || {
        Txn::new()
            .if_absent("/lock")
            .then_put("/lock", "me", 0)
            .else_get("/lock")
    };
    assert!(client.txn_guarded(txn()).await.expect("txn").succeeded);
    let second = client.txn_guarded(txn()).await.expect("txn");
    assert!(!second.succeeded, "the key exists now");
    assert_eq!(second.responses.len(), 1, "the failure branch read the key");

    let (kv, _) = client.get("/lock").await.expect("get");
    let rev = kv.expect("lock").mod_revision;
    let stale = Txn::new()
        .if_mod_revision("/lock", rev - 1)
        .then_put("/lock", "x", 0);
    assert!(!client.txn(stale).await.expect("txn").succeeded);
    let fresh = Txn::new()
        .if_mod_revision("/lock", rev)
        .then_put("/lock", "y", 0);
    assert!(client.txn(fresh).await.expect("txn").succeeded);
}

#[tokio::test]
async fn calls_fail_over_to_the_endpoint_that_answers() {
    let c = Coordinator::start().await;
    let client = Client::connect([dead_endpoint(), c.url()]).expect("client");
    client
        .put("/k", "v", 0)
        .await
        .expect("put goes to the live endpoint");
    let (kv, _) = client.get("/k").await.expect("get");
    assert_eq!(kv.expect("k").value, b"v");
}

#[tokio::test]
async fn a_call_with_no_live_endpoint_fails_as_unavailable_within_its_deadline() {
    let mut config = ClientConfig::new([dead_endpoint(), dead_endpoint()]);
    config.retry_deadline = Duration::from_millis(500);
    let client = Client::new(config).expect("client");
    let started = std::time::Instant::now();
    let err = client.get("/k").await.expect_err("nothing listens");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.is_unavailable());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A put was never sent either (connection refused), so it is retried and fails the same way.
    let err = client.put("/k", "v", 0).await.expect_err("nothing listens");
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
}

#[tokio::test]
async fn a_read_waits_for_a_restarting_coordinator() {
    let mut c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    client.put("/k", "v", 0).await.expect("put");
    c.stop().await;
    let reader = {
        let client = client.clone();
        tokio::spawn(async move { client.get("/k").await })
    };
    c.start_again().await;
    let (kv, _) = reader.await.expect("task").expect("get after the restart");
    assert_eq!(kv.expect("k survived").value, b"v");
}
