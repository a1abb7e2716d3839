//! `bench`: a load generator for any server speaking the etcd v3 gRPC API (the coordinator, or
//! etcd itself, so the two can be compared with the same client).
//!
//! # Workloads
//!
//! - `put`: each client puts a random key of `--key-space` with a random `--value-size` value.
//! - `range`: each client reads one random key, linearizably (`serializable = false`, so every
//!   read goes through the server's consensus/read-index path). The key space is loaded first,
//!   unless it already holds at least `--key-space` keys.
//! - `mixed`: `--read-percent` ranges (as in `range`), the rest puts (as in `put`); the
//!   default 50 matches etcd's own `benchmark txn-mixed --rw-ratio 1`.
//! - `load`: writes `--keys` distinct keys in `Txn`s of `--batch` puts, with `--clients`
//!   (first value) batches in flight, and reports the elapsed time. Scale test, not a latency test.
//! - `watchers`: opens `--watchers` watches on one prefix, spread over `--watch-streams` Watch
//!   streams, then puts one key under the prefix and measures how long until every watcher got
//!   the event (fan-out). With `--server-pid`, reports the server's RSS before and after.
//! - `ready`: retries a linearizable Range until one succeeds; with `--server-pid` reports the
//!   time since that process started (a restart-time probe), otherwise since `bench` started.
//!
//! # Measurement
//!
//! For each value of `--clients`, `bench` opens `--conns` HTTP/2 connections (each tonic
//! `Channel` is one connection; default `min(clients, 16)`), spread round-robin over
//! `--endpoints`, and starts `clients` request loops spread round-robin over the connections.
//! Each loop keeps exactly one request in flight (closed loop). The loops run `--warmup`, then
//! `--duration`; only requests that start and finish inside the measured window are counted and
//! recorded (in microseconds) in a per-client HdrHistogram, merged at the end.
//!
//! `--threads 1` runs the load generator on one thread with Tokio's single-threaded scheduler:
//! the loops that answers arriving together wake all send their next requests before any
//! connection writes, so the requests leave in fewer writes. It took 10–27 % less CPU per put
//! than the default (one thread per CPU) in `BENCHMARKS.md` session 12; on a fast machine one
//! thread may cap very high request rates, which is why it is not the default.
//!
//! Everything is bounded: a request gets at most `--request-timeout` (counted as an error when it
//! expires) and no request outlives the end of the run, so a stalled server yields a row full of
//! errors rather than a hung benchmark. Errors are counted and the first one is shown on stderr;
//! after an error a loop pauses 10 ms so a dead server does not turn the benchmark into a busy loop.
//!
//! With `--server-pid PID`, `bench` reads `utime + stime` of that process from `/proc/PID/stat`
//! at the start and end of the measured window and prints the server's CPU seconds and CPU
//! microseconds per request: on a shared machine this is much steadier than req/s, which also
//! depends on how much CPU the load generator itself takes (printed in the `--json` output).
//!
//! # Caveats
//!
//! The load generator runs on the same machine as the server and competes for the same cores;
//! closed-loop clients under-report tail latency when the server stalls (coordinated omission),
//! which is why timeouts and errors are reported next to the percentiles.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use proto::etcdserverpb::{
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
    kv_client::KvClient, request_op, watch_client::WatchClient, watch_request,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

/// Pause after a failed request, so that a dead server does not make the clients spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Highest latency the histograms track (60 s, in microseconds); larger values are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Concurrent puts used to preload the key space for `range` and `mixed`.
const PRELOAD_CONCURRENCY: usize = 64;

