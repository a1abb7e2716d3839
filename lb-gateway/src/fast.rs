//! The listener's HTTP/1.1 fast path: the common request (no body, no upgrade) is read, routed,
//! proxied and answered by the connection's own task, without hyper's server.
//!
//! Why: hyper's HTTP/1.1 server runs a dispatcher and a second codec around each request (a
//! service future, a request and response of its own, a body channel); on this path they were
//! most of the user-space CPU that separated the gateway from nginx and HAProxy (profiled in
//! `BENCHMARKS.md`). Here a request head is parsed in place with `httparse` (the parser hyper
//! uses) on the connection's read buffer; its header values and target are slices of that
//! buffer, not copies. The request then takes exactly the path hyper's service function gives
//! it ([`crate::proxy::serve_request`]): routing, admission, hashing, retries, metrics, spans, the
//! access log are the same code. The answer is written by this module: head and (small) body in
//! one write, `Content-Length` or chunked framing, no body for HEAD, 1xx, 204 and 304.
//!
//! Everything else goes to hyper, with the bytes already read: a connection that starts with
//! the HTTP/2 preface (h2c), a request with a body (`Content-Length` > 0 or any
//! `Transfer-Encoding`), with `Upgrade` or `Expect`, CONNECT, a target that is not origin or
//! absolute form, a head `httparse` or `http` refuses (hyper then answers 400 itself). From
//! then on hyper serves the connection, as it served every connection before this module.
//!
//! Limits, as with hyper: a head larger than `max_header_bytes`, or with more than
//! [`MAX_HEADERS`] fields, is answered 431 (with a JSON body) and the connection closed; a head
//! not complete within `header_read_timeout` of the wait's start (accept for the first request,
//! the previous answer for later ones) closes the connection, and so does an idle keep-alive
//! connection after that time. Pipelined requests are answered in order (they wait in the read
//! buffer). On shutdown the current answer is finished and the connection closed.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode, Uri};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::h1::Fields;
use crate::head::{self, RawHead, ReqHead};
use crate::proxy::{Client, Gateway, serve_request};
use crate::server::ConnLimits;
use crate::upstream::ProxyBody;

/// Most header fields in a request head (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Read granularity.
const READ: usize = 8 * 1024;
/// Body data larger than this is written on its own instead of copied behind the head.
const COPY_MAX: usize = 16 * 1024;

/// How the fast path left a connection.
#[derive(Debug)]
pub enum Ended {
    /// Closed (by either side, a timeout, shutdown or an error).
    Closed,
    /// Hyper takes over the connection; these bytes were read from it and not consumed.
    Fallback(Bytes),
}

/// A request head parsed in place: offsets into the head's bytes.
struct Parsed {
    /// Length of the head, blank line included.
    len: usize,
    method: (usize, usize),
    target: (usize, usize),
    http10: bool,
    /// Name and value ranges of each field.
    fields: Vec<[usize; 4]>,
}

/// What a parse found.
enum Parse {
    /// A complete head.
    Head(Parsed),
    /// More bytes are needed.
    Partial,
    /// More than [`MAX_HEADERS`] fields.
    TooManyFields,
    /// Something only hyper serves (or refuses).
    Hyper,
}

fn offset(base: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    (start, start + part.len())
}

/// Parses the head at the start of `buf`; decides whether the fast path serves it.
fn parse(buf: &[u8], fields: &mut Vec<[usize; 4]>) -> Parse {
    // Uninitialised slots: httparse writes the ones it fills (zeroing all of them cost more
    // than the parse of a small head).
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parse::TooManyFields,
        Err(_) => return Parse::Hyper,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parse::Hyper;
    };
    if method == "CONNECT" || !(path.starts_with('/') || path.starts_with("http")) {
        return Parse::Hyper;
    }
    fields.clear();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if h.value != b"0" {
                return Parse::Hyper;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Parse::Hyper;
        }
        let n = offset(buf, name);
        let v = offset(buf, h.value);
        fields.push([n.0, n.1, v.0, v.1]);
    }
    Parse::Head(Parsed {
        len,
        method: offset(buf, method.as_bytes()),
        target: offset(buf, path.as_bytes()),
        http10: version == 0,
        fields: std::mem::take(fields),
    })
}

