//! The etcd v3 JSON gateway over real HTTP/1.1 on the client port (the same port gRPC is
//! served on), with a small HTTP client written here on a TCP socket: no HTTP library stands
//! between the test and the bytes the server sends.
//!
//! Expected bodies are the ones etcd 3.4's grpc-gateway produces (proto field names, int64 as
//! strings, base64 bytes, enum names, defaults left out; errors as
//! `{"error","message","code"}` with grpc-gateway's HTTP status).

use std::time::Duration;

use base64::Engine as _;
use proto::etcdserverpb::auth_client::AuthClient;
use proto::etcdserverpb::{
    AuthEnableRequest, AuthRoleAddRequest, AuthRoleGrantPermissionRequest, AuthUserAddRequest,
    AuthUserGrantRoleRequest, PutRequest, RangeRequest,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::harness::{Server, channel, within};

const TIMEOUT: Duration = Duration::from_secs(10);

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_else(|| panic!("a base64 string: {v}")))
        .expect("valid base64")
}

/// An HTTP/1.1 response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response whose body is still arriving (chunked), read line by line.
struct Streamed {
    status: u16,
    reader: BufReader<TcpStream>,
    chunked: bool,
    pending: Vec<u8>,
}

impl Streamed {
    /// The next body line as JSON; `None` at the end of the body.
    async fn next(&mut self) -> Option<Value> {
        within(TIMEOUT, "the next streamed line", async {
            loop {
                if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.pending.drain(..=i).collect();
                    let line = String::from_utf8(line).expect("UTF-8 line");
                    if line.trim().is_empty() {
                        continue;
                    }
                    return Some(
                        serde_json::from_str(line.trim()).unwrap_or_else(|e| {
                            panic!("streamed line is not JSON ({e}): {line:?}")
                        }),
                    );
                }
                if !self.read_more().await {
                    return None;
                }
            }
        })
        .await
    }

    /// Reads one chunk (or some bytes); false at the end of the body.
    async fn read_more(&mut self) -> bool {
        if !self.chunked {
            let mut buf = [0u8; 4096];
            let n = self.reader.read(&mut buf).await.expect("read body");
            self.pending.extend_from_slice(&buf[..n]);
            return n > 0;
        }
        let mut size = String::new();
        if self.reader.read_line(&mut size).await.expect("chunk size") == 0 {
            return false;
        }
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return false;
        }
        let mut chunk = vec![0u8; size + 2];
        self.reader.read_exact(&mut chunk).await.expect("chunk");
        self.pending.extend_from_slice(&chunk[..size]);
        true
    }

    /// Asserts nothing arrives for `quiet`.
    async fn assert_silent(&mut self, quiet: Duration) {
        let got = tokio::time::timeout(quiet, async {
            loop {
                if self.pending.contains(&b'\n') {
                    return;
                }
                if !self.read_more().await {
                    return;
                }
            }
        })
        .await;
        assert!(
            got.is_err(),
            "expected silence, got {:?}",
            String::from_utf8_lossy(&self.pending)
        );
    }
}

/// Sends one request; returns the connection positioned at the body.
async fn send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, BufReader<TcpStream>) {
    let mut stream = within(TIMEOUT, "connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    // A server may answer (and close) before reading a body it refuses.
    let _ = stream.write_all(body).await;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    within(TIMEOUT, "status line", reader.read_line(&mut status_line))
        .await
        .expect("read status line");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').expect("header name: value");
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    (status, headers, reader)
}

async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let (status, headers, reader) = send(addr, method, path, headers, body).await;
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut s = Streamed {
        status,
        reader,
        chunked,
        pending: Vec::new(),
    };
    within(TIMEOUT, "the whole body", async {
        while s.read_more().await {}
    })
    .await;
    Resp {
        status,
        headers,
        body: s.pending,
    }
}

/// `POST path` with a JSON body.
async fn post(addr: &str, path: &str, body: &Value) -> Resp {
    post_raw(addr, path, &[], body.to_string().as_bytes()).await
}

