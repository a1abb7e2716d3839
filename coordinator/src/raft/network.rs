//! Raft transport: openraft's messages, bincode-encoded, over our tonic `peerpb.Peer` service on
//! the peer port.
//!
//! AppendEntries travel on one long-lived `AppendStream` per follower: a request message, then
//! its answer, one at a time (openraft sends a follower its next AppendEntries only once the
//! last was answered). A unary call cost the leader three writes (HEADERS, DATA, an empty
//! end-of-stream DATA frame) and both sides an HTTP/2 stream and tonic's per-call work; a message
//! costs one write each way. Votes and snapshots stay unary calls.
//!
//! One HTTP/2 connection per peer, shared by every client to it ([`Peers`]). openraft asks for a
//! new client not only per replication stream but for every vote round and every read-index
//! round (`get_read_log_id` sends each follower a heartbeat on a client of its own): with a
//! connection per client, each linearizable read used to open and close a TCP connection to
//! every follower, with an HTTP/2 handshake on each.
//!
//! Connection failures are reported to openraft as `Unreachable` (it backs off); everything else
//! as a network error (it retries). Every call is bounded by openraft's own deadline.
//!
//! How a channel reaches its peer is a [`Connector`]: production dials TCP ([`tcp`]); the
//! deterministic simulation (`coordinator/tests/sim`) dials its simulated network. Both use the
//! same [`endpoint`] settings, the same client code and the same peer service.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use proto::peerpb::Blob;
use proto::peerpb::peer_client::PeerClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::log_store::Durability;
use super::{MemberNode, TypeConfig};

type NodeId = u64;

/// Opens a lazily connecting channel to a peer URL (`http://host:port`).
pub type Connector =
    Arc<dyn Fn(&str) -> Result<Channel, tonic::transport::Error> + Send + Sync + 'static>;

/// Production: channels over the operating system's TCP.
pub fn tcp() -> Connector {
    Arc::new(channel)
}

/// Production with TLS: channels over TLS (`config`: the peer CA and this member's peer
/// certificate), checking each peer's certificate for the host of its URL. `https://` peer URLs
/// are dialled as such; so are `http://` ones (the flags, not the scheme, switch TLS on).
pub fn tls(config: Arc<service_kit::tls::rustls::ClientConfig>) -> Connector {
    Arc::new(move |url: &str| {
        let ep = endpoint(&service_kit::tls::plain_scheme(url))?;
        Ok(service_kit::tls::lazy_channel(ep, Some(&config)))
    })
}

/// Opens clients to peers, over one shared connection per peer.
#[derive(Clone)]
pub struct Network {
    connect: Connector,
    durable: Durability,
    peers: Peers,
}

impl Network {
    /// Peers reached through `connect`; no commit index goes out before `durable` (this
    /// member's log) holds it.
    pub fn new(connect: Connector, durable: Durability) -> Network {
        Network {
            connect,
            durable,
            peers: Peers::default(),
        }
    }
}

/// The channel to each peer URL, shared by every client to that peer (module docs).
#[derive(Clone, Default)]
struct Peers(Arc<Mutex<HashMap<String, Arc<SharedPeer>>>>);

/// One peer's shared channel and how many calls on it in a row timed out, over all its clients.
struct SharedPeer {
    url: String,
    connect: Connector,
    client: Mutex<Option<PeerClient<Channel>>>,
    timeouts: AtomicU32,
}

impl Peers {
    fn get(&self, connect: &Connector, url: &str) -> Arc<SharedPeer> {
        let mut peers = self.0.lock();
        if let Some(peer) = peers.get(url) {
            return Arc::clone(peer);
        }
        let peer = Arc::new(SharedPeer {
            url: url.to_string(),
            connect: connect.clone(),
            client: Mutex::new(peer_client(connect, url)),
            timeouts: AtomicU32::new(0),
        });
        peers.insert(url.to_string(), Arc::clone(&peer));
        peer
    }
}

