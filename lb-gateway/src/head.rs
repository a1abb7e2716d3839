//! A request's head as the proxy reads it: hyper's [`http::request::Parts`], or the bytes the
//! listener's fast path read ([`RawHead`]).
//!
//! Why: making an `http::HeaderMap` of every request (a name lookup and a hash per field, a
//! shared reference per value, the map's allocations), looking fields up in it and writing it
//! out again was about a fifth of the gateway's user-space time per request (BENCHMARKS.md,
//! sessions 12 and 15). A fast-path head was already checked by httparse, whose rules for names
//! and values are `http`'s; a [`RawHead`] keeps its bytes and the places of its (few) fields,
//! answers lookups by a scan, and is written to an HTTP/1.1 backend line by line with the edits
//! `proxy` makes on a map: hop-by-hop fields out, `X-Forwarded-For` extended, a fresh
//! `traceparent`, a `Host` when the client sent none ([`RawHead::encode`]). A backend the
//! gateway's own client does not serve (HTTP/2, `--http1-client hyper`) gets it as `Parts`,
//! edited as any other ([`ReqHead::into_parts`]).

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Uri, Version};
use lb_core::routes::KeySource;

use crate::h1;
use crate::proxy::{Client, forwarded_for, strip_hop_by_hop};
use crate::trace::TRACEPARENT;

/// A request head as the fast path read it: an origin-form target, no body, no upgrade.
#[derive(Debug, Clone)]
pub struct RawHead {
    /// The head's bytes, blank line included.
    bytes: Bytes,
    method: Method,
    /// The target (shares `bytes`).
    pq: PathAndQuery,
    /// Name and value ranges of each field in `bytes`.
    fields: Vec<[usize; 4]>,
    http10: bool,
}

impl RawHead {
    /// The head in `bytes` with its method, origin-form target and fields at these ranges, as
    /// httparse found them; the bytes back if `http` refuses the method or the target.
    pub fn new(
        bytes: Bytes,
        method: (usize, usize),
        target: (usize, usize),
        fields: Vec<[usize; 4]>,
        http10: bool,
    ) -> Result<RawHead, Bytes> {
        let Ok(method) = Method::from_bytes(&bytes[method.0..method.1]) else {
            return Err(bytes);
        };
        let pq = match PathAndQuery::from_maybe_shared(bytes.slice(target.0..target.1)) {
            Ok(pq) if pq.as_str().starts_with('/') => pq,
            _ => return Err(bytes),
        };
        Ok(RawHead {
            bytes,
            method,
            pq,
            fields,
            http10,
        })
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The target, in origin form.
    pub fn path_and_query(&self) -> &PathAndQuery {
        &self.pq
    }

    /// Whether the request is HTTP/1.0.
    pub fn http10(&self) -> bool {
        self.http10
    }

    /// Each field's name and value, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|f| (&self.bytes[f[0]..f[1]], &self.bytes[f[2]..f[3]]))
    }

    /// The values of the fields named `name`, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first `Some` that `f` gives for the values of the fields named `name`, in order.
    fn find_value<'a, T>(
        &'a self,
        name: &str,
        mut f: impl FnMut(&'a [u8]) -> Option<T>,
    ) -> Option<T> {
        self.fields()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .find_map(|(_, v)| f(v))
    }

    /// Whether the client lets the connection serve another request after this one: HTTP/1.1
    /// unless it says `close`, HTTP/1.0 only when it says `keep-alive`.
    pub fn keep_alive(&self) -> bool {
        keep_alive(self.http10, self.values("connection"))
    }

    /// The head as `http` types (values share the head's bytes), unedited; `None` only for a
    /// field `http` refuses, which httparse lets through (none are known).
    fn to_parts(&self) -> Option<http::request::Parts> {
        let uri = Uri::from(self.pq.clone());
        parts_of(
            &self.bytes,
            &self.fields,
            self.method.clone(),
            uri,
            self.http10,
        )
    }

