//! A coordinator in process that can be restarted on the same data dir and port, a TCP proxy in
//! front of it that can cut every connection, and bounded waiting. Nothing here sleeps to let
//! something happen: waits poll until a deadline.
//!
//! `registry-svc`'s tests include this file too (`#[path]`), so it depends only on what both
//! crates have as dev-dependencies.
//!
//! Why the proxy: `coordinator::Running::shutdown` waits for open streams (a watch, a lease
//! keep-alive) to end, and a client holding one open keeps it from returning. Clients therefore
//! connect through [`Coordinator::url`] (the proxy), and [`Coordinator::restart`] first cuts
//! every proxied connection and refuses new ones, as a crashed member would, then restarts the
//! coordinator on the same data dir and port, then lets connections through again.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a coordinator may take to start or stop.
pub const START: Duration = Duration::from_secs(20);

/// A coordinator running in this process, behind a [`Proxy`].
pub struct Coordinator {
    running: Option<coordinator::Running>,
    addr: SocketAddr,
    proxy: Proxy,
    dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts one on a fresh data dir and an ephemeral port.
    pub async fn start() -> Coordinator {
        let dir = tempfile::tempdir().expect("temp dir");
        let running = launch(dir.path(), "127.0.0.1:0").await;
        let addr = running.client_addr();
        Coordinator {
            proxy: Proxy::start(addr).await,
            addr,
            running: Some(running),
            dir,
        }
    }

    /// `http://127.0.0.1:PORT` of the proxy: what clients under test connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.proxy.addr)
    }

    /// `http://127.0.0.1:PORT` of the coordinator itself (not cut by the proxy).
    pub fn direct_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every client connection and stops the coordinator; clients see it as down.
    pub async fn stop(&mut self) {
        self.proxy.block();
        if let Some(running) = self.running.take() {
            within(START, "coordinator shutdown", running.shutdown()).await;
        }
    }

    /// Starts it again on the same data dir and port, and lets clients through again.
    pub async fn start_again(&mut self) {
        assert!(self.running.is_none(), "stop it first");
        let running = launch(self.dir.path(), &self.addr.to_string()).await;
        self.running = Some(running);
        self.proxy.unblock();
    }

    /// Stops and starts it again on the same data dir and port.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }
}

