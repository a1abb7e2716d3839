use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_registry-svc");

/// The binary with none of the variables it reads inherited from the
/// environment the tests run in.
fn command() -> Command {
    let mut command = Command::new(BIN);
    for var in [
        "REGISTRY_ADMIN_LISTEN",
        "REGISTRY_GRPC_LISTEN",
        "REGISTRY_HTTP_LISTEN",
        "REGISTRY_COORDINATOR_ENDPOINTS",
        "REGISTRY_REPLICA_ID",
        "REGISTRY_REPLICA_TTL",
        "LOG_FORMAT",
        "RUST_LOG",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        command.env_remove(var);
    }
    command
}

fn output(command: &mut Command) -> Output {
    crate::coord::run_to_end(command)
}

#[test]
fn invalid_flag_value_exits_64_with_a_message_naming_the_value() {
    let out = output(command().args(["--admin-listen", "ftp://127.0.0.1:1"]));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: invalid configuration: "),
        "{stderr}"
    );
    assert!(!stderr.contains("error: error:"), "{stderr}");
    assert!(stderr.contains("\"ftp\""), "{stderr}");
}

#[test]
fn invalid_environment_variable_exits_64() {
    let out = output(command().env("REGISTRY_ADMIN_LISTEN", "nowhere"));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = output(command().env("LOG_FORMAT", "yaml"));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

#[test]
fn out_of_range_replica_ttl_exits_64() {
    let out = output(command().args(["--replica-ttl", "1s"]));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--replica-ttl"),
        "{out:?}"
    );
}

#[test]
fn help_and_version_exit_0() {
    let out = output(command().arg("--help"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("REGISTRY_ADMIN_LISTEN"));
    let out = output(command().arg("--version"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn health_subcommand_exits_1_when_nothing_listens() {
    // Bind then drop: the port is closed for the moment the probe runs.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port");
    let out = output(command().args([
        "--admin-listen",
        &addr.to_string(),
        "health",
        "--timeout",
        "1s",
    ]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("unhealthy: "),
        "{out:?}"
    );
}

/// A running service, killed if a test fails before stopping it.
struct Running {
    child: Child,
    /// Its stdout, one parsed JSON log line at a time.
    logs: mpsc::Receiver<serde_json::Value>,
}

impl Running {
    fn start(command: &mut Command) -> Self {
        let mut child = command
            .args(["--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let parsed = serde_json::from_str(&line)
                    .unwrap_or_else(|err| panic!("log line is not JSON ({err}): {line}"));
                if tx.send(parsed).is_err() {
                    break;
                }
            }
        });
        Self { child, logs }
    }

    /// The first log line whose message is `message`.
    fn wait_for_log(&self, message: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|err| panic!("no log {message:?} within {timeout:?}: {err}"));
            if line["fields"]["message"] == message {
                return line;
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serves_health_with_an_unreachable_collector_and_exits_0_on_sigterm() {
    // Nothing listens on port 1: OTLP export is on but can never connect.
    let mut service = Running::start(
        command()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
            .env("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
    );

    let starting = service.wait_for_log("starting registry-svc", Duration::from_secs(10));
    assert_eq!(
        starting["fields"]["admin_listen"], "127.0.0.1:0",
        "{starting}"
    );
    assert_eq!(starting["fields"]["log_format"], "json", "{starting}");
    let listening = service.wait_for_log("admin server listening", Duration::from_secs(10));
    let admin = listening["fields"]["admin"]
        .as_str()
        .expect("admin address")
        .to_owned();

    let out = output(command().env("REGISTRY_ADMIN_LISTEN", &admin).arg("health"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    service.signal("TERM");
    let status = service.wait_for_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}");

    let out = output(command().env("REGISTRY_ADMIN_LISTEN", &admin).arg("health"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn exits_0_on_sigint() {
    let mut service = Running::start(&mut command());
    service.wait_for_log("admin server listening", Duration::from_secs(10));
    service.signal("INT");
    let status = service.wait_for_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}");
}
