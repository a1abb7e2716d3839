//! The gateway's own HTTP/1.1 client connection, for the common request: no body, no upgrade.
//!
//! Why not hyper's client here: hyper runs every client connection as a task of its own, fed
//! by a channel, so each proxied request wakes two tasks and goes through a second codec
//! (profiled in `BENCHMARKS.md`). For a request without a body the exchange is simple enough to
//! drive from the request's own task: write the head, parse the response head with `httparse`
//! (the parser hyper uses), then stream the body straight from the socket inside the response
//! body's `poll_frame`. Requests with bodies, upgrades and HTTP/2 keep using hyper.
//!
//! Framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; chunked when it is the
//! final transfer coding (trailers are passed on); else `Content-Length`; else until close. A
//! connection goes back to its pool only after its body was read to the end and neither side
//! asked to close.
//!
//! The connection is plain TCP or TLS ([`MaybeTlsStream`], for routes with `backend.tls`); the
//! code is the same for both, except the idle check ([`RawConn::looks_open`]): TLS must let
//! rustls read what arrived while idle (TLS 1.3 session tickets arrive after the handshake and
//! are not a sign of a dead connection).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body::Frame;
use service_kit::tls::MaybeTlsStream;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 128;
/// Largest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Read granularity.
const READ: usize = 16 * 1024;

/// One HTTP/1.1 connection to a backend.
#[derive(Debug)]
pub struct RawConn {
    io: MaybeTlsStream,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// It served a request before (so a close before any answer means it went stale).
    reused: bool,
    /// The per-try deadline of [`RawConn::exchange_within`], kept with the connection and
    /// re-armed for each request: moving an armed timer later is a compare-and-swap, while a
    /// new timer per request takes the timer driver's lock twice (in, out).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The buffer [`RawConn::exchange_within`] encodes request heads into, kept with the
    /// connection (one allocation per connection, not per request).
    scratch: Vec<u8>,
}

/// A try that did not get its answer's head before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// A reused connection was closed by the backend before it answered a single byte: the
    /// request can go again on a fresh connection.
    #[error("the pooled connection was closed before an answer")]
    Stale,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The backend's answer is not HTTP/1.1 we accept.
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// This many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the backend closes.
    UntilClose,
}

/// How the fields of a response head are handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    /// As a [`HeaderMap`], hop-by-hop fields included (the caller strips them): for answers
    /// that go on through hyper.
    Map,
    /// As [`Lines`], already the client's: for answers the listener's own HTTP/1.1 path writes.
    Lines,
}

/// The field lines of a response head as the client's hop sends them on: `name: value\r\n`
/// for every field of the backend's head except the hop-by-hop ones (RFC 9110 §7.6.1: those
/// RFC 9110 names, `keep-alive`, `proxy-connection`, and any named in `Connection`), the
/// framing (`Transfer-Encoding`; `Content-Length` too, except for a HEAD or a 304, where it
/// describes the body a GET would get), in the backend's order and spelling.
///
/// Why: copying the lines costs one small copy, where a [`HeaderMap`] costs a parse and a hash
/// of every name, two allocations, and a walk to write it out again (profiled in
/// `BENCHMARKS.md`).
#[derive(Debug, Default)]
pub struct Lines {
    /// The lines, each ending in CRLF.
    pub block: Vec<u8>,
    /// Whether a `Date` field is among them.
    pub has_date: bool,
}

/// A response head.
#[derive(Debug)]
pub struct Head {
    /// The status.
    pub status: StatusCode,
    /// Its headers, hop-by-hop ones included (the caller strips them); empty when the head
    /// was read as [`Fields::Lines`].
    pub headers: HeaderMap,
    /// The field lines the client gets, when read as [`Fields::Lines`].
    pub lines: Option<Lines>,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection may serve another request after this body.
    pub keep_alive: bool,
}

impl RawConn {
    /// A fresh connection.
    pub fn new(io: MaybeTlsStream) -> RawConn {
        RawConn {
            io,
            buf: BytesMut::with_capacity(READ),
            reused: false,
            timer: None,
            scratch: Vec::new(),
        }
    }

