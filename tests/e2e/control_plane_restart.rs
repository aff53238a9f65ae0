//! The control plane goes away and comes back: proxies keep routing with what they
//! know, then resubscribe by themselves.

use std::time::Duration;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn proxy_keeps_routing_without_the_control_plane_and_resubscribes() {
    bounded(LIMIT, async {
        let mut mesh = Mesh::start("cp-restart", &[1, 1]).await;
        let mut conn = mesh.connect().await;
        assert_eq!(counts(&instances(&mut conn, "web", 4).await).len(), 2);

        let discovery = mesh.control_plane.addr("discovery");
        mesh.control_plane.kill().await;

        // Existing and new client connections keep being balanced over the last-known set.
        assert_eq!(counts(&instances(&mut conn, "web", 20).await).len(), 2);
        let mut fresh = mesh.connect().await;
        assert_eq!(counts(&instances(&mut fresh, "web", 20).await).len(), 2);
        // A destination the proxy never saw cannot be resolved meanwhile, and says why.
        let reply = fresh.get("other", "/").await.unwrap();
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(reply.text().contains("unreachable"), "{}", reply.text());

        // While it is down, the file changes; the restarted control plane serves it and the
        // proxy picks it up by resubscribing.
        let third = backend("instance-3").await;
        let endpoints = [
            mesh.backends[0].addr("http"),
            mesh.backends[1].addr("http"),
            third.addr("http"),
        ];
        Services::new()
            .service(Service::new("web", 80).endpoints(endpoints))
            .replace(&mesh.file);
        mesh.control_plane = control_plane_on(&mesh.file, &discovery.to_string()).await;
        eventually(
            Duration::from_secs(20),
            "the proxy to resubscribe and see instance-3",
            || {
                let proxy = mesh.proxy_addr();
                async move {
                    let mut c = tandem::client::Connection::http1(proxy).await.ok()?;
                    let seen = instances(&mut c, "web", 6).await;
                    (counts(&seen).len() == 3).then_some(())
                }
            },
        )
        .await;
    })
    .await
}
