//! Signed caller contexts on MCP endpoints (issue 18, items 6 and 7), over
//! ext_authz gRPC on loopback: the agent runtime (mTLS `Service`) calling a
//! tool with a caller context is decided as the original caller with
//! `context.agent`, bound to the context's tools; without one it is only
//! itself; `per = ["caller_context", "tool"]` limits calls of a tool per
//! originating request, all-or-nothing with the other limits, in memory and
//! Redis; the audit record's caller chain names the caller, then the runtime.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use support::agents::{CC, RUNTIME, SEED_NEW, one_key, paid_claims};
use support::mcp::{McpAnswer, ask_mcp, mcp_section, tools_call};
use support::{RedisServer, Tollgate, check_request, set_source, test_config};

/// A second MCP server, `globex-ledger`, that only globex's callers may use.
const GLOBEX_ONLY: &str = r#"@id("globex-ledger-own-tenant")
forbid (
  principal,
  action in Mcp::Action::"tools/call",
  resource == Mcp::McpServer::"globex-ledger"
)
unless { principal has tenant && principal.tenant == Tenant::"globex" };
"#;

const RULES: &str = r#"
[[rules]]
name = "transfers-per-originating-request"
per = ["caller_context", "tool"]
actions = ["transfer"]
unit = "day"
requests_per_unit = 2

[[rules]]
name = "tool-calls-per-tenant"
per = ["tenant"]
unit = "minute"
requests_per_unit = 5
"#;

/// The example policies (with `schema` transformed) plus [`GLOBEX_ONLY`].
fn policies(dir: &Path, schema: impl Fn(String) -> String) -> PathBuf {
    let to = dir.join("policies");
    std::fs::create_dir_all(&to).expect("mkdir");
    for entry in std::fs::read_dir(support::repo().join("policies")).expect("policies") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let text = std::fs::read_to_string(to.join("schema.cedarschema")).expect("schema");
    std::fs::write(to.join("schema.cedarschema"), schema(text)).expect("schema");
    std::fs::write(to.join("globex.cedar"), GLOBEX_ONLY).expect("policy");
    to
}

struct Setup {
    redis: Option<String>,
    rules: bool,
    schema: fn(String) -> String,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            redis: None,
            rules: false,
            schema: |s| s,
        }
    }
}

async fn start(dir: &Path, setup: Setup) -> Tollgate {
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<tollgate::quota::rules::QuotaRule>,
    }
    std::fs::write(
        dir.join("cc.toml"),
        format!("[[keys]]\nkid = \"new\"\nseed = \"{SEED_NEW}\"\n"),
    )
    .expect("keys");
    let mut config = test_config();
    config.policy.dir = policies(dir, setup.schema);
    config.agents.caller_context.keys_file = Some(dir.join("cc.toml"));
    config.identity.mtls_trust_domains = vec!["acme.example".into()];
    config.mcp = mcp_section(
        "[[mcp.servers]]\npath = \"/mcp\"\nserver = \"bank\"\n\
         [[mcp.servers]]\npath = \"/globex/mcp\"\nserver = \"globex-ledger\"\n",
    );
    config.audit.enabled = true;
    config.audit.path = dir.join("audit.jsonl");
    if setup.rules {
        config.quota.rules = toml::from_str::<Rules>(RULES).expect("rules").rules;
    }
    if let Some(url) = setup.redis {
        config.quota.store = tollgate::config::StoreKind::Redis;
        config.quota.redis_url = url;
    }
    Tollgate::start(config).await
}

/// A context issued to the demo paid key (tenant acme) for request `rid`,
/// callable tools `get_balance` and `transfer`.
fn context(rid: &str) -> String {
    one_key("new", SEED_NEW)
        .sign(&paid_claims(
            rid,
            &["get_balance", "transfer"],
            SystemTime::now(),
        ))
        .expect("sign")
}

/// The runtime (mTLS) calling `tool` at `path`, with caller context `cc`.
async fn runtime_call(
    tg: &Tollgate,
    path: &str,
    cc: Option<&str>,
    tool: &str,
    args: Value,
) -> McpAnswer {
    let headers: Vec<(&str, &str)> = cc.iter().map(|t| (CC, *t)).collect();
    let mut req = check_request("POST", path, &headers, &tools_call(tool, args));
    set_source(&mut req, Some("127.0.0.1"), RUNTIME, "");
    ask_mcp(tg, req).await
}