    /// Sends the request head `write_head` writes (a `method` request without a body) and
    /// reads the answer's head as [`RawConn::exchange`] does, given up at `deadline` (the
    /// connection is then unusable: the answer may still come).
    pub async fn exchange_within(
        &mut self,
        deadline: tokio::time::Instant,
        method: &Method,
        write_head: impl FnOnce(&mut Vec<u8>),
        fields: Fields,
    ) -> Result<Result<Head, ExchangeError>, TimedOut> {
        let mut head = std::mem::take(&mut self.scratch);
        head.clear();
        write_head(&mut head);
        let mut timer = match self.timer.take() {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let answer = tokio::select! {
            biased;
            r = self.exchange(&head, method, fields) => Ok(r),
            () = timer.as_mut() => Err(TimedOut),
        };
        self.timer = Some(timer);
        // Kept for the next request, unless a huge head made it large.
        if head.capacity() <= 16 * 1024 {
            self.scratch = head;
        }
        answer
    }

    /// Whether it may still be usable: not closed by the backend while idle (no unread bytes,
    /// no EOF pending). Checked without blocking.
    pub fn looks_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        match &mut self.io {
            MaybeTlsStream::Plain(tcp) => match tcp.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                // EOF, an unsolicited byte, or an error: unusable.
                _ => false,
            },
            // rustls reads what arrived (session tickets are consumed, a close_notify or EOF
            // ends the stream); only "nothing to read" means open. The no-op waker is replaced
            // by the request's own at its first real read.
            MaybeTlsStream::Tls(tls) => {
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(Waker::noop());
                Pin::new(tls.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }

    /// Writes `head` (a complete request without a body) and reads the response head, its
    /// fields handed over as `fields` says.
    pub async fn exchange(
        &mut self,
        head: &[u8],
        method: &Method,
        fields: Fields,
    ) -> Result<Head, ExchangeError> {
        // TLS buffers what it could not write yet: flush (a no-op on plain TCP).
        let written = match self.io.write_all(head).await {
            Ok(()) => self.io.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            return Err(if self.reused {
                ExchangeError::Stale
            } else {
                e.into()
            });
        }
        loop {
            let head = self.read_head(method, fields).await?;
            if head.status.is_informational() {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(ExchangeError::Malformed(
                        "101 to a request that asked for no upgrade".into(),
                    ));
                }
                continue; // 100, 102, 103: the final answer follows.
            }
            return Ok(head);
        }
    }

    async fn read_head(&mut self, method: &Method, fields: Fields) -> Result<Head, ExchangeError> {
        let mut first = true;
        loop {
            if !self.buf.is_empty()
                && let Some(head) = parse_head(&mut self.buf, method, fields)?
            {
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(ExchangeError::Malformed(format!(
                    "response head larger than {MAX_HEAD} bytes"
                )));
            }
            self.buf.reserve(READ);
            let n = match tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.buf).await {
                Ok(n) => n,
                Err(e) if first && self.reused && self.buf.is_empty() => {
                    tracing::trace!(error = %e, "pooled connection reset");
                    return Err(ExchangeError::Stale);
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(if first && self.reused && self.buf.is_empty() {
                    ExchangeError::Stale
                } else {
                    ExchangeError::Io(io::ErrorKind::UnexpectedEof.into())
                });
            }
            first = false;
        }
    }
}

/// Parses a complete head at the start of `buf` (consuming it), or `None` if more is needed.
fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    fields: Fields,
) -> Result<Option<Head>, ExchangeError> {
    // Uninitialised slots: httparse writes the ones it fills (zeroing all of them cost more
    // than the parse on a small head).
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ExchangeError::Malformed(e.to_string())),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::Malformed(format!("status {code}")))?;
    let http11 = resp.version == Some(1);
    if fields == Fields::Lines {
        let head = lines_head(resp.headers, status, http11, method)?;
        buf.advance(len);
        return Ok(Some(head));
    }
    // The fields' places in the head: their values become slices of it, not copies.
    let base = buf.as_ptr() as usize;
    let places: Vec<[usize; 4]> = resp
        .headers
        .iter()
        .map(|h| {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            [name, name + h.name.len(), value, value + h.value.len()]
        })
        .collect();
    let count = places.len();
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut facts = Facts::new(http11);
    for &[n0, n1, v0, v1] in &places {
        let name = HeaderName::from_bytes(&head[n0..n1]).map_err(|_| {
            ExchangeError::Malformed(format!(
                "header name {:?}",
                String::from_utf8_lossy(&head[n0..n1])
            ))
        })?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| ExchangeError::Malformed(format!("value of {name}")))?;
        facts.see(&head[n0..n1], &head[v0..v1])?;
        headers.append(name, value);
    }
    let framing = facts.framing(method, status);
    if facts.coded {
        // A message with both is delimited by the coding; the length must not travel on.
        headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Some(Head {
        status,
        headers,
        lines: None,
        keep_alive: !facts.close && framing != Framing::UntilClose,
        framing,
    }))
}

