//! W3C trace context (`traceparent`) for proxied requests.
//!
//! The gateway is one hop of the trace: it reads the caller's `traceparent` (or starts a trace
//! when there is none or it is malformed), opens its own span as a child, and sends the
//! backend a `traceparent` naming that span as the parent. `tracestate` passes through
//! untouched. When OpenTelemetry export is on (`OTEL_EXPORTER_OTLP_ENDPOINT`), the request's
//! `tracing` span is parented to the caller's context and its exported IDs are the ones sent
//! on; otherwise the gateway makes the IDs itself, so propagation works without a collector
//! (and the request span is at DEBUG level, costing nothing unless `RUST_LOG` asks for it).

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed or generated trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The parent span, 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex_to<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        // Only lowercase is valid in traceparent.
        if pair.iter().any(u8::is_ascii_uppercase) {
            return None;
        }
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl TraceParent {
    /// Parses `version-traceid-parentid-flags`. Version `ff` and all-zero IDs are invalid; a
    /// future version with extra fields is read by its first four (as the spec asks).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let mut parts = value.split(|&b| b == b'-');
        let version = hex_to::<1>(parts.next()?)?[0];
        let trace_id = hex_to::<16>(parts.next()?)?;
        let span_id = hex_to::<8>(parts.next()?)?;
        let flags = hex_to::<1>(parts.next()?)?[0];
        if version == 0xff
            || (version == 0 && parts.next().is_some())
            || trace_id == [0; 16]
            || span_id == [0; 8]
        {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace, sampled.
    pub fn new_root() -> TraceParent {
        let (trace_id, span_id) = ids::fresh();
        TraceParent {
            trace_id: nonzero(trace_id),
            span_id: nonzero(span_id),
            flags: 1,
        }
    }

    /// A child of this context: same trace and flags, a new span ID.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            span_id: nonzero(ids::fresh().1),
            ..*self
        }
    }

    /// The header value (version 00).
    pub fn header(&self) -> String {
        self.header_bytes().iter().map(|&b| char::from(b)).collect()
    }

    /// The header value (version 00) as bytes on the stack: no allocation for the text itself.
    pub fn header_bytes(&self) -> [u8; 55] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 55];
        out[0] = b'0';
        out[1] = b'0';
        // Hex pairs at 3.., 36.. and 53.., with the dashes between them left in place.
        let mut put = |at: usize, b: u8| {
            out[at] = HEX[usize::from(b >> 4)];
            out[at + 1] = HEX[usize::from(b & 15)];
        };
        for (i, &b) in self.trace_id.iter().enumerate() {
            put(3 + 2 * i, b);
        }
        for (i, &b) in self.span_id.iter().enumerate() {
            put(36 + 2 * i, b);
        }
        put(53, self.flags);
        out
    }

    /// The trace ID in hex.
    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }

    /// The span ID in hex.
    pub fn span_id_hex(&self) -> String {
        let mut s = String::with_capacity(16);
        push_hex(&mut s, &self.span_id);
        s
    }
}

mod ids {
    //! Trace and span IDs: random, from a small fast generator per thread (xoshiro256++),
    //! seeded from the operating system's generator when the thread first needs one. IDs only
    //! have to be unique and unpredictable enough not to collide (W3C Trace Context §3.2.2.3),
    //! not secret; the cryptographic thread generator cost more than the rest of the ID work
    //! on every request.
    use std::cell::RefCell;

    use rand::rngs::SmallRng;
    use rand::{Rng as _, SeedableRng as _};

    thread_local! {
        static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
    }

    /// A trace ID and a span ID (either may be all zero; callers fix that).
    pub fn fresh() -> ([u8; 16], [u8; 8]) {
        RNG.with(|r| {
            let mut r = r.borrow_mut();
            (r.random(), r.random())
        })
    }
}

fn nonzero<const N: usize>(mut b: [u8; N]) -> [u8; N] {
    if b == [0; N] {
        b[N - 1] = 1;
    }
    b
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
}

/// The gateway's hop: its own span's context and its parent's span (if the caller sent one).
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    /// The gateway's span, sent on as the backend's parent.
    pub ours: TraceParent,
    /// The caller's span, if any.
    pub parent: Option<TraceParent>,
}

/// Works out the gateway's hop for a request whose `traceparent` is `incoming`, parenting
/// `span` to it for OpenTelemetry export when export is on.
pub fn hop(incoming: Option<&[u8]>, span: &tracing::Span) -> Hop {
    let parent = incoming.and_then(TraceParent::parse);
    if let Some(p) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(p.trace_id),
            SpanId::from_bytes(p.span_id),
            TraceFlags::new(p.flags),
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(remote);
        // Fails only when no OpenTelemetry layer is installed: then the IDs are ours alone.
        let _ = span.set_parent(cx);
    }
    // With an exporter, the span's own IDs; without, made here.
    let exported = span.context().span().span_context().clone();
    let ours = if exported.is_valid() {
        TraceParent {
            trace_id: exported.trace_id().to_bytes(),
            span_id: exported.span_id().to_bytes(),
            flags: exported.trace_flags().to_u8(),
        }
    } else {
        match parent {
            Some(p) => p.child(),
            None => TraceParent::new_root(),
        }
    };
    Hop { ours, parent }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example_and_writes_it_back() {
        let tp = TraceParent::parse(VALID).expect("valid");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.header().as_bytes(), VALID);
        assert_eq!(&tp.header_bytes()[..], VALID);
        let root = TraceParent::new_root();
        let text = root.header_bytes();
        assert_eq!(TraceParent::parse(&text), Some(root));
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"",
        ] {
            assert_eq!(
                TraceParent::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A future version may carry more fields.
        assert!(
            TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn fresh_ids_do_not_repeat_within_a_thread_or_across_threads() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let root = TraceParent::new_root();
            assert!(seen.insert(root.trace_id), "a trace ID repeated");
            assert_ne!(root.span_id, [0; 8]);
        }
        let other: Vec<[u8; 16]> = std::thread::spawn(|| {
            (0..1_000)
                .map(|_| TraceParent::new_root().trace_id)
                .collect()
        })
        .join()
        .expect("the other thread");
        for id in other {
            assert!(seen.insert(id), "another thread made an ID this one made");
        }
        let parent = TraceParent::new_root();
        let (a, b) = (parent.child(), parent.child());
        assert_eq!((a.trace_id, b.trace_id), (parent.trace_id, parent.trace_id));
        assert_ne!(a.span_id, b.span_id);
    }

    #[test]
    fn hop_keeps_the_trace_and_makes_a_new_span() {
        let span = tracing::Span::none();
        let hop = hop(Some(VALID), &span);
        let parent = hop.parent.expect("parent");
        assert_eq!(hop.ours.trace_id, parent.trace_id);
        assert_ne!(hop.ours.span_id, parent.span_id);
        let root = super::hop(None, &span);
        assert!(root.parent.is_none());
        assert_ne!(root.ours.trace_id, [0; 16]);
    }
}
