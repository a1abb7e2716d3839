//! Connections to one backend, and the bodies that flow through the gateway.
//!
//! Each backend has its own [`ConnPool`]: a stack of idle HTTP/1.1 connections and one shared
//! HTTP/2 connection (multiplexed, made on first use). Connecting is separate from sending, so
//! a failed connect leaves the request untouched for the next choice, whatever its body.
//! An HTTP/1.1 connection goes back to the stack only after its response body was read to the
//! end; one whose body was abandoned is closed. The pool belongs to the backend, so when a
//! backend leaves the set and its last request finishes, its connections close with it.
//!
//! A backend of a route with `backend.tls` dials TLS ([`PeerTls`]): the handshake runs inside
//! the connect timeout, offers ALPN `http/1.1` or `h2` for the wire about to be used, and a
//! handshake that fails is a [`ConnectError::Tls`], like a refused TCP connect (nothing of the
//! request was sent). Every connection is a [`MaybeTlsStream`]: plain ones are the bare socket,
//! so the plain path allocates nothing more than before.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use service_kit::tls::MaybeTlsStream;
use tokio::net::TcpStream;

use crate::backend_tls::{Alpn, PeerTls};
use crate::h1::{RawBody, RawConn};

/// Most idle HTTP/1.1 connections kept per backend and worker.
pub const MAX_IDLE: usize = 512;

/// Per-worker state (idle connection stacks, metric shards) has one slot per worker up to
/// this many; worker `i` uses slot `i % WORKER_SLOTS`.
pub const WORKER_SLOTS: usize = 16;

/// Idle stacks per backend: one per worker slot, so that a worker reuses the connections its
/// own runtime drives.
const STACKS: usize = WORKER_SLOTS;