/// What a response head's fields say about its framing and its connection.
struct Facts<'h> {
    http11: bool,
    /// The connection closes after this response.
    close: bool,
    /// A Transfer-Encoding is present.
    coded: bool,
    /// Its final coding is chunked.
    chunked: bool,
    /// The Content-Length.
    length: Option<u64>,
    /// Whether a Date field is present.
    has_date: bool,
    /// Field names a Connection field lists besides close and keep-alive (rare).
    named: Vec<&'h [u8]>,
}

impl<'h> Facts<'h> {
    fn new(http11: bool) -> Facts<'h> {
        Facts {
            http11,
            // HTTP/1.0 closes unless asked to keep the connection.
            close: !http11,
            coded: false,
            chunked: false,
            length: None,
            has_date: false,
            named: Vec::new(),
        }
    }

    /// Takes in one field.
    fn see(&mut self, name: &[u8], value: &'h [u8]) -> Result<(), ExchangeError> {
        if name.eq_ignore_ascii_case(b"connection") {
            for t in value.split(|b| *b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    if !self.http11 {
                        self.close = false;
                    }
                } else if !t.is_empty() {
                    self.named.push(t);
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.coded = true;
            // Only the final coding decides; chunked anywhere else is an error we treat as
            // "until close", as RFC 9112 §6.3 tells a client to.
            self.chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n: u64 = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| ExchangeError::Malformed("invalid Content-Length".into()))?;
            if self.length.is_some_and(|l| l != n) {
                return Err(ExchangeError::Malformed(
                    "conflicting Content-Length values".into(),
                ));
            }
            self.length = Some(n);
        } else if name.eq_ignore_ascii_case(b"date") {
            self.has_date = true;
        }
        Ok(())
    }

    /// How the body is delimited.
    fn framing(&self, method: &Method, status: StatusCode) -> Framing {
        framing_of(method, status, self.coded, self.chunked, self.length)
    }
}

/// How a response body is delimited (RFC 9112 §6.3).
fn framing_of(
    method: &Method,
    status: StatusCode,
    coded: bool,
    chunked: bool,
    length: Option<u64>,
) -> Framing {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if coded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    }
}

/// Fields every hop removes (RFC 9110 §7.6.1, and the two older names in use), besides those a
/// `Connection` field names; `te` goes unless it is `te: trailers`.
const HOP_BY_HOP: [&[u8]; 8] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"transfer-encoding",
    b"upgrade",
    b"te",
];

/// Whether a field is one every hop removes (`te: trailers` stays).
pub fn hop_by_hop(name: &[u8], value: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        && !(name.eq_ignore_ascii_case(b"te") && value == b"trailers")
}

