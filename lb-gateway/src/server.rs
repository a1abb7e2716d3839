//! The proxy's listener: HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port, told
//! apart by the connection preface; HTTP/1.1 upgrades (WebSocket) allowed. Bodyless HTTP/1.1
//! requests on plain TCP are served by the listener's own fast path (`fast`); hyper serves the
//! rest, and the rest of a connection once the fast path hands it over.
//!
//! Each proxy worker runs this loop on its own single-threaded runtime, accepting from its clone
//! of the one listening socket (see `run_with_listeners`): a client connection stays on the
//! worker that accepted it, and so do the idle HTTP/1.1 backend connections it hands back
//! (`upstream` keeps one stack per worker); the single HTTP/2 connection per backend is shared.
//! A worker accepts only while no other worker has fewer open connections ([`Balance`]).
//!
//! # Limits (see [`ConnLimits`])
//! - Connections are capped by a semaphore per worker. At the cap the worker stops accepting:
//!   further connections are *queued* in the kernel's listen backlog (their TCP handshake
//!   completes, nothing is read) and served as soon as a slot frees; once the backlog is full
//!   the kernel drops new SYNs. Queuing rather than refusing keeps short bursts lossless; the
//!   header read timeout below bounds how long an idle or slow client holds a slot.
//! - Request headers: at most `max_header_bytes` (hyper's read buffer; HTTP/1.1 answers 431
//!   and closes, HTTP/2 answers 431 on the stream) and hyper's 100 header fields.
//! - Slow-loris: a connection whose first request's headers are not complete within
//!   `header_read_timeout` is closed (this also covers a client that sends nothing, and one
//!   that dribbles an HTTP/2 preface, which hyper's own timer does not see); on HTTP/1.1 the
//!   same timeout applies to every later request's headers, so an idle keep-alive connection is
//!   closed after it too. Bytes trickling in do not restart the clock.
//!
//! On shutdown the listener closes, every connection is told to finish (HTTP/1.1: after the
//! current response; HTTP/2: GOAWAY), and in-flight requests get `grace` to complete before the
//! rest are dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fast;
use crate::proxy::{Client, Gateway, handle};

/// What one worker's listener admits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Client connections open at once on this worker; more wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers; HTTP/2: the header list), in bytes.
    /// At least [`MIN_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// Time a client has to send a request's complete headers.
    pub header_read_timeout: Duration,
}

/// The smallest `max_header_bytes` (hyper's smallest read buffer).
pub const MIN_HEADER_BYTES: usize = 8192;

/// Spreads client connections evenly over the proxy workers.
///
/// Why: every worker accepts from the same listening socket, and the kernel hands a new
/// connection to whichever worker's poll reaches it first; the connection then stays on that
/// worker. With two workers and wrk's 64 connections, one worker took all 64 in one benchmark
/// run (`BENCHMARKS.md`, session 17): it queued every request while the other idled. As nginx
/// (`accept_disabled`) and Envoy (its exact connection balancer) do, a worker here accepts only
/// while no other worker has fewer open connections; the others wait until a count changes. Two
/// workers level at the minimum may both accept, so the counts can differ by a connection or two
/// for a moment. The least loaded worker is always allowed to accept, so connections are never
/// left in the backlog unless every worker is at its cap.
#[derive(Debug)]
pub struct Balance {
    /// Open client connections per worker (also `lb_gateway_worker_connections`).
    open: Box<[Gauge]>,
    /// Signalled whenever a count changes.
    changed: Notify,
}

impl Balance {
    /// A balance over one worker per gauge (at least one worker).
    pub fn new(mut open: Vec<Gauge>) -> Arc<Balance> {
        if open.is_empty() {
            open.push(Gauge::default());
        }
        Arc::new(Balance {
            open: open.into_boxed_slice(),
            changed: Notify::new(),
        })
    }

    /// Whether no worker has fewer open connections than worker `me`.
    fn may_accept(&self, me: usize) -> bool {
        let mine = self.open[me].get();
        self.open.iter().all(|o| o.get() >= mine)
    }

    /// Returns once worker `me` may accept.
    async fn turn(&self, me: usize) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between the check and the wait wakes it.
            changed.as_mut().enable();
            if self.may_accept(me) {
                return;
            }
            changed.await;
        }
    }

    /// Counts a connection accepted by worker `me` until the returned guard is dropped.
    fn opened(self: &Arc<Self>, me: usize) -> Opened {
        self.open[me].inc();
        self.changed.notify_waiters();
        Opened {
            balance: Arc::clone(self),
            me,
        }
    }
}

/// A connection counted in [`Balance`]; dropping it uncounts it.
struct Opened {
    balance: Arc<Balance>,
    me: usize,
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.balance.open[self.me].dec();
        self.balance.changed.notify_waiters();
    }
}

