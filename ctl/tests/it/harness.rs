//! The platform in process (a coordinator, registry-svc, config-svc and, when asked,
//! lb-gateway, each on `127.0.0.1:0` ports), and the real `platformctl` binary run against it.
//! Waits poll with a deadline; nothing sleeps to let something happen.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use clap::Parser as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

pub use crate::coord::{wait_until, within};

/// Bound on any single wait.
pub const T: Duration = Duration::from_secs(20);

/// The namespace tests use.
pub const NS: &str = "ctltest";

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

fn addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().expect("local addr")
}

/// A GET on an HTTP/1.1 server; the status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        Some(out)
    };
    let Some(raw) = within(T, "HTTP GET", exchange).await else {
        return (0, String::new());
    };
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// The services under test.
pub struct Stack {
    pub coordinator: coordinator::Running,
    pub registry_grpc: SocketAddr,
    pub registry_admin: SocketAddr,
    pub config_grpc: SocketAddr,
    pub config_admin: SocketAddr,
    pub gateway_admin: Option<SocketAddr>,
    shutdown: CancellationToken,
    _dirs: Vec<tempfile::TempDir>,
    _files: Vec<tempfile::NamedTempFile>,
}

impl Stack {
    /// A coordinator, registry-svc and config-svc, ready.
    pub async fn start() -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data").display().to_string();
        let config = coordinator::Config::parse_from([
            "coordinator",
            "--data-dir",
            &data,
            "--listen-client-urls",
            "http://127.0.0.1:0",
            "--listen-metrics-urls",
            "http://127.0.0.1:0",
        ]);
        let coordinator = within(T, "coordinator start", coordinator::start(config))
            .await
            .expect("coordinator starts");
        let coord_url = format!("http://{}", coordinator.client_addr());
        let shutdown = CancellationToken::new();

        let reg = registry_svc::Config::try_parse_from([
            "registry-svc",
            "--coordinator-endpoints",
            &coord_url,
            "--replica-ttl",
            "2s",
        ])
        .expect("registry config");
        let reg_listeners = registry_svc::Listeners {
            admin: bind().await,
            grpc: bind().await,
            http: bind().await,
        };
        let (registry_grpc, registry_admin) =
            (addr(&reg_listeners.grpc), addr(&reg_listeners.admin));
        tokio::spawn(registry_svc::run_with_listeners(
            reg,
            reg_listeners,
            shutdown.clone(),
        ));

        let cfg = config_svc::Config::try_parse_from([
            "config-svc",
            "--coordinator-endpoints",
            &coord_url,
        ])
        .expect("config-svc config");
        let cfg_listeners = config_svc::Listeners {
            admin: bind().await,
            grpc: bind().await,
            http: bind().await,
        };
        let (config_grpc, config_admin) = (addr(&cfg_listeners.grpc), addr(&cfg_listeners.admin));
        tokio::spawn(config_svc::run_with_listeners(
            cfg,
            cfg_listeners,
            shutdown.clone(),
        ));

