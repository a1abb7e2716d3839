//! Fault tests across real containers: the compose stack (three coordinator members, two
//! replicas each of registry-svc and config-svc, lb-gateway, three demo-svc instances) under
//! faults injected with the Docker CLI, while a recorded workload runs against the coordinator
//! cluster and HTTP traffic runs through the gateway.
//!
//! | scenario | fault | pass |
//! |---|---|---|
//! | leader partition | `docker network disconnect` the leader for 10 s, then reconnect | new leader ≤ 3 s; history linearizable, 0 lost acknowledged writes; gateway answers throughout |
//! | leader kill | `docker kill` (SIGKILL) the leader, later `docker start` it | the same |
//! | whole-cluster kill | `docker kill` all three members at once, then start them | a leader and a successful write after the start; history checks; the gateway answers from its last known set while there is no leader |
//! | leader pause | `docker pause` the leader for 5 s | new leader ≤ 3 s; no stale read from the resumed member (the history checks) |
//! | instance kill | `docker kill` one demo instance under load | after the ejection window: no failed request, no try at the killed instance (the gateway's metrics), every key answered |
//!
//! Every run is its own compose project (`faults-<pid>-<time>`) with ephemeral host ports on
//! 127.0.0.1, removed at the end whatever happens (see [`docker::Project`]). Loads are bounded
//! in rate and count; the whole run in time. A short report of each scenario is printed (and
//! written to `target/fault-tests/report.txt`) before the verdict.
//!
//! Needs a Docker engine and the images of `scripts/build-images.sh` (built here if missing;
//! `scripts/test.sh` builds them first). `FAULT_TESTS=skip` skips the run, saying so, on a
//! machine without Docker.
//!
//! - `docker`: the compose project and the Docker CLI faults.
//! - `kv`: the members, the leader (Maintenance Status), the recorded workload, the checker.
//! - `gateway`: HTTP load through lb-gateway, and its metrics.
//! - `scaling`: scaling out and in, coordinator members added and removed, a rolling restart
//!   (a second stack, after this one: see its docs).
//! - `tls`: the stack with TLS on every hop (`compose/docker-compose.tls.yml`), checked from the
//!   host with etcdctl and TLS clients (a third stack, one at a time like the others).
//! - `k8s`: the Kubernetes manifests (`deploy/k8s`) rendered and validated offline.

mod docker;
mod gateway;
mod k8s;
mod kv;
mod scaling;
mod tls;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::docker::Project;
use crate::gateway::Load;
use crate::kv::{MEMBERS, Members, Workload};

/// The bound on electing a new leader after losing one.
const ELECTION_BOUND: Duration = Duration::from_secs(3);
/// The bound on the stack being healthy after `up`, from built images.
const HEALTHY_BOUND: Duration = Duration::from_secs(60);
/// After a demo instance is killed, how long the gateway may still try it: the registry's
/// health check (every 1 s, unhealthy after 2 failures) and the gateway's outlier ejection (2
/// failed connects) both act within it.
const EJECTION_WINDOW: Duration = Duration::from_secs(5);
/// Bound on electing a leader after all members were killed and started again (the
/// reliability plan's "writable within 10 s after a restart").
const RESTART_BOUND: Duration = Duration::from_secs(10);
/// Bound on the whole run.
const RUN_BOUND: Duration = Duration::from_secs(12 * 60);

/// What one scenario did and saw.
#[derive(Default)]
struct Scenario {
    name: String,
    faults: Vec<String>,
    lines: Vec<String>,
    problems: Vec<String>,
}

impl Scenario {
    fn new(name: &str) -> Scenario {
        Scenario {
            name: name.into(),
            ..Default::default()
        }
    }

    fn fault(&mut self, at: Instant, since: Instant, what: String) {
        self.faults.push(format!(
            "+{:.1}s ({}) {what}",
            at.duration_since(since).as_secs_f64(),
            utc(at)
        ));
    }

    fn line(&mut self, l: String) {
        self.lines.push(l);
    }

    fn expect(&mut self, ok: bool, problem: String) {
        if !ok {
            self.problems.push(problem);
        }
    }

