//! A minimal HTTP client over one connection (HTTP/1.1 keep-alive or HTTP/2 prior
//! knowledge), for the demo and the tests: it shows exactly what one client
//! connection sees through the proxy.

use std::net::SocketAddr;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// One client connection.
pub struct Connection {
    sender: Sender,
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The backend instance that answered (`tandem backend` sets `x-tandem-instance`).
    pub fn instance(&self) -> Option<&str> {
        self.headers.get("x-tandem-instance")?.to_str().ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Connection {
    pub async fn http1(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let _ = stream.set_nodelay(true);
        Self::http1_over(stream).await
    }

    pub async fn http2(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let _ = stream.set_nodelay(true);
        Self::http2_over(stream).await
    }

    pub async fn http1_over<T>(io: T) -> anyhow::Result<Self>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender: Sender::Http1(sender),
        })
    }

    pub async fn http2_over<T>(io: T) -> anyhow::Result<Self>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender: Sender::Http2(sender),
        })
    }

    /// GET `path` on `authority` (sent as Host for HTTP/1, :authority for HTTP/2).
    pub async fn get(&mut self, authority: &str, path: &str) -> anyhow::Result<Reply> {
        self.send("GET", authority, path, Bytes::new()).await
    }

    pub async fn send(
        &mut self,
        method: &str,
        authority: &str,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<Reply> {
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                let req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header(http::header::HOST, authority)
                    .body(Full::new(body))?;
                sender.ready().await?;
                sender.send_request(req).await?
            }
            Sender::Http2(sender) => {
                let req = Request::builder()
                    .method(method)
                    .uri(format!("http://{authority}{path}"))
                    .body(Full::new(body))?;
                sender.ready().await?;
                sender.send_request(req).await?
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// Polls a Tandem admin port's `/ready` until it answers 200, for up to `timeout`.
pub async fn wait_ready(admin: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut conn) = Connection::http1(admin).await
            && let Ok(reply) = conn.get("localhost", "/ready").await
            && reply.status.is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{admin} did not become ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
