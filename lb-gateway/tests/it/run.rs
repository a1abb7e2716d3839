use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use lb_gateway::{Config, run, run_with_listener};
use service_kit::probe::check_health;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn config(admin_listen: &str) -> Config {
    Config::try_parse_from([
        "lb-gateway",
        "--admin-listen",
        admin_listen,
        "--listen",
        "127.0.0.1:0",
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
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(run_with_listener(
        config("127.0.0.1:0"),
        listener,
        shutdown.clone(),
    ));

    probe(addr, "/healthz").await.expect("/healthz answers 200");
    probe(addr, "/readyz").await.expect("ready once listening");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), service)
        .await
        .expect("run returns promptly after cancel")
        .expect("run did not panic")
        .expect("run returns Ok after a clean shutdown");
    probe(addr, "/healthz")
        .await
        .expect_err("nothing listens after run returned");
}

#[tokio::test]
async fn run_fails_naming_the_address_when_it_is_taken() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = taken.local_addr().expect("local addr");
    let err = run(config(&addr.to_string()), CancellationToken::new())
        .await
        .expect_err("the address is in use");
    assert!(format!("{err:#}").contains(&addr.to_string()), "{err:#}");
}
