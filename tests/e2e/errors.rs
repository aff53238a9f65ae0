//! What a client sees when there is nothing to send its request to, and the admin
//! endpoints an operator uses.

use std::time::{Duration, Instant};

use serde_json::Value;
use tandem::client::Connection;
use tandem_proto::demo::v1 as demo;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn unknown_destination_and_empty_service_are_told_apart() {
    bounded(LIMIT, async {
        let dir = TestDir::new("errors");
        let live = backend("instance-1").await;
        let file = dir.path("services.yaml");
        Services::new()
            .service(Service::new("empty", 80))
            .service(
                Service::new("draining", 80)
                    .endpoint(Endpoint::new(live.addr("http")).health(Health::Draining)),
            )
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy(cp.addr("discovery"), &[]).await;
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();

        let reply = conn.get("nope.default", "/").await.unwrap();
        assert_eq!(reply.status, 404);
        assert!(reply.text().contains("nope.default:80"), "{}", reply.text());
        assert_eq!(reply.headers["x-tandem-error"], "unknown_destination");

        let start = Instant::now();
        let reply = conn.get("empty", "/").await.unwrap();
        assert_eq!(reply.status, 503);
        assert!(
            reply.text().contains("has no endpoints"),
            "{}",
            reply.text()
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "503 must come at once"
        );
        let start = Instant::now();
        let reply = conn.get("empty", "/").await.unwrap();
        assert_eq!(reply.status, 503);
        assert!(
            start.elapsed() < Duration::from_millis(200),
            "and stay immediate"
        );

        let reply = conn.get("draining", "/").await.unwrap();
        assert_eq!(reply.status, 503);
        assert!(
            reply.text().contains("no healthy endpoints"),
            "{}",
            reply.text()
        );

        // gRPC callers get a gRPC status, not an HTML-ish page.
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr("proxy")))
                .unwrap()
                .origin("http://nope:80".parse().unwrap())
                .connect()
                .await
                .unwrap();
        let status = demo::greeter_client::GreeterClient::new(channel)
            .say_hello(demo::HelloRequest::default())
            .await
            .expect_err("unknown destination");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("nope:80"), "{}", status.message());
    })
    .await
}

#[tokio::test]
async fn unreachable_endpoint_is_skipped_before_the_request_is_sent() {
    bounded(LIMIT, async {
        let dir = TestDir::new("dead-endpoint");
        let live = backend("instance-1").await;
        // A port nothing listens on: bind, note it, close.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let file = dir.path("services.yaml");
        Services::new()
            .service(Service::new("web", 80).endpoints([live.addr("http"), dead]))
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy(cp.addr("discovery"), &[]).await;
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();
        let seen = instances(&mut conn, "web", 20).await;
        assert!(seen.iter().all(|i| i == "instance-1"), "{seen:?}");
    })
    .await
}

