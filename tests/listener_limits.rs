//! Resource limits of the gRPC listener (`[server.limits]`): 2,000 idle
//! connections neither starve a legitimate Check nor stay open past the idle
//! timeout; the connection bound refuses one more; the HTTP/2 settings are
//! advertised as configured; oversized messages and header lists, HTTP/2
//! rapid reset and CONTINUATION floods are refused and the listener keeps
//! serving.

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
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
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

/// One HTTP/2 frame: 9-byte header, then `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Writes `frames` after the client preface and reads until the server ends
/// the connection: the GOAWAY error code if it sent one (None on a bare
/// close), or Err when it is still open after 10 s.
async fn server_reply_to(addr: std::net::SocketAddr, frames: &[u8]) -> Result<Option<u32>, ()> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend_from_slice(frames);
    // The server may close mid-write; what it answered is read below.
    let _ = stream.write_all(&out).await;
    let read = async {
        let mut goaway = None;
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                return goaway;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return goaway;
            }
            if head[3] == GOAWAY && len >= 8 {
                goaway = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_and_continuation_floods_end_the_connection() {
    let mut tg = Tollgate::start(test_config()).await;
    // HPACK: :method POST (static 3), :scheme http (6), :path / (4).
    let block = [0x83, 0x86, 0x84];

    // Rapid reset: 200 streams opened and cancelled at once, far past
    // max_pending_accept_reset_streams (20).
    let mut burst = Vec::new();
    for i in 0..200u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let answer = server_reply_to(tg.grpc, &burst).await;
    // GOAWAY with ENHANCE_YOUR_CALM (0xb).
    assert_eq!(answer, Ok(Some(0xb)), "rapid reset");

    // CONTINUATION flood: one header block spread over 20,000 frames that
    // never ends it.
    let mut flood = frame(HEADERS, 0, 1, &block);
    for _ in 0..20_000 {
        flood.extend(frame(CONTINUATION, 0, 1, &[0x84]));
    }
    let answer = server_reply_to(tg.grpc, &flood).await;
    // h2 counts CONTINUATION frames per block against a cap derived from
    // the header list bound and answers with an error GOAWAY.
    assert!(
        matches!(answer, Ok(Some(code)) if code != 0),
        "CONTINUATION flood: {answer:?}"
    );

    // The listener serves the next client.
    let mut client = AuthorizationClient::new(tg.channel().await);
    allowed_check(&mut client).await;
    tg.stop().await;
}
