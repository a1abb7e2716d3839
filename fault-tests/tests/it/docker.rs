//! A compose project of its own, driven through the Docker CLI, and always removed.
//!
//! [`Project::up`] copies `compose/docker-compose.yml` (and the gateway's routes file) into
//! `target/fault-tests/<project>/` with two changes: every published port becomes an ephemeral
//! one on 127.0.0.1 (`"127.0.0.1::2379"`; [`Project::port`] asks Docker which), so the test never
//! clashes with a stack a developer has up or with another run; and `restart: "no"`, so that a
//! container the test kills stays down until the test starts it. The project name is unique
//! (`faults-<pid>-<unix time>`). Dropping the [`Project`], also while a failed assertion
//! unwinds, runs `compose down -v --remove-orphans` (containers, network, volumes) and removes
//! the folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The images the stack runs (built by `scripts/build-images.sh`).
pub const IMAGES: [&str; 5] = [
    "platform/coordinator:dev",
    "platform/registry-svc:dev",
    "platform/config-svc:dev",
    "platform/lb-gateway:dev",
    "platform/demo-svc:dev",
];

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the workspace")
        .to_path_buf()
}

/// Runs `program args`; its output, or a panic naming the command if it cannot start.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {}: {e}", args.join(" ")))
}

/// Runs a command that must succeed; its stdout.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `docker ARGS`, which must succeed.
pub fn docker(args: &[&str]) -> String {
    run_ok("docker", args)
}

/// Whether a Docker engine answers.
pub fn engine_available() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `docker compose` (v2) if present, else `docker-compose` (v1).
fn compose_program() -> (String, Vec<String>) {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        ("docker".into(), vec!["compose".into()])
    } else {
        ("docker-compose".into(), Vec::new())
    }
}

/// Builds the images with `scripts/build-images.sh` unless all of them exist.
pub fn ensure_images() {
    let missing: Vec<&str> = IMAGES
        .iter()
        .copied()
        .filter(|image| !run("docker", &["image", "inspect", image]).status.success())
        .collect();
    if missing.is_empty() {
        return;
    }
    eprintln!(
        "images missing ({}): running scripts/build-images.sh",
        missing.join(", ")
    );
    let status = Command::new("bash")
        .arg(repo_root().join("scripts/build-images.sh"))
        .status()
        .expect("run scripts/build-images.sh");
    assert!(status.success(), "scripts/build-images.sh failed: {status}");
}

/// The compose file made for one project: ephemeral host ports, no restarts.
pub fn test_compose_file(original: &str) -> String {
    let (out, rewritten_ports) = rewrite_compose_file(original);
    assert!(
        rewritten_ports > 0,
        "no published port found to rewrite in the compose file"
    );
    out
}

