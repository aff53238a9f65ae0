//! `tandem backend`: a tiny HTTP/1.1, HTTP/2 (h2c) and gRPC server that answers with
//! its name, like one instance of an app. The demo starts two of them; the tests and
//! the benchmark use it as the upstream.
//!
//! - `GET /anything` → 200, body `NAME\n`, header `x-tandem-instance: NAME`
//! - `POST /echo` → the request body streamed back as it arrives
//! - `POST /sink` → reads the whole request body, then answers with its length
//! - `/status/NNN` → an empty response with status NNN
//! - `/delay/MS` → answers (as for `/`) after MS milliseconds
//! - `/headers` → the request's headers, one `name: value` line each
//! - `/bytes/N` → N bytes of `x`, with a Content-Length (at most 64 MiB)
//! - `/chunks/N` → N lines `chunk I`, each its own chunk, no Content-Length
//! - `/ws` → a WebSocket (HTTP/1.1 Upgrade) that echoes every message back
//! - gRPC `tandem.demo.v1.Greeter` → replies carry `instance: NAME`
//!
//! With `--tcp-echo ADDR` it also echoes raw TCP there (an opaque protocol), and with
//! `--tcp-greet ADDR` it speaks first (`220 NAME ready`, as SMTP or MySQL servers do),
//! then echoes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tandem_proto::demo::v1 as demo;
use tokio::net::TcpListener;
use tonic::codegen::Service;

#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// The name this instance answers with.
    #[arg(long, default_value = "backend")]
    pub name: String,
    /// Where to listen (port 0: any free port; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Answer every plain HTTP request with this status (e.g. 503 to play a failing instance).
    #[arg(long, default_value_t = 200)]
    pub status: u16,
    /// Do not log each request (for load tests).
    #[arg(long)]
    pub quiet: bool,
    /// HTTP/2 streams a client may have open at once on one connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS; hyper's default is 200).
    #[arg(long, default_value_t = 200)]
    pub max_concurrent_streams: u32,
    /// Also echo raw TCP on this address (an opaque protocol for the mesh).
    #[arg(long)]
    pub tcp_echo: Option<SocketAddr>,
    /// Also serve a server-speaks-first protocol here: `220 NAME ready\r\n` on accept,
    /// then an echo.
    #[arg(long)]
    pub tcp_greet: Option<SocketAddr>,
    /// On SIGTERM, go on serving this long before exiting, as an app in a pod does
    /// while the mesh stops sending it requests (default: exit at once).
    #[arg(long, value_parser = tandem_common::duration::parse, default_value = "0s")]
    pub shutdown_delay: std::time::Duration,
}

struct Greeter {
    name: String,
}

type ReplyStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<demo::HelloReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl demo::greeter_server::Greeter for Greeter {
    async fn say_hello(
        &self,
        request: tonic::Request<demo::HelloRequest>,
    ) -> Result<tonic::Response<demo::HelloReply>, tonic::Status> {
        let who = request.into_inner().name;
        Ok(tonic::Response::new(demo::HelloReply {
            message: format!("hello {who}"),
            instance: self.name.clone(),
        }))
    }

    type SayHelloStreamStream = ReplyStream;

    async fn say_hello_stream(
        &self,
        request: tonic::Request<demo::HelloRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let request = request.into_inner();
        let replies: Vec<Result<demo::HelloReply, tonic::Status>> = (0..request.count)
            .map(|i| {
                Ok(demo::HelloReply {
                    message: format!("hello {} #{i}", request.name),
                    instance: self.name.clone(),
                })
            })
            .collect();
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(replies))))
    }
}

type Chunks = StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;
type Body = Either<Either<Full<Bytes>, Incoming>, Either<tonic::body::Body, Chunks>>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Either::Left(Full::new(bytes.into())))
}

struct Backend {
    args: BackendArgs,
    grpc: demo::greeter_server::GreeterServer<Greeter>,
}