#[derive(Parser, Debug)]
#[command(about = "Load generator for etcd v3 gRPC servers (the coordinator or etcd)")]
struct Args {
    /// Server addresses, host:port (an http:// prefix is accepted), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// What to run.
    #[arg(long, value_enum, default_value = "put")]
    workload: Workload,
    /// Concurrent clients (one request in flight each); one run per value. `load` uses the first
    /// value as the number of batches in flight.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    clients: Vec<usize>,
    /// Measured time of each run, e.g. `10s`, `500ms`, `2m`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Number of distinct keys that `put`, `range` and `mixed` draw from.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Value size in bytes for every put.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// HTTP/2 connections per run (default: min(clients, 16)).
    #[arg(long)]
    conns: Option<usize>,
    /// Name of the server under test, printed in every row.
    #[arg(long, default_value = "server")]
    label: String,
    /// PID of the server process, to report its CPU time (and RSS for `load` and `watchers`).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object per run instead of a Markdown table.
    #[arg(long)]
    json: bool,
    /// Do not print the Markdown table header (to append rows to an existing table).
    #[arg(long)]
    no_header: bool,
    /// Percentage of reads in `mixed`.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_percent: u8,
    /// Longest a single request may take before it is abandoned and counted as an error.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    request_timeout: Duration,
    /// Prefix of every key the benchmark touches.
    #[arg(long, default_value = "bench/")]
    prefix: String,
    /// `load`: number of distinct keys to write.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// `load`: puts per Txn (etcd's default limit is 128 operations per Txn).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// `load`, `watchers`, `ready`: give up after this long.
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    max_time: Duration,
    /// `watchers`: number of watches to open.
    #[arg(long, default_value_t = 10_000)]
    watchers: usize,
    /// `watchers`: number of Watch streams to spread them over.
    #[arg(long, default_value_t = 100)]
    watch_streams: usize,
    /// `watchers`: how long to keep the watches open after the fan-out before measuring RSS again.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    hold: Duration,
    /// Threads of the load generator: 0 = one per CPU; 1 = Tokio's single-threaded scheduler,
    /// which runs the client loops woken by answers that arrived together before their
    /// connections write, so their next requests leave together (fewer writes for the load
    /// generator, fewer reads for the server).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Put,
    Range,
    Mixed,
    Load,
    Watchers,
    Ready,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Range => "range",
            Workload::Mixed => "mixed",
            Workload::Load => "load",
            Workload::Watchers => "watchers",
            Workload::Ready => "ready",
        }
    }
}