thread_local! {
    /// This thread's worker index (0 unless [`set_worker`] said otherwise).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Declares the current thread to be proxy worker `i`.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// This thread's worker index.
pub fn worker() -> usize {
    WORKER.with(|w| w.get())
}

fn stack() -> usize {
    worker() % STACKS
}

/// A request body on its way to a backend: the client's, or none (retries of bodyless
/// requests).
#[derive(Debug)]
pub enum UpBody {
    /// The client's body, streamed.
    Incoming(Incoming),
    /// No body.
    Empty,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            UpBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Incoming(b) => b.is_end_stream(),
            UpBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Incoming(b) => b.size_hint(),
            UpBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Where a backend listens: an IP address, or a DNS name resolved again at every new
/// connection (so a container that comes back with a new address is found, as Envoy's
/// `LOGICAL_DNS` clusters do; connections are pooled, so the lookup is not per request).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A DNS name and port.
    Name {
        /// The name, as registered.
        host: String,
        /// The port.
        port: u16,
    },
}

impl Target {
    /// The target for a registered `address` and `port`: an IP (IPv6 with or without
    /// brackets) or a DNS name (`localhost` included: the resolver decides). `None` for port 0
    /// or > 65535 and for anything that is neither an IP nor a valid DNS name.
    pub fn parse(address: &str, port: u32) -> Option<Target> {
        let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
        let bare = address.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Some(Target::Ip(SocketAddr::new(ip, port)));
        }
        lb_core::routes::is_dns_labels(address, |_| false).then(|| Target::Name {
            host: address.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Ip(a) => a.fmt(f),
            Target::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connect to {addr}: {source}")]
    Io {
        /// The backend.
        addr: Target,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TCP connect (and the TLS handshake, for a TLS backend) did not finish in time.
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The backend.
        addr: Target,
        /// The connect timeout.
        timeout: Duration,
    },
    /// The TLS handshake failed: the backend's certificate was refused (another CA, another
    /// name, expired), the backend refused ours, or it does not speak TLS.
    #[error("TLS handshake with {addr} (as {server_name}): {source}")]
    Tls {
        /// The backend.
        addr: Target,
        /// The name its certificate was checked for.
        server_name: String,
        /// Why (a rustls error inside).
        #[source]
        source: std::io::Error,
    },
    /// The HTTP handshake failed.
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        /// The backend.
        addr: Target,
        /// Why.
        #[source]
        source: hyper::Error,
    },
}

/// The connections to one backend.
#[derive(Debug)]
pub struct ConnPool {
    addr: Target,
    /// TLS to this backend, for routes with `backend.tls`.
    tls: Option<PeerTls>,
    /// Idle HTTP/1.1 connections, one stack per worker (see [`STACKS`]).
    idle: Vec<Mutex<Vec<http1::SendRequest<UpBody>>>>,
    /// Idle connections of the gateway's own HTTP/1.1 client ([`crate::h1`]), per worker.
    raw_idle: Vec<Mutex<Vec<RawConn>>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
    h2_connecting: tokio::sync::Mutex<()>,
}

impl ConnPool {
    /// An empty pool for `addr`, dialling TLS with `tls` when given.
    pub fn new(addr: Target, tls: Option<PeerTls>) -> ConnPool {
        ConnPool {
            addr,
            tls,
            idle: (0..STACKS).map(|_| Mutex::new(Vec::new())).collect(),
            raw_idle: (0..STACKS).map(|_| Mutex::new(Vec::new())).collect(),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// The backend's address.
    pub fn addr(&self) -> &Target {
        &self.addr
    }

    /// The name the backend's certificate is checked for, when it is dialled over TLS.
    pub fn tls_server_name(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|t| t.server_name().to_str().into_owned())
    }

    /// Idle HTTP/1.1 connections.
    pub fn idle(&self) -> usize {
        self.idle.iter().map(|s| s.lock().len()).sum::<usize>()
            + self.raw_idle.iter().map(|s| s.lock().len()).sum::<usize>()
    }

    /// A connection for the gateway's own HTTP/1.1 client: an idle one that still looks
    /// open, or a new one.
    pub async fn raw(&self, timeout: Duration) -> Result<RawConn, ConnectError> {
        loop {
            let Some(mut conn) = self.raw_idle[stack()].lock().pop() else {
                break;
            };
            if conn.looks_open() {
                return Ok(conn);
            }
        }
        Ok(RawConn::new(self.connect(timeout, Alpn::Http1).await?))
    }

    /// Keeps a connection whose response was read to the end.
    pub fn put_back_raw(&self, conn: RawConn) {
        let mut idle = self.raw_idle[stack()].lock();
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// A new connection: TCP, then the TLS handshake offering `alpn` for a TLS backend, both
    /// within `timeout`.
    async fn connect(&self, timeout: Duration, alpn: Alpn) -> Result<MaybeTlsStream, ConnectError> {
        let connect = async {
            let tcp = match &self.addr {
                Target::Ip(a) => TcpStream::connect(*a).await,
                // Resolves, then tries each address in turn.
                Target::Name { host, port } => TcpStream::connect((host.as_str(), *port)).await,
            }
            .map_err(|source| ConnectError::Io {
                addr: self.addr.clone(),
                source,
            })?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok(MaybeTlsStream::Plain(tcp));
            };
            match tls
                .connector(alpn)
                .connect(tls.server_name().clone(), tcp)
                .await
            {
                Ok(stream) => Ok(MaybeTlsStream::Tls(Box::new(stream))),
                Err(source) => Err(ConnectError::Tls {
                    addr: self.addr.clone(),
                    server_name: tls.server_name().to_str().into_owned(),
                    source,
                }),
            }
        };
        // Boxed: a new connection is rare next to a pooled one, and the TLS handshake's state
        // would otherwise make every request's future (moved into a box per request) kilobytes
        // larger.
        tokio::time::timeout(timeout, Box::pin(connect))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr: self.addr.clone(),
                timeout,
            })?
    }

    /// An HTTP/1.1 connection ready for a request: an idle one, or a new one.
    pub async fn h1(&self, timeout: Duration) -> Result<http1::SendRequest<UpBody>, ConnectError> {
        loop {
            let Some(mut sender) = self.idle[stack()].lock().pop() else {
                break;
            };
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Ok(sender);
            }
            // Returned just as its previous response ended: it becomes ready at once.
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_millis(50), sender.ready()).await
            {
                return Ok(sender);
            }
        }
        let stream = self.connect(timeout, Alpn::Http1).await?;
        let (sender, conn) = Box::pin(
            http1::Builder::new()
                .writev(false)
                .handshake(TokioIo::new(stream)),
        )
        .await
        .map_err(|source| ConnectError::Handshake {
            addr: self.addr.clone(),
            source,
        })?;
        tokio::spawn(async move {
            // Ends when the backend closes or the sender is dropped.
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Puts a connection whose response was read to the end back on the stack.
    pub fn put_back(&self, sender: http1::SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle[stack()].lock();
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    /// The backend's HTTP/2 connection, made on first use (one connect at a time).
    pub async fn h2(&self, timeout: Duration) -> Result<http2::SendRequest<UpBody>, ConnectError> {
        if let Some(s) = self.h2.lock().as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let _connecting = self.h2_connecting.lock().await;
        if let Some(s) = self.h2.lock().as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let stream = self.connect(timeout, Alpn::Http2).await?;
        let (sender, conn) = Box::pin(
            http2::Builder::new(TokioExecutor::new())
                .adaptive_window(true)
                .handshake(TokioIo::new(stream)),
        )
        .await
        .map_err(|source| ConnectError::Handshake {
            addr: self.addr.clone(),
            source,
        })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *self.h2.lock() = Some(sender.clone());
        Ok(sender)
    }
}

/// Runs when a response body is finished with (read to the end, or dropped).
pub trait Finish: Send + Sync + 'static {
    /// `complete`: the body was read to its end.
    fn finish(&mut self, complete: bool);
}

/// A response body on its way to a client: a backend's (with what to do when it ends), or
/// one the gateway wrote.
pub enum ProxyBody {
    /// Streamed from a backend through hyper's client.
    Upstream {
        /// The backend's body.
        body: Incoming,
        /// Releases the request's load and connection.
        done: Option<Box<dyn Finish>>,
    },
    /// Streamed from a backend through the gateway's own HTTP/1.1 client.
    Raw {
        /// The backend's body (it recycles its connection itself).
        body: RawBody,
        /// Releases the request's load.
        done: Option<Box<dyn Finish>>,
        /// The head's field lines, when the answer was read for the listener's own HTTP/1.1
        /// path (the response's header map is then empty; that path writes these instead).
        lines: Option<crate::h1::Lines>,
    },
    /// Written by the gateway.
    Full(Option<Bytes>),
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyBody::Upstream { .. } => f.write_str("ProxyBody::Upstream"),
            ProxyBody::Raw { body, .. } => write!(f, "ProxyBody::Raw({body:?})"),
            ProxyBody::Full(b) => write!(f, "ProxyBody::Full({b:?})"),
        }
    }
}