/// [`test_compose_file`] of a file that may publish nothing (an overlay that only sets
/// environment and volumes); how many published ports it rewrote.
pub fn rewrite_compose_file(original: &str) -> (String, usize) {
    let mut out = String::with_capacity(original.len());
    let mut rewritten_ports = 0;
    for line in original.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if let Some(rest) = trimmed.strip_prefix("- \"127.0.0.1:") {
            // - "127.0.0.1:2379:2379"  ->  - "127.0.0.1::2379"
            if let Some((_host_port, container)) = rest.split_once(':') {
                out.push_str(&format!("{indent}- \"127.0.0.1::{container}\n"));
                rewritten_ports += 1;
                continue;
            }
        }
        if trimmed == "restart: unless-stopped" {
            out.push_str(&format!("{indent}restart: \"no\"\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    (out, rewritten_ports)
}

/// The compose projects of one test binary run one at a time: two stacks at once on a small
/// machine would slow each other's elections past the bounds the tests check.
pub static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One compose project; removed with everything it created when dropped.
pub struct Project {
    /// The project name.
    pub name: String,
    dir: PathBuf,
    program: (String, Vec<String>),
    /// The compose files given to every command: the stack's, then overlays.
    files: Vec<String>,
}

impl Project {
    /// Writes the project's compose file; starts nothing yet.
    pub fn new() -> Project {
        Project::with_overlays("faults", &[])
    }

    /// A project named `<label>-<pid>-<time>` of the stack's compose file and the `overlays`
    /// (files in `compose/`, rewritten the same way). [`Project::up`] starts only the stack's
    /// own services; an overlay's are started by name.
    pub fn with_overlays(label: &str, overlays: &[&str]) -> Project {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!("{label}-{}-{unix}", std::process::id());
        let root = repo_root();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let dir = target.join("fault-tests").join(&name);
        std::fs::create_dir_all(&dir).expect("create the project folder");
        let mut files = Vec::new();
        for file in std::iter::once("docker-compose.yml").chain(overlays.iter().copied()) {
            let original = std::fs::read_to_string(root.join("compose").join(file))
                .unwrap_or_else(|e| panic!("read compose/{file}: {e}"));
            let path = dir.join(file);
            let made = if files.is_empty() {
                test_compose_file(&original)
            } else {
                rewrite_compose_file(&original).0
            };
            std::fs::write(&path, made)
                .unwrap_or_else(|e| panic!("write the project's {file}: {e}"));
            files.push(path.to_str().expect("a UTF-8 path").to_string());
        }
        // The gateway's routes files (the plain stack's, and the TLS overlay's).
        for routes in ["gateway-routes.toml", "gateway-routes-tls.toml"] {
            std::fs::copy(root.join("compose").join(routes), dir.join(routes))
                .unwrap_or_else(|e| panic!("copy the gateway's routes file {routes}: {e}"));
        }
        Project {
            name,
            dir,
            program: compose_program(),
            files,
        }
    }

    /// The project's folder (where its compose files are, so their relative paths, such as
    /// the TLS overlay's `./certs`, are taken from here); removed when the project is dropped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn compose(&self, args: &[&str]) -> Output {
        self.compose_files(&self.files, args)
    }

    fn compose_files(&self, files: &[String], args: &[&str]) -> Output {
        let mut all: Vec<&str> = self.program.1.iter().map(String::as_str).collect();
        all.extend(["-p", &self.name]);
        for f in files {
            all.extend(["-f", f]);
        }
        all.extend_from_slice(args);
        run(&self.program.0, &all)
    }

    /// `compose ARGS` (every file of the project), which must succeed; its stdout.
    pub fn compose_ok(&self, args: &[&str]) -> String {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "compose {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The services of the stack's compose file (not the overlays').
    pub fn services(&self) -> Vec<String> {
        let out = self.compose_files(&self.files[..1], &["config", "--services"]);
        assert!(out.status.success(), "compose config --services failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// `compose up -d` of the stack's services, then waits until every container is healthy;
    /// how long that took from the `up`. Panics naming the unhealthy ones after `timeout`.
    pub fn up(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        let services = self.services();
        let mut args = vec!["up", "-d"];
        args.extend(services.iter().map(String::as_str));
        self.compose_ok(&args);
        loop {
            let unhealthy: Vec<String> = services
                .iter()
                .filter(|s| self.health(s) != "healthy")
                .cloned()
                .collect();
            if unhealthy.is_empty() {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                let logs = self.compose(&["logs", "--tail", "15"]);
                panic!(
                    "not healthy {timeout:?} after `up`: {unhealthy:?}\n{}",
                    String::from_utf8_lossy(&logs.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The container id of `service` (the first one if it is scaled).
    pub fn container(&self, service: &str) -> String {
        let ids = self.containers(service);
        assert!(!ids.is_empty(), "no container for {service}");
        ids[0].clone()
    }

    /// The ids of `service`'s containers (several once it is scaled).
    pub fn containers(&self, service: &str) -> Vec<String> {
        let out = self.compose(&["ps", "-q", service]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// `compose up -d --no-deps --scale s=n ... s ...`: each service to `n` containers (new ones
    /// created, the highest-numbered ones stopped and removed), nothing else touched.
    pub fn scale(&self, to: &[(&str, usize)]) {
        let flags: Vec<String> = to.iter().map(|(s, n)| format!("{s}={n}")).collect();
        let mut args = vec!["up", "-d", "--no-deps"];
        for f in &flags {
            args.extend(["--scale", f]);
        }
        args.extend(to.iter().map(|(s, _)| *s));
        self.compose_ok(&args);
    }

    /// The health status Docker reports for `service` (`healthy`, `starting`, `unhealthy`,
    /// or the container state when it has none); for a scaled service, the first container
    /// that is not healthy, if any.
    pub fn health(&self, service: &str) -> String {
        let ids = self.containers(service);
        if ids.is_empty() {
            return "absent".into();
        }
        ids.iter()
            .map(|id| container_health(id))
            .find(|h| h != "healthy")
            .unwrap_or_else(|| "healthy".into())
    }

    /// The host address Docker published `service`'s `port` on.
    pub fn port(&self, service: &str, port: u16) -> std::net::SocketAddr {
        published(&self.container(service), port)
            .unwrap_or_else(|| panic!("{service}:{port} is not published on 127.0.0.1"))
    }

    /// `service`'s IP address on the project's network (what it registers).
    pub fn ip(&self, service: &str) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network()
        );
        docker(&["inspect", "--format", &format, &self.container(service)])
            .trim()
            .to_string()
    }

    /// The project's network.
    pub fn network(&self) -> String {
        format!("{}_default", self.name)
    }

    /// `docker network disconnect` of `service`.
    pub fn disconnect(&self, service: &str) {
        docker(&[
            "network",
            "disconnect",
            &self.network(),
            &self.container(service),
        ]);
    }

    /// `docker network connect` of `service`, under its service name again (peers reach it by
    /// that name).
    pub fn connect(&self, service: &str) {
        docker(&[
            "network",
            "connect",
            "--alias",
            service,
            &self.network(),
            &self.container(service),
        ]);
    }

    /// `docker kill` (SIGKILL) of `services`, in one command.
    pub fn kill(&self, services: &[&str]) {
        let ids: Vec<String> = services.iter().map(|s| self.container(s)).collect();
        let mut args = vec!["kill", "--signal", "KILL"];
        args.extend(ids.iter().map(String::as_str));
        docker(&args);
    }

    /// How long ago `service`'s container stopped, from Docker's own record
    /// (`.State.FinishedAt`), to time a kill from the moment the process died rather than from
    /// when the CLI returned. `None` if it cannot tell.
    pub fn died_ago(&self, service: &str) -> Option<Duration> {
        let out = run(
            "docker",
            &[
                "inspect",
                "--format",
                "{{.State.FinishedAt}}",
                &self.container(service),
            ],
        );
        let finished = seconds_of_day(String::from_utf8_lossy(&out.stdout).trim())?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_secs_f64()
            % 86_400.0;
        let ago = (now - finished).rem_euclid(86_400.0);
        (ago < 60.0).then(|| Duration::from_secs_f64(ago))
    }

    /// `docker start` of `services`, in one command.
    pub fn start(&self, services: &[&str]) {
        let ids: Vec<String> = services.iter().map(|s| self.container(s)).collect();
        let mut args = vec!["start"];
        args.extend(ids.iter().map(String::as_str));
        docker(&args);
    }

    /// `docker restart` of `service` (SIGTERM, 10 s to stop, then start again).
    pub fn restart(&self, service: &str) {
        docker(&["restart", "-t", "10", &self.container(service)]);
    }

    /// `docker pause` of `service`.
    pub fn pause(&self, service: &str) {
        docker(&["pause", &self.container(service)]);
    }

    /// `docker unpause` of `service`.
    pub fn unpause(&self, service: &str) {
        docker(&["unpause", &self.container(service)]);
    }

    /// The last lines of `service`'s log.
    /// When `service`'s container last started, by Docker's clock (seconds since the epoch).
    pub fn started_at(&self, service: &str) -> Option<f64> {
        let id = self.container(service);
        epoch_seconds(docker(&["inspect", "-f", "{{.State.StartedAt}}", &id]).trim())
    }

    /// Docker's timestamps (seconds since the epoch) of `service`'s log lines, stdout and
    /// stderr, that contain `needle`.
    pub fn log_times(&self, service: &str, needle: &str) -> Vec<f64> {
        let id = self.container(service);
        let out = run("docker", &["logs", "-t", &id]);
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| l.split_once(' ').and_then(|(ts, _)| epoch_seconds(ts)))
            .collect()
    }

    pub fn logs(&self, service: &str, lines: u32) -> String {
        let out = self.compose(&["logs", "--no-color", "--tail", &lines.to_string(), service]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The health status Docker reports for container `id` (or its state when it has no health
/// check).
pub fn container_health(id: &str) -> String {
    let out = run(
        "docker",
        &[
            "inspect",
            "--format",
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
            id,
        ],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The state Docker reports for container `id` (`running`, `exited`, …).
pub fn container_state(id: &str) -> String {
    let out = run("docker", &["inspect", "--format", "{{.State.Status}}", id]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The full ids of compose project `project`'s containers of `service`, running or not (as
/// `compose ps -q` prints them).
pub fn service_containers(project: &str, service: &str) -> Vec<String> {
    let out = run(
        "docker",
        &[
            "ps",
            "-a",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={project}"),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The host address Docker published container `id`'s `port` on, if it is published on
/// 127.0.0.1 (and the container still exists).
pub fn published(id: &str, port: u16) -> Option<std::net::SocketAddr> {
    let out = run("docker", &["port", id, &format!("{port}/tcp")]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("127.0.0.1:"))
        .and_then(|l| l.trim().parse().ok())
}

impl Drop for Project {
    fn drop(&mut self) {
        // Unpause anything a failed test left paused: `down` cannot stop a paused container.
        let out = run(
            "docker",
            &[
                "ps",
                "-q",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.name),
                "--filter",
                "status=paused",
            ],
        );
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = run("docker", &["unpause", id]);
        }
        let out = self.compose(&["down", "-v", "--remove-orphans", "-t", "3"]);
        if !out.status.success() {
            eprintln!(
                "compose down of {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Seconds since midnight UTC of an RFC 3339 time such as `2026-11-25T21:55:17.761234567Z`.
pub fn seconds_of_day(rfc3339: &str) -> Option<f64> {
    let time = rfc3339.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

#[test]
fn rfc3339_times_of_day() {
    assert_eq!(seconds_of_day("2026-11-25T21:55:17.5Z"), Some(78_917.5));
    assert_eq!(seconds_of_day("2026-11-25T00:00:00Z"), Some(0.0));
    assert_eq!(seconds_of_day("0001-01-01T00:00:00"), None, "no zone");
    assert_eq!(seconds_of_day("garbage"), None);
}

#[test]
fn the_test_compose_file_publishes_ephemeral_ports_on_loopback_and_never_restarts() {
    let original = std::fs::read_to_string(repo_root().join("compose/docker-compose.yml"))
        .expect("read compose/docker-compose.yml");
    let made = test_compose_file(&original);
    assert!(made.contains("- \"127.0.0.1::2379\""), "{made}");
    assert!(made.contains("- \"127.0.0.1::8080\""), "{made}");
    assert!(!made.contains("127.0.0.1:2379:"), "a fixed port left");
    assert!(!made.contains("unless-stopped"));
    // Every published port of the original is on 127.0.0.1.
    for line in original
        .lines()
        .filter(|l| l.trim_start().starts_with("- \""))
    {
        let l = line.trim();
        if l.contains(":/") || l.ends_with(":ro") || l.contains("-data:") {
            continue; // a volume
        }
        assert!(
            l.starts_with("- \"127.0.0.1:"),
            "published beyond loopback: {l}"
        );
    }
}

/// Seconds since the Unix epoch of a UTC timestamp as Docker prints it
/// (`2026-11-25T22:59:01.123456789Z`); `None` for anything else.
pub fn epoch_seconds(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec >= 61.0 {
        return None;
    }
    // Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar.
    let (y, m) = if m <= 2 { (y - 1, m + 12) } else { (y, m) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m - 3) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + min * 60) as f64 + sec)
}

#[test]
fn docker_timestamps_become_epoch_seconds() {
    assert_eq!(epoch_seconds("1970-01-01T00:00:00Z"), Some(0.0));
    assert_eq!(epoch_seconds("2000-03-01T00:00:00Z"), Some(951_868_800.0));
    let t = epoch_seconds("2026-11-25T22:59:01.5Z").expect("parsed");
    assert!((t - 1_795_647_541.5).abs() < 1e-6, "{t}");
    assert_eq!(epoch_seconds("2026-11-25 22:59:01Z"), None);
    assert_eq!(epoch_seconds("2026-13-25T22:59:01Z"), None);
    assert_eq!(epoch_seconds("0001-01-01T00:00:00"), None);
}
