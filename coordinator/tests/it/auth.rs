//! Authentication and RBAC through the real gRPC API: the authorisation matrix (every role ×
//! every operation, printed as a table), tokens (expired, tampered, stale after a password
//! change, JWT), limits, auth state across a process restart and on a 3-member cluster.

use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser as _;
use std::time::Duration;

use proto::authpb;
use proto::etcdserverpb::auth_client::AuthClient;
use proto::etcdserverpb::cluster_client::ClusterClient;
use proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::etcdserverpb::request_op::Request as Rop;
use proto::etcdserverpb::watch_client::WatchClient;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::*;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::harness::{Cluster, Process, Server, channel, wait_until, within};

const ROOT_PW: &str = "root-secret-1";
const READER_PW: &str = "reader-secret-1";
const WRITER_PW: &str = "writer-secret-1";

/// A request carrying `token` (as etcd clients send it), or none.
fn with<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("token", t.parse().expect("token is ASCII"));
    }
    r
}

fn prefix_end(p: &str) -> Vec<u8> {
    let mut e = p.as_bytes().to_vec();
    let last = e.len() - 1;
    e[last] += 1;
    e
}

fn perm(kind: authpb::permission::Type, key: &str, end: Vec<u8>) -> authpb::Permission {
    authpb::Permission {
        perm_type: kind as i32,
        key: key.as_bytes().to_vec(),
        range_end: end,
    }
}

/// gRPC clients on one channel.
#[derive(Clone)]
struct Clients {
    kv: KvClient<Channel>,
    auth: AuthClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
    maint: MaintenanceClient<Channel>,
    cluster: ClusterClient<Channel>,
}

impl Clients {
    fn new(ch: Channel) -> Clients {
        Clients {
            kv: KvClient::new(ch.clone()),
            auth: AuthClient::new(ch.clone()),
            lease: LeaseClient::new(ch.clone()),
            watch: WatchClient::new(ch.clone()),
            maint: MaintenanceClient::new(ch.clone()),
            cluster: ClusterClient::new(ch),
        }
    }

    async fn token(&mut self, user: &str, pw: &str) -> Result<String, Status> {
        let r = self
            .auth
            .authenticate(AuthenticateRequest {
                name: user.into(),
                password: pw.into(),
            })
            .await?;
        Ok(r.into_inner().token)
    }

    async fn put(
        &mut self,
        tok: Option<&str>,
        k: &str,
        v: &str,
        lease: i64,
    ) -> Result<i64, Status> {
        let r = self
            .kv
            .put(with(
                PutRequest {
                    key: k.into(),
                    value: v.into(),
                    lease,
                    ..Default::default()
                },
                tok,
            ))
            .await?;
        Ok(r.into_inner().header.map(|h| h.revision).unwrap_or(0))
    }

    async fn get(&mut self, tok: Option<&str>, k: &str) -> Result<RangeResponse, Status> {
        Ok(self
            .kv
            .range(with(
                RangeRequest {
                    key: k.into(),
                    ..Default::default()
                },
                tok,
            ))
            .await?
            .into_inner())
    }

    async fn grant(&mut self, tok: Option<&str>) -> Result<i64, Status> {
        Ok(self
            .lease
            .lease_grant(with(LeaseGrantRequest { ttl: 600, id: 0 }, tok))
            .await?
            .into_inner()
            .id)
    }

    /// Opens a watch stream with `tok` and creates one watcher; Ok if it was created, the
    /// cancel reason as a status otherwise.
    async fn watch(&mut self, tok: Option<&str>, key: &str, end: Vec<u8>) -> Result<(), Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.into(),
                range_end: end,
                ..Default::default()
            })),
        })
        .await
        .expect("queue the create request");
        let mut stream = self
            .watch
            .watch(with(tokio_stream::wrappers::ReceiverStream::new(rx), tok))
            .await?
            .into_inner();
        let first = within(
            Duration::from_secs(10),
            "watch create answer",
            stream.next(),
        )
        .await
        .expect("an answer to the create request")?;
        drop(tx);
        assert!(first.created, "first answer is the creation: {first:?}");
        if first.canceled {
            let code = if first.cancel_reason.contains("permission denied") {
                Code::PermissionDenied
            } else {
                Code::InvalidArgument
            };
            return Err(Status::new(code, first.cancel_reason));
        }
        Ok(())
    }
}

