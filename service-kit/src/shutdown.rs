//! Shutdown on SIGTERM or SIGINT.
//!
//! A service's `run` takes a [`CancellationToken`]; the binary passes the one
//! from [`token_on_signal`], tests pass their own and cancel it themselves.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Returns a future that resolves when the process receives SIGTERM or SIGINT.
///
/// The handlers are installed when this function is called, not when the
/// future is first polled, so a signal that arrives in between is not lost.
/// If a handler cannot be installed (which the OS does not do in practice),
/// the failure is logged and that signal is ignored; the other still works.
///
/// # Panics
///
/// Panics if called outside a Tokio runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let mut terminate = install(SignalKind::terminate(), "SIGTERM");
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            () = recv(&mut terminate) => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            () = recv(&mut interrupt) => tracing::info!(signal = "SIGINT", "shutdown requested"),
        }
    }
}

/// Returns a token that is cancelled when the process receives SIGTERM or
/// SIGINT (see [`signal`]).
///
/// # Panics
///
/// Panics if called outside a Tokio runtime.
pub fn token_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let on_signal = signal();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = on_signal => cancel.cancel(),
            // Someone else cancelled it: stop waiting for a signal.
            () = cancel.cancelled() => {}
        }
    });
    token
}

fn install(kind: SignalKind, name: &'static str) -> Option<Signal> {
    match tokio::signal::unix::signal(kind) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(signal = name, error = %err, "cannot install signal handler; ignoring this signal");
            None
        }
    }
}

/// Waits for the next delivery of `signal`, or forever if it has none.
async fn recv(signal: &mut Option<Signal>) {
    match signal {
        Some(signal) => {
            // `None` means the signal driver is gone, which happens only when
            // the runtime shuts down; treat it as never firing.
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}
