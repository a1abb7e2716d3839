//! Scaling across containers: the stateless services scaled out and in under load, a
//! coordinator member added and removed online, and a rolling restart of every member.
//!
//! | scenario | change | pass |
//! |---|---|---|
//! | scale out and in | `compose up --scale` of registry-svc, config-svc and lb-gateway to 3, then back to 1 | every request answered after the client's retries (each request tries each replica it knows at most once); every new replica answered requests; after the scale-in the gateway still reaches all three demo instances and the registry lists them |
//! | member add and remove | `MemberAdd` of coordinator-4 through the leader, `compose up coordinator-4` (`--initial-cluster-state existing`, `compose/coordinator-4.yml`), then `MemberRemove` | coordinator-4 serves the latest writes and lists 4 members; after the removal it stops and the others list 3; the recorded history linearizable with 0 lost acknowledged writes; the gateway answers throughout |
//! | rolling restart | `docker restart` of each member in turn (followers first, the leader last), each back and following the leader before the next | < 1 % of the workload's operations failed, 0 lost acknowledged writes, linearizable; the gateway answers throughout |
//!
//! The host's clients reach every replica of a scaled service by its ephemeral published port
//! (the list read from Docker every [`REFRESH`]), as a client outside the network would through
//! a DNS name with one address per replica. Inside the network the services' own clients use
//! the names `registry-svc` and `config-svc`, which Docker's DNS answers with every replica.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::config_v1 as cfg;
use proto::etcdserverpb::cluster_client::ClusterClient;
use proto::etcdserverpb::{
    MemberAddRequest, MemberListRequest, MemberRemoveRequest, PutRequest, RangeRequest,
};
use proto::registry_v1 as reg;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::docker::{self, Project};
use crate::gateway::{self, Load};
use crate::kv::{MEMBERS, Members, Workload};
use crate::{Env, Scenario, blocking, finish, leader, rejoined, secs};

/// Bound on the whole run (the stack's start included).
const RUN_BOUND: Duration = Duration::from_secs(7 * 60);
/// How often the host's clients read the replicas' published ports from Docker again.
const REFRESH: Duration = Duration::from_secs(2);
/// Bound on one try of one request.
const TRY_TIMEOUT: Duration = Duration::from_secs(2);
/// The services scaled, the port the host's load uses, and the replica on fixed ports that
/// serves beside the pool.
const SCALED: [(&str, u16, Option<&str>); 3] = [
    ("lb-gateway", 8080, None),
    ("registry-svc", 9200, Some("registry-svc-1")),
    ("config-svc", 9300, Some("config-svc-1")),
];
/// Replicas of each scaled service at the peak.
const PEAK: usize = 3;
/// Pause between one load client's requests.
const PACE: Duration = Duration::from_millis(20);
/// Bound on one load client's requests.
const MAX_PER_CLIENT: u32 = 4_000;
/// The joining member's peer URL, as `compose/coordinator-4.yml` advertises it.
const FOURTH_PEER_URL: &str = "http://coordinator-4:2380";
const FOURTH: &str = "coordinator-4";

#[test]
fn compose_stack_scales_stateless_services_and_changes_coordinator_members_online() {
    let Some(_one) = crate::docker_tests("scaling tests") else {
        return;
    };
    let started = Instant::now();
    let project = Project::with_overlays("scaling", &["coordinator-4.yml"]);
    let runtime = crate::runtime();
    let outcome =
        runtime.block_on(async { tokio::time::timeout(RUN_BOUND, run_all(&project)).await });
    runtime.shutdown_timeout(Duration::from_secs(5));
    let (header, scenarios) =
        outcome.unwrap_or_else(|_| panic!("the scaling tests did not finish within {RUN_BOUND:?}"));
    crate::conclude(
        project,
        "scaling across containers",
        &header,
        &scenarios,
        started,
        "scaling-report.txt",
    );
}

