//! Shared helpers for the end-to-end tests: real `tandem` processes on loopback,
//! ports from the OS, polling with deadlines (never sleeping to synchronise).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tandem::client::Connection;
use tandem::process::{Options, Spawned, spawn_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const START: Duration = Duration::from_secs(30);

pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tandem"))
}

/// Runs a test body with an overall deadline, so no test can hang CI.
pub async fn bounded<F: Future<Output = ()>>(limit: Duration, body: F) {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"));
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A scratch directory removed when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tandem-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create test dir");
        Self(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces a file the way editors and ConfigMap updates do: write aside, rename over.
pub fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over file");
}

async fn start(name: &str, args: &[&str], capture: bool) -> Spawned {
    let options = Options {
        envs: vec![("RUST_LOG", "info")],
        capture_stderr: capture,
    };
    spawn_with(name, exe(), args, &options, START)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

pub async fn backend(name: &str) -> Spawned {
    backend_with(name, &[]).await
}

pub async fn backend_with(name: &str, extra: &[&str]) -> Spawned {
    start_backend(name, extra, false).await
}

/// A backend that logs every request it serves, with the HTTP version it came in.
pub async fn logging_backend(name: &str) -> Spawned {
    start_backend(name, &[], true).await
}

/// A backend in the test itself, below HTTP: it reads each request head, writes
/// `reply` as it is (nothing, to hang up unanswered) and closes the connection.
pub async fn raw_backend(reply: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(reply).await;
            });
        }
    });
    addr
}

async fn start_backend(name: &str, extra: &[&str], logging: bool) -> Spawned {
    let mut args = vec!["backend", "--name", name];
    if !logging {
        args.push("--quiet");
    }
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    start(name, &args, logging).await
}

pub async fn control_plane(file: &Path) -> Spawned {
    control_plane_on(file, "127.0.0.1:0").await
}

pub async fn control_plane_on(file: &Path, listen: &str) -> Spawned {
    let source = format!("file:{}", file.display());
    start(
        "control-plane",
        &[
            "control-plane",
            "--source",
            &source,
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
        ],
        true,
    )
    .await
}

/// A proxy on the control plane at `discovery`, ready (it has heard from the control plane).
pub async fn proxy(discovery: SocketAddr, extra: &[&str]) -> Spawned {
    let discovery = discovery.to_string();
    start_proxy(&["--control-plane", &discovery], extra).await
}

/// A proxy with static backends (no control plane).
pub async fn static_proxy(backends: &[SocketAddr], extra: &[&str]) -> Spawned {
    let list = backends
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",");
    start_proxy(&["--backends", &list], extra).await
}

async fn start_proxy(source: &[&str], extra: &[&str]) -> Spawned {
    let mut args = vec![
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--threads",
        "1",
    ];
    args.extend_from_slice(source);
    args.extend_from_slice(extra);
    let proxy = start("proxy", &args, true).await;
    wait_ready(proxy.addr("admin")).await;
    proxy
}

pub async fn wait_ready(admin: SocketAddr) {
    tandem::client::wait_ready(admin, START)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// GET `path` from an admin port.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let mut conn = Connection::http1(admin).await.expect("connect admin");
    conn.get("localhost", path)
        .await
        .expect("admin request")
        .text()
}

/// A services file with one service `name` (namespace default) on `port` and these
/// `(address, weight)` endpoints.
pub fn services_yaml(name: &str, port: u16, endpoints: &[(SocketAddr, u32)]) -> String {
    let mut yaml = format!(
        "services:\n  - name: {name}\n    namespace: default\n    port: {port}\n    endpoints:\n"
    );
    if endpoints.is_empty() {
        yaml = format!(
            "services:\n  - name: {name}\n    namespace: default\n    port: {port}\n    endpoints: []\n"
        );
    }
    for (addr, weight) in endpoints {
        yaml.push_str(&format!(
            "      - {{address: \"{addr}\", weight: {weight}}}\n"
        ));
    }
    yaml
}

/// Sends `n` sequential GETs over `conn` and returns who answered each (panics on failure).
pub async fn instances(conn: &mut Connection, authority: &str, n: usize) -> Vec<String> {
    let mut seen = Vec::with_capacity(n);
    for i in 0..n {
        let reply = conn
            .get(authority, "/")
            .await
            .expect("request through the proxy");
        assert!(
            reply.status.is_success(),
            "request {i}: {} {}",
            reply.status,
            reply.text()
        );
        seen.push(reply.instance().expect("x-tandem-instance").to_string());
    }
    seen
}

