//! What every test needs: a server (in process, or the binary as a child process so it can be
//! killed with SIGKILL), a [`Cluster`] of such processes forming one Raft group (kill, restart,
//! pause/resume, who leads), clients for them, `etcdctl`, and bounded waiting.
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
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::etcdserverpb::watch_client::WatchClient;
use proto::etcdserverpb::{PutRequest, RangeRequest, StatusRequest};
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
        Self::launch(data_dir, log_dir, false, &[]).await
    }

    /// Like [`Process::start`], but configured only through `ETCD_*` environment variables.
    pub async fn start_from_env(data_dir: &Path, log_dir: &Path) -> Process {
        Self::launch(data_dir, log_dir, true, &[]).await
    }

    /// Like [`Process::start`], with extra environment variables.
    pub async fn start_with_env(data_dir: &Path, log_dir: &Path, env: &[(&str, &str)]) -> Process {
        Self::launch(data_dir, log_dir, false, env).await
    }

    async fn launch(
        data_dir: &Path,
        log_dir: &Path,
        from_env: bool,
        env: &[(&str, &str)],
    ) -> Process {
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
                .envs(env.iter().copied())
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
                match tokio::time::timeout(Duration::from_secs(2), kv.range(req)).await {
                    Ok(Ok(_)) => return true,
                    // With auth enabled an anonymous Range is refused, but answered: serving.
                    Ok(Err(e)) if e.message() == "etcdserver: user name is empty" => return true,
                    _ => {}
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

    /// `127.0.0.1:PORT`, the form `etcdctl --endpoints` takes.
    pub fn endpoint(&self) -> String {
        self.client_addr.to_string()
    }

    /// Waits until the process exits by itself (reaping it); panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the coordinator did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

// ---------------------------------------------------------------------------------------------
// A cluster of coordinator processes
// ---------------------------------------------------------------------------------------------

/// Cluster tests measure elections against wall-clock bounds on a 2-core machine, so they run
/// one at a time: two clusters of three debug processes starving each other would measure the
/// machine, not the protocol. A [`Cluster`] holds this lock for its whole life.
pub static CLUSTER_SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The token every test cluster uses (member ids derive from it and the peer URL).
const CLUSTER_TOKEN: &str = "etcd-cluster";

/// How long one Status call may take before the member counts as unreachable.
const STATUS_TIMEOUT: Duration = Duration::from_millis(700);

/// What `Maintenance.Status` says about one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub member_id: u64,
    /// The leader this member knows of (0: none).
    pub leader: u64,
    pub term: u64,
    pub raft_index: u64,
    pub applied_index: u64,
    /// Store revision.
    pub revision: i64,
    pub is_learner: bool,
}

impl MemberStatus {
    /// Whether this member says it is the leader.
    pub fn leads(&self) -> bool {
        self.leader != 0 && self.leader == self.member_id
    }
}

/// One member of a [`Cluster`]: its fixed ports and directories, and its process when running.
struct ClusterMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    /// Flags fixed when the member was created (`--initial-cluster`, `--initial-cluster-state`).
    args: Vec<String>,
    child: Option<std::process::Child>,
    paused: bool,
    /// False once removed from the membership (it no longer counts towards a majority).
    in_cluster: bool,
    /// Times started (log sections are numbered by it).
    starts: usize,
}

impl ClusterMember {
    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

/// Several `coordinator` processes forming one Raft cluster on loopback, each with its own
/// ports, data directory and log file. Members are numbered from 0 in the order created; a
/// killed member keeps its number, ports and data and can be restarted. Every process is killed
/// (SIGKILL) when the cluster is dropped, also when a test panics; then the tail of each
/// member's log is printed, so a failing test shows what the servers did.
pub struct Cluster {
    dir: tempfile::TempDir,
    members: Vec<ClusterMember>,
    /// Flags given to every member (e.g. `--snapshot-count 100`).
    extra: Vec<String>,
    serial: Option<tokio::sync::MutexGuard<'static, ()>>,
}

impl Cluster {
    /// Starts `n` members with default flags and waits until they serve and agree on a leader.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, &[]).await
    }