/// The request's head (an absolute-form target) as `http` types whose values share `head`'s
/// bytes, and whether the connection stays; `None` for anything `http` refuses (hyper then
/// answers it).
fn to_parts(head: &Bytes, p: &Parsed) -> Option<(http::request::Parts, bool)> {
    let method = Method::from_bytes(&head[p.method.0..p.method.1]).ok()?;
    let uri = Uri::from_maybe_shared(head.slice(p.target.0..p.target.1)).ok()?;
    let parts = head::parts_of(head, &p.fields, method, uri, p.http10)?;
    let connection = p
        .fields
        .iter()
        .filter(|f| head[f[0]..f[1]].eq_ignore_ascii_case(b"connection"))
        .map(|f| &head[f[2]..f[3]]);
    Some((parts, head::keep_alive(p.http10, connection)))
}

/// Serves `io` until it closes or needs hyper. `started` is set once a first head is complete.
pub async fn serve(
    io: &mut TcpStream,
    gw: &Arc<Gateway>,
    client: &Arc<Client>,
    limits: ConnLimits,
    started: &AtomicBool,
    shutdown: &CancellationToken,
) -> Ended {
    let max_head = limits.max_header_bytes.max(crate::server::MIN_HEADER_BYTES);
    let mut buf = BytesMut::with_capacity(READ);
    let mut out: Vec<u8> = Vec::with_capacity(READ);
    let mut fields: Vec<[usize; 4]> = Vec::with_capacity(16);
    let mut first = true;
    // One timer and one shutdown waiter for the connection's life, re-armed per request (cheaper
    // than a new timer entry and waiter list registration for every request).
    let clock = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(clock);
    let stopping = shutdown.cancelled();
    tokio::pin!(stopping);
    loop {
        // Read one head, on the clock.
        clock
            .as_mut()
            .reset(tokio::time::Instant::now() + limits.header_read_timeout);
        let parsed = loop {
            if !buf.is_empty() {
                if first && PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]) {
                    // HTTP/2 with prior knowledge (or its first bytes): hyper's.
                    return Ended::Fallback(buf.freeze());
                }
                match parse(&buf, &mut fields) {
                    Parse::Head(p) if p.len > max_head => {
                        too_large(io, max_head).await;
                        return Ended::Closed;
                    }
                    Parse::Head(p) => break p,
                    Parse::Partial => {}
                    Parse::TooManyFields => {
                        too_large(io, max_head).await;
                        return Ended::Closed;
                    }
                    Parse::Hyper => return Ended::Fallback(buf.freeze()),
                }
                if buf.len() >= max_head {
                    too_large(io, max_head).await;
                    return Ended::Closed;
                }
            }
            if buf.capacity() - buf.len() < READ / 2 {
                buf.reserve(READ);
            }
            let read = tokio::select! {
                biased;
                r = io.read_buf(&mut buf) => r,
                () = &mut clock => {
                    tracing::debug!(client = %client.addr, timeout = ?limits.header_read_timeout, "no complete request head in time; closing");
                    return Ended::Closed;
                }
                () = &mut stopping, if buf.is_empty() => return Ended::Closed,
            };
            match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => {}
            }
        };
        first = false;
        if !started.load(Ordering::Relaxed) {
            started.store(true, Ordering::Relaxed);
        }
        let head = buf.split_to(parsed.len).freeze();
        let http10 = parsed.http10;
        let method_head = head[parsed.method.0..parsed.method.1] == *b"HEAD";
        // An origin-form target (the common case) stays as read; an absolute-form one becomes
        // `Parts` here (its authority and scheme need `http`'s parser).
        let req = if head[parsed.target.0..].starts_with(b"/") {
            // The parsed field places go with the head; the next parse gets a new list.
            fields = Vec::with_capacity(16);
            RawHead::new(head, parsed.method, parsed.target, parsed.fields, http10).map(|raw| {
                let keep_alive = raw.keep_alive();
                (ReqHead::Raw(raw), keep_alive)
            })
        } else {
            let made = to_parts(&head, &parsed).map(|(p, k)| (ReqHead::Parts(Box::new(p)), k));
            fields = parsed.fields;
            made.ok_or(head)
        };
        let (req, keep_alive) = match req {
            Ok(made) => made,
            Err(head) => {
                // Put the head back in front of what follows it, for hyper.
                let mut all = BytesMut::with_capacity(head.len() + buf.len());
                all.extend_from_slice(&head);
                all.extend_from_slice(&buf);
                return Ended::Fallback(all.freeze());
            }
        };
        let resp = serve_request(gw, client, req, None, None, Fields::Lines).await;
        let keep_alive = keep_alive && !shutdown.is_cancelled();
        let kept = write_response(io, &mut out, resp, method_head, http10, keep_alive).await;
        if !kept {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
    }
}

