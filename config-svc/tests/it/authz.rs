//! Authentication and per-namespace authorisation of config-svc, through the real gRPC and
//! REST faces: the role × operation matrix (printed, then asserted), bad and missing
//! credentials, and what a denial logs.

use std::path::Path;

use config_svc::client::ConfigClient;
use proto::config_v1 as pb;
use proto::config_v1::config_client::ConfigClient as Grpc;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

use crate::auth_support::{
    ROLES, ROOT, Row, assert_denial_logged, assert_http_unauthenticated, assert_unauthenticated,
    auth_flags, authed, bad_credentials, capture_logs, expected, good_jwt, grpc_verdict, http,
    http_as, http_status, print_and_check, rest_verdict,
};
use crate::coord::{Coordinator, within};
use crate::harness::{ConfigSvc, T, item, publish_req};

const NS: &str = "team-a";
const GROUP: &str = "app";

/// The operations of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get,
    GetVersion,
    GetRaw,
    List,
    History,
    Diff,
    Watch,
    Validate,
    Publish,
    PublishCas,
    Rollback,
    Delete,
    Promote,
    Abort,
    PublishRetention,
    SetOptions,
    Purge,
}

const OPS: [Op; 17] = [
    Op::Get,
    Op::GetVersion,
    Op::GetRaw,
    Op::List,
    Op::History,
    Op::Diff,
    Op::Watch,
    Op::Validate,
    Op::Publish,
    Op::PublishCas,
    Op::Rollback,
    Op::Delete,
    Op::Promote,
    Op::Abort,
    Op::PublishRetention,
    Op::SetOptions,
    Op::Purge,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::GetVersion => "get version",
            Op::GetRaw => "get raw",
            Op::List => "list",
            Op::History => "history",
            Op::Diff => "diff",
            Op::Watch => "watch",
            Op::Validate => "validate",
            Op::Publish => "publish",
            Op::PublishCas => "publish (compare-and-set)",
            Op::Rollback => "rollback",
            Op::Delete => "delete",
            Op::Promote => "rollout promote",
            Op::Abort => "rollout abort",
            Op::PublishRetention => "publish with retention",
            Op::SetOptions => "set options",
            Op::Purge => "purge",
        }
    }

    /// 0 read, 1 write, 2 admin, `None`: authentication only.
    fn level(self) -> Option<usize> {
        match self {
            Op::Validate => None,
            Op::Get
            | Op::GetVersion
            | Op::GetRaw
            | Op::List
            | Op::History
            | Op::Diff
            | Op::Watch => Some(0),
            Op::Publish | Op::PublishCas | Op::Rollback | Op::Delete | Op::Promote | Op::Abort => {
                Some(1)
            }
            Op::PublishRetention | Op::SetOptions | Op::Purge => Some(2),
        }
    }
}

