//! What every test needs: a server (in process, or the binary as a child process so it can be
//! killed with SIGKILL), clients for it, `etcdctl`, and bounded waiting.
//!
//! Nothing here sleeps for a fixed time to let something happen: waits poll a condition until a
//! deadline and fail with a message naming what was awaited.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::watch_client::WatchClient;
use proto::etcdserverpb::{PutRequest, RangeRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};
use tonic::transport::Channel;

/// How long a server may take to answer its first request.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound on any single `etcdctl` invocation unless a test says otherwise.
pub const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `condition` every 20 ms until it returns `Some`, and returns that value; panics naming
/// `what` if `timeout` passes first.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_for`] for a condition with no value.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, what, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Awaits `fut`, panicking naming `what` if it takes longer than `timeout`.
pub async fn within<T>(timeout: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {timeout:?}: {what}"),
    }
}

/// A port that was free a moment ago (the listener is dropped before returning, so another
/// process may take it; callers that start a process retry on failure).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A server running inside the test process, on port 0, with a temporary data directory.
pub struct Server {
    running: Option<coordinator::Running>,
    client_addr: SocketAddr,
    metrics_addr: SocketAddr,
    data_dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server with default limits.
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra command-line flags (e.g. `["--max-txn-ops", "8"]`).
    pub async fn start_with(extra: &[&str]) -> Server {
        Self::start_in(tempfile::tempdir().expect("temp dir"), extra).await
    }

    /// Stops this server gracefully and starts a new one on the same data directory.
    pub async fn restart(mut self) -> Server {
        if let Some(running) = self.running.take() {
            within(
                Duration::from_secs(20),
                "Running::shutdown",
                running.shutdown(),
            )
            .await;
        }
        let data_dir =
            std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("temp dir"));
        Self::start_in(data_dir, &[]).await
    }

    /// Starts a server whose data lives in `data_dir/data`.
    async fn start_in(data_dir: tempfile::TempDir, extra: &[&str]) -> Server {
        let dir = data_dir.path().join("data");
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        if !extra.contains(&"--listen-client-urls") {
            args.extend(["--listen-client-urls".into(), "http://127.0.0.1:0".into()]);
        }
        args.extend(["--listen-metrics-urls".into(), "http://127.0.0.1:0".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = coordinator::Config::parse_from(args);
        let running = within(
            START_TIMEOUT,
            "coordinator::start",
            coordinator::start(config),
        )
        .await
        .unwrap_or_else(|e| panic!("coordinator::start on {}: {e:#}", dir.display()));
        let server = Server {
            client_addr: running.client_addr(),
            metrics_addr: running.metrics_addr(),
            running: Some(running),
            data_dir,
        };
        wait_serving(server.client_addr).await;
        server
    }

    /// `127.0.0.1:PORT`, the form `etcdctl --endpoints` takes.
    pub fn endpoint(&self) -> String {
        self.client_addr.to_string()
    }

    /// `http://127.0.0.1:PORT`, the form gRPC clients take.
    pub fn url(&self) -> String {
        format!("http://{}", self.client_addr)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// A directory that lives as long as the server, for files a test writes.
    pub fn scratch(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn etcdctl(&self) -> Etcdctl {
        Etcdctl::new(self.endpoint())
    }

    /// The third-party `etcd-client` crate, as applications use it.
    pub async fn client(&self) -> etcd_client::Client {
        within(
            Duration::from_secs(10),
            "etcd_client::Client::connect",
            etcd_client::Client::connect([self.url()], None),
        )
        .await
        .expect("etcd_client connect")
    }

    /// Our generated KV client, on its own connection.
    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::new(channel(&self.url()).await)
    }

    /// Our generated Watch client, on its own connection.
    pub async fn watch(&self) -> WatchClient<Channel> {
        WatchClient::new(channel(&self.url()).await)
    }

    /// Our generated Lease client, on its own connection.
    pub async fn lease(&self) -> LeaseClient<Channel> {
        LeaseClient::new(channel(&self.url()).await)
    }

    /// Stops the server gracefully (within 20 s).
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            within(
                Duration::from_secs(20),
                "Running::shutdown",
                running.shutdown(),
            )
            .await;
        }
    }
}

/// A connected gRPC channel with a connect timeout.
pub async fn channel(url: &str) -> Channel {
    let endpoint = Channel::from_shared(url.to_string())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(5));
    within(Duration::from_secs(10), "gRPC connect", endpoint.connect())
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Waits until a server at `addr` answers a serializable Range.
async fn wait_serving(addr: SocketAddr) {
    let url = format!("http://{addr}");
    wait_until(
        START_TIMEOUT,
        &format!("a server at {addr} to answer Range"),
        || {
            let url = url.clone();
            async move {
                let Ok(Ok(mut kv)) =
                    tokio::time::timeout(Duration::from_secs(2), KvClient::connect(url)).await
                else {
                    return false;
                };
                let req = RangeRequest {
                    key: b"health".to_vec(),
                    ..Default::default()
                };
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), kv.range(req)).await,
                    Ok(Ok(_))
                )
            }
        },
    )
    .await
}

