use std::time::{Duration, Instant};

use proto::registry_v1 as pb;
use serde_json::json;
use tonic::Code;

use crate::coord::{Coordinator, wait_until, within};
use crate::harness::{Registry, T, discover, http_call, ids, instance, register};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_then_discover_returns_the_instance_at_a_revision() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let mut i = instance("prod", "orders", "", 8080);
    i.tags = vec!["v2".into()];
    i.zone = "eu-1".into();
    i.metadata.insert("team".into(), "shop".into());
    let stored = register(&mut g, i).await;
    assert_eq!(stored.instance_id.len(), 16, "an ID was generated");
    assert_eq!(stored.weight, 100, "default weight");
    assert_eq!(stored.health, pb::HealthStatus::Healthy as i32);
    register(&mut g, instance("prod", "orders", "b", 8081)).await;

    let d = discover(&mut g, "prod", "orders", false).await;
    assert_eq!(d.instances.len(), 2);
    assert!(d.revision >= stored.revision && stored.revision > 0);
    let filtered = within(
        T,
        "Discover with filters",
        g.discover(pb::DiscoverRequest {
            namespace: "prod".into(),
            service: "orders".into(),
            tags: vec!["v2".into()],
            zone: "eu-1".into(),
            metadata: [("team".to_string(), "shop".to_string())].into(),
            healthy_only: true,
        }),
    )
    .await
    .expect("discover")
    .into_inner();
    assert_eq!(ids(&filtered), vec![stored.instance_id.clone()]);

    let ns = g
        .list_namespaces(pb::ListNamespacesRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(ns.namespaces, vec!["prod"]);
    let svcs = g
        .list_services(pb::ListServicesRequest {
            namespace: "prod".into(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(svcs.services, vec!["orders"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stops_heartbeating_vanishes_after_its_ttl_and_not_before() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let mut kept = instance("ttl", "svc", "kept", 1);
    kept.ttl_seconds = 3;
    let mut dropped = instance("ttl", "svc", "dropped", 2);
    dropped.ttl_seconds = 3;
    register(&mut g, kept).await;
    register(&mut g, dropped).await;
    let registered_at = Instant::now();
    let kept_ref = pb::InstanceRef {
        namespace: "ttl".into(),
        service: "svc".into(),
        instance_id: "kept".into(),
    };

    // Heart-beat one of them; the other is left alone. Before its TTL both are listed.
    while registered_at.elapsed() < Duration::from_millis(2500) {
        g.heartbeat(pb::HeartbeatRequest {
            instance: Some(kept_ref.clone()),
        })
        .await
        .expect("heartbeat");
        let present = ids(&discover(&mut g, "ttl", "svc", false).await);
        assert_eq!(
            present,
            vec!["dropped", "kept"],
            "nothing vanishes before its TTL"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let g2 = g.clone();
    let kr = kept_ref.clone();
    let beating = tokio::spawn(async move {
        let mut g = g2;
        loop {
            let _ = g
                .heartbeat(pb::HeartbeatRequest {
                    instance: Some(kr.clone()),
                })
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    wait_until(T, "the silent instance to expire", || {
        let mut g = g.clone();
        async move { ids(&discover(&mut g, "ttl", "svc", false).await) == vec!["kept"] }
    })
    .await;
    assert!(
        registered_at.elapsed() >= Duration::from_secs(3),
        "not before its TTL"
    );
    // A heartbeat for the expired one says so, and the caller must register again.
    let err = g
        .heartbeat(pb::HeartbeatRequest {
            instance: Some(pb::InstanceRef {
                instance_id: "dropped".into(),
                ..kept_ref
            }),
        })
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    beating.abort();
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_removes_at_once_and_re_registering_replaces_the_record() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let coord = coord_client::Client::connect([c.url()]).expect("client");
    let first = register(&mut g, instance("ns", "svc", "a", 1000)).await;
    let (kv, _) = coord
        .get("/registry/v1/instances/ns/svc/a")
        .await
        .expect("get");
    let first_lease = kv.expect("record").lease;
    let second = register(&mut g, instance("ns", "svc", "a", 2000)).await;
    assert!(second.revision > first.revision);
    let d = discover(&mut g, "ns", "svc", false).await;
    assert_eq!(d.instances.len(), 1, "one record per ID");
    assert_eq!(d.instances[0].port, 2000);
    // The first registration's lease is revoked; the record lives on under the new one.
    wait_until(T, "the replaced lease to be revoked", || {
        let coord = coord.clone();
        async move { coord.lease_time_to_live(first_lease).await.ok() == Some(-1) }
    })
    .await;
    assert_eq!(
        discover(&mut g, "ns", "svc", false).await.instances.len(),
        1
    );

    let r_ref = pb::InstanceRef {
        namespace: "ns".into(),
        service: "svc".into(),
        instance_id: "a".into(),
    };
    let resp = g
        .deregister(pb::DeregisterRequest {
            instance: Some(r_ref.clone()),
        })
        .await
        .expect("deregister")
        .into_inner();
    assert!(resp.existed);
    assert!(
        discover(&mut g, "ns", "svc", false)
            .await
            .instances
            .is_empty()
    );
    let again = g
        .deregister(pb::DeregisterRequest {
            instance: Some(r_ref),
        })
        .await
        .expect("deregister twice")
        .into_inner();
    assert!(!again.existed);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_invalid_argument_and_http_400_naming_the_problem() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let cases: Vec<(pb::Instance, &str)> = vec![
        (instance("", "svc", "a", 1), "namespace is empty"),
        (instance("ns", "", "a", 1), "service is empty"),
        (instance("Bad NS", "svc", "a", 1), "namespace \"Bad NS\""),
        (instance("ns", "svc", "a", 0), "port 0"),
        (instance("ns", "svc", "a", 70000), "port 70000"),
        (
            pb::Instance {
                address: "not an address".into(),
                ..instance("ns", "svc", "a", 1)
            },
            "address",
        ),
        (
            pb::Instance {
                ttl_seconds: 1,
                ..instance("ns", "svc", "a", 1)
            },
            "ttl_seconds 1",
        ),
        (
            pb::Instance {
                ttl_seconds: 999_999,
                ..instance("ns", "svc", "a", 1)
            },
            "ttl_seconds 999999",
        ),
    ];
    for (bad, expected) in cases {
        let err = g
            .register(pb::RegisterRequest {
                instance: Some(bad.clone()),
            })
            .await
            .expect_err("rejected");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(
            err.message().contains(expected),
            "{:?} lacks {expected:?}",
            err.message()
        );
    }
    let err = g
        .register(pb::RegisterRequest { instance: None })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Watching a namespace nobody registered in.
    let err = g
        .watch(pb::WatchRequest {
            namespace: "nobody".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown namespace");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("nobody"), "{err:?}");

    // The same over REST: 400 with a JSON error.
    let (status, body) = http_call(
        r.http,
        "POST",
        "/v1/instances",
        Some(&json!({"namespace": "ns", "service": "svc", "address": "10.0.0.1", "port": 0})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_argument");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("port 0"),
        "{body}"
    );
    let (status, body) =
        http_call(r.http, "POST", "/v1/instances", Some(&json!({"port": "x"}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid JSON"),
        "{body}"
    );
    let (status, _) = http_call(r.http, "GET", "/v1/namespaces/nobody/watch", None).await;
    assert_eq!(status, 400);
    let (status, _) = http_call(
        r.http,
        "GET",
        "/v1/namespaces/ns/services/svc/instances?colour=red",
        None,
    )
    .await;
    assert_eq!(status, 400);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_face_registers_discovers_heartbeats_and_deregisters() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let body = json!({
        "namespace": "web", "service": "api", "instance_id": "i1",
        "address": "10.0.0.9", "port": 443, "protocol": "grpc", "tags": ["blue"],
        "health_check": {"type": "tcp", "interval_ms": 60000}
    });
    let (status, reg) = http_call(r.http, "POST", "/v1/instances", Some(&body)).await;
    assert_eq!(status, 200, "{reg}");
    assert_eq!(reg["instance"]["protocol"], "grpc");
    assert_eq!(
        reg["instance"]["health_check"]["timeout_ms"], 1000,
        "defaults filled in"
    );
    let rev = reg["revision"].as_i64().expect("revision");

    let (status, d) = http_call(
        r.http,
        "GET",
        "/v1/namespaces/web/services/api/instances?tag=blue&healthy_only=true",
        None,
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["instances"][0]["instance_id"], "i1");
    assert!(d["revision"].as_i64().expect("revision") >= rev);
    let (_, d) = http_call(
        r.http,
        "GET",
        "/v1/namespaces/web/services/api/instances?tag=green",
        None,
    )
    .await;
    assert_eq!(d["instances"].as_array().map(Vec::len), Some(0));

    let (status, hb) = http_call(
        r.http,
        "POST",
        "/v1/namespaces/web/services/api/instances/i1/heartbeat",
        None,
    )
    .await;
    assert_eq!(status, 200, "{hb}");
    assert_eq!(hb["ttl_seconds"], 10);
    let (status, ns) = http_call(r.http, "GET", "/v1/namespaces", None).await;
    assert_eq!((status, ns["namespaces"].clone()), (200, json!(["web"])));
    let (status, o) = http_call(
        r.http,
        "PUT",
        "/v1/namespaces/web/services/api/options",
        Some(&json!({"protect_threshold": 0.5})),
    )
    .await;
    assert_eq!(status, 200, "{o}");
    let (_, o) = http_call(
        r.http,
        "GET",
        "/v1/namespaces/web/services/api/options",
        None,
    )
    .await;
    assert_eq!(o["protect_threshold"], 0.5);
    let (status, _) = http_call(
        r.http,
        "PUT",
        "/v1/namespaces/web/services/api/options",
        Some(&json!({"protect_threshold": 2.0})),
    )
    .await;
    assert_eq!(status, 400);

    let (status, del) = http_call(
        r.http,
        "DELETE",
        "/v1/namespaces/web/services/api/instances/i1",
        None,
    )
    .await;
    assert_eq!((status, del["existed"].clone()), (200, json!(true)));
    let (status, hb) = http_call(
        r.http,
        "POST",
        "/v1/namespaces/web/services/api/instances/i1/heartbeat",
        None,
    )
    .await;
    assert_eq!(status, 404, "{hb}");
    assert_eq!(hb["error"]["code"], "not_found");

    let (status, doc) = http_call(r.http, "GET", "/openapi.json", None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_serves_and_metrics_count_calls() {
    use tonic_health::pb::health_client::HealthClient;
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let channel = tonic::transport::Endpoint::from_shared(r.grpc_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    for service in ["", "registry.v1.Registry"] {
        let status = HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let mut g = r.grpc().await;
    register(&mut g, instance("m", "s", "a", 1)).await;
    let _ = g
        .register(pb::RegisterRequest {
            instance: Some(instance("m", "s", "a", 0)),
        })
        .await;
    let text = r.metrics().await;
    assert!(
        text.contains("registry_registrations_total{result=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("registry_registrations_total{result=\"invalid_argument\"} 1"),
        "{text}"
    );
    assert_eq!(r.metric("registry_live_replicas ").await, 1.0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_larger_than_tonics_4_mib_default_is_discovered_and_watched_whole() {
    // 100 instances with 60 KB of metadata each: one Discover answer and one watch snapshot of
    // about 6 MB, above tonic's default 4 MiB receive limit (in registry-svc's coordinator
    // client and in the registry client).
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    for n in 0..100u32 {
        let mut i = instance("big", "wide", &format!("i{n:03}"), 9000 + n);
        for m in 0..60 {
            i.metadata.insert(format!("k{m:02}"), "x".repeat(1000));
        }
        register(&mut g, i).await;
    }
    let client = r.client();
    let d = within(
        T,
        "Discover of a 6 MB service",
        client.discover(pb::DiscoverRequest {
            namespace: "big".into(),
            service: "wide".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("a 6 MB Discover answer");
    assert_eq!(d.instances.len(), 100);
    assert!(d.instances.iter().all(|i| i.metadata.len() == 60));

    let mut stream = within(
        T,
        "Watch of a 6 MB service",
        client.watch(pb::WatchRequest {
            namespace: "big".into(),
            service: "wide".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("watch opens");
    let first = within(T, "the watch snapshot", stream.message())
        .await
        .expect("a 6 MB snapshot")
        .expect("the stream is open");
    match first.event {
        Some(pb::watch_response::Event::Snapshot(s)) => assert_eq!(s.instances.len(), 100),
        other => panic!("expected a snapshot first, got {other:?}"),
    }
    r.stop().await;
}
