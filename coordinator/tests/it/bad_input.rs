//! Requests etcd rejects are rejected with etcd's gRPC codes and exact texts (clients match on
//! both), and the server keeps serving afterwards.

use std::time::Duration;

use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::request_op::Request;
use proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{Server, assert_still_serving, put, within};

const T: Duration = Duration::from_secs(10);

/// Asserts `result` failed with `code` and exactly `message`.
#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, message: &str) {
    match result {
        Ok(ok) => panic!("expected {code:?} `{message}`, got success: {ok:?}"),
        Err(status) => {
            assert_eq!(
                (status.code(), status.message()),
                (code, message),
                "wrong status for a rejected request"
            );
        }
    }
}

fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

fn range_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

fn delete_prefix_op(prefix: &str) -> RequestOp {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: prefix.into(),
            range_end: end,
            ..Default::default()
        })),
    }
}

/// A client that may send large messages (tonic's client has no send limit by default, but make
/// it explicit so the server is what rejects).
async fn kv(server: &Server) -> KvClient<Channel> {
    server
        .kv()
        .await
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_put_is_rejected_as_request_too_large() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;

    // Above --max-request-bytes (1.5 MiB) but below the gRPC receive limit etcd sets
    // (max-request-bytes + 512 KiB): etcd's own check answers.
    let value = vec![b'x'; 1_800_000];
    let req = PutRequest {
        key: b"big".to_vec(),
        value,
        ..Default::default()
    };
    assert_status(
        within(T, "1.8 MB put", kv.put(req)).await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );
    assert_still_serving(&mut kv).await;

    // A value just under the limit is accepted.
    let value = vec![b'y'; 1_500_000];
    let req = PutRequest {
        key: b"big".to_vec(),
        value,
        ..Default::default()
    };
    within(T, "1.5 MB put", kv.put(req))
        .await
        .expect("a put under the limit is accepted");
    assert_still_serving(&mut kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_of_2mib_value_is_rejected_as_too_large() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;
    // 2 MiB of value: more than the request limit. etcd 3.4 rejects it in gRPC itself
    // (ResourceExhausted, its receive limit is 1.5 MiB + 512 KiB); a server that reads it
    // and checks the limit answers InvalidArgument "etcdserver: request is too large".
    for size in [2 << 20, 8 << 20] {
        let req = PutRequest {
            key: b"huge".to_vec(),
            value: vec![b'z'; size],
            ..Default::default()
        };
        match within(T, "oversized put", kv.put(req)).await {
            Ok(_) => panic!("a {size}-byte put was accepted"),
            Err(s) => assert!(
                (s.code() == Code::InvalidArgument
                    && s.message() == "etcdserver: request is too large")
                    || s.code() == Code::ResourceExhausted,
                "{size}-byte put: unexpected status {s:?}"
            ),
        }
        assert_still_serving(&mut kv).await;
    }
    let got = kv
        .range(RangeRequest {
            key: b"huge".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert!(
        got.kvs.is_empty(),
        "nothing of the rejected puts was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_with_129_ops_is_rejected_and_128_is_accepted() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;

    let ops = |n: usize| {
        (0..n)
            .map(|i| put_op(&format!("many/{i:03}"), "v"))
            .collect::<Vec<_>>()
    };
    let too_many = TxnRequest {
        success: ops(129),
        ..Default::default()
    };
    assert_status(
        within(T, "129-op txn", kv.txn(too_many)).await,
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    assert_still_serving(&mut kv).await;

    // The failure branch counts too.
    let too_many = TxnRequest {
        failure: ops(129),
        ..Default::default()
    };
    assert_status(
        within(T, "129-op failure branch", kv.txn(too_many)).await,
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );

    let just_enough = TxnRequest {
        success: ops(128),
        ..Default::default()
    };
    let resp = within(T, "128-op txn", kv.txn(just_enough))
        .await
        .expect("128 ops is the limit, not over it")
        .into_inner();
    assert!(resp.succeeded);
    assert_eq!(resp.responses.len(), 128);
    let count = kv
        .range(RangeRequest {
            key: b"many/".to_vec(),
            range_end: b"many0".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner()
        .count;
    assert_eq!(count, 128);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_txn_ops_flag_lowers_the_limit() {
    let server = Server::start_with(&["--max-txn-ops", "4"]).await;
    let mut kv = kv(&server).await;
    let ops = |n: usize| {
        (0..n)
            .map(|i| put_op(&format!("few/{i}"), "v"))
            .collect::<Vec<_>>()
    };
    assert_status(
        within(
            T,
            "5-op txn",
            kv.txn(TxnRequest {
                success: ops(5),
                ..Default::default()
            }),
        )
        .await,
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    within(
        T,
        "4-op txn",
        kv.txn(TxnRequest {
            success: ops(4),
            ..Default::default()
        }),
    )
    .await
    .expect("4 ops are allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_writing_one_key_twice_is_rejected_as_duplicate() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;

    let twice = TxnRequest {
        success: vec![put_op("dup", "1"), put_op("dup", "2")],
        ..Default::default()
    };
    assert_status(
        within(T, "txn with two puts of one key", kv.txn(twice)).await,
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request",
    );
    assert_still_serving(&mut kv).await;

    // A put and a delete range covering it collide too.
    let overlap = TxnRequest {
        success: vec![put_op("dup/a", "1"), delete_prefix_op("dup/")],
        ..Default::default()
    };
    assert_status(
        within(T, "txn with put + covering delete", kv.txn(overlap)).await,
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request",
    );

    // Reading a key you also write is fine, as is writing the same key in the two branches.
    let fine = TxnRequest {
        success: vec![put_op("dup", "1"), range_op("dup")],
        failure: vec![put_op("dup", "2")],
        ..Default::default()
    };
    let resp = within(T, "put + get of one key", kv.txn(fine))
        .await
        .expect("a put and a get of one key are not duplicates")
        .into_inner();
    assert!(resp.succeeded);
    let got = kv
        .range(RangeRequest {
            key: b"dup".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range");
    assert_eq!(got.into_inner().kvs[0].value, b"1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_with_unknown_lease_is_rejected_as_lease_not_found() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;
    let req = PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        lease: 0x1234_5678,
        ..Default::default()
    };
    assert_status(
        within(T, "put with unknown lease", kv.put(req)).await,
        Code::NotFound,
        "etcdserver: requested lease not found",
    );
    // Nothing was written and no revision was used.
    let rev = put(&mut kv, "after", "1").await;
    assert_eq!(rev, 2, "the rejected put must not consume a revision");

    // The same inside a txn.
    let txn = TxnRequest {
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: b"k".to_vec(),
                lease: 0x1234_5678,
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    assert_status(
        within(T, "txn put with unknown lease", kv.txn(txn)).await,
        Code::NotFound,
        "etcdserver: requested lease not found",
    );

    // Revoking an unknown lease is the same error.
    let mut lease = server.lease().await;
    assert_status(
        within(
            T,
            "revoke unknown lease",
            lease.lease_revoke(LeaseRevokeRequest { id: 0x1234_5678 }),
        )
        .await,
        Code::NotFound,
        "etcdserver: requested lease not found",
    );
    // Granting an ID that exists is rejected.
    let granted = lease
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 77 })
        .await
        .expect("grant with a chosen id")
        .into_inner();
    assert_eq!(granted.id, 77);
    assert_status(
        within(
            T,
            "grant existing id",
            lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 77 }),
        )
        .await,
        Code::FailedPrecondition,
        "etcdserver: lease already exists",
    );
    assert_still_serving(&mut kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_at_a_future_revision_is_rejected() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;
    let rev = put(&mut kv, "f", "1").await;
    let req = RangeRequest {
        key: b"f".to_vec(),
        revision: rev + 1,
        ..Default::default()
    };
    assert_status(
        within(T, "range at a future revision", kv.range(req)).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    // Compacting to a future revision is the same error.
    assert_status(
        within(
            T,
            "compact a future revision",
            kv.compact(CompactionRequest {
                revision: rev + 10,
                physical: false,
            }),
        )
        .await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    // The current revision is fine.
    let req = RangeRequest {
        key: b"f".to_vec(),
        revision: rev,
        ..Default::default()
    };
    within(T, "range at the current revision", kv.range(req))
        .await
        .expect("current revision");
    assert_still_serving(&mut kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_at_a_compacted_revision_is_rejected() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;
    for i in 0..5 {
        put(&mut kv, "c", &i.to_string()).await; // revs 2..=6
    }
    within(
        T,
        "compact",
        kv.compact(CompactionRequest {
            revision: 5,
            physical: true,
        }),
    )
    .await
    .expect("compact to 5");
    let req = RangeRequest {
        key: b"c".to_vec(),
        revision: 4,
        ..Default::default()
    };
    assert_status(
        within(T, "range below the compaction", kv.range(req)).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    assert_status(
        within(
            T,
            "compact again at the same revision",
            kv.compact(CompactionRequest {
                revision: 5,
                physical: false,
            }),
        )
        .await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    // A Range inside a Txn below the compaction fails the same way.
    let txn = TxnRequest {
        success: vec![RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: b"c".to_vec(),
                revision: 3,
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    assert_status(
        within(T, "txn range below the compaction", kv.txn(txn)).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    // At the compaction revision the value is still there.
    let got = kv
        .range(RangeRequest {
            key: b"c".to_vec(),
            revision: 5,
            ..Default::default()
        })
        .await
        .expect("range at the compaction revision")
        .into_inner();
    assert_eq!(got.kvs[0].value, b"3");
    assert_still_serving(&mut kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_key_is_rejected_as_key_not_provided() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;
    let msg = "etcdserver: key is not provided";
    assert_status(
        within(
            T,
            "put empty key",
            kv.put(PutRequest {
                value: b"v".to_vec(),
                ..Default::default()
            }),
        )
        .await,
        Code::InvalidArgument,
        msg,
    );
    assert_status(
        within(T, "range empty key", kv.range(RangeRequest::default())).await,
        Code::InvalidArgument,
        msg,
    );
    assert_status(
        within(
            T,
            "delete empty key",
            kv.delete_range(DeleteRangeRequest::default()),
        )
        .await,
        Code::InvalidArgument,
        msg,
    );
    let txn = TxnRequest {
        success: vec![put_op("", "v")],
        ..Default::default()
    };
    assert_status(
        within(T, "txn put empty key", kv.txn(txn)).await,
        Code::InvalidArgument,
        msg,
    );
    let rev = put(&mut kv, "ok", "1").await;
    assert_eq!(rev, 2, "no rejected request consumed a revision");
    assert_still_serving(&mut kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_value_on_a_missing_key_is_rejected_as_key_not_found() {
    let server = Server::start().await;
    let mut kv = kv(&server).await;
    let req = PutRequest {
        key: b"absent".to_vec(),
        ignore_value: true,
        ..Default::default()
    };
    assert_status(
        within(T, "ignore_value put of a missing key", kv.put(req)).await,
        Code::InvalidArgument,
        "etcdserver: key not found",
    );
    assert_still_serving(&mut kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_request_bytes_flag_lowers_the_limit() {
    let server = Server::start_with(&["--max-request-bytes", "4096"]).await;
    let mut kv = kv(&server).await;
    let req = PutRequest {
        key: b"k".to_vec(),
        value: vec![b'x'; 8192],
        ..Default::default()
    };
    assert_status(
        within(T, "8 KiB put over a 4 KiB limit", kv.put(req)).await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );
    let req = PutRequest {
        key: b"k".to_vec(),
        value: vec![b'x'; 2048],
        ..Default::default()
    };
    within(T, "2 KiB put", kv.put(req))
        .await
        .expect("under the limit");
    assert_still_serving(&mut kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_watchers_on_one_stream_are_refused_and_the_stream_lives_on() {
    use proto::etcdserverpb::watch_request::RequestUnion;
    use proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
    let server = Server::start_with(&["--max-watchers-per-stream", "3"]).await;
    let mut client = server.watch().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let create = |key: &str| WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into(),
            ..Default::default()
        })),
    };
    tx.send(create("w0")).await.expect("queue");
    let mut stream = within(
        T,
        "open the Watch stream",
        client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("open the Watch stream")
    .into_inner();
    let mut next = async || {
        within(T, "a watch response", stream.message())
            .await
            .expect("stream ok")
            .expect("stream open")
    };
    let mut ids = Vec::new();
    for i in 0..4 {
        if i > 0 {
            tx.send(create(&format!("w{i}"))).await.expect("send");
        }
        let resp = next().await;
        if i < 3 {
            assert!(
                resp.created && !resp.canceled,
                "watcher {i} is within the limit: {resp:?}"
            );
            ids.push(resp.watch_id);
        } else {
            assert!(resp.canceled, "the 4th watcher is refused: {resp:?}");
            assert!(resp.cancel_reason.contains("too many watchers"), "{resp:?}");
        }
    }
    // The three accepted watchers still work.
    let mut kv = kv(&server).await;
    let rev = put(&mut kv, "w2", "x").await;
    let resp = next().await;
    assert_eq!(resp.watch_id, ids[2], "{resp:?}");
    assert_eq!(resp.events.len(), 1);
    assert_eq!(
        resp.events[0].kv.as_ref().map(|kv| kv.mod_revision),
        Some(rev)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_writes_are_refused_with_nospace_while_reads_and_deletes_work() {
    let server = Server::start_with(&["--quota-backend-bytes", "1"]).await;
    let mut kv = kv(&server).await;
    let ctl = server.etcdctl();
    // The quota is checked in the background; wait for the alarm.
    let status = crate::harness::wait_for(Duration::from_secs(10), "the NOSPACE alarm", || {
        let mut kv = kv.clone();
        async move {
            let req = PutRequest {
                key: b"fill".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            };
            kv.put(req).await.err()
        }
    })
    .await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded"
        )
    );
    let alarms = ctl.ok(&["alarm", "list"]).await;
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");

    // Writes through a txn are refused too; a grant as well (etcd refuses it under NOSPACE).
    let txn = TxnRequest {
        success: vec![put_op("fill2", "v")],
        ..Default::default()
    };
    assert_status(
        within(T, "txn put under NOSPACE", kv.txn(txn)).await,
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded",
    );
    let mut lease = server.lease().await;
    assert_status(
        within(
            T,
            "lease grant under NOSPACE",
            lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }),
        )
        .await,
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded",
    );
    // Reads and deletes (which free space) still work.
    let got = within(
        T,
        "range under NOSPACE",
        kv.range(RangeRequest {
            key: b"fill".to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("reads are served under NOSPACE")
    .into_inner();
    let del = within(
        T,
        "delete under NOSPACE",
        kv.delete_range(DeleteRangeRequest {
            key: b"fill".to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("deletes are allowed under NOSPACE")
    .into_inner();
    assert_eq!(del.deleted, got.count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_grants_beyond_max_leases_are_refused_until_one_is_revoked() {
    let server = Server::start_with(&["--max-leases", "3"]).await;
    let mut lease = server.lease().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let granted = within(
            T,
            "grant",
            lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }),
        )
        .await
        .expect("under the limit");
        ids.push(granted.into_inner().id);
    }
    assert_status(
        within(
            T,
            "grant",
            lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }),
        )
        .await,
        Code::ResourceExhausted,
        "etcdserver: too many leases (limit 3)",
    );
    within(
        T,
        "revoke",
        lease.lease_revoke(LeaseRevokeRequest { id: ids[0] }),
    )
    .await
    .expect("revoke");
    within(
        T,
        "grant",
        lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }),
    )
    .await
    .expect("room again after a revoke");
    let mut kv = kv(&server).await;
    assert_still_serving(&mut kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_metadata_above_max_metadata_bytes_is_refused_and_the_server_keeps_serving() {
    let server = Server::start_with(&["--max-metadata-bytes", "4096"]).await;
    let mut kv = kv(&server).await;
    let range = |metadata_bytes: usize| {
        let mut req = tonic::Request::new(RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        });
        let value = "m".repeat(metadata_bytes).parse().expect("ASCII metadata");
        req.metadata_mut().insert("x-padding", value);
        req
    };
    within(T, "1 KiB of metadata", kv.range(range(1024)))
        .await
        .expect("under the limit");
    let refused = within(T, "8 KiB of metadata", kv.range(range(8 * 1024))).await;
    let status = refused.expect_err("over the limit");
    // hyper answers the stream HTTP 431; tonic's client reports the HTTP status it saw.
    assert!(
        status.message().contains("431"),
        "unexpected refusal: {status:?}"
    );
    assert_still_serving(&mut kv).await;
}
