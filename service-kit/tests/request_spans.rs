//! Which layer gets the per-request spans (`target: "request"`, DEBUG), with the filters
//! `telemetry::init` installs: the OTLP layer always, the log layer only when `RUST_LOG` asks.
//!
//! A binary of its own with a single test: whether a span is made at all depends on tracing's
//! process-wide callsite cache, which subscribers of tests running in parallel threads would
//! share.

use std::sync::{Arc, Mutex};

use service_kit::telemetry::{REQUEST_SPANS, export_filter};
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};

/// Names of the spans a layer was given.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: Context<'_, S>,
    ) {
        let name = attrs.metadata().name().to_owned();
        self.0.lock().expect("spans").push(name);
    }
}

impl Spans {
    fn names(&self) -> Vec<String> {
        self.0.lock().expect("spans").clone()
    }
}

/// Makes a request span, an INFO and a DEBUG span of the service, and an INFO span of the
/// exporter's transport; which of them were made at all.
fn make_spans() -> [bool; 4] {
    assert_eq!(REQUEST_SPANS, "request");
    let request = tracing::debug_span!(target: "request", "KV.Put");
    let info = tracing::info_span!(target: "coordinator::rpc", "startup");
    let debug = tracing::debug_span!(target: "coordinator::rpc", "internal");
    let transport = tracing::info_span!(target: "h2::codec", "frame");
    [&request, &info, &debug, &transport].map(|s| !s.is_disabled())
}

#[test]
fn request_spans_go_to_the_exporter_always_and_to_the_log_only_when_rust_log_asks() {
    // Exporting: the log layer and the OTLP layer, RUST_LOG at its default (info).
    let (logged, exported) = (Spans::default(), Spans::default());
    let subscriber = tracing_subscriber::registry()
        .with(logged.clone().with_filter(EnvFilter::new("info")))
        .with(
            exported
                .clone()
                .with_filter(export_filter(EnvFilter::new("info"))),
        );
    tracing::subscriber::with_default(subscriber, make_spans);
    assert_eq!(logged.names(), ["startup", "frame"]);
    assert_eq!(
        exported.names(),
        ["KV.Put", "startup"],
        "the exporter takes request spans and what RUST_LOG asks for, never its transport's"
    );

    // Not exporting: a request span is not made at all (nothing to pay for).
    let logged = Spans::default();
    let subscriber =
        tracing_subscriber::registry().with(logged.clone().with_filter(EnvFilter::new("info")));
    let made = tracing::subscriber::with_default(subscriber, make_spans);
    assert_eq!(made, [false, true, false, true]);
    assert_eq!(logged.names(), ["startup", "frame"]);

    // Not exporting, and RUST_LOG asks for them: logged.
    let asked = Spans::default();
    let subscriber = tracing_subscriber::registry().with(
        asked
            .clone()
            .with_filter(EnvFilter::new("info,request=debug")),
    );
    tracing::subscriber::with_default(subscriber, make_spans);
    assert_eq!(asked.names(), ["KV.Put", "startup", "frame"]);
}
