//! End to end: real HTTP through a real Caddy (examples/caddy/Caddyfile,
//! `forward_auth`) to Tollgate's forward-auth listener trusting the
//! `X-Forwarded-*` convention, and a tiny upstream that echoes the headers
//! it received — the same matrix as the nginx and Traefik tests
//! ([`support::gateway::forward_auth_matrix`]).

mod support;

use support::gateway::{Gateway, forward_auth_matrix};
use support::{free_port, start_upstream};
use tollgate::config::ForwardAuthTrust;

/// examples/caddy/Caddyfile with only its addresses replaced.
async fn start_caddy(forward_auth: std::net::SocketAddr, upstream: u16) -> Gateway {
    let template = std::fs::read_to_string(support::repo().join("examples/caddy/Caddyfile"))
        .expect("Caddyfile");
    let listen = free_port();
    let conf = template
        .replace("127.0.0.1:9191", &forward_auth.to_string())
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{upstream}"))
        .replace("http://:8080", &format!("http://:{listen}"));
    Gateway::caddy(&conf, listen).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_caddy() {
    let (mut tg, fa) = support::forward_auth_tollgate(ForwardAuthTrust::Forwarded).await;
    let (upstream, _task) = start_upstream().await;
    let caddy = start_caddy(fa, upstream.port()).await;
    forward_auth_matrix(caddy.listener, &mut tg, &|| caddy.log()).await;
}