    /// Appends the head as it goes to an HTTP/1.1 backend: `method target HTTP/1.1`, then the
    /// client's fields in order without the hop-by-hop ones (RFC 9110 §7.6.1, and those its
    /// `Connection` fields name) and without its `traceparent`, with `X-Forwarded-For` as one
    /// field (the client's values joined, then `client`), `traceparent: <traceparent>` in place
    /// of the client's, and `Host: <host>` at the end when the client sent none.
    pub fn encode(
        &self,
        target: &str,
        client: &Client,
        traceparent: &[u8],
        host: &str,
        out: &mut Vec<u8>,
    ) {
        // Names a Connection field lists (rare): found first, so that they go wherever they are.
        let mut named: Vec<&[u8]> = Vec::new();
        for v in self.values("connection") {
            named.extend(
                v.split(|b| *b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|t| !t.is_empty()),
            );
        }
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let (mut xff, mut trace, mut has_host) = (false, false, false);
        for (name, value) in self.fields() {
            if h1::hop_by_hop(name, value) || named.iter().any(|n| name.eq_ignore_ascii_case(n)) {
                continue;
            }
            if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                if !xff {
                    xff = true;
                    out.extend_from_slice(b"x-forwarded-for: ");
                    for v in self.values("x-forwarded-for") {
                        out.extend_from_slice(v);
                        out.extend_from_slice(b", ");
                    }
                    out.extend_from_slice(client.ip_value.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                continue;
            }
            if name.eq_ignore_ascii_case(TRACEPARENT.as_bytes()) {
                if !trace {
                    trace = true;
                    line(out, b"traceparent", traceparent);
                }
                continue;
            }
            has_host |= name.eq_ignore_ascii_case(b"host");
            line(out, name, value);
        }
        if !xff {
            line(out, b"x-forwarded-for", client.ip_value.as_bytes());
        }
        if !trace {
            line(out, b"traceparent", traceparent);
        }
        if !has_host {
            line(out, b"host", host.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Whether a client lets the connection serve another request, given the values of its
/// `Connection` fields: HTTP/1.1 unless one says `close`, HTTP/1.0 only when one says
/// `keep-alive`.
pub fn keep_alive<'a>(http10: bool, connection: impl Iterator<Item = &'a [u8]>) -> bool {
    let mut close = http10;
    for v in connection {
        for t in v.split(|b| *b == b',') {
            let t = t.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") && http10 {
                close = false;
            }
        }
    }
    !close
}

/// A parsed head (`bytes`, its fields at these ranges) as `http` types whose values share
/// `bytes`; `None` for a field `http` refuses.
pub fn parts_of(
    bytes: &Bytes,
    fields: &[[usize; 4]],
    method: Method,
    uri: Uri,
    http10: bool,
) -> Option<http::request::Parts> {
    // Room for the fields the proxy adds (`X-Forwarded-For`, `traceparent`, `Host`): growing
    // the map on those inserts rehashed it for every request.
    let mut headers = HeaderMap::with_capacity(fields.len() + 3);
    for f in fields {
        let name = HeaderName::from_bytes(&bytes[f[0]..f[1]]).ok()?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(f[2]..f[3])).ok()?;
        headers.append(name, value);
    }
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    parts.headers = headers;
    Some(parts)
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A request's head: from hyper (or the fast path, for a head it does not keep as bytes), or
/// as the fast path read it.
///
/// `Parts` is boxed: this value moves through the proxy's state (a 224-byte `Parts` inline
/// made every copy of that state larger).
#[derive(Debug)]
pub enum ReqHead {
    Parts(Box<http::request::Parts>),
    Raw(RawHead),
}

impl ReqHead {
    /// The method.
    pub fn method(&self) -> &Method {
        match self {
            ReqHead::Parts(p) => &p.method,
            ReqHead::Raw(r) => &r.method,
        }
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        match self {
            ReqHead::Parts(p) => p.uri.path(),
            ReqHead::Raw(r) => r.pq.path(),
        }
    }

    /// The query, if any.
    pub fn query(&self) -> Option<&str> {
        match self {
            ReqHead::Parts(p) => p.uri.query(),
            ReqHead::Raw(r) => r.pq.query(),
        }
    }

    /// The authority of an absolute-form target (a raw head's target is origin form).
    pub fn target_authority(&self) -> Option<&str> {
        match self {
            ReqHead::Parts(p) => p.uri.authority().map(|a| a.as_str()),
            ReqHead::Raw(_) => None,
        }
    }

    /// The value of the first field named `name`.
    pub fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        match self {
            ReqHead::Parts(p) => p.headers.get(name).map(HeaderValue::as_bytes),
            ReqHead::Raw(r) => r.find_value(name.as_str(), Some),
        }
    }

    /// The head as `Parts` edited for a hop to a backend (hop-by-hop fields out, this client
    /// appended to `X-Forwarded-For`, `traceparent` set), for a raw head; a `Parts` head, edited
    /// when it arrived, as it is. `None` for a raw head `http` refuses.
    pub fn into_parts(
        self,
        client: &Client,
        traceparent: &[u8],
    ) -> Option<Box<http::request::Parts>> {
        match self {
            ReqHead::Parts(p) => Some(p),
            ReqHead::Raw(r) => {
                let mut p = r.to_parts()?;
                edit(&mut p.headers, false, client, traceparent);
                Some(Box::new(p))
            }
        }
    }
}

/// The edits every request's fields get on their way to a backend: hop-by-hop fields out (the
/// upgrade pair kept when tunnelling), `client` appended to `X-Forwarded-For`, `traceparent`
/// set to the gateway's span (its header bytes).
pub fn edit(headers: &mut HeaderMap, tunnel: bool, client: &Client, traceparent: &[u8]) {
    strip_hop_by_hop(headers, tunnel);
    forwarded_for(headers, client);
    if let Ok(v) = HeaderValue::from_bytes(traceparent) {
        headers.insert(TRACEPARENT, v);
    }
}

impl KeySource for ReqHead {
    fn path_and_query(&self) -> &str {
        match self {
            ReqHead::Parts(p) => p.as_ref().path_and_query(),
            ReqHead::Raw(r) => r.pq.as_str(),
        }
    }

    fn find_field<'a, T>(
        &'a self,
        name: &HeaderName,
        f: impl FnMut(&'a [u8]) -> Option<T>,
    ) -> Option<T> {
        match self {
            ReqHead::Parts(p) => p.as_ref().find_field(name, f),
            ReqHead::Raw(r) => r.find_value(name.as_str(), f),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::header;

    use super::*;

    fn raw(text: &str) -> RawHead {
        let bytes = Bytes::copy_from_slice(text.as_bytes());
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(&bytes).expect("parse").is_complete());
        let at = |s: &[u8]| {
            let start = s.as_ptr() as usize - bytes.as_ptr() as usize;
            (start, start + s.len())
        };
        let method = at(req.method.expect("method").as_bytes());
        let target = at(req.path.expect("path").as_bytes());
        let fields = req
            .headers
            .iter()
            .map(|h| {
                let (n, v) = (at(h.name.as_bytes()), at(h.value));
                [n.0, n.1, v.0, v.1]
            })
            .collect();
        let http10 = req.version == Some(0);
        RawHead::new(bytes, method, target, fields, http10).expect("raw head")
    }

    fn client() -> Client {
        Client::new("10.0.0.9:5555".parse().expect("addr"))
    }

    const TP: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn encoded(head: &RawHead, host: &str) -> String {
        let mut out = Vec::new();
        head.encode(
            head.path_and_query().as_str(),
            &client(),
            TP,
            host,
            &mut out,
        );
        String::from_utf8(out).expect("utf-8")
    }

    /// The fields the map path sends for the same head: `to_parts`, the edits, encoded.
    fn via_map(head: &RawHead, host: &str) -> String {
        let mut p = ReqHead::Raw(head.clone())
            .into_parts(&client(), TP)
            .expect("parts");
        if !p.headers.contains_key(header::HOST) {
            p.headers
                .insert(header::HOST, HeaderValue::from_str(host).expect("host"));
        }
        let mut out = Vec::new();
        h1::encode_head(
            &p.method,
            head.path_and_query().as_str(),
            &p.headers,
            &mut out,
        );
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_plain_head_gets_forwarded_for_and_traceparent_and_keeps_its_fields_in_order() {
        let h = raw("GET /a?b=1 HTTP/1.1\r\nHost: api\r\nAccept: */*\r\n\r\n");
        assert_eq!(
            encoded(&h, "backend:80"),
            "GET /a?b=1 HTTP/1.1\r\nHost: api\r\nAccept: */*\r\nx-forwarded-for: 10.0.0.9\r\n\
             traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
        );
        assert!(h.keep_alive());
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_go_and_the_clients_trace_and_forwarding_are_replaced()
    {
        let h = raw(
            "GET / HTTP/1.1\r\nHost: api\r\nConnection: keep-alive, X-Secret\r\n\
             Keep-Alive: timeout=5\r\nX-Secret: 1\r\nTE: gzip\r\nProxy-Authorization: x\r\n\
             X-Forwarded-For: 1.1.1.1\r\ntraceparent: 00-11111111111111111111111111111111-2222222222222222-01\r\n\
             X-Forwarded-For: 2.2.2.2\r\nX-Kept: yes\r\n\r\n",
        );
        assert_eq!(
            encoded(&h, "b"),
            "GET / HTTP/1.1\r\nHost: api\r\nx-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.9\r\n\
             traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
             X-Kept: yes\r\n\r\n"
        );
    }

    #[test]
    fn te_trailers_stays_and_a_head_without_host_gets_the_backends() {
        let h = raw("GET /x HTTP/1.0\r\nTE: trailers\r\n\r\n");
        assert_eq!(
            encoded(&h, "10.0.0.1:8080"),
            "GET /x HTTP/1.1\r\nTE: trailers\r\nx-forwarded-for: 10.0.0.9\r\n\
             traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
             host: 10.0.0.1:8080\r\n\r\n"
        );
        assert!(!h.keep_alive(), "HTTP/1.0 closes unless asked");
        assert!(raw("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive());
        assert!(!raw("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
    }

    #[test]
    fn the_raw_encoding_sends_the_same_fields_as_the_map_path() {
        for text in [
            "GET /a?b=1 HTTP/1.1\r\nHost: api\r\nAccept: */*\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: close, x-a\r\nx-a: 1\r\nx-b: 2\r\nUpgrade-Insecure-Requests: 1\r\n\r\n",
            "DELETE /d HTTP/1.1\r\nhost: h\r\nX-Forwarded-For: 1.2.3.4\r\nTE: trailers\r\nproxy-connection: x\r\n\r\n",
            "GET /n HTTP/1.0\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
        ] {
            let h = raw(text);
            let mut ours: Vec<String> = encoded(&h, "b:1")
                .lines()
                .map(str::to_ascii_lowercase)
                .collect();
            let mut map: Vec<String> = via_map(&h, "b:1")
                .lines()
                .map(str::to_ascii_lowercase)
                .collect();
            ours.sort();
            map.sort();
            assert_eq!(ours, map, "{text:?}");
        }
    }

    #[test]
    fn lookups_and_hash_keys_read_the_bytes_as_the_map_does() {
        let text = "GET /p/q?user=7 HTTP/1.1\r\nHost: api:8080\r\nX-User: alice\r\nCookie: a=1\r\nCookie: sid=s9; z=2\r\n\r\n";
        let r = ReqHead::Raw(raw(text));
        let p = ReqHead::Parts(Box::new(raw(text).to_parts().expect("parts")));
        let ip = "10.1.2.3".parse().expect("ip");
        for spec in [
            "path",
            "uri",
            "header:x-user",
            "cookie:sid",
            "query:user",
            "header:nope",
        ] {
            let on = lb_core::routes::HashOn::parse(spec).expect("spec");
            assert_eq!(on.key_hash(&r, ip), on.key_hash(&p, ip), "{spec}");
        }
        assert_eq!(r.header(&header::HOST), Some(&b"api:8080"[..]));
        assert_eq!(r.path(), "/p/q");
        assert_eq!(r.query(), Some("user=7"));
        assert_eq!(r.method(), Method::GET);
        assert!(r.target_authority().is_none());
    }
}
