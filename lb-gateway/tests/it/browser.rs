//! Headless Chromium driven over WebDriver, for the dashboard tests.
//!
//! `chromedriver` (Debian's `chromium-driver`) runs as a child process on a free loopback port
//! and is killed by its PID when the [`Browser`] is dropped, also when a test panics. The
//! WebDriver protocol is plain JSON over HTTP; the few commands needed here (new session,
//! navigate, execute script, delete session) are written out below rather than pulling in a
//! WebDriver crate and its dependencies.
//!
//! Without Chromium or chromedriver the test fails, saying to run `scripts/install-deps.sh`:
//! a dashboard test that passes without a browser would prove nothing.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// How long chromedriver and one WebDriver command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Kills chromedriver and the Chromium it started when dropped: chromedriver runs in a process
/// group of its own (its PID is the group's ID), and the whole group gets SIGKILL, so a test
/// that panics leaves no browser behind.
struct Driver {
    child: Child,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let killed = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !killed {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One Chromium session.
pub struct Browser {
    base: String,
    session: String,
    client: Client<HttpConnector, Full<Bytes>>,
    _profile: tempfile::TempDir,
    // Dropped last: the session is deleted (or the driver killed) before the profile goes.
    _driver: Driver,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Browser {
        let missing = "the dashboard test needs Chromium and chromedriver (Debian packages \
                       `chromium` and `chromium-driver`): run scripts/install-deps.sh";
        let driver_bin = find(&["chromedriver"]).unwrap_or_else(|| panic!("{missing}"));
        let chromium = find(&["chromium", "chromium-browser", "google-chrome"])
            .unwrap_or_else(|| panic!("{missing}"));
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let child = Command::new(&driver_bin)
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {missing}", driver_bin.display()));
        let driver = Driver { child };
        let base = format!("http://127.0.0.1:{port}");
        let client = Client::builder(TokioExecutor::new()).build_http();
        let profile = tempfile::tempdir().expect("temp dir");

        // Wait for the driver to listen.
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            if let Ok(status) = call(&client, "GET", &format!("{base}/status"), None).await
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium.display().to_string(),
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--no-first-run",
                            "--window-size=1400,1000",
                            format!("--user-data-dir={}", profile.path().display()),
                        ],
                    },
                },
            },
        });
        let answer = call(&client, "POST", &format!("{base}/session"), Some(caps))
            .await
            .unwrap_or_else(|e| panic!("chromedriver could not start Chromium: {e}"));
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session in {answer}"))
            .to_owned();
        Browser {
            base,
            session,
            client,
            _profile: profile,
            _driver: driver,
        }
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        match call(&self.client, method, &url, body).await {
            Ok(v) => v["value"].clone(),
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    /// Opens `url` in the session's window.
    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Polls `script` until `check` accepts its result, failing after `timeout` with the
    /// last result.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        script: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(script).await;
            if check(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                let errors = self
                    .eval("return Array.from(document.querySelectorAll('.error')).filter(e => !e.hidden).map(e => e.textContent)")
                    .await;
                panic!("timed out waiting for {what}; last value {v}; errors shown: {errors}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Ends the session (Chromium exits); the driver is killed on drop.
    pub async fn close(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = call(&self.client, "DELETE", &url, None).await;
    }
}

async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let answer = client.request(request).await.map_err(|e| e.to_string())?;
        let status = answer.status();
        let bytes = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(value)
        } else {
            Err(format!("{status}: {value}"))
        }
    };
    tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {COMMAND_TIMEOUT:?}")))
}

/// The page's URL on `admin`.
pub fn dashboard_url(admin: SocketAddr) -> String {
    format!("http://{admin}/ui/")
}
