//! The proxy's listener: HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port, told
//! apart by the connection preface; HTTP/1.1 upgrades (WebSocket) allowed. Bodyless HTTP/1.1
//! requests on plain TCP are served by the listener's own fast path (`fast`); hyper serves the
//! rest, and the rest of a connection once the fast path hands it over.
//!
//! Each proxy worker runs this loop on its own single-threaded runtime, accepting from its clone
//! of the one listening socket (see `run_with_listeners`): a client connection stays on the
//! worker that accepted it, and so do the idle HTTP/1.1 backend connections it hands back
//! (`upstream` keeps one stack per worker); the single HTTP/2 connection per backend is shared.
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
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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

/// Serves `listener` (over TLS with `tls`: the handshake runs on the connection's own task) until
/// `shutdown`, then drains for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<service_kit::tls::rustls::ServerConfig>>,
    gw: Arc<Gateway>,
    limits: ConnLimits,
    grace: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
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
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
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