/// Parses `500ms`, `10s`, `2m`, or a bare number of seconds (fractions allowed).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// mimalloc, as the coordinator: the load generator shares the machine's CPUs with
/// them, and every CPU second it saves is one the servers under test get.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args = Args::parse();
    if args.endpoints.is_empty() || args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--endpoints and --clients must be non-empty, and client counts positive");
    }
    // 0: Tokio's default; 1: the single-threaded scheduler (see the module docs).
    let rt = service_kit::process::runtime(Some(args.threads))?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    match args.workload {
        Workload::Put | Workload::Range | Workload::Mixed => {
            if matches!(args.workload, Workload::Range | Workload::Mixed) {
                preload(&args).await?;
            }
            let mut first = true;
            for &clients in &args.clients {
                let row = run_closed_loop(&args, clients).await?;
                print_run(&args, &row, first);
                first = false;
            }
        }
        Workload::Load => {
            let row = run_load(&args).await?;
            print_load(&args, &row);
        }
        Workload::Watchers => {
            let row = run_watchers(&args).await?;
            print_watchers(&args, &row);
        }
        Workload::Ready => {
            let ms = run_ready(&args).await?;
            if args.json {
                println!(
                    "{{\"label\":{},\"workload\":\"ready\",\"ready_ms\":{ms:.0}}}",
                    json_str(&args.label)
                );
            } else {
                if !args.no_header {
                    println!("| label | ready after ms |\n|---|---:|");
                }
                println!("| {} | {ms:.0} |", args.label);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Connections and keys

/// Opens `n` lazily connected channels (one HTTP/2 connection each), round-robin over endpoints.
fn channels(args: &Args, n: usize) -> Result<Vec<Channel>> {
    (0..n.max(1))
        .map(|i| {
            let ep = &args.endpoints[i % args.endpoints.len()];
            let url = if ep.contains("://") {
                ep.clone()
            } else {
                format!("http://{ep}")
            };
            Ok(Endpoint::from_shared(url.clone())
                .with_context(|| format!("bad endpoint {url}"))?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .connect_lazy())
        })
        .collect()
}

fn bench_key(args: &Args, i: u64) -> Vec<u8> {
    format!("{}key/{i:010}", args.prefix).into_bytes()
}

/// The smallest key greater than every key starting with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn random_value(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    rng.fill(&mut v[..]);
    v
}

fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("histogram bounds")
}

/// Brief description of a gRPC error, for the stderr summary and the JSON output.
fn describe(status: &tonic::Status) -> String {
    let msg: String = status.message().chars().take(160).collect();
    format!("{:?}: {msg}", status.code())
}

/// Makes sure every key of the key space exists (for `range` and `mixed`), unless it already does.
async fn preload(args: &Args) -> Result<()> {
    let chans = channels(args, PRELOAD_CONCURRENCY.min(16))?;
    let mut kv = KvClient::new(chans[0].clone());
    let start = bench_key(args, 0);
    let end = prefix_end(format!("{}key/", args.prefix).as_bytes());
    let count = tokio::time::timeout(
        args.request_timeout.max(Duration::from_secs(10)),
        kv.range(RangeRequest {
            key: start,
            range_end: end,
            count_only: true,
            ..Default::default()
        }),
    )
    .await;
    match count {
        Ok(Ok(resp)) if resp.get_ref().count >= args.key_space as i64 => {
            eprintln!("preload: {} keys already present", resp.get_ref().count);
            return Ok(());
        }
        Ok(Ok(_)) => {}
        Ok(Err(status)) => eprintln!(
            "preload: count failed ({}), loading anyway",
            describe(&status)
        ),
        Err(_) => eprintln!("preload: count timed out, loading anyway"),
    }
    let t0 = Instant::now();
    let deadline = t0 + args.max_time;
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..PRELOAD_CONCURRENCY {
        let mut kv = KvClient::new(chans[w % chans.len()].clone());
        let (next, errors) = (next.clone(), errors.clone());
        let prefix = args.prefix.clone();
        let (key_space, value_size, timeout) =
            (args.key_space, args.value_size, args.request_timeout);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w as u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= key_space || Instant::now() >= deadline {
                    break;
                }
                let req = PutRequest {
                    key: format!("{prefix}key/{i:010}").into_bytes(),
                    value: random_value(&mut rng, value_size),
                    ..Default::default()
                };
                match tokio::time::timeout(timeout, kv.put(req)).await {
                    Ok(Ok(_)) => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(ERROR_BACKOFF).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let errors = errors.load(Ordering::Relaxed);
    eprintln!(
        "preload: {} keys in {:.2}s, {errors} errors",
        args.key_space,
        t0.elapsed().as_secs_f64()
    );
    if errors > 0 {
        eprintln!("preload: some keys may be missing; range misses will be counted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server process statistics from /proc

/// Clock ticks per second for /proc/PID/stat times (`getconf CLK_TCK`, else Linux's usual 100).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Fields of /proc/PID/stat after the command name (which may itself contain spaces);
/// index 0 is field 3 (`state`) of proc(5).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of a process in seconds ("self" for this process).
fn cpu_seconds(pid: &str, ticks: f64) -> Option<f64> {
    let f = stat_fields(pid)?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// Seconds since a process started (starttime, field 22, against /proc/uptime); 10 ms resolution.
fn process_age(pid: &str, ticks: f64) -> Option<f64> {
    let start: f64 = stat_fields(pid)?.get(19)?.parse().ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let uptime: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    Some(uptime - start / ticks)
}

/// Resident set size of a process in MiB (VmRSS from /proc/PID/status).
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU used by the server and by `bench` itself over a window.
struct CpuWindow {
    ticks: f64,
    server_pid: Option<String>,
    server0: Option<f64>,
    self0: Option<f64>,
}

impl CpuWindow {
    fn start(server_pid: Option<u32>) -> Self {
        let ticks = clock_ticks();
        let server_pid = server_pid.map(|p| p.to_string());
        let server0 = server_pid.as_deref().and_then(|p| cpu_seconds(p, ticks));
        if server_pid.is_some() && server0.is_none() {
            eprintln!(
                "warning: cannot read /proc/{}/stat",
                server_pid.as_deref().unwrap_or("?")
            );
        }
        CpuWindow {
            ticks,
            server_pid,
            server0,
            self0: cpu_seconds("self", ticks),
        }
    }

    /// (server CPU seconds, bench CPU seconds) since `start`.
    fn stop(&self) -> (Option<f64>, Option<f64>) {
        let server = match (&self.server_pid, self.server0) {
            (Some(p), Some(s0)) => cpu_seconds(p, self.ticks).map(|s1| s1 - s0),
            _ => None,
        };
        let me = self
            .self0
            .and_then(|s0| cpu_seconds("self", self.ticks).map(|s1| s1 - s0));
        (server, me)
    }
}

// ---------------------------------------------------------------------------------------------
// Closed-loop runs: put, range, mixed

/// What one client loop saw during the measured window.
struct ClientStats {
    hist: Histogram<u64>,
    errors: u64,
    timeouts: u64,
    misses: u64,
    first_error: Option<String>,
}

/// One row of the closed-loop table.
struct RunRow {
    clients: usize,
    conns: usize,
    secs: f64,
    hist: Histogram<u64>,
    errors: u64,
    timeouts: u64,
    misses: u64,
    first_error: Option<String>,
    server_cpu: Option<f64>,
    bench_cpu: Option<f64>,
    lost_clients: usize,
}

/// Settings shared by all client loops of one run.
struct LoopCfg {
    workload: Workload,
    prefix: String,
    key_space: u64,
    value_size: usize,
    read_percent: u8,
    request_timeout: Duration,
    measure_from: Instant,
    end: Instant,
}

async fn run_closed_loop(args: &Args, clients: usize) -> Result<RunRow> {
    let conns = args.conns.unwrap_or(clients.min(16)).clamp(1, clients);
    let chans = channels(args, conns)?;
    let t0 = Instant::now();
    let measure_from = t0 + args.warmup;
    let end = measure_from + args.duration;
    let cfg = Arc::new(LoopCfg {
        workload: args.workload,
        prefix: args.prefix.clone(),
        key_space: args.key_space.max(1),
        value_size: args.value_size,
        read_percent: args.read_percent,
        request_timeout: args.request_timeout,
        measure_from,
        end,
    });
    let hist = new_histogram()?;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let kv = KvClient::new(chans[c % conns].clone());
            let (cfg, hist) = (cfg.clone(), hist.clone());
            tokio::spawn(client_loop(kv, cfg, hist, c as u64))
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let cpu = CpuWindow::start(args.server_pid);
    tokio::time::sleep_until(end.into()).await;
    let (server_cpu, bench_cpu) = cpu.stop();

    // Every loop stops by `end` on its own; the grace period only guards against a bug.
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let joined =
        tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(tasks)).await;
    let mut row = RunRow {
        clients,
        conns,
        secs: args.duration.as_secs_f64(),
        hist,
        errors: 0,
        timeouts: 0,
        misses: 0,
        first_error: None,
        server_cpu,
        bench_cpu,
        lost_clients: 0,
    };
    match joined {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(s) => {
                        row.hist.add(&s.hist).context("merging histograms")?;
                        row.errors += s.errors;
                        row.timeouts += s.timeouts;
                        row.misses += s.misses;
                        if row.first_error.is_none() {
                            row.first_error = s.first_error;
                        }
                    }
                    Err(_) => row.lost_clients += 1,
                }
            }
        }
        Err(_) => {
            aborts.iter().for_each(|a| a.abort());
            row.lost_clients = clients;
        }
    }
    if row.lost_clients > 0 {
        eprintln!(
            "warning: {} client loops did not finish; their results are missing",
            row.lost_clients
        );
    }
    Ok(row)
}

async fn client_loop(
    mut kv: KvClient<Channel>,
    cfg: Arc<LoopCfg>,
    hist: Histogram<u64>,
    seed: u64,
) -> ClientStats {
    let mut rng = StdRng::seed_from_u64(0x5eed ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut stats = ClientStats {
        hist,
        errors: 0,
        timeouts: 0,
        misses: 0,
        first_error: None,
    };
    loop {
        let started = Instant::now();
        if started >= cfg.end {
            break;
        }
        let measured = started >= cfg.measure_from;
        let i = rng.random_range(0..cfg.key_space);
        let key = format!("{}key/{i:010}", cfg.prefix).into_bytes();
        let read = match cfg.workload {
            Workload::Range => true,
            Workload::Mixed => rng.random_range(0..100u8) < cfg.read_percent,
            _ => false,
        };
        let by_timeout = started + cfg.request_timeout;
        let deadline = by_timeout.min(cfg.end);
        // Ok(true) = success, Ok(false) = the key was not found (range only).
        let request = async {
            if read {
                let req = RangeRequest {
                    key,
                    serializable: false,
                    ..Default::default()
                };
                kv.range(req).await.map(|r| !r.get_ref().kvs.is_empty())
            } else {
                let value = random_value(&mut rng, cfg.value_size);
                kv.put(PutRequest {
                    key,
                    value,
                    ..Default::default()
                })
                .await
                .map(|_| true)
            }
        };
        match tokio::time::timeout_at(deadline.into(), request).await {
            Ok(Ok(found)) => {
                if measured {
                    let us = started.elapsed().as_micros() as u64;
                    stats.hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
                    if !found {
                        stats.misses += 1;
                    }
                }
            }
            Ok(Err(status)) => {
                if measured {
                    stats.errors += 1;
                    stats.first_error.get_or_insert_with(|| describe(&status));
                }
                tokio::time::sleep_until(deadline.min(Instant::now() + ERROR_BACKOFF).into()).await;
            }
            Err(_) if by_timeout <= cfg.end => {
                if measured {
                    stats.errors += 1;
                    stats.timeouts += 1;
                    stats
                        .first_error
                        .get_or_insert_with(|| format!("timeout after {:?}", cfg.request_timeout));
                }
            }
            // The run ended with this request in flight: it is neither a success nor an error.
            Err(_) => break,
        }
    }
    stats
}

fn ms(hist: &Histogram<u64>, q: f64) -> f64 {
    if hist.is_empty() {
        0.0
    } else {
        hist.value_at_quantile(q) as f64 / 1000.0
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

fn json_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "null".to_owned(), |v| format!("{v:.digits$}"))
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn print_run(args: &Args, row: &RunRow, first: bool) {
    let requests = row.hist.len();
    let rps = requests as f64 / row.secs;
    let cpu_us = row
        .server_cpu
        .filter(|_| requests > 0)
        .map(|c| c * 1e6 / requests as f64);
    if let Some(e) = &row.first_error {
        eprintln!(
            "{} {} clients={}: {} errors ({} timeouts), first: {e}",
            args.label,
            args.workload.name(),
            row.clients,
            row.errors,
            row.timeouts
        );
    }
    if row.misses > 0 {
        eprintln!(
            "{} {} clients={}: {} reads found no key",
            args.label,
            args.workload.name(),
            row.clients,
            row.misses
        );
    }
    if args.json {
        println!(
            "{{\"label\":{},\"workload\":\"{}\",\"clients\":{},\"conns\":{},\"duration_s\":{:.3},\
             \"requests\":{requests},\"rps\":{rps:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\
             \"p999_ms\":{:.3},\"max_ms\":{:.3},\"errors\":{},\"timeouts\":{},\"misses\":{},\
             \"server_cpu_s\":{},\"server_cpu_us_per_req\":{},\"bench_cpu_s\":{},\
             \"value_size\":{},\"key_space\":{},\"first_error\":{}}}",
            json_str(&args.label),
            args.workload.name(),
            row.clients,
            row.conns,
            row.secs,
            ms(&row.hist, 0.5),
            ms(&row.hist, 0.99),
            ms(&row.hist, 0.999),
            row.hist.max() as f64 / 1000.0,
            row.errors,
            row.timeouts,
            row.misses,
            json_opt(row.server_cpu, 3),
            json_opt(cpu_us, 1),
            json_opt(row.bench_cpu, 3),
            args.value_size,
            args.key_space,
            row.first_error
                .as_deref()
                .map_or_else(|| "null".to_owned(), json_str),
        );
        return;
    }
    if first && !args.no_header {
        println!(
            "| label | workload | clients | conns | requests | req/s | p50 ms | p99 ms | p99.9 ms | errors | server CPU s | CPU µs/req |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    println!(
        "| {} | {} | {} | {} | {requests} | {rps:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
        args.label,
        args.workload.name(),
        row.clients,
        row.conns,
        ms(&row.hist, 0.5),
        ms(&row.hist, 0.99),
        ms(&row.hist, 0.999),
        row.errors,
        opt(row.server_cpu, 2),
        opt(cpu_us, 0),
    );
}

// ---------------------------------------------------------------------------------------------
// load: many keys in batched Txns

struct LoadRow {
    concurrency: usize,
    keys_acked: u64,
    secs: f64,
    errors: u64,
    first_error: Option<String>,
    server_cpu: Option<f64>,
    server_rss: Option<f64>,
    completed: bool,
}

async fn run_load(args: &Args) -> Result<LoadRow> {
    let concurrency = args.clients[0];
    let batch = args.batch.max(1) as u64;
    let batches = args.keys.div_ceil(batch);
    let chans = channels(
        args,
        args.conns
            .unwrap_or(concurrency.min(16))
            .clamp(1, concurrency),
    )?;
    let timeout = args.request_timeout.max(Duration::from_secs(10));
    let t0 = Instant::now();
    let deadline = t0 + args.max_time;
    let cpu = CpuWindow::start(args.server_pid);
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|w| {
            let mut kv = KvClient::new(chans[w % chans.len()].clone());
            let (next, acked) = (next.clone(), acked.clone());
            let (prefix, keys, value_size) = (args.prefix.clone(), args.keys, args.value_size);
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(w as u64);
                let (mut errors, mut first_error) = (0u64, None::<String>);
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches || Instant::now() >= deadline {
                        break;
                    }
                    let lo = b * batch;
                    let hi = (lo + batch).min(keys);
                    let success = (lo..hi)
                        .map(|i| RequestOp {
                            request: Some(request_op::Request::RequestPut(PutRequest {
                                key: format!("{prefix}load/{i:010}").into_bytes(),
                                value: random_value(&mut rng, value_size),
                                ..Default::default()
                            })),
                        })
                        .collect();
                    let req = TxnRequest {
                        compare: vec![],
                        success,
                        failure: vec![],
                    };
                    let until = deadline.min(Instant::now() + timeout);
                    match tokio::time::timeout_at(until.into(), kv.txn(req)).await {
                        Ok(Ok(_)) => {
                            acked.fetch_add(hi - lo, Ordering::Relaxed);
                        }
                        Ok(Err(status)) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| describe(&status));
                            tokio::time::sleep(ERROR_BACKOFF).await;
                        }
                        Err(_) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| "timeout".to_owned());
                        }
                    }
                }
                (errors, first_error)
            })
        })
        .collect();
    let mut row = LoadRow {
        concurrency,
        keys_acked: 0,
        secs: 0.0,
        errors: 0,
        first_error: None,
        server_cpu: None,
        server_rss: None,
        completed: false,
    };
    for t in tasks {
        if let Ok((errors, first)) = t.await {
            row.errors += errors;
            if row.first_error.is_none() {
                row.first_error = first;
            }
        }
    }
    row.secs = t0.elapsed().as_secs_f64();
    row.keys_acked = acked.load(Ordering::Relaxed);
    row.completed = row.keys_acked == args.keys;
    row.server_cpu = cpu.stop().0;
    row.server_rss = args.server_pid.and_then(rss_mib);
    if let Some(e) = &row.first_error {
        eprintln!("{} load: {} errors, first: {e}", args.label, row.errors);
    }
    Ok(row)
}

