//! `etcdserverpb.Maintenance` and `etcdserverpb.Cluster`.
//!
//! Snapshot format (ours, not etcd's bolt file, so `etcdctl snapshot status` cannot read it):
//! the 8 bytes `CSNAP001`, then for every backend entry `[key len u32 LE][key][value len u32
//! LE][value]`, then an end marker (key len `u32::MAX`), then a CRC-32 of everything before it
//! (u32 LE), then zero padding to a multiple of 512 bytes, then the SHA-256 of everything
//! before it. The last two follow etcd's convention, which `etcdctl snapshot save` checks
//! (`size % 512 == 32`, the trailing 32 bytes being a SHA-256). The copy is taken under the
//! state lock, so it is one consistent point in time; writes wait while it is copied to a
//! temporary file, then the file is streamed.
//!
//! `Defragment` rewrites the sled database into a fresh directory and swaps it in (see
//! [`crate::mvcc::SledBackend`]): deleted and compacted data give their space back, the member
//! serves meanwhile (reads and writes wait only for the swap), and a crash at any point leaves a
//! data dir holding the old or the new database whole. `Status.dbSize` is the sled directory's
//! allocated bytes on disk, measured at each call; `dbSizeInUse` reports the same (sled cannot
//! tell how much of its files is free). The NOSPACE alarm (`--quota-backend-bytes`, checked every
//! second against the same measure) stays raised until `Alarm` deactivates it (`etcdctl alarm
//! disarm`).

use std::io::Read;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use futures::Stream;
use proto::etcdserverpb::cluster_server::Cluster;
use proto::etcdserverpb::maintenance_server::Maintenance;
use proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, Member, MemberAddRequest,
    MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse,
    StatusRequest, StatusResponse, alarm_request::AlarmAction,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::error::{Error, Result};

const SNAPSHOT_CHUNK: usize = 32 * 1024;

/// Maintenance and Cluster services.
#[derive(Clone)]
pub struct MaintenanceService {
    ctx: Ctx,
}

impl MaintenanceService {
    /// Wrap a context.
    pub fn new(ctx: Ctx) -> MaintenanceService {
        MaintenanceService { ctx }
    }

    fn members(&self) -> Vec<Member> {
        match &self.ctx.member {
            crate::member::Member::Single(_) => vec![Member {
                id: self.ctx.id.member_id,
                name: self.ctx.id.name.clone(),
                peer_ur_ls: self.ctx.id.peer_urls.clone(),
                client_ur_ls: self.ctx.id.client_urls.clone(),
                is_learner: false,
            }],
            crate::member::Member::Raft(r) => {
                let attrs = self.ctx.state.read().member_attrs();
                r.members()
                    .into_iter()
                    .map(|(id, node, learner)| {
                        // A member added with `member add` has no name until it starts and
                        // publishes it, as in etcd.
                        let (name, urls) = match attrs.get(&id) {
                            Some((n, u)) => {
                                (if n.is_empty() { node.name } else { n.clone() }, u.clone())
                            }
                            None => (node.name, Vec::new()),
                        };
                        Member {
                            id,
                            name,
                            peer_ur_ls: vec![node.peer_url],
                            client_ur_ls: urls,
                            is_learner: learner,
                        }
                    })
                    .collect()
            }
        }
    }

    fn raft(&self) -> Result<&crate::raft::RaftMember, Status> {
        match &self.ctx.member {
            crate::member::Member::Raft(r) => Ok(r),
            crate::member::Member::Single(_) => Err(self.single_member_only()),
        }
    }

    fn rev(&self) -> i64 {
        self.ctx.state.read().revision()
    }

    /// Root only while auth is enabled (maintenance and member changes, as in etcd).
    fn admin<T>(&self, req: &Request<T>, method: &'static str) -> Result<(), Status> {
        match self.ctx.auth.caller_of(req).and_then(|c| c.root()) {
            Ok(()) => Ok(()),
            Err(e) => {
                let s = Status::from(e);
                self.ctx.metrics.rpc::<()>(method, &Err(s.clone()));
                Err(s)
            }
        }
    }

    fn single_member_only(&self) -> Status {
        Status::from(Error::Unsupported(
            "member changes need a member started with --initial-cluster naming several members"
                .into(),
        ))
    }
}

fn done<T>(ctx: &Ctx, method: &'static str, r: Result<T>) -> Result<Response<T>, Status> {
    let r = r.map(Response::new).map_err(Status::from);
    ctx.metrics.rpc(method, &r);
    r
}

type SnapStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        self.admin(&req, "Alarm")?;
        let r = req.into_inner();
        let nospace = &self.ctx.nospace;
        match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => {}
            Ok(AlarmAction::Activate) => {
                if r.alarm == AlarmType::Nospace as i32 {
                    nospace.store(true, Ordering::Release);
                }
            }
            Ok(AlarmAction::Deactivate) => {
                if r.alarm == AlarmType::Nospace as i32 || r.alarm == AlarmType::None as i32 {
                    nospace.store(false, Ordering::Release);
                }
            }
            Err(_) => {
                return done(
                    &self.ctx,
                    "Alarm",
                    Err(Error::InvalidArgument(format!(
                        "unknown alarm action {}",
                        r.action
                    ))),
                );
            }
        }
        let alarms = if nospace.load(Ordering::Acquire) {
            vec![AlarmMember {
                member_id: self.ctx.id.member_id,
                alarm: AlarmType::Nospace as i32,
            }]
        } else {
            Vec::new()
        };
        done(
            &self.ctx,
            "Alarm",
            Ok(AlarmResponse {
                header: self.ctx.header(self.rev()),
                alarms,
            }),
        )
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let st = self.ctx.state.read();
        let size = st.store().backend().size_on_disk() as i64;
        let mut errors = Vec::new();
        if self.ctx.nospace.load(Ordering::Acquire) {
            errors.push(
                "memberID:".to_string() + &self.ctx.id.member_id.to_string() + " alarm:NOSPACE",
            );
        }
        let resp = StatusResponse {
            header: self.ctx.header(st.revision()),
            version: self.ctx.version.to_string(),
            db_size: size,
            leader: self.ctx.member.leader(self.ctx.id.member_id).unwrap_or(0),
            raft_index: self.ctx.member.last_log_index(st.applied_index()),
            raft_term: self.ctx.member.term(),
            raft_applied_index: st.applied_index(),
            errors,
            db_size_in_use: size,
            is_learner: self.ctx.member.is_learner(self.ctx.id.member_id),
        };
        drop(st);
        done(&self.ctx, "Status", Ok(resp))
    }

    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.admin(&req, "Defragment")?;
        // The live entries are rewritten into a fresh sled database that is then swapped in
        // (see `SledBackend`): the member serves meanwhile, reads and writes wait only during
        // the swap. The response comes once the space is given back.
        let backend = self.ctx.state.read().store().backend().clone();
        let r = tokio::task::spawn_blocking(move || backend.defragment())
            .await
            .unwrap_or_else(|e| {
                Err(Error::Io(std::io::Error::other(format!(
                    "defragmentation task failed: {e}"
                ))))
            });
        if let Ok(d) = &r {
            self.ctx.metrics.db_bytes.set(d.after as i64);
        }
        done(
            &self.ctx,
            "Defragment",
            r.map(|_| DefragmentResponse {
                header: self.ctx.header(self.rev()),
            }),
        )
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.admin(&req, "Hash")?;
        let st = self.ctx.state.read();
        let mut h = crc32fast::Hasher::new();
        let r = st.store().backend().scan(&[0], &[0xff], &mut |k, v| {
            h.update(k);
            h.update(v);
            true
        });
        let rev = st.revision();
        drop(st);
        done(
            &self.ctx,
            "Hash",
            r.map(|_| HashResponse {
                header: self.ctx.header(rev),
                hash: h.finalize(),
            }),
        )
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.admin(&req, "HashKV")?;
        let r = req.into_inner();
        let st = self.ctx.state.read();
        let rev = if r.revision <= 0 {
            st.revision()
        } else {
            r.revision
        };
        let res = st.store().hash_kv(rev).map(|hash| HashKvResponse {
            header: self.ctx.header(st.revision()),
            hash,
            compact_revision: st.store().compact_revision(),
            hash_revision: rev,
        });
        drop(st);
        done(&self.ctx, "HashKV", res)
    }

    type SnapshotStream = SnapStream;

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.admin(&req, "Snapshot")?;
        let ctx = self.ctx.clone();
        let file = tokio::task::spawn_blocking(move || write_snapshot(&ctx))
            .await
            .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))?;
        let (mut file, total, rev) = match file {
            Ok(f) => f,
            Err(e) => {
                let s = Status::from(e);
                self.ctx.metrics.rpc::<()>("Snapshot", &Err(s.clone()));
                return Err(s);
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || {
            let mut sent = 0u64;
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let _ =
                            tx.blocking_send(Err(Status::internal(format!("snapshot read: {e}"))));
                        return;
                    }
                };
                sent += n as u64;
                let resp = SnapshotResponse {
                    header: ctx.header(rev),
                    remaining_bytes: total - sent,
                    blob: buf[..n].to_vec(),
                    version: ctx.version.to_string(),
                };
                if tx.blocking_send(Ok(resp)).is_err() {
                    return;
                }
            }
        });
        self.ctx.metrics.rpc::<()>("Snapshot", &Ok(()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.admin(&req, "MoveLeader")?;
        let client_deadline = grpc_timeout(req.metadata()).map(|t| tokio::time::Instant::now() + t);
        let r = req.into_inner();
        // As etcd: only the leader serves it (`etcdserver: not leader` elsewhere; etcdctl
        // looks for the leader among its endpoints), the target must be a voting member.
        let moved = match &self.ctx.member {
            crate::member::Member::Single(_) if r.target_id == self.ctx.id.member_id => Ok(()),
            crate::member::Member::Single(_) => Err(Error::BadLeaderTransferee),
            crate::member::Member::Raft(m) => m.move_leader(r.target_id, client_deadline).await,
        };
        done(
            &self.ctx,
            "MoveLeader",
            moved.map(|()| MoveLeaderResponse {
                header: self.ctx.header(self.rev()),
            }),
        )
    }
}

