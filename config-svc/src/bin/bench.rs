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
//!
//! # Scale (`--scale N`)
//!
//! How many items one config-svc and its coordinator hold, against a running config-svc
//! (`--config`) and coordinator (`--count-endpoint`, used only to count keys), each a process
//! of its own whose RSS and CPU time the bench reads from `/proc` (`--pid name=PID`):
//!
//! ```sh
//! target/release/coordinator --data-dir /tmp/scale.etcd --listen-client-urls http://127.0.0.1:23790 &
//! target/release/config-svc --coordinator-endpoints http://127.0.0.1:23790 --grpc-listen 127.0.0.1:23796 \
//!     --http-listen 127.0.0.1:23797 --admin-listen 127.0.0.1:23798 &
//! target/release/config-bench --config http://127.0.0.1:23796 --count-endpoint http://127.0.0.1:23790 \
//!     --scale 10000 --versions 5 --pid coordinator=$(pgrep -n coordinator) --pid config=$(pgrep -n config-svc)
//! ```
//!
//! Phases, all bounded by `--max-seconds`: publish `--versions` versions of each of N JSON
//! items (`--concurrency` in flight, version v of every item before v + 1 of any); then, one
//! call at a time, Gets of the current and of the first version of random items, History
//! pages of random items, and a List of every item of the namespace page by page. It prints
//! one table row per phase.

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
    /// Scale mode: publish this many items and measure holding and reading them (needs
    /// --config and --count-endpoint).
    #[arg(long)]
    scale: Option<usize>,
    /// Scale mode: versions published of each item.
    #[arg(long, default_value_t = 5)]
    versions: usize,
    /// Scale mode: calls of each read phase.
    #[arg(long, default_value_t = 1000)]
    reads: usize,
    /// Scale mode: a coordinator client URL, to count the keys the items take.
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
    if let Some(n) = args.scale {
        return scale::run(&args, n).await;
    }
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

