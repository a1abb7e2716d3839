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
//!
//! # Scale (`--scale N`)
//!
//! How many instances one registry holds, against a running registry-svc (`--registry`) and
//! coordinator (`--count-endpoint`, used only to count the instance keys), each a process of
//! its own whose RSS and CPU time the bench reads from `/proc` (`--pid coordinator=PID
//! --pid registry=PID`):
//!
//! ```sh
//! target/release/coordinator --data-dir /tmp/scale.etcd --listen-client-urls http://127.0.0.1:23790 &
//! target/release/registry-svc --coordinator-endpoints http://127.0.0.1:23790 --grpc-listen 127.0.0.1:23791 \
//!     --http-listen 127.0.0.1:23792 --admin-listen 127.0.0.1:23793 &
//! target/release/registry-bench --registry http://127.0.0.1:23791 --count-endpoint http://127.0.0.1:23790 \
//!     --scale 10000 --ttl 60 --pid coordinator=$(pgrep -n coordinator) --pid registry=$(pgrep -n registry-svc)
//! ```
//!
//! Phases, each bounded by `--max-seconds` in all: register N instances of one service
//! (`--concurrency` in flight, TTL `--ttl`); Discover of the whole service (5 calls); one
//! heartbeat of every instance (the CPU it costs the coordinator and the registry, and from
//! that the cores needed to renew N instances every TTL/3, the client library's pace); then no
//! more heartbeats: how long after their TTL the coordinator's expiry takes to remove them all.
//! It prints one table row per phase. `--ttl` must exceed the time registration takes (the
//! heartbeat phase stops at the first instance that expired before its renewal).

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
    /// Scale mode: register this many instances and measure holding, listing, renewing and
    /// expiring them (needs --registry and --count-endpoint).
    #[arg(long)]
    scale: Option<usize>,
    /// Scale mode: the instances' TTL in seconds.
    #[arg(long, default_value_t = 60)]
    ttl: u32,
    /// Scale mode: a coordinator client URL, to count the instance keys while they expire.
    #[arg(long)]
    count_endpoint: Option<String>,
    /// Scale mode: `name=PID` of a process whose RSS and CPU time to report (repeatable).
    #[arg(long = "pid", value_parser = service_kit::procstat::parse_named_pid)]
    pids: Vec<(String, u32)>,
    /// Scale mode: the bound on the whole run, in seconds (phases left are skipped).
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
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
    if let Some(n) = args.scale {
        return scale::run(&args, n).await;
    }
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

/// `--scale`: many instances in one registry.
mod scale {
    use super::*;

    use service_kit::procstat::{Usage, Watched, cpu_line, load_average};

    async fn count(
        kv: &mut proto::etcdserverpb::kv_client::KvClient<Channel>,
        prefix: &str,
    ) -> anyhow::Result<i64> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        Ok(kv
            .range(proto::etcdserverpb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: end,
                count_only: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .count)
    }

