//! Tollgate as the MCP authorization point, over ext_authz on loopback
//! (issue 18, items 4, 7 and 8): the token's audience must be this resource
//! (RFC 8707) unless its issuer is configured relaxed; insufficient scope is
//! 403 naming every scope the call needs; tool-call quotas per caller, tool
//! and tenant in the memory and Redis stores, all-or-nothing; and the audit
//! record of each tool decision, which never holds an argument's value.

mod support;

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::jwt::{AUD, ISS, Idp, claims_with, keypair, mint, wait_ready};
use support::mcp::{McpAnswer, ask_mcp, mcp_section, tools_call as call};
use support::{DEMO_PAID_KEY, RedisServer, Tollgate, eventually, test_config};

const RESOURCE: &str = "https://mcp.example.com/mcp";
const OTHER_RESOURCE: &str = "https://other.example.com/mcp";
const RELAXED_ISS: &str = "https://relaxed.example.test/";

async fn ask(tg: &Tollgate, headers: &[(&str, &str)], body: &str) -> McpAnswer {
    ask_mcp(tg, support::check_request("POST", "/mcp", headers, body)).await
}

/// The example policies plus one letting users (JWT) list and call tools.
fn policies_with_users(dir: &Path) -> std::path::PathBuf {
    let to = dir.join("policies");
    std::fs::create_dir_all(&to).expect("mkdir");
    for entry in std::fs::read_dir(support::repo().join("policies")).expect("policies") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::write(
        to.join("mcp_users.cedar"),
        r#"@id("mcp-users-call-tools")
permit (
  principal is User,
  action in [Mcp::Action::"tools/list", Mcp::Action::"tools/call"],
  resource is Mcp::McpServer
);
"#,
    )
    .expect("write policy");
    to
}