impl ProxyBody {
    /// A body the gateway wrote.
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(bytes.into()))
    }

    /// No body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

/// What a body's error becomes on the way to the client's connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Raw { body, done, .. } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                        if let Some(mut d) = done.take() {
                            d.finish(body.is_done());
                        }
                    }
                    Poll::Ready(Some(Ok(_))) if body.is_done() => {
                        if let Some(mut d) = done.take() {
                            d.finish(true);
                        }
                    }
                    _ => {}
                }
                polled.map(|o| o.map(|r| r.map_err(BoxError::from)))
            }
            ProxyBody::Upstream { body, done } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(mut d) = done.take() {
                            d.finish(true);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(mut d) = done.take() {
                            d.finish(false);
                        }
                    }
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        if let Some(mut d) = done.take() {
                            d.finish(true);
                        }
                    }
                    _ => {}
                }
                polled.map(|o| o.map(|r| r.map_err(BoxError::from)))
            }
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Raw { body, .. } => body.is_done(),
            ProxyBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Raw { body, .. } => body.size_hint(),
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        match self {
            ProxyBody::Upstream { body, done } => {
                if let Some(mut d) = done.take() {
                    d.finish(body.is_end_stream());
                }
            }
            ProxyBody::Raw { body, done, .. } => {
                if let Some(mut d) = done.take() {
                    d.finish(body.is_done());
                }
            }
            ProxyBody::Full(_) => {}
        }
    }
}

/// Shared so the admin API can show a pool.
pub type SharedPool = Arc<ConnPool>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_addresses_become_ip_or_name_targets() {
        assert_eq!(
            Target::parse("10.0.0.7", 8080),
            Some(Target::Ip("10.0.0.7:8080".parse().expect("an address")))
        );
        assert_eq!(
            Target::parse("[::1]", 80),
            Some(Target::Ip("[::1]:80".parse().expect("an address")))
        );
        assert_eq!(
            Target::parse("::1", 80),
            Some(Target::Ip("[::1]:80".parse().expect("an address")))
        );
        let demo = Target::parse("Demo-1.internal", 8080).expect("a DNS name is a target");
        assert_eq!(demo.to_string(), "demo-1.internal:8080");
        assert!(matches!(demo, Target::Name { port: 8080, .. }));
        assert!(matches!(
            Target::parse("localhost", 1),
            Some(Target::Name { .. })
        ));
    }

    #[test]
    fn unusable_addresses_and_ports_are_refused() {
        for bad in [
            "",
            "-x.example",
            "a..b",
            "under_score",
            "sp ace",
            "x:y",
            &"a".repeat(64),
        ] {
            assert_eq!(Target::parse(bad, 80), None, "{bad:?}");
        }
        assert_eq!(Target::parse("10.0.0.7", 0), None);
        assert_eq!(Target::parse("10.0.0.7", 65_536), None);
    }
}