/// Serves `listener` (over TLS with `tls`: the handshake runs on the connection's own task) until
/// `shutdown`, then drains for at most `grace`. This is worker `worker` of `balance`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<service_kit::tls::rustls::ServerConfig>>,
    gw: Arc<Gateway>,
    limits: ConnLimits,
    (balance, worker): (Arc<Balance>, usize),
    grace: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let worker = worker.min(balance.open.len() - 1);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // One flattened write per response: for small answers cheaper than writev's iovecs.
    builder
        .http1()
        .keep_alive(true)
        .half_close(false)
        .writev(false)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES))
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .max_concurrent_streams(1024)
        .adaptive_window(true)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection's task, hyper's or the fast path's: the drain waits for them all.
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = async {
                balance.turn(worker).await;
                listener.accept().await
            } => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let opened = balance.opened(worker);
        let _ = stream.set_nodelay(true);
        let gw = Arc::clone(&gw);
        let client = Arc::new(Client::new(peer));
        let fast = (gw.own_http1_server && tls.is_none())
            .then(|| (Arc::clone(&gw), Arc::clone(&client), shutdown.clone()));
        // Set by the first request: until then the connection is on the clock (see below).
        let started = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&started);
        let service = service_fn(move |req| {
            if !seen.load(Ordering::Relaxed) {
                seen.store(true, Ordering::Relaxed);
            }
            handle(Arc::clone(&gw), Arc::clone(&client), req)
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_request_deadline = limits.header_read_timeout;
        let acceptor = tls
            .clone()
            .map(service_kit::tls::tokio_rustls::TlsAcceptor::from);
        tracker.spawn(async move {
            // The clock runs from accept, so a TLS handshake that never completes counts too.
            // hyper's header timer starts only once it knows the protocol, which takes 24
            // bytes of a dribbled HTTP/2 preface, or forever for a silent client: this one
            // closes any connection without a first request in time.
            let deadline = async {
                tokio::time::sleep(first_request_deadline).await;
                if started.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            let conn = async {
                match acceptor {
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(
                            service_kit::tls::HANDSHAKE_TIMEOUT,
                            acceptor.accept(stream),
                        )
                        .await;
                        match handshake {
                            Ok(Ok(tls)) => {
                                watcher
                                    .watch(
                                        builder.serve_connection_with_upgrades(
                                            TokioIo::new(tls),
                                            service,
                                        ),
                                    )
                                    .await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, client = %peer, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => {
                                tracing::debug!(client = %peer, "TLS handshake timed out");
                                Ok(())
                            }
                        }
                    }
                    None => match fast {
                        Some((gw, client, shutdown)) => {
                            let mut stream = stream;
                            let ended =
                                fast::serve(&mut stream, &gw, &client, limits, &started, &shutdown)
                                    .await;
                            match ended {
                                fast::Ended::Closed => Ok(()),
                                fast::Ended::Fallback(read) => {
                                    watcher
                                        .watch(builder.serve_connection_with_upgrades(
                                            TokioIo::new(fast::Rewind::new(stream, read)),
                                            service,
                                        ))
                                        .await
                                }
                            }
                        }
                        None => {
                            watcher
                                .watch(
                                    builder.serve_connection_with_upgrades(
                                        TokioIo::new(stream),
                                        service,
                                    ),
                                )
                                .await
                        }
                    },
                }
            };
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(error = %e, client = %peer, "client connection ended with an error");
                },
                () = deadline => {
                    tracing::debug!(client = %peer, timeout = ?first_request_deadline, "no request headers in time; closing");
                }
            }
            drop(opened);
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tracing::info!(
        connections = tracker.len(),
        ?grace,
        "draining client connections"
    );
    // hyper's connections are told to finish; the fast path's see `shutdown` themselves.
    let drained = async {
        graceful.shutdown().await;
        tracker.wait().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            ?grace,
            "requests still in flight after the grace period; dropping them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balance(workers: usize) -> Arc<Balance> {
        Balance::new((0..workers).map(|_| Gauge::default()).collect())
    }

    fn counts(b: &Balance) -> Vec<i64> {
        b.open.iter().map(Gauge::get).collect()
    }

    #[test]
    fn only_the_workers_with_the_fewest_open_connections_may_accept() {
        let b = balance(3);
        assert!((0..3).all(|w| b.may_accept(w)));
        let first = b.opened(0);
        assert!(!b.may_accept(0));
        assert!(b.may_accept(1) && b.may_accept(2));
        let second = b.opened(1);
        assert!(!b.may_accept(0) && !b.may_accept(1) && b.may_accept(2));
        assert_eq!(counts(&b), [1, 1, 0]);
        drop(first);
        assert_eq!(counts(&b), [0, 1, 0]);
        assert!(b.may_accept(0) && !b.may_accept(1) && b.may_accept(2));
        drop(second);
        assert_eq!(counts(&b), [0, 0, 0]);
    }

    #[tokio::test]
    async fn a_busier_worker_waits_until_the_others_catch_up_or_its_own_connections_close() {
        let b = balance(2);
        let _a = b.opened(0);
        let mut turn = Box::pin(b.turn(0));
        let waited = tokio::time::timeout(Duration::from_millis(50), turn.as_mut()).await;
        assert!(
            waited.is_err(),
            "worker 0 has more connections than worker 1"
        );
        // Worker 1 accepts one: level again, worker 0's turn comes.
        let b1 = b.opened(1);
        tokio::time::timeout(Duration::from_secs(5), turn)
            .await
            .expect("worker 0's turn after worker 1 caught up");

        let c = b.opened(0);
        let mut turn = Box::pin(b.turn(0));
        let waited = tokio::time::timeout(Duration::from_millis(50), turn.as_mut()).await;
        assert!(waited.is_err(), "2 against 1");
        // One of worker 0's own connections closes.
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), turn)
            .await
            .expect("worker 0's turn after one of its connections closed");
        drop(b1);
    }

    #[test]
    fn one_worker_always_may_accept() {
        let b = Balance::new(Vec::new());
        let _open: Vec<_> = (0..5).map(|_| b.opened(0)).collect();
        assert!(b.may_accept(0));
    }
}
