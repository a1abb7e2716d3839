use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_config-svc");

/// The binary with none of the variables it reads inherited from the
/// environment the tests run in.
fn command() -> Command {
    let mut command = Command::new(BIN);
    for var in [
        "CONFIG_ADMIN_LISTEN",
        "CONFIG_GRPC_LISTEN",
        "CONFIG_HTTP_LISTEN",
        "CONFIG_COORDINATOR_ENDPOINTS",
        "CONFIG_MAX_CONTENT_BYTES",
        "CONFIG_DEFAULT_RETENTION",
        "CONFIG_WATCH_BUFFER",
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
    let out = output(command().env("CONFIG_ADMIN_LISTEN", "nowhere"));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = output(command().env("LOG_FORMAT", "yaml"));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

#[test]
fn out_of_range_limits_exit_64_naming_the_flag() {
    let out = output(command().args(["--max-content-bytes", "10"]));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--max-content-bytes"),
        "{out:?}"
    );
    let out = output(command().env("CONFIG_DEFAULT_RETENTION", "0"));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--default-retention"),
        "{out:?}"
    );
}

#[test]
fn help_and_version_exit_0() {
    let out = output(command().arg("--help"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("CONFIG_ADMIN_LISTEN"));
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
