//! The etcd v3 JSON gateway: etcd's grpc-gateway routes (`POST /v3/kv/range`, `/v3/watch`, …)
//! on the client port, so JSON clients written for etcd work unchanged.
//!
//! # How requests get here
//! etcd serves gRPC and HTTP/1.1 JSON on one port; so do we. The client listener's tonic
//! server accepts HTTP/1.1 as well as HTTP/2, and [`GatewayLayer`] sends every request whose
//! `content-type` starts with `application/grpc` to the gRPC services and everything else to
//! this module's axum router.
//!
//! # What a request does
//! A body is read (at most [`body_limit`] bytes), decoded from the proto3 JSON mapping
//! ([`json`]) into the same prost message a gRPC client would send, and handed *in process* to
//! the same tonic service structs the gRPC server runs ([`crate::rpc`]), with the
//! `Authorization` header as the `token` metadata (as etcd's gateway passes it). Nothing here
//! knows about keys, revisions or permissions. The answer is encoded back as etcd's gateway
//! writes it; a gRPC error becomes the HTTP status grpc-gateway maps its code to, with the body
//! `{"error": "...", "message": "...", "code": N}`.
//!
//! Streams (`/v3/watch`, `/v3/lease/keepalive`) read newline-delimited (or simply
//! concatenated) JSON requests from the request body as they arrive and answer with one
//! `{"result": {...}}` line per response, as grpc-gateway streams. A watch stays open after
//! the request body ends, until the client hangs up (etcd keeps a watch stream open after the
//! client closes its sending side); a keep-alive stream ends after the answers to the requests
//! in the body.

// A refused request's `Err` is the HTTP response to send; it is built once per refusal.
#![allow(clippy::result_large_err)]

pub mod json;

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use axum::routing::post;
use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use proto::etcdserverpb::auth_server::Auth;
use proto::etcdserverpb::cluster_server::Cluster;
use proto::etcdserverpb::kv_server::Kv;
use proto::etcdserverpb::lease_server::Lease;
use proto::etcdserverpb::maintenance_server::Maintenance;
use proto::etcdserverpb::watch_server::Watch;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::{Code, Status};

use crate::rpc::Ctx;
use crate::rpc::auth::AuthService;
use crate::rpc::kv::KvService;
use crate::rpc::lease::LeaseService;
use crate::rpc::maintenance::MaintenanceService;
use crate::rpc::watch::WatchService;

/// Largest JSON body accepted for a request whose protobuf form may be `max_request_bytes`:
/// base64 makes bytes 4/3 longer, and field names and quotes add a little. The decoded
/// request is then held to `--max-request-bytes` exactly, by the same check gRPC requests
/// meet (`etcdserver: request is too large`).
pub fn body_limit(max_request_bytes: usize) -> usize {
    max_request_bytes / 3 * 4 + 64 * 1024
}

/// The services the gateway calls, and its limits.
struct Gateway {
    ctx: Ctx,
    kv: KvService,
    watch: WatchService,
    lease: LeaseService,
    maintenance: MaintenanceService,
    auth: AuthService,
    /// Largest request body (or, on a stream, largest pending request).
    body_limit: usize,
    /// Largest protobuf message decoded from a stream's frames.
    max_message: usize,
}

/// The gateway's routes, calling the services of `ctx` in process.
pub fn router(ctx: Ctx) -> Router {
    let gw = Arc::new(Gateway {
        ctx: ctx.clone(),
        kv: KvService::new(ctx.clone()),
        watch: WatchService::new(ctx.clone()),
        lease: LeaseService::new(ctx.clone()),
        maintenance: MaintenanceService::new(ctx.clone()),
        auth: AuthService::new(ctx.clone()),
        body_limit: body_limit(ctx.limits.max_request_bytes),
        max_message: ctx.limits.max_request_bytes + 512 * 1024,
    });
    Router::new()
        .route("/v3/kv/range", post(kv_range))
        .route("/v3/kv/put", post(kv_put))
        .route("/v3/kv/deleterange", post(kv_delete_range))
        .route("/v3/kv/txn", post(kv_txn))
        .route("/v3/kv/compaction", post(kv_compaction))
        .route("/v3/watch", post(watch))
        .route("/v3/lease/grant", post(lease_grant))
        // etcd binds the lease calls under /v3/kv/lease/ as well.
        .route("/v3/lease/revoke", post(lease_revoke))
        .route("/v3/kv/lease/revoke", post(lease_revoke))
        .route("/v3/lease/keepalive", post(lease_keep_alive))
        .route("/v3/lease/timetolive", post(lease_time_to_live))
        .route("/v3/kv/lease/timetolive", post(lease_time_to_live))
        .route("/v3/lease/leases", post(lease_leases))
        .route("/v3/kv/lease/leases", post(lease_leases))
        .route("/v3/maintenance/status", post(maintenance_status))
        .route("/v3/cluster/member/list", post(member_list))
        .route("/v3/auth/authenticate", post(authenticate))
        // What etcd also serves on the client port; JSON clients (etcd3gw) read /version to
        // choose their API prefix.
        .route("/version", axum::routing::get(version))
        .route("/health", axum::routing::get(health))
        .fallback(not_found)
        .with_state(gw)
}

