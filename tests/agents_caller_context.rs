//! The signed caller context across hops (issue 18, item 6), over Envoy's
//! ext_authz gRPC on loopback: a chat request allowed for a key yields a
//! context; the agent runtime (mTLS `Service`) presenting it to a tool route
//! is decided as the original caller with `context.agent`; every way of
//! presenting a bad one is refused; a service carrying a user's JWT is
//! decided as the user with `context.via`, only when allowed to carry.

mod support;

use std::time::{Duration, SystemTime};

use support::agents::{
    CC, RUNTIME, SEED_NEW, SEED_OLD, SEED_RETIRED, SEED_STRANGER, one_key, paid_claims,
};
use support::{DEMO_PAID_KEY, Tollgate, check_request, ext_authz, set_source, test_config};
use tollgate::routes::RouteSpec;

async fn start(dir: &std::path::Path, max_uses: u64) -> Tollgate {
    start_with(dir, max_uses, |_| {}).await
}

async fn start_with(
    dir: &std::path::Path,
    max_uses: u64,
    adjust: impl FnOnce(&mut tollgate::config::Config),
) -> Tollgate {
    let rfc = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let now = SystemTime::now();
    // Rotation: "old" is in its overlap (verifies, no longer signs),
    // "retired" is past it, "new" signs.
    let keys = format!(
        "[[keys]]\nkid = \"retired\"\nseed = \"{SEED_RETIRED}\"\nretire_at = \"{}\"\n\
         [[keys]]\nkid = \"old\"\nseed = \"{SEED_OLD}\"\nretire_at = \"{}\"\n\
         [[keys]]\nkid = \"new\"\nseed = \"{SEED_NEW}\"\n",
        rfc(now - Duration::from_secs(5)),
        rfc(now + Duration::from_secs(3600)),
    );
    std::fs::write(dir.join("cc.toml"), keys).expect("keys");
    let mut config = test_config();
    config.agents.tools.enabled = true;
    config.agents.caller_context.keys_file = Some(dir.join("cc.toml"));
    config.agents.caller_context.max_uses = max_uses;
    config.audit.enabled = true;
    config.audit.path = dir.join("audit.jsonl");
    config.identity.mtls_trust_domains = vec!["acme.example".into()];
    let mut routes = RouteSpec::openai_defaults();
    routes.push(
        toml::from_str(
            "method = \"POST\"\npath = \"/tools/{tool}\"\naction = \"invoke_tool\"\nresource = 'Tool::\"{path.tool}\"'\n",
        )
        .expect("route"),
    );
    config.routes = routes;
    adjust(&mut config);
    Tollgate::start(config).await
}

/// The kids the admin JWK Set publishes.
async fn published_kids(tg: &Tollgate) -> Vec<String> {
    let jwks = support::raw_http(
        tg.admin,
        "GET",
        "/.well-known/tollgate-caller-context-jwks.json",
        &[],
        "",
    )
    .await
    .json();
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str().map(str::to_string))
        .collect()
}

/// Rotating the keys file needs no restart: a changed file is swapped in
/// (its new key verifies and is published); a broken one is refused and
/// the last good keys keep verifying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_context_keys_are_reloaded_when_their_file_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = start_with(dir.path(), 100, |c| {
        c.policy.watch = true;
        c.policy.reload_debounce_ms = 50;
        c.policy.reload_poll_secs = 1;
    })
    .await;
    let now = SystemTime::now();
    let token = one_key("rotated-in", SEED_STRANGER)
        .sign(&paid_claims("rid-k", &["get_weather"], now))
        .expect("sign");
    let (status, code, _) = hop(&tg, "get_weather", &[&token]).await;
    assert_eq!((status, code.as_str()), (401, "invalid_caller_context"));

    // "new" keeps verifying for an overlap; "rotated-in" signs from now on.
    let later = humantime::format_rfc3339_seconds(now + Duration::from_secs(3600));
    std::fs::write(
        dir.path().join("cc.toml"),
        format!(
            "[[keys]]\nkid = \"new\"\nseed = \"{SEED_NEW}\"\nretire_at = \"{later}\"\n\
             [[keys]]\nkid = \"rotated-in\"\nseed = \"{SEED_STRANGER}\"\n"
        ),
    )
    .expect("rotate");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while published_kids(&tg).await != ["new", "rotated-in"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated keys file was never loaded: {:?}",
            published_kids(&tg).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(hop(&tg, "get_weather", &[&token]).await.0, 200);

    // A broken file: refused, counted, the last good keys stay.
    std::fs::write(dir.path().join("cc.toml"), "[[keys]]\nkid = 1\n").expect("break");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let rejected = "tollgate_reloads_total{source=\"caller_context_keys\",result=\"rejected\"}";
    while support::metric_prefix(&support::metrics_text(tg.admin).await, rejected) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken keys file was never refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(published_kids(&tg).await, ["new", "rotated-in"]);
    let again = one_key("rotated-in", SEED_STRANGER)
        .sign(&paid_claims("rid-k2", &["get_weather"], now))
        .expect("sign");
    assert_eq!(hop(&tg, "get_weather", &[&again]).await.0, 200);
}