/// The head whose fields httparse checked and found as `fields`, with its fields as
/// [`Lines`]. Framing and connection handling are decided as for a [`HeaderMap`].
fn lines_head(
    fields: &[httparse::Header<'_>],
    status: StatusCode,
    http11: bool,
    method: &Method,
) -> Result<Head, ExchangeError> {
    let mut facts = Facts::new(http11);
    for h in fields {
        facts.see(h.name.as_bytes(), h.value)?;
    }
    let framing = facts.framing(method, status);
    // A HEAD's or a 304's length describes the body a GET would get: it goes on as is (unless
    // a coding delimits the message). Otherwise the client's hop writes its own framing.
    let keep_length =
        !facts.coded && (*method == Method::HEAD || status == StatusCode::NOT_MODIFIED);
    let size: usize = fields
        .iter()
        .map(|h| h.name.len() + h.value.len() + 4)
        .sum();
    let mut block = Vec::with_capacity(size);
    for h in fields {
        let (name, value) = (h.name.as_bytes(), h.value);
        if hop_by_hop(name, value)
            || (name.eq_ignore_ascii_case(b"content-length") && !keep_length)
            || facts.named.iter().any(|n| name.eq_ignore_ascii_case(n))
        {
            continue;
        }
        block.extend_from_slice(name);
        block.extend_from_slice(b": ");
        block.extend_from_slice(value);
        block.extend_from_slice(b"\r\n");
    }
    Ok(Head {
        status,
        headers: HeaderMap::new(),
        lines: Some(Lines {
            block,
            has_date: facts.has_date,
        }),
        keep_alive: !facts.close && framing != Framing::UntilClose,
        framing,
    })
}

/// Appends a request head without a body: `method pq HTTP/1.1`, the headers, a blank line.
pub fn encode_head(method: &Method, path_and_query: &str, headers: &HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Where a connection goes when its body was read to the end.
pub trait Recycle: Send + Sync + 'static {
    /// Keeps `conn` for the next request.
    fn recycle(&self, conn: RawConn);
}

/// Position in a chunked body.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields up to a blank line.
    Trailers,
}

/// A response body read from a [`RawConn`] as the client takes it.
pub struct RawBody {
    conn: Option<RawConn>,
    framing: Framing,
    /// Bytes left for `Length`.
    left: u64,
    chunk: Chunk,
    keep_alive: bool,
    recycle: Option<Arc<dyn Recycle>>,
    done: bool,
}

impl std::fmt::Debug for RawBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBody")
            .field("framing", &self.framing)
            .field("left", &self.left)
            .field("done", &self.done)
            .finish()
    }
}

impl RawBody {
    /// The body announced by `head`, on `conn`; `recycle` takes the connection back after a
    /// complete body when it may be reused.
    pub fn new(mut conn: RawConn, head: &Head, recycle: Arc<dyn Recycle>) -> RawBody {
        conn.reused = true;
        let left = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut body = RawBody {
            conn: Some(conn),
            framing: head.framing,
            left,
            chunk: Chunk::Size,
            keep_alive: head.keep_alive,
            recycle: Some(recycle),
            done: false,
        };
        if head.framing == Framing::Empty {
            body.finish();
        }
        body
    }

    /// Whether the whole body has been delivered.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The exact remaining size, when known.
    pub fn exact_len(&self) -> Option<u64> {
        match self.framing {
            Framing::Empty => Some(0),
            Framing::Length(_) => Some(self.left),
            _ => None,
        }
    }

    /// The body ended cleanly: hand the connection back if it may serve again.
    fn finish(&mut self) {
        self.done = true;
        if let (Some(conn), Some(recycle)) = (self.conn.take(), self.recycle.take())
            && self.keep_alive
            && conn.buf.is_empty()
        {
            recycle.recycle(conn);
        }
    }

