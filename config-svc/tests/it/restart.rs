//! config-svc restarts lose nothing; the client library keeps serving its cache while the
//! service is down, calls back on every change, and resumes after reconnecting.

use std::time::Duration;

use config_svc::client::{Change, ConfigClient};
use config_svc::model::ItemRef;
use proto::config_v1 as pb;
use tokio::sync::mpsc;

use crate::coord::{Coordinator, within};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_svc_restart_loses_nothing() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let grpc_addr = svc.grpc.to_string();
    let mut g = svc.grpc().await;
    let ns = fresh_ns("restart");
    let it = item(&ns, "app", "k");
    let other = item(&ns, "app", "other.json");
    for n in 1..=3 {
        publish_text(&mut g, &it, &format!("v{n}")).await;
    }
    let mut req = publish_req(&other, pb::Format::Json, "{\"a\": 1}");
    req.schema = Some(r#"{"type":"object"}"#.into());
    publish(&mut g, req).await;
    let mut req = publish_req(&other, pb::Format::Json, "{\"a\": 2}");
    req.rollout = Some(pb::RolloutRule {
        labels: [("zone".to_owned(), "a".to_owned())].into_iter().collect(),
        percentage: None,
    });
    publish(&mut g, req).await;
    let before_items = get(&mut g, &other, 0, None).await.expect("get").item;
    svc.stop().await;

    let svc = ConfigSvc::start_with(&coordinator.url(), &grpc_addr, &[]).await;
    let mut g = svc.grpc().await;
    let cur = get(&mut g, &it, 0, None)
        .await
        .expect("get")
        .version
        .expect("v");
    assert_eq!((cur.number, cur.content.as_str()), (3, "v3"));
    let h = within(
        T,
        "History",
        g.history(pb::HistoryRequest {
            item: Some(it.clone()),
            page_size: 10,
            include_content: true,
            ..Default::default()
        }),
    )
    .await
    .expect("history")
    .into_inner();
    let contents: Vec<&str> = h.versions.iter().map(|v| v.content.as_str()).collect();
    assert_eq!(contents, vec!["v3", "v2", "v1"]);
    let after_items = get(&mut g, &other, 0, None).await.expect("get").item;
    assert_eq!(
        after_items, before_items,
        "schema and rollout state survive"
    );
    let canary = get(&mut g, &other, 0, Some(client("x", &[("zone", "a")])))
        .await
        .expect("get as canary");
    assert_eq!(canary.version.expect("v").number, 2);
    // The schema still applies.
    let err = within(
        T,
        "Publish",
        g.publish(publish_req(&it, pb::Format::Json, "{")),
    )
    .await
    .expect_err("invalid");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_library_serves_its_cache_while_unreachable_and_calls_back_on_change() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let grpc_url = svc.grpc_url();
    let grpc_addr = svc.grpc.to_string();
    let mut g = svc.grpc().await;
    let ns = fresh_ns("client");
    let pb_item = item(&ns, "app", "db.yaml");
    let it = ItemRef::new(ns.clone(), "app", "db.yaml");
    publish(&mut g, publish_req(&pb_item, pb::Format::Yaml, "pool: 1\n")).await;

    let cache = tempfile::tempdir().expect("cache dir");
    let client = ConfigClient::builder([grpc_url.clone()])
        .client_id("app-1")
        .cache_dir(cache.path())
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let fetched = client.fetch(&it).await.expect("fetch");
    assert_eq!((fetched.version.number, fetched.stale), (1, false));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub = client.subscribe(vec![it.clone()], move |c: &Change| {
        let _ = tx.send(c.clone());
    });
    assert!(sub.wait_synced(T).await, "subscription synced");
    // It held version 1 already (from fetch): no callback for it.
    publish(&mut g, publish_req(&pb_item, pb::Format::Yaml, "pool: 2\n")).await;
    let change = within(T, "callback", rx.recv()).await.expect("change");
    let Change::Updated { version, reason } = change else {
        panic!("expected an update, got {change:?}")
    };
    assert_eq!((version.number, version.content.as_str()), (2, "pool: 2\n"));
    assert_eq!(reason, pb::Reason::Published);

    // The service goes away: the last good version keeps being served.
    svc.stop().await;
    let stale = client.fetch(&it).await.expect("served from cache");
    assert_eq!((stale.version.number, stale.stale), (2, true));
    assert_eq!(sub.get(&it).map(|v| v.number), Some(2));
    // A fresh process with the same cache dir starts with it too.
    let cold = ConfigClient::builder([grpc_url.clone()])
        .cache_dir(cache.path())
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let from_disk = cold.fetch(&it).await.expect("from disk");
    assert_eq!((from_disk.version.number, from_disk.stale), (2, true));

    // Meanwhile a version is published through another replica.
    let other = ConfigSvc::start(&coordinator.url()).await;
    let mut g2 = other.grpc().await;
    publish(
        &mut g2,
        publish_req(&pb_item, pb::Format::Yaml, "pool: 3\n"),
    )
    .await;

    // Back on the same address: the subscription resumes with what it missed, once.
    let svc = ConfigSvc::start_with(&coordinator.url(), &grpc_addr, &[]).await;
    let change = within(T, "callback after reconnect", rx.recv())
        .await
        .expect("change");
    let Change::Updated { version, reason } = change else {
        panic!("expected an update, got {change:?}")
    };
    assert_eq!((version.number, reason), (3, pb::Reason::Missed));
    assert!(sub.wait_synced(T).await);
    publish(
        &mut g2,
        publish_req(&pb_item, pb::Format::Yaml, "pool: 4\n"),
    )
    .await;
    let change = within(T, "live callback", rx.recv()).await.expect("change");
    assert!(
        matches!(&change, Change::Updated { version, .. } if version.number == 4),
        "{change:?}"
    );
    assert!(rx.try_recv().is_err(), "no duplicates");
    sub.close().await;
    svc.stop().await;
    other.stop().await;
}