    /// Runs `f(i)` for every i in 0..n with `concurrency` in flight, until `deadline`;
    /// returns how many were done, the time taken, and the call latency histogram (µs).
    async fn each<F, Fut>(
        n: usize,
        concurrency: usize,
        deadline: Instant,
        f: F,
    ) -> anyhow::Result<(usize, Duration, Histogram<u64>)>
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
    {
        let f = Arc::new(f);
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let hist = Arc::new(parking_lot::Mutex::new(Histogram::<u64>::new_with_bounds(
            1,
            600_000_000,
            3,
        )?));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (f, next, done, hist) = (f.clone(), next.clone(), done.clone(), hist.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n || Instant::now() > deadline {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let t0 = Instant::now();
                    f(i).await?;
                    hist.lock()
                        .record((t0.elapsed().as_micros() as u64).max(1))?;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        for w in workers {
            w.await??;
        }
        let h = hist.lock().clone();
        Ok((done.load(Ordering::SeqCst), started.elapsed(), h))
    }

    pub async fn run(args: &Args, n: usize) -> anyhow::Result<()> {
        let (Some(url), Some(count_url)) = (&args.registry, &args.count_endpoint) else {
            bail!(
                "--scale needs --registry (a running registry-svc) and --count-endpoint (its coordinator)"
            );
        };
        if args.ttl < 2 {
            bail!("--ttl must be at least 2 seconds");
        }
        let procs = Watched::new(args.pids.clone())?;
        let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
        let ch = channel(url).await?;
        let g = RegistryClient::new(ch.clone()).max_decoding_message_size(1 << 30);
        let mut kv = proto::etcdserverpb::kv_client::KvClient::new(channel(count_url).await?);
        let ns = format!("scale-{:08x}", rand::random::<u32>());
        let prefix = format!("{}{ns}/big/", registry_svc::keys::INSTANCES);
        let ttl = args.ttl;
        println!(
            "registry scale: {n} instances, TTL {ttl} s, {} in flight, bound {} s; load average at start {}",
            args.concurrency,
            args.max_seconds,
            load_average()
        );
        println!("start RSS (MiB): {}", procs.rss(&procs.sample()?));
        println!();
        println!("| phase | result | CPU s (per process) | RSS after (MiB) |");
        println!("|---|---|---|---|");
        let row = |phase: &str, result: String, cpu: &[(String, f64)], u: &[Usage]| {
            let cpu = cpu_line(cpu);
            println!("| {phase} | {result} | {cpu} | {} |", procs.rss(u));
        };

        // 1. Register.
        let u0 = procs.sample()?;
        let (g2, ns2) = (g.clone(), ns.clone());
        let (registered, took, h) = each(n, args.concurrency, deadline, move |i| {
            let (mut g, ns) = (g2.clone(), ns2.clone());
            async move {
                g.register(pb::RegisterRequest {
                    instance: Some(pb::Instance {
                        namespace: ns,
                        service: "big".into(),
                        instance_id: format!("i{i:06}"),
                        address: format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
                        port: 8080,
                        ttl_seconds: ttl,
                        zone: format!("zone-{}", i % 3),
                        ..Default::default()
                    }),
                })
                .await
                .with_context(|| format!("register i{i:06}"))?;
                Ok(())
            }
        })
        .await?;
        let u1 = procs.sample()?;
        row(
            "register",
            format!(
                "{registered} in {:.1} s: {:.0}/s, call p50 {:.1} ms p99 {:.1} ms",
                took.as_secs_f64(),
                registered as f64 / took.as_secs_f64(),
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99))
            ),
            &procs.cpu(&u0, &u1),
            &u1,
        );
        let registered_at = Instant::now();
        if registered < n {
            println!("stopped at the time bound after {registered} of {n} registrations");
        }

        // 2. Discover the whole service.
        let mut times = Vec::new();
        let mut outcome = String::new();
        for _ in 0..5 {
            if Instant::now() > deadline {
                break;
            }
            let t0 = Instant::now();
            let mut g = g.clone();
            match g
                .discover(pb::DiscoverRequest {
                    namespace: ns.clone(),
                    service: "big".into(),
                    ..Default::default()
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    times.push(t0.elapsed().as_secs_f64() * 1000.0);
                    outcome = format!("{} instances", r.instances.len());
                }
                Err(e) => {
                    outcome = format!("failed: {} ({:?})", e.message(), e.code());
                    break;
                }
            }
        }
        let u2 = procs.sample()?;
        times.sort_by(f64::total_cmp);
        let result = if times.is_empty() {
            outcome
        } else {
            format!(
                "{outcome}; {} calls, median {:.0} ms, max {:.0} ms",
                times.len(),
                times[times.len() / 2],
                times[times.len() - 1]
            )
        };
        row("Discover (all)", result, &procs.cpu(&u1, &u2), &u2);

        // 3. One heartbeat of every instance.
        let (g3, ns3) = (g.clone(), ns.clone());
        let (beats, took, h) = each(registered, args.concurrency, deadline, move |i| {
            let (mut g, ns) = (g3.clone(), ns3.clone());
            async move {
                g.heartbeat(pb::HeartbeatRequest {
                    instance: Some(pb::InstanceRef {
                        namespace: ns,
                        service: "big".into(),
                        instance_id: format!("i{i:06}"),
                    }),
                })
                .await
                .with_context(|| format!("heartbeat i{i:06}"))?;
                Ok(())
            }
        })
        .await?;
        let renewed_at = Instant::now();
        let u3 = procs.sample()?;
        let spent = procs.cpu(&u2, &u3);
        let total: f64 = spent.iter().map(|(_, c)| c).sum();
        // The client library renews every TTL/3: N / (TTL/3) heartbeats per second.
        let rate_needed = registered as f64 / (f64::from(ttl) / 3.0);
        row(
            "heartbeat each once",
            format!(
                "{beats} in {:.1} s: {:.0}/s, call p50 {:.1} ms p99 {:.1} ms; {:.0} µs CPU each (all processes); renewing every TTL/3 = {:.0}/s would take {:.2} cores",
                took.as_secs_f64(),
                beats as f64 / took.as_secs_f64(),
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                total / beats.max(1) as f64 * 1e6,
                rate_needed,
                total / beats.max(1) as f64 * rate_needed
            ),
            &spent,
            &u3,
        );

        // 4. Idle: nothing renews; CPU until the first expiry is due.
        let quiet = (renewed_at.max(registered_at) + Duration::from_secs(u64::from(ttl)))
            .saturating_duration_since(Instant::now())
            .min(deadline.saturating_duration_since(Instant::now()));
        let first_due = Instant::now() + quiet;
        tokio::time::sleep(quiet.saturating_sub(Duration::from_secs(1))).await;
        let u4 = procs.sample()?;
        row(
            "idle (no heartbeats)",
            format!("{:.0} s", quiet.as_secs_f64()),
            &procs.cpu(&u3, &u4),
            &u4,
        );

        // 5. Expiry. The last renewal of instance i was during phase 3 (or its registration):
        // all are due by `renewed_at + TTL`; measure when the keys are gone.
        let all_due = renewed_at + Duration::from_secs(u64::from(ttl));
        let mut first_gone = None;
        let left = loop {
            let left = count(&mut kv, &prefix).await?;
            if first_gone.is_none() && (left as usize) < registered {
                first_gone = Some(Instant::now());
            }
            if left == 0 || Instant::now() > deadline {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let end = Instant::now();
        let u5 = procs.sample()?;
        let after = |t: Instant| {
            if t >= all_due {
                format!("+{:.1} s", (t - all_due).as_secs_f64())
            } else {
                format!("-{:.1} s", (all_due - t).as_secs_f64())
            }
        };
        let result = match (left, first_gone) {
            (0, Some(first)) => format!(
                "first removal {} and the last {} after the last one was due (first due {}); {:.0} removals/s",
                after(first),
                after(end),
                after(first_due),
                registered as f64 / (end - first).as_secs_f64().max(0.001)
            ),
            (left, _) => format!("{left} of {registered} still there at the time bound"),
        };
        row("expiry", result, &procs.cpu(&u4, &u5), &u5);
        println!();
        println!("load average at the end: {}", load_average());
        Ok(())
    }

    fn ms(us: u64) -> f64 {
        us as f64 / 1000.0
    }
}