    /// Starts `n` members, each with `extra` flags as well, and waits until they serve and agree
    /// on a leader. Retries with fresh ports if a process exits during start-up (a port taken
    /// between choosing and binding it).
    pub async fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let serial = CLUSTER_SERIAL.lock().await;
        let mut serial = Some(serial);
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let mut cluster = Cluster {
                dir: tempfile::tempdir().expect("temp dir"),
                members: Vec::new(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                serial: serial.take(),
            };
            for i in 0..n {
                cluster.new_member(&format!("n{}", i + 1));
            }
            for i in 0..n {
                cluster.set_initial_flags(i, "new");
            }
            for i in 0..n {
                cluster.spawn(i);
            }
            match cluster.wait_all_serving().await {
                Ok(()) => {
                    cluster.wait_leader(START_TIMEOUT).await;
                    return cluster;
                }
                Err(e) => {
                    last_error = e;
                    cluster.kill_all();
                    // Keep the lock for the next attempt rather than letting another test in.
                    serial = cluster.serial.take();
                }
            }
        }
        panic!("the cluster did not start after 3 attempts:\n{last_error}");
    }

    /// Like [`Cluster::start_with`], but `prepare(name, data_dir, initial_cluster, peer_url,
    /// token)` runs for each member before it is first started (e.g. to restore its data
    /// directory from a snapshot with the cluster's own flags).
    pub async fn start_prepared(
        n: usize,
        extra: &[&str],
        mut prepare: impl FnMut(&str, &Path, &str, &str, &str),
    ) -> Cluster {
        let serial = CLUSTER_SERIAL.lock().await;
        let mut serial = Some(serial);
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let mut cluster = Cluster {
                dir: tempfile::tempdir().expect("temp dir"),
                members: Vec::new(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                serial: serial.take(),
            };
            for i in 0..n {
                cluster.new_member(&format!("n{}", i + 1));
            }
            let initial = cluster.initial_cluster();
            for i in 0..n {
                cluster.set_initial_flags(i, "new");
                let m = &cluster.members[i];
                prepare(&m.name, &m.data_dir, &initial, &m.peer_url(), CLUSTER_TOKEN);
            }
            for i in 0..n {
                cluster.spawn(i);
            }
            match cluster.wait_all_serving().await {
                Ok(()) => {
                    cluster.wait_leader(START_TIMEOUT).await;
                    return cluster;
                }
                Err(e) => {
                    last_error = e;
                    cluster.kill_all();
                    serial = cluster.serial.take();
                }
            }
        }
        panic!("the cluster did not start after 3 attempts:\n{last_error}");
    }

    /// Creates the record of a member (ports, directories) without starting it or giving it its
    /// `--initial-*` flags.
    fn new_member(&mut self, name: &str) -> usize {
        let base = self.dir.path().join(name);
        std::fs::create_dir_all(&base).expect("member dir");
        self.members.push(ClusterMember {
            name: name.to_string(),
            client_port: free_port(),
            peer_port: free_port(),
            metrics_port: free_port(),
            data_dir: base.join("data"),
            log: self.dir.path().join(format!("{name}.log")),
            args: Vec::new(),
            child: None,
            paused: false,
            in_cluster: true,
            starts: 0,
        });
        self.members.len() - 1
    }

    /// `name=peer-url,...` of every member that belongs to the cluster.
    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.in_cluster)
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn set_initial_flags(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        self.members[i].args = vec![
            "--initial-cluster".into(),
            initial,
            "--initial-cluster-state".into(),
            state.into(),
        ];
    }

    /// Spawns member `i`'s process (it must not be running); output goes to its log file.
    fn spawn(&mut self, i: usize) {
        let extra = self.extra.clone();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {i} is already running");
        m.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open member log");
        use std::io::Write as _;
        let _ = writeln!(log, "===== {} start {} =====", m.name, m.starts);
        let client = m.client_url();
        let peer = m.peer_url();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", m.metrics_port),
            ])
            .args(["--initial-cluster-token", CLUSTER_TOKEN])
            // The members share the test machine's CPUs, as the compose stack's do: one
            // request thread each (Tokio's single-threaded scheduler), as compose runs them.
            .args(["--worker-threads", "1"])
            .args(&m.args)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log)
            .spawn()
            .expect("spawn the coordinator binary");
        m.child = Some(child);
        m.paused = false;
    }

    /// Waits until every running member answers a serializable Range (no leader needed).
    async fn wait_all_serving(&mut self) -> Result<(), String> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_some() {
                self.wait_serving(i).await?;
            }
        }
        Ok(())
    }

    /// Waits until member `i` answers a serializable Range; `Err` (with its log) if it exits.
    async fn wait_serving(&mut self, i: usize) -> Result<(), String> {
        let url = self.members[i].client_url();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = self.members[i]
                .child
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited {
                self.members[i].child = None;
                return Err(format!(
                    "member {i} exited during start-up; log:\n{}",
                    self.log(i)
                ));
            }
            if let Ok(Ok(mut kv)) =
                tokio::time::timeout(Duration::from_secs(2), KvClient::connect(url.clone())).await
            {
                let req = RangeRequest {
                    key: b"health".to_vec(),
                    serializable: true,
                    ..Default::default()
                };
                match tokio::time::timeout(Duration::from_secs(2), kv.range(req)).await {
                    Ok(Ok(_)) => return Ok(()),
                    // With auth enabled an anonymous Range is refused, but answered: serving.
                    Ok(Err(e)) if e.message() == "etcdserver: user name is empty" => {
                        return Ok(());
                    }
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "member {i} did not serve within {START_TIMEOUT:?}; log:\n{}",
                    self.log(i)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Member `i`'s name (`n1`, `n2`, …).
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Member `i`'s id as it appears in response headers and member lists.
    pub fn member_id(&self, i: usize) -> u64 {
        coordinator::rpc::member_id_for(&self.members[i].peer_url(), CLUSTER_TOKEN)
    }

    /// The index of the member with id `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        (0..self.members.len()).find(|&i| self.member_id(i) == id)
    }

    /// `http://127.0.0.1:PORT` of member `i`'s client port.
    pub fn url(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// `127.0.0.1:PORT`, the form `etcdctl --endpoints` takes.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Member `i`'s admin (metrics) address.
    pub fn metrics_addr(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.members[i].metrics_port))
    }

    /// Member `i`'s peer URL.
    pub fn peer_url(&self, i: usize) -> String {
        self.members[i].peer_url()
    }

    /// `etcdctl` against member `i` only.
    pub fn etcdctl(&self, i: usize) -> Etcdctl {
        Etcdctl::new(self.endpoint(i))
    }

    /// Whether member `i` runs and is not paused.
    pub fn is_up(&self, i: usize) -> bool {
        self.members[i].child.is_some() && !self.members[i].paused
    }

    /// Indices of members that run, are not paused and belong to the cluster.
    pub fn up(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.is_up(i) && self.members[i].in_cluster)
            .collect()
    }

    /// A lazily connecting channel to member `i` (usable while it is down; requests fail fast
    /// until it is back, then reconnect).
    pub fn channel(&self, i: usize) -> Channel {
        Channel::from_shared(self.url(i))
            .expect("valid url")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy()
    }

    pub fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i))
    }

    pub fn lease(&self, i: usize) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel(i))
    }

    pub fn watch(&self, i: usize) -> WatchClient<Channel> {
        WatchClient::new(self.channel(i)).max_decoding_message_size(64 << 20)
    }

    pub fn maintenance(&self, i: usize) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(self.channel(i))
    }

    /// SIGKILL member `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        let mut child = m
            .child
            .take()
            .unwrap_or_else(|| panic!("member {i} is not running"));
        child.kill().expect("SIGKILL a member");
        child.wait().expect("reap a member");
        m.paused = false;
    }

    /// Starts member `i` again on its data directory and ports; waits until it serves (a
    /// serializable Range; it may still be catching up).
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        if let Err(e) = self.wait_serving(i).await {
            panic!("restart of member {i}: {e}");
        }
    }

    /// Whether member `i`'s process has exited by itself (it is reaped then, and counts as down).
    pub fn has_exited(&mut self, i: usize) -> bool {
        let m = &mut self.members[i];
        let exited = m
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
        if exited {
            m.child = None;
        }
        exited
    }

    /// SIGSTOP member `i`: it keeps its sockets but answers nothing (a stand-in for a partition).
    pub fn pause(&mut self, i: usize) {
        self.signal(i, "STOP");
        self.members[i].paused = true;
    }

    /// SIGCONT member `i`.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, "CONT");
        self.members[i].paused = false;
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.members[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("member {i} is not running"))
            .id()
            .to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Adds the record of a member that will join an existing cluster (`--initial-cluster-state
    /// existing`, `--initial-cluster` naming every member plus itself); start it with
    /// [`Cluster::restart`] after `member add`.
    pub fn prepare_joining_member(&mut self) -> usize {
        let name = format!("n{}", self.members.len() + 1);
        let i = self.new_member(&name);
        self.set_initial_flags(i, "existing");
        i
    }

    /// Marks member `i` as removed from the membership (it no longer counts for a majority).
    pub fn mark_removed(&mut self, i: usize) {
        self.members[i].in_cluster = false;
    }

    /// Status of member `i`, or `None` if it is down, paused or does not answer in time.
    pub async fn status(&self, i: usize) -> Option<MemberStatus> {
        if !self.is_up(i) {
            return None;
        }
        let mut m = self.maintenance(i);
        let resp = tokio::time::timeout(STATUS_TIMEOUT, m.status(StatusRequest {}))
            .await
            .ok()?
            .ok()?
            .into_inner();
        let header = resp.header.unwrap_or_default();
        Some(MemberStatus {
            member_id: header.member_id,
            leader: resp.leader,
            term: resp.raft_term,
            raft_index: resp.raft_index,
            applied_index: resp.raft_applied_index,
            revision: header.revision,
            is_learner: resp.is_learner,
        })
    }

    /// Status of every member (concurrently), by index.
    pub async fn statuses(&self) -> Vec<Option<MemberStatus>> {
        futures::future::join_all((0..self.members.len()).map(|i| self.status(i))).await
    }

    /// The leader, if there is one now: a member that says it leads, at the highest term any
    /// member claims leadership in, that a majority of the cluster's members name as leader
    /// (so a deposed leader that has not noticed yet is not taken for the leader).
    pub async fn leader(&self) -> Option<usize> {
        let statuses = self.statuses().await;
        Self::leader_of(&statuses, self.majority())
    }

    fn majority(&self) -> usize {
        self.members.iter().filter(|m| m.in_cluster).count() / 2 + 1
    }

    /// [`Cluster::leader`] from statuses already fetched.
    pub fn leader_of(statuses: &[Option<MemberStatus>], majority: usize) -> Option<usize> {
        let (i, s) = statuses
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().filter(|s| s.leads()).map(|s| (i, s)))
            .max_by_key(|(_, s)| s.term)?;
        let agree = statuses
            .iter()
            .flatten()
            .filter(|o| o.leader == s.member_id && o.term == s.term)
            .count();
        (agree >= majority).then_some(i)
    }

    /// Waits until [`Cluster::leader`] finds one; returns its index.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        wait_for(timeout, "a leader a majority agrees on", || self.leader()).await
    }

    /// The term of the current leader, per its own status.
    pub async fn term(&self, i: usize) -> u64 {
        self.status(i)
            .await
            .unwrap_or_else(|| panic!("member {i} answers Status"))
            .term
    }

    /// Every log line member `i` wrote, across its starts.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    /// Member `i`'s log since its latest start.
    pub fn log_since_last_start(&self, i: usize) -> String {
        let log = self.log(i);
        let marker = format!(
            "===== {} start {} =====",
            self.members[i].name, self.members[i].starts
        );
        match log.find(&marker) {
            Some(at) => log[at..].to_string(),
            None => log,
        }
    }

    fn kill_all(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            for m in &self.members {
                let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "----- last {} log lines of {} (client {}, peer {}) -----\n{}",
                    tail.len(),
                    m.name,
                    m.client_port,
                    m.peer_port,
                    tail.join("\n")
                );
            }
            if std::env::var_os("CLUSTER_KEEP_DIR").is_some() {
                let path =
                    std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tmp")).keep();
                eprintln!("cluster directory kept at {}", path.display());
            }
        }
    }
}
