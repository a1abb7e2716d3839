//! Failures: one clear line on stderr, a non-zero exit code, no panic.

use crate::harness::{ctl, dead_addr};

fn assert_one_clean_line(stderr: &str) {
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("platformctl: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_service_is_named_with_its_address() {
    let dead = dead_addr();
    for (args, service) in [
        (
            vec!["--registry", dead.as_str(), "instances", "x"],
            "registry-svc",
        ),
        (
            vec!["--config", dead.as_str(), "config", "get", "g/k"],
            "config-svc",
        ),
        (
            vec!["--gateway-admin", dead.as_str(), "ring", "r", "k"],
            "lb-gateway",
        ),
        (
            vec![
                "--coordinator",
                dead.as_str(),
                "--timeout",
                "3s",
                "cluster",
                "status",
            ],
            "coordinator",
        ),
    ] {
        let run = ctl(&args).await;
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert_one_clean_line(&run.stderr);
        assert!(
            run.stderr.contains(&format!("cannot reach {service} at"))
                && run.stderr.contains(&dead),
            "{args:?}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("connection refused"),
            "{args:?}: {}",
            run.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_exits_2_and_completions_are_printed() {
    let run = ctl(&["config", "get", "no-slash"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("is not GROUP/KEY"), "{}", run.stderr);

    let run = ctl(&["--timeout", "soon", "services"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("invalid duration"), "{}", run.stderr);

    let run = ctl(&[
        "config",
        "put",
        "g/k.json",
        "--content",
        "{}",
        "--format",
        "xml",
        "--config",
        &dead_addr(),
    ])
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert_one_clean_line(&run.stderr);
    assert!(
        run.stderr.contains("format \"xml\" is not one of"),
        "{}",
        run.stderr
    );

    // A token that cannot travel in a header is refused before any call.
    let run = ctl(&[
        "--token",
        "bad\u{7}token",
        "--registry",
        &dead_addr(),
        "services",
    ])
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert_one_clean_line(&run.stderr);
    assert!(run.stderr.contains("--token"), "{}", run.stderr);

    for shell in ["bash", "zsh", "fish"] {
        let run = ctl(&["completions", shell]).await;
        run.assert_ok();
        assert!(run.stdout.contains("platformctl"), "{shell}");
        assert!(
            run.stdout.contains("instances") && run.stdout.contains("rollout"),
            "{shell}"
        );
    }
}