fn mcp_config(extra: &str) -> tollgate::mcp::McpConfig {
    mcp_section(&format!(
        "[[mcp.servers]]\npath = \"/mcp\"\nserver = \"bank\"\nresource = \"{RESOURCE}\"\n{extra}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_must_name_this_resource_and_carry_every_scope_the_call_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, jwk) = keypair(dir.path(), "rsa", 2048, "k1");
    let idp = Idp::start().await;
    idp.jwks(&[&jwk]);
    let mut config = test_config();
    config.policy.dir = policies_with_users(dir.path());
    let audiences = format!("audiences = [\"{AUD}\", \"{RESOURCE}\", \"{OTHER_RESOURCE}\"]");
    let strict: tollgate::identity::jwt::IssuerConfig = toml::from_str(&format!(
        "name = \"strict\"\nissuer = \"{ISS}\"\n{audiences}\njwks_url = \"{}\"\n",
        idp.url("/jwks")
    ))
    .expect("issuer");
    let relaxed: tollgate::identity::jwt::IssuerConfig = toml::from_str(&format!(
        "name = \"relaxed\"\nissuer = \"{RELAXED_ISS}\"\n{audiences}\njwks_url = \"{}\"\nrelaxed_audience = true\n",
        idp.url("/jwks")
    ))
    .expect("issuer");
    config.identity.jwt_issuers = vec![strict, relaxed];
    config.mcp =
        mcp_config("scopes = [\"mcp:tools\"]\ntool_scopes = { transfer = [\"bank:write\"] }");
    let tg = Tollgate::start(config).await;
    assert!(wait_ready(tg.admin, 200, Duration::from_secs(10)).await);

    let token = |patch: Value| mint(&signer, &claims_with(patch));
    let all_scopes = "mcp:tools bank:write";
    let transfer = call("transfer", json!({"amount": 5, "to": "bob"}));
    let balance = call("get_balance", json!({"account": "a-1"}));
    // (case, token, body, status, reason)
    let rows: Vec<(&str, String, &str, u16, &str)> = vec![
        (
            "aud is this resource",
            token(json!({"aud": RESOURCE, "scope": all_scopes})),
            &transfer,
            200,
            "",
        ),
        (
            "aud lists this resource",
            token(json!({"aud": [AUD, RESOURCE], "scope": all_scopes})),
            &transfer,
            200,
            "",
        ),
        (
            "aud is another MCP resource",
            token(json!({"aud": OTHER_RESOURCE, "scope": all_scopes})),
            &transfer,
            401,
            "wrong_audience",
        ),
        (
            "aud is not a resource",
            token(json!({"aud": AUD, "scope": all_scopes})),
            &transfer,
            401,
            "wrong_audience",
        ),
        (
            "no aud, strict issuer",
            token(json!({"aud": null, "scope": all_scopes})),
            &transfer,
            401,
            "invalid_credential",
        ),
        (
            "no aud, relaxed issuer",
            token(json!({"aud": null, "iss": RELAXED_ISS, "scope": all_scopes})),
            &transfer,
            200,
            "",
        ),
        (
            "other aud, relaxed issuer",
            token(json!({"aud": OTHER_RESOURCE, "iss": RELAXED_ISS, "scope": all_scopes})),
            &transfer,
            200,
            "",
        ),
        (
            "tool scope missing",
            token(json!({"aud": RESOURCE, "scope": "mcp:tools"})),
            &transfer,
            403,
            "insufficient_scope",
        ),
        (
            "tool without own scopes",
            token(json!({"aud": RESOURCE, "scope": "mcp:tools"})),
            &balance,
            200,
            "",
        ),
        (
            "endpoint scope missing",
            token(json!({"aud": RESOURCE, "scope": "bank:write"})),
            &balance,
            403,
            "insufficient_scope",
        ),
    ];
    for (case, jwt, body, status, reason) in rows {
        let auth = format!("Bearer {jwt}");
        let a = ask(&tg, &[("authorization", &auth)], body).await;
        assert_eq!(a.status, status, "{case}: {}", a.body);
        if status == 200 {
            // The client's token is never passed to the MCP server.
            assert!(a.removed.iter().any(|h| h == "authorization"), "{case}");
            continue;
        }
        assert_eq!(a.body["error"]["data"]["reason"], json!(reason), "{case}");
        // A 401 is decided before the body is read: no id to answer under.
        let id = if status == 401 { json!(null) } else { json!(3) };
        assert_eq!(a.body["id"], id, "{case}");
        let challenge = a
            .headers
            .get("www-authenticate")
            .cloned()
            .unwrap_or_default();
        let metadata = "resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\"";
        assert!(challenge.contains(metadata), "{case}: {challenge}");
        match status {
            401 => assert!(
                challenge.contains("error=\"invalid_token\""),
                "{case}: {challenge}"
            ),
            _ => {
                // Every scope the operation needs, the endpoint's and the tool's.
                let want = if body == transfer.as_str() {
                    "scope=\"mcp:tools bank:write\""
                } else {
                    "scope=\"mcp:tools\""
                };
                assert!(
                    challenge.contains("error=\"insufficient_scope\"") && challenge.contains(want),
                    "{case}: {challenge}"
                );
            }
        }
    }
}

const TOOL_RULES: &str = r#"
[[rules]]
name = "calls-per-caller-and-tool"
per = ["key", "tool"]
unit = "minute"
requests_per_unit = 2

[[rules]]
name = "tool-calls-per-tenant"
per = ["tenant"]
unit = "minute"
requests_per_unit = 3
"#;

fn quota_config(redis_url: Option<String>) -> tollgate::config::Config {
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<tollgate::quota::rules::QuotaRule>,
    }
    let mut config = test_config();
    config.mcp = mcp_config("");
    config.quota.rules = toml::from_str::<Rules>(TOOL_RULES).expect("rules").rules;
    if let Some(url) = redis_url {
        config.quota.store = tollgate::config::StoreKind::Redis;
        config.quota.redis_url = url;
    }
    config
}

/// Two transfers, then the third is over the caller's per-tool limit; the
/// refused call charged nothing, so the tenant's limit of three still lets
/// one more tool call (another tool: its own counter) through, then refuses.
async fn tool_quota_scenario(tg: &Tollgate) {
    let key = [("x-api-key", DEMO_PAID_KEY)];
    let transfer = call("transfer", json!({"amount": 5, "to": "bob"}));
    let balance = call("get_balance", json!({"account": "a-1"}));
    for i in 0..2 {
        assert_eq!(ask(tg, &key, &transfer).await.status, 200, "transfer {i}");
    }
    let over = ask(tg, &key, &transfer).await;
    over.assert_over_quota("calls-per-caller-and-tool", "transfer", 60);
    // All-or-nothing: the refused transfer did not count for the tenant.
    assert_eq!(ask(tg, &key, &balance).await.status, 200);
    let tenant_over = ask(tg, &key, &balance).await;
    assert_eq!(tenant_over.status, 429, "{}", tenant_over.body);
    assert_eq!(
        tenant_over.body["error"]["data"]["rule"],
        json!("tool-calls-per-tenant")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_limited_per_caller_tool_and_tenant_in_memory() {
    let tg = Tollgate::start(quota_config(None)).await;
    tool_quota_scenario(&tg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_limited_per_caller_tool_and_tenant_in_redis() {
    let redis = RedisServer::start();
    let tg = Tollgate::start(quota_config(Some(redis.url()))).await;
    tg.wait_for_store().await;
    tool_quota_scenario(&tg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tool_decision_is_audited_with_argument_hashes_never_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let mut config = quota_config(None);
    config.audit.enabled = true;
    config.audit.path = path.clone();
    let tg = Tollgate::start(config).await;
    let key = [("x-api-key", DEMO_PAID_KEY)];
    let secret = "sekrit-recipient-7731";
    let allowed = ask(
        &tg,
        &key,
        &call("transfer", json!({"amount": 5, "to": secret})),
    )
    .await;
    assert_eq!(allowed.status, 200);
    let denied = ask(
        &tg,
        &key,
        &call("transfer", json!({"amount": 5000, "to": secret})),
    )
    .await;
    assert_eq!(denied.status, 403);

    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(5), || async {
            read().lines().count() >= 2
        })
        .await,
        "{}",
        read()
    );
    let text = read();
    assert!(
        !text.contains(secret),
        "an argument value is in the trail: {text}"
    );
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let hash = |v: &Value| hex::encode(Sha256::digest(v.to_string().as_bytes()));
    for (record, decision, amount) in [(&records[0], "allow", 5), (&records[1], "deny", 5000)] {
        assert_eq!(record["v"], json!(2), "{record}");
        assert_eq!(record["decision"], json!(decision), "{record}");
        let mcp = &record["mcp"];
        assert_eq!(mcp["method"], json!("tools/call"), "{record}");
        assert_eq!(mcp["tool"], json!("transfer"), "{record}");
        assert_eq!(mcp["server"], json!("Mcp::McpServer::\"bank\""), "{record}");
        assert_eq!(
            mcp["caller_chain"],
            json!([{"role": "principal", "identity": "ApiKey::\"demo-paid\""}]),
            "{record}"
        );
        assert_eq!(
            mcp["argument_sha256"],
            json!({"amount": hash(&json!(amount)), "to": hash(&json!(secret))}),
            "{record}"
        );
        assert_eq!(record["action"], json!("Mcp::Action::\"transfer\""));
    }
    // The determining policies and the quota outcome of each.
    assert_eq!(records[0]["policies"], json!(["mcp-paid-keys-transfer"]));
    assert_eq!(records[0]["quota"]["outcome"], json!("charged"));
    assert_eq!(
        records[1]["policies"],
        json!(["mcp-large-transfer-enterprise-only"])
    );
    assert_eq!(records[1]["quota"]["outcome"], json!("none"));
}

/// With `audit.hash_key`, argument hashes are HMAC-SHA256 under that key
/// (RFC 2104): a low-entropy value cannot be found by hashing guesses
/// without it. A key shorter than 32 bytes stops start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_argument_hashes_need_the_key() {
    use hmac::{Hmac, Mac};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let key_path = dir.path().join("audit-hash.key");
    let secret_key = b"0123456789abcdef0123456789abcdef-audit-hash-key";
    std::fs::write(&key_path, secret_key).expect("key");
    let mut config = quota_config(None);
    config.audit.enabled = true;
    config.audit.path = path.clone();
    config.audit.hash_key = Some(key_path.clone());
    let mut tg = Tollgate::start(config.clone()).await;
    let key = [("x-api-key", DEMO_PAID_KEY)];
    let allowed = ask(
        &tg,
        &key,
        &call("transfer", json!({"amount": 5, "to": "bob"})),
    )
    .await;
    assert_eq!(allowed.status, 200);
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(5), || async {
            read().lines().count() >= 1
        })
        .await,
        "{}",
        read()
    );
    let record: Value =
        serde_json::from_str(read().lines().next().expect("a record")).expect("json");
    let mcp = &record["mcp"];
    let hmac = |v: &Value| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret_key).expect("key");
        mac.update(v.to_string().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    assert_eq!(
        mcp["argument_hmac_sha256"],
        json!({"amount": hmac(&json!(5)), "to": hmac(&json!("bob"))}),
        "{record}"
    );
    // The plain hash of the guess "5" is nowhere in the record.
    let plain = hex::encode(Sha256::digest(b"5"));
    assert!(!record.to_string().contains(&plain), "{record}");
    assert_eq!(mcp["argument_sha256"], json!({}), "{record}");
    tg.stop().await;

    std::fs::write(&key_path, b"too short").expect("short key");
    let refused = tollgate::server::App::build(config);
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("audit.hash_key") && message.contains("fewer than 32"),
        "{message}"
    );
}

