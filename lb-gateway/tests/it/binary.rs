use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lb-gateway");

/// The binary with none of the variables it reads inherited from the
/// environment the tests run in.
fn command() -> Command {
    let mut command = Command::new(BIN);
    for var in [
        "LB_GATEWAY_ADMIN_LISTEN",
        "LB_GATEWAY_LISTEN",
        "LB_GATEWAY_ROUTES",
        "LB_GATEWAY_REGISTRY_ENDPOINTS",
        "LB_GATEWAY_WORKER_THREADS",
        "LB_GATEWAY_ACCESS_LOG",
        "LB_GATEWAY_BACKEND_CACERT",
        "LB_GATEWAY_BACKEND_CERT",
        "LB_GATEWAY_BACKEND_KEY",
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
    let out = output(command().env("LB_GATEWAY_ADMIN_LISTEN", "nowhere"));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = output(command().env("LOG_FORMAT", "yaml"));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

#[test]
fn help_and_version_exit_0() {
    let out = output(command().arg("--help"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("LB_GATEWAY_ADMIN_LISTEN"));
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

#[test]
fn a_bad_routes_file_exits_64_naming_the_route_and_the_field() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        file.path(),
        "[[routes]]\nname = \"orders\"\nbackend = { namespace = \"prod\", service = \"orders\" }\nalgorithm = \"maglev\"\ntable_size = 1000\n",
    )
    .expect("write");
    let out = output(command().args(["--routes", &file.path().display().to_string()]));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: invalid configuration: routes file "),
        "{stderr}"
    );
    assert!(
        stderr.contains("route 1 (\"orders\")") && stderr.contains("table_size 1000"),
        "{stderr}"
    );
}

#[test]
fn a_tls_route_without_backend_cacert_exits_64_naming_the_route_and_the_flag() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        file.path(),
        "[[routes]]\nname = \"orders\"\nbackend = { namespace = \"prod\", service = \"orders\", tls = true }\n",
    )
    .expect("write");
    let out = output(command().args(["--routes", &file.path().display().to_string()]));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("route \"orders\"") && stderr.contains("--backend-cacert"),
        "{stderr}"
    );
}

#[test]
fn a_routes_file_that_is_not_toml_exits_64_with_the_line() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), "[[routes]]\nname = \"x\"\nbackend = {{ oops\n").expect("write");
    let out = output(command().args(["--routes", &file.path().display().to_string()]));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
}

#[test]
fn a_missing_routes_file_exits_64_naming_it() {
    let out = output(command().args(["--routes", "/nonexistent/routes.toml"]));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/routes.toml"), "{stderr}");
}
