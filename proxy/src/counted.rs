//! A backend connection that counts the bytes it carries, for the endpoint it goes
//! to: cross-zone bytes are what users pay their cloud for. Every transport (raw
//! HTTP/1, hyper, HTTP/2, mesh TLS, opaque TCP) dials through [`crate::pool::dial`],
//! so each is counted once, as it crosses the wire (TLS records included).
//!
//! One relaxed add per read or write call, to counters the endpoint's connections
//! share: no lock, and next to nothing beside the syscall.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes sent to and received from one endpoint, over all its connections.
#[derive(Debug, Default)]
pub struct ByteCounts {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// A TCP connection to an endpoint, counting into its [`ByteCounts`].
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    counts: Arc<ByteCounts>,
}

impl Counted {
    pub fn new(stream: TcpStream, counts: Arc<ByteCounts>) -> Self {
        Self { stream, counts }
    }

    /// [`TcpStream::poll_read_ready`].
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_read_ready(cx)
    }

    /// [`TcpStream::try_read`], counted.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.try_read(buf)?;
        self.counts.received.fetch_add(n as u64, Relaxed);
        Ok(n)
    }

    /// [`TcpStream::try_read_buf`], counted.
    pub fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        let n = self.stream.try_read_buf(buf)?;
        self.counts.received.fetch_add(n as u64, Relaxed);
        Ok(n)
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counts.received.fetch_add(n as u64, Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counts.sent.fetch_add(*n as u64, Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counts.sent.fetch_add(*n as u64, Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_ways() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"hello, world").await.unwrap();
        });
        let counts = Arc::new(ByteCounts::default());
        let mut conn = Counted::new(TcpStream::connect(addr).await.unwrap(), counts.clone());
        conn.write_all(b"hello").await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        server.await.unwrap();
        assert_eq!(counts.sent.load(Relaxed), 5);
        assert_eq!(counts.received.load(Relaxed), 12);
    }
}
