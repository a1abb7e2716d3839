//! Integration tests for the coordinator, as one test binary (one link on 2 cores).
//!
//! Every test starts its own server (in process on port 0, or the binary as a child process
//! when it must be killed) with a temporary data directory, and talks to it the way real
//! clients do:
//!
//! - [`etcdctl`]: the installed `etcdctl` 3.4, command by command.
//! - [`etcd_client`]: the third-party `etcd-client` crate, as Rust applications use it.
//! - [`restart`]: SIGKILL the binary and restart it on the same data directory.
//! - [`admin`]: the admin HTTP port (health, readiness, metrics).
//! - [`bad_input`]: requests etcd rejects, rejected with etcd's codes and texts.
//! - [`watch`]: watch ordering, replay, compaction, filters, progress, slow consumers.
//! - [`auth`]: authentication and RBAC over gRPC: the authorisation matrix, tokens, restart,
//!   a 3-member cluster; [`auth_etcdctl`]: the same with the real `etcdctl`.
//! - [`cluster`]: a 3-member Raft cluster of processes under kill -9, restart and SIGSTOP.
//! - [`snapshot_restore`]: `etcdctl snapshot save`, then `coordinator snapshot status|restore`
//!   into one member and into a fresh 3-member cluster (the disaster drill); damaged files.
//! - [`backup`]: scheduled backups (`--backup-dir`): files written and pruned, each one
//!   checked and restored into a member that serves the keys; a failing backup directory.
//! - [`defrag`]: `etcdctl defrag` gives space back and keeps every key; the NOSPACE alarm's
//!   way out (delete, compact, defrag, disarm); a crash at each step of the swap.
//! - [`json_gateway`]: etcd's JSON gateway (`POST /v3/...`) over raw HTTP/1.1 on the client port.
//!
//! - [`tls`]: TLS on the client port (plaintext, missing and foreign client certificates
//!   refused; `etcdctl --cacert --cert --key`; `--user` and the certificate CN as user; the
//!   JSON gateway; reload) and between members (a foreign CA or a name that is no member's
//!   never joins).
//!
//! [`harness`] holds the shared helpers.

mod harness;

mod admin;
mod auth;
mod auth_etcdctl;
mod backup;
mod bad_input;
mod cluster;
mod defrag;
mod etcd_client;
mod etcdctl;
mod json_gateway;
mod restart;
mod snapshot_restore;
mod tls;
mod watch;
