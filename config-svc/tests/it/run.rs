use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use config_svc::{Config, run, run_with_listener};
use service_kit::probe::check_health;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::coord::{Coordinator, wait_until};

fn config(admin_listen: &str, coordinator: &str) -> Config {
    Config::try_parse_from([
        "config-svc",
        "--admin-listen",
        admin_listen,
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--coordinator-endpoints",
        coordinator,
        "--log-format",
        "text",
    ])
    .expect("valid config")
}

async fn probe(addr: SocketAddr, path: &'static str) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        check_health(&addr.to_string(), path, Duration::from_secs(2))
    })
    .await
    .expect("probe task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_health_and_readiness_until_cancelled_then_returns_ok() {
    let coordinator = Coordinator::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(run_with_listener(
        config("127.0.0.1:0", &coordinator.url()),
        listener,
        shutdown.clone(),
    ));

    probe(addr, "/healthz").await.expect("/healthz answers 200");
    wait_until(
        Duration::from_secs(15),
        "ready once the coordinator watch is established",
        || async { probe(addr, "/readyz").await.is_ok() },
    )
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), service)
        .await
        .expect("run returns promptly after cancel")
        .expect("run did not panic")
        .expect("run returns Ok after a clean shutdown");
    probe(addr, "/healthz")
        .await
        .expect_err("nothing listens after run returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_live_but_not_ready_while_the_coordinator_is_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(run_with_listener(
        config("127.0.0.1:0", &crate::coord::dead_endpoint()),
        listener,
        shutdown.clone(),
    ));
    wait_until(Duration::from_secs(10), "/healthz", || async {
        probe(addr, "/healthz").await.is_ok()
    })
    .await;
    probe(addr, "/readyz")
        .await
        .expect_err("not ready without a coordinator");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), service)
        .await
        .expect("run returns after cancel")
        .expect("no panic")
        .expect("Ok");
}

#[tokio::test]
async fn run_fails_naming_the_address_when_it_is_taken() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = taken.local_addr().expect("local addr");
    let err = run(
        config(&addr.to_string(), "http://127.0.0.1:2379"),
        CancellationToken::new(),
    )
    .await
    .expect_err("the address is in use");
    assert!(format!("{err:#}").contains(&addr.to_string()), "{err:#}");
}