// ---------------------------------------------------------------------------------------------
// One port for gRPC and JSON
// ---------------------------------------------------------------------------------------------

/// A tower layer for the client port's tonic server: gRPC requests go to the services it
/// wraps, everything else to the gateway's router.
#[derive(Clone)]
pub struct GatewayLayer {
    http: Router,
    cert_cn: bool,
}

impl GatewayLayer {
    /// The layer serving the gateway for `ctx`.
    pub fn new(ctx: Ctx) -> GatewayLayer {
        GatewayLayer {
            http: router(ctx),
            cert_cn: false,
        }
    }

    /// Pass the verified client certificate's CN to the handlers as
    /// [`crate::auth::CERT_CN_HEADER`] (`--client-cert-auth`). The header is removed from every
    /// request either way.
    pub fn with_cert_cn(mut self, on: bool) -> GatewayLayer {
        self.cert_cn = on;
        self
    }
}

impl<S> tower::Layer<S> for GatewayLayer {
    type Service = Split<S>;

    fn layer(&self, grpc: S) -> Split<S> {
        Split {
            grpc,
            http: self.http.clone(),
            cert_cn: self.cert_cn,
        }
    }
}

/// The service made by [`GatewayLayer`].
#[derive(Clone)]
pub struct Split<S> {
    grpc: S,
    http: Router,
    cert_cn: bool,
}

