use std::time::{Duration, Instant};

use proto::registry_v1 as pb;
use proto::registry_v1::watch_response::Event;

use crate::coord::{Coordinator, wait_until, within};
use crate::harness::{Registry, T, discover, ids, instance, register};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_restarted_nothing_lost_and_the_client_keeps_its_instance_registered() {
    let c = Coordinator::start().await;
    let a = Registry::start(&c.url()).await;
    let port = a.grpc.port();
    let client = a.client();
    let mut i = instance("rr", "svc", "kept", 1);
    i.ttl_seconds = 3;
    let reg = client.register(i).await.expect("register");
    let mut g = a.grpc().await;
    register(&mut g, instance("rr", "svc", "long", 2)).await; // TTL 10 s, no heartbeats
    drop(g);

    a.stop().await;
    let b = Registry::start_with(&c.url(), &format!("127.0.0.1:{port}"), &[]).await;
    let mut g = b.grpc().await;
    assert_eq!(
        ids(&discover(&mut g, "rr", "svc", false).await),
        vec!["kept", "long"],
        "nothing lost"
    );
    // Past the 3 s TTL: the client library kept its instance alive through the new replica.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let present = ids(&discover(&mut g, "rr", "svc", false).await);
        assert!(present.contains(&"kept".to_string()), "{present:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    reg.deregister().await.expect("deregister on shutdown");
    assert_eq!(
        ids(&discover(&mut g, "rr", "svc", false).await),
        vec!["long"],
        "gone at once"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restarted_registrations_survive_and_watches_resume_without_gaps() {
    let mut c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let client = r.client();
    let mut i = instance("cr", "svc", "kept", 1);
    i.ttl_seconds = 3;
    let _reg = client.register(i).await.expect("register");
    let mut g = r.grpc().await;
    let mut s = g
        .watch(pb::WatchRequest {
            namespace: "cr".into(),
            service: "svc".into(),
            after_revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(matches!(
        within(T, "snapshot", s.message())
            .await
            .expect("ok")
            .expect("open")
            .event,
        Some(Event::Snapshot(_))
    ));
    let mut expected = vec![
        register(&mut g, instance("cr", "svc", "before", 1))
            .await
            .revision,
    ];

    c.restart().await;
    // Registrations right after the restart (the registry's calls retry until it is back).
    for n in 0..3 {
        expected.push(
            register(&mut g, instance("cr", "svc", &format!("after{n}"), 1))
                .await
                .revision,
        );
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let msg = within(T, "watch change", s.message())
            .await
            .expect("ok")
            .expect("open");
        if let Some(Event::Change(ch)) = msg.event {
            let id = ch.instance.map(|i| i.instance_id).unwrap_or_default();
            if id != "kept" {
                got.push(ch.revision);
            }
        }
    }
    assert_eq!(
        got, expected,
        "every change once, in order, across the restart"
    );
    wait_until(T, "the kept instance to be listed", || {
        let mut g = g.clone();
        async move { ids(&discover(&mut g, "cr", "svc", false).await).contains(&"kept".to_string()) }
    })
    .await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_registers_again_after_its_registration_was_lost() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let client = r.client();
    let mut i = instance("lost", "svc", "me", 1);
    i.ttl_seconds = 2;
    let reg = client.register(i).await.expect("register");
    let first = reg.instance().revision;
    let mut updates = reg.subscribe();

    // What an outage longer than the TTL does: the record and its lease are gone.
    let coord = coord_client::Client::connect([c.url()]).expect("client");
    let (kv, _) = coord
        .get("/registry/v1/instances/lost/svc/me")
        .await
        .expect("get");
    coord
        .lease_revoke(kv.expect("record").lease)
        .await
        .expect("revoke");

    within(T, "the client to register again", updates.changed())
        .await
        .expect("update");
    assert!(reg.instance().revision > first);
    let mut g = r.grpc().await;
    assert_eq!(
        ids(&discover(&mut g, "lost", "svc", false).await),
        vec!["me"]
    );
    reg.deregister().await.expect("deregister");
    r.stop().await;
}