async fn run_all(project: &Project) -> (String, Vec<Scenario>) {
    let mut setup = Scenario::new("stack up");
    let up = blocking(|| project.up(Duration::from_secs(120)));
    setup.line(format!("healthy {} after `compose up`", secs(up)));
    let gateway = blocking(|| project.port("lb-gateway", 8080));
    let gateway_admin = blocking(|| project.port("lb-gateway", 9103));
    let members = Arc::new(Members::connect(project).await);
    let env = Env {
        project,
        members,
        gateway,
        gateway_admin,
    };
    let scenarios = vec![
        setup,
        scale_out_and_in(&env).await,
        member_add_and_remove(&env).await,
        rolling_restart(&env).await,
    ];
    ("one stack".into(), scenarios)
}

// ---------------------------------------------------------------------------------------------
// Scale out and in
// ---------------------------------------------------------------------------------------------

/// The replicas of one service as the host reaches them: (container id, address).
type Replicas = Arc<Mutex<Vec<(String, SocketAddr)>>>;

/// Reads every healthy replica of `service` (and of `fixed`, the replica on fixed ports) in
/// compose project `project` from Docker.
fn replicas(
    project: &str,
    service: &str,
    fixed: Option<&str>,
    port: u16,
) -> Vec<(String, SocketAddr)> {
    let mut ids = docker::service_containers(project, service);
    if let Some(f) = fixed {
        ids.extend(docker::service_containers(project, f));
    }
    ids.into_iter()
        .filter(|id| docker::container_health(id) == "healthy")
        .filter_map(|id| docker::published(&id, port).map(|a| (id, a)))
        .collect()
}

/// What one load client saw: requests, how many needed more than one try, how many failed
/// after every try, which replica answered how often, and the first failures.
#[derive(Default, Debug)]
struct Tally {
    requests: u64,
    retried: u64,
    failed: u64,
    by_replica: BTreeMap<String, u64>,
    errors: Vec<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.requests += o.requests;
        self.retried += o.retried;
        self.failed += o.failed;
        for (k, v) in o.by_replica {
            *self.by_replica.entry(k).or_default() += v;
        }
        for e in o.errors {
            if self.errors.len() < 4 && !self.errors.contains(&e) {
                self.errors.push(e);
            }
        }
    }
}

/// One request of a load kind, tried on one replica: `Ok(())` or a retryable error (`Err(Ok)`)
/// or one that no retry would cure (`Err(Err)`).
type Try = Result<(), Result<String, String>>;

/// Whether a gRPC error may pass on another replica (the replica went away or was busy). A
/// connection reset while a replica stops reaches tonic as `Internal: h2 protocol error`: a
/// transport failure, not the service's answer.
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    ) || (status.code() == tonic::Code::Internal
        && status.message().starts_with("h2 protocol error"))
}

fn grpc_try<T>(r: Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>) -> Try {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) if retryable(&s) => Err(Ok(format!("{:?}: {}", s.code(), s.message()))),
        Ok(Err(s)) => Err(Err(format!("{:?}: {}", s.code(), s.message()))),
        Err(_) => Err(Ok(format!("no answer within {TRY_TIMEOUT:?}"))),
    }
}

/// Channels to the replicas, one per address, kept across requests.
#[derive(Default)]
struct Channels(BTreeMap<SocketAddr, Channel>);

impl Channels {
    fn get(&mut self, addr: SocketAddr) -> Channel {
        self.0
            .entry(addr)
            .or_insert_with(|| {
                Endpoint::from_shared(format!("http://{addr}"))
                    .expect("a valid endpoint")
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .connect_lazy()
            })
            .clone()
    }
}

/// The load on the scaled services: HTTP through every gateway replica, heartbeats and
/// discovery on every registry replica, reads on every config replica.
struct ScaleLoad {
    stop: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<Tally>)>,
    refresher: JoinHandle<()>,
}

