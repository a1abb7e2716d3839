//! Logs and traces.
//!
//! [`init`] installs one global `tracing` subscriber made of:
//!
//! - an [`EnvFilter`] read from `RUST_LOG` (default `info`), applied to
//!   everything below;
//! - a formatting layer writing to stdout, as human-readable text or as one
//!   JSON object per line ([`LogFormat`]);
//! - only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set and not empty, a
//!   `tracing-opentelemetry` layer feeding an OTLP/gRPC span exporter through
//!   a batch processor, with the `service.name` resource set. The exporter
//!   reads the rest of its settings (`OTEL_EXPORTER_OTLP_TIMEOUT`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, ...) from the environment as the
//!   OpenTelemetry specification describes.
//!
//! The W3C trace-context propagator is installed globally alongside, so that
//! a service can propagate spans across the gRPC calls it makes.
//!
//! Per-request spans are made at DEBUG under the target [`REQUEST_SPANS`]
//! (`#[tracing::instrument(target = "request", level = "debug", ...)]`). The
//! OTLP layer takes them whatever `RUST_LOG` says; the log layer only when
//! `RUST_LOG` enables them (`RUST_LOG=info,request=debug`). So a service that
//! exports spans exports one per request, and one that does not creates none:
//! at INFO, an enabled span cost the coordinator's leader 2.7 % of its CPU
//! per put (kept in the registry, entered and left at every poll), for
//! nobody to read.

use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt as tsfmt};

/// The environment variable whose presence turns on OTLP span export.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The target of per-request spans, which are made at DEBUG: exported over
/// OTLP whenever export is on, logged only when `RUST_LOG` asks for them.
pub const REQUEST_SPANS: &str = "request";

/// How log lines are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

impl LogFormat {
    /// The name used on the command line and in `LOG_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = String;

    /// Parses `text` or `json`, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("text") {
            Ok(LogFormat::Text)
        } else if s.eq_ignore_ascii_case("json") {
            Ok(LogFormat::Json)
        } else {
            Err(format!(
                "invalid log format {s:?}: expected \"text\" or \"json\""
            ))
        }
    }
}

/// Keeps the OpenTelemetry tracer provider alive; dropping it flushes the
/// spans still buffered and shuts the exporter down.
///
/// Hold it in `main` until the service has stopped. The guard returned by a
/// call of [`init`] that installed nothing (a second call, or no OTLP
/// endpoint) does nothing when dropped.
#[must_use = "dropping the guard shuts down span export"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether this guard owns an OTLP span exporter.
    pub fn exports_spans(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The subscriber may already be gone; stderr always is there.
            if let Err(err) = provider.shutdown() {
                eprintln!("warning: flushing OpenTelemetry spans failed: {err}");
            }
        }
    }
}

/// Installs the global subscriber for `service_name` (see the module docs).
///
/// Returns an error if `RUST_LOG` cannot be parsed or the OTLP exporter
/// cannot be built (for example, OTLP is enabled but no Tokio runtime is
/// running). Never panics; if a global subscriber is already installed (a
/// second call, or a test harness), it installs nothing and returns an inert
/// guard.
pub fn init(service_name: &str, format: LogFormat) -> anyhow::Result<TelemetryGuard> {
    let filter = env_filter()?;

    let provider = if otlp_enabled() {
        Some(tracer_provider(service_name)?)
    } else {
        None
    };
    let otel_layer = match provider.as_ref() {
        Some(provider) => Some(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service_name.to_owned()))
                .with_filter(export_filter(env_filter()?)),
        ),
        None => None,
    };

    let fmt_layer = match format {
        // Colours only for a terminal, never into a file or a collector.
        LogFormat::Text => tsfmt::layer()
            .with_ansi(std::io::stdout().is_terminal())
            .boxed(),
        LogFormat::Json => tsfmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };

    let installed = tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init();

    match (installed, provider) {
        (Ok(()), provider) => {
            if let Some(provider) = &provider {
                opentelemetry::global::set_tracer_provider(provider.clone());
                opentelemetry::global::set_text_map_propagator(
                    opentelemetry_sdk::propagation::TraceContextPropagator::new(),
                );
            }
            Ok(TelemetryGuard { provider })
        }
        (Err(_already_set), provider) => {
            if let Some(provider) = provider {
                // Unused: nothing was installed that would feed it.
                let _ = provider.shutdown();
            }
            Ok(TelemetryGuard { provider: None })
        }
    }
}

/// What `RUST_LOG` asks for (default `info`).
fn env_filter() -> anyhow::Result<EnvFilter> {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .context("invalid RUST_LOG")
}

/// What the OTLP layer takes: what `logged` (the log layer's filter, from
/// `RUST_LOG`) takes, and the per-request spans ([`REQUEST_SPANS`]) always;
/// never the exporter's own transport, which must not trace itself.
pub fn export_filter<S>(logged: EnvFilter) -> impl tracing_subscriber::layer::Filter<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    logged
        .or(filter_fn(|meta| {
            meta.is_span() && meta.target() == REQUEST_SPANS
        }))
        .and(filter_fn(|meta| !is_exporter_internal(meta.target())))
}

fn otlp_enabled() -> bool {
    std::env::var_os(OTLP_ENDPOINT_ENV).is_some_and(|v| !v.is_empty())
}

fn tracer_provider(service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    // The tonic channel is created (lazily, without connecting) on the
    // current runtime; without one, building it would panic.
    if tokio::runtime::Handle::try_current().is_err() {
        anyhow::bail!(
            "{OTLP_ENDPOINT_ENV} is set but telemetry::init was called outside a Tokio runtime"
        );
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .context("cannot build the OTLP span exporter")?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

fn is_exporter_internal(target: &str) -> bool {
    ["opentelemetry", "h2", "hyper", "tonic"]
        .iter()
        .any(|prefix| target.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_names_case_insensitively() {
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
    }

    #[test]
    fn log_format_rejects_unknown_name_with_the_choices() {
        let err = "yaml"
            .parse::<LogFormat>()
            .expect_err("yaml is not a format");
        assert!(
            err.contains("\"yaml\"") && err.contains("text") && err.contains("json"),
            "{err}"
        );
    }

    #[test]
    fn log_format_display_round_trips() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.to_string().parse::<LogFormat>(), Ok(format));
        }
    }

    #[tokio::test]
    async fn init_twice_returns_ok_without_panicking() {
        let first = init("service-kit-test", LogFormat::Text).expect("first init");
        let second = init("service-kit-test", LogFormat::Json).expect("second init");
        assert!(!second.exports_spans(), "a second init installs nothing");
        drop(second);
        drop(first);
        tracing::info!("still logging after both guards are dropped");
    }

    #[test]
    fn exporter_transport_targets_are_kept_out_of_traces() {
        assert!(is_exporter_internal("h2::codec"));
        assert!(is_exporter_internal("opentelemetry_sdk"));
        assert!(!is_exporter_internal("registry_svc"));
    }
}