    /// Reads more into the connection's buffer; `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let conn = self.conn.as_mut().expect("body not finished");
        conn.buf.reserve(READ);
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)
    }

    fn buf(&mut self) -> &mut BytesMut {
        &mut self.conn.as_mut().expect("body not finished").buf
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.framing {
            Framing::Empty => {
                self.finish();
                Poll::Ready(None)
            }
            Framing::Length(_) => {
                if self.buf().is_empty() {
                    let n = ready!(self.poll_fill(cx))?;
                    if n == 0 {
                        return Poll::Ready(Some(Err(eof("body ended early"))));
                    }
                }
                let take = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(self.buf().len());
                let data = self.buf().split_to(take).freeze();
                self.left -= take as u64;
                if self.left == 0 {
                    self.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Framing::UntilClose => {
                if self.buf().is_empty() {
                    let n = ready!(self.poll_fill(cx))?;
                    if n == 0 {
                        self.finish();
                        return Poll::Ready(None);
                    }
                }
                let data = self.buf().split().freeze();
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Framing::Chunked => self.poll_chunked(cx),
        }
    }

    fn poll_chunked(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            match self.chunk {
                Chunk::Size => match find_crlf(self.buf()) {
                    Some(end) => {
                        let line = self.buf().split_to(end + 2);
                        let size = parse_chunk_size(&line[..end])?;
                        self.chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    None if self.buf().len() > MAX_CHUNK_LINE => {
                        return Poll::Ready(Some(Err(bad("chunk-size line too long"))));
                    }
                    None => {
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(eof("chunked body ended early"))));
                        }
                    }
                },
                Chunk::Data(left) => {
                    if self.buf().is_empty() && ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(eof("chunked body ended early"))));
                    }
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(self.buf().len());
                    let data = self.buf().split_to(take).freeze();
                    let left = left - take as u64;
                    self.chunk = if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Chunk::DataEnd => {
                    if self.buf().len() < 2 {
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(eof("chunked body ended early"))));
                        }
                        continue;
                    }
                    if &self.buf()[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(bad("chunk data not followed by CRLF"))));
                    }
                    self.buf().advance(2);
                    self.chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    // The trailer section ends with an empty line; parse it whole.
                    let end = if self.buf().starts_with(b"\r\n") {
                        Some(0)
                    } else {
                        self.buf()
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .map(|p| p + 2)
                    };
                    let Some(end) = end else {
                        if self.buf().len() > MAX_HEAD {
                            return Poll::Ready(Some(Err(bad("trailer section too large"))));
                        }
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(eof("trailers ended early"))));
                        }
                        continue;
                    };
                    let section = self.buf().split_to(end + 2);
                    let trailers = parse_trailers(&section[..end])?;
                    self.finish();
                    return Poll::Ready(if trailers.is_empty() {
                        None
                    } else {
                        Some(Ok(Frame::trailers(trailers)))
                    });
                }
            }
        }
    }
}

