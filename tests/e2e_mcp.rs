//! MCP tool calls authorized through a real Envoy (issue 18): the PyPI `mcp`
//! SDK's server and client over Streamable HTTP, with Tollgate as ext_authz
//! (with the body) and as the external processor that filters `tools/list`,
//! wired by `examples/envoy/mcp.yaml` as it is.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::{
    DEMO_ADMIN_KEY, DEMO_FREE_KEY, DEMO_PAID_KEY, Envoy, McpServer, Tollgate, free_port,
    mcp_client, raw_http, test_config,
};

struct Stack {
    _tg: Tollgate,
    mcp: McpServer,
    envoy: Envoy,
}

impl Stack {
    async fn start() -> Self {
        let listen = free_port();
        let mut config = test_config();
        let toml = format!(
            "[mcp]\n[[mcp.servers]]\npath = \"/mcp\"\nserver = \"bank\"\nresource = \"http://127.0.0.1:{listen}/mcp\"\nauthorization_servers = [\"https://idp.example.com\"]\n"
        );
        #[derive(serde::Deserialize)]
        struct Mcp {
            mcp: tollgate::mcp::McpConfig,
        }
        config.mcp = toml::from_str::<Mcp>(&toml).expect("toml").mcp;
        let tg = Tollgate::start(config).await;
        let mcp = McpServer::start().await;
        let admin = free_port();
        let yaml = std::fs::read_to_string(support::repo().join("examples/envoy/mcp.yaml"))
            .expect("mcp.yaml")
            .replace("port_value: 10000", &format!("port_value: {listen}"))
            .replace("port_value: 9901", &format!("port_value: {admin}"))
            .replace(
                "port_value: 50051",
                &format!("port_value: {}", tg.grpc.port()),
            )
            .replace(
                "port_value: 9090",
                &format!("port_value: {}", tg.admin.port()),
            )
            .replace(
                "port_value: 8000",
                &format!("port_value: {}", mcp.addr.port()),
            );
        let envoy = Envoy::run(&yaml, listen, admin).await;
        Self {
            _tg: tg,
            mcp,
            envoy,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/mcp", self.envoy.listener)
    }

    async fn client(&self, token: &'static str, steps: &'static [&'static str]) -> Vec<Value> {
        let url = self.url();
        tokio::task::spawn_blocking(move || mcp_client(&url, token, steps))
            .await
            .expect("client task")
    }
}

/// A JSON-RPC POST as the SDK sends it (2026-07-28 headers included).
async fn post(
    to: SocketAddr,
    key: &str,
    extra: &[(&str, &str)],
    body: &Value,
) -> support::HttpResponse {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2026-07-28"),
    ];
    headers.extend_from_slice(extra);
    raw_http(to, "POST", "/mcp", &headers, &body.to_string()).await
}

fn call(tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
        "name": tool, "arguments": args,
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
                  "io.modelcontextprotocol/clientCapabilities": {}}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_decided_per_tool_and_argument_through_envoy() {
    let stack = Stack::start().await;

    // A paid key: lists only what it may call, calls a small transfer,
    // is refused a large one and a tool it may not use.
    let paid = stack
        .client(
            DEMO_PAID_KEY,
            &[
                "list",
                r#"call:get_balance:{"account":"a-1"}"#,
                r#"call:transfer:{"amount":5,"to":"bob"}"#,
                r#"call:transfer:{"amount":5000,"to":"bob"}"#,
                r#"call:delete_account:{"account":"a-1"}"#,
            ],
        )
        .await;
    assert_eq!(
        paid[0]["tools"],
        json!(["get_balance", "transfer"]),
        "{paid:?}"
    );
    assert_eq!(paid[1]["ok"], json!(true), "{paid:?}");
    assert_eq!(paid[2]["text"], json!("sent 5 to bob"), "{paid:?}");
    assert_eq!(paid[3]["ok"], json!(false), "{paid:?}");
    assert_eq!(paid[4]["ok"], json!(false), "{paid:?}");

    // The same large transfer is allowed for an enterprise key, whose list
    // also shows delete_account; a free key sees only get_balance.
    let admin = stack
        .client(
            DEMO_ADMIN_KEY,
            &["list", r#"call:transfer:{"amount":5000,"to":"bob"}"#],
        )
        .await;
    assert_eq!(
        admin[0]["tools"],
        json!(["delete_account", "get_balance", "transfer"]),
        "{admin:?}"
    );
    assert_eq!(admin[1]["text"], json!("sent 5000 to bob"), "{admin:?}");
    let free = stack.client(DEMO_FREE_KEY, &["list"]).await;
    assert_eq!(free[0]["tools"], json!(["get_balance"]), "{free:?}");

    // What the refusals look like on the wire: JSON-RPC errors under the
    // request's id, with the HTTP status of the outcome.
    let to = stack.envoy.listener;
    let big = post(
        to,
        DEMO_PAID_KEY,
        &[
            ("mcp-method", "tools/call"),
            ("mcp-name", "transfer"),
            ("mcp-param-to", "bob"),
        ],
        &call("transfer", json!({"amount": 5000, "to": "bob"})),
    )
    .await;
    assert_eq!(big.status, 403, "{}", big.body);
    assert_eq!(big.json()["id"], json!(9));
    assert_eq!(big.json()["error"]["code"], json!(-32003));
    assert_eq!(
        big.json()["error"]["data"]["reason"],
        json!("policy_denied")
    );

    // Headers disagreeing with the body are refused (HeaderMismatch, 400).
    for extra in [
        [
            ("mcp-method", "tools/list"),
            ("mcp-name", "transfer"),
            ("mcp-param-to", "bob"),
        ],
        [
            ("mcp-method", "tools/call"),
            ("mcp-name", "get_balance"),
            ("mcp-param-to", "bob"),
        ],
        [
            ("mcp-method", "tools/call"),
            ("mcp-name", "transfer"),
            ("mcp-param-to", "eve"),
        ],
        [
            ("mcp-method", "tools/call"),
            ("mcp-name", "transfer"),
            ("mcp-param-to", "=?base64?ZXZl?="),
        ],
    ] {
        let r = post(
            to,
            DEMO_PAID_KEY,
            &extra,
            &call("transfer", json!({"amount": 5, "to": "bob"})),
        )
        .await;
        assert_eq!(r.status, 400, "{extra:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], json!(-32001), "{extra:?}");
    }
    // The base64 form of the right value agrees.
    let ok = post(
        to,
        DEMO_PAID_KEY,
        &[
            ("mcp-method", "tools/call"),
            ("mcp-name", "transfer"),
            ("mcp-param-to", "=?base64?Ym9i?="),
        ],
        &call("transfer", json!({"amount": 5, "to": "bob"})),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);

    // Bad input: a tool name with `::`, arguments of the wrong type, a
    // method differing only in case, a batch.
    let bad_name = post(to, DEMO_PAID_KEY, &[], &call("bank::transfer", json!({}))).await;
    assert_eq!(
        bad_name.json()["error"]["data"]["reason"],
        json!("invalid_tool_name")
    );
    let bad_args = post(
        to,
        DEMO_PAID_KEY,
        &[
            ("mcp-method", "tools/call"),
            ("mcp-name", "transfer"),
            ("mcp-param-to", "bob"),
        ],
        &call("transfer", json!({"amount": "5", "to": "bob"})),
    )
    .await;
    assert_eq!(bad_args.status, 400);
    assert_eq!(
        bad_args.json()["error"]["data"]["reason"],
        json!("invalid_arguments")
    );
    let mut cased = call("transfer", json!({"amount": 5, "to": "bob"}));
    cased["method"] = json!("Tools/Call");
    let cased = post(to, DEMO_PAID_KEY, &[("mcp-method", "Tools/Call")], &cased).await;
    assert_eq!(
        cased.json()["error"]["data"]["reason"],
        json!("malformed_mcp")
    );
    let batch = post(
        to,
        DEMO_PAID_KEY,
        &[],
        &json!([call("transfer", json!({}))]),
    )
    .await;
    assert_eq!(batch.status, 400);
    assert_eq!(
        batch.json()["error"]["data"]["reason"],
        json!("mcp_batch_refused")
    );

    // Without a credential: 401 naming the protected resource metadata,
    // which Envoy serves from Tollgate's admin listener.
    let anonymous = raw_http(
        to,
        "POST",
        "/mcp",
        &[
            ("content-type", "application/json"),
            ("mcp-method", "tools/list"),
        ],
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    )
    .await;
    assert_eq!(anonymous.status, 401);
    let metadata_url = format!("http://{to}/.well-known/oauth-protected-resource/mcp");
    assert!(
        anonymous
            .header("www-authenticate")
            .is_some_and(|h| h.contains(&format!("resource_metadata=\"{metadata_url}\""))),
        "{:?}",
        anonymous.headers
    );
    let metadata = raw_http(
        to,
        "GET",
        "/.well-known/oauth-protected-resource/mcp",
        &[],
        "",
    )
    .await;
    assert_eq!(metadata.status, 200);
    assert_eq!(metadata.json()["resource"], json!(stack.url()));
    assert_eq!(
        metadata.json()["authorization_servers"],
        json!(["https://idp.example.com"])
    );

    // The MCP server was reached, and never with the client's credential.
    let seen = stack.mcp.seen();
    assert!(seen.lines().count() >= 8, "{seen}");
    assert!(
        seen.lines()
            .all(|l| l.contains("authorization=- ") && l.ends_with("x-api-key=-")),
        "{seen}"
    );
    let _ = Duration::ZERO;
}