/// Sets up users and roles as etcd's docs do, with auth still disabled:
/// `root` (root role), `reader` (READ on prefix `app/`), `writer` (READWRITE on prefix `app/`).
async fn setup_users(c: &mut Clients) {
    let a = &mut c.auth;
    for (u, pw) in [
        ("root", ROOT_PW),
        ("reader", READER_PW),
        ("writer", WRITER_PW),
    ] {
        a.user_add(AuthUserAddRequest {
            name: u.into(),
            password: pw.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("user add {u}: {e}"));
    }
    for (role, kind) in [
        ("reader", authpb::permission::Type::Read),
        ("writer", authpb::permission::Type::Readwrite),
    ] {
        a.role_add(AuthRoleAddRequest { name: role.into() })
            .await
            .expect("role add");
        a.role_grant_permission(AuthRoleGrantPermissionRequest {
            name: role.into(),
            perm: Some(perm(kind, "app/", prefix_end("app/"))),
        })
        .await
        .expect("grant permission");
        a.user_grant_role(AuthUserGrantRoleRequest {
            user: role.into(),
            role: role.into(),
        })
        .await
        .expect("grant role");
    }
    a.user_grant_role(AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .expect("grant root");
}

/// Every operation of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    RangeKey,
    RangePrefix,
    RangeOutside,
    RangeFromKey,
    RangeAtRevision,
    RangeAtRevisionOutside,
    Put,
    PutPrevKv,
    PutOutside,
    Delete,
    DeletePrefixPrevKv,
    DeleteOutside,
    TxnInside,
    TxnReadOnly,
    TxnCompareOutside,
    TxnSuccessOutside,
    TxnFailureOutside,
    TxnNestedOutside,
    TxnReadOnlyFailureOutside,
    WatchKey,
    WatchPrefix,
    WatchFromKey,
    WatchOutside,
    LeaseGrant,
    PutWithLease,
    PutWithLeaseHoldingOutside,
    LeaseRevoke,
    LeaseRevokeHoldingOutside,
    LeaseTtl,
    LeaseTtlKeys,
    LeaseTtlKeysOutside,
    LeaseList,
    LeaseKeepAlive,
    MemberList,
    MemberAdd,
    MemberRemove,
    Status,
    AlarmList,
    Defragment,
    HashKv,
    Snapshot,
    Compact,
    AuthStatus,
    UserGetSelf,
    UserGetRoot,
    UserList,
    UserAdd,
    UserChangePassword,
    UserGrantRole,
    RoleGetReader,
    RoleList,
    RoleAdd,
    RoleGrantPermission,
    AuthDisable,
}

use Op::*;

/// The matrix: operation, its label, and whether none/reader/writer/root may do it.
const MATRIX: &[(Op, &str, [bool; 4])] = &[
    (RangeKey, "Range app/a", [false, true, true, true]),
    (RangePrefix, "Range prefix app/", [false, true, true, true]),
    (RangeOutside, "Range other/x", [false, false, false, true]),
    (
        RangeFromKey,
        "Range from-key app/",
        [false, false, false, true],
    ),
    (
        RangeAtRevision,
        "Range app/a at a past revision",
        [false, true, true, true],
    ),
    (
        RangeAtRevisionOutside,
        "Range other/x at a past revision",
        [false, false, false, true],
    ),
    (Put, "Put app/k", [false, false, true, true]),
    (PutPrevKv, "Put app/k prev_kv", [false, false, true, true]),
    (PutOutside, "Put other/k", [false, false, false, true]),
    (Delete, "DeleteRange app/k", [false, false, true, true]),
    (
        DeletePrefixPrevKv,
        "DeleteRange prefix app/tmp/ prev_kv",
        [false, false, true, true],
    ),
    (
        DeleteOutside,
        "DeleteRange other/k",
        [false, false, false, true],
    ),
    (
        TxnInside,
        "Txn cmp app/a, put app/t",
        [false, false, true, true],
    ),
    (
        TxnReadOnly,
        "Txn cmp app/a, get app/a (read-only)",
        [false, true, true, true],
    ),
    (
        TxnCompareOutside,
        "Txn cmp other/x, put app/t",
        [false, false, false, true],
    ),
    (
        TxnSuccessOutside,
        "Txn success put other/t",
        [false, false, false, true],
    ),
    (
        TxnFailureOutside,
        "Txn failure (not run) put other/t",
        [false, false, false, true],
    ),
    (
        TxnNestedOutside,
        "Txn nested txn put other/t",
        [false, false, false, true],
    ),
    (
        TxnReadOnlyFailureOutside,
        "Txn read-only, failure get other/x",
        [false, false, false, true],
    ),
    (WatchKey, "Watch app/a", [false, true, true, true]),
    (WatchPrefix, "Watch prefix app/", [false, true, true, true]),
    (
        WatchFromKey,
        "Watch from-key app/",
        [false, false, false, true],
    ),
    (
        WatchOutside,
        "Watch prefix other/",
        [false, false, false, true],
    ),
    (LeaseGrant, "LeaseGrant", [false, true, true, true]),
    (
        PutWithLease,
        "Put app/l with a fresh lease",
        [false, false, true, true],
    ),
    (
        PutWithLeaseHoldingOutside,
        "Put app/l2 with a lease holding other/",
        [false, false, false, true],
    ),
    (
        LeaseRevoke,
        "LeaseRevoke (lease holds app/r)",
        [false, false, true, true],
    ),
    (
        LeaseRevokeHoldingOutside,
        "LeaseRevoke (lease holds other/r)",
        [false, false, false, true],
    ),
    (LeaseTtl, "LeaseTimeToLive", [false, true, true, true]),
    (
        LeaseTtlKeys,
        "LeaseTimeToLive keys (app/leased)",
        [false, true, true, true],
    ),
    (
        LeaseTtlKeysOutside,
        "LeaseTimeToLive keys (other/leased)",
        [false, false, false, true],
    ),
    (LeaseList, "LeaseLeases", [false, true, true, true]),
    (LeaseKeepAlive, "LeaseKeepAlive", [false, true, true, true]),
    (MemberList, "MemberList", [true, true, true, true]),
    (MemberAdd, "MemberAdd", [false, false, false, true]),
    (MemberRemove, "MemberRemove", [false, false, false, true]),
    (Status, "Maintenance Status", [true, true, true, true]),
    (
        AlarmList,
        "Maintenance Alarm (get)",
        [false, false, false, true],
    ),
    (
        Defragment,
        "Maintenance Defragment",
        [false, false, false, true],
    ),
    (HashKv, "Maintenance HashKV", [false, false, false, true]),
    (
        Snapshot,
        "Maintenance Snapshot",
        [false, false, false, true],
    ),
    (Compact, "Compact", [false, false, false, true]),
    (AuthStatus, "AuthStatus", [true, true, true, true]),
    (UserGetSelf, "UserGet (self)", [false, true, true, true]),
    (UserGetRoot, "UserGet root", [false, false, false, true]),
    (UserList, "UserList", [false, false, false, true]),
    (UserAdd, "UserAdd", [false, false, false, true]),
    (
        UserChangePassword,
        "UserChangePassword",
        [false, false, false, true],
    ),
    (UserGrantRole, "UserGrantRole", [false, false, false, true]),
    (RoleGetReader, "RoleGet reader", [false, true, false, true]),
    (RoleList, "RoleList", [false, false, false, true]),
    (RoleAdd, "RoleAdd", [false, false, false, true]),
    (
        RoleGrantPermission,
        "RoleGrantPermission",
        [false, false, false, true],
    ),
    (AuthDisable, "AuthDisable", [false, false, false, true]),
];

const ROLES: [&str; 4] = ["none", "reader", "writer", "root"];

struct Env {
    c: Clients,
    root: String,
    seed_rev: i64,
    lease_in: i64,
    lease_out: i64,
    n: AtomicU64,
}

fn cmp_version(key: &str) -> Compare {
    Compare {
        result: CompareResult::Greater as i32,
        target: CompareTarget::Version as i32,
        key: key.into(),
        range_end: vec![],
        target_union: Some(TargetUnion::Version(0)),
    }
}

fn put_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Rop::RequestPut(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
    }
}

