//! Staged rollout: by label and by percentage, each client gets the right version on read and
//! on watch; promote and abort; watches follow.

use std::collections::BTreeMap;

use config_svc::model::{ClientInfo, ItemRef, RolloutRule};
use proto::config_v1 as pb;
use proto::config_v1::Reason;
use tonic::Code;

use crate::coord::{Coordinator, within};
use crate::harness::*;

fn label_rule(k: &str, v: &str) -> pb::RolloutRule {
    pb::RolloutRule {
        labels: [(k.to_owned(), v.to_owned())].into_iter().collect(),
        percentage: None,
    }
}

async fn version_for(
    g: &mut proto::config_v1::config_client::ConfigClient<tonic::transport::Channel>,
    it: &pb::ItemRef,
    c: pb::Client,
) -> u64 {
    get(g, it, 0, Some(c))
        .await
        .expect("get")
        .version
        .expect("version")
        .number
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_rollout_gives_the_candidate_to_matching_clients_then_promote_gives_it_to_all() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("labels"), "app", "k");
    publish_text(&mut g, &it, "stable").await;

    let canary = client("c-1", &[("zone", "a")]);
    let other = client("c-2", &[("zone", "b")]);
    let mut w_canary = Watch::open(
        &mut g,
        watch_items(std::slice::from_ref(&it), &[], Some(canary.clone())),
    )
    .await;
    let mut w_other = Watch::open(
        &mut g,
        watch_items(std::slice::from_ref(&it), &[], Some(other.clone())),
    )
    .await;
    for w in [&mut w_canary, &mut w_other] {
        assert_eq!(
            w.take(2).await,
            vec![upd("k", 1, "stable", Reason::Initial), Seen::Synced]
        );
    }

    let mut req = publish_req(&it, pb::Format::Text, "candidate");
    req.rollout = Some(label_rule("zone", "a"));
    let p = publish(&mut g, req).await;
    let info = p.item.expect("item");
    assert_eq!(
        info.current_version, 1,
        "a candidate does not move the pointer"
    );
    assert_eq!(info.rollout.as_ref().map(|r| r.candidate), Some(2));

    assert_eq!(version_for(&mut g, &it, canary.clone()).await, 2);
    assert_eq!(version_for(&mut g, &it, other.clone()).await, 1);
    assert_eq!(version_for(&mut g, &it, client("", &[])).await, 1);
    assert_eq!(
        w_canary.next().await,
        upd("k", 2, "candidate", Reason::Rollout)
    );

    // Publishing during a rollout is refused.
    let err = within(
        T,
        "Publish",
        g.publish(publish_req(&it, pb::Format::Text, "x")),
    )
    .await
    .expect_err("rollout in progress");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("promote or abort"), "{err}");

    let promoted = within(
        T,
        "Promote",
        g.promote(pb::PromoteRequest {
            item: Some(it.clone()),
            author: "ops".into(),
        }),
    )
    .await
    .expect("promote")
    .into_inner();
    assert_eq!(promoted.current_version, 2);
    assert!(promoted.rollout.is_none());
    assert_eq!(
        w_other.next().await,
        upd("k", 2, "candidate", Reason::Promoted)
    );
    // The canary had it already: nothing new for it.
    w_canary
        .quiet_for(std::time::Duration::from_millis(300))
        .await;
    assert_eq!(version_for(&mut g, &it, other).await, 2);

    // No rollout now: promote and abort are refused.
    let err = within(
        T,
        "Abort",
        g.abort(pb::AbortRequest {
            item: Some(it.clone()),
            author: String::new(),
        }),
    )
    .await
    .expect_err("nothing to abort");
    assert_eq!(err.code(), Code::FailedPrecondition);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentage_rollout_selects_by_stable_hash_and_abort_sends_clients_back() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("percent"), "app", "k");
    publish_text(&mut g, &it, "base").await;

    let mut req = publish_req(&it, pb::Format::Text, "canary");
    req.rollout = Some(pb::RolloutRule {
        labels: Default::default(),
        percentage: Some(25),
    });
    publish(&mut g, req).await;

    // Every client gets what the documented hash says, every time.
    let rule = RolloutRule {
        labels: BTreeMap::new(),
        percentage: Some(25),
    };
    let model_item = ItemRef::new(it.namespace.clone(), "app", "k");
    let mut selected = Vec::new();
    for i in 0..40 {
        let id = format!("host-{i}");
        let expect_candidate = rule.selects(
            &model_item,
            &ClientInfo {
                id: id.clone(),
                labels: BTreeMap::new(),
            },
        );
        for _ in 0..2 {
            let got = version_for(&mut g, &it, client(&id, &[])).await;
            assert_eq!(got, if expect_candidate { 2 } else { 1 }, "client {id}");
        }
        if expect_candidate {
            selected.push(id);
        }
    }
    assert!(
        (3..=18).contains(&selected.len()),
        "about a quarter of 40 selected, got {}",
        selected.len()
    );
    let in_id = selected[0].clone();
    let out_id = (0..40)
        .map(|i| format!("host-{i}"))
        .find(|id| !selected.contains(id))
        .expect("someone not selected");

    let mut w_in = Watch::open(
        &mut g,
        watch_items(std::slice::from_ref(&it), &[], Some(client(&in_id, &[]))),
    )
    .await;
    let mut w_out = Watch::open(
        &mut g,
        watch_items(std::slice::from_ref(&it), &[], Some(client(&out_id, &[]))),
    )
    .await;
    assert_eq!(
        w_in.take(2).await,
        vec![upd("k", 2, "canary", Reason::Initial), Seen::Synced]
    );
    assert_eq!(
        w_out.take(2).await,
        vec![upd("k", 1, "base", Reason::Initial), Seen::Synced]
    );

    let info = within(
        T,
        "Abort",
        g.abort(pb::AbortRequest {
            item: Some(it.clone()),
            author: "ops".into(),
        }),
    )
    .await
    .expect("abort")
    .into_inner();
    assert!(info.rollout.is_none());
    assert_eq!(info.aborted, vec![2]);
    assert_eq!(w_in.next().await, upd("k", 1, "base", Reason::Aborted));
    w_out.quiet_for(std::time::Duration::from_millis(300)).await;
    assert_eq!(version_for(&mut g, &it, client(&in_id, &[])).await, 1);

    // The aborted candidate stays in history but is never sent to a resuming watcher.
    publish_text(&mut g, &it, "next").await;
    assert_eq!(w_in.next().await, upd("k", 3, "next", Reason::Published));
    let mut resumed = Watch::open(
        &mut g,
        watch_items(
            std::slice::from_ref(&it),
            &[(it.clone(), 1)],
            Some(client(&out_id, &[])),
        ),
    )
    .await;
    assert_eq!(
        resumed.take(2).await,
        vec![upd("k", 3, "next", Reason::Missed), Seen::Synced]
    );
    assert_eq!(
        get(&mut g, &it, 2, None)
            .await
            .expect("candidate readable")
            .version
            .expect("v")
            .content,
        "canary"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_over_rest_by_label_then_abort_and_promote() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let ns = fresh_ns("restrollout");
    let base = format!("/v1/namespaces/{ns}/groups/app/items/k");
    let publish = |content: &str, rollout: Option<serde_json::Value>| {
        let mut body = serde_json::json!({"format": "text", "content": content});
        if let Some(r) = rollout {
            body["rollout"] = r;
        }
        let path = format!("{base}/versions");
        async move { http_call(svc.http, "POST", &path, Some(&body)).await }
    };
    assert_eq!(publish("one", None).await.0, 200);
    let (status, json) = publish(
        "two",
        Some(serde_json::json!({"labels": {"tier": "canary"}})),
    )
    .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["item"]["rollout"]["candidate"], 2);
    let read = |query: &str| {
        let path = format!("{base}/raw{query}");
        async move { http_raw(svc.http, "GET", &path, None).await.2 }
    };
    assert_eq!(read("?client_id=x&label.tier=canary").await, "two");
    assert_eq!(read("?client_id=x&label.tier=main").await, "one");
    // A second candidate is refused while one is rolling out.
    let (status, json) = publish("three", Some(serde_json::json!({"percentage": 50}))).await;
    assert_eq!(status, 409, "{json}");
    assert_eq!(json["error"]["code"], "failed_precondition");

    let (status, json) = http_call(svc.http, "POST", &format!("{base}/rollout/abort"), None).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(read("?label.tier=canary").await, "one");
    let (status, _) = http_call(svc.http, "POST", &format!("{base}/rollout/promote"), None).await;
    assert_eq!(status, 409, "nothing to promote");

    let (status, _) = publish("three", Some(serde_json::json!({"percentage": 100}))).await;
    assert_eq!(status, 200);
    assert_eq!(read("?client_id=anyone").await, "three");
    assert_eq!(read("").await, "one", "no client id: never in a percentage");
    let (status, json) =
        http_call(svc.http, "POST", &format!("{base}/rollout/promote"), None).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["current_version"], 3);
    assert_eq!(json["aborted"], serde_json::json!([2]));
    assert_eq!(read("").await, "three");
    svc.stop().await;
}
