use std::time::Duration;

use proto::registry_v1 as pb;

use crate::coord::{Coordinator, wait_until};
use crate::harness::{Backend, Registry, T, discover, ids, instance, register};

fn http_check(interval_ms: u32) -> pb::HealthCheck {
    pb::HealthCheck {
        kind: Some(pb::health_check::Kind::Http(pb::HttpCheck {
            path: "/health".into(),
            ..Default::default()
        })),
        interval_ms,
        timeout_ms: 100,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    }
}

async fn health_of(
    g: &mut pb::registry_client::RegistryClient<tonic::transport::Channel>,
    ns: &str,
    svc: &str,
    id: &str,
) -> i32 {
    discover(g, ns, svc, false)
        .await
        .instances
        .into_iter()
        .find(|i| i.instance_id == id)
        .map(|i| i.health)
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_http_check_marks_the_instance_unhealthy_and_a_passing_one_brings_it_back() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let backend = Backend::start().await;
    let mut i = instance("hc", "web", "b1", backend.port);
    i.health_check = Some(http_check(150));
    register(&mut g, i).await;
    register(&mut g, instance("hc", "web", "plain", 1)).await;

    backend.set_healthy(false);
    wait_until(T, "b1 to be marked unhealthy", || {
        let mut g = g.clone();
        async move { health_of(&mut g, "hc", "web", "b1").await == pb::HealthStatus::Unhealthy as i32 }
    })
    .await;
    let all = discover(&mut g, "hc", "web", false).await;
    assert_eq!(ids(&all), vec!["b1", "plain"], "unhealthy, not deleted");
    let detail = &all
        .instances
        .iter()
        .find(|i| i.instance_id == "b1")
        .expect("b1")
        .health_detail;
    assert!(detail.contains("503"), "{detail}");
    assert_eq!(
        ids(&discover(&mut g, "hc", "web", true).await),
        vec!["plain"],
        "excluded from healthy-only"
    );

    backend.set_healthy(true);
    wait_until(T, "b1 to be healthy again", || {
        let mut g = g.clone();
        async move { health_of(&mut g, "hc", "web", "b1").await == pb::HealthStatus::Healthy as i32 }
    })
    .await;
    assert_eq!(
        ids(&discover(&mut g, "hc", "web", true).await),
        vec!["b1", "plain"]
    );
    let text = r.metrics().await;
    assert!(
        text.contains("registry_health_transitions_total{to=\"unhealthy\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("registry_health_checks_total{kind=\"http\",result=\"fail\"}"),
        "{text}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_grpc_checks_follow_the_backend() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;

    // A gRPC backend serving grpc.health.v1, switched to NOT_SERVING later.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let grpc_port = u32::from(listener.local_addr().expect("addr").port());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut gi = instance("hc2", "svc", "grpc", grpc_port);
    gi.health_check = Some(pb::HealthCheck {
        kind: Some(pb::health_check::Kind::Grpc(pb::GrpcCheck {
            service: String::new(),
            ..Default::default()
        })),
        interval_ms: 150,
        timeout_ms: 140,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    });
    register(&mut g, gi).await;

    // A TCP backend that goes away.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let tcp_port = u32::from(tcp.local_addr().expect("addr").port());
    let mut ti = instance("hc2", "svc", "tcp", tcp_port);
    ti.health_check = Some(pb::HealthCheck {
        kind: Some(pb::health_check::Kind::Tcp(pb::TcpCheck {})),
        interval_ms: 150,
        timeout_ms: 100,
        healthy_threshold: 1,
        unhealthy_threshold: 2,
    });
    register(&mut g, ti).await;

    // Both pass for a while.
    wait_until(T, "both checks to have passed", || async {
        r.metric("registry_health_checks_total{kind=\"grpc\",result=\"pass\"}")
            .await
            >= 2.0
            && r.metric("registry_health_checks_total{kind=\"tcp\",result=\"pass\"}")
                .await
                >= 2.0
    })
    .await;
    assert_eq!(
        ids(&discover(&mut g, "hc2", "svc", true).await),
        vec!["grpc", "tcp"]
    );

    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    drop(tcp);
    wait_until(T, "both to be unhealthy", || {
        let mut g = g.clone();
        async move {
            discover(&mut g, "hc2", "svc", true)
                .await
                .instances
                .is_empty()
        }
    })
    .await;
    let unhealthy = pb::HealthStatus::Unhealthy as i32;
    assert_eq!(health_of(&mut g, "hc2", "svc", "grpc").await, unhealthy);
    assert_eq!(health_of(&mut g, "hc2", "svc", "tcp").await, unhealthy);
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    wait_until(T, "the gRPC backend to be healthy again", || {
        let mut g = g.clone();
        async move { health_of(&mut g, "hc2", "svc", "grpc").await == pb::HealthStatus::Healthy as i32 }
    })
    .await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protect_threshold_returns_unhealthy_instances_when_too_few_are_healthy() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let good = Backend::start().await;
    let bad = Backend::start().await;
    bad.set_healthy(false);
    for (id, port) in [("g1", good.port), ("b1", bad.port), ("b2", bad.port)] {
        let mut i = instance("pt", "svc", id, port);
        i.health_check = Some(http_check(150));
        register(&mut g, i).await;
    }
    wait_until(T, "b1 and b2 to be unhealthy", || {
        let mut g = g.clone();
        async move { ids(&discover(&mut g, "pt", "svc", true).await) == vec!["g1"] }
    })
    .await;
    // 1 of 3 healthy is below 0.5: healthy-only returns all three, flagged.
    g.set_service_options(pb::SetServiceOptionsRequest {
        options: Some(pb::ServiceOptions {
            namespace: "pt".into(),
            service: "svc".into(),
            protect_threshold: 0.5,
        }),
    })
    .await
    .expect("set options");
    let d = discover(&mut g, "pt", "svc", true).await;
    assert_eq!(ids(&d), vec!["b1", "b2", "g1"]);
    assert!(d.protect_threshold_triggered);
    // Above the threshold it does not trigger.
    g.set_service_options(pb::SetServiceOptionsRequest {
        options: Some(pb::ServiceOptions {
            namespace: "pt".into(),
            service: "svc".into(),
            protect_threshold: 0.3,
        }),
    })
    .await
    .expect("set options");
    let d = discover(&mut g, "pt", "svc", true).await;
    assert_eq!(ids(&d), vec!["g1"]);
    assert!(!d.protect_threshold_triggered);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_each_instance_is_probed_by_exactly_one_and_a_survivor_takes_all() {
    let c = Coordinator::start().await;
    let a = Registry::start_with(&c.url(), "127.0.0.1:0", &["--replica-id", "replica-a"]).await;
    let b = Registry::start_with(&c.url(), "127.0.0.1:0", &["--replica-id", "replica-b"]).await;
    let mut g = a.grpc().await;
    let backend = Backend::start().await;
    const N: usize = 40;
    for n in 0..N {
        let mut i = instance("shard", "svc", &format!("i{n}"), backend.port);
        i.health_check = Some(http_check(200));
        register(&mut g, i).await;
    }
    wait_until(
        T,
        "both replicas to see each other and split the instances",
        || async {
            let (pa, pb_) = (
                a.metric("registry_probed_instances ").await,
                b.metric("registry_probed_instances ").await,
            );
            a.metric("registry_live_replicas ").await == 2.0
                && b.metric("registry_live_replicas ").await == 2.0
                && pa + pb_ == N as f64
        },
    )
    .await;
    let (pa, pb_) = (
        a.metric("registry_probed_instances ").await,
        b.metric("registry_probed_instances ").await,
    );
    assert!(pa > 0.0 && pb_ > 0.0, "both take a share: {pa} + {pb_}");
    // Stable: still exactly N after a few probe rounds.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (pa2, pb2) = (
        a.metric("registry_probed_instances ").await,
        b.metric("registry_probed_instances ").await,
    );
    assert_eq!((pa2, pb2), (pa, pb_));

    b.stop().await;
    wait_until(T, "the survivor to probe every instance", || async {
        a.metric("registry_probed_instances ").await == N as f64
            && a.metric("registry_live_replicas ").await == 1.0
    })
    .await;
    a.stop().await;
}