impl SharedPeer {
    fn client(&self) -> Option<PeerClient<Channel>> {
        self.client.lock().clone()
    }

    /// A call answered: the connection works.
    fn answered(&self) {
        if self.timeouts.load(Ordering::Relaxed) != 0 {
            self.timeouts.store(0, Ordering::Relaxed);
        }
    }

    /// A call timed out: after [`REPLACE_AFTER_TIMEOUTS`] in a row (from any of the peer's
    /// clients) the shared connection is replaced. Returns the client to use from now on.
    fn timed_out(&self) -> Option<PeerClient<Channel>> {
        let mut client = self.client.lock();
        if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= REPLACE_AFTER_TIMEOUTS {
            self.timeouts.store(0, Ordering::Relaxed);
            *client = peer_client(&self.connect, &self.url);
        }
        client.clone()
    }
}

/// A client to one peer, on the peer's shared connection.
pub struct PeerConn {
    target: NodeId,
    client: Option<PeerClient<Channel>>,
    peer: Arc<SharedPeer>,
    durable: Durability,
    /// The open replication stream (`AppendStream`), between calls. A call takes it out and
    /// puts it back only once its answer came: a call that fails, times out or is dropped
    /// midway leaves none, so an answer is never paired with the wrong request.
    stream: Option<AppendStream>,
    /// The peer answered `AppendStream` with UNIMPLEMENTED (an older build): unary calls.
    unary_only: bool,
    /// Whether an AppendEntries went out on this client before. The first is a unary call: a
    /// client made for one heartbeat (a read-index round) would open a stream for one message
    /// and close it again; a replication client opens its stream with its second message.
    appended: bool,
}

/// One open `AppendStream`: requests go in through `tx`, answers come back in order.
struct AppendStream {
    tx: tokio::sync::mpsc::Sender<Blob>,
    answers: tonic::Streaming<Blob>,
}

/// After this many calls in a row to a peer time out, its connection is replaced: a connection whose
/// packets silently vanish (a blackhole) is otherwise only noticed by HTTP/2 keep-alive, after
/// up to 30 s, and every call on it times out until then (found by the simulation).
pub const REPLACE_AFTER_TIMEOUTS: u32 = 3;

/// A client on a fresh channel to `url`.
pub fn peer_client(connect: &Connector, url: &str) -> Option<PeerClient<Channel>> {
    connect(url).ok().map(|c| {
        PeerClient::new(c)
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024)
    })
}