impl ScaleLoad {
    async fn start(project: &Project, lists: [Replicas; 3]) -> ScaleLoad {
        let stop = CancellationToken::new();
        let [gateways, registries, configs] = lists;
        // The config item the readers read, and the instance each registry client keeps alive.
        let mut tasks: Vec<(&'static str, JoinHandle<Tally>)> = Vec::new();
        for c in 0..3u32 {
            let (list, stop) = (gateways.clone(), stop.clone());
            tasks.push((
                "http through lb-gateway",
                tokio::spawn(http_client(c, list, stop)),
            ));
        }
        for c in 0..2u32 {
            let (list, stop) = (registries.clone(), stop.clone());
            tasks.push((
                "registry heartbeat + discover",
                tokio::spawn(registry_client(c, list, stop)),
            ));
        }
        for c in 0..2u32 {
            let (list, stop) = (configs.clone(), stop.clone());
            tasks.push(("config get", tokio::spawn(config_client(c, list, stop))));
        }
        let refresher = {
            let stop = stop.clone();
            let name = project.name.clone();
            let lists = [gateways, registries, configs];
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    // Docker CLI calls block: read on a blocking thread, then swap the lists.
                    let name = name.clone();
                    let fresh = tokio::task::spawn_blocking(move || {
                        SCALED.map(|(service, port, fixed)| replicas(&name, service, fixed, port))
                    })
                    .await;
                    if let Ok(fresh) = fresh {
                        for (list, now) in lists.iter().zip(fresh) {
                            if !now.is_empty() {
                                *list.lock().expect("replicas") = now;
                            }
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(REFRESH) => {}
                    }
                }
            })
        };
        ScaleLoad {
            stop,
            tasks,
            refresher,
        }
    }

    async fn stop(self) -> BTreeMap<&'static str, Tally> {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.refresher).await;
        let mut out: BTreeMap<&'static str, Tally> = BTreeMap::new();
        for (kind, t) in self.tasks {
            let tally = tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("a load client stops within 20 s")
                .expect("a load client task");
            out.entry(kind).or_default().merge(tally);
        }
        out
    }
}

