//! MCP requests over ext_authz on loopback (issue 18): scopes, session-level
//! methods, notifications per config, bad input, and what an allow removes.

mod support;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use serde_json::{Value, json};
use support::{DEMO_PAID_KEY, Tollgate, check_request, test_config};

/// Status, JSON body (deny) and headers (deny: set; allow: removed).
async fn ask(
    tg: &Tollgate,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value, Vec<(String, String)>) {
    let mut client = AuthorizationClient::new(tg.channel().await);
    let request = check_request(method, "/mcp", headers, body);
    let resp = client.check(request).await.expect("check").into_inner();
    match resp.http_response.expect("http_response") {
        HttpResponse::OkResponse(ok) => (
            200,
            Value::Null,
            ok.headers_to_remove
                .into_iter()
                .map(|h| (h, String::new()))
                .collect(),
        ),
        HttpResponse::DeniedResponse(d) => (
            d.status.map_or(0, |s| s.code as u16),
            serde_json::from_str(&d.body).expect("JSON-RPC error body"),
            d.headers
                .into_iter()
                .filter_map(|h| h.header)
                .map(|h| (h.key, h.value))
                .collect(),
        ),
        HttpResponse::ErrorResponse(e) => panic!("{e:?}"),
    }
}

fn config(extra: &str) -> tollgate::config::Config {
    #[derive(serde::Deserialize)]
    struct Mcp {
        mcp: tollgate::mcp::McpConfig,
    }
    let toml = format!(
        "[mcp]\n{extra}\n[[mcp.servers]]\npath = \"/mcp\"\nserver = \"bank\"\nresource = \"https://mcp.example.com/mcp\"\n"
    );
    let mut config = test_config();
    config.mcp = toml::from_str::<Mcp>(&toml).expect("toml").mcp;
    config
}

fn rpc(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": "a-1", "method": method, "params": params}).to_string()
}

const KEY: (&str, &str) = ("x-api-key", DEMO_PAID_KEY);

