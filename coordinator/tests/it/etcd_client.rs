//! The third-party `etcd-client` crate against the coordinator, the way Rust applications use it.

use std::time::Duration;

use ::etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::harness::{Server, wait_until, within};

const T: Duration = Duration::from_secs(10);

fn rev(header: Option<&::etcd_client::ResponseHeader>) -> i64 {
    header.expect("every response has a header").revision()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_round_trip_with_revisions_and_prev_kv() {
    let server = Server::start().await;
    let mut client = server.client().await;

    let first = client.put("greeting", "hello", None).await.expect("put");
    assert_eq!(
        rev(first.header()),
        2,
        "the first write of a new store is revision 2"
    );
    let second = client
        .put("greeting", "world", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put with prev_kv");
    assert_eq!(rev(second.header()), 3);
    let prev = second.prev_key().expect("prev_kv returned");
    assert_eq!(prev.value(), b"hello");
    assert_eq!(prev.mod_revision(), 2);

    let got = client.get("greeting", None).await.expect("get");
    assert_eq!(rev(got.header()), 3);
    assert_eq!(got.count(), 1);
    let kv = &got.kvs()[0];
    assert_eq!(kv.key(), b"greeting");
    assert_eq!(kv.value(), b"world");
    assert_eq!(kv.create_revision(), 2);
    assert_eq!(kv.mod_revision(), 3);
    assert_eq!(kv.version(), 2);
    assert_eq!(kv.lease(), 0);

    // Serializable reads see the same.
    let ser = client
        .get("greeting", Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable get");
    assert_eq!(ser.kvs()[0].value(), b"world");

    // Delete resets the version; re-creating starts at version 1 with a new create revision.
    let del = client.delete("greeting", None).await.expect("delete");
    assert_eq!(del.deleted(), 1);
    assert_eq!(rev(del.header()), 4);
    client.put("greeting", "again", None).await.expect("put");
    let kv = client.get("greeting", None).await.expect("get").kvs()[0].clone();
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (5, 5, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_compare_and_swap_takes_one_branch_in_one_revision() {
    let server = Server::start().await;
    let mut client = server.client().await;
    client.put("cas", "v1", None).await.expect("put"); // rev 2

    let swap = |expected: &str, new: &str| {
        Txn::new()
            .when([Compare::value("cas", CompareOp::Equal, expected)])
            .and_then([
                TxnOp::put("cas", new, None),
                TxnOp::put("cas-log", new, None),
            ])
            .or_else([TxnOp::get("cas", None)])
    };

    let won = client.txn(swap("v1", "v2")).await.expect("txn");
    assert!(won.succeeded());
    assert_eq!(rev(won.header()), 3, "two puts in one txn are one revision");
    assert_eq!(won.op_responses().len(), 2);

    let lost = client.txn(swap("v1", "v3")).await.expect("txn");
    assert!(!lost.succeeded());
    assert_eq!(
        rev(lost.header()),
        3,
        "a read-only branch writes no revision"
    );
    match &lost.op_responses()[..] {
        [TxnOpResponse::Get(get)] => assert_eq!(get.kvs()[0].value(), b"v2"),
        other => panic!("expected one Get response, got {other:?}"),
    }

    // Compare on versions and revisions too.
    let by_rev = client
        .txn(
            Txn::new()
                .when([
                    Compare::mod_revision("cas", CompareOp::Equal, 3),
                    Compare::version("cas", CompareOp::Greater, 1),
                    Compare::create_revision("missing", CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::delete("cas-log", None)]),
        )
        .await
        .expect("txn");
    assert!(by_rev.succeeded());
    assert_eq!(rev(by_rev.header()), 4);
    let log = client.get("cas-log", None).await.expect("get");
    assert!(log.kvs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_an_event_with_the_put_revision() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut stream = client
        .watch(
            "watched",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .expect("watch");
    let created = within(T, "watch created", stream.message())
        .await
        .expect("watch stream")
        .expect("created response");
    assert!(
        created.created(),
        "the first response confirms creation: {created:?}"
    );

    let put = client.put("watched/a", "1", None).await.expect("put");
    let put_rev = rev(put.header());
    client.put("unwatched", "x", None).await.expect("put");
    let del = client.delete("watched/a", None).await.expect("delete");
    let del_rev = rev(del.header());

    let mut events = Vec::new();
    while events.len() < 2 {
        let resp = within(T, "watch events", stream.message())
            .await
            .expect("watch stream")
            .expect("stream open");
        assert_eq!(resp.watch_id(), created.watch_id());
        events.extend(resp.events().iter().cloned());
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].event_type(), EventType::Put);
    let kv = events[0].kv().expect("kv");
    assert_eq!(
        (kv.key(), kv.value(), kv.mod_revision()),
        (&b"watched/a"[..], &b"1"[..], put_rev)
    );
    assert_eq!(events[1].event_type(), EventType::Delete);
    let kv = events[1].kv().expect("kv");
    assert_eq!((kv.key(), kv.mod_revision()), (&b"watched/a"[..], del_rev));
    let prev = events[1].prev_kv().expect("prev_kv requested");
    assert_eq!(prev.value(), b"1");

    // Cancel: the server confirms.
    stream.cancel(created.watch_id()).await.expect("cancel");
    let resp = within(T, "cancel confirmation", stream.message())
        .await
        .expect("watch stream")
        .expect("stream open");
    assert!(resp.canceled(), "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoke_deletes_attached_keys() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let lease = client.lease_grant(60, None).await.expect("grant");
    assert_eq!(lease.ttl(), 60);
    assert!(lease.id() != 0);
    assert!(lease.error().is_empty());

    client
        .put(
            "session/a",
            "1",
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await
        .expect("put with lease");
    client.put("plain", "2", None).await.expect("put");
    let got = client.get("session/a", None).await.expect("get");
    assert_eq!(got.kvs()[0].lease(), lease.id());

    let ttl = client
        .lease_time_to_live(
            lease.id(),
            Some(::etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .expect("time to live");
    assert_eq!(ttl.granted_ttl(), 60);
    assert!((55..=60).contains(&ttl.ttl()), "{ttl:?}");
    assert_eq!(ttl.keys(), [b"session/a".to_vec()]);

    let listed = client.leases().await.expect("leases");
    assert_eq!(
        listed.leases().iter().map(|l| l.id()).collect::<Vec<_>>(),
        [lease.id()]
    );

    let revoked = client.lease_revoke(lease.id()).await.expect("revoke");
    let revoke_rev = rev(revoked.header());
    assert!(
        client
            .get("session/a", None)
            .await
            .expect("get")
            .kvs()
            .is_empty()
    );
    assert_eq!(client.get("plain", None).await.expect("get").kvs().len(), 1);

    let ttl = client
        .lease_time_to_live(lease.id(), None)
        .await
        .expect("time to live");
    assert_eq!(ttl.ttl(), -1, "a revoked lease reports TTL -1");
    assert!(client.leases().await.expect("leases").leases().is_empty());

    // The deletion is one revision, after the puts.
    assert_eq!(revoke_rev, 4, "puts at 2 and 3, revoke at 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keep_alive_renews_the_ttl_and_outlives_it() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let lease = client.lease_grant(2, None).await.expect("grant");
    client
        .put("alive", "1", Some(PutOptions::new().with_lease(lease.id())))
        .await
        .expect("put with lease");
    let (mut keeper, mut responses) = client
        .lease_keep_alive(lease.id())
        .await
        .expect("keep alive");

    // Keep it alive for twice its TTL.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        keeper.keep_alive().await.expect("send keep-alive");
        let resp = within(T, "keep-alive response", responses.message())
            .await
            .expect("keep-alive stream")
            .expect("stream open");
        assert_eq!(resp.id(), lease.id());
        assert_eq!(resp.ttl(), 2, "each keep-alive renews the full TTL");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        client.get("alive", None).await.expect("get").kvs().len(),
        1,
        "still alive"
    );

    // Stop renewing: it expires and its key goes.
    drop(keeper);
    wait_until(Duration::from_secs(10), "the lease to expire", || {
        let mut client = client.clone();
        async move {
            client
                .get("alive", None)
                .await
                .is_ok_and(|r| r.kvs().is_empty())
        }
    })
    .await;

    // Keep-alive of an expired lease answers TTL 0, which this client reports as not found.
    match client.lease_keep_alive(lease.id()).await {
        Err(::etcd_client::Error::LeaseKeepAliveError(msg)) => assert_eq!(msg, "lease not found"),
        Err(other) => panic!("unexpected error keeping an expired lease alive: {other}"),
        Ok(_) => panic!("an expired lease was kept alive"),
    }
}

/// A put that does not ask for the previous value is applied without reading it; a live
/// watcher that asked for `prev_kv` still gets it with every event, and one that did not gets
/// none (etcd reads `prev_kv` when it sends, not when it applies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prev_kv_watcher_gets_the_previous_value_of_puts_that_did_not_ask_for_it() {
    let server = Server::start().await;
    let mut client = server.client().await;
    client.put("pv/k", "v1", None).await.expect("put");
    async fn open(
        client: &mut ::etcd_client::Client,
        opts: WatchOptions,
    ) -> ::etcd_client::WatchStream {
        let mut stream = client.watch("pv/", Some(opts)).await.expect("watch");
        let created = within(T, "watch created", stream.message())
            .await
            .expect("watch stream")
            .expect("created response");
        assert!(created.created(), "{created:?}");
        stream
    }
    let mut with_prev = open(
        &mut client,
        WatchOptions::new().with_prefix().with_prev_key(),
    )
    .await;
    let mut without = open(&mut client, WatchOptions::new().with_prefix()).await;

    client.put("pv/k", "v2", None).await.expect("put");
    client.put("pv/k", "v3", None).await.expect("put");
    client.put("pv/new", "n1", None).await.expect("put");
    // A put that asks for the previous value returns it and its event still carries it.
    let asked = client
        .put("pv/k", "v4", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put with prev_kv");
    assert_eq!(asked.prev_key().map(|kv| kv.value()), Some(&b"v3"[..]));

    async fn events(
        stream: &mut ::etcd_client::WatchStream,
        n: usize,
    ) -> Vec<::etcd_client::Event> {
        let mut out = Vec::new();
        while out.len() < n {
            let resp = within(T, "watch events", stream.message())
                .await
                .expect("watch stream")
                .expect("stream open");
            out.extend(resp.events().iter().cloned());
        }
        out
    }
    let seen: Vec<(Vec<u8>, Option<Vec<u8>>)> = events(&mut with_prev, 4)
        .await
        .iter()
        .map(|e| {
            let kv = e.kv().expect("kv");
            (kv.value().to_vec(), e.prev_kv().map(|p| p.value().to_vec()))
        })
        .collect();
    let v = |s: &str| s.as_bytes().to_vec();
    assert_eq!(
        seen,
        [
            (v("v2"), Some(v("v1"))),
            (v("v3"), Some(v("v2"))),
            (v("n1"), None),
            (v("v4"), Some(v("v3"))),
        ]
    );
    let plain = events(&mut without, 4).await;
    assert!(
        plain.iter().all(|e| e.prev_kv().is_none()),
        "no prev_kv unless asked: {plain:?}"
    );
}
