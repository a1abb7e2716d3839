//! Consistent hashing end to end: stickiness, membership changes, ejection, draining, the
//! registry going away.

use std::collections::HashSet;
use std::time::Duration;

use crate::harness::{Gateway, HttpBackend, NS, Stack, T, key_served_by, served_by, wait_until};

fn routes(extra: &str) -> String {
    format!(
        r#"
[[routes]]
name = "web"
match = {{ path_prefix = "/" }}
backend = {{ namespace = "{NS}", service = "web" }}
hash = "header:x-user"
{extra}
"#
    )
}

async fn three_backends(
    stack: &Stack,
) -> (Vec<HttpBackend>, Vec<registry_svc::client::Registration>) {
    let mut backends = Vec::new();
    let mut regs = Vec::new();
    for name in ["a", "b", "c"] {
        let b = HttpBackend::start(name).await;
        regs.push(stack.register("web", name, b.port(), false).await);
        backends.push(b);
    }
    (backends, regs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_always_reaches_the_same_backend_and_keys_spread() {
    let stack = Stack::start().await;
    let (_backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(&stack.registry.url(), &routes("")).await;
    gw.wait_backends("web", 3).await;

    let mut owners = HashSet::new();
    for user in 0..24 {
        let seen = served_by(&gw, "/x", &format!("user-{user}"), 5).await;
        assert_eq!(seen.len(), 1, "user-{user} reached {seen:?}");
        owners.extend(seen.into_keys());
    }
    assert_eq!(
        owners.len(),
        3,
        "24 keys over 3 backends use them all: {owners:?}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lookup_names_the_backend_that_serves_the_key() {
    let stack = Stack::start().await;
    let (_backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &routes("algorithm = \"maglev\"\ntable_size = 1009"),
    )
    .await;
    gw.wait_backends("web", 3).await;
    let by_port = |id: &str| {
        _backends
            .iter()
            .find(|b| b.addr.to_string() == id)
            .map(|b| b.name.clone())
    };
    for user in ["alice", "bob", "carol", "dave"] {
        let answer = gw
            .admin(&format!("/admin/lookup?route=web&key={user}"))
            .await;
        let owner = answer["owner"].as_str().expect("owner");
        assert_eq!(answer["order"].as_array().expect("order").len(), 3);
        let seen = served_by(&gw, "/", user, 1).await;
        assert_eq!(
            Some(seen.into_keys().next().expect("one")),
            by_port(owner),
            "{answer}"
        );
    }
    let table = gw.admin("/admin/table?route=web").await;
    assert_eq!(table["algorithm"], "maglev");
    assert_eq!(table["members"].as_array().expect("members").len(), 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_from_the_registry_gets_no_new_requests_and_few_keys_move() {
    let stack = Stack::start().await;
    let (backends, mut regs) = three_backends(&stack).await;
    let gw = Gateway::start(&stack.registry.url(), &routes("")).await;
    gw.wait_backends("web", 3).await;

    let users: Vec<String> = (0..60).map(|u| format!("user-{u}")).collect();
    let mut before = Vec::new();
    for u in &users {
        before.push(
            served_by(&gw, "/", u, 1)
                .await
                .into_keys()
                .next()
                .expect("one"),
        );
    }

    let c = regs.pop().expect("c");
    within_deregister(c).await;
    gw.wait_backends("web", 2).await;
    let c_hits = backends[2].hits();

    let mut moved = 0;
    for (u, owner) in users.iter().zip(&before) {
        let now = served_by(&gw, "/", u, 1)
            .await
            .into_keys()
            .next()
            .expect("one");
        assert_ne!(now, "c", "{u} still reached the removed backend");
        if &now != owner {
            assert_eq!(
                owner, "c",
                "{u} moved from {owner} to {now}, though {owner} stayed"
            );
            moved += 1;
        }
    }
    assert_eq!(backends[2].hits(), c_hits, "c got requests after it left");
    let owned_by_c = before.iter().filter(|o| *o == "c").count();
    assert_eq!(moved, owned_by_c, "exactly c's keys moved");
    assert!(
        gw.metric("lb_gateway_membership_changes_total{route=\"web\"}")
            .await
            >= 2.0
    );
    gw.stop().await;
}

async fn within_deregister(r: registry_svc::client::Registration) {
    crate::harness::within(T, "deregister", r.deregister())
        .await
        .expect("deregister");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_ejected_and_its_keys_move_without_failed_requests() {
    let stack = Stack::start().await;
    let (backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &routes("outlier = { consecutive_connect_failures = 2, base_ejection = \"30s\" }\nretries = { attempts = 3 }"),
    )
    .await;
    gw.wait_backends("web", 3).await;

    // Keys owned by b.
    let mut b_users = Vec::new();
    for u in 0..60 {
        let user = format!("user-{u}");
        if served_by(&gw, "/", &user, 1).await.contains_key("b") {
            b_users.push(user);
        }
    }
    assert!(!b_users.is_empty(), "some keys belong to b");

    backends[1].kill();
    // Every request still succeeds: the failed connect is retried at the key's next choice.
    for user in &b_users {
        let seen = served_by(&gw, "/", user, 2).await;
        assert!(!seen.contains_key("b"), "{seen:?}");
    }
    let ejected = gw
        .backends("web")
        .await
        .into_iter()
        .find(|b| b["id"] == backends[1].addr.to_string())
        .expect("b still registered");
    assert_eq!(ejected["ejected"], true, "{ejected}");
    assert!(
        gw.metric("lb_gateway_backend_ejections_total{route=\"web\"")
            .await
            >= 1.0
    );
    // Once ejected, b's keys go straight to their next choice: no more connect attempts.
    let failures = gw
        .metric("lb_gateway_backend_connect_failures_total{route=\"web\"")
        .await;
    for user in &b_users {
        let seen = served_by(&gw, "/", user, 3).await;
        assert_eq!(seen.len(), 1, "{user} is sticky on its new owner: {seen:?}");
    }
    assert_eq!(
        gw.metric("lb_gateway_backend_connect_failures_total{route=\"web\"")
            .await,
        failures
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_requests_spread_over_every_backend() {
    let stack = Stack::start().await;
    let (backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &routes("").replace("header:x-user", "none"),
    )
    .await;
    gw.wait_backends("web", 3).await;
    for _ in 0..60 {
        let (status, _, _) = gw.get("/", &[]).await;
        assert_eq!(status, 200);
    }
    for b in &backends {
        assert!(b.hits() >= 5, "{} got {} of 60", b.name, b.hits());
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_request_to_a_leaving_backend_finishes_there() {
    let stack = Stack::start().await;
    let a = HttpBackend::start("a").await;
    let reg_a = stack.register("web", "a", a.port(), false).await;
    let b = HttpBackend::start("b").await;
    let _reg_b = stack.register("web", "b", b.port(), false).await;
    let gw = Gateway::start(&stack.registry.url(), &routes("")).await;
    gw.wait_backends("web", 2).await;
    let user = key_served_by(&gw, "a").await;
    let hits_before = a.hits();
    let slow = {
        let proxy = gw.proxy;
        let user = user.clone();
        tokio::spawn(
            async move { crate::harness::get(proxy, "/slow/1500", &[("x-user", &user)]).await },
        )
    };
    wait_until(T, "the slow request to be in flight at a", || async {
        a.hits() > hits_before
    })
    .await;
    within_deregister(reg_a).await;
    gw.wait_backends("web", 1).await;
    let drained = gw.admin("/admin/backends").await;
    assert_eq!(
        drained["routes"][0]["draining"][0]["id"],
        a.addr.to_string(),
        "a is draining: {drained}"
    );
    let (status, body, _) = crate::harness::within(T, "slow request", slow)
        .await
        .expect("task");
    assert_eq!(status, 200);
    assert_eq!(body["backend"], "a", "finished where it started");
    assert_eq!(
        served_by(&gw, "/", &user, 1)
            .await
            .into_keys()
            .next()
            .as_deref(),
        Some("b")
    );
    wait_until(T, "a to finish draining", || async {
        gw.admin("/admin/backends").await["routes"][0]["draining"]
            .as_array()
            .is_some_and(|d| d.is_empty())
    })
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_known_backends_keep_serving_while_the_registry_is_down() {
    let stack = Stack::start().await;
    let (_backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(&stack.registry.url(), &routes("")).await;
    gw.wait_backends("web", 3).await;
    let Stack {
        registry,
        coordinator: _coordinator,
    } = stack;
    registry.stop().await;
    wait_until(T, "the gateway to notice the registry is gone", || async {
        gw.admin("/admin/backends").await["routes"][0]["registry"]["connected"] == false
    })
    .await;
    for user in 0..12 {
        let seen = served_by(&gw, "/", &format!("user-{user}"), 2).await;
        assert_eq!(seen.len(), 1);
    }
    assert_eq!(gw.backends("web").await.len(), 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_prefix_route_with_rewrite_and_traceparent_propagates() {
    let stack = Stack::start().await;
    let api = HttpBackend::start("api").await;
    let _r1 = stack.register("api", "api-1", api.port(), false).await;
    let web = HttpBackend::start("web").await;
    let _r2 = stack.register("web", "web-1", web.port(), false).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &format!(
            r#"
[[routes]]
name = "api"
match = {{ host = "api.example.com", path_prefix = "/v1" }}
backend = {{ namespace = "{NS}", service = "api" }}
rewrite_prefix = "/internal"
hash = "path"

[[routes]]
name = "web"
match = {{ path_prefix = "/" }}
backend = {{ namespace = "{NS}", service = "web" }}
"#
        ),
    )
    .await;
    gw.wait_backends("api", 1).await;
    gw.wait_backends("web", 1).await;

    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, body, _) = gw
        .get(
            "/v1/orders?id=7",
            &[("host", "api.example.com:8080"), ("traceparent", parent)],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["backend"], "api");
    assert_eq!(body["path"], "/internal/orders");
    assert_eq!(body["query"], "id=7");
    assert_eq!(body["host"], "api.example.com:8080", "Host is kept");
    assert_eq!(body["x_forwarded_for"], "127.0.0.1");
    let sent = body["traceparent"].as_str().expect("traceparent");
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{sent}"
    );
    assert!(
        !sent.contains("00f067aa0ba902b7"),
        "the gateway's own span is the parent: {sent}"
    );

    // Another host falls through to the catch-all route; a trace starts there.
    let (_, body, _) = gw.get("/v1/orders", &[("host", "other.example.com")]).await;
    assert_eq!(body["backend"], "web");
    assert_eq!(body["path"], "/v1/orders");
    assert_eq!(body["traceparent"].as_str().map(str::len), Some(55));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_spills_past_its_owner_at_the_bounded_load() {
    let stack = Stack::start().await;
    let (backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(&stack.registry.url(), &routes("epsilon = 0.25")).await;
    gw.wait_backends("web", 3).await;
    // 12 concurrent slow requests for one key: the owner may hold ⌈1.25 · 12 / 3⌉ = 5.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let proxy = gw.proxy;
        tasks.push(tokio::spawn(async move {
            crate::harness::get(proxy, "/slow/800", &[("x-user", "hot")]).await
        }));
        // Let each request arrive before the next, so the loads are seen.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut counts = std::collections::HashMap::new();
    for t in tasks {
        let (status, body, _) = crate::harness::within(T, "hot request", t)
            .await
            .expect("task");
        assert_eq!(status, 200);
        *counts
            .entry(body["backend"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
    }
    let peak = counts.values().copied().max().unwrap_or(0);
    assert!(peak <= 5, "the owner held {peak} of 12: {counts:?}");
    assert!(counts.len() >= 3, "{counts:?}");
    assert!(
        gw.metric("lb_gateway_bounded_load_spills_total{route=\"web\"}")
            .await
            >= 7.0
    );
    drop(backends);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_and_empty_services_are_answered_with_reasons() {
    let stack = Stack::start().await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &format!(
            r#"
[[routes]]
name = "only"
match = {{ path_prefix = "/only" }}
backend = {{ namespace = "{NS}", service = "nobody" }}
"#
        ),
    )
    .await;
    let (status, body, _) = gw.get("/elsewhere", &[]).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no_route");
    let (status, body, _) = gw.get("/only/x", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "no_backend");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("test/nobody"),
        "{body}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_at_the_keys_next_choice_with_the_same_request() {
    let stack = Stack::start().await;
    let (_backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(&stack.registry.url(), &routes("")).await;
    gw.wait_backends("web", 3).await;
    let user = key_served_by(&gw, "a").await;
    let (status, body, _) = gw.get("/fail-on/a?x=1", &[("x-user", &user)]).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["backend"], "a");
    assert_eq!(
        body["path"], "/fail-on/a",
        "the retry carries the same path"
    );
    assert_eq!(body["query"], "x=1");
    assert_eq!(
        gw.metric("lb_gateway_retries_total{route=\"web\"}").await,
        1.0
    );
    // A POST is not retried: the 503 comes back.
    let req = http::Request::post(gw.url("/fail-on/a"))
        .header("x-user", &user)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .expect("request");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = crate::harness::within(T, "POST", client.request(req))
        .await
        .expect("POST");
    assert_eq!(resp.status(), 503);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_without_host_names_the_backend_that_serves_the_retry() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stack = Stack::start().await;
    let (backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(&stack.registry.url(), &routes("")).await;
    gw.wait_backends("web", 3).await;
    let user = key_served_by(&gw, "a").await;
    // HTTP/1.0 without Host: the gateway names the backend in the Host it sends; the first
    // try (to a, answering 503) must not leave a's name in the retried request.
    let mut io = tokio::net::TcpStream::connect(gw.proxy)
        .await
        .expect("connect");
    let req = format!("GET /fail-on/a?x=1 HTTP/1.0\r\nx-user: {user}\r\n\r\n");
    io.write_all(req.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    crate::harness::within(T, "answer", io.read_to_end(&mut answer))
        .await
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").expect("a head");
    let body: serde_json::Value = serde_json::from_str(body).expect("json");
    let served = body["backend"].as_str().expect("backend").to_owned();
    assert_ne!(served, "a");
    let port = backends
        .iter()
        .find(|b| b.name == served)
        .expect("a known backend")
        .port();
    assert_eq!(body["host"], format!("127.0.0.1:{port}"));
    assert_eq!(body["path"], "/fail-on/a");
    assert_eq!(body["query"], "x=1");
    assert_eq!(
        gw.metric("lb_gateway_retries_total{route=\"web\"}").await,
        1.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_registered_by_dns_name_is_resolved_and_reached() {
    let stack = Stack::start().await;
    let b = HttpBackend::start("named").await;
    // `localhost` goes through the system resolver like any name (it may yield ::1 first,
    // where nothing listens: the connect moves on to the next address).
    let _reg = stack
        .register_at("web", "named", "localhost", b.port(), false)
        .await;
    let gw = Gateway::start(&stack.registry.url(), &routes("")).await;
    gw.wait_backends("web", 1).await;
    let backends = gw.backends("web").await;
    assert_eq!(backends[0]["id"], format!("localhost:{}", b.port()));
    for user in 0..5 {
        let (status, body, _) = gw.get("/x", &[("x-user", &format!("u{user}"))]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["backend"], "named");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_request_is_answered_over_http1_without_the_upgrade() {
    let stack = Stack::start().await;
    let (_backends, _regs) = three_backends(&stack).await;
    let gw = Gateway::start(&stack.registry.url(), &routes("")).await;
    gw.wait_backends("web", 3).await;
    // What `curl --http2` sends over cleartext: RFC 9113 deprecates this upgrade, a server may
    // ignore it, and the gateway does (h2c clients use prior knowledge, tested with gRPC).
    let (status, body, headers) = gw
        .get(
            "/x",
            &[
                ("x-user", "u1"),
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "HTTP/1.1");
    assert_eq!(
        body["upgrade"], "",
        "the upgrade is not passed to the backend"
    );
    assert!(headers.get("upgrade").is_none());
    gw.stop().await;
}