async fn start_with_auth(c: &Coordinator, dir: &Path) -> ConfigSvc {
    let flags = auth_flags(dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ConfigSvc::start_with(&c.url(), "127.0.0.1:0", &flags).await
}

/// Root prepares `key` for `op`: versions 1 and 2, plus a rollout candidate for promote and
/// abort, or a delete for purge.
async fn seed(g: &mut Grpc<Channel>, key: &str, op: Op) {
    let it = item(NS, GROUP, key);
    for content in ["one", "two"] {
        g.publish(authed(publish_req(&it, pb::Format::Text, content), ROOT))
            .await
            .expect("root publishes");
    }
    match op {
        Op::Promote | Op::Abort => {
            let mut req = publish_req(&it, pb::Format::Text, "three");
            req.rollout = Some(pb::RolloutRule {
                labels: [("zone".to_owned(), "a".to_owned())].into_iter().collect(),
                percentage: None,
            });
            g.publish(authed(req, ROOT))
                .await
                .expect("root starts a rollout");
        }
        Op::Purge => {
            g.delete(authed(
                pb::DeleteRequest {
                    item: Some(it),
                    expected_version: None,
                },
                ROOT,
            ))
            .await
            .expect("root deletes");
        }
        _ => {}
    }
}

async fn grpc_op(g: &mut Grpc<Channel>, op: Op, token: &str, key: &str) -> bool {
    let it = || Some(item(NS, GROUP, key));
    let r = match op {
        Op::Get | Op::GetVersion | Op::GetRaw => g
            .get(authed(
                pb::GetRequest {
                    item: it(),
                    version: if op == Op::Get { 0 } else { 1 },
                    client: None,
                },
                token,
            ))
            .await
            .map(drop),
        Op::List => g
            .list(authed(
                pb::ListRequest {
                    namespace: NS.into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        Op::History => g
            .history(authed(
                pb::HistoryRequest {
                    item: it(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        Op::Diff => g
            .diff(authed(
                pb::DiffRequest {
                    item: it(),
                    from_version: 1,
                    to_version: 2,
                },
                token,
            ))
            .await
            .map(drop),
        Op::Watch => match g
            .watch(authed(
                pb::WatchRequest {
                    items: vec![item(NS, GROUP, key)],
                    ..Default::default()
                },
                token,
            ))
            .await
        {
            Ok(s) => within(T, "first watch message", s.into_inner().message())
                .await
                .map(|m| assert!(m.is_some(), "the current version")),
            Err(e) => Err(e),
        },
        Op::Validate => g
            .validate(authed(
                pb::ValidateRequest {
                    format: pb::Format::Json as i32,
                    content: "{}".into(),
                    schema: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        Op::Publish | Op::PublishCas | Op::PublishRetention => {
            let mut req = publish_req(&item(NS, GROUP, key), pb::Format::Text, "three");
            match op {
                Op::PublishCas => req.expected_version = Some(2),
                Op::PublishRetention => req.retention = Some(50),
                _ => {}
            }
            g.publish(authed(req, token)).await.map(drop)
        }
        Op::Rollback => g
            .rollback(authed(
                pb::RollbackRequest {
                    item: it(),
                    version: 1,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        Op::Delete => g
            .delete(authed(
                pb::DeleteRequest {
                    item: it(),
                    expected_version: None,
                },
                token,
            ))
            .await
            .map(|r| assert!(r.into_inner().deleted)),
        Op::Promote => g
            .promote(authed(
                pb::PromoteRequest {
                    item: it(),
                    author: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        Op::Abort => g
            .abort(authed(
                pb::AbortRequest {
                    item: it(),
                    author: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        Op::SetOptions => g
            .set_options(authed(
                pb::SetOptionsRequest {
                    item: it(),
                    schema: None,
                    retention: Some(50),
                },
                token,
            ))
            .await
            .map(drop),
        Op::Purge => g
            .purge(authed(pb::PurgeRequest { item: it() }, token))
            .await
            .map(drop),
    };
    grpc_verdict(op.name(), r)
}

async fn rest_op(svc: &ConfigSvc, op: Op, token: &str, key: &str) -> bool {
    let i = format!("/v1/namespaces/{NS}/groups/{GROUP}/items/{key}");
    let (method, path, body): (&str, String, Option<Value>) = match op {
        Op::Get => ("GET", i, None),
        Op::GetVersion => ("GET", format!("{i}/versions/1"), None),
        Op::GetRaw => ("GET", format!("{i}/raw"), None),
        Op::List => ("GET", format!("/v1/namespaces/{NS}/items"), None),
        Op::History => ("GET", format!("{i}/versions"), None),
        Op::Diff => ("GET", format!("{i}/diff?from=1&to=2"), None),
        Op::Watch => {
            let path = format!("/v1/namespaces/{NS}/watch?item={GROUP}/{key}");
            let (status, body) = http_status(svc.http, &path, token).await;
            return rest_verdict(op.name(), status, &body);
        }
        Op::Validate => (
            "POST",
            "/v1/validate".into(),
            Some(json!({"format": "json", "content": "{}"})),
        ),
        Op::Publish => (
            "POST",
            format!("{i}/versions"),
            Some(json!({"content": "three"})),
        ),
        Op::PublishCas => (
            "POST",
            format!("{i}/versions"),
            Some(json!({"content": "three", "expected_version": 2})),
        ),
        Op::PublishRetention => (
            "POST",
            format!("{i}/versions"),
            Some(json!({"content": "three", "retention": 50})),
        ),
        Op::Rollback => ("POST", format!("{i}/rollback"), Some(json!({"version": 1}))),
        Op::Delete => ("DELETE", i, None),
        Op::Promote => ("POST", format!("{i}/rollout/promote"), None),
        Op::Abort => ("POST", format!("{i}/rollout/abort"), None),
        Op::SetOptions => (
            "PUT",
            format!("{i}/options"),
            Some(json!({"retention": 50})),
        ),
        Op::Purge => ("POST", format!("{i}/purge"), None),
    };
    let (status, body) = http_as(svc.http, method, &path, body.as_ref(), token).await;
    rest_verdict(op.name(), status, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_may_do_exactly_what_its_namespace_permission_allows_over_grpc_and_rest() {
    let c = Coordinator::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let svc = start_with_auth(&c, dir.path()).await;
    let mut g = svc.grpc().await;
    let mut rows = Vec::new();
    for face in ["gRPC", "REST"] {
        for op in OPS {
            let (mut got, mut want) = (Vec::new(), Vec::new());
            for (i, (_, token)) in ROLES.iter().enumerate() {
                let key = format!(
                    "{}-{}-{i}",
                    face.to_lowercase(),
                    op.name().replace([' ', '(', ')'], "")
                );
                seed(&mut g, &key, op).await;
                got.push(match face {
                    "gRPC" => grpc_op(&mut g, op, token, &key).await,
                    _ => rest_op(&svc, op, token, &key).await,
                });
                want.push(expected(i, op.level()));
            }
            rows.push(Row {
                face,
                op: op.name(),
                got,
                want,
            });
        }
    }
    print_and_check("config-svc", &rows);

    // Outside its prefix the writer may do nothing; root may do anything anywhere.
    let mut req = publish_req(&item("other", GROUP, "x"), pb::Format::Text, "v");
    req.author = "bob".into();
    let e = g
        .publish(authed(req.clone(), "tok-bob-0001"))
        .await
        .expect_err("bob outside team-*");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("bob may not publish in namespace \"other\""),
        "{e:?}"
    );
    g.publish(authed(req, ROOT)).await.expect("root anywhere");
    // A watch over items of two namespaces needs read in both.
    let two = pb::WatchRequest {
        items: vec![item(NS, GROUP, "grpc-get-1"), item("other", GROUP, "x")],
        ..Default::default()
    };
    let e = g
        .watch(authed(two, "tok-alice-0001"))
        .await
        .expect_err("alice cannot read other");
    assert_eq!(e.code(), Code::PermissionDenied);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_expired_forged_or_unknown_credentials_are_unauthenticated_in_both_faces() {
    let c = Coordinator::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let svc = start_with_auth(&c, dir.path()).await;
    let mut g = svc.grpc().await;
    let it = item(NS, GROUP, "settings");
    let path = format!("/v1/namespaces/{NS}/groups/{GROUP}/items/settings");
    for (what, header, says) in bad_credentials() {
        let mut req = tonic::Request::new(pb::GetRequest {
            item: Some(it.clone()),
            version: 0,
            client: None,
        });
        if let Some(h) = &header {
            req.metadata_mut()
                .insert("authorization", h.parse().expect("ASCII"));
        }
        assert_unauthenticated(what, g.get(req).await, says);
        assert_http_unauthenticated(svc.http, &path, what, header.as_deref(), says).await;
    }
    // A valid JWT works in both faces, for the subject it names (carol writes team-*).
    let valid = good_jwt("carol");
    g.publish(authed(publish_req(&it, pb::Format::Text, "v1"), &valid))
        .await
        .expect("carol publishes with a JWT");
    let (status, body) = http_as(svc.http, "GET", &path, None, &valid).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"]["content"], "v1");
    // The client library sends a token when built with one.
    let settings = config_svc::model::ItemRef::new(NS, GROUP, "settings");
    let with_token = ConfigClient::builder([svc.grpc_url()])
        .token(valid.as_str())
        .build()
        .expect("client");
    let fetched = within(T, "fetch", with_token.fetch(&settings))
        .await
        .expect("fetch with a token");
    assert_eq!(fetched.version.content, "v1");
    let without = ConfigClient::connect([svc.grpc_url()]).expect("client");
    let e = within(T, "fetch", without.fetch(&settings))
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The OpenAPI document and the gRPC health service need no credentials.
    let (status, _, _) = http(svc.http, "GET", "/openapi.json", None, &[]).await;
    assert_eq!(status, 200);
    let channel = Channel::from_shared(svc.grpc_url()).expect("url");
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        within(T, "connect", channel.connect())
            .await
            .expect("connect"),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health without credentials");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_is_logged_with_subject_action_and_namespace_but_never_the_token() {
    let logs = capture_logs();
    let c = Coordinator::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let svc = start_with_auth(&c, dir.path()).await;
    let (status, body) = http_as(
        svc.http,
        "POST",
        "/v1/namespaces/team-logged/groups/g/items/k/purge",
        None,
        "tok-bob-0001",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _, _) = http(
        svc.http,
        "GET",
        "/v1/namespaces/team-logged/items",
        None,
        &[("Authorization", "Bearer tok-secret-that-must-not-leak")],
    )
    .await;
    assert_eq!(status, 401);
    svc.stop().await;
    assert_denial_logged(
        &logs,
        "bob",
        "purge",
        "team-logged",
        &["tok-bob-0001", "tok-secret-that-must-not-leak"],
    );
}
