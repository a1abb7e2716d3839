//! What a latency observation costs when proxy workers on different cores make them at the
//! same time: `prometheus_client`'s `Histogram` (one mutex per series) against the gateway's
//! [`Latency`] (a shard per worker). Every proxied request makes two observations (its route's
//! and its backend's series), so with a worker per core the one-mutex histogram is memory that
//! all cores write on every request.
//!
//! ```sh
//! cargo run --release -p lb-gateway --example latency_contention [OBSERVATIONS_PER_THREAD]
//! ```
//!
//! Prints a Markdown table: per kind and thread count, the median over the rounds (which
//! alternate the kinds) of the wall time per observation in each thread and of the process's
//! CPU time per observation. Bounded: 5 rounds of 2 thread counts × 2 kinds × OBSERVATIONS
//! (default 20,000,000) observations per thread.

use std::time::{Duration, Instant};

use lb_gateway::metrics::Latency;
use lb_gateway::upstream::set_worker;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

const ROUNDS: usize = 5;

/// The process's user + system CPU time, from `/proc/self/stat` (in clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let mut fields = rest.split_whitespace().skip(11);
    let mut tick = || {
        fields
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ticks = tick() + tick();
    Duration::from_millis(ticks * 10)
}

/// A latency in 0..5 ms, different from one observation to the next.
fn sample(i: u64) -> Duration {
    Duration::from_nanos(i.wrapping_mul(7_919_993) % 5_000_000)
}

/// Runs `threads` threads of `n` observations each; returns (wall ns per observation in a
/// thread, CPU ns per observation).
fn run(threads: usize, n: u64, observe: &(dyn Fn(Duration) + Sync)) -> (f64, f64) {
    let cpu = process_cpu();
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..threads {
            s.spawn(move || {
                set_worker(w);
                for i in 0..n {
                    observe(sample(i));
                }
            });
        }
    });
    let wall = start.elapsed();
    let cpu = process_cpu().saturating_sub(cpu);
    let per = |d: Duration, ops: u64| d.as_nanos() as f64 / ops as f64;
    (per(wall, n), per(cpu, n * threads as u64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000_000)
        .clamp(1_000, 50_000_000);
    println!(
        "| histogram | threads | ns per observation, each thread (wall) | CPU ns per observation |"
    );
    println!("|---|---:|---:|---:|");
    for threads in [1, 2] {
        let (mut theirs, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let histogram = Histogram::new(exponential_buckets(0.000_25, 2.0, 17));
            theirs.push(run(threads, n, &|d| histogram.observe(d.as_secs_f64())));
            let latency = Latency::new(threads);
            ours.push(run(threads, n, &|d| latency.observe(d)));
        }
        for (name, runs) in [
            ("prometheus_client Histogram (one mutex)", theirs),
            ("Latency (a shard per worker)", ours),
        ] {
            let wall = median(runs.iter().map(|r| r.0).collect());
            let cpu = median(runs.iter().map(|r| r.1).collect());
            println!("| {name} | {threads} | {wall:.1} | {cpu:.1} |");
        }
    }
}
