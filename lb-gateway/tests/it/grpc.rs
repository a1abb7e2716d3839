//! gRPC through the gateway: unary and server streaming against a real tonic server, status
//! codes and custom trailers preserved.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as PbStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{Gateway, NS, Stack, T, within};

fn routes() -> String {
    format!(
        r#"
[[routes]]
name = "health"
match = {{ grpc_service = "grpc.health.v1.Health" }}
backend = {{ namespace = "{NS}", service = "health" }}
hash = "header:x-user"

[[routes]]
name = "echo"
match = {{ grpc_service = "pkg.Echo" }}
backend = {{ namespace = "{NS}", service = "echo" }}
"#
    )
}

/// A tonic server with `grpc.health.v1.Health`; returns its port and reporter.
async fn tonic_backend() -> (u16, tonic_health::server::HealthReporter) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (port, reporter)
}

/// A bare HTTP/2 backend answering every call with one message and the trailers
/// `grpc-status: 0`, `x-answered-by: echo`.
async fn raw_grpc_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let got = req
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes().len())
                        .unwrap_or(0);
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    trailers.insert("x-answered-by", HeaderValue::from_static("echo"));
                    trailers.insert("x-request-bytes", HeaderValue::from(got));
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let body = StreamBody::new(tokio_stream::iter(frames));
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                            .expect("response"),
                    )
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_pass_through_with_their_status() {
    let stack = Stack::start().await;
    let (port, reporter) = tonic_backend().await;
    let _reg = stack.register("health", "h1", port, true).await;
    let gw = Gateway::start(&stack.registry.url(), &routes()).await;
    gw.wait_backends("health", 1).await;

    let endpoint = tonic::transport::Channel::from_shared(gw.url("")).expect("url");
    let channel = within(T, "connect", endpoint.connect())
        .await
        .expect("connect to the gateway");
    let mut client = HealthClient::new(channel);
    // Unary, OK.
    let answer = within(
        T,
        "Check",
        client.check(HealthCheckRequest {
            service: "orders".into(),
        }),
    )
    .await
    .expect("Check through the gateway");
    assert_eq!(answer.into_inner().status, PbStatus::Serving as i32);
    // Unary, an error status from the backend, with its message.
    let status = within(
        T,
        "Check",
        client.check(HealthCheckRequest {
            service: "nope".into(),
        }),
    )
    .await
    .expect_err("unknown service");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // Server streaming: the first status, then a change made while the stream is open.
    let mut stream = within(
        T,
        "Watch",
        client.watch(HealthCheckRequest {
            service: "orders".into(),
        }),
    )
    .await
    .expect("Watch")
    .into_inner();
    let first = within(T, "first message", stream.message())
        .await
        .expect("ok")
        .expect("message");
    assert_eq!(first.status, PbStatus::Serving as i32);
    reporter
        .set_service_status("orders", ServingStatus::NotServing)
        .await;
    let second = within(T, "second message", stream.message())
        .await
        .expect("ok")
        .expect("message");
    assert_eq!(second.status, PbStatus::NotServing as i32);
    drop(stream);

    let requests = gw
        .metric("lb_gateway_backend_requests_total{route=\"health\"")
        .await;
    assert!(requests >= 3.0, "{requests}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_from_the_backend_reach_the_client() {
    let stack = Stack::start().await;
    let port = raw_grpc_backend().await;
    let _reg = stack.register("echo", "e1", port, true).await;
    let gw = Gateway::start(&stack.registry.url(), &routes()).await;
    gw.wait_backends("echo", 1).await;

    let stream = tokio::net::TcpStream::connect(gw.proxy)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::post(gw.url("/pkg.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x03abc")))
        .expect("request");
    let resp = within(T, "call", sender.send_request(req))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let collected = within(T, "body", resp.into_body().collect())
        .await
        .expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reached the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-answered-by"], "echo");
    assert_eq!(
        trailers["x-request-bytes"], "8",
        "the request body went through whole"
    );
    assert_eq!(collected.to_bytes().as_ref(), b"\0\0\0\0\x02hi");

    // A gRPC call the gateway cannot place gets a gRPC status, not an HTML or JSON page.
    let req = Request::post(gw.url("/pkg.Other/Say"))
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = within(T, "call", sender.send_request(req))
        .await
        .expect("response");
    assert_eq!(
        resp.headers()["grpc-status"],
        "12",
        "UNIMPLEMENTED for no route"
    );
    gw.stop().await;
}