#[tokio::test]
async fn admin_endpoints_report_liveness_readiness_and_metrics() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("admin", &[1, 1]).await;
        let admin = mesh.proxy.addr("admin");
        let mut conn = mesh.connect().await;
        instances(&mut conn, "web", 10).await;
        assert_eq!(admin_get(admin, "/live").await, "live\n");
        assert_eq!(admin_get(admin, "/ready").await, "ready\n");
        let metrics = admin_get(admin, "/metrics").await;
        // Golden signals per service (not per endpoint, not per alias), in seconds.
        let web = r#"direction="outbound",dst_namespace="default",dst_service="web""#;
        let line = format!(r#"tandem_proxy_requests_total{{{web},status_class="2xx"}} 10"#);
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
        let line = format!("tandem_proxy_response_latency_seconds_count{{{web}}} 10");
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
        assert!(metrics.contains(&format!(r#"tandem_proxy_response_latency_seconds_bucket{{{web},le="0.0005"}}"#)), "{metrics}");
        // Bytes to and from the endpoints, by zone (the proxy's is unknown here).
        let zone = r#"dst_service="web",src_zone="unknown",dst_zone="unknown",tier="unknown""#;
        for flow in ["sent", "received"] {
            let bytes = samples(&metrics, "tandem_proxy_zone_bytes_total", &format!(r#"{zone},flow="{flow}""#));
            assert!(bytes.is_some_and(|b| b >= 10.0 * 20.0), "{flow}: {bytes:?} in\n{metrics}");
        }
        assert_eq!(samples(&metrics, "tandem_proxy_zone_requests_total", zone), Some(10.0), "{metrics}");
        assert!(!metrics.contains("tandem_proxy_endpoint_requests"), "per endpoint only with the flag");
        assert!(metrics.contains("process_resident_memory_bytes"));

        // With --metrics-per-endpoint, by endpoint address too.
        let detailed = proxy(mesh.control_plane.addr("discovery"), &["--metrics-per-endpoint"]).await;
        let mut conn = Connection::http1(detailed.addr("proxy")).await.unwrap();
        instances(&mut conn, "web", 4).await;
        let metrics = admin_get(detailed.addr("admin"), "/metrics").await;
        for backend in &mesh.backends {
            let line = format!(
                r#"tandem_proxy_endpoint_requests_total{{{web},endpoint="{}",status_code="200"}} 2"#,
                backend.addr("http")
            );
            assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
        }
        let config = config(admin).await;
        let web = &config["destinations"][0];
        assert_eq!(web["name"], "web:80");
        assert_eq!(web["service"], "web.default.svc.cluster.local:80");
        assert_eq!(web["endpoints"].as_array().unwrap().len(), 2);

        let cp_metrics = admin_get(mesh.control_plane.addr("admin"), "/metrics").await;
        assert!(cp_metrics.contains("tandem_control_plane_connected_proxies 1"), "{cp_metrics}");
        assert!(cp_metrics.contains("tandem_control_plane_services 1"));
        assert!(cp_metrics.contains("tandem_control_plane_endpoints 2"));
    })
    .await
}

#[tokio::test]
async fn proxy_is_not_ready_until_the_control_plane_answers() {
    bounded(LIMIT, async {
        // A control plane address where nothing listens yet.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = tandem::process::spawn_with(
            "proxy",
            exe(),
            [
                "proxy",
                "--control-plane",
                &port.to_string(),
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ],
            &tandem::process::Options::default(),
            START,
        )
        .await
        .unwrap();
        let admin = proxy.addr("admin");
        let mut conn = Connection::http1(admin).await.unwrap();
        let reply = conn.get("localhost", "/ready").await.unwrap();
        assert_eq!(reply.status, 503);
        assert!(reply.text().starts_with("not ready"), "{}", reply.text());
        assert_eq!(conn.get("localhost", "/live").await.unwrap().status, 200);

        // Now start the control plane on that port: the proxy becomes ready by itself.
        let dir = TestDir::new("ready");
        let file = dir.path("services.yaml");
        Services::new().write(&file);
        let _cp = control_plane_on(&file, &port.to_string()).await;
        wait_ready(admin).await;
    })
    .await
}

#[tokio::test]
async fn idle_client_connections_are_closed() {
    bounded(LIMIT, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let a = backend("instance-1").await;
        let proxy = static_proxy(&[a.addr("http")], &["--idle-timeout", "1s"]).await;
        let mut stream = tokio::net::TcpStream::connect(proxy.addr("proxy"))
            .await
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = stream.read(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
        // Then silence: the proxy closes the connection (read returns 0) within a few seconds.
        let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .expect("the proxy closes an idle connection");
        assert_eq!(closed.unwrap(), 0, "expected end of stream");
        let metrics = admin_get(proxy.addr("admin"), "/metrics").await;
        assert!(
            metric(&metrics, "tandem_proxy_open_connections") == 0.0,
            "{metrics}"
        );
    })
    .await
}

#[tokio::test]
async fn locality_comes_from_the_control_plane_and_the_flag_overrides_it() {
    bounded(LIMIT, async {
        let dir = TestDir::new("locality");
        let file = dir.path("services.yaml");
        Services::new()
            .node(Node::new("node-a").region("region-1").zone("zone-a"))
            .write(&file);
        let cp = control_plane(&file).await;
        let told = proxy(cp.addr("discovery"), &["--node", "node-a"]).await;
        let cfg = config(told.addr("admin")).await;
        assert_eq!(cfg["locality"]["region"], "region-1", "{cfg}");
        assert_eq!(cfg["locality"]["zone"], "zone-a", "{cfg}");

        let overridden = proxy(
            cp.addr("discovery"),
            &["--node", "node-a", "--locality", "region-2/zone-x"],
        )
        .await;
        let cfg = config(overridden.addr("admin")).await;
        assert_eq!(cfg["locality"]["zone"], "zone-x", "{cfg}");
    })
    .await
}

#[tokio::test]
async fn log_lines_name_their_client_connection_and_their_destination() {
    bounded(LIMIT, async {
        let dir = TestDir::new("log-spans");
        // A port nothing listens on: bind, note it, close.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let file = dir.path("services.yaml");
        Services::new()
            .service(Service::new("web", 80).endpoint(dead))
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy_logging(
            cp.addr("discovery"),
            &["--log-format", "json"],
            "info,tandem_proxy=debug",
        )
        .await;
        let listener = proxy.addr("proxy");
        let mut client = Raw::connect(listener).await;
        let peer = client.stream.local_addr().unwrap().to_string();
        client.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
        assert_eq!(client.response(false).await.status, 502);
        client.send(b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n").await;
        assert_eq!(client.response(false).await.status, 404);

        // The first JSON log line with `message`, and whatever else `also` wants of it.
        let line = |message: &'static str, also: fn(&Value) -> bool| {
            let proxy = &proxy;
            move || async move {
                proxy
                    .log_text()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|l| l["message"] == message && also(l))
            }
        };
        let failed = eventually(
            STEP,
            "the failed request's log line",
            line("upstream request failed", |_| true),
        )
        .await;
        assert_eq!(failed["backend"], dead.to_string(), "{failed}");
        // Its connection: who, on which listener, how.
        let span = &failed["span"];
        assert_eq!(span["name"], "connection", "{failed}");
        assert_eq!(span["peer"], peer, "{failed}");
        assert_eq!(span["listener"], listener.to_string(), "{failed}");
        assert_eq!(span["tls"], false, "{failed}");
        assert_eq!(span["protocol"], "http1", "{failed}");

        // The destinations' own tasks: each line names its destination.
        for (message, destination) in [
            ("backend set rebuilt", "web:80"),
            ("unknown destination", "nope:80"),
        ] {
            let logged = eventually(
                STEP,
                message,
                line(message, |l| l["span"]["name"] == "destination"),
            )
            .await;
            assert_eq!(logged["span"]["destination"], destination, "{logged}");
            assert!(logged["span"].get("peer").is_none(), "{logged}");
        }
    })
    .await
}
