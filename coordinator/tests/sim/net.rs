//! The peer transport over turmoil's simulated TCP: the production tonic client and server,
//! with only the socket swapped ([`connector`] for channels, [`incoming`] for the server).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use coordinator::raft::network::{self, Connector};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;
use turmoil::net::{TcpListener, TcpStream};

/// Channels with the production endpoint settings ([`network::endpoint`]) whose connections
/// are simulated TCP streams to the URL's host name.
pub fn connector() -> Connector {
    Arc::new(|url: &str| {
        let endpoint = network::endpoint(url)?;
        Ok(
            endpoint.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
                let host = uri.host().unwrap_or_default().to_string();
                let port = uri.port_u16().unwrap_or(80);
                let stream = TcpStream::connect((host.as_str(), port)).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            })),
        )
    })
}

/// A simulated TCP stream accepted by the peer server.
pub struct Accepted(TcpStream);

impl Connected for Accepted {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The connections a simulated listener accepts, as tonic's `serve_with_incoming` wants them.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Accepted>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| Accepted(s));
        Some((next, l))
    })
}