    fn render(&self, n: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "[{n}] {}", self.name);
        for f in &self.faults {
            let _ = writeln!(s, "    fault     {f}");
        }
        for l in &self.lines {
            let _ = writeln!(s, "    {l}");
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "    verdict   PASS");
        } else {
            for p in &self.problems {
                let _ = writeln!(s, "    FAILED    {p}");
            }
        }
        s
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Runs a blocking Docker CLI call without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Everything the scenarios share.
struct Env<'a> {
    project: &'a Project,
    members: Arc<Members>,
    gateway: SocketAddr,
    gateway_admin: SocketAddr,
}

#[test]
fn compose_stack_under_docker_faults() {
    let Some(_one) = docker_tests("fault tests") else {
        return;
    };
    let started = Instant::now();
    let project = Project::new();
    let runtime = runtime();
    let outcome =
        runtime.block_on(async { tokio::time::timeout(RUN_BOUND, run_all(&project)).await });
    runtime.shutdown_timeout(Duration::from_secs(5));
    let (header, scenarios) =
        outcome.unwrap_or_else(|_| panic!("the fault tests did not finish within {RUN_BOUND:?}"));

    conclude(
        project,
        "fault tests across containers",
        &header,
        &scenarios,
        started,
        "report.txt",
    );
}

/// Whether the tests across containers run here: not with `FAULT_TESTS=skip` (the test says so
/// and passes); else a Docker engine must answer, the images are built if missing, and the
/// guard returned keeps other compose projects of this binary waiting.
fn docker_tests(what: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if std::env::var("FAULT_TESTS").as_deref() == Ok("skip") {
        eprintln!("FAULT_TESTS=skip: the {what} across containers did NOT run");
        return None;
    }
    let one = docker::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    assert!(
        docker::engine_available(),
        "the {what} need a Docker engine (`docker info` failed); FAULT_TESTS=skip skips them"
    );
    docker::ensure_images();
    Some(one)
}

/// The runtime the scenarios run on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

/// Prints and saves the report of `scenarios` (in `target/fault-tests/<file>`), removes the
/// project, then fails naming every problem.
fn conclude(
    project: Project,
    title: &str,
    header: &str,
    scenarios: &[Scenario],
    started: Instant,
    file: &str,
) {
    let mut report = format!("== {title} (project {}): {header}\n", project.name);
    for (i, s) in scenarios.iter().enumerate() {
        report.push_str(&s.render(i + 1));
    }
    let _ = writeln!(report, "== total {}", secs(started.elapsed()));
    println!("{report}");
    eprintln!("{report}");
    let dir = docker::repo_root().join("target/fault-tests");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(file), &report);
    drop(project); // compose down -v before the verdict, so a failure leaves nothing behind

    let failed: Vec<String> = scenarios
        .iter()
        .flat_map(|s| s.problems.iter().map(move |p| format!("{}: {p}", s.name)))
        .collect();
    assert!(
        failed.is_empty(),
        "{title}: scenarios failed:\n{}",
        failed.join("\n")
    );
}

async fn run_all(project: &Project) -> (String, Vec<Scenario>) {
    let mut setup = Scenario::new("stack up, consistent hashing through the gateway");
    let up = blocking(|| project.up(Duration::from_secs(120)));
    let services = blocking(|| project.services());
    setup.line(format!(
        "{} containers healthy {} after `compose up`",
        services.len(),
        secs(up)
    ));
    setup.expect(
        up <= HEALTHY_BOUND,
        format!("healthy after {} (bound {})", secs(up), secs(HEALTHY_BOUND)),
    );
    let gateway = blocking(|| project.port("lb-gateway", 8080));
    let gateway_admin = blocking(|| project.port("lb-gateway", 9103));
    let members = Arc::new(Members::connect(project).await);
    let env = Env {
        project,
        members,
        gateway,
        gateway_admin,
    };
    baseline(&env, &mut setup).await;
    let header = format!("{} services", services.len());

    let mut scenarios = vec![setup];
    scenarios.push(leader_partition(&env).await);
    scenarios.push(leader_kill(&env).await);
    scenarios.push(whole_cluster_kill(&env).await);
    scenarios.push(leader_pause(&env).await);
    scenarios.push(instance_kill(&env).await);
    (header, scenarios)
}

