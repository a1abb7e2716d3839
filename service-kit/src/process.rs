//! The serving half of a service binary's `main`, the same for every service.
//!
//! Why here: registry-svc, config-svc, demo-svc and lb-gateway each wrote out the same steps
//! (start the runtime, install telemetry inside it, log a startup line, run until a signal,
//! turn the outcome into an exit code), and a fix to one had to be made four times. What
//! differs between them (which runtime, what the startup line says, what runs) is passed in.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::exit_bad_config;
use crate::telemetry::{self, LogFormat};

/// Runs a service whose configuration `config` was checked: inside `runtime` (an error there
/// is printed, and the exit code is 1), installs telemetry for `name` (exit 64 if it cannot
/// be: a bad `RUST_LOG` or OTLP setting is bad configuration), calls `started` (the service's
/// startup log line), then runs `serve(config, token)` with a token cancelled on SIGTERM or
/// SIGINT. Exit code 0 when it returns `Ok`; otherwise its error is logged as `<name> failed`
/// and the code is 1.
pub fn run<C, F, Fut, E>(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    name: &'static str,
    log_format: LogFormat,
    config: C,
    started: impl FnOnce(&C),
    serve: F,
) -> ExitCode
where
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the Tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Inside the runtime: the OTLP exporter creates its channel here.
        let _telemetry = match telemetry::init(name, log_format) {
            Ok(guard) => guard,
            Err(err) => exit_bad_config(format!("{err:#}")),
        };
        started(&config);
        match serve(config, crate::shutdown::token_on_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                // Logs go to stdout; the reason a service stopped also goes to stderr.
                tracing::error!(error = format!("{err:#}"), "{name} failed");
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// A runtime with `worker_threads` request threads (`None`, or 0: Tokio's default, one per CPU).
///
/// One thread gets Tokio's single-threaded scheduler, which runs woken tasks in the order they
/// were woken. The multi-threaded one, even with one worker, runs the task woken last first
/// (its LIFO slot). When many answers become ready together (a committed Raft entry's puts, a
/// burst of replies to a load generator), their tasks each wake an HTTP/2 connection task; the
/// LIFO slot runs that connection right after each one, writing one message per `writev`. In
/// wake order, every ready task runs first and each connection then writes all it has at once
/// (half the coordinator leader's writes per put, `BENCHMARKS.md` session 12).
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n @ 2..) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None | Some(0) => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_thread_is_the_single_threaded_scheduler_and_more_are_that_many_workers() {
        use tokio::runtime::RuntimeFlavor;
        let one = runtime(Some(1)).expect("runtime");
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let three = runtime(Some(3)).expect("runtime");
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
        let default = runtime(None).expect("runtime");
        assert_eq!(
            default.handle().runtime_flavor(),
            RuntimeFlavor::MultiThread
        );
        // Timers and I/O are enabled in every flavour.
        assert_eq!(
            one.block_on(async {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                7
            }),
            7
        );
    }

    #[test]
    fn the_outcome_of_serve_is_the_exit_code() {
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        };
        let ok = run(
            rt(),
            "svc",
            LogFormat::Text,
            (),
            |_| {},
            |(), _| async { Ok::<(), String>(()) },
        );
        assert_eq!(ok, ExitCode::SUCCESS);
        let failed = run(
            rt(),
            "svc",
            LogFormat::Text,
            (),
            |_| {},
            |(), _| async { Err::<(), _>("boom".to_string()) },
        );
        assert_eq!(failed, ExitCode::FAILURE);
        let no_runtime = run(
            Err(std::io::Error::other("no threads")),
            "svc",
            LogFormat::Text,
            (),
            |_| panic!("not started without a runtime"),
            |(), _| async { Ok::<(), String>(()) },
        );
        assert_eq!(no_runtime, ExitCode::FAILURE);
    }

    #[test]
    fn serve_gets_a_live_token_and_started_runs_first() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let order = std::sync::Mutex::new(Vec::new());
        let code = run(
            rt,
            "svc",
            LogFormat::Text,
            7,
            |config| {
                order
                    .lock()
                    .expect("not poisoned")
                    .push(("started", *config))
            },
            |config, token| {
                order.lock().expect("not poisoned").push(("serve", config));
                async move {
                    if token.is_cancelled() {
                        Err("cancelled before any signal".to_string())
                    } else {
                        Ok(())
                    }
                }
            },
        );
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(
            *order.lock().expect("not poisoned"),
            [("started", 7), ("serve", 7)]
        );
    }
}