fn print_load(args: &Args, r: &LoadRow) {
    let kps = r.keys_acked as f64 / r.secs.max(1e-9);
    if args.json {
        println!(
            "{{\"label\":{},\"workload\":\"load\",\"keys\":{},\"keys_acked\":{},\"batch\":{},\
             \"concurrency\":{},\"elapsed_s\":{:.2},\"keys_per_s\":{kps:.0},\"errors\":{},\
             \"completed\":{},\"server_cpu_s\":{},\"server_rss_mib\":{},\"first_error\":{}}}",
            json_str(&args.label),
            args.keys,
            r.keys_acked,
            args.batch,
            r.concurrency,
            r.secs,
            r.errors,
            r.completed,
            json_opt(r.server_cpu, 2),
            json_opt(r.server_rss, 1),
            r.first_error
                .as_deref()
                .map_or_else(|| "null".to_owned(), json_str),
        );
        return;
    }
    if !args.no_header {
        println!(
            "| label | keys acked | batch | in flight | elapsed s | keys/s | errors | server CPU s | server RSS MiB |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    println!(
        "| {} | {} | {} | {} | {:.1} | {kps:.0} | {} | {} | {} |",
        args.label,
        r.keys_acked,
        args.batch,
        r.concurrency,
        r.secs,
        r.errors,
        opt(r.server_cpu, 1),
        opt(r.server_rss, 0)
    );
}

// ---------------------------------------------------------------------------------------------
// watchers: many watches on one prefix, one event fanned out to all of them

struct WatchRow {
    created: usize,
    create_secs: f64,
    events: usize,
    fanout_ms: Option<f64>,
    rss_before: Option<f64>,
    rss_after: Option<f64>,
    errors: u64,
    first_error: Option<String>,
}

/// Progress reports from one Watch stream task.
enum StreamEvent {
    Created(usize),
    AllEvents,
    Failed(String),
}

async fn run_watchers(args: &Args) -> Result<WatchRow> {
    let streams = args.watch_streams.clamp(1, args.watchers.max(1));
    let chans = channels(
        args,
        args.conns.unwrap_or(streams.min(16)).clamp(1, streams),
    )?;
    let watch_prefix = format!("{}watch/", args.prefix).into_bytes();
    let range_end = prefix_end(&watch_prefix);
    let rss_before = args.server_pid.and_then(rss_mib);
    let deadline = Instant::now() + args.max_time;
    let (report_tx, mut report_rx) = tokio::sync::mpsc::unbounded_channel::<StreamEvent>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let n = args.watchers / streams + usize::from(s < args.watchers % streams);
        let mut client = WatchClient::new(chans[s % chans.len()].clone());
        let (report_tx, mut stop_rx) = (report_tx.clone(), stop_rx.clone());
        let (key, range_end) = (watch_prefix.clone(), range_end.clone());
        tasks.push(tokio::spawn(async move {
            let (req_tx, req_rx) = futures::channel::mpsc::unbounded::<WatchRequest>();
            for _ in 0..n {
                let create = WatchCreateRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                    ..Default::default()
                };
                let _ = req_tx.unbounded_send(WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
                });
            }
            let mut responses = match client.watch(req_rx).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    let _ = report_tx.send(StreamEvent::Failed(describe(&status)));
                    return;
                }
            };
            let (mut created, mut events) = (0usize, 0usize);
            loop {
                tokio::select! {
                    msg = responses.next() => match msg {
                        Some(Ok(resp)) => {
                            if resp.created {
                                created += 1;
                                if created == n {
                                    let _ = report_tx.send(StreamEvent::Created(n));
                                }
                            }
                            if resp.canceled {
                                let _ = report_tx.send(StreamEvent::Failed(format!(
                                    "watch canceled: {}", resp.cancel_reason)));
                            }
                            if !resp.events.is_empty() {
                                events += 1;
                                if events == n {
                                    let _ = report_tx.send(StreamEvent::AllEvents);
                                }
                            }
                        }
                        Some(Err(status)) => {
                            let _ = report_tx.send(StreamEvent::Failed(describe(&status)));
                            break;
                        }
                        None => {
                            let _ = report_tx.send(StreamEvent::Failed("stream closed by server".into()));
                            break;
                        }
                    },
                    _ = stop_rx.changed() => break,
                }
            }
            drop(req_tx);
        }));
    }
    drop(report_tx);

    let mut row = WatchRow {
        created: 0,
        create_secs: 0.0,
        events: 0,
        fanout_ms: None,
        rss_before,
        rss_after: None,
        errors: 0,
        first_error: None,
    };
    let mut streams_created = 0;
    // Phase 1: wait until every stream has all its watches created (or has failed).
    while streams_created + (row.errors as usize) < streams {
        match tokio::time::timeout_at(deadline.into(), report_rx.recv()).await {
            Ok(Some(StreamEvent::Created(n))) => {
                streams_created += 1;
                row.created += n;
            }
            Ok(Some(StreamEvent::Failed(e))) => note(&mut row, e),
            Ok(Some(StreamEvent::AllEvents)) => {}
            Ok(None) | Err(_) => {
                note(&mut row, "timed out creating watches".into());
                break;
            }
        }
    }
    row.create_secs = t0.elapsed().as_secs_f64();

    // Phase 2: one put under the prefix; wait until every watcher has seen it.
    if streams_created > 0 {
        let mut kv = KvClient::new(chans[0].clone());
        let put = PutRequest {
            key: [watch_prefix.as_slice(), b"k"].concat(),
            value: vec![b'x'; args.value_size],
            ..Default::default()
        };
        let sent = Instant::now();
        match tokio::time::timeout(args.request_timeout, kv.put(put)).await {
            Ok(Ok(_)) => {
                let mut done = 0;
                let fanout_deadline = deadline.min(sent + Duration::from_secs(30));
                while done < streams_created {
                    match tokio::time::timeout_at(fanout_deadline.into(), report_rx.recv()).await {
                        Ok(Some(StreamEvent::AllEvents)) => done += 1,
                        Ok(Some(StreamEvent::Failed(e))) => note(&mut row, e),
                        Ok(Some(StreamEvent::Created(_))) => {}
                        Ok(None) | Err(_) => {
                            note(
                                &mut row,
                                "timed out waiting for the event on every watcher".into(),
                            );
                            break;
                        }
                    }
                }
                if done == streams_created {
                    row.fanout_ms = Some(sent.elapsed().as_secs_f64() * 1000.0);
                    row.events = row.created;
                } else {
                    row.events = done; // streams, not watchers: only complete streams are known
                }
            }
            Ok(Err(status)) => note(&mut row, describe(&status)),
            Err(_) => note(&mut row, "put timed out".into()),
        }
        tokio::time::sleep(args.hold).await;
    }
    row.rss_after = args.server_pid.and_then(rss_mib);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(tasks)).await;
    if let Some(e) = &row.first_error {
        eprintln!("{} watchers: {} errors, first: {e}", args.label, row.errors);
    }
    Ok(row)
}