/// A hop from the runtime (mTLS) to tool `tool` with caller-context header
/// values `cc`: (HTTP status, reason code, upstream principal header).
async fn hop(tg: &Tollgate, tool: &str, cc: &[&str]) -> (u16, String, Option<String>) {
    let headers: Vec<(&str, &str)> = cc.iter().map(|v| (CC, *v)).collect();
    let mut req = check_request("POST", &format!("/tools/{tool}"), &headers, "{}");
    set_source(&mut req, Some("127.0.0.1"), RUNTIME, "");
    let v = ext_authz(tg, req).await;
    let principal = v
        .upstream_headers
        .iter()
        .find(|(k, _)| k == "x-tollgate-principal")
        .map(|(_, v)| v.clone());
    (v.status, v.code, principal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_context_keeps_the_original_caller_across_the_hop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tg = start(dir.path(), 2).await;

    // The chat request: allowed, and the upstream (the agent runtime) gets a
    // context bound to the callable tools.
    let body = r#"{"model":"llama-3-8b","max_tokens":16,"messages":[],"tools":[{"type":"function","function":{"name":"get_weather"}}]}"#;
    let chat = check_request(
        "POST",
        "/v1/chat/completions",
        &[
            ("x-api-key", DEMO_PAID_KEY),
            ("content-type", "application/json"),
        ],
        body,
    );
    let v = ext_authz(&tg, chat).await;
    assert_eq!(v.status, 200, "{}", v.code);
    let issued = v
        .upstream_headers
        .iter()
        .find(|(k, _)| k == CC)
        .map(|(_, t)| t.clone())
        .expect("a caller context for the upstream");

    // Own tenant's tool, as the original caller.
    let (status, code, principal) = hop(&tg, "get_weather", &[&issued]).await;
    assert_eq!((status, code.as_str()), (200, "allowed"));
    assert_eq!(principal.as_deref(), Some(r#"ApiKey::"demo-paid""#));
    // Used twice (max_uses = 2): the third use is a replay.
    assert_eq!(hop(&tg, "get_weather", &[&issued]).await.0, 200);
    let (status, code, _) = hop(&tg, "get_weather", &[&issued]).await;
    assert_eq!((status, code.as_str()), (403, "caller_context_refused"));

    // Another tenant's tool: refused, even with a context naming it.
    let now = SystemTime::now();
    let new = one_key("new", SEED_NEW);
    let other = new
        .sign(&paid_claims("rid-other", &["globex_crm"], now))
        .expect("sign");
    let (status, _, _) = hop(&tg, "globex_crm", &[&other]).await;
    assert_eq!(status, 403);
    // A tool the context does not name: refused.
    let fresh = new
        .sign(&paid_claims("rid-fresh", &["get_weather"], now))
        .expect("sign");
    let (status, code, _) = hop(&tg, "search_docs", &[&fresh]).await;
    assert_eq!((status, code.as_str()), (403, "tool_forbidden"));

    // Without a context the runtime is only itself: no tenant, no tool.
    let (status, code, _) = hop(&tg, "get_weather", &[]).await;
    assert_eq!((status, code.as_str()), (403, "policy_denied"));

    // Refused contexts, each a 401 invalid_caller_context.
    let (h, rest) = fresh.split_once('.').expect("jws");
    let (p, s) = rest.split_once('.').expect("jws");
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let mut globex = paid_claims("rid-fresh", &["get_weather"], now);
    globex.tenant = Some("globex".into());
    let tampered = format!(
        "{h}.{}.{s}",
        b64(&serde_json::to_vec(&globex).expect("json"))
    );
    let expired = new
        .sign(&paid_claims(
            "rid-exp",
            &["get_weather"],
            now - Duration::from_secs(600),
        ))
        .expect("sign");
    let stranger = one_key("new", SEED_STRANGER)
        .sign(&paid_claims("rid-s", &["get_weather"], now))
        .expect("sign");
    let alg_none = format!(
        "{}.{p}.",
        b64(br#"{"alg":"none","kid":"new","typ":"tollgate-caller-context"}"#)
    );
    let other_kid = format!(
        "{}.{p}.{s}",
        b64(br#"{"alg":"EdDSA","kid":"old","typ":"tollgate-caller-context"}"#)
    );
    let retired = one_key("retired", SEED_RETIRED)
        .sign(&paid_claims("rid-r", &["get_weather"], now))
        .expect("sign");
    let merged = format!("{fresh},{fresh}");
    for (what, token) in [
        ("tampered", tampered.as_str()),
        ("expired", &expired),
        ("other key", &stranger),
        ("alg none", &alg_none),
        ("another key's kid", &other_kid),
        ("rotated past the overlap", &retired),
        ("merged header", &merged),
        ("garbage", "not-a-jws"),
    ] {
        let (status, code, _) = hop(&tg, "get_weather", &[token]).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "invalid_caller_context"),
            "{what}"
        );
    }
    // A key in its rotation overlap still verifies.
    let overlap = one_key("old", SEED_OLD)
        .sign(&paid_claims("rid-o", &["get_weather"], now))
        .expect("sign");
    assert_eq!(hop(&tg, "get_weather", &[&overlap]).await.0, 200);
    // The untouched context still works: the refusals did not use it up.
    assert_eq!(hop(&tg, "get_weather", &[&fresh]).await.0, 200);

    // A context presented with an API key instead of the runtime's mTLS
    // identity is not a hop.
    let req = check_request(
        "POST",
        "/tools/get_weather",
        &[(CC, &fresh), ("x-api-key", DEMO_PAID_KEY)],
        "{}",
    );
    let v = ext_authz(&tg, req).await;
    assert_eq!((v.status, v.code.as_str()), (403, "caller_context_refused"));

    // The JWKS publishes the signing key and the one in its overlap only.
    assert_eq!(published_kids(&tg).await, ["old", "new"]);

    // The audit record of a hop names who acted: the original caller, then
    // the runtime (shutdown flushes the queue).
    tg.stop().await;
    let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit file");
    let hops: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["path"] == "/tools/get_weather" && r["decision"] == "allow")
        .collect();
    assert!(!hops.is_empty(), "no audited hop in {text}");
    for r in &hops {
        assert_eq!(
            r["caller_chain"],
            serde_json::json!([
                {"role": "principal", "identity": r#"ApiKey::"demo-paid""#},
                {"role": "agent", "identity": RUNTIME},
            ]),
            "{r}"
        );
    }
    // A plain request (the chat) has no chain beyond its principal.
    assert!(
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|r| r["path"] == "/v1/chat/completions" && r["caller_chain"].is_null())
    );
}

/// Without `[agents.caller_context]`, a client's caller-context header is
/// not read: the request is decided as before, and no context is added
/// (the client copy is removed with every `x-tollgate-` header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_the_header_is_ignored_and_stripped() {
    let tg = Tollgate::start(test_config()).await;
    let req = check_request(
        "POST",
        "/v1/chat/completions",
        &[("x-api-key", DEMO_PAID_KEY), (CC, "forged.forged.forged")],
        r#"{"model":"llama-3-8b","max_tokens":16,"messages":[]}"#,
    );
    let v = ext_authz(&tg, req).await;
    assert_eq!((v.status, v.code.as_str()), (200, "allowed"));
    assert!(!v.upstream_headers.iter().any(|(k, _)| k == CC));
}