        for (what, admin) in [
            ("registry-svc", registry_admin),
            ("config-svc", config_admin),
        ] {
            wait_until(T, &format!("{what} to be ready"), || async move {
                http_get(admin, "/readyz").await.0 == 200
            })
            .await;
        }
        Stack {
            coordinator,
            registry_grpc,
            registry_admin,
            config_grpc,
            config_admin,
            gateway_admin: None,
            shutdown,
            _dirs: vec![dir],
            _files: Vec::new(),
        }
    }

    /// Adds lb-gateway with `routes` (TOML) over this stack's registry, and waits until ready.
    pub async fn with_gateway(mut self, routes: &str) -> Stack {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), routes).expect("write routes");
        let path = file.path().display().to_string();
        let registry = format!("http://{}", self.registry_grpc);
        let config = lb_gateway::Config::try_parse_from([
            "lb-gateway",
            "--routes",
            &path,
            "--registry-endpoints",
            &registry,
            "--worker-threads",
            "1",
            "--shutdown-grace",
            "1s",
        ])
        .expect("gateway config");
        let listeners = lb_gateway::Listeners {
            proxy: bind().await,
            admin: bind().await,
        };
        let admin = addr(&listeners.admin);
        tokio::spawn(lb_gateway::run_with_listeners(
            config,
            listeners,
            self.shutdown.clone(),
        ));
        wait_until(T, "the gateway to be ready", || async move {
            http_get(admin, "/readyz").await.0 == 200
        })
        .await;
        self.gateway_admin = Some(admin);
        self._files.push(file);
        self
    }

    /// The flags that point `platformctl` at this stack.
    pub fn flags(&self) -> Vec<String> {
        let gateway = self
            .gateway_admin
            .map(|a| a.to_string())
            .unwrap_or_else(dead_addr);
        vec![
            "--coordinator".into(),
            self.coordinator.client_addr().to_string(),
            "--registry".into(),
            self.registry_grpc.to_string(),
            "--config".into(),
            self.config_grpc.to_string(),
            "--gateway-admin".into(),
            gateway,
            "--coordinator-admin".into(),
            self.coordinator.metrics_addr().to_string(),
            "--registry-admin".into(),
            self.registry_admin.to_string(),
            "--config-admin".into(),
            self.config_admin.to_string(),
            "--namespace".into(),
            NS.into(),
        ]
    }

    /// Runs `platformctl` with this stack's flags and `args`.
    pub async fn ctl(&self, args: &[&str]) -> Run {
        let mut all: Vec<String> = self.flags();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        ctl(&all).await
    }

    /// Runs it with `-o json`, asserts success, and parses stdout.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let run = self.ctl(&all).await;
        run.assert_ok();
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("stdout of {args:?} is not JSON ({e}): {}", run.stdout))
    }

    /// Starts it with stdout piped, for streams.
    pub fn spawn(&self, args: &[&str]) -> Stream {
        let mut all: Vec<String> = self.flags();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        Stream::spawn(&all)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A `host:port` nothing listens on (bound, then released).
pub fn dead_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .to_string()
}

/// One finished run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Panics with the output unless it exited 0.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.code, 0,
            "platformctl failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
    }
}

fn command(args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_platformctl"));
    cmd.args(args)
        .env_remove("PLATFORM_COORDINATOR")
        .env_remove("PLATFORM_REGISTRY")
        .env_remove("PLATFORM_CONFIG")
        .env_remove("PLATFORM_NAMESPACE")
        .env_remove("PLATFORM_OUTPUT")
        .env("USER", "tester")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `platformctl args` to the end (bounded).
pub async fn ctl<S: AsRef<str>>(args: &[S]) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let out = within(
        T * 2,
        &format!("platformctl {args:?}"),
        command(&args).output(),
    )
    .await
    .expect("run platformctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running `platformctl` whose stdout is read line by line.
pub struct Stream {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Stream {
    fn spawn(args: &[String]) -> Stream {
        let mut child = command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn platformctl");
        let stdout = child.stdout.take().expect("stdout");
        Stream {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next line (panics after `T` or at the end of output).
    pub async fn line(&mut self) -> String {
        within(T, "a line from platformctl", self.lines.next_line())
            .await
            .expect("read stdout")
            .expect("platformctl ended its output")
    }

    /// Reads lines until one satisfies `pred`; returns it.
    pub async fn line_where(&mut self, pred: impl Fn(&str) -> bool) -> String {
        loop {
            let l = self.line().await;
            if pred(&l) {
                return l;
            }
        }
    }

    /// Waits for the process to exit on its own; its exit code.
    pub async fn exit_code(mut self) -> i32 {
        let status = within(T, "platformctl to exit", self.child.wait())
            .await
            .expect("wait");
        status.code().unwrap_or(-1)
    }
}