/// `--scale`: many items in one config-svc.
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

    fn key(i: usize) -> String {
        format!("item-{i:06}.json")
    }

    /// A small random-looking pick of 0..n (no need for quality: spread over the items).
    fn pick(i: usize, n: usize) -> usize {
        (i.wrapping_mul(2_654_435_761) >> 3) % n.max(1)
    }

    fn summary(h: &Histogram<u64>, took: Duration) -> String {
        format!(
            "{} calls in {:.1} s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            h.len(),
            took.as_secs_f64(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max())
        )
    }

    pub async fn run(args: &Args, n: usize) -> anyhow::Result<()> {
        let (Some(url), Some(count_url)) = (&args.config, &args.count_endpoint) else {
            bail!(
                "--scale needs --config (a running config-svc) and --count-endpoint (its coordinator)"
            );
        };
        let procs = Watched::new(args.pids.clone())?;
        let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
        let ch = channel(url).await?;
        let g = ConfigClient::new(ch).max_decoding_message_size(1 << 30);
        let mut kv = proto::etcdserverpb::kv_client::KvClient::new(channel(count_url).await?);
        let ns = format!("scale-{:08x}", rand::random::<u32>());
        let versions = args.versions.max(1);
        println!(
            "config scale: {n} items x {versions} versions, {} in flight, bound {} s; load average at start {}",
            args.concurrency,
            args.max_seconds,
            load_average()
        );
        println!("start RSS (MiB): {}", procs.rss(&procs.sample()?));
        println!();
        println!("| phase | result | CPU s (per process) | RSS after (MiB) |");
        println!("|---|---|---|---|");
        let row = |phase: &str, result: String, cpu: String, u: &[Usage]| {
            println!("| {phase} | {result} | {cpu} | {} |", procs.rss(u));
        };

        // 1. Publish: version v of every item before version v + 1 of any.
        let u0 = procs.sample()?;
        let total = n * versions;
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let hist = Arc::new(parking_lot::Mutex::new(Histogram::<u64>::new_with_bounds(
            1,
            600_000_000,
            3,
        )?));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (mut g, next, done, hist, ns) = (
                g.clone(),
                next.clone(),
                done.clone(),
                hist.clone(),
                ns.clone(),
            );
            workers.push(tokio::spawn(async move {
                loop {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    if j >= total || Instant::now() > deadline {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let (i, v) = (j % n, j / n);
                    let t0 = Instant::now();
                    g.publish(pb::PublishRequest {
                        item: Some(item(&ns, &key(i))),
                        format: pb::Format::Json as i32,
                        content: format!(
                            "{{\"item\": {i}, \"version\": {v}, \"pool\": {{\"size\": 16, \"timeout_ms\": 500}}, \"hosts\": [\"db-{}.internal\", \"db-{}.internal\"]}}",
                            i % 7,
                            (i + v) % 7
                        ),
                        author: "bench".into(),
                        message: format!("v{v}"),
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("publish {} v{v}", key(i)))?;
                    hist.lock().record((t0.elapsed().as_micros() as u64).max(1))?;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        for w in workers {
            w.await??;
        }
        let took = started.elapsed();
        let published = done.load(Ordering::SeqCst);
        let h = hist.lock().clone();
        let u1 = procs.sample()?;
        let keys = count(&mut kv, &format!("{}{ns}/", config_svc::keys::ITEMS)).await?
            + count(&mut kv, &format!("{}{ns}/", config_svc::keys::VERSIONS)).await?;
        row(
            "publish",
            format!(
                "{published} of {total} in {:.1} s: {:.0}/s, call p50 {:.1} ms p99 {:.1} ms; {keys} coordinator keys",
                took.as_secs_f64(),
                published as f64 / took.as_secs_f64(),
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99))
            ),
            cpu_line(&procs.cpu(&u0, &u1)),
            &u1,
        );
        if published < total {
            println!("stopped at the time bound after {published} of {total} publishes");
        }
        let items = n.min(published.max(1));

        // 2. Reads, one call at a time.
        let mut before = u1;
        for phase in ["Get current", "Get version 1", "History (page of 100)"] {
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let started = Instant::now();
            let mut g = g.clone();
            for r in 0..args.reads {
                if Instant::now() > deadline {
                    break;
                }
                let it = item(&ns, &key(pick(r, items)));
                let t0 = Instant::now();
                match phase {
                    "History (page of 100)" => {
                        let resp = g
                            .history(pb::HistoryRequest {
                                item: Some(it),
                                page_size: 100,
                                ..Default::default()
                            })
                            .await?
                            .into_inner();
                        if resp.versions.is_empty() {
                            bail!("an empty history");
                        }
                    }
                    _ => {
                        let version = if phase == "Get version 1" { 1 } else { 0 };
                        g.get(pb::GetRequest {
                            item: Some(it),
                            version,
                            client: None,
                        })
                        .await?;
                    }
                }
                h.record((t0.elapsed().as_micros() as u64).max(1))?;
            }
            let u = procs.sample()?;
            row(
                phase,
                summary(&h, started.elapsed()),
                cpu_line(&procs.cpu(&before, &u)),
                &u,
            );
            before = u;
        }

        // 3. List every item of the namespace, page by page.
        let started = Instant::now();
        let (mut listed, mut pages, mut token) = (0usize, 0usize, String::new());
        let mut g2 = g.clone();
        loop {
            if Instant::now() > deadline {
                break;
            }
            let r = g2
                .list(pb::ListRequest {
                    namespace: ns.clone(),
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            listed += r.items.len();
            pages += 1;
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        let u = procs.sample()?;
        row(
            "List (pages of 1000)",
            format!(
                "{listed} items in {pages} pages, {:.2} s",
                started.elapsed().as_secs_f64()
            ),
            cpu_line(&procs.cpu(&before, &u)),
            &u,
        );
        println!();
        println!("load average at the end: {}", load_average());
        Ok(())
    }
}
