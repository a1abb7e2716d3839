//! The web dashboard (`/ui/`): its JSON API over plain HTTP, its errors when upstreams are
//! missing, down or silent, and the page itself in headless Chromium, following changes made
//! through the registry and config-svc without a reload.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;

use crate::browser::{Browser, dashboard_url};
use crate::harness::{ConfigSvc, Gateway, HttpBackend, NS, Stack, T, get, raw_get, within};

const ITEM: (&str, &str) = ("app", "settings.toml");

fn routes() -> String {
    format!(
        r#"
[[routes]]
name = "web"
match = {{ path_prefix = "/" }}
backend = {{ namespace = "{NS}", service = "web" }}
hash = "header:x-user"
"#
    )
}

/// A gateway over `stack`'s registry whose dashboard reads the coordinator at `coordinator`
/// and config-svc's REST API at `config` (namespace [`NS`]).
async fn dashboard_gateway(stack: &Stack, coordinator: &str, config: &str) -> Gateway {
    Gateway::start_with(
        &stack.registry.url(),
        &routes(),
        &[
            "--dashboard-coordinator-endpoints",
            coordinator,
            "--dashboard-config-url",
            config,
            "--dashboard-config-namespaces",
            NS,
        ],
    )
    .await
}

/// Everything the dashboard reads: coordinator, registry, config-svc with two versions of
/// one item, two registered backends, and a gateway pointed at all of them.
struct World {
    stack: Stack,
    config: ConfigSvc,
    backends: Vec<HttpBackend>,
    regs: Vec<registry_svc::client::Registration>,
    gw: Gateway,
}

impl World {
    async fn start() -> World {
        let stack = Stack::start().await;
        let config = ConfigSvc::start(&stack.coordinator.url()).await;
        let mut backends = Vec::new();
        let mut regs = Vec::new();
        for name in ["web-1", "web-2"] {
            let b = HttpBackend::start(name).await;
            regs.push(stack.register("web", name, b.port(), false).await);
            backends.push(b);
        }
        config
            .publish(NS, ITEM.0, ITEM.1, "greeting = \"hello\"\nlimit = 10\n")
            .await;
        config
            .publish(NS, ITEM.0, ITEM.1, "greeting = \"bonjour\"\nlimit = 10\n")
            .await;
        let config_url = format!("http://{}", config.http);
        let gw = dashboard_gateway(&stack, &stack.coordinator.url(), &config_url).await;
        gw.wait_backends("web", 2).await;
        World {
            stack,
            config,
            backends,
            regs,
            gw,
        }
    }

    async fn api(&self, path: &str) -> (u16, Value) {
        let (status, body, _) = get(self.gw.admin, path, &[]).await;
        (status, body)
    }

    async fn add_backend(&mut self, name: &str) {
        let b = HttpBackend::start(name).await;
        self.regs
            .push(self.stack.register("web", name, b.port(), false).await);
        self.backends.push(b);
    }

    /// Publishes the next version of the item as a candidate for half the clients.
    async fn start_rollout(&self) -> u64 {
        let rule = proto::config_v1::RolloutRule {
            percentage: Some(50),
            ..Default::default()
        };
        let content = "greeting = \"salut\"\nlimit = 10\n";
        self.config
            .publish_with(NS, ITEM.0, ITEM.1, content, Some(rule))
            .await
    }

    async fn stop(self) {
        self.gw.stop().await;
        self.config.stop().await;
    }
}

