//! What the authorisation tests of registry-svc and config-svc share (config-svc includes this
//! file with `#[path]`): the policy, tokens and JWT key they run with, requests carrying a
//! bearer token over gRPC and raw HTTP/1.1, signed JWTs, the printed matrix, and a log capture.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Request;

/// Bound on one exchange.
const T: Duration = Duration::from_secs(15);

/// A reader and a writer on the prefix `team-`, root on everything, a subject with a valid
/// token but no roles, and a JWT subject who writes `team-*`.
pub const POLICY: &str = r#"
[roles]
reader = { "team-*" = "read" }
writer = { "team-*" = "write" }
root = { "*" = "admin" }

[subjects]
nobody = []
alice = ["reader"]
bob = ["writer"]
ops = ["root"]
carol = ["writer"]
"#;

/// Static tokens, `TOKEN SUBJECT`.
pub const TOKENS: &str =
    "tok-nobody-0001 nobody\ntok-alice-0001 alice\ntok-bob-0001 bob\ntok-ops-0001 ops\n";

/// The HS256 secret the services trust (the file ends in a newline, which is not part of it).
pub const JWT_KEY_FILE: &[u8] = b"authz-test-hs256-key-of-at-least-32-bytes\n";

/// The roles of the matrix: (name, static token).
pub const ROLES: [(&str, &str); 4] = [
    ("none", "tok-nobody-0001"),
    ("read team-*", "tok-alice-0001"),
    ("write team-*", "tok-bob-0001"),
    ("root", "tok-ops-0001"),
];

/// Root's token.
pub const ROOT: &str = "tok-ops-0001";

/// Whether role `role` (index into [`ROLES`]) may do what needs `level` (0 read, 1 write,
/// 2 admin; `None`: authentication only) in `team-*`.
pub fn expected(role: usize, level: Option<usize>) -> bool {
    match (role, level) {
        (_, None) => true,
        (0, _) => false,
        (1, Some(l)) => l == 0,
        (2, Some(l)) => l <= 1,
        _ => true,
    }
}

/// Writes the policy, tokens and key into `dir`; returns the flags that turn auth on.
pub fn auth_flags(dir: &Path) -> Vec<String> {
    let (policy, tokens, key) = (
        dir.join("policy.toml"),
        dir.join("tokens.txt"),
        dir.join("jwt.key"),
    );
    std::fs::write(&policy, POLICY).expect("policy");
    std::fs::write(&tokens, TOKENS).expect("tokens");
    std::fs::write(&key, JWT_KEY_FILE).expect("key");
    [
        "--auth-mode",
        "token,jwt",
        "--auth-policy-file",
        &policy.display().to_string(),
        "--auth-tokens-file",
        &tokens.display().to_string(),
        "--auth-jwt-key-file",
        &key.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A gRPC request carrying `Authorization: Bearer token`.
pub fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ASCII"),
    );
    req
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A JWT with `claims`, signed with `key` (HMAC).
pub fn jwt(claims: Value, key: &[u8], alg: Algorithm) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(key)).expect("sign")
}

/// A JWT the services accept, for `sub`, valid ten minutes.
pub fn good_jwt(sub: &str) -> String {
    jwt(
        serde_json::json!({"sub": sub, "exp": now() + 600}),
        JWT_KEY_FILE.trim_ascii_end(),
        Algorithm::HS256,
    )
}

/// Bad credentials, each with what the refusal must say: (case, `Authorization` header or
/// none, part of the message).
pub fn bad_credentials() -> Vec<(&'static str, Option<String>, &'static str)> {
    let (t, key) = (now(), JWT_KEY_FILE.trim_ascii_end());
    let bearer = |claims: Value, key: &[u8], alg| Some(format!("Bearer {}", jwt(claims, key, alg)));
    let valid = good_jwt("carol");
    // Root's claims under carol's signature.
    let other = jwt(
        serde_json::json!({"sub": "ops", "exp": t + 600}),
        b"x",
        Algorithm::HS256,
    );
    let forged = {
        let (head_payload, _) = other.rsplit_once('.').expect("a JWT");
        let (_, sig) = valid.rsplit_once('.').expect("a JWT");
        format!("Bearer {head_payload}.{sig}")
    };
    use serde_json::json;
    vec![
        ("no credentials", None, "authentication required"),
        (
            "unknown static token",
            Some("Bearer tok-unknown".into()),
            "not a valid JWT",
        ),
        (
            "not a bearer header",
            Some("Basic YWxpY2U6eA==".into()),
            "Bearer",
        ),
        (
            "expired JWT",
            bearer(
                json!({"sub": "carol", "exp": t - 120}),
                key,
                Algorithm::HS256,
            ),
            "expired",
        ),
        (
            "JWT not valid yet",
            bearer(
                json!({"sub": "carol", "exp": t + 600, "nbf": t + 300}),
                key,
                Algorithm::HS256,
            ),
            "not valid yet",
        ),
        (
            "JWT signed with another key",
            bearer(
                json!({"sub": "carol", "exp": t + 600}),
                b"another-key-another-key-another-key!",
                Algorithm::HS256,
            ),
            "signature",
        ),
        (
            "JWT with another algorithm",
            bearer(
                json!({"sub": "carol", "exp": t + 600}),
                key,
                Algorithm::HS384,
            ),
            "another algorithm",
        ),
        (
            "JWT without exp",
            bearer(json!({"sub": "carol"}), key, Algorithm::HS256),
            "lacks exp or sub",
        ),
        ("forged JWT (another payload)", Some(forged), "signature"),
    ]
}