impl Backend {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if !self.args.quiet {
            eprintln!(
                "[{}] served {} {} ({:?})",
                self.args.name,
                req.method(),
                req.uri().path(),
                req.version()
            );
        }
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
        if grpc {
            let mut grpc = self.grpc.clone();
            return match grpc.call(req).await {
                Ok(response) => response.map(|b| Either::Right(Either::Left(b))),
                Err(never) => match never {},
            };
        }
        let path = req.uri().path();
        if path == "/ws" {
            return websocket(req, &self.args.name);
        }
        if let Some(ms) = path
            .strip_prefix("/delay/")
            .and_then(|ms| ms.parse::<u64>().ok())
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
        }
        let mut response = if let Some(code) = path.strip_prefix("/status/") {
            let status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = status.unwrap_or(StatusCode::BAD_REQUEST);
            r
        } else if path == "/echo" {
            Response::new(Either::Left(Either::Right(req.into_body())))
        } else if path == "/sink" {
            use http_body_util::BodyExt;
            match req.into_body().collect().await {
                Ok(body) => Response::new(full(format!("{} bytes\n", body.to_bytes().len()))),
                Err(error) => {
                    let mut r = Response::new(full(format!("{error}\n")));
                    *r.status_mut() = StatusCode::BAD_REQUEST;
                    r
                }
            }
        } else if path == "/headers" {
            let lines: String = req
                .headers()
                .iter()
                .map(|(name, value)| {
                    format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes()))
                })
                .collect();
            Response::new(full(lines))
        } else if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Response::new(full(vec![b'x'; n.min(64 << 20)]))
        } else if let Some(n) = path
            .strip_prefix("/chunks/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            let frames: Vec<_> = (0..n.min(100_000))
                .map(|i| Ok(Frame::data(Bytes::from(format!("chunk {i}\n")))))
                .collect();
            Response::new(Either::Right(Either::Right(StreamBody::new(
                tokio_stream::iter(frames),
            ))))
        } else {
            let mut r = Response::new(full(format!("{}\n", self.args.name)));
            *r.status_mut() =
                StatusCode::from_u16(self.args.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        if let Ok(name) = header::HeaderValue::from_str(&self.args.name) {
            response.headers_mut().insert("x-tandem-instance", name);
        }
        response
    }
}

/// Accepts a WebSocket handshake (RFC 6455 §4.2) and echoes every message on the
/// upgraded connection until the client closes it; anything else gets 400.
fn websocket(mut req: Request<Incoming>, name: &str) -> Response<Body> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let headers = req.headers();
    let asks_websocket = headers
        .get(header::UPGRADE)
        .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = headers.get("sec-websocket-key").cloned();
    let (true, Some(key)) = (asks_websocket, key) else {
        let mut r = Response::new(full("/ws needs a WebSocket upgrade\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::Role;
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = ws.next().await {
            let reply = match message {
                Message::Text(_) | Message::Binary(_) => message,
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                return;
            }
        }
        let _ = ws.close(None).await;
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    if let Ok(accept) = header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", accept);
    }
    if let Ok(name) = header::HeaderValue::from_str(name) {
        h.insert("x-tandem-instance", name);
    }
    r
}

/// Echoes every connection's bytes back, after `greeting` if any.
async fn echo(listener: TcpListener, greeting: Option<String>) {
    use tokio::io::AsyncWriteExt;
    while let Ok((stream, _)) = listener.accept().await {
        let greeting = greeting.clone();
        tokio::spawn(async move {
            let (mut read, mut write) = stream.into_split();
            if let Some(greeting) = greeting
                && write.write_all(greeting.as_bytes()).await.is_err()
            {
                return;
            }
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}

/// Serves until the process is stopped.
pub async fn run(args: BackendArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let delay = args.shutdown_delay;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        terminate.recv().await;
        tokio::time::sleep(delay).await;
        std::process::exit(0);
    });
    let mut announced = vec![("http", addr)];
    for (which, bind, greeting) in [
        ("tcp-echo", args.tcp_echo, None),
        (
            "tcp-greet",
            args.tcp_greet,
            Some(format!("220 {} ready\r\n", args.name)),
        ),
    ] {
        if let Some(bind) = bind {
            let tcp = TcpListener::bind(bind).await?;
            announced.push((which, tcp.local_addr()?));
            tokio::spawn(echo(tcp, greeting));
        }
    }
    tandem_common::announce::listening(&announced);
    if !args.quiet {
        eprintln!("[{}] listening on {addr}", args.name);
    }
    let backend = Arc::new(Backend {
        grpc: demo::greeter_server::GreeterServer::new(Greeter {
            name: args.name.clone(),
        }),
        args,
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(backend.args.max_concurrent_streams);
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let backend = backend.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let backend = backend.clone();
                async move { Ok::<_, Infallible>(backend.handle(req).await) }
            });
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}