fn item_query() -> String {
    format!("namespace={NS}&group={}&key={}", ITEM.0, ITEM.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_api_reports_cluster_services_config_and_rings() {
    let w = World::start().await;

    // The cluster: one member, the leader, with a term and a revision.
    let (status, cluster) = w.api("/ui/api/cluster").await;
    assert_eq!(status, 200, "{cluster}");
    let members = cluster["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{cluster}");
    let m = &members[0];
    assert_eq!(m["leader"], true, "{cluster}");
    assert_eq!(m["health"], "healthy", "{cluster}");
    assert_eq!(cluster["leader"], m["id"], "{cluster}");
    assert!(m["revision"].as_i64().expect("revision") > 0, "{cluster}");
    assert!(m["term"].as_u64().expect("term") >= 1, "{cluster}");

    // The registry: the service with both instances, their health and weight, and the route.
    let (status, services) = w.api("/ui/api/services").await;
    assert_eq!(status, 200, "{services}");
    let ns = services["namespaces"]
        .as_array()
        .expect("namespaces")
        .iter()
        .find(|n| n["namespace"] == NS)
        .unwrap_or_else(|| panic!("namespace {NS} in {services}"));
    let web = ns["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["service"] == "web")
        .unwrap_or_else(|| panic!("service web in {services}"));
    assert_eq!(web["routes"], serde_json::json!(["web"]));
    assert_eq!(web["total"], 2);
    let ids: Vec<&str> = web["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            assert_eq!(i["health"], "healthy", "{i}");
            assert_eq!(i["weight"], 100, "{i}");
            i["instance_id"].as_str().expect("id")
        })
        .collect();
    assert_eq!(ids, ["web-1", "web-2"]);

    // The route: two backends with their shares, and a ring of owners covering them both.
    let (status, routes) = w.api("/ui/api/routes").await;
    assert_eq!(status, 200, "{routes}");
    let route = &routes["routes"][0];
    assert_eq!(route["route"], "web");
    assert_eq!(route["algorithm"], "ring");
    let backends = route["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), 2);
    let shares: f64 = backends
        .iter()
        .map(|b| b["share"].as_f64().expect("share"))
        .sum();
    assert!((shares - 1.0).abs() < 1e-6, "shares sum to 1: {shares}");
    let ring = route["ring"].as_array().expect("ring");
    assert_eq!(ring.len(), lb_gateway::dashboard::RING_SAMPLES);
    for owner in 0..2 {
        assert!(
            ring.iter().any(|o| o == owner),
            "backend {owner} owns part of the ring"
        );
    }

    // Config: the item with two versions, its history and the diff between them.
    let (status, config) = w.api("/ui/api/config").await;
    assert_eq!(status, 200, "{config}");
    let item = &config["namespaces"][0]["items"][0];
    assert_eq!(item["item"]["key"], ITEM.1, "{config}");
    assert_eq!(item["current_version"], 2, "{config}");
    let (status, history) = w
        .api(&format!("/ui/api/config/history?{}", item_query()))
        .await;
    assert_eq!(status, 200, "{history}");
    let numbers: Vec<u64> = history["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["number"].as_u64().expect("number"))
        .collect();
    assert_eq!(numbers, [2, 1]);
    let (status, diff) = w
        .api(&format!("/ui/api/config/diff?{}&from=1&to=2", item_query()))
        .await;
    assert_eq!(status, 200, "{diff}");
    let lines = diff["lines"].as_array().expect("lines");
    assert!(
        lines
            .iter()
            .any(|l| l["op"] == "delete" && l["text"] == "greeting = \"hello\""),
        "{diff}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["op"] == "insert" && l["text"] == "greeting = \"bonjour\""),
        "{diff}"
    );
    assert_eq!(diff["changes"][0]["path"], "greeting", "{diff}");

    // A staged rollout: the item says which candidate goes to whom.
    w.start_rollout().await;
    let (_, config) = w.api("/ui/api/config").await;
    let rollout = &config["namespaces"][0]["items"][0]["rollout"];
    assert_eq!(rollout["candidate"], 3, "{config}");
    assert_eq!(rollout["base"], 2, "{config}");
    assert_eq!(rollout["rule"]["percentage"], 50, "{config}");

    // The page and its assets are served from the binary.
    let (status, html) = raw_get(w.gw.admin, "/ui/").await;
    assert_eq!(status, 200);
    assert!(html.contains("<script src=\"app.js\">"), "{html}");
    for asset in ["/ui/app.js", "/ui/style.css"] {
        let (status, body) = raw_get(w.gw.admin, asset).await;
        assert_eq!(status, 200, "{asset}");
        assert!(!body.is_empty(), "{asset}");
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_api_answers_bad_parameters_and_unknown_items_with_json_errors() {
    let w = World::start().await;
    let cases = [
        (
            "/ui/api/config/history?namespace=test&group=app",
            400,
            "key",
        ),
        (
            "/ui/api/config/history?namespace=test&group=app&key=a%2Fb",
            400,
            "contains",
        ),
        (
            "/ui/api/config/diff?namespace=test&group=app&key=settings.toml&from=x",
            400,
            "not a version number",
        ),
        (
            "/ui/api/config/history?namespace=test&group=app&key=nope",
            404,
            "does not exist",
        ),
        ("/ui/api/nothing-here", 404, "no such dashboard API"),
    ];
    for (path, want, text) in cases {
        let (status, body) = w.api(path).await;
        assert_eq!(status, want, "{path}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(text), "{path}: {body}");
    }
    w.stop().await;
}

/// A TCP listener that accepts connections and never answers.
async fn silent_listener() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_panels_say_when_an_upstream_is_missing_down_or_silent() {
    let stack = Stack::start().await;
    // Nothing configured: 503 saying which flag is missing; the gateway's own panel works.
    let gw = Gateway::start(&stack.registry.url(), &routes()).await;
    let (status, body, _) = get(gw.admin, "/ui/api/cluster", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("--dashboard-coordinator-endpoints")),
        "{body}"
    );
    let (status, body, _) = get(gw.admin, "/ui/api/config", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(get(gw.admin, "/ui/api/routes", &[]).await.0, 200);
    gw.stop().await;

    // Down (connection refused): 502 naming the upstream.
    let dead = crate::coord::dead_endpoint();
    let gw = dashboard_gateway(&stack, &dead, &dead).await;
    for path in ["/ui/api/cluster", "/ui/api/config"] {
        let (status, body, _) = get(gw.admin, path, &[]).await;
        assert_eq!(status, 502, "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("cannot reach")),
            "{path}: {body}"
        );
    }
    gw.stop().await;

    // Silent (accepts, never answers): 504 after the call timeout, not a hung page.
    let (silent, holder) = silent_listener().await;
    let silent = format!("http://{silent}");
    let gw = dashboard_gateway(&stack, &silent, &silent).await;
    for (path, source) in [
        ("/ui/api/cluster", "coordinator"),
        ("/ui/api/config", "config-svc"),
    ] {
        let started = Instant::now();
        let (status, body, _) = get(gw.admin, path, &[]).await;
        assert_eq!(status, 504, "{path}: {body}");
        assert_eq!(body["source"], source, "{path}: {body}");
        assert!(
            started.elapsed() < lb_gateway::dashboard::CALL_TIMEOUT * 4,
            "{path} answered within a few call timeouts: {:?}",
            started.elapsed()
        );
    }
    gw.stop().await;
    holder.abort();
}

/// Waits (in the page) until `script` returns something `check` accepts.
async fn page_shows(
    browser: &Browser,
    what: &str,
    script: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    browser.wait_for(T, what, script, check).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_page_in_chromium_shows_live_state_and_follows_changes_without_reload() {
    let mut w = World::start().await;
    let browser = within(
        Duration::from_secs(90),
        "Chromium to start",
        Browser::start(),
    )
    .await;
    browser.goto(&dashboard_url(w.gw.admin)).await;
    // Set on this page load: if the page reloaded, it would be gone.
    browser
        .eval("window.__loadMark = 'first-load'; return true")
        .await;

    // The coordinator member, shown as leader with a revision.
    page_shows(
        &browser,
        "the leader with a revision",
        "const r = document.querySelector('#cluster-members tr[data-leader=\"true\"]');
         return r ? { text: r.textContent, revision: r.querySelector('.revision').textContent } : null",
        |v| {
            v["text"].as_str().is_some_and(|t| t.contains("leader"))
                && v["revision"]
                    .as_str()
                    .and_then(|r| r.parse::<i64>().ok())
                    .is_some_and(|r| r > 0)
        },
    )
    .await;

    // The service and its two instances.
    let instances = "return Array.from(document.querySelectorAll(
        '#services [data-service=\"test/web\"] tr[data-instance-id]')).map(r => r.dataset.instanceId)";
    page_shows(&browser, "the service's two instances", instances, |v| {
        *v == serde_json::json!(["web-1", "web-2"])
    })
    .await;

    // The config item with two versions and the diff between them, side by side.
    let config = "const item = document.querySelector('#config-items tr[data-item=\"test/app/settings.toml\"]');
        const diff = document.getElementById('config-diff-table');
        return {
          latest: item ? item.dataset.latest : null,
          versions: Array.from(document.querySelectorAll('#config-history-table tr[data-version]')).map(r => r.dataset.version),
          from: diff ? diff.dataset.from : null,
          to: diff ? diff.dataset.to : null,
          deleted: Array.from(document.querySelectorAll('#config-diff-table td.del')).map(t => t.textContent),
          inserted: Array.from(document.querySelectorAll('#config-diff-table td.ins')).map(t => t.textContent),
        }";
    page_shows(&browser, "two versions and their diff", config, |v| {
        v["latest"] == "2"
            && v["versions"] == serde_json::json!(["2", "1"])
            && v["from"] == "1"
            && v["to"] == "2"
            && v["deleted"] == serde_json::json!(["greeting = \"hello\""])
            && v["inserted"] == serde_json::json!(["greeting = \"bonjour\""])
    })
    .await;

    // The route's ring, drawn in the two backends' colours, and its backends.
    let ring = "const r = document.querySelector('#routes [data-route=\"web\"]');
        if (!r) return null;
        return {
          backends: Array.from(r.querySelectorAll('tr[data-backend]')).map(b => b.dataset.backend),
          owners: Array.from(new Set(Array.from(r.querySelectorAll('svg [data-owner]')).map(p => p.dataset.owner))).sort(),
        }";
    let want_ids = |names: &[&str], w: &World| -> Vec<String> {
        let mut ids: Vec<String> = w
            .backends
            .iter()
            .filter(|b| names.contains(&b.name.as_str()))
            .map(|b| b.addr.to_string())
            .collect();
        ids.sort();
        ids
    };
    let two = want_ids(&["web-1", "web-2"], &w);
    page_shows(&browser, "the ring with both backends", ring, |v| {
        v["backends"] == serde_json::json!(two) && v["owners"] == serde_json::json!(two)
    })
    .await;

    // Changes through the APIs show up on the open page.
    w.add_backend("web-3").await;
    w.config
        .publish(NS, ITEM.0, ITEM.1, "greeting = \"hola\"\nlimit = 10\n")
        .await;
    page_shows(&browser, "the new instance", instances, |v| {
        *v == serde_json::json!(["web-1", "web-2", "web-3"])
    })
    .await;
    let three = want_ids(&["web-1", "web-2", "web-3"], &w);
    page_shows(&browser, "the ring with three backends", ring, |v| {
        v["backends"] == serde_json::json!(three) && v["owners"] == serde_json::json!(three)
    })
    .await;
    page_shows(&browser, "version 3 and its diff", config, |v| {
        v["latest"] == "3"
            && v["versions"] == serde_json::json!(["3", "2", "1"])
            && v["from"] == "2"
            && v["to"] == "3"
            && v["deleted"] == serde_json::json!(["greeting = \"bonjour\""])
            && v["inserted"] == serde_json::json!(["greeting = \"hola\""])
    })
    .await;
    // Any two versions: pick v1 → v3 in the selects.
    browser
        .eval(
            "const f = document.getElementById('diff-from'), t = document.getElementById('diff-to');
             f.value = '1'; t.value = '3';
             f.dispatchEvent(new Event('change')); return true",
        )
        .await;
    page_shows(&browser, "the diff of v1 and v3", config, |v| {
        v["from"] == "1"
            && v["to"] == "3"
            && v["deleted"] == serde_json::json!(["greeting = \"hello\""])
            && v["inserted"] == serde_json::json!(["greeting = \"hola\""])
    })
    .await;
    // A staged rollout shows in the item's row and as a candidate in its history.
    w.start_rollout().await;
    page_shows(
        &browser,
        "the rollout of v4",
        "const item = document.querySelector('#config-items tr[data-item=\"test/app/settings.toml\"]');
         const v4 = document.querySelector('#config-history-table tr[data-version=\"4\"]');
         return { rollout: item ? item.querySelector('.rollout').textContent : null,
                  candidate: v4 ? v4.textContent : null }",
        |v| {
            v["rollout"] == "v4 rolling out over v3 to 50%"
                && v["candidate"].as_str().is_some_and(|t| t.contains("candidate"))
        },
    )
    .await;
    assert_eq!(
        browser.eval("return window.__loadMark").await,
        "first-load",
        "the page was not reloaded"
    );
    let errors = browser
        .eval("return Array.from(document.querySelectorAll('.error')).filter(e => !e.hidden).map(e => e.textContent)")
        .await;
    assert_eq!(errors, serde_json::json!([]), "no panel shows an error");

    browser.close().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_page_in_chromium_shows_an_unreachable_upstream_in_its_panel_only() {
    let stack = Stack::start().await;
    let b = HttpBackend::start("web-1").await;
    let _reg = stack.register("web", "web-1", b.port(), false).await;
    let dead = crate::coord::dead_endpoint();
    let gw = dashboard_gateway(&stack, &dead, &dead).await;
    gw.wait_backends("web", 1).await;
    let browser = within(
        Duration::from_secs(90),
        "Chromium to start",
        Browser::start(),
    )
    .await;
    browser.goto(&dashboard_url(gw.admin)).await;
    let errors = "const e = (id) => { const b = document.querySelector('#' + id + ' > .error'); return b.hidden ? null : b.textContent };
        return {
          cluster: e('cluster'), config: e('config'), services: e('services'), routes: e('routes'),
          instances: document.querySelectorAll('#services tr[data-instance-id]').length,
          backends: document.querySelectorAll('#routes tr[data-backend]').length,
        }";
    page_shows(
        &browser,
        "the two unreachable panels' errors beside working ones",
        errors,
        |v| {
            let says = |panel: &str, source: &str| {
                v[panel].as_str().is_some_and(|t| {
                    t.contains(&format!("cannot reach {source}")) && t.contains("HTTP 502")
                })
            };
            says("cluster", "coordinator")
                && says("config", "config-svc")
                && v["services"].is_null()
                && v["routes"].is_null()
                && v["instances"] == 1
                && v["backends"] == 1
        },
    )
    .await;
    browser.close().await;
    gw.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Three coordinator members in process, forming one Raft cluster.
async fn three_members(dir: &std::path::Path) -> Vec<(String, coordinator::Running)> {
    use clap::Parser as _;
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{}=http://127.0.0.1:{peer}", i + 1))
        .collect();
    let initial = initial.join(",");
    let mut starting = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let (client, peer) = (
            format!("http://127.0.0.1:{client}"),
            format!("http://127.0.0.1:{peer}"),
        );
        let data = dir.join(format!("m{}", i + 1)).display().to_string();
        let config = coordinator::Config::parse_from([
            "coordinator",
            "--name",
            &format!("m{}", i + 1),
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial,
            "--initial-cluster-state",
            "new",
            "--listen-metrics-urls",
            "http://127.0.0.1:0",
        ]);
        starting.push((client, tokio::spawn(coordinator::start(config))));
    }
    let mut members = Vec::new();
    for (client, task) in starting {
        let running = within(T, "a coordinator member to start", task)
            .await
            .expect("no panic")
            .expect("the member starts");
        members.push((client, running));
    }
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_every_member_of_a_three_member_cluster_and_one_that_stops() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut members = three_members(dir.path()).await;
    // Only the first member is configured: the others are asked at the URLs they advertise.
    let gw = dashboard_gateway(&stack, &members[0].0, &crate::coord::dead_endpoint()).await;
    // While the members elect a leader, a member may not answer yet (502): poll.
    let cluster = || async { get(gw.admin, "/ui/api/cluster", &[]).await.1 };
    let mut view = Value::Null;
    let agreed = |v: &Value| {
        let ms = v["members"].as_array().cloned().unwrap_or_default();
        ms.len() == 3
            && ms.iter().all(|m| m["health"] == "healthy")
            && ms.iter().filter(|m| m["leader"] == true).count() == 1
            && ms.iter().all(|m| m["term"] == v["term"])
            && ms.iter().all(|m| m["revision"].as_i64() > Some(0))
    };
    let deadline = Instant::now() + T;
    while !agreed(&view) {
        assert!(Instant::now() < deadline, "no agreed view: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        view = cluster().await;
    }
    let asked: Vec<&str> = view["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["asked"].as_str().expect("asked"))
        .collect();
    for (url, _) in &members {
        assert!(asked.contains(&url.as_str()), "{url} asked: {view}");
    }

    // A follower (not the configured one, through which the list comes) stops: its row says
    // unreachable, the others stay healthy with a leader.
    let follower = view["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["leader"] == false && m["asked"] != members[0].0.as_str())
        .expect("a follower besides the configured member");
    let follower_url = follower["asked"].as_str().expect("asked").to_owned();
    let follower_id = follower["id"].as_str().expect("id").to_owned();
    let at = members
        .iter()
        .position(|(u, _)| *u == follower_url)
        .expect("the follower is one of ours");
    let (_, running) = members.remove(at);
    within(T, "the follower to stop", running.shutdown()).await;
    // (Under load the two left may elect a new leader: it must be one of them.)
    let shows_stopped = |v: &Value| {
        let ms = v["members"].as_array().cloned().unwrap_or_default();
        let leader = v["leader"].as_str().unwrap_or_default();
        ms.len() == 3
            && ms.iter().all(|m| {
                if m["id"] == follower_id.as_str() {
                    m["health"] == "unreachable" && m["error"].as_str().is_some()
                } else {
                    m["health"] == "healthy"
                }
            })
            && !leader.is_empty()
            && leader != follower_id
    };
    let deadline = Instant::now() + T;
    loop {
        view = cluster().await;
        if shows_stopped(&view) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped member {follower_id} does not show as unreachable: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.stop().await;
    for (_, running) in members {
        within(T, "a member to stop", running.shutdown()).await;
    }
}