async fn post_raw(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    request(addr, "POST", path, &h, body).await
}

/// `POST path`, expecting 200, returning the JSON body.
async fn ok(addr: &str, path: &str, body: &Value) -> Value {
    let r = post(addr, path, body).await;
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

async fn stream(addr: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Streamed {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    let (status, headers, reader) = send(addr, "POST", path, &h, body.to_string().as_bytes()).await;
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    Streamed {
        status,
        reader,
        chunked,
        pending: Vec::new(),
    }
}

/// grpc-gateway's error body, checked whole.
fn assert_error(r: &Resp, http: u16, code: i64, message: &str) {
    assert_eq!(r.status, http, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["code"], json!(code), "{v}");
    assert_eq!(v["message"], json!(message), "{v}");
    assert_eq!(v["error"], json!(message), "{v}");
}

fn rev(v: &Value) -> i64 {
    v["header"]["revision"]
        .as_str()
        .unwrap_or_else(|| panic!("revision as a string: {v}"))
        .parse()
        .expect("decimal revision")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_gateway_kv_put_range_delete_txn_compaction() {
    let server = Server::start().await;
    let a = &server.endpoint();

    // Binary key and value round-trip through base64.
    let key: &[u8] = &[0, 1, 0xfe, 0xff, b'k'];
    let value: &[u8] = &[0xff, 0, b'\n', b'"', 0x80];
    let put = ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(key), "value": b64(value)}),
    )
    .await;
    let r1 = rev(&put);
    // Header fields are decimal strings; defaults (prev_kv) are left out.
    let h = &put["header"];
    for f in ["cluster_id", "member_id", "revision", "raft_term"] {
        assert!(h[f].is_string(), "{f} as a string: {put}");
    }
    assert!(put.get("prev_kv").is_none(), "{put}");

    let got = ok(a, "/v3/kv/range", &json!({"key": b64(key)})).await;
    assert_eq!(got["count"], json!("1"));
    let kv = &got["kvs"][0];
    assert_eq!(unb64(&kv["key"]), key);
    assert_eq!(unb64(&kv["value"]), value);
    assert_eq!(kv["create_revision"], json!(r1.to_string()));
    assert_eq!(kv["mod_revision"], json!(r1.to_string()));
    assert_eq!(kv["version"], json!("1"));
    assert!(kv.get("lease").is_none(), "lease 0 left out: {kv}");
    assert!(got.get("more").is_none(), "more=false left out: {got}");

    // The gRPC clients on the same port see the same key space.
    let mut grpc = server.kv().await;
    let g = grpc
        .range(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })
        .await
        .expect("gRPC range")
        .into_inner();
    assert_eq!(g.kvs[0].value, value);
    grpc.put(PutRequest {
        key: b"foo/b".to_vec(),
        value: b"from-grpc".to_vec(),
        ..Default::default()
    })
    .await
    .expect("gRPC put");
    ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"foo/a"), "value": b64(b"1")}),
    )
    .await;
    // camelCase input names are read too; a prefix range; count_only leaves kvs out.
    let pre = ok(
        a,
        "/v3/kv/range",
        &json!({"key": b64(b"foo/"), "rangeEnd": b64(b"foo0"), "sort_order": "DESCEND"}),
    )
    .await;
    assert_eq!(pre["count"], json!("2"));
    assert_eq!(unb64(&pre["kvs"][0]["key"]), b"foo/b");
    assert_eq!(unb64(&pre["kvs"][0]["value"]), b"from-grpc");
    assert_eq!(unb64(&pre["kvs"][1]["key"]), b"foo/a");
    let count = ok(
        a,
        "/v3/kv/range",
        &json!({"key": b64(b"foo/"), "range_end": b64(b"foo0"), "count_only": true}),
    )
    .await;
    assert_eq!(count["count"], json!("2"));
    assert!(count.get("kvs").is_none(), "{count}");
    let limited = ok(
        a,
        "/v3/kv/range",
        &json!({"key": b64(b"foo/"), "range_end": b64(b"foo0"), "limit": 1}),
    )
    .await;
    assert_eq!(limited["more"], json!(true));

    // Put with prev_kv.
    let p2 = ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"foo/a"), "value": b64(b"2"), "prev_kv": true}),
    )
    .await;
    assert_eq!(unb64(&p2["prev_kv"]["value"]), b"1");
    assert_eq!(p2["prev_kv"]["version"], json!("1"));

    // Txn: compare on version, success branch, one revision for several writes.
    let before = rev(&p2);
    let txn = ok(
        a,
        "/v3/kv/txn",
        &json!({
            "compare": [{"key": b64(b"foo/a"), "target": "VERSION", "result": "EQUAL", "version": "2"}],
            "success": [
                {"request_put": {"key": b64(b"foo/c"), "value": b64(b"3")}},
                {"requestPut": {"key": b64(b"foo/d"), "value": b64(b"4")}},
                {"request_range": {"key": b64(b"foo/a")}}
            ],
            "failure": [{"request_delete_range": {"key": b64(b"foo/a")}}]
        }),
    )
    .await;
    assert_eq!(txn["succeeded"], json!(true), "{txn}");
    assert_eq!(rev(&txn), before + 1, "one revision for the whole txn");
    let resps = txn["responses"].as_array().expect("responses");
    assert_eq!(resps.len(), 3);
    assert!(resps[0].get("response_put").is_some(), "{txn}");
    assert_eq!(unb64(&resps[2]["response_range"]["kvs"][0]["value"]), b"2");
    // The failure branch: succeeded=false is left out.
    let txn2 = ok(
        a,
        "/v3/kv/txn",
        &json!({
            "compare": [{"key": b64(b"foo/a"), "target": "VALUE", "result": "EQUAL", "value": b64(b"nope")}],
            "success": [{"request_put": {"key": b64(b"foo/x"), "value": b64(b"x")}}],
            "failure": [{"request_range": {"key": b64(b"foo/c")}}]
        }),
    )
    .await;
    assert!(txn2.get("succeeded").is_none(), "{txn2}");
    assert_eq!(
        unb64(&txn2["responses"][0]["response_range"]["kvs"][0]["value"]),
        b"3"
    );
    let absent = ok(a, "/v3/kv/range", &json!({"key": b64(b"foo/x")})).await;
    assert!(
        absent.get("kvs").is_none() && absent.get("count").is_none(),
        "{absent}"
    );

    // Delete a range with prev_kv.
    let del = ok(
        a,
        "/v3/kv/deleterange",
        &json!({"key": b64(b"foo/c"), "range_end": b64(b"foo/e"), "prev_kv": true}),
    )
    .await;
    assert_eq!(del["deleted"], json!("2"));
    assert_eq!(del["prev_kvs"].as_array().map(Vec::len), Some(2));

    // Compaction, then reading a compacted revision: OutOfRange → 400, code 11.
    let now = rev(&del);
    ok(
        a,
        "/v3/kv/compaction",
        &json!({"revision": now.to_string()}),
    )
    .await;
    let r = post(
        a,
        "/v3/kv/range",
        &json!({"key": b64(b"foo/a"), "revision": before}),
    )
    .await;
    assert_error(
        &r,
        400,
        11,
        "etcdserver: mvcc: required revision has been compacted",
    );
    let r = post(
        a,
        "/v3/kv/range",
        &json!({"key": b64(b"foo/a"), "revision": now + 100}),
    )
    .await;
    assert_error(
        &r,
        400,
        11,
        "etcdserver: mvcc: required revision is a future revision",
    );

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_gateway_leases_status_and_member_list() {
    let server = Server::start().await;
    let a = &server.endpoint();

    let grant = ok(a, "/v3/lease/grant", &json!({"TTL": 60, "ID": 4242})).await;
    assert_eq!(grant["ID"], json!("4242"));
    assert_eq!(grant["TTL"], json!("60"));
    ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"leased"), "value": b64(b"v"), "lease": "4242"}),
    )
    .await;
    let ttl = ok(
        a,
        "/v3/lease/timetolive",
        &json!({"ID": "4242", "keys": true}),
    )
    .await;
    assert_eq!(ttl["grantedTTL"], json!("60"));
    let left: i64 = ttl["TTL"]
        .as_str()
        .expect("TTL string")
        .parse()
        .expect("int");
    assert!((1..=60).contains(&left), "{ttl}");
    assert_eq!(unb64(&ttl["keys"][0]), b"leased");
    // The binding under /v3/kv/lease/ answers the same.
    let ttl2 = ok(a, "/v3/kv/lease/timetolive", &json!({"ID": 4242})).await;
    assert_eq!(ttl2["grantedTTL"], json!("60"));
    let leases = ok(a, "/v3/lease/leases", &json!({})).await;
    assert_eq!(leases["leases"], json!([{"ID": "4242"}]));

    // Keep-alive: one result line per request in the body, then the stream ends.
    let mut ka = stream(a, "/v3/lease/keepalive", &[], &json!({"ID": 4242})).await;
    assert_eq!(ka.status, 200);
    let line = ka.next().await.expect("a keep-alive result");
    assert_eq!(line["result"]["ID"], json!("4242"), "{line}");
    assert_eq!(line["result"]["TTL"], json!("60"), "{line}");
    assert!(ka.next().await.is_none(), "the stream ends with the body");
    // Two requests in one body, newline-delimited: two results.
    let body = b"{\"ID\":4242}\n{\"ID\":\"4242\"}\n";
    let r = post_raw(a, "/v3/lease/keepalive", &[], body).await;
    assert_eq!(r.status, 200);
    let lines: Vec<Value> = r
        .text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{}", r.text());

    // Revoke deletes the key; a second revoke is NotFound → 404, code 5.
    ok(a, "/v3/lease/revoke", &json!({"ID": 4242})).await;
    let gone = ok(a, "/v3/kv/range", &json!({"key": b64(b"leased")})).await;
    assert!(gone.get("kvs").is_none(), "{gone}");
    let r = post(a, "/v3/lease/revoke", &json!({"ID": 4242})).await;
    assert_error(&r, 404, 5, "etcdserver: requested lease not found");
    let t = ok(a, "/v3/lease/timetolive", &json!({"ID": 4242})).await;
    assert_eq!(t["TTL"], json!("-1"), "{t}");

    // GET /version and /health, as etcd serves them (JSON clients read /version to pick their
    // API prefix).
    let v = request(a, "GET", "/version", &[], b"").await;
    assert_eq!(v.status, 200, "{}", v.text());
    let v = v.json();
    assert!(
        v["etcdserver"]
            .as_str()
            .is_some_and(|s| s.starts_with("3.")),
        "{v}"
    );
    assert!(
        v["etcdcluster"].as_str().is_some_and(|s| s.ends_with(".0")),
        "{v}"
    );
    let h = request(a, "GET", "/health", &[], b"").await;
    assert_eq!(h.status, 200, "{}", h.text());
    assert_eq!(h.json()["health"], json!("true"));

    // Status and member list.
    let st = ok(a, "/v3/maintenance/status", &json!({})).await;
    let me = st["header"]["member_id"]
        .as_str()
        .expect("member id")
        .to_string();
    assert_eq!(st["leader"], json!(me), "a single member leads: {st}");
    assert!(
        st["version"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{st}"
    );
    assert!(st["dbSize"].as_str().is_some(), "{st}");
    assert!(st["raftIndex"].as_str().is_some(), "{st}");
    let ml = ok(a, "/v3/cluster/member/list", &json!({})).await;
    let members = ml["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{ml}");
    assert_eq!(members[0]["ID"], json!(me));
    assert_eq!(members[0]["name"], json!("default"));
    assert_eq!(members[0]["clientURLs"], json!([server.url()]));
    assert!(members[0].get("isLearner").is_none(), "{ml}");

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_gateway_watch_streams_events() {
    let server = Server::start().await;
    let a = &server.endpoint();
    let first = ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"w/0"), "value": b64(b"old")}),
    )
    .await;
    let r0 = rev(&first);

    let mut w = stream(
        a,
        "/v3/watch",
        &[],
        &json!({"create_request": {"key": b64(b"w/"), "range_end": b64(b"w0"), "prev_kv": true}}),
    )
    .await;
    assert_eq!(w.status, 200);
    let created = w.next().await.expect("created");
    assert_eq!(created["result"]["created"], json!(true), "{created}");
    // watch_id 0 is a default: left out.
    assert!(created["result"].get("watch_id").is_none(), "{created}");
    w.assert_silent(Duration::from_millis(300)).await;

    // Writes through JSON and through gRPC both arrive, in order, put and delete.
    let p1 = ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"w/1"), "value": b64(b"a")}),
    )
    .await;
    let mut grpc = server.kv().await;
    grpc.put(PutRequest {
        key: b"w/0".to_vec(),
        value: b"new".to_vec(),
        ..Default::default()
    })
    .await
    .expect("gRPC put");
    ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"other"), "value": b64(b"x")}),
    )
    .await;
    let d = ok(a, "/v3/kv/deleterange", &json!({"key": b64(b"w/1")})).await;

    let e1 = w.next().await.expect("event 1");
    let ev = &e1["result"]["events"][0];
    assert!(ev.get("type").is_none(), "PUT is the default: {e1}");
    assert_eq!(unb64(&ev["kv"]["key"]), b"w/1");
    assert_eq!(ev["kv"]["mod_revision"], json!(rev(&p1).to_string()));
    let e2 = w.next().await.expect("event 2");
    let ev = &e2["result"]["events"][0];
    assert_eq!(unb64(&ev["kv"]["value"]), b"new");
    assert_eq!(
        unb64(&ev["prev_kv"]["value"]),
        b"old",
        "prev_kv asked for: {e2}"
    );
    let e3 = w
        .next()
        .await
        .expect("event 3 (the delete; 'other' is outside the range)");
    let ev = &e3["result"]["events"][0];
    assert_eq!(ev["type"], json!("DELETE"), "{e3}");
    assert_eq!(unb64(&ev["kv"]["key"]), b"w/1");
    assert_eq!(ev["kv"]["mod_revision"], json!(rev(&d).to_string()));
    assert_eq!(rev(&e3["result"]), rev(&d));
    w.assert_silent(Duration::from_millis(300)).await;
    drop(w);

    // A watch from a past revision replays history first.
    let mut replay = stream(
        a,
        "/v3/watch",
        &[],
        &json!({"create_request": {"key": b64(b"w/0"), "start_revision": r0.to_string()}}),
    )
    .await;
    replay.next().await.expect("created");
    let mut values = Vec::new();
    while values.len() < 2 {
        let m = replay.next().await.expect("replayed events");
        for e in m["result"]["events"].as_array().expect("events") {
            values.push(unb64(&e["kv"]["value"]));
        }
    }
    assert_eq!(values, vec![b"old".to_vec(), b"new".to_vec()]);
    drop(replay);

    // From a compacted revision: created, then cancelled with compact_revision.
    let now = rev(&d);
    ok(a, "/v3/kv/compaction", &json!({"revision": now})).await;
    let mut old = stream(
        a,
        "/v3/watch",
        &[],
        &json!({"create_request": {"key": b64(b"w/0"), "start_revision": r0}}),
    )
    .await;
    let mut cancelled = None;
    for _ in 0..3 {
        let m = old.next().await.expect("a message");
        if m["result"]["canceled"] == json!(true) {
            cancelled = Some(m);
            break;
        }
    }
    let c = cancelled.expect("the watch was cancelled");
    assert_eq!(
        c["result"]["compact_revision"],
        json!(now.to_string()),
        "{c}"
    );

    // A bad first request is refused before streaming.
    let r = post(a, "/v3/watch", &json!({"create_request": {"key": 7}})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["code"], json!(3));

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_gateway_refuses_bad_requests_like_etcd() {
    let server = Server::start_with(&["--max-request-bytes", "4096"]).await;
    let a = &server.endpoint();

    // Not JSON, truncated JSON, wrong types, bad base64, unknown enum names: 400, code 3.
    for body in [
        &b"{\"key\": \"Zm9v\""[..],
        b"not json",
        b"{\"key\": 5}",
        b"{\"key\": \"!!!\"}",
        b"{\"key\": \"Zm9v\", \"limit\": \"abc\"}",
        b"{\"key\": \"Zm9v\", \"sort_order\": \"SIDEWAYS\"}",
        b"[1, 2]",
    ] {
        let r = post_raw(a, "/v3/kv/range", &[], body).await;
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(body),
            r.text()
        );
        let v = r.json();
        assert_eq!(v["code"], json!(3), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert_eq!(v["error"], v["message"]);
    }
    let r = post_raw(
        a,
        "/v3/kv/range",
        &[],
        b"{\"key\": \"Zm9v\", \"sort_order\": \"SIDEWAYS\"}",
    )
    .await;
    assert_eq!(
        r.json()["message"],
        json!("unknown value \"SIDEWAYS\" for enum etcdserverpb.RangeRequest_SortOrder")
    );
    // An empty body is an empty request (etcd's answer: the key is missing).
    let r = post_raw(a, "/v3/kv/range", &[], b"").await;
    assert_error(&r, 400, 3, "etcdserver: key is not provided");
    // Unknown fields are ignored, as etcd's gateway does.
    let r = post_raw(a, "/v3/kv/range", &[], b"{\"key\": \"Zm9v\", \"bogus\": 1}").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Too large: the body limit, and the decoded request's limit.
    let big = json!({"key": b64(b"big"), "value": b64(&vec![b'x'; 20_000])});
    let r = post(a, "/v3/kv/put", &big).await;
    assert_error(&r, 400, 3, "etcdserver: request is too large");
    let just_over = json!({"key": b64(b"big"), "value": b64(&vec![b'x'; 4200])});
    let r = post(a, "/v3/kv/put", &just_over).await;
    assert_error(&r, 400, 3, "etcdserver: request is too large");
    let fits = json!({"key": b64(b"big"), "value": b64(&vec![b'x'; 3000])});
    ok(a, "/v3/kv/put", &fits).await;

    // Unknown path: 404; wrong method: 405.
    let r = post(a, "/v3/kv/nope", &json!({})).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = post(a, "/v2/keys/foo", &json!({})).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = request(a, "GET", "/v3/kv/range", &[], b"").await;
    assert_eq!(r.status, 405, "{}", r.text());

    // The server still serves gRPC and JSON afterwards.
    let mut grpc = server.kv().await;
    grpc.range(RangeRequest {
        key: b"big".to_vec(),
        ..Default::default()
    })
    .await
    .expect("gRPC still served");
    ok(a, "/v3/kv/range", &json!({"key": b64(b"big")})).await;

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_gateway_with_auth_passes_the_authorization_header() {
    let server = Server::start().await;
    let a = &server.endpoint();
    ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"app/a"), "value": b64(b"1")}),
    )
    .await;
    ok(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"secret"), "value": b64(b"s")}),
    )
    .await;

    // Users and roles over gRPC; then auth on.
    let mut auth = AuthClient::new(channel(&server.url()).await);
    for (name, pw) in [("root", "root-secret-1"), ("reader", "reader-secret-1")] {
        auth.user_add(AuthUserAddRequest {
            name: name.into(),
            password: pw.into(),
            ..Default::default()
        })
        .await
        .expect("user add");
    }
    auth.user_grant_role(AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .expect("grant root");
    auth.role_add(AuthRoleAddRequest {
        name: "app-read".into(),
    })
    .await
    .expect("role add");
    auth.role_grant_permission(AuthRoleGrantPermissionRequest {
        name: "app-read".into(),
        perm: Some(proto::authpb::Permission {
            perm_type: proto::authpb::permission::Type::Read as i32,
            key: b"app/".to_vec(),
            range_end: b"app0".to_vec(),
        }),
    })
    .await
    .expect("grant permission");
    auth.user_grant_role(AuthUserGrantRoleRequest {
        user: "reader".into(),
        role: "app-read".into(),
    })
    .await
    .expect("grant role");
    auth.auth_enable(AuthEnableRequest {})
        .await
        .expect("auth enable");

    // No token: etcd's "user name is empty" (InvalidArgument → 400).
    let r = post(a, "/v3/kv/range", &json!({"key": b64(b"app/a")})).await;
    assert_error(&r, 400, 3, "etcdserver: user name is empty");
    let r = post(
        a,
        "/v3/kv/put",
        &json!({"key": b64(b"app/a"), "value": b64(b"2")}),
    )
    .await;
    assert_error(&r, 400, 3, "etcdserver: user name is empty");
    // Status and member list stay open, as in etcd.
    ok(a, "/v3/maintenance/status", &json!({})).await;
    ok(a, "/v3/cluster/member/list", &json!({})).await;

    // Wrong password.
    let r = post(
        a,
        "/v3/auth/authenticate",
        &json!({"name": "reader", "password": "nope"}),
    )
    .await;
    assert_error(
        &r,
        400,
        3,
        "etcdserver: authentication failed, invalid user ID or password",
    );
    let t = ok(
        a,
        "/v3/auth/authenticate",
        &json!({"name": "reader", "password": "reader-secret-1"}),
    )
    .await;
    let token = t["token"].as_str().expect("token").to_string();
    let with = [("Authorization", token.as_str())];

    // The token in the Authorization header, as etcd's gateway takes it.
    let r = post_raw(
        a,
        "/v3/kv/range",
        &with,
        json!({"key": b64(b"app/a")}).to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(unb64(&r.json()["kvs"][0]["value"]), b"1");
    // Outside its permission: PermissionDenied → 403, code 7.
    let r = post_raw(
        a,
        "/v3/kv/range",
        &with,
        json!({"key": b64(b"secret")}).to_string().as_bytes(),
    )
    .await;
    assert_error(&r, 403, 7, "etcdserver: permission denied");
    let r = post_raw(
        a,
        "/v3/kv/put",
        &with,
        json!({"key": b64(b"app/a"), "value": b64(b"2")})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_error(&r, 403, 7, "etcdserver: permission denied");
    // A forged token: Unauthenticated → 401, code 16.
    let r = post_raw(
        a,
        "/v3/kv/range",
        &[("Authorization", "garbage")],
        json!({"key": b64(b"app/a")}).to_string().as_bytes(),
    )
    .await;
    assert_error(&r, 401, 16, "etcdserver: invalid auth token");

    // Watch: without a token the watch is created and cancelled with etcd's reason; with one
    // it streams.
    let mut w = stream(
        a,
        "/v3/watch",
        &[],
        &json!({"create_request": {"key": b64(b"app/a")}}),
    )
    .await;
    let m = w.next().await.expect("a message");
    assert_eq!(m["result"]["canceled"], json!(true), "{m}");
    assert_eq!(
        m["result"]["cancel_reason"],
        json!("etcdserver: user name is empty")
    );
    let mut w = stream(
        a,
        "/v3/watch",
        &with,
        &json!({"create_request": {"key": b64(b"app/a")}}),
    )
    .await;
    let m = w.next().await.expect("created");
    assert_eq!(m["result"]["created"], json!(true), "{m}");
    assert!(m["result"].get("canceled").is_none(), "{m}");
    let root = ok(
        a,
        "/v3/auth/authenticate",
        &json!({"name": "root", "password": "root-secret-1"}),
    )
    .await;
    let root_token = root["token"].as_str().expect("root token").to_string();
    let r = post_raw(
        a,
        "/v3/kv/put",
        &[("Authorization", root_token.as_str())],
        json!({"key": b64(b"app/a"), "value": b64(b"3")})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let e = w.next().await.expect("event");
    assert_eq!(unb64(&e["result"]["events"][0]["kv"]["value"]), b"3");

    server.shutdown().await;
}
