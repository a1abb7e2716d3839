//! Authentication and per-namespace authorisation of registry-svc, through the real gRPC and
//! REST faces: the role × operation matrix (printed, then asserted), bad and missing
//! credentials, and what a denial logs.

use std::path::Path;

use proto::registry_v1 as pb;
use proto::registry_v1::registry_client::RegistryClient as Grpc;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

use crate::auth_support::{
    ROLES, ROOT, Row, assert_denial_logged, assert_http_unauthenticated, assert_unauthenticated,
    auth_flags, authed, bad_credentials, capture_logs, expected, good_jwt, grpc_verdict, http,
    http_as, http_status, print_and_check, rest_verdict,
};
use crate::coord::{Coordinator, within};
use crate::harness::{Registry, T, instance};

const NS: &str = "team-a";
const SVC: &str = "web";

/// The operations of the matrix and the permission each needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Discover,
    ListServices,
    Watch,
    GetOptions,
    Register,
    Heartbeat,
    KeepAlive,
    Deregister,
    SetOptions,
}

const OPS: [Op; 9] = [
    Op::Discover,
    Op::ListServices,
    Op::Watch,
    Op::GetOptions,
    Op::Register,
    Op::Heartbeat,
    Op::KeepAlive,
    Op::Deregister,
    Op::SetOptions,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Discover => "discover",
            Op::ListServices => "list services",
            Op::Watch => "watch",
            Op::GetOptions => "get options",
            Op::Register => "register",
            Op::Heartbeat => "heartbeat",
            Op::KeepAlive => "keep-alive stream",
            Op::Deregister => "deregister",
            Op::SetOptions => "set options",
        }
    }

    /// 0 read, 1 write, 2 admin (as `auth_support::expected` counts).
    fn level(self) -> usize {
        match self {
            Op::Discover | Op::ListServices | Op::Watch | Op::GetOptions => 0,
            Op::Register | Op::Heartbeat | Op::KeepAlive | Op::Deregister => 1,
            Op::SetOptions => 2,
        }
    }
}

