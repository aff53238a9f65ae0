//! Per-request balancing as a client sees it: alternation, exact weights, HTTP/2 and
//! gRPC balanced per request over a single client connection.

use std::time::Duration;

use tandem::client::Connection;
use tandem_proto::demo::v1 as demo;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn equal_weights_alternate_strictly() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("alternate", &[1, 1]).await;
        let mut conn = mesh.connect().await;
        let seen = instances(&mut conn, "web", 20).await;
        assert_alternates(&seen, "sequential requests");
        assert_eq!(
            counts(&seen).into_values().collect::<Vec<_>>(),
            vec![10, 10]
        );
    })
    .await
}

#[tokio::test]
async fn weights_three_to_one_split_exactly() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("weights", &[3, 1]).await;
        let mut conn = mesh.connect().await;
        let seen = instances(&mut conn, "web.default.svc.cluster.local", 400).await;
        let c = counts(&seen);
        assert_eq!(c["instance-1"], 300, "{c:?}");
        assert_eq!(c["instance-2"], 100, "{c:?}");
        for window in seen.windows(4) {
            let heavy = window.iter().filter(|i| *i == "instance-1").count();
            assert_eq!(
                heavy, 3,
                "every 4 consecutive requests split 3:1, got {window:?}"
            );
        }
    })
    .await
}

#[tokio::test]
async fn http2_requests_are_balanced_per_request_over_one_connection() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("h2c", &[1, 1]).await;
        let mut conn = Connection::http2(mesh.proxy_addr())
            .await
            .expect("h2c connection");
        let seen = instances(&mut conn, "web.default:80", 20).await;
        assert_alternates(&seen, "requests over one connection");
        // Concurrent streams on the same connection are balanced too.
        let mut calls = Vec::new();
        for _ in 0..10 {
            let mut c = Connection::http2(mesh.proxy_addr()).await.unwrap();
            calls.push(tokio::spawn(
                async move { instances(&mut c, "web", 10).await },
            ));
        }
        let mut all = Vec::new();
        for call in calls {
            all.extend(call.await.unwrap());
        }
        let c = counts(&all);
        assert_eq!(c.values().sum::<usize>(), 100);
        assert!(c.values().all(|n| *n == 50), "{c:?}");
    })
    .await
}

#[tokio::test]
async fn grpc_calls_are_balanced_per_call_over_one_channel() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("grpc", &[1, 1]).await;
        // One channel is one HTTP/2 connection; `origin` sets :authority to the service.
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.proxy_addr()))
                .unwrap()
                .origin("http://web.default.svc.cluster.local:80".parse().unwrap())
                .connect()
                .await
                .expect("gRPC channel to the proxy");
        let mut client = demo::greeter_client::GreeterClient::new(channel);
        let mut seen = Vec::new();
        for i in 0..20 {
            let reply = client
                .say_hello(demo::HelloRequest {
                    name: format!("call {i}"),
                    count: 0,
                })
                .await
                .expect("gRPC call through the proxy")
                .into_inner();
            assert_eq!(reply.message, format!("hello call {i}"));
            seen.push(reply.instance);
        }
        assert_alternates(&seen, "gRPC calls");
        // A server stream is one request: all its messages come from one instance.
        let mut stream = client
            .say_hello_stream(demo::HelloRequest {
                name: "s".into(),
                count: 5,
            })
            .await
            .expect("streaming call")
            .into_inner();
        let mut from = Vec::new();
        while let Some(reply) = stream.message().await.expect("stream message") {
            from.push(reply.instance);
        }
        assert_eq!(from.len(), 5);
        assert!(from.iter().all(|i| *i == from[0]), "{from:?}");
    })
    .await
}

#[tokio::test]
async fn static_backends_need_no_control_plane() {
    bounded(LIMIT, async {
        let a = backend("instance-a").await;
        let b = backend("instance-b").await;
        let proxy = static_proxy(&[a.addr("http"), b.addr("http")], &[]).await;
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();
        // The Host is irrelevant in static mode.
        let seen = instances(&mut conn, "anything.example", 10).await;
        assert_alternates(&seen, "requests over one connection");
    })
    .await
}
