//! With Envoy 1.40's own MCP filter (`envoy.filters.http.mcp`) in front,
//! Tollgate makes the same tool decisions from the filter's dynamic
//! metadata as from the body (issue 18, item 1): the PyPI `mcp` SDK's
//! server and client through a real Envoy wired by
//! `examples/envoy/mcp-filter.yaml` as it is, whose ext_authz sends no body.

mod support;

use std::net::SocketAddr;

use serde_json::{Value, json};
use support::mcp::McpStack;
use support::{DEMO_PAID_KEY, raw_http};

async fn post(to: SocketAddr, extra: &[(&str, &str)], body: &str) -> support::HttpResponse {
    let auth = format!("Bearer {DEMO_PAID_KEY}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    headers.extend_from_slice(extra);
    raw_http(to, "POST", "/mcp", &headers, body).await
}

fn call(id: u64, tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": args}})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_decisions_from_the_mcp_filter_metadata() {
    let stack = McpStack::start("mcp-filter.yaml", "").await;
    // The decisions of tests/e2e_mcp.rs, now with ext_authz seeing no body:
    // only the filter's metadata says which tool and which arguments.
    stack.assert_bank_decisions().await;

    // On the wire: the refusal is a JSON-RPC error under the id the
    // metadata carried.
    let to = stack.envoy.listener;
    let big = post(
        to,
        &[],
        &call(41, "transfer", json!({"amount": 5000, "to": "bob"})),
    )
    .await;
    assert_eq!(big.status, 403, "{}", big.body);
    assert_eq!(big.json()["id"], json!(41));
    assert_eq!(
        big.json()["error"]["data"]["reason"],
        json!("policy_denied")
    );

    // Headers disagreeing with what the filter read are refused.
    let mismatch = post(
        to,
        &[("mcp-method", "tools/list")],
        &call(43, "transfer", json!({"amount": 5, "to": "bob"})),
    )
    .await;
    assert_eq!(mismatch.status, 400, "{}", mismatch.body);
    assert_eq!(mismatch.json()["error"]["code"], json!(-32001));

    // Bad input through the filter: a tool name with `::`, a method
    // differing only in case, an argument of the wrong type, a nested
    // argument the metadata cannot carry, an integer beyond 2^53.
    let reason = |r: &support::HttpResponse| r.json()["error"]["data"]["reason"].clone();
    let bad_name = post(to, &[], &call(44, "bank::transfer", json!({}))).await;
    assert_eq!(
        reason(&bad_name),
        json!("invalid_tool_name"),
        "{}",
        bad_name.body
    );
    let cased = post(
        to,
        &[],
        r#"{"jsonrpc":"2.0","id":45,"method":"Tools/Call","params":{"name":"transfer","arguments":{}}}"#,
    )
    .await;
    assert_eq!(reason(&cased), json!("malformed_mcp"), "{}", cased.body);
    for args in [
        json!({"amount": "5", "to": "bob"}),
        json!({"amount": 5, "to": "bob", "memo": {"note": "x"}}),
        json!({"amount": 12345678901234567890u64, "to": "bob"}),
    ] {
        let r = post(to, &[], &call(46, "transfer", args.clone())).await;
        assert_eq!(r.status, 400, "{args}: {}", r.body);
        assert_eq!(reason(&r), json!("invalid_arguments"), "{args}");
    }
    // A JSON-RPC batch is not an MCP request to the filter either.
    let batch = post(to, &[], &format!("[{}]", call(47, "transfer", json!({})))).await;
    assert_eq!(batch.status, 400, "{}", batch.body);

    // The MCP server was reached, never with the client's credential, and
    // never for a refused call.
    let seen = stack.mcp.seen();
    assert!(
        seen.lines()
            .all(|l| l.contains("authorization=- ") && l.ends_with("x-api-key=-")),
        "{seen}"
    );
}

/// With the body sent too, Tollgate decides on the body and checks that the
/// filter's metadata agrees: the same decisions again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_body_together_agree_and_decide_the_same() {
    let yaml = std::fs::read_to_string(support::repo().join("examples/envoy/mcp-filter.yaml"))
        .expect("mcp-filter.yaml");
    let with_body = yaml.replace(
        "              metadata_context_namespaces: [envoy.filters.http.mcp]\n",
        "              metadata_context_namespaces: [envoy.filters.http.mcp]\n              with_request_body:\n                max_request_bytes: 65536\n                allow_partial_message: true\n                pack_as_bytes: true\n",
    );
    assert_ne!(with_body, yaml, "the example's ext_authz block changed");
    let stack = McpStack::start_with(&with_body, "").await;
    stack.assert_bank_decisions().await;
    // An undeclared nested argument, refused from metadata alone (it could
    // hide a dropped list), is decided on the body here: allowed, and served.
    let to = stack.envoy.listener;
    let body = json!({"jsonrpc": "2.0", "id": 48, "method": "tools/call", "params": {
        "name": "transfer", "arguments": {"amount": 5, "to": "bob", "memo": {"note": "x"}},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
                  "io.modelcontextprotocol/clientCapabilities": {}}}});
    let served = post(
        to,
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "transfer"),
            ("mcp-param-to", "bob"),
        ],
        &body.to_string(),
    )
    .await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert!(served.body.contains("sent 5 to bob"), "{}", served.body);
}