/// The real binary's log at debug level, JSON lines, over allowed and
/// refused tool calls (policy, typing, header mismatch, metadata): no
/// argument value appears in it, while the decisions are logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_values_never_reach_the_log() {
    let secret = "sekrit-recipient-7731";
    let tg = support::TollgateProcess::start(
        &support::repo().join("policies"),
        "",
        "watch = false\n[log]\nformat = \"json\"\nlevel = \"debug\"\n[mcp]\n[[mcp.servers]]\npath = \"/mcp\"\nserver = \"bank\"\n",
    )
    .await;
    let mut client = AuthorizationClient::new(tg.channel().await);
    let key = ("x-api-key", DEMO_PAID_KEY);
    let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (
            vec![key],
            call("transfer", json!({"amount": 5, "to": secret})),
        ),
        (
            vec![key],
            call("transfer", json!({"amount": 5000, "to": secret})),
        ),
        (
            vec![key],
            call("transfer", json!({"amount": secret, "to": secret})),
        ),
        (
            vec![key, ("mcp-method", "tools/call"), ("mcp-param-to", "eve")],
            call("transfer", json!({"amount": 5, "to": secret})),
        ),
        (
            vec![key],
            call("get_balance", json!({"account": {"nested": secret}})),
        ),
    ];
    for (headers, body) in &cases {
        client
            .check(support::check_request("POST", "/mcp", headers, body))
            .await
            .expect("check");
    }
    let log = tg.log();
    assert!(
        eventually(Duration::from_secs(5), || async {
            tg.log().matches("\"decision\"").count() >= cases.len()
        })
        .await,
        "{log}"
    );
    let log = tg.log();
    assert!(
        !log.contains(secret),
        "an argument value is in the log: {log}"
    );
}
