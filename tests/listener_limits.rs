//! Resource limits of the gRPC listener (`[server.limits]`): 2,000 idle
//! connections neither starve a legitimate Check nor stay open past the idle
//! timeout; the connection bound refuses one more; the HTTP/2 settings are
//! advertised as configured; oversized messages and header lists are refused
//! and the listener keeps serving.

mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use support::{
    DEMO_PAID_KEY, Tollgate, check_request, eventually, metric, metrics_text, test_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const CHAT: &str = "/v1/chat/completions";

/// Raises this process's open-file limit toward `want` (the soft limit is
/// often 1,024; the test holds both ends of every connection).
fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn allowed_check(client: &mut AuthorizationClient<tonic::transport::Channel>) -> Duration {
    let request = check_request(
        "POST",
        CHAT,
        &[
            ("x-api-key", DEMO_PAID_KEY),
            ("content-type", "application/json"),
        ],
        r#"{"model":"llama-3-8b","messages":[]}"#,
    );
    let started = Instant::now();
    let response = client.check(request).await.expect("check answers");
    let elapsed = started.elapsed();
    assert!(
        matches!(
            response.into_inner().http_response,
            Some(HttpResponse::OkResponse(_))
        ),
        "a legitimate check is allowed"
    );
    elapsed
}

async fn median_check(client: &mut AuthorizationClient<tonic::transport::Channel>) -> Duration {
    let mut times = Vec::new();
    for _ in 0..31 {
        times.push(allowed_check(client).await);
    }
    times.sort();
    times[times.len() / 2]
}

async fn open_connections(tg: &Tollgate) -> f64 {
    metric(
        &metrics_text(tg.admin).await,
        "tollgate_listener_connections{listener=\"grpc\"}",
    )
    .unwrap_or_default()
}

/// Reads until the server closes the connection; false if it stays open
/// past `limit`.
async fn closed_by_server(mut stream: TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_neither_starve_checks_nor_stay_open() {
    const IDLE: usize = 2000;
    raise_fd_limit(3 * IDLE as u64 + 1024);
    let mut config = test_config();
    let idle_timeout = Duration::from_secs(2);
    config.server.limits.idle_timeout_ms = idle_timeout.as_millis() as u64;
    config.server.limits.keepalive_interval_ms = 500;
    config.server.limits.keepalive_timeout_ms = 1000;
    let mut tg = Tollgate::start(config).await;
    let mut client = AuthorizationClient::new(tg.channel().await);
    for _ in 0..5 {
        allowed_check(&mut client).await;
    }
    let usual = median_check(&mut client).await;

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(tg.grpc).await.expect("connect"));
    }
    let opened = Instant::now();
    let loaded = median_check(&mut client).await;
    // Generous on purpose (a shared machine): the point is that the check
    // answers at its usual pace, not a precise ratio.
    assert!(
        loaded <= (usual * 2).max(usual + Duration::from_millis(50)),
        "median check took {loaded:?} with {IDLE} idle connections, {usual:?} without"
    );

    // Every idle connection is closed by the server within the idle timeout
    // (plus scheduling slack), none by the client.
    let mut readers = JoinSet::new();
    for stream in idle {
        readers.spawn(closed_by_server(stream, idle_timeout * 6));
    }
    let mut closed = 0;
    while let Some(result) = readers.join_next().await {
        closed += usize::from(result.expect("reader"));
    }
    assert_eq!(closed, IDLE, "idle connections the server left open");
    let waited = opened.elapsed();
    assert!(
        waited >= idle_timeout,
        "closed after {waited:?}, before the idle timeout"
    );
    let closed_metric = metric(
        &metrics_text(tg.admin).await,
        "tollgate_listener_idle_closed_total{listener=\"grpc\"}",
    );
    assert!(closed_metric >= Some(IDLE as f64), "{closed_metric:?}");

    // The client's own connection answers keep-alive pings, so it outlives
    // the idle timeout and serves the next check.
    let quiet_since = Instant::now();
    let tg_ref = &tg;
    assert!(
        eventually(Duration::from_secs(15), || async move {
            quiet_since.elapsed() > idle_timeout * 2 && open_connections(tg_ref).await == 1.0
        })
        .await,
        "the gateway connection was closed while answering pings"
    );
    allowed_check(&mut client).await;
    assert_eq!(open_connections(&tg).await, 1.0);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_past_the_bound_is_closed_at_once() {
    let mut config = test_config();
    config.server.limits.max_connections = 20;
    let mut tg = Tollgate::start(config).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(tg.grpc).await.expect("connect"));
    }
    let tg_ref = &tg;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            open_connections(tg_ref).await == 20.0
        })
        .await
    );
    let extra = TcpStream::connect(tg.grpc).await.expect("connect");
    assert!(closed_by_server(extra, Duration::from_secs(5)).await);
    let refused = metric(
        &metrics_text(tg.admin).await,
        "tollgate_listener_refused_total{listener=\"grpc\",reason=\"max_connections\"}",
    );
    assert_eq!(refused, Some(1.0));

    // Slots free up when connections close.
    drop(held);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            open_connections(tg_ref).await == 0.0
        })
        .await
    );
    let mut client = AuthorizationClient::new(tg.channel().await);
    allowed_check(&mut client).await;
    tg.stop().await;
}

/// The server's first SETTINGS frame as (identifier, value) pairs.
async fn server_settings(addr: std::net::SocketAddr) -> Vec<(u16, u32)> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).await.expect("preface");
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.expect("frame header");
    assert_eq!(head[3], 4, "first frame is SETTINGS");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.expect("settings");
    payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_bounds_are_advertised_and_oversized_input_is_refused() {
    let mut config = test_config();
    config.context.max_body_bytes = 16 * 1024;
    config.server.limits.max_message_bytes = 32 * 1024;
    config.server.limits.max_concurrent_streams = 64;
    config.server.limits.max_header_list_bytes = 8 * 1024;
    let mut tg = Tollgate::start(config).await;
    let settings = server_settings(tg.grpc).await;
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3), SETTINGS_MAX_HEADER_LIST_SIZE (0x6).
    assert!(settings.contains(&(0x3, 64)), "{settings:?}");
    assert!(settings.contains(&(0x6, 8 * 1024)), "{settings:?}");

    let mut client = AuthorizationClient::new(tg.channel().await);
    let big = format!(
        r#"{{"model":"llama-3-8b","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(40 * 1024)
    );
    let status = client
        .check(check_request(
            "POST",
            CHAT,
            &[("x-api-key", DEMO_PAID_KEY)],
            &big,
        ))
        .await
        .expect_err("a message over max_message_bytes is refused");
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );
    allowed_check(&mut client).await;

    let mut request = tonic::Request::new(check_request("GET", "/v1/models", &[], ""));
    request.metadata_mut().insert(
        "x-pad",
        "p".repeat(16 * 1024).parse().expect("metadata value"),
    );
    assert!(
        client.check(request).await.is_err(),
        "a header list over max_header_list_bytes is refused"
    );
    let mut client = AuthorizationClient::new(tg.channel().await);
    allowed_check(&mut client).await;
    tg.stop().await;
}