impl http_body::Body for RawBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let polled = this.poll_next(cx);
        if let Poll::Ready(Some(Err(_))) = polled {
            // A broken body never returns its connection.
            this.done = true;
            this.conn = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.exact_len() {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.split(|b| *b == b';').next().unwrap_or(&[]);
    let digits = std::str::from_utf8(digits)
        .map_err(|_| bad("chunk size is not ASCII"))?
        .trim();
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad("invalid chunk size"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| bad("invalid chunk size"))
}

fn parse_trailers(section: &[u8]) -> io::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for line in section.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| bad("trailer field without a colon"))?;
        let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| bad("trailer name"))?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
            .map_err(|_| bad("trailer value"))?;
        map.append(name, value);
    }
    Ok(map)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use parking_lot::Mutex;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    #[derive(Default)]
    struct Pool(Mutex<Vec<RawConn>>);
    impl Recycle for Pool {
        fn recycle(&self, conn: RawConn) {
            self.0.lock().push(conn);
        }
    }

    /// A backend that reads one request head per answer in `answers` and writes the answer.
    async fn backend(answers: Vec<&'static [u8]>, close_after: bool) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = l.local_addr().expect("the listener's address");
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut got = Vec::new();
            for a in answers {
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut b = [0u8; 1024];
                    let n = s.read(&mut b).await.expect("read the request");
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&b[..n]);
                }
                let end = got
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("a whole request head")
                    + 4;
                got.drain(..end);
                s.write_all(a).await.expect("write the answer");
            }
            if !close_after {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
        addr
    }

    /// A plain connection to the test backend at `addr`.
    async fn connect(addr: std::net::SocketAddr) -> RawConn {
        RawConn::new(MaybeTlsStream::Plain(
            TcpStream::connect(addr)
                .await
                .expect("connect to the test backend"),
        ))
    }

    /// `GET /` with no fields.
    fn bare_get() -> Vec<u8> {
        let mut req = Vec::new();
        encode_head(&Method::GET, "/", &HeaderMap::new(), &mut req);
        req
    }

    async fn get(
        conn: RawConn,
        method: Method,
        pool: &Arc<Pool>,
        fields: Fields,
    ) -> (Head, Bytes, Option<HeaderMap>) {
        let mut conn = conn;
        let mut req = Vec::new();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("b"));
        encode_head(&method, "/x?y=1", &h, &mut req);
        let head = conn.exchange(&req, &method, fields).await.expect("head");
        let body = RawBody::new(conn, &head, pool.clone());
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (head, collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn length_chunked_and_empty_bodies_are_read_and_the_connection_reused() {
        for fields in [Fields::Map, Fields::Lines] {
            length_chunked_and_empty_bodies(fields).await;
        }
    }

    async fn length_chunked_and_empty_bodies(fields: Fields) {
        let addr = backend(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\ngrpc-status: 0\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            ],
            false,
        )
        .await;
        let pool = Arc::new(Pool::default());
        let conn = connect(addr).await;
        let (head, body, _) = get(conn, Method::GET, &pool, fields).await;
        assert_eq!((head.status, &body[..]), (StatusCode::OK, &b"hello"[..]));
        let conn = pool.0.lock().pop().expect("reused after a length body");
        let (head, body, trailers) = get(conn, Method::GET, &pool, fields).await;
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(&body[..], b"abcde");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        let conn = pool.0.lock().pop().expect("reused after a chunked body");
        let (head, body, _) = get(conn, Method::GET, &pool, fields).await;
        assert_eq!((head.status, body.len()), (StatusCode::NO_CONTENT, 0));
        let conn = pool.0.lock().pop().expect("reused after no body");
        // HEAD: Content-Length describes the GET's body, none follows.
        let (head, body, _) = get(conn, Method::HEAD, &pool, fields).await;
        assert_eq!((head.framing, body.len()), (Framing::Empty, 0));
        assert!(pool.0.lock().pop().is_some());
    }

    #[tokio::test]
    async fn the_per_try_deadline_is_kept_whether_moved_earlier_or_later_or_after_firing_idle() {
        use std::time::Duration;
        use tokio::time::Instant;
        let addr = backend(
            vec![
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
            ],
            false,
        )
        .await;
        let mut conn = connect(addr).await;
        let get_root = |out: &mut Vec<u8>| encode_head(&Method::GET, "/", &HeaderMap::new(), out);
        let far = Instant::now() + Duration::from_secs(10);
        let head = conn
            .exchange_within(far, &Method::GET, get_root, Fields::Map)
            .await
            .expect("answered before the deadline")
            .expect("a head");
        assert_eq!(head.status, StatusCode::NO_CONTENT);
        // Earlier than the armed deadline, answered in time.
        let near = Instant::now() + Duration::from_millis(60);
        let head = conn
            .exchange_within(near, &Method::GET, get_root, Fields::Map)
            .await
            .expect("answered before the deadline")
            .expect("a head");
        assert_eq!(head.status, StatusCode::NO_CONTENT);
        // The armed deadline passes while the connection is idle; the next try gets its own.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let started = Instant::now();
        let answer = conn
            .exchange_within(
                started + Duration::from_millis(150),
                &Method::GET,
                get_root,
                Fields::Map,
            )
            .await;
        let waited = started.elapsed();
        assert_eq!(
            answer.err(),
            Some(TimedOut),
            "the backend never answers the third"
        );
        assert!(
            waited >= Duration::from_millis(150) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_body_until_close_is_read_and_the_connection_not_kept() {
        for fields in [Fields::Map, Fields::Lines] {
            let addr = backend(vec![b"HTTP/1.1 200 OK\r\n\r\nall of it"], true).await;
            let pool = Arc::new(Pool::default());
            let conn = connect(addr).await;
            let (head, body, _) = get(conn, Method::GET, &pool, fields).await;
            assert_eq!(head.framing, Framing::UntilClose);
            assert_eq!(&body[..], b"all of it");
            assert!(pool.0.lock().is_empty());
        }
    }

    #[tokio::test]
    async fn connection_close_and_http10_are_not_kept() {
        for (answer, fields) in [
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"[..],
            &b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"[..],
        ]
        .into_iter()
        .flat_map(|a| [(a, Fields::Map), (a, Fields::Lines)])
        {
            let addr = backend(vec![answer], false).await;
            let pool = Arc::new(Pool::default());
            let conn = connect(addr).await;
            let (_, body, _) = get(conn, Method::GET, &pool, fields).await;
            assert_eq!(&body[..], b"ok");
            assert!(pool.0.lock().is_empty());
        }
    }

    #[tokio::test]
    async fn malformed_answers_are_errors_not_panics() {
        for (answer, fields) in [
            &b"HTTP/1.1 2OO OK\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
            &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
        ]
        .into_iter()
        .flat_map(|a| [(a, Fields::Map), (a, Fields::Lines)])
        {
            let addr = backend(vec![answer], false).await;
            let mut conn = connect(addr).await;
            let req = bare_get();
            let e = conn
                .exchange(&req, &Method::GET, fields)
                .await
                .expect_err("a malformed answer is an error");
            assert!(matches!(e, ExchangeError::Malformed(_)), "{e}");
        }
        let addr = backend(
            vec![&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..]],
            true,
        )
        .await;
        let mut conn = connect(addr).await;
        let req = bare_get();
        let head = conn
            .exchange(&req, &Method::GET, Fields::Map)
            .await
            .expect("the head is well-formed");
        let pool = Arc::new(Pool::default());
        let err = RawBody::new(conn, &head, pool.clone()).collect().await;
        assert!(err.is_err());
        assert!(
            pool.0.lock().is_empty(),
            "a broken body's connection is dropped"
        );
    }

    #[tokio::test]
    async fn a_reused_connection_closed_before_answering_is_stale() {
        // Answers one request, then closes.
        let addr = backend(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], true).await;
        let pool = Arc::new(Pool::default());
        let conn = connect(addr).await;
        let _ = get(conn, Method::GET, &pool, Fields::Map).await;
        let mut conn = pool.0.lock().pop().expect("kept");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!conn.looks_open(), "the close is seen while idle");
        let req = bare_get();
        let e = conn
            .exchange(&req, &Method::GET, Fields::Map)
            .await
            .expect_err("the closed connection fails");
        assert!(matches!(e, ExchangeError::Stale), "{e}");
    }

    #[tokio::test]
    async fn a_tls_connection_is_read_reused_and_seen_closed_after_close_notify() {
        use service_kit::tls::{ClientTlsFiles, ServerTlsFiles, rustls, tokio_rustls};
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = service_kit::devcerts::DevCa::new("test CA").expect("CA");
        let ca_file = ca.write_ca(dir.path()).expect("CA file");
        let (cert, key) = ca
            .write_pair(dir.path(), "backend", "backend", &["127.0.0.1"])
            .expect("pair");
        let server = ServerTlsFiles {
            cert_file: Some(cert),
            key_file: Some(key),
            ..Default::default()
        }
        .server_config()
        .expect("server config")
        .expect("TLS on");
        let client = ClientTlsFiles {
            ca_file: Some(ca_file),
            ..Default::default()
        }
        .client_config()
        .expect("client config")
        .expect("TLS on");
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let mut s = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .expect("handshake");
            for _ in 0..2 {
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut b = [0u8; 1024];
                    let n = s.read(&mut b).await.expect("read");
                    assert!(n > 0, "the client closed");
                    got.extend_from_slice(&b[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .expect("write");
            }
            let _ = close_rx.await;
            // close_notify, then FIN.
            let _ = s.shutdown().await;
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .expect("handshake");
        let pool = Arc::new(Pool::default());
        let (head, body, _) = get(
            RawConn::new(MaybeTlsStream::Tls(Box::new(tls))),
            Method::GET,
            &pool,
            Fields::Lines,
        )
        .await;
        assert_eq!((head.status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        let mut conn = pool.0.lock().pop().expect("kept");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(conn.looks_open(), "an idle TLS connection looks open");
        let (_, body, _) = get(conn, Method::GET, &pool, Fields::Lines).await;
        assert_eq!(&body[..], b"ok", "and serves the next request");
        let mut conn = pool.0.lock().pop().expect("kept again");
        close_tx.send(()).expect("server waiting");
        let closed = async {
            while conn.looks_open() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), closed)
            .await
            .expect("the close_notify is seen while idle");
    }

    #[test]
    fn request_heads_are_encoded_in_order() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        encode_head(&Method::DELETE, "/p?q", &h, &mut out);
        assert_eq!(
            out,
            b"DELETE /p?q HTTP/1.1\r\nhost: api\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
    }

    fn lines_of(raw: &[u8], method: &Method) -> Head {
        let mut buf = BytesMut::from(raw);
        let head = parse_head(&mut buf, method, Fields::Lines)
            .expect("parses")
            .expect("complete");
        assert!(buf.is_empty(), "the head is consumed");
        head
    }

    #[test]
    fn lines_keep_end_to_end_fields_in_order_and_spelling_and_drop_hop_by_hop_and_framing() {
        let head = lines_of(
            b"HTTP/1.1 200 OK\r\nServer: b\r\nConnection: keep-alive, X-Hop\r\n\
              Keep-Alive: timeout=5\r\nX-Hop: 1\r\nx-hop: 2\r\nContent-Length: 5\r\n\
              Proxy-Connection: x\r\nUpgrade: y\r\nTE: gzip\r\nSet-Cookie: a=1\r\n\
              Set-Cookie: b=2\r\nProxy-Authenticate: Basic\r\n\r\n",
            &Method::GET,
        );
        let lines = head.lines.expect("lines");
        assert_eq!(
            String::from_utf8_lossy(&lines.block),
            "Server: b\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        );
        assert!(!lines.has_date);
        assert!(head.headers.is_empty());
        assert_eq!((head.framing, head.keep_alive), (Framing::Length(5), true));

        // te: trailers stays, as with a header map; Date is noticed.
        let head = lines_of(
            b"HTTP/1.1 200 OK\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\nte: trailers\r\n\
              Transfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n",
            &Method::GET,
        );
        let lines = head.lines.expect("lines");
        assert_eq!(
            String::from_utf8_lossy(&lines.block),
            "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nte: trailers\r\n"
        );
        assert!(lines.has_date);
        assert_eq!(head.framing, Framing::Chunked);
    }

    #[test]
    fn lines_keep_the_length_of_a_head_and_a_304_only() {
        for (raw, method, kept) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"[..],
                Method::HEAD,
                true,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
                Method::GET,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
                Method::GET,
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n",
                Method::HEAD,
                false,
            ),
        ] {
            let head = lines_of(raw, &method);
            let block = head.lines.expect("lines").block;
            assert_eq!(
                block == b"Content-Length: 7\r\n",
                kept,
                "{method} {}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn lines_and_a_header_map_agree_on_framing_and_keep_alive() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ] {
            for method in [Method::GET, Method::HEAD] {
                let lines = lines_of(raw, &method);
                let mut buf = BytesMut::from(raw);
                let map = parse_head(&mut buf, &method, Fields::Map)
                    .expect("parses")
                    .expect("complete");
                assert_eq!(
                    (lines.status, lines.framing, lines.keep_alive),
                    (map.status, map.framing, map.keep_alive),
                    "{method} {}",
                    String::from_utf8_lossy(raw)
                );
            }
        }
    }
}