/// The settings of every peer channel, whatever carries its bytes.
pub fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// A lazily connecting TCP channel to a peer URL (`http://host:port`).
pub fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(url)?.connect_lazy())
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> PeerConn {
        let peer = self.peers.get(&self.connect, &node.peer_url);
        PeerConn {
            target,
            client: peer.client(),
            peer,
            durable: self.durable.clone(),
            stream: None,
            unary_only: false,
            appended: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl PeerConn {
    async fn call<Req, Resp, E>(
        &mut self,
        which: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, MemberNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "bad peer URL {}",
                self.peer.url
            )))));
        };
        let data = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let stream = if which == "append" && !self.unary_only && self.appended {
            Some(self.stream.take())
        } else {
            None
        };
        self.appended |= which == "append";
        let mut reopened: Option<AppendStream> = None;
        let unary_only = &mut self.unary_only;
        let fut = async {
            let mut data = data;
            if let Some(open) = stream {
                match append_on_stream(
                    client,
                    open,
                    Blob {
                        data: std::mem::take(&mut data),
                    },
                )
                .await
                {
                    Ok((answer, s)) => {
                        reopened = Some(s);
                        return Ok(tonic::Response::new(answer));
                    }
                    Err(s) if s.code() == tonic::Code::Unimplemented => {
                        // An older peer: unary calls from now on (this one encoded again).
                        *unary_only = true;
                        data = bincode::serialize(req)
                            .map_err(|e| tonic::Status::internal(format!("encode: {e}")))?;
                    }
                    Err(s) => return Err(s),
                }
            }
            let blob = tonic::Request::new(Blob { data });
            match which {
                "append" => client.append_entries(blob).await,
                "vote" => client.vote(blob).await,
                _ => client.install_snapshot(blob).await,
            }
        };
        let resp = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => {
                self.client = self.peer.timed_out();
                return Err(RPCError::Network(NetworkError::new(&Msg(format!(
                    "{which} to {} timed out",
                    self.target
                )))));
            }
            Ok(Err(status)) => {
                self.peer.answered();
                let e = Msg(format!("{which} to {}: {status}", self.target));
                return Err(if status.code() == tonic::Code::Unavailable {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                });
            }
            Ok(Ok(r)) => {
                self.peer.answered();
                self.stream = reopened;
                r.into_inner()
            }
        };
        let decoded: Result<Resp, E> = bincode::deserialize(&resp.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Sends `req` on `open` (or on a stream opened now) and waits for its answer; gives the stream
/// back with the answer. A broken stream is not given back: the next call opens another.
async fn append_on_stream(
    client: &mut PeerClient<Channel>,
    open: Option<AppendStream>,
    req: Blob,
) -> Result<(Blob, AppendStream), tonic::Status> {
    let mut s = match open {
        Some(s) => s,
        None => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let answers = client
                .append_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            AppendStream { tx, answers }
        }
    };
    if s.tx.send(req).await.is_err() {
        return Err(tonic::Status::unavailable("replication stream closed"));
    }
    match s.answers.message().await? {
        Some(answer) => Ok((answer, s)),
        None => Err(tonic::Status::unavailable("replication stream ended")),
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>>
    {
        // A leader reports its own appends flushed before they are on its disk (`log_store`):
        // a follower must not hear of a commit index until this log holds it, or it could apply
        // an entry that a crash of this member takes back.
        if let Some(c) = rpc.leader_commit {
            let durable = tokio::time::timeout(option.hard_ttl(), self.durable.wait_for(c.index));
            match durable.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(RPCError::Network(NetworkError::new(&Msg(e)))),
                Err(_) => {
                    return Err(RPCError::Network(NetworkError::new(&Msg(format!(
                        "the log was not durable up to the commit index {} in time",
                        c.index
                    )))));
                }
            }
        }
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MemberNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use openraft::network::RaftNetworkFactory;

    use super::*;
    use crate::raft::log_store::LogStore;

    fn node(port: u16) -> MemberNode {
        MemberNode {
            name: format!("m{port}"),
            peer_url: format!("http://127.0.0.1:{port}"),
        }
    }

    #[tokio::test]
    async fn every_client_to_a_peer_shares_one_connection_until_a_timeout_streak_replaces_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(dir.path(), 1).expect("log store");
        let dials = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&dials);
        let connect: Connector = Arc::new(move |url: &str| {
            counted.fetch_add(1, Ordering::SeqCst);
            channel(url)
        });
        let mut net = Network::new(connect, log.durability());

        // openraft asks for a client per vote and per read-index round: one connection per peer.
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(net.new_client(2, &node(1)).await);
        }
        let _other = net.new_client(3, &node(2)).await;
        assert_eq!(dials.load(Ordering::SeqCst), 2, "one channel per peer URL");

        // Timeouts in a row from different clients of one peer add up; the streak's last one
        // replaces the shared connection, for clients made later too.
        let (a, b) = clients.split_at_mut(1);
        assert!(a[0].peer.timed_out().is_some());
        assert!(b[0].peer.timed_out().is_some());
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        b[1].peer.answered();
        assert!(b[2].peer.timed_out().is_some());
        assert!(b[3].peer.timed_out().is_some());
        assert_eq!(dials.load(Ordering::SeqCst), 2, "an answer ends a streak");
        assert!(b[4].peer.timed_out().is_some());
        assert_eq!(dials.load(Ordering::SeqCst), 3, "three in a row replace it");
        let _later = net.new_client(2, &node(1)).await;
        assert_eq!(dials.load(Ordering::SeqCst), 3);
        log.close();
    }
}
