//! OAuth 2.0 token introspection (RFC 7662) against an introspection server
//! the test starts on loopback (axum): claims mapping, positive and negative
//! caching, one introspection per token under concurrency, the rate bound,
//! and every bad answer (slow, huge, not JSON, down) refused, never
//! allowed, with readiness following the endpoint.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use support::{
    Tollgate, check_request, eventually, ext_authz, metrics_text, raw_http, test_config,
};
use tollgate::identity::introspection::IntrospectionConfig;

const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"llama-3-8b","messages":[]}"#;
/// `client_secret_basic` for client `tollgate`, secret `s3cret:+/`
/// (form-encoded before base64, RFC 6749 §2.3.1).
const EXPECTED_AUTH: &str = "Basic dG9sbGdhdGU6czNjcmV0JTNBJTJCJTJG";

/// How the server answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    Slow,
    Huge,
    NotJson,
    Error,
}

struct Server {
    tokens: Mutex<HashMap<String, serde_json::Value>>,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
    calls: AtomicU64,
}

async fn introspect(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(EXPECTED_AUTH) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let token = url::form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if token == "tollgate-readiness-probe" {
        // Probes are not counted as introspections of a request's token.
        return match *s.mode.lock().expect("mode") {
            Mode::Error => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            _ => axum::Json(serde_json::json!({"active": false})).into_response(),
        };
    }
    s.calls.fetch_add(1, Ordering::SeqCst);
    let delay = *s.delay.lock().expect("delay");
    tokio::time::sleep(delay).await;
    let mode = *s.mode.lock().expect("mode");
    match mode {
        Mode::Slow => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            axum::Json(serde_json::json!({"active": true, "sub": "slow"})).into_response()
        }
        Mode::Huge => {
            format!("{{\"active\":true,\"pad\":\"{}\"}}", "x".repeat(200_000)).into_response()
        }
        Mode::NotJson => "<html>active</html>".into_response(),
        Mode::Error => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Mode::Normal => {
            let answer = s
                .tokens
                .lock()
                .expect("tokens")
                .get(&token)
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"active": false}));
            axum::Json(answer).into_response()
        }
    }
}

async fn start_server() -> (Arc<Server>, SocketAddr, tokio::task::JoinHandle<()>) {
    let state = Arc::new(Server {
        tokens: Mutex::new(HashMap::new()),
        mode: Mutex::new(Mode::Normal),
        delay: Mutex::new(Duration::ZERO),
        calls: AtomicU64::new(0),
    });
    let app = axum::Router::new()
        .route("/introspect", axum::routing::post(introspect))
        .with_state(state.clone());
    let (addr, task) = support::serve_axum(app).await;
    (state, addr, task)
}

fn config_for(addr: SocketAddr, dir: &tempfile::TempDir, rate: u64) -> tollgate::config::Config {
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "s3cret:+/\n").expect("secret");
    let mut config = test_config();
    config.identity.introspection = Some(IntrospectionConfig {
        name: "test-as".into(),
        endpoint: format!("http://{addr}/introspect"),
        client_id: "tollgate".into(),
        client_secret_file: secret,
        issuer: Some("https://as.example".into()),
        audiences: vec!["llm-gateway".into()],
        claims: Default::default(),
        timeout_ms: 300,
        max_response_bytes: 16 * 1024,
        cache_max_secs: 300,
        negative_cache_secs: 300,
        max_requests_per_sec: rate,
        max_token_bytes: 4096,
        probe_secs: 1,
    });
    config
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn active(sub: Option<&str>, exp: u64, aud: &str) -> serde_json::Value {
    let mut v = serde_json::json!({
        "active": true, "iss": "https://as.example", "aud": [aud, "other"],
        "exp": exp, "scope": "llm:generate profile", "client_id": "partner-app",
        "tenant": "acme", "tier": "paid",
    });
    if let Some(s) = sub {
        v["sub"] = serde_json::json!(s);
    }
    v
}

async fn check_token(tg: &Tollgate, token: &str) -> support::Verdict {
    let auth = format!("Bearer {token}");
    let req = check_request(
        "POST",
        CHAT,
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        BODY,
    );
    ext_authz(tg, req).await
}