/// Runs one request with up to one try per known replica (at least 3), starting at a
/// different replica each time; counts it.
async fn with_retries<F, Fut>(list: &Replicas, n: u64, tally: &mut Tally, mut attempt: F)
where
    F: FnMut(String, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Try>,
{
    tally.requests += 1;
    let targets = list.lock().expect("replicas").clone();
    if targets.is_empty() {
        tally.failed += 1;
        return;
    }
    let tries = targets.len().max(3);
    let mut last = String::new();
    for t in 0..tries {
        let (id, addr) = targets[(n as usize + t) % targets.len()].clone();
        match attempt(id.clone(), addr).await {
            Ok(()) => {
                if t > 0 {
                    tally.retried += 1;
                }
                *tally.by_replica.entry(id).or_default() += 1;
                return;
            }
            Err(Ok(e)) => last = e,
            Err(Err(e)) => {
                last = e;
                break;
            }
        }
    }
    tally.failed += 1;
    if tally.errors.len() < 4 && !tally.errors.contains(&last) {
        tally.errors.push(last);
    }
}

async fn http_client(c: u32, list: Replicas, stop: CancellationToken) -> Tally {
    let mut tally = Tally::default();
    for n in 0..MAX_PER_CLIENT {
        if stop.is_cancelled() {
            break;
        }
        let path = format!("/load/{}", (n * 3 + c) % gateway::KEYS);
        with_retries(&list, u64::from(n + c), &mut tally, |_, addr| {
            let path = path.clone();
            async move {
                let (status, instance, body) = gateway::get(addr, &path).await;
                match (status, instance) {
                    (200, Some(_)) => Ok(()),
                    (0, _) => Err(Ok(body)),
                    // The gateway answers 502/503 when it cannot reach an instance: another
                    // gateway replica may.
                    (500..=599, _) => Err(Ok(format!("{status}: {body}"))),
                    _ => Err(Err(format!("{status}: {body}"))),
                }
            }
        })
        .await;
        tokio::time::sleep(PACE).await;
    }
    tally
}

async fn registry_client(c: u32, list: Replicas, stop: CancellationToken) -> Tally {
    let mut tally = Tally::default();
    let mut channels = Channels::default();
    let me = reg::InstanceRef {
        namespace: "scaling".into(),
        service: "load".into(),
        instance_id: format!("load-{c}"),
    };
    // Registered first (counted like any request), then kept alive and discovered.
    let instance = reg::Instance {
        namespace: me.namespace.clone(),
        service: me.service.clone(),
        instance_id: me.instance_id.clone(),
        address: "127.0.0.1".into(),
        port: 9000 + c,
        ttl_seconds: 30,
        ..Default::default()
    };
    for n in 0..MAX_PER_CLIENT {
        if stop.is_cancelled() {
            break;
        }
        let step = n % 3;
        with_retries(&list, u64::from(n + c), &mut tally, |_, addr| {
            let mut g = reg::registry_client::RegistryClient::new(channels.get(addr));
            let (me, instance) = (me.clone(), instance.clone());
            async move {
                match step {
                    0 if n == 0 => grpc_try(
                        tokio::time::timeout(
                            TRY_TIMEOUT,
                            g.register(reg::RegisterRequest {
                                instance: Some(instance),
                            }),
                        )
                        .await,
                    ),
                    0 | 1 => grpc_try(
                        tokio::time::timeout(
                            TRY_TIMEOUT,
                            g.heartbeat(reg::HeartbeatRequest { instance: Some(me) }),
                        )
                        .await,
                    ),
                    _ => {
                        let r = tokio::time::timeout(
                            TRY_TIMEOUT,
                            g.discover(reg::DiscoverRequest {
                                namespace: me.namespace.clone(),
                                service: me.service.clone(),
                                ..Default::default()
                            }),
                        )
                        .await;
                        match r {
                            Ok(Ok(resp)) => {
                                let found = resp
                                    .into_inner()
                                    .instances
                                    .iter()
                                    .any(|i| i.instance_id == me.instance_id);
                                if found {
                                    Ok(())
                                } else {
                                    Err(Err(format!("{} not discovered", me.instance_id)))
                                }
                            }
                            other => grpc_try(other),
                        }
                    }
                }
            }
        })
        .await;
        tokio::time::sleep(PACE).await;
    }
    tally
}

async fn config_client(c: u32, list: Replicas, stop: CancellationToken) -> Tally {
    let mut tally = Tally::default();
    let mut channels = Channels::default();
    let item = cfg::ItemRef {
        namespace: "scaling".into(),
        group: "load".into(),
        key: format!("settings-{c}.json"),
    };
    for n in 0..MAX_PER_CLIENT {
        if stop.is_cancelled() {
            break;
        }
        with_retries(&list, u64::from(n + c), &mut tally, |_, addr| {
            let mut g = cfg::config_client::ConfigClient::new(channels.get(addr));
            let item = item.clone();
            async move {
                if n == 0 {
                    // Published once (compare-and-set on "no version yet", so a retry after an
                    // unknown outcome does not publish twice).
                    let r = tokio::time::timeout(
                        TRY_TIMEOUT,
                        g.publish(cfg::PublishRequest {
                            item: Some(item),
                            format: cfg::Format::Json as i32,
                            content: format!("{{\"client\":{c}}}"),
                            expected_version: Some(0),
                            ..Default::default()
                        }),
                    )
                    .await;
                    return match r {
                        // Aborted: a version exists, published by an earlier try.
                        Ok(Err(s)) if s.code() == tonic::Code::Aborted => Ok(()),
                        other => grpc_try(other),
                    };
                }
                let r = tokio::time::timeout(
                    TRY_TIMEOUT,
                    g.get(cfg::GetRequest {
                        item: Some(item),
                        ..Default::default()
                    }),
                )
                .await;
                match r {
                    Ok(Ok(resp)) => match resp.into_inner().version {
                        Some(v) if v.content.contains("client") => Ok(()),
                        other => Err(Err(format!("unexpected version {other:?}"))),
                    },
                    other => grpc_try(other),
                }
            }
        })
        .await;
        tokio::time::sleep(PACE).await;
    }
    tally
}

/// Waits until every container of `services` is healthy; how long it took, or the unhealthy.
async fn all_healthy(
    project: &Project,
    services: &[&str],
    timeout: Duration,
) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let bad: Vec<String> = blocking(|| {
            services
                .iter()
                .filter(|s| project.health(s) != "healthy")
                .map(|s| s.to_string())
                .collect()
        });
        if bad.is_empty() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            return Err(format!("not healthy after {}: {bad:?}", secs(timeout)));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn scale_out_and_in(env: &Env<'_>) -> Scenario {
    let mut s = Scenario::new(
        "scale out and in: registry-svc, config-svc, lb-gateway to 3 replicas and back to 1 under load",
    );
    let p = env.project;
    let lists: [Replicas; 3] = blocking(|| {
        SCALED.map(|(service, port, fixed)| {
            Arc::new(Mutex::new(replicas(&p.name, service, fixed, port)))
        })
    });
    let before: BTreeSet<String> = lists
        .iter()
        .flat_map(|l| {
            l.lock()
                .expect("replicas")
                .iter()
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let load = ScaleLoad::start(p, lists).await;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let t0 = Instant::now();
    let up: Vec<(&str, usize)> = SCALED.iter().map(|(svc, _, _)| (*svc, PEAK)).collect();
    blocking(|| p.scale(&up));
    s.fault(t0, t, format!("compose up --scale {}", flags(&up)));
    let services: Vec<&str> = SCALED.iter().map(|(svc, _, _)| *svc).collect();
    match all_healthy(p, &services, Duration::from_secs(60)).await {
        Ok(d) => s.line(format!(
            "scale-out every new replica healthy {} after the scale command returned",
            secs(d)
        )),
        Err(e) => s.problems.push(e),
    }
    let new: BTreeSet<String> = blocking(|| {
        services
            .iter()
            .flat_map(|svc| p.containers(svc))
            .filter(|id| !before.contains(id))
            .collect()
    });
    s.line(format!("scale-out {} new containers", new.len()));
    s.expect(
        new.len() == SCALED.len() * (PEAK - 1),
        format!(
            "{} new containers, expected {}",
            new.len(),
            SCALED.len() * (PEAK - 1)
        ),
    );
    // Long enough for the clients to learn the new replicas and spread over them.
    tokio::time::sleep(Duration::from_secs(8)).await;

    let t1 = Instant::now();
    let down: Vec<(&str, usize)> = SCALED.iter().map(|(svc, _, _)| (*svc, 1)).collect();
    blocking(|| p.scale(&down));
    s.fault(t1, t, format!("compose up --scale {}", flags(&down)));
    let left: usize = blocking(|| services.iter().map(|svc| p.containers(svc).len()).sum());
    s.expect(
        left == SCALED.len(),
        format!(
            "{left} containers left after the scale-in, expected {}",
            SCALED.len()
        ),
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let tallies = load.stop().await;

    for (kind, tally) in &tallies {
        let served_new: u64 = tally
            .by_replica
            .iter()
            .filter(|(id, _)| new.contains(*id))
            .map(|(_, n)| n)
            .sum();
        s.line(format!(
            "{kind}: {} requests, {} answered after a retry on another replica, {} failed after every retry; {} answered by replicas added by the scale-out",
            tally.requests, tally.retried, tally.failed, served_new
        ));
        if !tally.errors.is_empty() {
            s.line(format!("  errors: {}", tally.errors.join(" | ")));
        }
        s.expect(
            tally.requests > 100,
            format!("{kind}: the load ran ({} requests)", tally.requests),
        );
        s.expect(
            tally.failed == 0,
            format!("{kind}: {} requests failed after every retry", tally.failed),
        );
        s.expect(served_new > 0, format!("{kind}: no new replica answered"));
    }
    // Every new replica answered requests.
    let idle: Vec<&String> = new
        .iter()
        .filter(|id| !tallies.values().any(|t| t.by_replica.contains_key(*id)))
        .collect();
    s.expect(
        idle.is_empty(),
        format!("new replicas that answered no request: {idle:?}"),
    );

    // Inside the network: the gateway still reaches every demo instance (its registry watch and
    // the demo instances' heartbeats moved off the removed replicas).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = BTreeSet::new();
    while seen.len() < 3 && Instant::now() < deadline {
        for key in 0..gateway::KEYS {
            if let (200, Some(i), _) = gateway::get(env.gateway, &format!("/load/{key}")).await {
                seen.insert(i);
            }
        }
    }
    s.line(format!(
        "after     the gateway reaches demo instances {seen:?} {} after the scale-in",
        secs(t1.elapsed())
    ));
    s.expect(
        seen.len() == 3,
        format!("the gateway reaches 3 demo instances after the scale-in (saw {seen:?})"),
    );
    s
}

fn flags(to: &[(&str, usize)]) -> String {
    to.iter()
        .map(|(svc, n)| format!("{svc}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Coordinator members
// ---------------------------------------------------------------------------------------------

fn cluster(addr: SocketAddr) -> ClusterClient<Channel> {
    ClusterClient::new(
        Endpoint::from_shared(format!("http://{addr}"))
            .expect("a valid endpoint")
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy(),
    )
}

async fn member_add_and_remove(env: &Env<'_>) -> Scenario {
    let mut s = Scenario::new("member add and remove: coordinator-4 joins online, then leaves");
    let Some((l, _)) = leader(env, &mut s).await else {
        return s;
    };
    let p = env.project;
    let wl = Workload::start(&env.members, "/scaling/members/");
    let load = Load::start(env.gateway);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. MemberAdd through the leader, as `etcdctl member add` does.
    let leader_addr = blocking(|| p.port(MEMBERS[l], 2379));
    let t0 = Instant::now();
    let added = tokio::time::timeout(
        Duration::from_secs(10),
        cluster(leader_addr).member_add(MemberAddRequest {
            peer_ur_ls: vec![FOURTH_PEER_URL.into()],
            is_learner: false,
        }),
    )
    .await;
    let id = match added {
        Ok(Ok(r)) => r.into_inner().member.map(|m| m.id).unwrap_or(0),
        other => {
            s.problems
                .push(format!("MemberAdd through the leader: {other:?}"));
            let _ = wl.stop().await;
            let _ = load.stop().await;
            return s;
        }
    };
    s.fault(
        t0,
        t,
        format!(
            "MemberAdd {FOURTH_PEER_URL} through {} (id {id:x})",
            MEMBERS[l]
        ),
    );

    // 2. Start it: --initial-cluster-state existing (compose/coordinator-4.yml).
    let t1 = Instant::now();
    blocking(|| p.compose_ok(&["up", "-d", "--no-deps", FOURTH]));
    s.fault(
        t1,
        t,
        format!("compose up {FOURTH} (--initial-cluster-state existing)"),
    );
    // It has caught up when a linearizable read through it sees a write made just before.
    let fourth = async {
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut marker = 0u64;
        loop {
            marker += 1;
            let value = format!("m{marker}").into_bytes();
            let wrote = {
                let mut kv = env.members.kv(l);
                tokio::time::timeout(
                    Duration::from_secs(2),
                    kv.put(PutRequest {
                        key: b"/scaling/joined".to_vec(),
                        value: value.clone(),
                        ..Default::default()
                    }),
                )
                .await
                .is_ok_and(|r| r.is_ok())
            };
            let addr = blocking(|| docker::published(&p.container(FOURTH), 2379));
            if let (true, Some(addr)) = (wrote, addr) {
                let mut kv = proto::etcdserverpb::kv_client::KvClient::new(
                    Endpoint::from_shared(format!("http://{addr}"))
                        .expect("a valid endpoint")
                        .connect_timeout(Duration::from_millis(500))
                        .connect_lazy(),
                );
                let read = tokio::time::timeout(
                    Duration::from_secs(2),
                    kv.range(RangeRequest {
                        key: b"/scaling/joined".to_vec(),
                        ..Default::default()
                    }),
                )
                .await;
                if let Ok(Ok(r)) = read
                    && r.into_inner()
                        .kvs
                        .first()
                        .is_some_and(|kv| kv.value == value)
                {
                    return Some(addr);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    .await;
    match fourth {
        Some(addr) => {
            s.line(format!(
                "join      {FOURTH} serves the latest write {} after its start",
                secs(t1.elapsed())
            ));
            let listed = tokio::time::timeout(
                Duration::from_secs(5),
                cluster(addr).member_list(MemberListRequest::default()),
            )
            .await;
            let n = match listed {
                Ok(Ok(r)) => r.into_inner().members.len(),
                _ => 0,
            };
            s.line(format!("join      {FOURTH} lists {n} members"));
            s.expect(n == 4, format!("{FOURTH} lists {n} members, expected 4"));
        }
        None => s.problems.push(format!(
            "{FOURTH} did not serve the latest write within 45 s; its log:\n{}",
            blocking(|| p.logs(FOURTH, 15))
        )),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 3. MemberRemove through the leader (which may have changed).
    let l = env.members.leader().await.unwrap_or(l);
    let leader_addr = blocking(|| p.port(MEMBERS[l], 2379));
    let t2 = Instant::now();
    let removed = tokio::time::timeout(
        Duration::from_secs(10),
        cluster(leader_addr).member_remove(MemberRemoveRequest { id }),
    )
    .await;
    s.fault(t2, t, format!("MemberRemove {id:x} through {}", MEMBERS[l]));
    match removed {
        Ok(Ok(r)) => {
            let n = r.into_inner().members.len();
            s.expect(n == 3, format!("{n} members after the removal, expected 3"));
        }
        other => s.problems.push(format!("MemberRemove: {other:?}")),
    }
    // A removed member stops serving by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stopped = loop {
        let state = blocking(|| docker::container_state(&p.container(FOURTH)));
        if state == "exited" {
            break Some(t2.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    match stopped {
        Some(d) => s.line(format!(
            "leave     {FOURTH} stopped by itself {} after the removal",
            secs(d)
        )),
        None => s
            .problems
            .push(format!("{FOURTH} still running 20 s after its removal")),
    }
    blocking(|| p.compose_ok(&["rm", "-s", "-f", "-v", FOURTH]));
    for member in MEMBERS {
        let addr = blocking(|| p.port(member, 2379));
        let n = match tokio::time::timeout(
            Duration::from_secs(5),
            cluster(addr).member_list(MemberListRequest::default()),
        )
        .await
        {
            Ok(Ok(r)) => r.into_inner().members.len(),
            _ => 0,
        };
        s.expect(
            n == 3,
            format!("{member} lists {n} members after the removal"),
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = finish(env, &mut s, t, wl, load, None).await;
    s
}

async fn rolling_restart(env: &Env<'_>) -> Scenario {
    let mut s = Scenario::new("rolling restart: docker restart of each member in turn under load");
    let Some((l, _)) = leader(env, &mut s).await else {
        return s;
    };
    let p = env.project;
    let mut order: Vec<usize> = (0..MEMBERS.len()).filter(|&i| i != l).collect();
    order.push(l);
    let wl = Workload::start(&env.members, "/scaling/rolling/");
    let load = Load::start(env.gateway);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in order {
        let t0 = Instant::now();
        blocking(|| p.restart(MEMBERS[i]));
        s.fault(
            t0,
            t,
            format!(
                "docker restart {}{}",
                MEMBERS[i],
                if i == l { " (the leader)" } else { "" }
            ),
        );
        match all_healthy(p, &[MEMBERS[i]], Duration::from_secs(30)).await {
            Ok(_) => {}
            Err(e) => s.problems.push(e),
        }
        match rejoined(env, i, t0, Duration::from_secs(30)).await {
            Some(d) => s.line(format!(
                "restart   {} healthy and following the leader {} after the restart began",
                MEMBERS[i],
                secs(d)
            )),
            None => {
                s.problems
                    .push(format!("{} did not rejoin within 30 s", MEMBERS[i]));
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts = finish(env, &mut s, t, wl, load, None).await;
    let ratio = counts.failed as f64 / counts.ops.max(1) as f64;
    s.line(format!(
        "kv        {:.3} % of operations failed or timed out",
        ratio * 100.0
    ));
    s.expect(
        ratio < 0.01,
        format!(
            "{} of {} operations failed ({:.2} %, bound 1 %)",
            counts.failed,
            counts.ops,
            ratio * 100.0
        ),
    );
    s
}