async fn start_with_auth(c: &Coordinator, dir: &Path) -> Registry {
    let flags = auth_flags(dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Registry::start_with(&c.url(), "127.0.0.1:0", &flags).await
}

fn reference(id: &str) -> pb::InstanceRef {
    pb::InstanceRef {
        namespace: NS.into(),
        service: SVC.into(),
        instance_id: id.into(),
    }
}

async fn grpc_op(g: &mut Grpc<Channel>, op: Op, token: &str, id: &str) -> bool {
    let r = match op {
        Op::Discover => g
            .discover(authed(
                pb::DiscoverRequest {
                    namespace: NS.into(),
                    service: SVC.into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        Op::ListServices => g
            .list_services(authed(
                pb::ListServicesRequest {
                    namespace: NS.into(),
                },
                token,
            ))
            .await
            .map(drop),
        Op::Watch => match g
            .watch(authed(
                pb::WatchRequest {
                    namespace: NS.into(),
                    service: SVC.into(),
                    after_revision: 0,
                },
                token,
            ))
            .await
        {
            Ok(s) => {
                let first = within(T, "first watch message", s.into_inner().message()).await;
                first.map(|m| assert!(m.is_some(), "a snapshot"))
            }
            Err(e) => Err(e),
        },
        Op::GetOptions => g
            .get_service_options(authed(
                pb::GetServiceOptionsRequest {
                    namespace: NS.into(),
                    service: SVC.into(),
                },
                token,
            ))
            .await
            .map(drop),
        Op::Register => g
            .register(authed(
                pb::RegisterRequest {
                    instance: Some(instance(NS, SVC, &format!("{id}-new"), 9)),
                },
                token,
            ))
            .await
            .map(drop),
        Op::Heartbeat => g
            .heartbeat(authed(
                pb::HeartbeatRequest {
                    instance: Some(reference(id)),
                },
                token,
            ))
            .await
            .map(drop),
        Op::KeepAlive => {
            let beats = tokio_stream::iter(vec![pb::HeartbeatRequest {
                instance: Some(reference(id)),
            }]);
            match g.keep_alive(authed(beats, token)).await {
                Ok(s) => within(T, "keep-alive answer", s.into_inner().message())
                    .await
                    .map(|m| assert!(m.is_some(), "an answer")),
                Err(e) => Err(e),
            }
        }
        Op::Deregister => g
            .deregister(authed(
                pb::DeregisterRequest {
                    instance: Some(reference(id)),
                },
                token,
            ))
            .await
            .map(|r| assert!(r.into_inner().existed, "{id} was registered")),
        Op::SetOptions => g
            .set_service_options(authed(
                pb::SetServiceOptionsRequest {
                    options: Some(pb::ServiceOptions {
                        namespace: NS.into(),
                        service: SVC.into(),
                        protect_threshold: 0.0,
                    }),
                },
                token,
            ))
            .await
            .map(drop),
    };
    grpc_verdict(op.name(), r)
}

async fn rest_op(r: &Registry, op: Op, token: &str, id: &str) -> Option<bool> {
    let base = format!("/v1/namespaces/{NS}/services/{SVC}");
    let (method, path, body) = match op {
        Op::Discover => ("GET", format!("{base}/instances"), None),
        Op::ListServices => ("GET", format!("/v1/namespaces/{NS}/services"), None),
        Op::Watch => {
            let path = format!("/v1/namespaces/{NS}/watch?service={SVC}");
            let (status, body) = http_status(r.http, &path, token).await;
            return Some(rest_verdict(op.name(), status, &body));
        }
        Op::GetOptions => ("GET", format!("{base}/options"), None),
        Op::Register => (
            "POST",
            "/v1/instances".to_owned(),
            Some(
                json!({"namespace": NS, "service": SVC, "instance_id": format!("{id}-new"),
                        "address": "127.0.0.1", "port": 9, "ttl_seconds": 10}),
            ),
        ),
        Op::Heartbeat => ("POST", format!("{base}/instances/{id}/heartbeat"), None),
        Op::KeepAlive => return None,
        Op::Deregister => ("DELETE", format!("{base}/instances/{id}"), None),
        Op::SetOptions => (
            "PUT",
            format!("{base}/options"),
            Some(json!({"protect_threshold": 0.0})),
        ),
    };
    let (status, body) = http_as(r.http, method, &path, body.as_ref(), token).await;
    if op == Op::Deregister && status == 200 {
        assert_eq!(body["existed"], true, "{id} was registered");
    }
    Some(rest_verdict(op.name(), status, &body))
}

/// Root registers `id` in `team-a/web`, so that heartbeat and deregister have a target.
async fn seed(g: &mut Grpc<Channel>, id: &str) {
    g.register(authed(
        pb::RegisterRequest {
            instance: Some(instance(NS, SVC, id, 8080)),
        },
        ROOT,
    ))
    .await
    .expect("root registers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_may_do_exactly_what_its_namespace_permission_allows_over_grpc_and_rest() {
    let c = Coordinator::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let r = start_with_auth(&c, dir.path()).await;
    let mut g = r.grpc().await;
    let mut rows = Vec::new();
    for face in ["gRPC", "REST"] {
        for op in OPS {
            let (mut got, mut want) = (Vec::new(), Vec::new());
            for (i, (_, token)) in ROLES.iter().enumerate() {
                let id = format!(
                    "{}-{}-{i}",
                    face.to_lowercase(),
                    op.name().replace(' ', "-")
                );
                seed(&mut g, &id).await;
                let verdict = match face {
                    "gRPC" => Some(grpc_op(&mut g, op, token, &id).await),
                    _ => rest_op(&r, op, token, &id).await,
                };
                if let Some(v) = verdict {
                    got.push(v);
                    want.push(expected(i, Some(op.level())));
                }
            }
            if !got.is_empty() {
                rows.push(Row {
                    face,
                    op: op.name(),
                    got,
                    want,
                });
            }
        }
    }
    assert_eq!(rows.len(), 9 + 8, "every gRPC and REST operation was tried");
    print_and_check("registry-svc", &rows);

    // Outside its prefix the writer may do nothing; root may do anything anywhere.
    let outside = |token| {
        authed(
            pb::RegisterRequest {
                instance: Some(instance("other", SVC, "o1", 1)),
            },
            token,
        )
    };
    let e = g
        .register(outside("tok-bob-0001"))
        .await
        .expect_err("bob outside team-*");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("bob may not register in namespace \"other\""),
        "{e:?}"
    );
    g.register(outside(ROOT)).await.expect("root anywhere");
    // Listing namespaces is never denied: it shows what the caller may read.
    for (token, want) in [
        ("tok-alice-0001", vec!["team-a"]),
        (ROOT, vec!["other", "team-a"]),
        ("tok-nobody-0001", vec![]),
    ] {
        let ns = g
            .list_namespaces(authed(pb::ListNamespacesRequest {}, token))
            .await
            .expect("list namespaces")
            .into_inner()
            .namespaces;
        assert_eq!(ns, want, "namespaces for {token}");
        let (status, body) = http_as(r.http, "GET", "/v1/namespaces", None, token).await;
        assert_eq!(status, 200);
        assert_eq!(
            body["namespaces"],
            json!(want),
            "REST namespaces for {token}"
        );
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_expired_forged_or_unknown_credentials_are_unauthenticated_in_both_faces() {
    let c = Coordinator::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let r = start_with_auth(&c, dir.path()).await;
    let mut g = r.grpc().await;
    let path = format!("/v1/namespaces/{NS}/services/{SVC}/instances");
    for (what, header, says) in bad_credentials() {
        let mut req = tonic::Request::new(pb::DiscoverRequest {
            namespace: NS.into(),
            service: SVC.into(),
            ..Default::default()
        });
        if let Some(h) = &header {
            req.metadata_mut()
                .insert("authorization", h.parse().expect("ASCII"));
        }
        assert_unauthenticated(what, g.discover(req).await, says);
        assert_http_unauthenticated(r.http, &path, what, header.as_deref(), says).await;
    }
    // A valid JWT works in both faces, for the subject it names (carol writes team-*).
    let valid = good_jwt("carol");
    g.register(authed(
        pb::RegisterRequest {
            instance: Some(instance(NS, SVC, "jwt-1", 1)),
        },
        &valid,
    ))
    .await
    .expect("carol registers with a JWT");
    let (status, body) = http_as(r.http, "GET", &path, None, &valid).await;
    assert_eq!(status, 200, "{body}");
    // The OpenAPI document and the gRPC health service need no credentials.
    let (status, _, _) = http(r.http, "GET", "/openapi.json", None, &[]).await;
    assert_eq!(status, 200);
    let channel = Channel::from_shared(r.grpc_url()).expect("url");
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        within(T, "connect", channel.connect())
            .await
            .expect("connect"),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health without credentials");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_is_logged_with_subject_action_and_namespace_but_never_the_token() {
    let logs = capture_logs();
    let c = Coordinator::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let r = start_with_auth(&c, dir.path()).await;
    let mut g = r.grpc().await;
    let e = g
        .register(authed(
            pb::RegisterRequest {
                instance: Some(instance("team-logged", SVC, "l1", 1)),
            },
            "tok-alice-0001",
        ))
        .await
        .expect_err("alice only reads");
    assert_eq!(e.code(), Code::PermissionDenied);
    let unknown = g
        .discover(authed(
            pb::DiscoverRequest {
                namespace: NS.into(),
                service: SVC.into(),
                ..Default::default()
            },
            "tok-secret-that-must-not-leak",
        ))
        .await;
    assert_unauthenticated("unknown token", unknown, "");
    r.stop().await;
    assert_denial_logged(
        &logs,
        "alice",
        "register",
        "team-logged",
        &["tok-alice-0001", "tok-secret-that-must-not-leak"],
    );
}