fn principal(v: &support::Verdict) -> Option<&str> {
    v.upstream_headers
        .iter()
        .find(|(k, _)| k == "x-tollgate-principal")
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_are_introspected_mapped_and_cached() {
    let (server, addr, _task) = start_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut t = server.tokens.lock().expect("tokens");
        t.insert(
            "opaque-alice".into(),
            active(Some("alice"), now() + 600, "llm-gateway"),
        );
        t.insert(
            "opaque-client".into(),
            active(None, now() + 600, "llm-gateway"),
        );
        t.insert(
            "opaque-expired".into(),
            active(Some("bob"), now() - 5, "llm-gateway"),
        );
        t.insert(
            "opaque-wrong-aud".into(),
            active(Some("eve"), now() + 600, "billing"),
        );
    }
    let mut tg = Tollgate::start(config_for(addr, &dir, 100)).await;

    let ok = check_token(&tg, "opaque-alice").await;
    assert_eq!(ok.status, 200, "{}", ok.code);
    assert_eq!(principal(&ok), Some("User::\"alice\""));
    let client = check_token(&tg, "opaque-client").await;
    assert_eq!(principal(&client), Some("User::\"partner-app\""));
    let calls = server.calls.load(Ordering::SeqCst);
    assert_eq!(check_token(&tg, "opaque-alice").await.status, 200);
    assert_eq!(
        server.calls.load(Ordering::SeqCst),
        calls,
        "active answer cached"
    );

    for token in ["opaque-expired", "opaque-wrong-aud", "opaque-unknown"] {
        let v = check_token(&tg, token).await;
        assert_eq!(
            (v.status, v.code.as_str()),
            (401, "invalid_credential"),
            "{token}"
        );
    }
    let calls = server.calls.load(Ordering::SeqCst);
    assert_eq!(check_token(&tg, "opaque-unknown").await.status, 401);
    assert_eq!(
        server.calls.load(Ordering::SeqCst),
        calls,
        "inactive answer cached"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_introspection() {
    let (server, addr, _task) = start_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    server.tokens.lock().expect("tokens").insert(
        "opaque-shared".into(),
        active(Some("carol"), now() + 600, "llm-gateway"),
    );
    *server.delay.lock().expect("delay") = Duration::from_millis(150);
    let tg = Arc::new(Tollgate::start(config_for(addr, &dir, 100)).await);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let tg = tg.clone();
            tokio::spawn(async move { check_token(&tg, "opaque-shared").await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_introspection_rate_is_bounded() {
    let (_server, addr, _task) = start_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Arc::new(Tollgate::start(config_for(addr, &dir, 2)).await);
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let tg = tg.clone();
            tokio::spawn(async move { check_token(&tg, &format!("opaque-spray-{i}")).await })
        })
        .collect();
    let mut unavailable = 0;
    for t in tasks {
        let v = t.await.expect("task");
        assert_ne!(v.status, 200, "a sprayed token is never allowed");
        if v.code == "unavailable" {
            assert_eq!(v.status, 503);
            unavailable += 1;
        }
    }
    assert!(unavailable >= 4, "at most 2 per second reach the endpoint");
    let text = metrics_text(tg.admin).await;
    assert!(text.contains("tollgate_introspections_total{result=\"rate_limited\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_and_a_down_endpoint_fail_closed() {
    let (server, addr, task) = start_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tg = Tollgate::start(config_for(addr, &dir, 100)).await;
    let admin = tg.admin;
    let ready =
        move || async move { raw_http(admin, "GET", "/readyz", &[], "").await.status == 200 };
    let unready = move || async move { !ready().await };
    assert!(
        eventually(Duration::from_secs(10), ready).await,
        "ready once probed"
    );

    for (i, mode) in [Mode::Slow, Mode::Huge, Mode::NotJson, Mode::Error]
        .into_iter()
        .enumerate()
    {
        *server.mode.lock().expect("mode") = mode;
        let v = check_token(&tg, &format!("opaque-bad-{i}")).await;
        assert_eq!(
            (v.status, v.code.as_str()),
            (503, "unavailable"),
            "mode {i}"
        );
    }
    // The endpoint erroring makes Tollgate unready; nothing was cached, so
    // the same tokens are asked again once it answers.
    assert!(
        eventually(Duration::from_secs(10), unready).await,
        "unready while the endpoint fails"
    );
    *server.mode.lock().expect("mode") = Mode::Normal;
    server.tokens.lock().expect("tokens").insert(
        "opaque-bad-3".into(),
        active(Some("dave"), now() + 600, "llm-gateway"),
    );
    assert_eq!(check_token(&tg, "opaque-bad-3").await.status, 200);
    assert!(eventually(Duration::from_secs(10), ready).await);

    // Down altogether.
    task.abort();
    let _ = task.await;
    let v = check_token(&tg, "opaque-after-down").await;
    assert_eq!((v.status, v.code.as_str()), (503, "unavailable"));
    assert!(
        eventually(Duration::from_secs(10), unready).await,
        "unready while the endpoint is down"
    );
    tg.stop().await;
}