async fn launch(dir: &std::path::Path, addr: &str) -> coordinator::Running {
    let data = dir.join("data").display().to_string();
    let url = format!("http://{addr}");
    let config = coordinator::Config::parse_from([
        "coordinator",
        "--data-dir",
        &data,
        "--listen-client-urls",
        &url,
        "--listen-metrics-urls",
        "http://127.0.0.1:0",
    ]);
    // The port of a just-stopped server can take a moment to be free again.
    let deadline = Instant::now() + START;
    loop {
        match coordinator::start(config.clone()).await {
            Ok(running) => return running,
            Err(e) if Instant::now() < deadline => {
                eprintln!("coordinator start failed, retrying: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("coordinator::start: {e:#}"),
        }
    }
}

/// Awaits `fut`, panicking naming `what` after `timeout`.
pub async fn within<T>(timeout: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {timeout:?}: {what}"),
    }
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port nothing listens on (bound, then released).
pub fn dead_endpoint() -> String {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind");
    format!("http://{addr}")
}

/// A TCP proxy that forwards to one address and can cut every connection at once.
pub struct Proxy {
    addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    /// Cancelled to cut the connections of the current generation.
    cut: Arc<cut_slot::Slot>,
    stop: CancellationToken,
}

/// A replaceable cancellation token (without pulling in parking_lot).
mod cut_slot {
    use std::sync::Mutex;
    use tokio_util::sync::CancellationToken;

    #[derive(Default)]
    pub struct Slot(Mutex<CancellationToken>);

    impl Slot {
        pub fn current(&self) -> CancellationToken {
            self.0.lock().expect("slot").clone()
        }
        pub fn replace(&self) {
            let old = std::mem::take(&mut *self.0.lock().expect("slot"));
            old.cancel();
        }
    }
}

impl Proxy {
    /// Listens on an ephemeral port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let blocked = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(cut_slot::Slot::default());
        let stop = CancellationToken::new();
        let (b, c, s) = (blocked.clone(), cut.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                if b.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = c.current();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            blocked,
            cut,
            stop,
        }
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::unblock`].
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.cut.replace();
    }

    /// Lets new connections through again.
    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.replace();
    }
}

/// Runs a service binary to its end (for start-up tests that expect it to exit). One still
/// running after 30 s (it should have refused its configuration at once) is killed, and the
/// test fails instead of hanging.
pub fn run_to_end(command: &mut std::process::Command) -> std::process::Output {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the binary");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("run the binary"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("the binary was still running after 30 s (pid {pid}, now killed)");
        }
    }
}

/// Coordinator members in this process forming one Raft group, each on its own data dir and
/// ephemeral ports. The callers' crates cannot rely on the coordinator binary being built, so
/// the members run in process; "destroyed" means every member stopped and every data dir
/// deleted ([`Members::destroy`]).
pub struct Members {
    running: Vec<coordinator::Running>,
    dir: tempfile::TempDir,
}

/// Peer ports for `names`, and the `--initial-cluster` value naming them.
fn initial_cluster(names: &[&str]) -> (Vec<String>, String) {
    let peers: Vec<String> = names
        .iter()
        .map(|_| {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("bind");
            format!("http://{addr}")
        })
        .collect();
    let initial = names
        .iter()
        .zip(&peers)
        .map(|(n, p)| format!("{n}={p}"))
        .collect::<Vec<_>>()
        .join(",");
    (peers, initial)
}

impl Members {
    /// `names.len()` fresh members of a new cluster with `token`.
    pub async fn start(names: &[&str], token: &str) -> Members {
        Members::start_prepared(names, token, |_, _, _, _| {}).await
    }

    /// A new cluster whose members' data dirs are first written by `prepare(name, data_dir,
    /// initial_cluster, peer_url)` (a snapshot restore, say), then started on them.
    pub async fn start_prepared(
        names: &[&str],
        token: &str,
        mut prepare: impl FnMut(&str, &std::path::Path, &str, &str),
    ) -> Members {
        let dir = tempfile::tempdir().expect("temp dir");
        let (peers, initial) = initial_cluster(names);
        let mut configs = Vec::new();
        for (name, peer) in names.iter().zip(&peers) {
            let data = dir.path().join(name);
            prepare(name, &data, &initial, peer);
            let data = data.display().to_string();
            configs.push(coordinator::Config::parse_from([
                "coordinator",
                "--name",
                name,
                "--data-dir",
                &data,
                "--listen-client-urls",
                "http://127.0.0.1:0",
                "--listen-metrics-urls",
                "http://127.0.0.1:0",
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                token,
            ]));
        }
        let mut running = Vec::new();
        for config in configs {
            running.push(
                within(START, "member start", coordinator::start(config))
                    .await
                    .expect("coordinator::start"),
            );
        }
        Members { running, dir }
    }

    /// `http://127.0.0.1:PORT` of member `i`'s client port.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.running[i].client_addr())
    }

    /// Every member's client URL, comma-separated: what `--coordinator-endpoints` takes.
    pub fn endpoints(&self) -> String {
        (0..self.running.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the member every member names as leader, once they all agree.
    pub async fn leader(&self) -> usize {
        use proto::etcdserverpb::StatusRequest;
        use proto::etcdserverpb::maintenance_client::MaintenanceClient;
        let deadline = Instant::now() + START;
        loop {
            let mut seen = Vec::new();
            for i in 0..self.running.len() {
                let url = self.url(i);
                let status = async move {
                    let mut m = MaintenanceClient::connect(url).await.ok()?;
                    m.status(StatusRequest {})
                        .await
                        .ok()
                        .map(|r| r.into_inner())
                };
                if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(2), status).await {
                    seen.push((i, s.header.map(|h| h.member_id).unwrap_or(0), s.leader));
                }
            }
            if seen.len() == self.running.len()
                && seen[0].2 != 0
                && seen.iter().all(|s| s.2 == seen[0].2)
                && let Some(l) = seen.iter().find(|s| s.1 == seen[0].2)
            {
                return l.0;
            }
            assert!(Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every member and deletes every data dir: nothing of this cluster is left.
    pub async fn destroy(self) {
        let path = self.dir.path().to_path_buf();
        for running in self.running {
            within(START, "member shutdown", running.shutdown()).await;
        }
        drop(self.dir);
        assert!(!path.exists(), "{path:?} is still there");
    }
}