fn note(row: &mut WatchRow, e: String) {
    row.errors += 1;
    row.first_error.get_or_insert(e);
}

fn print_watchers(args: &Args, r: &WatchRow) {
    let rss_delta = r.rss_after.zip(r.rss_before).map(|(a, b)| a - b);
    let per_watch_kib = rss_delta
        .filter(|_| r.created > 0)
        .map(|d| d * 1024.0 / r.created as f64);
    if args.json {
        println!(
            "{{\"label\":{},\"workload\":\"watchers\",\"watchers\":{},\"streams\":{},\
             \"created\":{},\"create_s\":{:.3},\"fanout_ms\":{},\"events\":{},\
             \"server_rss_before_mib\":{},\"server_rss_after_mib\":{},\"rss_kib_per_watch\":{},\
             \"errors\":{},\"first_error\":{}}}",
            json_str(&args.label),
            args.watchers,
            args.watch_streams,
            r.created,
            r.create_secs,
            json_opt(r.fanout_ms, 1),
            r.events,
            json_opt(r.rss_before, 1),
            json_opt(r.rss_after, 1),
            json_opt(per_watch_kib, 2),
            r.errors,
            r.first_error
                .as_deref()
                .map_or_else(|| "null".to_owned(), json_str),
        );
        return;
    }
    if !args.no_header {
        println!(
            "| label | watchers | streams | create s | fan-out ms | RSS before MiB | RSS after MiB | KiB/watch | errors |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    println!(
        "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
        args.label,
        r.created,
        args.watch_streams,
        r.create_secs,
        opt(r.fanout_ms, 0),
        opt(r.rss_before, 0),
        opt(r.rss_after, 0),
        opt(per_watch_kib, 1),
        r.errors
    );
}

// ---------------------------------------------------------------------------------------------
// ready: time until the first successful linearizable Range

async fn run_ready(args: &Args) -> Result<f64> {
    let ticks = clock_ticks();
    let own_start = Instant::now();
    let pid = args.server_pid.map(|p| p.to_string());
    let deadline = own_start + args.max_time;
    let key = format!("{}ready", args.prefix).into_bytes();
    let mut last_error = String::from("no attempt");
    while Instant::now() < deadline {
        // A fresh channel each attempt, so a refused connection is retried at once.
        let chan = channels(args, 1)?.remove(0);
        let mut kv = KvClient::new(chan);
        let req = RangeRequest {
            key: key.clone(),
            serializable: false,
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_millis(500), kv.range(req)).await {
            Ok(Ok(_)) => {
                let secs = match pid.as_deref().and_then(|p| process_age(p, ticks)) {
                    Some(age) => age,
                    None => own_start.elapsed().as_secs_f64(),
                };
                return Ok(secs * 1000.0);
            }
            Ok(Err(status)) => last_error = describe(&status),
            Err(_) => last_error = "timeout".into(),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("server not ready after {:?}: {last_error}", args.max_time)
}