/// Removes any client-sent [`crate::auth::CERT_CN_HEADER`], then sets it from the verified
/// client certificate of the TLS connection when `on`.
fn set_cert_cn<B>(req: &mut Request<B>, on: bool) {
    let removed = req.headers_mut().remove(crate::auth::CERT_CN_HEADER);
    if removed.is_some() {
        tracing::debug!("dropped a client-sent certificate CN header");
    }
    if !on {
        return;
    }
    let cn = service_kit::tls::peer_certs_of(req).and_then(|chain| {
        chain
            .first()
            .and_then(|c| service_kit::tls::cert_common_name(c))
    });
    if let Some(v) = cn.and_then(|cn| HeaderValue::from_str(&cn).ok()) {
        req.headers_mut().insert(crate::auth::CERT_CN_HEADER, v);
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"))
}

impl<S> tower::Service<Request<tonic::body::Body>> for Split<S>
where
    S: tower::Service<
            Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.grpc.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<tonic::body::Body>) -> Self::Future {
        set_cert_cn(&mut req, self.cert_cn);
        if is_grpc(&req) {
            // The clone is ready only after poll_ready; keep the ready one, leave the clone.
            let clone = self.grpc.clone();
            let mut ready = std::mem::replace(&mut self.grpc, clone);
            return Box::pin(ready.call(req));
        }
        let http = self.http.clone();
        Box::pin(async move {
            let resp = match tower::ServiceExt::oneshot(http, req.map(Body::new)).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            Ok(resp.map(tonic::body::Body::new))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// The HTTP status grpc-gateway (v1, as in etcd 3.4) gives a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// grpc-gateway's error body.
fn error_response(code: Code, message: &str) -> Response {
    let m = serde_json::to_string(message).unwrap_or_else(|_| "\"\"".into());
    json_response(
        http_status(code),
        format!("{{\"error\":{m},\"message\":{m},\"code\":{}}}", code as i32),
    )
}

fn status_response(s: &Status) -> Response {
    error_response(s.code(), s.message())
}

/// An error inside a stream, written as grpc-gateway writes it there.
fn stream_error_line(s: &Status) -> Bytes {
    let status = http_status(s.code());
    let m = serde_json::to_string(s.message()).unwrap_or_else(|_| "\"\"".into());
    let reason = serde_json::to_string(status.canonical_reason().unwrap_or(""))
        .unwrap_or_else(|_| "\"\"".into());
    Bytes::from(format!(
        "{{\"error\":{{\"grpc_code\":{},\"http_code\":{},\"message\":{m},\"http_status\":{reason}}}}}\n",
        s.code() as i32,
        status.as_u16()
    ))
}

/// `GET /version`, as etcd answers it.
async fn version(State(gw): Gw) -> Response {
    let v = gw.ctx.version;
    let cluster = match v.rsplit_once('.') {
        Some((major_minor, _)) => format!("{major_minor}.0"),
        None => v.to_string(),
    };
    let body = serde_json::json!({"etcdserver": v, "etcdcluster": cluster}).to_string();
    json_response(StatusCode::OK, body)
}

/// `GET /health`: healthy while this member knows a leader (etcd's rule, without its probe
/// read).
async fn health(State(gw): Gw) -> Response {
    if gw.ctx.member.leader(gw.ctx.id.member_id).is_some() {
        json_response(StatusCode::OK, r#"{"health":"true","reason":""}"#.into())
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"health":"false","reason":"RAFT NO LEADER"}"#.into(),
        )
    }
}

async fn not_found() -> Response {
    let mut resp = Response::new(Body::from("Not Found\n"));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A response whose body is one `{"result": ...}` line per message of `stream`; an error ends
/// it with an `{"error": ...}` line.
fn stream_response<T, S>(stream: S, encode: fn(&T) -> String) -> Response
where
    T: Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    let lines = stream
        .scan(false, move |failed, item| {
            if *failed {
                return futures::future::ready(None);
            }
            let line = match item {
                Ok(m) => Bytes::from(format!("{{\"result\":{}}}\n", encode(&m))),
                Err(s) => {
                    *failed = true;
                    stream_error_line(&s)
                }
            };
            futures::future::ready(Some(Ok::<_, Infallible>(line)))
        })
        .boxed();
    let mut resp = Response::new(Body::from_stream(lines));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------------------

/// Why a body could not be read.
enum BodyError {
    /// Larger than the limit.
    TooLarge,
    /// Not JSON.
    Syntax(String),
    /// The connection failed while reading.
    Read(String),
}

impl BodyError {
    fn response(&self) -> Response {
        match self {
            BodyError::TooLarge => error_response(
                Code::InvalidArgument,
                &crate::error::Error::RequestTooLarge.to_string(),
            ),
            BodyError::Syntax(m) => error_response(Code::InvalidArgument, m),
            BodyError::Read(m) => error_response(Code::InvalidArgument, m),
        }
    }
}

/// Reads JSON values one after another from a request body, as they arrive, never holding
/// more than `limit` bytes of an unfinished value.
struct JsonValues {
    stream: axum::body::BodyDataStream,
    buf: Vec<u8>,
    limit: usize,
    ended: bool,
}

impl JsonValues {
    fn new(body: Body, limit: usize) -> JsonValues {
        JsonValues {
            stream: body.into_data_stream(),
            buf: Vec::new(),
            limit,
            ended: false,
        }
    }

    /// The next value; `None` at the end of the body.
    async fn next(&mut self) -> Option<Result<Value, BodyError>> {
        loop {
            let start = self
                .buf
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(self.buf.len());
            self.buf.drain(..start);
            if !self.buf.is_empty() {
                let mut values =
                    serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                match values.next() {
                    Some(Ok(v)) => {
                        let used = values.byte_offset();
                        self.buf.drain(..used);
                        return Some(Ok(v));
                    }
                    Some(Err(e)) if e.is_eof() && self.ended => {
                        return Some(Err(BodyError::Syntax("unexpected EOF".into())));
                    }
                    Some(Err(e)) if e.is_eof() => {}
                    Some(Err(e)) => return Some(Err(BodyError::Syntax(e.to_string()))),
                    None => {}
                }
            }
            if self.ended {
                return None;
            }
            if self.buf.len() > self.limit {
                return Some(Err(BodyError::TooLarge));
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => {
                    if self.buf.len() + chunk.len() > self.limit.saturating_add(1) {
                        return Some(Err(BodyError::TooLarge));
                    }
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => {
                    self.ended = true;
                    return Some(Err(BodyError::Read(format!(
                        "cannot read the request body: {e}"
                    ))));
                }
                None => self.ended = true,
            }
        }
    }
}

/// The request's JSON value (an empty body is an empty message, as in etcd).
async fn read_one(headers: &HeaderMap, body: Body, limit: usize) -> Result<Value, Response> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge.response());
    }
    match JsonValues::new(body, limit).next().await {
        None => Ok(Value::Null),
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(e.response()),
    }
}

/// A tonic request carrying `msg`, with the `Authorization` header as the `token` metadata.
fn grpc_request<T>(msg: T, headers: &HeaderMap) -> Result<tonic::Request<T>, Response> {
    let mut req = tonic::Request::new(msg);
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let token = tonic::metadata::MetadataValue::try_from(v.as_bytes())
            .map_err(|_| status_response(&Status::from(crate::error::Error::InvalidAuthToken)))?;
        req.metadata_mut().insert("token", token);
    }
    Ok(req)
}