/// Asserts a gRPC refusal is `UNAUTHENTICATED` and says `says`.
pub fn assert_unauthenticated<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    says: &str,
) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e:?}");
    assert!(e.message().contains(says), "{what}: {e:?}");
}

/// An HTTP/1.1 request with extra headers; returns the status, the body as JSON (Null if not
/// JSON) and the response head.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> (u16, Value, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        out
    };
    let raw = tokio::time::timeout(T, exchange)
        .await
        .expect("HTTP exchange in time");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, json, head.to_owned())
}

/// [`http`] with `Authorization: Bearer token`.
pub async fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: &str,
) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (status, json, _) = http(addr, method, path, body, &[("Authorization", &auth)]).await;
    (status, json)
}

/// Asserts a REST refusal is 401 with the JSON error body, says `says`, and asks for a bearer
/// token.
pub async fn assert_http_unauthenticated(
    addr: SocketAddr,
    path: &str,
    what: &str,
    header: Option<&str>,
    says: &str,
) {
    let headers: Vec<(&str, &str)> = header
        .map(|h| vec![("Authorization", h)])
        .unwrap_or_default();
    let (status, body, head) = http(addr, "GET", path, None, &headers).await;
    assert_eq!(status, 401, "{what}: {body}");
    assert_eq!(body["error"]["code"], "unauthenticated", "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{what}: {body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{what}: {head}"
    );
}

/// The status of a request whose answer may be an endless stream (a watch): reads the head
/// only when it is 200, else the whole answer, whose body it returns as JSON.
pub async fn http_status(addr: SocketAddr, path: &str, token: &str) -> (u16, Value) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        if !out.starts_with(b"HTTP/1.1 200 ") {
            s.read_to_end(&mut out).await.expect("read");
        }
        out
    };
    let raw = tokio::time::timeout(T, exchange)
        .await
        .expect("HTTP head in time");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A REST verdict: 200 allowed, 403 (with the JSON body) denied; anything else fails.
pub fn rest_verdict(what: &str, status: u16, body: &Value) -> bool {
    match status {
        200 => true,
        403 => {
            assert_eq!(body["error"]["code"], "permission_denied", "{what}: {body}");
            false
        }
        other => panic!("{what}: unexpected HTTP {other} {body}"),
    }
}

/// A gRPC verdict: `Ok` allowed, `PERMISSION_DENIED` denied; anything else fails.
pub fn grpc_verdict<T>(what: &str, r: Result<T, tonic::Status>) -> bool {
    match r {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::PermissionDenied => false,
        Err(s) => panic!("{what}: unexpected {s:?}"),
    }
}

/// One row of the matrix: face, operation, one verdict per role of [`ROLES`], and what the
/// policy says.
pub struct Row {
    pub face: &'static str,
    pub op: &'static str,
    pub got: Vec<bool>,
    pub want: Vec<bool>,
}

/// Prints the matrix as a table, then asserts every verdict is the policy's.
pub fn print_and_check(service: &str, rows: &[Row]) {
    let mut out = format!(
        "\n{service}: role x operation\n{:<5} {:<26}",
        "face", "operation"
    );
    for (role, _) in ROLES {
        let _ = write!(out, " {role:<13}");
    }
    let mut wrong = Vec::new();
    for row in rows {
        let _ = write!(out, "\n{:<5} {:<26}", row.face, row.op);
        for (i, allowed) in row.got.iter().enumerate() {
            let mark = if *allowed { "allow" } else { "DENY" };
            let _ = write!(out, " {mark:<13}");
            if row.want.get(i) != Some(allowed) {
                wrong.push(format!(
                    "{} {} as {}: allowed={allowed}",
                    row.face, row.op, ROLES[i].0
                ));
            }
        }
    }
    println!("{out}\n");
    assert!(
        wrong.is_empty(),
        "verdicts differing from the policy: {wrong:#?}{out}"
    );
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// What was written so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The warnings of this whole test process, captured by one global subscriber installed on
/// first use. Global rather than per thread: a thread-local subscriber misses events now and
/// then while other threads register the same callsites. Tests find their own lines by a
/// namespace no other test uses.
pub fn capture_logs() -> Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        logs
    })
    .clone()
}

/// Asserts the captured logs hold a denial naming `subject`, `action` and `namespace`, an
/// unauthenticated refusal, and none of `secrets`.
pub fn assert_denial_logged(
    logs: &Captured,
    subject: &str,
    action: &str,
    ns: &str,
    secrets: &[&str],
) {
    let text = logs.text();
    let denial = text
        .lines()
        .find(|l| l.contains("permission denied") && l.contains(&format!("namespace=\"{ns}\"")))
        .unwrap_or_else(|| panic!("no denial logged:\n{text}"));
    for part in [
        "WARN".to_owned(),
        format!("subject={subject}"),
        format!("action=\"{action}\""),
    ] {
        assert!(denial.contains(&part), "{part} missing from {denial}");
    }
    assert!(
        text.lines()
            .any(|l| l.contains("unauthenticated request refused")),
        "{text}"
    );
    for secret in secrets {
        assert!(!text.contains(secret), "a token was logged:\n{text}");
    }
}