/// Answers 431 with a JSON body and closes.
async fn too_large(io: &mut TcpStream, max: usize) {
    let body = serde_json::json!({
        "error": "request_header_fields_too_large",
        "message": format!(
            "the request head is larger than {max} bytes or has more than {MAX_HEADERS} fields"
        ),
    })
    .to_string();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 431 Request Header Fields Too Large\r\n");
    out.extend_from_slice(b"content-type: application/json\r\nconnection: close\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    date::append(&mut out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    let _ = io.write_all(&out).await;
    let _ = io.shutdown().await;
    // Closing with unread bytes would reset the connection, and a reset can destroy the
    // answer before the client reads it: read what the client still sends, for a while.
    let lingering = async {
        let mut sink = vec![0u8; READ];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match tokio::time::timeout(Duration::from_millis(500), io.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), lingering).await;
}

/// How the answer's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes `resp`; whether the connection may serve another request.
async fn write_response(
    io: &mut TcpStream,
    out: &mut Vec<u8>,
    resp: Response<ProxyBody>,
    method_head: bool,
    http10: bool,
    mut keep_alive: bool,
) -> bool {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let headers = &parts.headers;
    let no_body = method_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    let framing = if no_body {
        Framing::None
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if http10 {
        Framing::UntilClose
    } else {
        Framing::Chunked
    };
    if framing == Framing::UntilClose {
        keep_alive = false;
    }

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    // An answer of the gateway's own client comes with its field lines ready (see `h1::Lines`).
    if let ProxyBody::Raw {
        lines: Some(lines), ..
    } = &body
    {
        out.extend_from_slice(&lines.block);
        has_date = lines.has_date;
    }
    for (name, value) in headers {
        // Framing and connection management are this hop's own.
        if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue;
        }
        // A HEAD's or a 304's length describes the body a GET would get: it goes on as is.
        // Otherwise the length written below is the one this hop sends.
        if name == header::CONTENT_LENGTH && !method_head && status != StatusCode::NOT_MODIFIED {
            continue;
        }
        has_date |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0u8; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::UntilClose => {}
    }
    if !has_date {
        date::append(out);
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    drop(parts);

    if framing == Framing::None {
        // Dropping the body releases its load and returns an (empty) backend connection.
        drop(body);
        return io.write_all(out).await.is_ok() && keep_alive;
    }

    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut trailers: Option<HeaderMap> = None;
    let mut broken = false;
    loop {
        // Take what is ready without waiting; write what is pending before waiting.
        let polled = poll_now(&mut body);
        let frame = match polled {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    if io.write_all(out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body broke off; closing the client connection");
                broken = true;
                break;
            }
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if (data.len() as u64) > left {
            // More than announced: cut it off here and close.
            broken = true;
            break;
        }
        if let Framing::Length(_) = framing {
            left -= data.len() as u64;
        }
        if framing == Framing::Chunked {
            let mut hex = [0u8; 16];
            out.extend_from_slice(hex_len(data.len(), &mut hex));
            out.extend_from_slice(b"\r\n");
        }
        if data.len() > COPY_MAX {
            if (!out.is_empty() && io.write_all(out).await.is_err())
                || io.write_all(&data).await.is_err()
            {
                return false;
            }
            out.clear();
        } else {
            out.extend_from_slice(&data);
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= 4 * COPY_MAX {
            if io.write_all(out).await.is_err() {
                return false;
            }
            out.clear();
        }
    }
    drop(body);
    if broken {
        // Whatever was written stays truncated: the client sees the connection close early.
        let _ = io.write_all(out).await;
        return false;
    }
    match framing {
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n");
            for (name, value) in trailers.iter().flatten() {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(_) if left != 0 => {
            // The body ended before the announced length: the client must not wait for more.
            let _ = io.write_all(out).await;
            return false;
        }
        _ => {}
    }
    io.write_all(out).await.is_ok() && keep_alive
}

/// Polls `body` once, with a waker that is discarded (a `Pending` is polled again properly).
fn poll_now(
    body: &mut ProxyBody,
) -> Poll<Option<Result<http_body::Frame<Bytes>, crate::upstream::BoxError>>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    Pin::new(body).poll_frame(&mut cx)
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

fn hex_len(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// A connection hyper takes over: the bytes the fast path read come first.
pub struct Rewind {
    prefix: Bytes,
    io: TcpStream,
}

impl Rewind {
    /// `io`, read from `prefix` first.
    pub fn new(io: TcpStream, prefix: Bytes) -> Rewind {
        Rewind { prefix, io }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

mod date {
    //! The `Date` header (RFC 9110 §6.6.1), formatted once a second per thread.
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    /// Appends `date: <IMF-fixdate>\r\n`.
    pub fn append(out: &mut Vec<u8>) {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                c.1 = format(secs);
                c.0 = secs;
            }
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(&c.1);
            out.extend_from_slice(b"\r\n");
        });
    }

    /// `Sun, 06 Nov 1994 08:49:37 GMT` for `secs` since the Unix epoch.
    pub fn format(secs: u64) -> [u8; 29] {
        const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
        const MONTHS: [&[u8; 3]; 12] = [
            b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
            b"Dec",
        ];
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let mut out = [0u8; 29];
        let text = format!(
            "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
            std::str::from_utf8(DAYS[(days % 7) as usize]).unwrap_or("Thu"),
            d,
            std::str::from_utf8(MONTHS[(month - 1) as usize]).unwrap_or("Jan"),
            year,
            h,
            m,
            s
        );
        let n = text.len().min(29);
        out[..n].copy_from_slice(&text.as_bytes()[..n]);
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn dates_are_imf_fixdate() {
            assert_eq!(
                &super::format(784_111_777),
                b"Sun, 06 Nov 1994 08:49:37 GMT"
            );
            assert_eq!(&super::format(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
            assert_eq!(
                &super::format(951_782_400),
                b"Tue, 29 Feb 2000 00:00:00 GMT"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Version;

    use super::*;

    fn parsed(raw: &[u8]) -> Parse {
        parse(raw, &mut Vec::new())
    }

    #[test]
    fn bodyless_heads_take_the_fast_path_and_the_rest_goes_to_hyper() {
        let Parse::Head(p) =
            parsed(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\nGET")
        else {
            panic!("fast path expected");
        };
        let raw =
            Bytes::from_static(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(p.len, raw.len());
        let (parts, keep) = to_parts(&raw, &p).expect("parts");
        assert_eq!(parts.method, Method::GET);
        assert_eq!(
            parts.uri.path_and_query().map(|p| p.as_str()),
            Some("/a?b=1")
        );
        assert_eq!(parts.headers["host"], "x");
        assert!(keep);
        for hyper_s in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(
                matches!(parsed(hyper_s), Parse::Hyper),
                "{}",
                String::from_utf8_lossy(hyper_s)
            );
        }
        assert!(matches!(
            parsed(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Parse::Partial
        ));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "x: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(parsed(many.as_bytes()), Parse::TooManyFields));
    }

    #[test]
    fn http10_and_connection_close_decide_keep_alive() {
        for (raw, keep) in [
            (&b"GET / HTTP/1.0\r\n\r\n"[..], false),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\n\r\n", true),
        ] {
            let Parse::Head(p) = parsed(raw) else {
                panic!("fast path expected");
            };
            let (parts, k) = to_parts(&Bytes::copy_from_slice(raw), &p).expect("parts");
            assert_eq!(k, keep, "{}", String::from_utf8_lossy(raw));
            assert_eq!(
                parts.version == Version::HTTP_10,
                raw.starts_with(b"GET / HTTP/1.0")
            );
        }
    }

    #[test]
    fn numbers_are_written_in_decimal_and_hex() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(1_234_567, &mut [0; 20]), b"1234567");
        assert_eq!(hex_len(255, &mut [0; 16]), b"ff");
        assert_eq!(hex_len(1, &mut [0; 16]), b"1");
    }
}