/// Decode, call, encode: every unary route.
async fn unary<Req, Resp, F, Fut>(
    gw: &Gateway,
    headers: &HeaderMap,
    body: Body,
    decode: fn(&Value) -> Result<Req, json::DecodeError>,
    call: F,
    encode: fn(&Resp) -> String,
) -> Response
where
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let value = match read_one(headers, body, gw.body_limit).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let msg = match decode(&value) {
        Ok(m) => m,
        Err(e) => return error_response(Code::InvalidArgument, &e.0),
    };
    let req = match grpc_request(msg, headers) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match call(req).await {
        Ok(r) => json_response(StatusCode::OK, encode(r.get_ref())),
        Err(s) => status_response(&s),
    }
}

type Gw = State<Arc<Gateway>>;

async fn kv_range(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.kv.clone();
    let call = |r| async move { Kv::range(&svc, r).await };
    unary(
        &gw,
        &headers,
        body,
        json::range_request,
        call,
        json::range_response,
    )
    .await
}

async fn kv_put(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.kv.clone();
    let call = |r| async move { Kv::put(&svc, r).await };
    unary(
        &gw,
        &headers,
        body,
        json::put_request,
        call,
        json::put_response,
    )
    .await
}

async fn kv_delete_range(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.kv.clone();
    let call = |r| async move { Kv::delete_range(&svc, r).await };
    let (dec, enc) = (json::delete_range_request, json::delete_range_response);
    unary(&gw, &headers, body, dec, call, enc).await
}

async fn kv_txn(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.kv.clone();
    let call = |r| async move { Kv::txn(&svc, r).await };
    unary(
        &gw,
        &headers,
        body,
        json::txn_request,
        call,
        json::txn_response,
    )
    .await
}

async fn kv_compaction(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.kv.clone();
    let call = |r| async move { Kv::compact(&svc, r).await };
    let (dec, enc) = (json::compaction_request, json::compaction_response);
    unary(&gw, &headers, body, dec, call, enc).await
}

async fn lease_grant(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.lease.clone();
    let call = |r| async move { Lease::lease_grant(&svc, r).await };
    let (dec, enc) = (json::lease_grant_request, json::lease_grant_response);
    unary(&gw, &headers, body, dec, call, enc).await
}

async fn lease_revoke(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.lease.clone();
    let call = |r| async move { Lease::lease_revoke(&svc, r).await };
    let (dec, enc) = (json::lease_revoke_request, json::lease_revoke_response);
    unary(&gw, &headers, body, dec, call, enc).await
}

async fn lease_time_to_live(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.lease.clone();
    let call = |r| async move { Lease::lease_time_to_live(&svc, r).await };
    let (dec, enc) = (
        json::lease_time_to_live_request,
        json::lease_time_to_live_response,
    );
    unary(&gw, &headers, body, dec, call, enc).await
}