/// Why an instance is missing from the gateway's answers: the gateway's own view of its
/// backends (registry health, ejection), and what the registry and the demo instances logged.
async fn missing_instance_diagnostics(env: &Env<'_>, s: &mut Scenario) {
    let (status, _, body) = gateway::get(env.gateway_admin, "/admin/backends").await;
    let view = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let routes = v.get("routes")?.as_array()?.clone();
            Some(
                routes
                    .iter()
                    .map(|r| {
                        let backends: Vec<String> = r["backends"]
                            .as_array()
                            .map(|b| {
                                b.iter()
                                    .map(|b| {
                                        format!(
                                            "{} {} {} ejected={}",
                                            b["instance_id"],
                                            b["id"],
                                            b["registry_health"],
                                            b["ejected"]
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        format!(
                            "route {} registry={} revision={}: [{}]",
                            r["route"],
                            r["registry"],
                            r["revision"],
                            backends.join(", ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n        "),
            )
        })
        .unwrap_or_else(|| format!("HTTP {status}: {body}"));
    s.line(format!("gateway backends:\n        {view}"));
    for service in [
        "registry-svc-1",
        "registry-svc",
        "demo-1",
        "demo-2",
        "demo-3",
    ] {
        let log = blocking(|| env.project.logs(service, 400));
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("health changed")
                    || l.contains("registered")
            })
            .collect();
        s.line(format!(
            "{service} log (health changes, registrations, warnings):\n        {}",
            lines[lines.len().saturating_sub(8)..].join("\n        ")
        ));
    }
}

/// The gateway answers, spreads keys over the instances, and keeps a key on one instance.
async fn baseline(env: &Env<'_>, s: &mut Scenario) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 3 && Instant::now() < deadline {
        for key in 0..gateway::KEYS {
            let (status, instance, _) = gateway::get(env.gateway, &format!("/load/{key}")).await;
            if let (200, Some(i)) = (status, instance) {
                seen.insert(i);
            }
        }
        if seen.len() < 3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    s.line(format!(
        "{} keys spread over instances {seen:?}",
        gateway::KEYS
    ));
    s.expect(
        seen.len() == 3,
        format!("all three demo instances answer through the gateway (saw {seen:?})"),
    );
    if seen.len() < 3 {
        missing_instance_diagnostics(env, s).await;
    }
    let mut answers = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let (status, instance, body) = gateway::get(env.gateway, "/users/alice").await;
        s.expect(
            status == 200,
            format!("GET /users/alice answered {status}: {body}"),
        );
        answers.extend(instance);
    }
    s.line(format!("GET /users/alice x10 answered by {answers:?}"));
    s.expect(
        answers.len() == 1,
        format!("the same key lands on one instance (got {answers:?})"),
    );

    // gRPC through the gateway: demo.v1.Demo/Hello, routed by the x-key header.
    let mut grpc_answers = std::collections::BTreeSet::new();
    match demo_svc::pb_demo::demo_client::DemoClient::connect(format!("http://{}", env.gateway))
        .await
    {
        Ok(mut client) => {
            for _ in 0..5 {
                let mut req = tonic::Request::new(demo_svc::pb_demo::HelloRequest {
                    key: "alice".into(),
                });
                req.metadata_mut().insert(
                    "x-key",
                    tonic::metadata::MetadataValue::from_static("alice"),
                );
                match client.hello(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        s.expect(r.key == "alice", format!("Hello echoes the key: {r:?}"));
                        grpc_answers.insert(r.instance_id);
                    }
                    Err(e) => s
                        .problems
                        .push(format!("gRPC Hello through the gateway: {e}")),
                }
            }
        }
        Err(e) => s.problems.push(format!("gRPC connect to the gateway: {e}")),
    }
    s.line(format!(
        "gRPC demo.v1.Demo/Hello (x-key: alice) x5 answered by {grpc_answers:?}"
    ));
    s.expect(
        grpc_answers.len() == 1,
        format!("one instance answers a gRPC key (got {grpc_answers:?})"),
    );
}

/// The current leader and its term, waiting for one if needed.
async fn leader(env: &Env<'_>, s: &mut Scenario) -> Option<(usize, u64)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(l) = env.members.leader().await
            && let Some(st) = env.members.status(l).await
        {
            return Some((l, st.term));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.problems.push("no leader before the fault (20 s)".into());
    None
}

/// The wall-clock time of `at`, for matching the report with the containers' logs.
fn utc(at: Instant) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(at.elapsed());
    let secs_of_day = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        now.subsec_millis()
    )
}

/// Waits until member `i` answers Status and names the cluster's leader (not itself unless it
/// is the leader); how long that took.
async fn rejoined(env: &Env<'_>, i: usize, since: Instant, timeout: Duration) -> Option<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        blocking(|| env.members.refresh(env.project, i));
        if let (Some(l), Some(st)) = (env.members.leader().await, env.members.status(i).await)
            && st.leader == env.members.id(l)
        {
            return Some(since.elapsed());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new leader came too late: say so, with what the other members logged about it.
fn election_problem(env: &Env<'_>, old: usize, took: Duration) -> String {
    let mut p = format!(
        "new leader after {} (bound {})",
        secs(took),
        secs(ELECTION_BOUND)
    );
    for (_, m) in MEMBERS.iter().enumerate().filter(|(i, _)| *i != old) {
        let log = blocking(|| env.project.logs(m, 200));
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("elect")
                    || l.contains("vote")
                    || l.contains("leader")
                    || l.contains("campaign")
            })
            .collect();
        let tail = &lines[lines.len().saturating_sub(6)..];
        let _ = write!(p, "\n      {m}:\n        {}", tail.join("\n        "));
    }
    p
}

/// Stops the workload and the load, runs the final reads and the checker; reports.
async fn finish(
    env: &Env<'_>,
    s: &mut Scenario,
    began: Instant,
    wl: Workload,
    load: Load,
    no_leader: Option<(Instant, Instant)>,
) -> kv::Counts {
    let (rec, counts, prefix, keys) = wl.stop().await;
    kv::final_reads(&env.members, &rec, &prefix, keys, Duration::from_secs(30)).await;
    let samples = load.stop().await;
    let verdict = blocking(|| kv::check(rec));
    s.line(format!(
        "kv        {} ops, {} failed or unknown, {} acknowledged writes; leases: {} cycles, {} failed, {} violations",
        counts.ops, counts.failed, counts.acked_writes, counts.lease_cycles, counts.lease_failed, counts.lease_violations
    ));
    if let Some((from, pause)) = counts.longest_write_pause() {
        s.line(format!(
            "writes    stopped for at most {} (the longest stretch without an acknowledged write, from +{})",
            secs(pause),
            secs(from.saturating_duration_since(began))
        ));
    }
    if !counts.errors.is_empty() {
        s.line(format!("errors    {}", counts.errors.join(" | ")));
    }
    let failed: Vec<&gateway::Sample> = samples.iter().filter(|x| !x.ok()).collect();
    s.line(format!(
        "http      {} requests through the gateway, {} failed",
        samples.len(),
        failed.len()
    ));
    s.line(format!("checker   {}", verdict.summary()));
    s.expect(
        counts.ops > 100,
        format!("the workload ran ({} ops)", counts.ops),
    );
    s.expect(
        counts.acked_writes > 20,
        format!("writes were acknowledged ({})", counts.acked_writes),
    );
    s.expect(
        verdict.lost_writes() == 0,
        format!("{} acknowledged writes lost", verdict.lost_writes()),
    );
    if !verdict.replay.is_ok() {
        s.problems
            .push(format!("history check:\n{}", verdict.replay));
    }
    if !verdict.linearizability.is_ok() {
        s.problems.push(format!(
            "not linearizable: {:?}; inconclusive keys: {}",
            verdict
                .linearizability
                .violations
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>(),
            verdict.linearizability.inconclusive.len()
        ));
    }
    s.expect(
        counts.lease_violations == 0,
        format!(
            "{} keys outlived their revoked lease",
            counts.lease_violations
        ),
    );
    s.expect(counts.lease_cycles > 0, "lease cycles completed".into());
    s.expect(
        samples.len() > 100,
        format!("gateway traffic ran ({} requests)", samples.len()),
    );
    if !failed.is_empty() {
        let gw = blocking(|| env.project.logs("lb-gateway", 400));
        let lines: Vec<&str> = gw
            .lines()
            .filter(|l| !l.contains("lb_gateway::access"))
            .collect();
        s.line(format!(
            "gateway log (last lines other than access):\n        {}",
            lines[lines.len().saturating_sub(8)..].join("\n        ")
        ));
        for r in ["registry-svc-1", "registry-svc", "demo-1"] {
            let log = blocking(|| env.project.logs(r, 300));
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("again"))
                .collect();
            s.line(format!(
                "{r} log (last warnings):\n        {}",
                lines[lines.len().saturating_sub(5)..].join("\n        ")
            ));
        }
    }
    s.expect(
        failed.is_empty(),
        format!(
            "the gateway answered every request while the coordinator had faults ({} failed, the first {} after the scenario began: key {:?}, status {:?}, {:?})",
            failed.len(),
            failed.first().map(|f| secs(f.sent.saturating_duration_since(began))).unwrap_or_default(),
            failed.first().map(|f| f.key),
            failed.first().map(|f| f.status),
            failed.first().and_then(|f| f.detail.clone())
        ),
    );
    if let Some((from, to)) = no_leader {
        let n = gateway::count(&samples, from, to);
        let bad = gateway::failures(&samples, from, to).len();
        s.line(format!(
            "no leader {} : the gateway answered {}/{} requests from its last known set",
            secs(to - from),
            n - bad,
            n
        ));
        s.expect(n > 0, "requests were sent while there was no leader".into());
    }
    counts
}