fn get_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Rop::RequestRange(RangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

impl Env {
    fn unique(&self) -> u64 {
        self.n.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh lease (granted by root) holding `key`.
    async fn lease_holding(&self, key: &str) -> i64 {
        let mut c = self.c.clone();
        let root = Some(self.root.as_str());
        let id = c.grant(root).await.expect("root grants");
        c.put(root, key, "v", id)
            .await
            .expect("root puts with lease");
        id
    }

    async fn run(&self, op: Op, tok: Option<&str>) -> Result<(), Status> {
        let mut c = self.c.clone();
        let range = |key: &str, end: Vec<u8>, revision: i64| RangeRequest {
            key: key.into(),
            range_end: end,
            revision,
            ..Default::default()
        };
        let txn =
            |compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>| TxnRequest {
                compare,
                success,
                failure,
            };
        match op {
            RangeKey => {
                c.kv.range(with(range("app/a", vec![], 0), tok))
                    .await
                    .map(drop)
            }
            RangePrefix => {
                c.kv.range(with(range("app/", prefix_end("app/"), 0), tok))
                    .await
                    .map(drop)
            }
            RangeOutside => {
                c.kv.range(with(range("other/x", vec![], 0), tok))
                    .await
                    .map(drop)
            }
            RangeFromKey => {
                c.kv.range(with(range("app/", vec![0], 0), tok))
                    .await
                    .map(drop)
            }
            RangeAtRevision => {
                c.kv.range(with(range("app/a", vec![], self.seed_rev), tok))
                    .await
                    .map(|r| assert_eq!(r.into_inner().kvs[0].value, b"seed"))
            }
            RangeAtRevisionOutside => {
                c.kv.range(with(range("other/x", vec![], self.seed_rev), tok))
                    .await
                    .map(drop)
            }
            Put => c.put(tok, "app/k", "v", 0).await.map(drop),
            PutPrevKv => {
                c.kv.put(with(
                    PutRequest {
                        key: "app/k".into(),
                        value: b"v2".to_vec(),
                        prev_kv: true,
                        ..Default::default()
                    },
                    tok,
                ))
                .await
                .map(drop)
            }
            PutOutside => c.put(tok, "other/k", "v", 0).await.map(drop),
            Delete => {
                c.kv.delete_range(with(
                    DeleteRangeRequest {
                        key: "app/k".into(),
                        ..Default::default()
                    },
                    tok,
                ))
                .await
                .map(drop)
            }
            DeletePrefixPrevKv => {
                c.kv.delete_range(with(
                    DeleteRangeRequest {
                        key: "app/tmp/".into(),
                        range_end: prefix_end("app/tmp/"),
                        prev_kv: true,
                    },
                    tok,
                ))
                .await
                .map(drop)
            }
            DeleteOutside => {
                c.kv.delete_range(with(
                    DeleteRangeRequest {
                        key: "other/k".into(),
                        ..Default::default()
                    },
                    tok,
                ))
                .await
                .map(drop)
            }
            TxnInside => {
                c.kv.txn(with(
                    txn(vec![cmp_version("app/a")], vec![put_op("app/t")], vec![]),
                    tok,
                ))
                .await
                .map(drop)
            }
            TxnReadOnly => {
                c.kv.txn(with(
                    txn(vec![cmp_version("app/a")], vec![get_op("app/a")], vec![]),
                    tok,
                ))
                .await
                .map(drop)
            }
            TxnCompareOutside => {
                c.kv.txn(with(
                    txn(vec![cmp_version("other/x")], vec![put_op("app/t")], vec![]),
                    tok,
                ))
                .await
                .map(drop)
            }
            TxnSuccessOutside => {
                c.kv.txn(with(
                    txn(vec![cmp_version("app/a")], vec![put_op("other/t")], vec![]),
                    tok,
                ))
                .await
                .map(drop)
            }
            TxnFailureOutside => {
                c.kv.txn(with(
                    // app/a exists, so the success branch runs; the failure branch is still
                    // checked (etcd checks both, so a compare's outcome cannot leak).
                    txn(
                        vec![cmp_version("app/a")],
                        vec![put_op("app/t")],
                        vec![put_op("other/t")],
                    ),
                    tok,
                ))
                .await
                .map(drop)
            }
            TxnNestedOutside => {
                c.kv.txn(with(
                    txn(
                        vec![],
                        vec![RequestOp {
                            request: Some(Rop::RequestTxn(txn(
                                vec![cmp_version("app/a")],
                                vec![put_op("app/t")],
                                vec![put_op("other/t")],
                            ))),
                        }],
                        vec![],
                    ),
                    tok,
                ))
                .await
                .map(drop)
            }
            TxnReadOnlyFailureOutside => {
                c.kv.txn(with(
                    txn(
                        vec![cmp_version("app/a")],
                        vec![get_op("app/a")],
                        vec![get_op("other/x")],
                    ),
                    tok,
                ))
                .await
                .map(drop)
            }
            WatchKey => c.watch(tok, "app/a", vec![]).await,
            WatchPrefix => c.watch(tok, "app/", prefix_end("app/")).await,
            WatchFromKey => c.watch(tok, "app/", vec![0]).await,
            WatchOutside => c.watch(tok, "other/", prefix_end("other/")).await,
            LeaseGrant => c.grant(tok).await.map(drop),
            PutWithLease => {
                let id = c.grant(Some(&self.root)).await.expect("root grants");
                c.put(tok, "app/l", "v", id).await.map(drop)
            }
            PutWithLeaseHoldingOutside => c.put(tok, "app/l2", "v", self.lease_out).await.map(drop),
            LeaseRevoke => {
                let id = self.lease_holding(&format!("app/r{}", self.unique())).await;
                c.lease
                    .lease_revoke(with(LeaseRevokeRequest { id }, tok))
                    .await
                    .map(drop)
            }
            LeaseRevokeHoldingOutside => {
                let id = self
                    .lease_holding(&format!("other/r{}", self.unique()))
                    .await;
                c.lease
                    .lease_revoke(with(LeaseRevokeRequest { id }, tok))
                    .await
                    .map(drop)
            }
            LeaseTtl => c
                .lease
                .lease_time_to_live(with(
                    LeaseTimeToLiveRequest {
                        id: self.lease_in,
                        keys: false,
                    },
                    tok,
                ))
                .await
                .map(drop),
            LeaseTtlKeys => c
                .lease
                .lease_time_to_live(with(
                    LeaseTimeToLiveRequest {
                        id: self.lease_in,
                        keys: true,
                    },
                    tok,
                ))
                .await
                .map(|r| assert_eq!(r.into_inner().keys, vec![b"app/leased".to_vec()])),
            LeaseTtlKeysOutside => c
                .lease
                .lease_time_to_live(with(
                    LeaseTimeToLiveRequest {
                        id: self.lease_out,
                        keys: true,
                    },
                    tok,
                ))
                .await
                .map(drop),
            LeaseList => c
                .lease
                .lease_leases(with(LeaseLeasesRequest {}, tok))
                .await
                .map(drop),
            LeaseKeepAlive => {
                let req = LeaseKeepAliveRequest { id: self.lease_in };
                let mut s = c
                    .lease
                    .lease_keep_alive(with(tokio_stream::iter(vec![req]), tok))
                    .await?
                    .into_inner();
                let r = s.next().await.expect("an answer")?;
                assert!(r.ttl > 0, "{r:?}");
                Ok(())
            }
            MemberList => c
                .cluster
                .member_list(with(MemberListRequest::default(), tok))
                .await
                .map(drop),
            // A single member cannot change membership: past the permission check, root is
            // told so (Unimplemented), which counts as allowed here.
            MemberAdd => past_auth(
                c.cluster
                    .member_add(with(
                        MemberAddRequest {
                            peer_ur_ls: vec!["http://127.0.0.1:1".into()],
                            is_learner: true,
                        },
                        tok,
                    ))
                    .await
                    .map(drop),
                Code::Unimplemented,
            ),
            MemberRemove => past_auth(
                c.cluster
                    .member_remove(with(MemberRemoveRequest { id: 42 }, tok))
                    .await
                    .map(drop),
                Code::Unimplemented,
            ),
            Status => c.maint.status(with(StatusRequest {}, tok)).await.map(drop),
            AlarmList => c
                .maint
                .alarm(with(AlarmRequest::default(), tok))
                .await
                .map(drop),
            Defragment => c
                .maint
                .defragment(with(DefragmentRequest {}, tok))
                .await
                .map(drop),
            HashKv => c
                .maint
                .hash_kv(with(HashKvRequest { revision: 0 }, tok))
                .await
                .map(drop),
            Snapshot => {
                let mut s = c
                    .maint
                    .snapshot(with(SnapshotRequest {}, tok))
                    .await?
                    .into_inner();
                s.next().await.expect("a first chunk").map(drop)
            }
            Compact => {
                let rev = c.put(Some(&self.root), "app/compact-bump", "v", 0).await?;
                c.kv.compact(with(
                    CompactionRequest {
                        revision: rev,
                        physical: false,
                    },
                    tok,
                ))
                .await
                .map(drop)
            }
            AuthStatus => c
                .auth
                .auth_status(with(AuthStatusRequest {}, tok))
                .await
                .map(drop),
            UserGetSelf => {
                let name = match tok {
                    None => "reader".to_string(),
                    Some(_) => self.who(tok).await,
                };
                c.auth
                    .user_get(with(AuthUserGetRequest { name }, tok))
                    .await
                    .map(drop)
            }
            UserGetRoot => c
                .auth
                .user_get(with(
                    AuthUserGetRequest {
                        name: "root".into(),
                    },
                    tok,
                ))
                .await
                .map(drop),
            UserList => c
                .auth
                .user_list(with(AuthUserListRequest {}, tok))
                .await
                .map(drop),
            UserAdd => c
                .auth
                .user_add(with(
                    AuthUserAddRequest {
                        name: format!("u{}", self.unique()),
                        password: "password-1".into(),
                        ..Default::default()
                    },
                    tok,
                ))
                .await
                .map(drop),
            UserChangePassword => c
                .auth
                .user_change_password(with(
                    AuthUserChangePasswordRequest {
                        name: "scratch".into(),
                        password: format!("password-{}", self.unique()),
                        ..Default::default()
                    },
                    tok,
                ))
                .await
                .map(drop),
            UserGrantRole => c
                .auth
                .user_grant_role(with(
                    AuthUserGrantRoleRequest {
                        user: "scratch".into(),
                        role: "reader".into(),
                    },
                    tok,
                ))
                .await
                .map(drop),
            RoleGetReader => c
                .auth
                .role_get(with(
                    AuthRoleGetRequest {
                        role: "reader".into(),
                    },
                    tok,
                ))
                .await
                .map(|r| assert_eq!(r.into_inner().perm.len(), 1)),
            RoleList => c
                .auth
                .role_list(with(AuthRoleListRequest {}, tok))
                .await
                .map(drop),
            RoleAdd => c
                .auth
                .role_add(with(
                    AuthRoleAddRequest {
                        name: format!("r{}", self.unique()),
                    },
                    tok,
                ))
                .await
                .map(drop),
            RoleGrantPermission => c
                .auth
                .role_grant_permission(with(
                    AuthRoleGrantPermissionRequest {
                        name: "scratch".into(),
                        perm: Some(perm(
                            authpb::permission::Type::Read,
                            &format!("s{}", self.unique()),
                            vec![],
                        )),
                    },
                    tok,
                ))
                .await
                .map(drop),
            AuthDisable => c
                .auth
                .auth_disable(with(AuthDisableRequest {}, tok))
                .await
                .map(drop),
        }
    }

    /// The user a token belongs to (by asking who may read themselves).
    async fn who(&self, tok: Option<&str>) -> String {
        let mut c = self.c.clone();
        for u in ["reader", "writer", "root"] {
            if c.auth
                .user_get(with(AuthUserGetRequest { name: u.into() }, tok))
                .await
                .is_ok()
            {
                return u.into();
            }
        }
        panic!("no user answers to this token")
    }
}

/// An error with `code` means the request passed the permission check and failed later for
/// another reason the test expects.
fn past_auth(r: Result<(), Status>, code: Code) -> Result<(), Status> {
    match r {
        Err(s) if s.code() == code => Ok(()),
        other => other,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorisation_matrix_over_grpc() {
    let server = Server::start().await;
    let mut c = Clients::new(channel(&server.url()).await);
    setup_users(&mut c).await;
    // Auth is still disabled: everything is allowed, no token needed.
    let seed_rev = c
        .put(None, "app/a", "seed", 0)
        .await
        .expect("put while open");
    c.put(None, "other/x", "seed", 0).await.expect("put");
    let lease_in = c.grant(None).await.expect("grant");
    c.put(None, "app/leased", "v", lease_in).await.expect("put");
    let lease_out = c.grant(None).await.expect("grant");
    c.put(None, "other/leased", "v", lease_out)
        .await
        .expect("put");
    // Authenticate is refused while auth is off, as in etcd.
    let e = c.token("root", ROOT_PW).await.expect_err("auth is off");
    assert_eq!(e.message(), "etcdserver: authentication is not enabled");
    let scratch = &mut c.auth;
    scratch
        .user_add(AuthUserAddRequest {
            name: "scratch".into(),
            password: "scratch-pw-1".into(),
            ..Default::default()
        })
        .await
        .expect("scratch user");
    scratch
        .role_add(AuthRoleAddRequest {
            name: "scratch".into(),
        })
        .await
        .expect("scratch role");
    c.auth
        .auth_enable(AuthEnableRequest {})
        .await
        .expect("auth enable");

    let root = c.token("root", ROOT_PW).await.expect("root token");
    let reader = c.token("reader", READER_PW).await.expect("reader token");
    let writer = c.token("writer", WRITER_PW).await.expect("writer token");
    let e = c
        .token("reader", "wrong-password")
        .await
        .expect_err("bad password");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "etcdserver: authentication failed, invalid user ID or password"
    );
    let e = c
        .token("nobody", READER_PW)
        .await
        .expect_err("unknown user");
    assert_eq!(
        e.message(),
        "etcdserver: authentication failed, invalid user ID or password"
    );

    let env = Env {
        c: c.clone(),
        root: root.clone(),
        seed_rev,
        lease_in,
        lease_out,
        n: AtomicU64::new(0),
    };
    let tokens = [
        None,
        Some(reader.as_str()),
        Some(writer.as_str()),
        Some(root.as_str()),
    ];
    let started = std::time::Instant::now();
    let mut table = String::new();
    table.push_str(&format!(
        "| {:<42} | {:<6} | {:<6} | {:<6} | {:<6} |\n|{}|{}|{}|{}|{}|\n",
        "operation",
        ROLES[0],
        ROLES[1],
        ROLES[2],
        ROLES[3],
        "-".repeat(44),
        "-".repeat(8),
        "-".repeat(8),
        "-".repeat(8),
        "-".repeat(8)
    ));
    let mut wrong = Vec::new();
    let mut cells = 0;
    // Role by role, so that root (last) compacts and disables auth only at the very end.
    let mut results = vec![[""; 4]; MATRIX.len()];
    for (ri, tok) in tokens.iter().enumerate() {
        for (oi, (op, label, expected)) in MATRIX.iter().enumerate() {
            let got = within(Duration::from_secs(30), label, env.run(*op, *tok)).await;
            cells += 1;
            let cell = match &got {
                Ok(()) => "allow",
                Err(s)
                    if ri == 0
                        && s.code() == Code::InvalidArgument
                        && s.message() == "etcdserver: user name is empty" =>
                {
                    "DENY"
                }
                Err(s)
                    if ri > 0
                        && s.code() == Code::PermissionDenied
                        && s.message() == "etcdserver: permission denied" =>
                {
                    "DENY"
                }
                Err(_) => "ERROR",
            };
            let ok = (cell == "allow" && expected[ri]) || (cell == "DENY" && !expected[ri]);
            if !ok {
                wrong.push(format!(
                    "{label} as {}: expected {}, got {got:?}",
                    ROLES[ri],
                    if expected[ri] { "allow" } else { "deny" }
                ));
            }
            results[oi][ri] = if ok {
                cell
            } else if cell == "ERROR" {
                "ERROR!"
            } else {
                "WRONG!"
            };
        }
    }
    for (oi, (_, label, _)) in MATRIX.iter().enumerate() {
        let r = &results[oi];
        table.push_str(&format!(
            "| {:<42} | {:<6} | {:<6} | {:<6} | {:<6} |\n",
            label, r[0], r[1], r[2], r[3]
        ));
    }
    println!(
        "authorisation matrix ({} operations × {} roles = {cells} calls, {:.1} s):\n{table}",
        MATRIX.len(),
        ROLES.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "unexpected outcomes:\n{}",
        wrong.join("\n")
    );

    // Root's last operation disabled auth: everything is allowed again, without a token.
    c.put(None, "other/after-disable", "v", 0)
        .await
        .expect("auth disabled: open again");
    // Denied writes changed nothing: other/t was never written by a non-root txn.
    let other_t = c.get(None, "other/t").await.expect("get");
    assert!(
        other_t.kvs.iter().all(|kv| kv.value == b"v"),
        "only root's txns wrote other/t"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_and_stale_or_forged_tokens_are_refused() {
    let server = Server::start_with(&["--auth-token-ttl", "2"]).await;
    let mut c = Clients::new(channel(&server.url()).await);
    setup_users(&mut c).await;
    c.auth
        .auth_enable(AuthEnableRequest {})
        .await
        .expect("enable");
    let root = c.token("root", ROOT_PW).await.expect("root");
    c.get(Some(&root), "app/a")
        .await
        .expect("fresh token works");
    // Forged: the payload of another user under root's signature.
    let parts: Vec<&str> = root.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    let reader = c.token("reader", READER_PW).await.expect("reader");
    let rparts: Vec<&str> = reader.split('.').collect();
    let forged = format!("{}.{}.{}", rparts[0], rparts[1], parts[2]);
    for bad in [forged.as_str(), "garbage", "a.b.c"] {
        let e = c.get(Some(bad), "app/a").await.expect_err("forged");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert_eq!(e.message(), "etcdserver: invalid auth token");
    }
    // Expired after its TTL (2 s here, whole seconds; 5 min by default).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = c.get(Some(&root), "app/a").await.expect_err("expired");
    assert_eq!(e.message(), "etcdserver: invalid auth token");
    // A password change invalidates tokens issued before it, at once.
    let root = c.token("root", ROOT_PW).await.expect("root again");
    let reader = c.token("reader", READER_PW).await.expect("reader again");
    c.get(Some(&reader), "app/a").await.expect("reader reads");
    c.auth
        .user_change_password(with(
            AuthUserChangePasswordRequest {
                name: "reader".into(),
                password: "reader-secret-2".into(),
                ..Default::default()
            },
            Some(&root),
        ))
        .await
        .expect("passwd");
    let e = c
        .get(Some(&reader), "app/a")
        .await
        .expect_err("stale token");
    assert_eq!(e.message(), "etcdserver: invalid auth token");
    assert!(c.token("reader", READER_PW).await.is_err(), "old password");
    let reader = c
        .token("reader", "reader-secret-2")
        .await
        .expect("new password");
    c.get(Some(&reader), "app/a")
        .await
        .expect("new token works");
    let root = c.token("root", ROOT_PW).await.expect("root again");
    // A revoked permission applies to existing tokens at once (permissions are looked up per
    // request, not baked into tokens).
    c.auth
        .role_revoke_permission(with(
            AuthRoleRevokePermissionRequest {
                role: "reader".into(),
                key: b"app/".to_vec(),
                range_end: prefix_end("app/"),
            },
            Some(&root),
        ))
        .await
        .expect("revoke");
    let e = c.get(Some(&reader), "app/a").await.expect_err("revoked");
    assert_eq!(e.code(), Code::PermissionDenied);
    // Limits and bad input: clear errors, no panics.
    let root = c.token("root", ROOT_PW).await.expect("root again");
    let e = c
        .auth
        .user_add(with(
            AuthUserAddRequest {
                name: "shorty".into(),
                password: "short".into(),
                ..Default::default()
            },
            Some(&root),
        ))
        .await
        .expect_err("short password");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at least 8"), "{e:?}");
    let e = c
        .auth
        .user_add(with(AuthUserAddRequest::default(), Some(&root)))
        .await
        .expect_err("empty name");
    assert_eq!(e.message(), "etcdserver: user name is empty");
    let e = c
        .auth
        .role_grant_permission(with(
            AuthRoleGrantPermissionRequest {
                name: "reader".into(),
                perm: None,
            },
            Some(&root),
        ))
        .await
        .expect_err("no permission");
    assert_eq!(e.message(), "etcdserver: permission not given");
    let e = c
        .auth
        .role_grant_permission(with(
            AuthRoleGrantPermissionRequest {
                name: "reader".into(),
                perm: Some(authpb::Permission {
                    perm_type: 9,
                    key: b"k".to_vec(),
                    range_end: vec![],
                }),
            },
            Some(&root),
        ))
        .await
        .expect_err("bad type");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .auth
        .user_delete(with(
            AuthUserDeleteRequest {
                name: "root".into(),
            },
            Some(&root),
        ))
        .await
        .expect_err("root stays");
    assert_eq!(e.message(), "etcdserver: invalid auth management");
    let e = c
        .auth
        .user_grant_role(with(
            AuthUserGrantRoleRequest {
                user: "reader".into(),
                role: "nope".into(),
            },
            Some(&root),
        ))
        .await
        .expect_err("no such role");
    assert_eq!(e.message(), "etcdserver: role name not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_signed_with_a_key_file() {
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef-test-key").expect("key");
    let spec = format!("jwt,priv-key={},sign-method=HS256,ttl=2s", key.display());
    let server = Server::start_with(&["--auth-token", &spec]).await;
    let mut c = Clients::new(channel(&server.url()).await);
    setup_users(&mut c).await;
    c.auth
        .auth_enable(AuthEnableRequest {})
        .await
        .expect("enable");
    let writer = c.token("writer", WRITER_PW).await.expect("writer");
    // etcd's claims: username, revision, exp.
    use base64::Engine as _;
    let payload = writer.split('.').nth(1).expect("payload");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url"),
    )
    .expect("json");
    assert_eq!(claims["username"], "writer");
    assert!(claims["revision"].as_u64().expect("revision") > 0);
    c.put(Some(&writer), "app/j", "v", 0)
        .await
        .expect("writer writes");
    let e = c
        .put(Some(&writer), "other/j", "v", 0)
        .await
        .expect_err("outside");
    assert_eq!(e.code(), Code::PermissionDenied);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = c
        .put(Some(&writer), "app/j", "v", 0)
        .await
        .expect_err("expired");
    assert_eq!(e.message(), "etcdserver: invalid auth token");
    // A server given a bad spec refuses to start, with a clear message.
    let bad =
        coordinator::Config::parse_from(["coordinator", "--auth-token", "jwt,sign-method=HS256"]);
    let e = bad.validate().expect_err("no key");
    assert!(e.contains("priv-key"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_state_survives_a_process_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let p = Process::start(&data, dir.path()).await;
    let mut c = Clients::new(channel(&p.url()).await);
    setup_users(&mut c).await;
    c.auth
        .auth_enable(AuthEnableRequest {})
        .await
        .expect("enable");
    let root = c.token("root", ROOT_PW).await.expect("root");
    c.put(Some(&root), "app/a", "before", 0).await.expect("put");
    p.kill9();

    let p = Process::start(&data, dir.path()).await;
    let mut c = Clients::new(channel(&p.url()).await);
    // Still enabled, same users and roles, and the token from before the crash still works
    // (the simple-token key is replicated state, kept in the backend).
    let e = c.get(None, "app/a").await.expect_err("still enabled");
    assert_eq!(e.message(), "etcdserver: user name is empty");
    let r = c.get(Some(&root), "app/a").await.expect("old token");
    assert_eq!(r.kvs[0].value, b"before");
    let users = c
        .auth
        .user_list(with(AuthUserListRequest {}, Some(&root)))
        .await
        .expect("users")
        .into_inner()
        .users;
    assert_eq!(users, vec!["reader", "root", "writer"]);
    let reader = c
        .token("reader", READER_PW)
        .await
        .expect("password hash kept");
    c.get(Some(&reader), "app/a").await.expect("reader reads");
    let e = c
        .put(Some(&reader), "app/a", "x", 0)
        .await
        .expect_err("reader cannot write");
    assert_eq!(e.code(), Code::PermissionDenied);
    let status = c
        .auth
        .auth_status(AuthStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(status.enabled);
    assert!(status.auth_revision >= 10, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_on_a_three_member_cluster() {
    let cluster = Cluster::start(3).await;
    let mut c0 = Clients::new(cluster.channel(0));
    let mut c2 = Clients::new(cluster.channel(2));
    let mut c1 = Clients::new(cluster.channel(1));
    setup_users(&mut c0).await;
    c0.auth
        .auth_enable(AuthEnableRequest {})
        .await
        .expect("enable on member 0");
    // Enforced on the other members, once each has applied the enable. (A member that has
    // not yet would propose a write without its user, and the write would be refused when
    // applied, as etcd refuses it.)
    for (name, c) in [("member 1", &c1), ("member 2", &c2)] {
        wait_until(
            Duration::from_secs(10),
            &format!("{name} enforces auth"),
            || {
                let mut c = c.clone();
                async move {
                    matches!(c.get(None, "app/a").await,
                    Err(e) if e.message() == "etcdserver: user name is empty")
                }
            },
        )
        .await;
    }
    // A token issued by member 0 is good on member 2 (the simple-token key is replicated).
    let root0 = c0.token("root", ROOT_PW).await.expect("root on 0");
    c2.put(Some(&root0), "app/a", "v", 0)
        .await
        .expect("member 0's token on 2");
    let writer = c2
        .token("writer", WRITER_PW)
        .await
        .expect("authenticate on 2");
    c1.put(Some(&writer), "app/b", "v", 0)
        .await
        .expect("writer on 1");
    let e = c1
        .put(Some(&writer), "other/b", "v", 0)
        .await
        .expect_err("outside on 1");
    assert_eq!(e.code(), Code::PermissionDenied);
    // A permission granted through member 1 applies on member 2 as soon as it is applied.
    c1.auth
        .role_grant_permission(with(
            AuthRoleGrantPermissionRequest {
                name: "writer".into(),
                perm: Some(perm(
                    authpb::permission::Type::Write,
                    "other/",
                    prefix_end("other/"),
                )),
            },
            Some(&root0),
        ))
        .await
        .expect("grant via member 1");
    wait_until(
        Duration::from_secs(10),
        "member 2 applies the grant",
        || {
            let mut c2 = c2.clone();
            let writer = writer.clone();
            async move { c2.put(Some(&writer), "other/b", "v", 0).await.is_ok() }
        },
    )
    .await;
    // Member changes are root's.
    let e = c2
        .cluster
        .member_add(with(
            MemberAddRequest {
                peer_ur_ls: vec!["http://127.0.0.1:1".into()],
                is_learner: true,
            },
            Some(&writer),
        ))
        .await
        .expect_err("writer cannot add members");
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_crate_logs_in_and_refreshes_expired_tokens() {
    let server = Server::start_with(&["--auth-token-ttl", "2"]).await;
    let mut open = server.client().await;
    open.user_add("root", ROOT_PW, None)
        .await
        .expect("user add");
    open.user_grant_role("root", "root")
        .await
        .expect("grant root");
    open.role_add("app").await.expect("role add");
    open.role_grant_permission(
        "app",
        etcd_client::Permission::read_write("app/").with_prefix(),
    )
    .await
    .expect("grant");
    open.user_add("app", "app-secret-1", None)
        .await
        .expect("user add");
    open.user_grant_role("app", "app").await.expect("grant app");
    open.auth_enable().await.expect("enable");
    // etcd's own protos decode our answers.
    let connect = |user: &'static str, pw: &'static str| {
        let url = server.url();
        async move {
            etcd_client::Client::connect(
                [url],
                Some(
                    etcd_client::ConnectOptions::new()
                        .with_user(user, pw)
                        .with_auto_token_refresh(true),
                ),
            )
            .await
        }
    };
    let mut root = connect("root", ROOT_PW).await.expect("root connects");
    let perms = root.role_get("app").await.expect("role get").permissions();
    assert_eq!(perms.len(), 1);
    assert_eq!(perms[0].key(), b"app/");
    assert_eq!(perms[0].range_end(), b"app0");
    assert!(perms[0].is_prefix());
    assert_eq!(
        root.user_get("app").await.expect("user get").roles(),
        ["app".to_string()]
    );
    let mut app = connect("app", "app-secret-1").await.expect("app connects");
    app.put("app/x", "1", None).await.expect("put inside");
    let e = app.put("other", "1", None).await.expect_err("outside");
    assert!(
        e.to_string().contains("etcdserver: permission denied"),
        "{e}"
    );
    // The token expires (2 s); the crate refreshes it on "invalid auth token" and retries.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    app.put("app/x", "2", None)
        .await
        .expect("put after refresh");
    assert!(
        etcd_client::Client::connect(
            [server.url()],
            Some(etcd_client::ConnectOptions::new().with_user("app", "wrong-password")),
        )
        .await
        .is_err(),
        "a wrong password fails at connect"
    );
    let e = open.get("app/x", None).await.expect_err("anonymous");
    assert!(
        e.to_string().contains("etcdserver: user name is empty"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_state_reaches_a_lagging_member_in_a_raft_snapshot() {
    let mut cluster = Cluster::start_with(3, &["--snapshot-count", "50"]).await;
    cluster.kill(2);
    let mut c0 = Clients::new(cluster.channel(0));
    setup_users(&mut c0).await;
    c0.auth
        .auth_enable(AuthEnableRequest {})
        .await
        .expect("enable");
    let root = c0.token("root", ROOT_PW).await.expect("root");
    // Enough entries for snapshots that purge the log member 2 missed (the log is purged in
    // batches of 512 entries). One writer, one put at a time: the leader batches concurrent
    // writes into one entry, so concurrent writers would make too few entries.
    let mut c = Clients::new(cluster.channel(0));
    within(Duration::from_secs(120), "the writer", async {
        for i in 0..1200 {
            c.put(Some(&root), &format!("app/k{i}"), "v", 0)
                .await
                .expect("put");
        }
    })
    .await;
    cluster.restart(2).await;
    let mut c2 = Clients::new(cluster.channel(2));
    wait_until(Duration::from_secs(30), "member 2 catches up", || {
        let mut c2 = c2.clone();
        let root = root.clone();
        async move { matches!(c2.get(Some(&root), "app/k1199").await, Ok(r) if r.kvs.len() == 1) }
    })
    .await;
    assert!(
        cluster
            .log_since_last_start(2)
            .contains("installed snapshot"),
        "member 2 caught up from a snapshot"
    );
    let e = c2
        .get(None, "app/k1")
        .await
        .expect_err("anonymous on member 2");
    assert_eq!(e.message(), "etcdserver: user name is empty");
    let reader = c2
        .token("reader", READER_PW)
        .await
        .expect("hash in the snapshot");
    c2.get(Some(&reader), "app/k1").await.expect("reader reads");
    let e = c2
        .put(Some(&reader), "app/k1", "x", 0)
        .await
        .expect_err("read-only");
    assert_eq!(e.code(), Code::PermissionDenied);
    // A change made after the snapshot still reaches member 2's request path.
    c0.auth
        .user_grant_role(with(
            AuthUserGrantRoleRequest {
                user: "reader".into(),
                role: "writer".into(),
            },
            Some(&root),
        ))
        .await
        .expect("grant writer to reader");
    wait_until(
        Duration::from_secs(10),
        "member 2 applies the grant",
        || {
            let mut c2 = c2.clone();
            let reader = reader.clone();
            async move { c2.put(Some(&reader), "app/k1", "x", 0).await.is_ok() }
        },
    )
    .await;
}