/// `(name, HTTP method, headers, body, status, reason)`.
type Row<'a> = (
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    String,
    u16,
    &'a str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_requests_are_decided_and_refused_as_json_rpc() {
    let tg = Tollgate::start(config("notifications = \"deny\"")).await;
    let call = |args: Value| rpc("tools/call", json!({"name": "transfer", "arguments": args}));
    let deep = (0..20).fold(json!(1), |v, _| json!([v]));
    let rows: Vec<Row> = vec![
        ("allowed call", "POST", vec![KEY], call(json!({"amount": 5, "to": "b"})), 200, ""),
        ("GET stream is session-level", "GET", vec![KEY], String::new(), 200, ""),
        ("anonymous GET", "GET", vec![], String::new(), 401, "missing_credential"),
        ("ping allowed by default", "POST", vec![KEY], rpc("ping", json!({})), 200, ""),
        ("notifications denied by config", "POST", vec![KEY],
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string(), 403, "policy_denied"),
        ("unknown tool", "POST", vec![KEY], rpc("tools/call", json!({"name": "launch", "arguments": {}})), 403, "unknown_tool"),
        ("unknown method", "POST", vec![KEY], rpc("sampling/createMessage", json!({})), 403, "unknown_tool"),
        ("missing required argument", "POST", vec![KEY], call(json!({"amount": 5})), 400, "invalid_arguments"),
        ("deeply nested arguments", "POST", vec![KEY], call(json!({"amount": 5, "to": "b", "x": deep})), 400, "invalid_arguments"),
        ("oversized arguments", "POST", vec![KEY], call(json!({"amount": 5, "to": "x".repeat(70_000)})), 400, "invalid_arguments"),
        ("repeated key", "POST", vec![KEY],
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"amount":5000,"to":"b"}}}"#.into(),
            400, "malformed_mcp"),
        ("cut body", "POST", vec![KEY, ("x-envoy-auth-partial-body", "true")], call(json!({"amount": 5, "to": "b"})), 400, "malformed_mcp"),
        ("control character in the tool name", "POST", vec![KEY],
            rpc("tools/call", json!({"name": "trans\u{0}fer", "arguments": {}})), 400, "invalid_tool_name"),
        ("a response is not a request", "POST", vec![KEY], json!({"jsonrpc": "2.0", "id": 1, "result": {}}).to_string(), 400, "malformed_mcp"),
    ];
    for (name, method, headers, body, status, reason) in rows {
        let (got, body, headers_out) = ask(&tg, method, &headers, &body).await;
        assert_eq!(got, status, "{name}: {body}");
        if status == 200 {
            // The MCP server never sees the caller's credential.
            if headers.iter().any(|(h, _)| *h == "x-api-key") {
                assert!(headers_out.iter().any(|(h, _)| h == "x-api-key"), "{name}");
            }
            continue;
        }
        assert_eq!(body["jsonrpc"], json!("2.0"), "{name}");
        assert_eq!(
            body["error"]["data"]["reason"],
            json!(reason),
            "{name}: {body}"
        );
        if status == 401 {
            let challenge = headers_out
                .iter()
                .find(|(h, _)| h == "www-authenticate")
                .map(|(_, v)| v.as_str());
            assert_eq!(
                challenge,
                Some(
                    "Bearer realm=\"tollgate\", resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\""
                ),
                "{name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_scope_is_insufficient_scope_with_every_scope_named() {
    let mut config = config("");
    config.mcp.servers[0].scopes = vec!["llm:generate".into(), "mcp:tools".into()];
    let tg = Tollgate::start(config).await;
    let (status, body, headers) = ask(&tg, "POST", &[KEY], &rpc("tools/list", json!({}))).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["data"]["reason"], json!("insufficient_scope"));
    assert_eq!(body["id"], json!("a-1"));
    let challenge = headers
        .iter()
        .find(|(h, _)| h == "www-authenticate")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(
        challenge.contains("error=\"insufficient_scope\"")
            && challenge.contains("scope=\"llm:generate mcp:tools\"")
            && challenge.contains("resource_metadata="),
        "{challenge}"
    );
}

/// Which allowed MCP requests carry the tools/list mark for ext_proc: set
/// (overwriting a client's copy) on tools/list, removed on everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_tools_list_is_marked_for_the_external_processor() {
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse as Http;
    let tg = Tollgate::start(config("")).await;
    let mut client = AuthorizationClient::new(tg.channel().await);
    let forged = [KEY, ("x-tollgate-mcp-list", "0")];
    let list = check_request("POST", "/mcp", &forged, &rpc("tools/list", json!({})));
    let Some(Http::OkResponse(ok)) = client
        .check(list)
        .await
        .expect("check")
        .into_inner()
        .http_response
    else {
        panic!("tools/list is allowed");
    };
    let set: Vec<(String, String)> = ok
        .headers
        .into_iter()
        .filter_map(|h| h.header)
        .map(|h| (h.key, h.value))
        .collect();
    assert!(
        set.contains(&("x-tollgate-mcp-list".into(), "1".into())),
        "{set:?}"
    );
    let call = rpc(
        "tools/call",
        json!({"name": "get_balance", "arguments": {"account": "a"}}),
    );
    let Some(Http::OkResponse(ok)) = client
        .check(check_request(
            "POST",
            "/mcp",
            &[KEY, ("x-tollgate-mcp-list", "1")],
            &call,
        ))
        .await
        .expect("check")
        .into_inner()
        .http_response
    else {
        panic!("get_balance is allowed");
    };
    assert!(
        ok.headers_to_remove
            .contains(&"x-tollgate-mcp-list".to_string())
    );
}

/// A marked tools/list answer whose allow this Tollgate does not remember
/// (another replica, expired) lists no tools rather than all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_answer_without_its_decision_lists_no_tools() {
    use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
    let tg = Tollgate::start(config("")).await;
    let headers = support::header_map;
    let answer = json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "get_balance"}, {"name": "transfer"}]}});
    let messages = vec![
        ProcessingRequest {
            request: Some(In::RequestHeaders(HttpHeaders {
                headers: Some(headers(&[
                    (":path", "/mcp"),
                    ("x-request-id", "never-decided"),
                    ("x-tollgate-mcp-list", "1"),
                ])),
                ..Default::default()
            })),
            ..Default::default()
        },
        ProcessingRequest {
            request: Some(In::ResponseHeaders(HttpHeaders {
                headers: Some(headers(&[
                    (":status", "200"),
                    ("content-type", "application/json"),
                ])),
                ..Default::default()
            })),
            ..Default::default()
        },
        ProcessingRequest {
            request: Some(In::ResponseBody(HttpBody {
                body: answer.to_string().into_bytes(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        },
    ];
    let mut client = ExternalProcessorClient::new(tg.channel().await);
    let mut replies = client
        .process(tokio_stream::iter(messages))
        .await
        .expect("process")
        .into_inner();
    let mut body = None;
    while let Some(reply) = replies.message().await.expect("reply") {
        if let Some(Out::ResponseBody(b)) = reply.response {
            body = b
                .response
                .and_then(|c| c.body_mutation)
                .and_then(|m| m.mutation);
            break;
        }
    }
    let Some(Mutation::Body(bytes)) = body else {
        panic!("the answer is replaced");
    };
    let filtered: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(filtered["result"]["tools"], json!([]));
}