async fn leader_partition(env: &Env<'_>) -> Scenario {
    let mut s = Scenario::new("leader partition: docker network disconnect for 10 s");
    let Some((old, old_term)) = leader(env, &mut s).await else {
        return s;
    };
    let wl = Workload::start(&env.members, "/faults/partition/");
    let load = Load::start(env.gateway);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = Instant::now();
    blocking(|| env.project.disconnect(MEMBERS[old]));
    // Timed from the CLI's return: the member is cut off by then.
    let t0 = Instant::now();
    s.fault(
        t0,
        t,
        format!(
            "docker network disconnect {} (the leader; the CLI took {})",
            MEMBERS[old],
            secs(t0 - c0)
        ),
    );
    match env
        .members
        .wait_new_leader(old, old_term, t0, Duration::from_secs(10))
        .await
    {
        Some((new, took)) => {
            s.line(format!(
                "recovery  new leader {} after {}",
                MEMBERS[new],
                secs(took)
            ));
            if took > ELECTION_BOUND {
                let problem = election_problem(env, old, took);
                s.problems.push(problem);
            }
        }
        None => s.problems.push("no new leader within 10 s".into()),
    }
    tokio::time::sleep((t0 + Duration::from_secs(10)).saturating_duration_since(Instant::now()))
        .await;
    let t1 = Instant::now();
    blocking(|| env.project.connect(MEMBERS[old]));
    s.fault(t1, t, format!("docker network connect {}", MEMBERS[old]));
    match rejoined(env, old, t1, Duration::from_secs(30)).await {
        Some(d) => s.line(format!(
            "recovery  {} follows the leader {} after reconnecting",
            MEMBERS[old],
            secs(d)
        )),
        None => s.problems.push(format!(
            "{} did not rejoin within 30 s; its log:\n{}",
            MEMBERS[old],
            blocking(|| env.project.logs(MEMBERS[old], 15))
        )),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = finish(env, &mut s, t, wl, load, None).await;
    s
}

async fn leader_kill(env: &Env<'_>) -> Scenario {
    let mut s = Scenario::new("leader kill: docker kill (SIGKILL), then docker start");
    let Some((old, old_term)) = leader(env, &mut s).await else {
        return s;
    };
    let wl = Workload::start(&env.members, "/faults/kill/");
    let load = Load::start(env.gateway);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = Instant::now();
    blocking(|| env.project.kill(&[MEMBERS[old]]));
    // Timed from the moment the process died, as Docker recorded it.
    let returned = Instant::now();
    let t0 = blocking(|| env.project.died_ago(MEMBERS[old]))
        .and_then(|ago| returned.checked_sub(ago))
        .filter(|&died| died >= c0)
        .unwrap_or(returned);
    s.fault(
        t0,
        t,
        format!(
            "docker kill {} (the leader; died {} after the CLI started)",
            MEMBERS[old],
            secs(t0 - c0)
        ),
    );
    match env
        .members
        .wait_new_leader(old, old_term, t0, Duration::from_secs(10))
        .await
    {
        Some((new, took)) => {
            s.line(format!(
                "recovery  new leader {} after {}",
                MEMBERS[new],
                secs(took)
            ));
            if took > ELECTION_BOUND {
                let problem = election_problem(env, old, took);
                s.problems.push(problem);
            }
        }
        None => s.problems.push("no new leader within 10 s".into()),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t1 = Instant::now();
    blocking(|| env.project.start(&[MEMBERS[old]]));
    s.fault(t1, t, format!("docker start {}", MEMBERS[old]));
    match rejoined(env, old, t1, Duration::from_secs(30)).await {
        Some(d) => s.line(format!(
            "recovery  {} restarted and follows the leader after {}",
            MEMBERS[old],
            secs(d)
        )),
        None => s.problems.push(format!(
            "{} did not rejoin within 30 s; its log:\n{}",
            MEMBERS[old],
            blocking(|| env.project.logs(MEMBERS[old], 15))
        )),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = finish(env, &mut s, t, wl, load, None).await;
    s
}

async fn whole_cluster_kill(env: &Env<'_>) -> Scenario {
    let mut s =
        Scenario::new("whole-cluster kill: docker kill of all three members at once, then start");
    if leader(env, &mut s).await.is_none() {
        return s;
    }
    let wl = Workload::start(&env.members, "/faults/all/");
    let load = Load::start(env.gateway);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    blocking(|| env.project.kill(&MEMBERS));
    s.fault(
        t0,
        t,
        "docker kill coordinator-1 coordinator-2 coordinator-3".into(),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t1 = Instant::now();
    blocking(|| env.project.start(&MEMBERS));
    s.fault(
        t1,
        t,
        "docker start coordinator-1 coordinator-2 coordinator-3".into(),
    );
    for i in 0..MEMBERS.len() {
        blocking(|| env.members.refresh(env.project, i));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answering =
            futures::future::join_all((0..MEMBERS.len()).map(|i| env.members.status(i))).await;
        if answering.iter().any(Option::is_some) || Instant::now() > deadline {
            s.line(format!(
                "recovery  {} of 3 members answer Status {} after the start",
                answering.iter().filter(|a| a.is_some()).count(),
                secs(t1.elapsed())
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut back = Instant::now();
    match env
        .members
        .wait_leader(None, t1, Duration::from_secs(30))
        .await
    {
        Some((l, took)) => {
            back = Instant::now();
            s.line(format!(
                "recovery  leader {} elected {} after the start",
                MEMBERS[l],
                secs(took)
            ));
            // The figure above includes this test's own Docker CLI calls after `docker start`
            // (finding the new host ports: about 2 s each on a loaded machine). Docker's own
            // clock says how long the cluster took: from the first member's start to the first
            // "became leader" line after it.
            let system = blocking(|| {
                let started = MEMBERS
                    .iter()
                    .map(|m| env.project.started_at(m))
                    .collect::<Option<Vec<f64>>>()?;
                let first_start = started.iter().copied().fold(f64::MAX, f64::min);
                MEMBERS
                    .iter()
                    .flat_map(|m| env.project.log_times(m, "became leader"))
                    .filter(|t| *t >= first_start)
                    .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.min(t))))
                    .map(|leader| Duration::from_secs_f64(leader - first_start))
            });
            let measured = match system {
                Some(d) => {
                    s.line(format!(
                        "recovery  by Docker's clock: first \"became leader\" {} after the first member started",
                        secs(d)
                    ));
                    d
                }
                None => took,
            };
            if measured > RESTART_BOUND {
                let mut p = format!(
                    "a leader {} after the start (bound {})",
                    secs(measured),
                    secs(RESTART_BOUND)
                );
                for m in MEMBERS {
                    let log = blocking(|| env.project.logs(m, 300));
                    let lines: Vec<&str> = log
                        .lines()
                        .filter(|l| {
                            l.contains("coordinator ready")
                                || l.contains("became leader")
                                || l.contains("startup done")
                                || l.contains("campaign")
                        })
                        .collect();
                    let _ = write!(
                        p,
                        "\n      {m}:\n        {}",
                        lines[lines.len().saturating_sub(4)..].join("\n        ")
                    );
                }
                s.problems.push(p);
            }
        }
        None => s
            .problems
            .push("no leader within 30 s of starting the members".into()),
    }
    // Writable: an unrecorded put (its own key) succeeds through some member.
    let deadline = Instant::now() + Duration::from_secs(30);
    let writable = loop {
        let mut ok = false;
        for i in 0..MEMBERS.len() {
            let mut kv = env.members.kv(i);
            let put = proto::etcdserverpb::PutRequest {
                key: b"/faults/all-probe".to_vec(),
                value: b"1".to_vec(),
                ..Default::default()
            };
            if tokio::time::timeout(Duration::from_secs(2), kv.put(put))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                ok = true;
                break;
            }
        }
        if ok {
            break Some(t1.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match writable {
        Some(d) => s.line(format!("recovery  writable {} after the start", secs(d))),
        None => s
            .problems
            .push("not writable within 30 s of the start".into()),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = finish(env, &mut s, t, wl, load, Some((t0, back))).await;
    s
}

async fn leader_pause(env: &Env<'_>) -> Scenario {
    let mut s = Scenario::new("leader pause: docker pause for 5 s");
    let Some((old, old_term)) = leader(env, &mut s).await else {
        return s;
    };
    let wl = Workload::start(&env.members, "/faults/pause/");
    let load = Load::start(env.gateway);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = Instant::now();
    blocking(|| env.project.pause(MEMBERS[old]));
    // Timed from the CLI's return: the member is frozen by then.
    let t0 = Instant::now();
    s.fault(
        t0,
        t,
        format!(
            "docker pause {} (the leader; the CLI took {})",
            MEMBERS[old],
            secs(t0 - c0)
        ),
    );
    let elected = env
        .members
        .wait_new_leader(old, old_term, t0, Duration::from_secs(5))
        .await;
    tokio::time::sleep((t0 + Duration::from_secs(5)).saturating_duration_since(Instant::now()))
        .await;
    let t1 = Instant::now();
    blocking(|| env.project.unpause(MEMBERS[old]));
    s.fault(t1, t, format!("docker unpause {}", MEMBERS[old]));
    match elected {
        Some((new, took)) => {
            s.line(format!(
                "recovery  new leader {} after {}",
                MEMBERS[new],
                secs(took)
            ));
            if took > ELECTION_BOUND {
                let problem = election_problem(env, old, took);
                s.problems.push(problem);
            }
        }
        None => s
            .problems
            .push("no new leader while the old one was paused (5 s)".into()),
    }
    match rejoined(env, old, t1, Duration::from_secs(30)).await {
        Some(d) => s.line(format!(
            "recovery  {} resumed and follows the leader after {}",
            MEMBERS[old],
            secs(d)
        )),
        None => s.problems.push(format!(
            "{} did not rejoin within 30 s; its log:\n{}",
            MEMBERS[old],
            blocking(|| env.project.logs(MEMBERS[old], 15))
        )),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = finish(env, &mut s, t, wl, load, None).await;
    s
}

async fn instance_kill(env: &Env<'_>) -> Scenario {
    let mut s = Scenario::new("instance kill: docker kill of one demo instance under gateway load");
    let load = Load::start(env.gateway);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The victim: the instance that owns the most keys now.
    let owners = gateway::owners(&load.samples(), t, Instant::now());
    let mut per_instance: std::collections::BTreeMap<String, usize> = Default::default();
    for set in owners.values() {
        for i in set {
            *per_instance.entry(i.clone()).or_default() += 1;
        }
    }
    let Some(victim) = per_instance
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(i, _)| i.clone())
    else {
        s.problems
            .push("no instance answered before the fault".into());
        let _ = load.stop().await;
        return s;
    };
    let victim_keys: Vec<u32> = owners
        .iter()
        .filter(|(_, set)| set.contains(&victim))
        .map(|(k, _)| *k)
        .collect();
    let victim_ip = blocking(|| env.project.ip(&victim));
    let before_kill = gateway::tries_at(env.gateway_admin, &victim_ip).await;
    let t0 = Instant::now();
    blocking(|| env.project.kill(&[victim.as_str()]));
    s.fault(
        t0,
        t,
        format!(
            "docker kill {victim} (owner of {} of {} keys)",
            victim_keys.len(),
            gateway::KEYS
        ),
    );
    tokio::time::sleep(EJECTION_WINDOW).await;
    let at_window = gateway::tries_at(env.gateway_admin, &victim_ip).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let at_end = gateway::tries_at(env.gateway_admin, &victim_ip).await;
    let t_end = Instant::now();
    // The instance comes back: traffic returns to it.
    blocking(|| env.project.start(&[victim.as_str()]));
    let t_back = Instant::now();
    s.fault(t_back, t, format!("docker start {victim}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut returned = None;
    while Instant::now() < deadline {
        if load
            .samples()
            .iter()
            .any(|x| x.sent >= t_back && x.instance.as_deref() == Some(victim.as_str()))
        {
            returned = Some(t_back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let samples = load.stop().await;

    let window = t0 + EJECTION_WINDOW;
    let in_window = gateway::failures(&samples, t0, window).len();
    let after = gateway::failures(&samples, window, t_end);
    let last_failure = gateway::failures(&samples, t0, t_end)
        .iter()
        .map(|x| x.sent)
        .max();
    let reached_after_window = samples
        .iter()
        .filter(|x| {
            x.sent >= window && x.sent < t_back && x.instance.as_deref() == Some(victim.as_str())
        })
        .count();
    let moved = gateway::owners(&samples, window, t_end);
    let unanswered: Vec<u32> = (0..gateway::KEYS)
        .filter(|k| !moved.contains_key(k))
        .collect();
    s.line(format!(
        "http      {} requests; {} failed within the {} ejection window, {} after it (until {})",
        samples.len(),
        in_window,
        secs(EJECTION_WINDOW),
        after.len(),
        secs(t_end - t0)
    ));
    if let Some(last) = last_failure {
        s.line(format!(
            "recovery  last failed request {} after the kill",
            secs(last.saturating_duration_since(t0))
        ));
    } else {
        s.line("recovery  no request failed".to_string());
    }
    s.line(format!(
        "gateway   tries at {victim} ({victim_ip}): {:?} before the kill, {:?} at the end of the window, {:?} {} later",
        before_kill,
        at_window,
        at_end,
        secs(t_end - window)
    ));
    match returned {
        Some(d) => s.line(format!(
            "recovery  {victim} restarted and answers again after {}",
            secs(d)
        )),
        None => s.problems.push(format!(
            "{victim} did not answer again within 30 s of its start"
        )),
    }
    s.expect(
        after.is_empty(),
        format!(
            "{} requests failed after the ejection window (first key {:?})",
            after.len(),
            after.first().map(|x| x.key)
        ),
    );
    s.expect(
        reached_after_window == 0,
        format!("{reached_after_window} answers from the killed instance after the window"),
    );
    s.expect(
        match (at_window, at_end) {
            (Some(a), Some(b)) => b <= a,
            _ => false,
        },
        format!(
            "the gateway tried the killed instance after the window ({at_window:?} -> {at_end:?})"
        ),
    );
    s.expect(
        unanswered.is_empty(),
        format!("keys without an answer after the window: {unanswered:?}"),
    );
    s.expect(
        !victim_keys.is_empty(),
        "the victim owned keys before the kill".into(),
    );
    s
}