/// The caller's deadline from gRPC's `grpc-timeout` header (`<up to 8 digits><H|M|S|m|u|n>`),
/// if it sent a valid one.
fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn write_snapshot(ctx: &Ctx) -> Result<(std::fs::File, u64, i64)> {
    let mut tmp = tempfile_in_data()?;
    let (total, rev) = crate::snapshot::write(&ctx.state, &mut tmp)?;
    Ok((tmp, total, rev))
}

fn tempfile_in_data() -> Result<std::fs::File> {
    // An unnamed temporary file: gone when closed, even after a crash.
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "coordinator-snapshot-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}

#[tonic::async_trait]
impl Cluster for MaintenanceService {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.admin(&req, "MemberAdd")?;
        let r = req.into_inner();
        let raft = self.raft()?;
        let Some(url) = r.peer_ur_ls.first().cloned() else {
            return Err(Status::invalid_argument(
                "etcdserver: member peer URLs are not provided",
            ));
        };
        let id = raft
            .add_member(&url, r.is_learner)
            .await
            .map_err(Status::from)?;
        let members = self.members();
        let member = members.iter().find(|m| m.id == id).cloned();
        done(
            &self.ctx,
            "MemberAdd",
            Ok(MemberAddResponse {
                header: self.ctx.header(self.rev()),
                member,
                members,
            }),
        )
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.admin(&req, "MemberRemove")?;
        let r = req.into_inner();
        self.raft()?
            .remove_member(r.id)
            .await
            .map_err(Status::from)?;
        done(
            &self.ctx,
            "MemberRemove",
            Ok(MemberRemoveResponse {
                header: self.ctx.header(self.rev()),
                members: self.members(),
            }),
        )
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.admin(&req, "MemberUpdate")?;
        Err(Status::from(Error::Unsupported(
            "changing a member's peer URLs is not supported; remove and add the member".into(),
        )))
    }

    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        done(
            &self.ctx,
            "MemberList",
            Ok(MemberListResponse {
                header: self.ctx.header(self.rev()),
                members: self.members(),
            }),
        )
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.admin(&req, "MemberPromote")?;
        let r = req.into_inner();
        self.raft()?
            .promote_member(r.id)
            .await
            .map_err(Status::from)?;
        done(
            &self.ctx,
            "MemberPromote",
            Ok(MemberPromoteResponse {
                header: self.ctx.header(self.rev()),
                members: self.members(),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::grpc_timeout;
    use std::time::Duration;

    fn md(v: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-timeout", v.parse().expect("ascii"));
        m
    }

    #[test]
    fn grpc_timeout_reads_every_unit_and_refuses_malformed_values() {
        assert_eq!(
            grpc_timeout(&md("4999m")),
            Some(Duration::from_millis(4999))
        );
        assert_eq!(grpc_timeout(&md("5S")), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout(&md("2M")), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(&md("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(&md("7u")), Some(Duration::from_micros(7)));
        assert_eq!(grpc_timeout(&md("9n")), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "5", "5x", "123456789S", "-5S", "5 S"] {
            assert_eq!(grpc_timeout(&md(bad)), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