async fn lease_leases(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.lease.clone();
    let call = |r| async move { Lease::lease_leases(&svc, r).await };
    let (dec, enc) = (json::lease_leases_request, json::lease_leases_response);
    unary(&gw, &headers, body, dec, call, enc).await
}

async fn maintenance_status(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.maintenance.clone();
    let call = |r| async move { Maintenance::status(&svc, r).await };
    let (dec, enc) = (json::status_request, json::status_response);
    unary(&gw, &headers, body, dec, call, enc).await
}

async fn member_list(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.maintenance.clone();
    let call = |r| async move { Cluster::member_list(&svc, r).await };
    let (dec, enc) = (json::member_list_request, json::member_list_response);
    unary(&gw, &headers, body, dec, call, enc).await
}

async fn authenticate(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let svc = gw.auth.clone();
    let call = |r| async move { Auth::authenticate(&svc, r).await };
    let (dec, enc) = (json::authenticate_request, json::authenticate_response);
    unary(&gw, &headers, body, dec, call, enc).await
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

/// Decodes the gRPC frames the gateway itself encoded.
struct ProstDecoder<T>(PhantomData<fn() -> T>);

impl<T: prost::Message + Default> Decoder for ProstDecoder<T> {
    type Item = T;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<T>, Status> {
        T::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("gateway frame: {e}")))
    }
}

/// One message as a gRPC frame (uncompressed flag, big-endian length, message).
fn frame<T: prost::Message>(msg: &T) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    // Encoding into a buffer with room for the message cannot fail.
    let _ = msg.encode(&mut b);
    b.freeze()
}

/// What happens to a stream's request side when the HTTP request body ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AtBodyEnd {
    /// End it (keep-alive: the service answers what it got, then ends).
    Close,
    /// Keep it open until the service stops reading (watch: until the client hangs up).
    KeepOpen,
}

/// Opens a client stream for a streaming route: the first JSON request is read and checked
/// before anything is answered (so a bad one gets a 400), the rest are fed as they arrive.
async fn open_stream<T>(
    gw: &Gateway,
    headers: &HeaderMap,
    body: Body,
    decode: fn(&Value) -> Result<T, json::DecodeError>,
    at_end: AtBodyEnd,
) -> Result<tonic::Request<Streaming<T>>, Response>
where
    T: prost::Message + Default + Send + 'static,
{
    let mut values = JsonValues::new(body, gw.body_limit);
    let first = match values.next().await {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => return Err(e.response()),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    if let Some(first) = first {
        let msg = decode(&first).map_err(|e| error_response(Code::InvalidArgument, &e.0))?;
        // A fresh channel has room for one message.
        let _ = tx.try_send(frame(&msg));
    }
    tokio::spawn(async move {
        loop {
            match values.next().await {
                Some(Ok(v)) => match decode(&v) {
                    Ok(msg) => {
                        if tx.send(frame(&msg)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // As grpc-gateway: a request it cannot decode closes the sending side.
                        tracing::debug!(error = %e, "gateway stream: undecodable request");
                        break;
                    }
                },
                Some(Err(_)) => break,
                None => break,
            }
        }
        if at_end == AtBodyEnd::KeepOpen {
            tx.closed().await;
        }
    });
    let frames = ReceiverStream::new(rx).map(Ok::<Bytes, Infallible>);
    let streaming = Streaming::new_request(
        ProstDecoder::<T>(PhantomData),
        Body::from_stream(frames),
        None,
        Some(gw.max_message),
    );
    grpc_request(streaming, headers)
}

async fn watch(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let req = match open_stream(
        &gw,
        &headers,
        body,
        json::watch_request,
        AtBodyEnd::KeepOpen,
    )
    .await
    {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match Watch::watch(&gw.watch, req).await {
        Ok(resp) => stream_response(resp.into_inner(), json::watch_response),
        Err(s) => status_response(&s),
    }
}

async fn lease_keep_alive(State(gw): Gw, headers: HeaderMap, body: Body) -> Response {
    let dec = json::lease_keep_alive_request;
    let req = match open_stream(&gw, &headers, body, dec, AtBodyEnd::Close).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match Lease::lease_keep_alive(&gw.lease, req).await {
        Ok(resp) => stream_response(resp.into_inner(), json::lease_keep_alive_response),
        Err(s) => status_response(&s),
    }
}
