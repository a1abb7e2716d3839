//! The proxy's listener: HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port, told
//! apart by the connection preface; HTTP/1.1 upgrades (WebSocket) allowed.
//!
//! Each proxy worker runs this loop on its own single-threaded runtime, accepting from its clone
//! of the one listening socket (see `run_with_listeners`): a client connection stays on the
//! worker that accepted it, and so do the idle HTTP/1.1 backend connections it hands back
//! (`upstream` keeps one stack per worker); the single HTTP/2 connection per backend is shared.
//!
//! Connections are capped by a semaphore (per worker; accepting waits while the cap is reached). On
//! shutdown the listener closes, every connection is told to finish (HTTP/1.1: after the
//! current response; HTTP/2: GOAWAY), and in-flight requests get `grace` to complete before the
//! rest are dropped.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::proxy::{Client, Gateway, handle};

/// Serves `listener` (over TLS with `tls`: the handshake runs on the connection's own task) until
/// `shutdown`, then drains for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<service_kit::tls::rustls::ServerConfig>>,
    gw: Arc<Gateway>,
    max_connections: usize,
    grace: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // One flattened write per response: for small answers cheaper than writev's iovecs.
    builder
        .http1()
        .keep_alive(true)
        .half_close(false)
        .writev(false);
    builder
        .http2()
        .max_concurrent_streams(1024)
        .adaptive_window(true);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(max_connections));
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
        let service = service_fn(move |req| handle(Arc::clone(&gw), Arc::clone(&client), req));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = tls
            .clone()
            .map(service_kit::tls::tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            let result = match acceptor {
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
                                    builder
                                        .serve_connection_with_upgrades(TokioIo::new(tls), service),
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
                None => {
                    watcher
                        .watch(
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service),
                        )
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, client = %peer, "client connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        ?grace,
        "draining client connections"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "requests still in flight after the grace period; dropping them"
        );
    }
    Ok(())
}
