//! `config-bench`: publishes per second, and the time from a publish to its arrival at many
//! watchers.
//!
//! ```sh
//! target/release/coordinator --data-dir /tmp/bench.etcd --listen-client-urls http://127.0.0.1:23790 &
//! cargo run --release -p config-svc --bin config-bench -- \
//!     --coordinator http://127.0.0.1:23790 --watchers 1000 --rounds 200
//! ```
//!
//! With `--coordinator` the bench starts a config-svc replica in its own process (on ephemeral
//! ports); with `--config` it uses a running replica instead. Two phases:
//!
//! 1. **Publish rate**: `--publishes` publishes of a small JSON item, `--concurrency` calls in
//!    flight, each writer on its own item (publishes to one item serialise on its guard).
//! 2. **Push latency**: `--watchers` gRPC watches of one item (over `--connections` HTTP/2
//!    connections), each waits for its initial version; then `--rounds` publishes, one at a
//!    time: each is sent, and the next follows once every watcher received it (plus
//!    `--pause`). Latency is per (publish, watcher) pair, from sending the Publish call to that
//!    watcher receiving the version: rounds × watchers samples.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use proto::config_v1 as pb;
use proto::config_v1::config_client::ConfigClient;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(
    name = "config-bench",
    about = "Publish throughput and publish-to-watcher latency of config-svc"
)]
struct Args {
    /// Coordinator endpoint(s): start a config-svc replica in process against them.
    #[arg(long, value_delimiter = ',', conflicts_with = "config")]
    coordinator: Vec<String>,
    /// gRPC endpoint of a running config-svc (instead of --coordinator).
    #[arg(long)]
    config: Option<String>,
    /// Publishes in the throughput phase.
    #[arg(long, default_value_t = 2000)]
    publishes: usize,
    /// Publish calls in flight in the throughput phase.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Watchers in the latency phase.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Publishes in the latency phase.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Pause between latency rounds, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pause: u64,
    /// gRPC connections the watchers share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    runtime.block_on(run(args))
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

fn item(ns: &str, key: &str) -> pb::ItemRef {
    pb::ItemRef {
        namespace: ns.into(),
        group: "bench".into(),
        key: key.into(),
    }
}

fn publish_req(i: &pb::ItemRef, n: usize) -> pb::PublishRequest {
    pb::PublishRequest {
        item: Some(i.clone()),
        format: pb::Format::Json as i32,
        content: format!("{{\"round\": {n}, \"pool\": {{\"size\": 16, \"timeout_ms\": 500}}}}"),
        author: "bench".into(),
        ..Default::default()
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let (url, service) = match (&args.config, args.coordinator.is_empty()) {
        (Some(url), _) => (url.clone(), None),
        (None, false) => {
            let config = <config_svc::Config as clap::Parser>::try_parse_from([
                "config-svc",
                "--coordinator-endpoints",
                &args.coordinator.join(","),
            ])?;
            let listeners = config_svc::Listeners {
                admin: TcpListener::bind("127.0.0.1:0").await?,
                grpc: TcpListener::bind("127.0.0.1:0").await?,
                http: TcpListener::bind("127.0.0.1:0").await?,
            };
            let url = format!("http://{}", listeners.grpc.local_addr()?);
            let task = tokio::spawn(config_svc::run_with_listeners(
                config,
                listeners,
                shutdown.clone(),
            ));
            (url, Some(task))
        }
        (None, true) => bail!("give --coordinator or --config"),
    };
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(channel(&url).await?);
    }
    let ns = format!("bench-{:08x}", rand::random::<u32>());
    let mut g = ConfigClient::new(channels[0].clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let target = item(&ns, "watched.json");
    loop {
        match g.publish(publish_req(&target, 0)).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for config-svc: {}", e.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("config-svc does not answer: {e}"),
        }
    }

    // Phase 1: publish rate.
    let next = Arc::new(AtomicUsize::new(0));
    let call_hist = Arc::new(parking_lot::Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let mut client = ConfigClient::new(channels[w % channels.len()].clone());
        let (next, hist, n, it) = (
            next.clone(),
            call_hist.clone(),
            args.publishes,
            item(&ns, &format!("writer-{w}.json")),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let t0 = Instant::now();
                client.publish(publish_req(&it, i)).await?;
                hist.lock()
                    .record((t0.elapsed().as_micros() as u64).max(1))?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let took = started.elapsed();
    let calls = call_hist.lock().clone();
    println!(
        "publishes: {} with {} in flight on {} items",
        args.publishes, args.concurrency, args.concurrency
    );
    println!(
        "publishes/s: {:.0} ({:.2} s); Publish call ms: p50 {:.2}  p99 {:.2}  max {:.2}",
        args.publishes as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        ms(calls.value_at_quantile(0.5)),
        ms(calls.value_at_quantile(0.99)),
        ms(calls.max())
    );

    // Phase 2: push latency. Version 1 of the watched item exists; round r publishes r + 1.
    let base = Instant::now();
    let rounds = args.rounds;
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..rounds + 2).map(|_| AtomicU64::new(0)).collect());
    let arrived: Arc<Vec<AtomicUsize>> =
        Arc::new((0..rounds + 2).map(|_| AtomicUsize::new(0)).collect());
    let ready = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let mut watchers = Vec::new();
    for w in 0..args.watchers {
        let mut client = ConfigClient::new(channels[w % channels.len()].clone());
        let req = pb::WatchRequest {
            items: vec![target.clone()],
            client: Some(pb::Client {
                id: format!("watcher-{w}"),
                labels: Default::default(),
            }),
            ..Default::default()
        };
        let (sent, arrived, ready, progress) = (
            sent.clone(),
            arrived.clone(),
            ready.clone(),
            progress.clone(),
        );
        watchers.push(tokio::spawn(async move {
            let mut stream = client.watch(req).await?.into_inner();
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut seen = 0usize;
            while seen < rounds {
                let Some(msg) = stream.message().await? else {
                    bail!("watch ended early");
                };
                match msg.event {
                    Some(pb::watch_response::Event::Synced(_)) => {
                        ready.fetch_add(1, Ordering::SeqCst);
                        progress.notify_waiters();
                    }
                    Some(pb::watch_response::Event::Update(u)) => {
                        let at = base.elapsed().as_nanos() as u64;
                        let n = u.version.map(|v| v.number).unwrap_or(0) as usize;
                        if n >= 2 && n < sent.len() {
                            let start = sent[n].load(Ordering::SeqCst);
                            hist.record((at.saturating_sub(start) / 1000).max(1))?;
                            seen += 1;
                            arrived[n].fetch_add(1, Ordering::SeqCst);
                            progress.notify_waiters();
                        }
                    }
                    _ => {}
                }
            }
            Ok(hist)
        }));
    }
    let wait_for = |what: &'static str, cond: Box<dyn Fn() -> bool + Send>| {
        let progress = progress.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !cond() {
                if Instant::now() > deadline {
                    bail!("timed out waiting for {what}");
                }
                let _ = tokio::time::timeout(Duration::from_millis(5), progress.notified()).await;
            }
            Ok(())
        }
    };
    let n_watchers = args.watchers;
    {
        let ready = ready.clone();
        wait_for(
            "every watcher's initial version",
            Box::new(move || ready.load(Ordering::SeqCst) >= n_watchers),
        )
        .await?;
    }
    let mut publish_hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let latency_started = Instant::now();
    for r in 0..rounds {
        let n = r + 2;
        sent[n].store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
        let t0 = Instant::now();
        g.publish(publish_req(&target, n)).await?;
        publish_hist.record((t0.elapsed().as_micros() as u64).max(1))?;
        let arrived = arrived.clone();
        wait_for(
            "every watcher to receive a version",
            Box::new(move || arrived[n].load(Ordering::SeqCst) >= n_watchers),
        )
        .await?;
        if args.pause > 0 {
            tokio::time::sleep(Duration::from_millis(args.pause)).await;
        }
    }
    let latency_took = latency_started.elapsed();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for w in watchers {
        let h = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .context("watchers did not see every version")???;
        latency.add(h)?;
    }
    println!(
        "watchers: {}, rounds: {} ({:.1} s)",
        args.watchers,
        rounds,
        latency_took.as_secs_f64()
    );
    println!(
        "Publish call ms (watched item): p50 {:.2}  p99 {:.2}",
        ms(publish_hist.value_at_quantile(0.5)),
        ms(publish_hist.value_at_quantile(0.99))
    );
    println!(
        "publish -> watcher ms ({} samples): p50 {:.2}  p99 {:.2}  max {:.2}",
        latency.len(),
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.max())
    );
    shutdown.cancel();
    if let Some(task) = service {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    Ok(())
}
