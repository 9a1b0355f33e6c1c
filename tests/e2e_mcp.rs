//! MCP tool calls authorized through a real Envoy (issue 18): the PyPI `mcp`
//! SDK's server and client over Streamable HTTP, with Tollgate as ext_authz
//! (with the body) and as the external processor that filters `tools/list`,
//! wired by `examples/envoy/mcp.yaml` as it is.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::mcp::McpStack;
use support::{DEMO_PAID_KEY, raw_http};

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
    let stack = McpStack::start(
        "mcp.yaml",
        "authorization_servers = [\"https://idp.example.com\"]",
    )
    .await;
    stack.assert_bank_decisions().await;

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
