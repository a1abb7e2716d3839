//! Auth with the real `etcdctl` 3.4: etcd's documented set-up (root user and role, a role with a
//! prefix permission, a user), `auth enable`, then `--user` commands, denials and the way back.

use crate::harness::{ETCDCTL_TIMEOUT, Etcdctl, Output, Server};

fn failed_with(out: &Output, text: &str) {
    assert!(
        !out.status.success(),
        "expected a failure with {text:?}; stdout:\n{}",
        out.stdout
    );
    assert!(
        out.stderr.contains(text),
        "expected {text:?} in stderr:\n{}",
        out.stderr
    );
}

async fn as_user(ctl: &Etcdctl, user: &str, args: &[&str]) -> Output {
    let mut all = vec!["--user", user];
    all.extend_from_slice(args);
    ctl.run(&all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_users_roles_auth_enable_and_denials() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    const ROOT: &str = "root:root-secret-1";
    const ALICE: &str = "alice:alice-secret-1";

    // etcd's documented set-up, while auth is off.
    assert!(
        ctl.ok(&["role", "add", "root"])
            .await
            .contains("Role root created")
    );
    assert!(
        ctl.ok(&["user", "add", ROOT])
            .await
            .contains("User root created")
    );
    assert!(
        ctl.ok(&["user", "grant-role", "root", "root"])
            .await
            .contains("Role root is granted to user root")
    );
    ctl.ok(&["role", "add", "app"]).await;
    assert!(
        ctl.ok(&[
            "role",
            "grant-permission",
            "app",
            "--prefix=true",
            "readwrite",
            "app/"
        ])
        .await
        .contains("Role app updated")
    );
    ctl.ok(&["role", "grant-permission", "app", "read", "shared"])
        .await;
    ctl.ok(&["user", "add", ALICE]).await;
    ctl.ok(&["user", "grant-role", "alice", "app"]).await;
    // A password below the minimum length is refused with a clear message.
    failed_with(
        &ctl.run(&["user", "add", "bob:short"]).await,
        "password is too short (at least 8 bytes)",
    );
    assert!(
        ctl.ok(&["auth", "enable"])
            .await
            .contains("Authentication Enabled")
    );

    // Without a user: etcd's "user name is empty"; with a wrong password: refused at login.
    failed_with(
        &ctl.run(&["get", "app/x"]).await,
        "etcdserver: user name is empty",
    );
    failed_with(
        &as_user(&ctl, "alice:wrong-password", &["get", "app/x"]).await,
        "etcdserver: authentication failed, invalid user ID or password",
    );

    // Root manages users and roles.
    let users = as_user(&ctl, ROOT, &["user", "list"]).await.ok("user list");
    assert_eq!(users.lines().collect::<Vec<_>>(), vec!["alice", "root"]);
    let roles = as_user(&ctl, ROOT, &["role", "list"]).await.ok("role list");
    assert_eq!(roles.lines().collect::<Vec<_>>(), vec!["app", "root"]);
    let alice = as_user(&ctl, ROOT, &["user", "get", "alice"])
        .await
        .ok("user get");
    assert!(
        alice.contains("User: alice") && alice.contains("Roles: app"),
        "{alice}"
    );
    let app = as_user(&ctl, ROOT, &["role", "get", "app"])
        .await
        .ok("role get");
    assert!(app.contains("Role app"), "{app}");
    assert!(app.contains("[app/, app0) (prefix app/)"), "{app}");
    assert!(app.contains("shared"), "{app}");

    // Alice writes under her prefix, is denied elsewhere, reads what she may read.
    as_user(&ctl, ALICE, &["put", "app/x", "1"])
        .await
        .ok("put app/x");
    let got = as_user(&ctl, ALICE, &["get", "app/x"])
        .await
        .ok("get app/x");
    assert_eq!(got, "app/x\n1\n");
    failed_with(
        &as_user(&ctl, ALICE, &["put", "other", "1"]).await,
        "etcdserver: permission denied",
    );
    failed_with(
        &as_user(&ctl, ALICE, &["put", "shared", "1"]).await,
        "etcdserver: permission denied",
    );
    as_user(&ctl, ROOT, &["put", "shared", "s"])
        .await
        .ok("root put");
    as_user(&ctl, ALICE, &["get", "shared"])
        .await
        .ok("read-only key");
    failed_with(
        &as_user(&ctl, ALICE, &["get", "", "--prefix"]).await,
        "etcdserver: permission denied",
    );
    failed_with(
        &as_user(&ctl, ALICE, &["user", "list"]).await,
        "etcdserver: permission denied",
    );
    failed_with(
        &as_user(&ctl, ALICE, &["compaction", "1"]).await,
        "etcdserver: permission denied",
    );
    // A txn whose failure branch writes outside her prefix is denied whole.
    let txn = ctl
        .run_with_stdin(
            &["--user", ALICE, "txn", "-i"],
            Some("value(\"app/x\") = \"1\"\n\nput app/y 2\n\nput other 3\n\n"),
            ETCDCTL_TIMEOUT,
        )
        .await;
    failed_with(&txn, "etcdserver: permission denied");

    // Password change: the old one stops working.
    let out = ctl
        .run_with_stdin(
            &[
                "--user",
                ROOT,
                "user",
                "passwd",
                "alice",
                "--interactive=false",
            ],
            Some("alice-secret-2\n"),
            ETCDCTL_TIMEOUT,
        )
        .await
        .ok("user passwd");
    assert!(out.contains("Password updated"), "{out}");
    failed_with(
        &as_user(&ctl, ALICE, &["get", "app/x"]).await,
        "etcdserver: authentication failed, invalid user ID or password",
    );
    as_user(&ctl, "alice:alice-secret-2", &["get", "app/x"])
        .await
        .ok("new password");

    // Revoking the permission applies at once.
    as_user(
        &ctl,
        ROOT,
        &["role", "revoke-permission", "app", "app/", "--prefix=true"],
    )
    .await
    .ok("revoke-permission");
    failed_with(
        &as_user(&ctl, "alice:alice-secret-2", &["put", "app/x", "2"]).await,
        "etcdserver: permission denied",
    );
    // Root cannot be deleted while auth is on.
    failed_with(
        &as_user(&ctl, ROOT, &["user", "delete", "root"]).await,
        "etcdserver: invalid auth management",
    );
    as_user(&ctl, ROOT, &["user", "revoke-role", "alice", "app"])
        .await
        .ok("revoke-role");
    as_user(&ctl, ROOT, &["user", "delete", "alice"])
        .await
        .ok("user delete");
    as_user(&ctl, ROOT, &["role", "delete", "app"])
        .await
        .ok("role delete");
    failed_with(
        &as_user(&ctl, ROOT, &["user", "get", "alice"]).await,
        "etcdserver: user name not found",
    );

    // Maintenance: status for anyone authenticated, snapshot for root.
    as_user(&ctl, ROOT, &["endpoint", "status"])
        .await
        .ok("endpoint status");

    assert!(
        as_user(&ctl, ROOT, &["auth", "disable"])
            .await
            .ok("auth disable")
            .contains("Authentication Disabled")
    );
    ctl.ok(&["put", "other", "open-again"]).await;
}

/// etcdctl's own short cut: with only a root user, `auth enable` is refused with etcd's "root
/// user does not have root role", upon which etcdctl adds the role, grants it and retries. This
/// works only if the error text is etcd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_auth_enable_adds_the_root_role_itself() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    failed_with(
        &ctl.run(&["auth", "enable"]).await,
        "root user does not exist",
    );
    ctl.ok(&["user", "add", "root:root-secret-1"]).await;
    assert!(
        ctl.ok(&["auth", "enable"])
            .await
            .contains("Authentication Enabled")
    );
    let root = as_user(&ctl, "root:root-secret-1", &["user", "get", "root"])
        .await
        .ok("user get root");
    assert!(root.contains("Roles: root"), "{root}");
    as_user(&ctl, "root:root-secret-1", &["put", "a", "b"])
        .await
        .ok("root writes");
    failed_with(
        &ctl.run(&["put", "a", "c"]).await,
        "etcdserver: user name is empty",
    );
}
