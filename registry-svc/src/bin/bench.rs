//! `registry-bench`: registrations per second, and the time from a registration to its arrival
//! at watchers.
//!
//! ```sh
//! cargo run --release -p coordinator -- --data-dir /tmp/bench.etcd &
//! cargo run --release -p registry-svc --bin registry-bench -- \
//!     --coordinator http://127.0.0.1:2379 --instances 1000 --watchers 100
//! ```
//!
//! With `--coordinator` the bench starts a registry-svc replica in its own process (on
//! ephemeral ports); with `--registry` it uses running replicas instead. It opens `--watchers`
//! gRPC watches on one service, waits for each one's snapshot, then registers `--instances`
//! instances with `--concurrency` calls in flight. Latency is measured per (instance, watcher)
//! pair from the moment the Register call was sent to the moment that watcher received the
//! instance's `ADDED` change; the figures cover every pair (instances × watchers samples).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use proto::registry_v1 as pb;
use proto::registry_v1::registry_client::RegistryClient;
use proto::registry_v1::watch_response::Event;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(
    name = "registry-bench",
    about = "Registration throughput and watch latency of registry-svc"
)]
struct Args {
    /// Coordinator endpoint(s): start a registry-svc replica in process against them.
    #[arg(long, value_delimiter = ',', conflicts_with = "registry")]
    coordinator: Vec<String>,
    /// gRPC endpoint of a running registry-svc (instead of --coordinator).
    #[arg(long)]
    registry: Option<String>,
    /// Instances to register.
    #[arg(long, default_value_t = 1000)]
    instances: usize,
    /// Watchers of the service.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Register calls in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// gRPC connections the watchers share (HTTP/2 streams are multiplexed over them).
    #[arg(long, default_value_t = 4)]
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

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let (url, service) = match (&args.registry, args.coordinator.is_empty()) {
        (Some(url), _) => (url.clone(), None),
        (None, false) => {
            let config = registry_svc::Config::try_parse_from([
                "registry-svc",
                "--coordinator-endpoints",
                &args.coordinator.join(","),
            ])?;
            let listeners = registry_svc::Listeners {
                admin: TcpListener::bind("127.0.0.1:0").await?,
                grpc: TcpListener::bind("127.0.0.1:0").await?,
                http: TcpListener::bind("127.0.0.1:0").await?,
            };
            let url = format!("http://{}", listeners.grpc.local_addr()?);
            let task = tokio::spawn(registry_svc::run_with_listeners(
                config,
                listeners,
                shutdown.clone(),
            ));
            (url, Some(task))
        }
        (None, true) => bail!("give --coordinator or --registry"),
    };
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(channel(&url).await?);
    }
    let mut g = RegistryClient::new(channels[0].clone());

    // A fresh namespace per run; the seed registration creates it so watches are accepted.
    let ns = format!("bench-{:08x}", rand::random::<u32>());
    let svc = "svc";
    let seed = pb::Instance {
        namespace: ns.clone(),
        service: svc.into(),
        instance_id: "seed".into(),
        address: "127.0.0.1".into(),
        port: 1,
        ttl_seconds: 60,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match g
            .register(pb::RegisterRequest {
                instance: Some(seed.clone()),
            })
            .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for registry-svc: {}", e.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("registry-svc does not answer: {e}"),
        }
    }

    // Start times of each registration, in ns since `base` (0 = not sent yet).
    let base = Instant::now();
    let sent: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.instances).map(|_| AtomicU64::new(0)).collect());
    let ready = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for w in 0..args.watchers {
        let mut client = RegistryClient::new(channels[w % channels.len()].clone());
        let mut stream = client
            .watch(pb::WatchRequest {
                namespace: ns.clone(),
                service: svc.into(),
                after_revision: 0,
            })
            .await?
            .into_inner();
        let (sent, ready, n) = (sent.clone(), ready.clone(), args.instances);
        watchers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut seen = 0usize;
            while seen < n {
                let Some(msg) = stream.message().await? else {
                    bail!("watch ended early");
                };
                match msg.event {
                    Some(Event::Snapshot(_)) => {
                        ready.fetch_add(1, Ordering::SeqCst);
                    }
                    Some(Event::Change(c)) if c.kind == pb::ChangeKind::Added as i32 => {
                        let at = base.elapsed().as_nanos() as u64;
                        let id = c.instance.map(|i| i.instance_id).unwrap_or_default();
                        if let Some(idx) =
                            id.strip_prefix('i').and_then(|s| s.parse::<usize>().ok())
                        {
                            let start = sent[idx].load(Ordering::SeqCst);
                            hist.record(((at.saturating_sub(start)) / 1000).max(1))?;
                            seen += 1;
                        }
                    }
                    _ => {}
                }
            }
            Ok(hist)
        }));
    }
    let wait = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::SeqCst) < args.watchers {
        if Instant::now() > wait {
            bail!(
                "only {} of {} watchers got their snapshot",
                ready.load(Ordering::SeqCst),
                args.watchers
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Register.
    let next = Arc::new(AtomicUsize::new(0));
    let register_hist = Arc::new(parking_lot::Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let started = Instant::now();
    let mut workers = Vec::new();
    for c in 0..args.concurrency {
        let mut client = RegistryClient::new(channels[c % channels.len()].clone());
        let (next, sent, ns, hist, n) = (
            next.clone(),
            sent.clone(),
            ns.clone(),
            register_hist.clone(),
            args.instances,
        );
        workers.push(tokio::spawn(async move {
            loop {
                let idx = next.fetch_add(1, Ordering::SeqCst);
                if idx >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let instance = pb::Instance {
                    namespace: ns.clone(),
                    service: svc.into(),
                    instance_id: format!("i{idx}"),
                    address: "10.0.0.1".into(),
                    port: 1 + (idx as u32 % 60000),
                    ttl_seconds: 60,
                    ..Default::default()
                };
                let t0 = Instant::now();
                sent[idx].store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
                client
                    .register(pb::RegisterRequest {
                        instance: Some(instance),
                    })
                    .await?;
                hist.lock()
                    .record((t0.elapsed().as_micros() as u64).max(1))?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let took = started.elapsed();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for w in watchers {
        let h = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .context("watchers did not see every registration")???;
        latency.add(h)?;
    }
    let reg = register_hist.lock().clone();
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "instances: {}, watchers: {}, concurrency: {}",
        args.instances, args.watchers, args.concurrency
    );
    println!(
        "registrations/s: {:.0} ({} in {:.2} s)",
        args.instances as f64 / took.as_secs_f64(),
        args.instances,
        took.as_secs_f64()
    );
    println!(
        "register call latency ms: p50 {:.2}  p99 {:.2}  max {:.2}",
        ms(reg.value_at_quantile(0.5)),
        ms(reg.value_at_quantile(0.99)),
        ms(reg.max())
    );
    println!(
        "registration -> watcher ms ({} samples): p50 {:.2}  p99 {:.2}  max {:.2}",
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