/// Puts `key = value` through our generated client and returns the response revision.
pub async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> i64 {
    let req = PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    };
    let resp = within(Duration::from_secs(10), "Put", kv.put(req))
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
        .into_inner();
    resp.header.expect("PutResponse has a header").revision
}

/// Proves the server still serves: a put of a fresh key and a get of it.
pub async fn assert_still_serving(kv: &mut KvClient<Channel>) {
    let key = format!("still-serving/{}", rand_suffix());
    let rev = put(kv, &key, "yes").await;
    let resp = within(
        Duration::from_secs(10),
        "Range after a rejected request",
        kv.range(RangeRequest {
            key: key.clone().into(),
            ..Default::default()
        }),
    )
    .await
    .expect("range after a rejected request")
    .into_inner();
    assert_eq!(resp.kvs.len(), 1, "the key just put is readable");
    assert_eq!(resp.kvs[0].value, b"yes");
    assert_eq!(resp.kvs[0].mod_revision, rev);
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos}-{}", N.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// etcdctl
// ---------------------------------------------------------------------------------------------

/// Runs the installed `etcdctl` (v3 API) against one endpoint.
#[derive(Clone)]
pub struct Etcdctl {
    endpoint: String,
}

/// What an `etcdctl` run printed and how it exited.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with both streams if the command failed; returns stdout.
    pub fn ok(self, what: &str) -> String {
        assert!(
            self.status.success(),
            "`etcdctl {what}` failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
    }
}

impl Etcdctl {
    pub fn new(endpoint: String) -> Etcdctl {
        Etcdctl { endpoint }
    }

    /// A `tokio` command for `etcdctl ARGS` with the endpoint, timeouts and API version set.
    /// The process is killed if the handle is dropped.
    pub fn command(&self, args: &[&str]) -> Command {
        require_etcdctl();
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .env_remove("ETCDCTL_ENDPOINTS")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg("--dial-timeout=5s")
            .arg("--command-timeout=20s")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `etcdctl ARGS` to completion (bounded by [`ETCDCTL_TIMEOUT`]).
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None, ETCDCTL_TIMEOUT).await
    }

    /// Runs `etcdctl ARGS` and panics unless it succeeds; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        self.run(args).await.ok(&args.join(" "))
    }

    /// Runs `etcdctl ARGS -w json` successfully and parses its stdout.
    pub async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-w", "json"]);
        let out = self.ok(&all).await;
        serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!(
                "`etcdctl {}` printed invalid JSON ({e}):\n{out}",
                all.join(" ")
            )
        })
    }

    /// Runs `etcdctl ARGS`, writing `stdin` to it, bounded by `timeout`.
    pub async fn run_with_stdin(
        &self,
        args: &[&str],
        stdin: Option<&str>,
        timeout: Duration,
    ) -> Output {
        let mut cmd = self.command(args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("spawn etcdctl");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes())
                .await
                .expect("write etcdctl stdin");
            drop(pipe);
        }
        let what = format!("etcdctl {}", args.join(" "));
        let out = within(timeout, &what, child.wait_with_output())
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts a long-running `etcdctl ARGS` (watch, elect, lock) whose stdout is read line by line.
    pub fn spawn(&self, args: &[&str]) -> Spawned {
        let mut child = self.command(args).spawn().expect("spawn etcdctl");
        let stdout = child.stdout.take().expect("piped stdout");
        Spawned {
            child,
            lines: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        }
    }
}

/// A long-running `etcdctl`, killed when dropped.
pub struct Spawned {
    pub child: tokio::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every line read so far, for failure messages.
    pub seen: Vec<String>,
}