fn reason(a: &McpAnswer) -> &str {
    a.body["error"]["data"]["reason"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_call_with_a_caller_context_is_decided_as_the_original_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tg = start(dir.path(), Setup::default()).await;
    let cc = context("rid-chat-1");
    let balance = json!({"account": "a-1"});

    // As the caller (ApiKey demo-paid, tier paid): its tools are permitted.
    let a = runtime_call(&tg, "/mcp", Some(&cc), "get_balance", balance.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.headers.get("x-tollgate-principal").map(String::as_str),
        Some(r#"ApiKey::"demo-paid""#)
    );
    assert!(a.removed.iter().any(|h| h == CC), "{:?}", a.removed);
    let small = json!({"amount": 5, "to": "bob"});
    let a = runtime_call(&tg, "/mcp", Some(&cc), "transfer", small.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // The caller's own limits hold through the runtime: a large transfer is
    // enterprise only.
    let large = json!({"amount": 5000, "to": "bob"});
    let a = runtime_call(&tg, "/mcp", Some(&cc), "transfer", large).await;
    assert_eq!((a.status, reason(&a)), (403, "policy_denied"), "{}", a.body);

    // Another tenant's server: refused for an acme caller.
    let a = runtime_call(
        &tg,
        "/globex/mcp",
        Some(&cc),
        "get_balance",
        balance.clone(),
    )
    .await;
    assert_eq!((a.status, reason(&a)), (403, "policy_denied"), "{}", a.body);

    // A tool the context does not bind, though the caller could otherwise
    // reach it: refused, naming it.
    let only_balance = one_key("new", SEED_NEW)
        .sign(&paid_claims(
            "rid-chat-2",
            &["get_balance"],
            SystemTime::now(),
        ))
        .expect("sign");
    let a = runtime_call(&tg, "/mcp", Some(&only_balance), "transfer", small.clone()).await;
    assert_eq!(
        (a.status, reason(&a)),
        (403, "tool_forbidden"),
        "{}",
        a.body
    );
    assert_eq!(a.body["error"]["data"]["tool"], json!("transfer"));
    assert_eq!(a.body["id"], json!(3));

    // Without a context the runtime is only itself, a Service the MCP
    // policies do not permit.
    let a = runtime_call(&tg, "/mcp", None, "get_balance", balance.clone()).await;
    assert_eq!((a.status, reason(&a)), (403, "policy_denied"), "{}", a.body);

    // A tampered context is refused, not decided as anyone.
    let a = runtime_call(&tg, "/mcp", Some(&format!("{cc}x")), "get_balance", balance).await;
    assert_eq!(
        (a.status, reason(&a)),
        (401, "invalid_caller_context"),
        "{}",
        a.body
    );

    // The audit trail: each allowed hop's mcp caller chain is the original
    // caller, then the runtime; the direct call names the runtime alone.
    tg.stop().await;
    let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit file");
    let records: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let allowed: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"] == "allow" && r["mcp"]["method"] == "tools/call")
        .collect();
    assert_eq!(allowed.len(), 2, "{text}");
    for r in allowed {
        assert_eq!(
            r["mcp"]["caller_chain"],
            json!([
                {"role": "principal", "identity": r#"ApiKey::"demo-paid""#},
                {"role": "agent", "identity": RUNTIME},
            ]),
            "{r}"
        );
    }
    let runtime = format!("Service::\"{RUNTIME}\"");
    assert!(
        records.iter().any(
            |r| r["mcp"]["caller_chain"] == json!([{"role": "principal", "identity": runtime}])
        ),
        "{text}"
    );
}

/// Two transfers per originating request: the third on one context is a
/// JSON-RPC 429 with Retry-After, while another context still has room; the
/// refused call counted against no limit (the tenant's five).
async fn per_originating_request_scenario(tg: &Tollgate) {
    let (first, second) = (context("rid-chat-a"), context("rid-chat-b"));
    let transfer = json!({"amount": 5, "to": "bob"});
    for i in 0..2 {
        let a = runtime_call(tg, "/mcp", Some(&first), "transfer", transfer.clone()).await;
        assert_eq!(a.status, 200, "transfer {i}: {}", a.body);
    }
    let over = runtime_call(tg, "/mcp", Some(&first), "transfer", transfer.clone()).await;
    over.assert_over_quota("transfers-per-originating-request", "transfer", 86_400);
    // Another originating request has its own two.
    let a = runtime_call(tg, "/mcp", Some(&second), "transfer", transfer.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Other tools are not limited per originating request.
    let balance = json!({"account": "a-1"});
    let a = runtime_call(tg, "/mcp", Some(&first), "get_balance", balance.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Five calls charged the tenant (the refused one did not): the next is
    // over the tenant's limit.
    let a = runtime_call(tg, "/mcp", Some(&second), "get_balance", balance.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = runtime_call(tg, "/mcp", Some(&second), "get_balance", balance).await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(
        a.body["error"]["data"]["rule"],
        json!("tool-calls-per-tenant")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_limited_per_originating_request_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        rules: true,
        ..Setup::default()
    };
    let tg = start(dir.path(), setup).await;
    support::away_from_minute_boundary(Duration::from_secs(5)).await;
    per_originating_request_scenario(&tg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_limited_per_originating_request_in_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        redis: Some(redis.url()),
        rules: true,
        ..Setup::default()
    };
    let tg = start(dir.path(), setup).await;
    tg.wait_for_store().await;
    support::away_from_minute_boundary(Duration::from_secs(5)).await;
    per_originating_request_scenario(&tg).await;
}

/// A schema whose MCP actions do not declare `context.agent` (generated
/// before hops were decided on MCP endpoints) cannot show a policy who acts:
/// the hop is refused, while the caller's own calls are decided as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_without_context_agent_refuses_the_hop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        schema: |s| {
            s.replace(", \"agent\"?: String, \"via\"?: String }", " }")
                .replace("{ \"agent\"?: String, \"via\"?: String }", "{}")
        },
        ..Setup::default()
    };
    let tg = start(dir.path(), setup).await;
    let balance = json!({"account": "a-1"});
    let a = runtime_call(
        &tg,
        "/mcp",
        Some(&context("rid-old")),
        "get_balance",
        balance.clone(),
    )
    .await;
    assert_eq!((a.status, reason(&a)), (403, "policy_error"), "{}", a.body);
    let req = check_request(
        "POST",
        "/mcp",
        &[("x-api-key", support::DEMO_PAID_KEY)],
        &tools_call("get_balance", balance),
    );
    assert_eq!(ask_mcp(&tg, req).await.status, 200);
}