/// Panics if two consecutive answers came from the same instance; `context` says whose.
pub fn assert_alternates<T: PartialEq + std::fmt::Debug>(seen: &[T], context: &str) {
    for pair in seen.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "consecutive answers from one instance ({context}): {seen:?}"
        );
    }
}

pub fn counts(seen: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for s in seen {
        *counts.entry(s.clone()).or_default() += 1;
    }
    counts
}

/// A mesh for one test: backends, a services file, a control plane and a proxy.
pub struct Mesh {
    pub _dir: TestDir,
    pub file: PathBuf,
    pub backends: Vec<Spawned>,
    pub control_plane: Spawned,
    pub proxy: Spawned,
}

impl Mesh {
    /// `weights[i]` is the weight of backend `instance-{i+1}` in service `web` port 80.
    pub async fn start(test: &str, weights: &[u32]) -> Self {
        let dir = TestDir::new(test);
        let mut backends = Vec::new();
        for i in 0..weights.len() {
            backends.push(backend(&format!("instance-{}", i + 1)).await);
        }
        let endpoints: Vec<(SocketAddr, u32)> = backends
            .iter()
            .zip(weights)
            .map(|(b, w)| (b.addr("http"), *w))
            .collect();
        let file = dir.path("services.yaml");
        std::fs::write(&file, services_yaml("web", 80, &endpoints)).expect("write services");
        let control_plane = control_plane(&file).await;
        let proxy = proxy(control_plane.addr("discovery"), &[]).await;
        Self {
            _dir: dir,
            file,
            backends,
            control_plane,
            proxy,
        }
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy.addr("proxy")
    }

    pub async fn connect(&self) -> Connection {
        Connection::http1(self.proxy_addr())
            .await
            .expect("connect to the proxy")
    }
}

pub const STEP: Duration = Duration::from_secs(5);

/// A client connection that writes raw bytes and reads whole responses.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr)
                .await
                .expect("connect to the proxy"),
            buf: Vec::new(),
        }
    }

    /// A connection, if the proxy takes it (it may refuse it at once).
    pub async fn try_connect(addr: SocketAddr) -> Option<Self> {
        let stream = TcpStream::connect(addr).await.ok()?;
        Some(Self {
            stream,
            buf: Vec::new(),
        })
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write a request");
    }

    pub async fn fill(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(STEP, self.stream.read(&mut chunk))
            .await
            .expect("the proxy answers in time")
            .expect("read from the proxy");
        assert!(n > 0, "the proxy closed the connection mid-response");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Reads one response; `head` says whether it answers a HEAD request.
    pub async fn response(&mut self, head: bool) -> RawResponse {
        let (len, status, headers) = loop {
            let mut parsed = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut parsed);
            if let httparse::Status::Complete(len) =
                res.parse(&self.buf).expect("a valid response head")
            {
                let headers = res
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (len, res.code.unwrap(), headers);
            }
            self.fill().await;
        };
        self.buf.drain(..len);
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head || status == 204 || status == 304 || (100..200).contains(&status) {
            return response;
        }
        if response
            .header("transfer-encoding")
            .is_some_and(|te| te.contains("chunked"))
        {
            response.body = self.chunked().await;
        } else {
            let n: usize = response
                .header("content-length")
                .expect("a delimited body")
                .parse()
                .unwrap();
            while self.buf.len() < n {
                self.fill().await;
            }
            response.body = self.buf.drain(..n).collect();
        }
        response
    }

    /// Decodes a chunked body (trailers skipped).
    pub async fn chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill().await;
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("chunk size line {line:?}"));
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailer lines, then the empty line.
                loop {
                    while !self.buf.windows(2).any(|w| w == b"\r\n") {
                        self.fill().await;
                    }
                    let i = self.buf.windows(2).position(|w| w == b"\r\n").unwrap();
                    self.buf.drain(..i + 2);
                    if i == 0 {
                        return body;
                    }
                }
            }
            while self.buf.len() < size + 2 {
                self.fill().await;
            }
            body.extend(self.buf.drain(..size));
            assert_eq!(&self.buf[..2], b"\r\n", "chunk data ends with CRLF");
            self.buf.drain(..2);
        }
    }

    /// True once the proxy closed the connection (with nothing more to read).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(STEP, self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