impl Spawned {
    /// The next stdout line, or `None` at end of output; panics after `timeout`.
    pub async fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let seen = self.seen.join("\n");
        let line = match tokio::time::timeout(timeout, self.lines.next_line()).await {
            Ok(line) => line.expect("read etcdctl stdout"),
            Err(_) => panic!("timed out after {timeout:?} waiting for output; so far:\n{seen}"),
        };
        if let Some(l) = &line {
            self.seen.push(l.clone());
        }
        line
    }

    /// Reads exactly `n` more lines, all within `timeout`.
    pub async fn lines(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left).await {
                Some(line) => out.push(line),
                None => {
                    let stderr = self.stderr().await;
                    panic!(
                        "etcdctl exited after {} of {n} lines:\n{}\nstderr:\n{stderr}",
                        out.len(),
                        self.seen.join("\n")
                    )
                }
            }
        }
        out
    }

    /// Asserts that no line arrives within `quiet`.
    pub async fn assert_silent(&mut self, quiet: Duration) {
        if let Ok(line) = tokio::time::timeout(quiet, self.lines.next_line()).await {
            panic!(
                "expected no output, got {line:?}; before it:\n{}",
                self.seen.join("\n")
            );
        }
    }

    /// Sends a signal (e.g. `"INT"`) to the process.
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("process still running").to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        within(timeout, "etcdctl to exit", self.child.wait())
            .await
            .expect("wait for etcdctl")
    }

    /// Whatever the process wrote to stderr so far (only after it exited or was killed).
    pub async fn stderr(&mut self) -> String {
        let Some(mut err) = self.child.stderr.take() else {
            return String::new();
        };
        let mut buf = String::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read_to_string(&mut err, &mut buf),
        )
        .await;
        buf
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Panics with instructions if `etcdctl` is not installed. Checked once per process.
pub fn require_etcdctl() {
    static CHECK: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = CHECK.get_or_init(|| {
        match std::process::Command::new("etcdctl")
            .arg("version")
            .env("ETCDCTL_API", "3")
            .output()
        {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "`etcdctl version` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => Err(format!("cannot run etcdctl: {e}")),
        }
    });
    if let Err(e) = result {
        panic!(
            "{e}\nThese tests need etcdctl 3.4 on PATH (Debian package `etcd-client`); \
             `.ci/run` installs it."
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The binary as a child process
// ---------------------------------------------------------------------------------------------

/// The `coordinator` binary running as a child process on a given data directory, so a test can
/// kill it with SIGKILL and start it again on the same directory.
pub struct Process {
    child: std::process::Child,
    client_addr: SocketAddr,
    log: PathBuf,
}

impl Process {
    /// Starts the binary on `data_dir` with free ports, retrying with new ports if the process
    /// exits (e.g. because a port was taken in the meantime). Waits until it answers Range.
    pub async fn start(data_dir: &Path, log_dir: &Path) -> Process {
        Self::launch(data_dir, log_dir, false).await
    }

    /// Like [`Process::start`], but configured only through `ETCD_*` environment variables.
    pub async fn start_from_env(data_dir: &Path, log_dir: &Path) -> Process {
        Self::launch(data_dir, log_dir, true).await
    }

    async fn launch(data_dir: &Path, log_dir: &Path, from_env: bool) -> Process {
        let mut last_log = String::new();
        for attempt in 0..4 {
            let port = free_port();
            let metrics = free_port();
            let client_url = format!("http://127.0.0.1:{port}");
            let log = log_dir.join(format!("coordinator-{port}-{attempt}.log"));
            let log_file = std::fs::File::create(&log).expect("create log file");
            let metrics_url = format!("http://127.0.0.1:{metrics}");
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"));
            if from_env {
                cmd.env("ETCD_DATA_DIR", data_dir)
                    .env("ETCD_LISTEN_CLIENT_URLS", &client_url)
                    .env("ETCD_ADVERTISE_CLIENT_URLS", &client_url)
                    .env("ETCD_LISTEN_METRICS_URLS", &metrics_url);
            } else {
                cmd.arg("--data-dir")
                    .arg(data_dir)
                    .args(["--listen-client-urls", &client_url])
                    .args(["--advertise-client-urls", &client_url])
                    .args(["--listen-metrics-urls", &metrics_url]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("clone log file"))
                .stderr(log_file)
                .spawn()
                .expect("spawn the coordinator binary");
            let mut process = Process {
                child,
                client_addr: ([127, 0, 0, 1], port).into(),
                log,
            };
            if process.wait_serving_or_exit().await {
                return process;
            }
            last_log = std::fs::read_to_string(&process.log).unwrap_or_default();
        }
        panic!("the coordinator binary did not start after 4 attempts; last log:\n{last_log}");
    }

    /// True once the process serves; false if it exited first. Panics after [`START_TIMEOUT`].
    async fn wait_serving_or_exit(&mut self) -> bool {
        let url = format!("http://{}", self.client_addr);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(Ok(mut kv)) =
                tokio::time::timeout(Duration::from_secs(2), KvClient::connect(url.clone())).await
            {
                let req = RangeRequest {
                    key: b"health".to_vec(),
                    ..Default::default()
                };
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), kv.range(req)).await
                {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "the coordinator binary did not serve within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client_addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL the coordinator");
        self.child.wait().expect("reap the coordinator");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
