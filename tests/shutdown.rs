//! Shutdown is bounded: the real binary, a real `grpc.health.v1.Health/Watch`
//! stream held open, a real SIGTERM. Every registered service reports
//! NOT_SERVING to the watcher, and the process exits within
//! `server.shutdown_grace_ms` although the client never goes away.

mod support;

use std::time::Duration;

use support::{TollgateProcess, eventually};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_health_watches_ends_within_the_grace() {
    let mut tg = TollgateProcess::start(
        &support::repo().join("policies"),
        "shutdown_grace_ms = 1000",
        "watch = false",
    )
    .await;
    let services = [
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ratelimit.v3.RateLimitService",
        "tollgate.v1.DecisionService",
        "",
    ];
    let mut streams = Vec::new();
    for service in services {
        let mut client = HealthClient::new(tg.channel().await);
        let mut stream = client
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = stream
            .message()
            .await
            .expect("status")
            .expect("a first status");
        assert_eq!(first.status, SERVING, "{service:?}");
        // The client is kept alive with its stream until the end.
        streams.push((service, client, stream));
    }

    tg.terminate();
    for (service, _client, stream) in &mut streams {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a status after SIGTERM within 10 s");
        if let Ok(Some(status)) = next {
            assert_eq!(status.status, NOT_SERVING, "{service:?} after SIGTERM");
        } else {
            panic!("{service:?}: the stream ended without NOT_SERVING: {next:?}");
        }
    }
    let exited = eventually(Duration::from_secs(15), || {
        let done = !tg.alive();
        async move { done }
    })
    .await;
    assert!(
        exited,
        "tollgate still running with open watch streams: {}",
        tg.log()
    );
    let status = tg.child.wait().expect("wait");
    assert!(status.success(), "exit status {status:?}: {}", tg.log());
    drop(streams);
}
