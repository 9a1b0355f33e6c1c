//! OpenAI-style tools through a real Envoy (issue 18, item 5): ext_authz
//! with the body decides each offered tool (`offer_tool`) for the caller,
//! and ext_proc checks the model's tool calls (`call_tool`) before the
//! agent runtime sees them — JSON answers and event streams. On allow the
//! upstream also receives a signed caller context whose key is in the JWKS
//! on the admin listener (item 6).

mod support;

use std::sync::{Arc, Mutex};

use support::{DEMO_ADMIN_KEY, DEMO_PAID_KEY, Envoy, Tollgate, raw_http, test_config};

const CC_HEADER: &str = "x-tollgate-caller-context";

/// An OpenAI-style upstream: answers with a call of the tool named in
/// `x-call` (arguments carry a secret that must never reach a refused
/// client), as JSON or, for `"stream": true`, as an event stream. Records
/// the caller-context header each request carried.
async fn start_llm(seen: Arc<Mutex<Vec<Option<String>>>>) -> std::net::SocketAddr {
    use axum::http::{HeaderMap, header};
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
        let seen = seen.clone();
        async move {
            let cc = headers
                .get(CC_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            seen.lock().expect("lock").push(cc);
            let call = headers
                .get("x-call")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("get_weather")
                .to_string();
            if !body.contains("\"stream\":true") {
                let answer = format!(
                    r#"{{"id":"c1","choices":[{{"message":{{"role":"assistant","tool_calls":[{{"id":"call_1","type":"function","function":{{"name":"{call}","arguments":"{{\"note\":\"s3cr3t\"}}"}}}}]}}}}],"usage":{{"prompt_tokens":10,"completion_tokens":5}}}}"#
                );
                return ([(header::CONTENT_TYPE, "application/json")], answer);
            }
            let mut sse =
                String::from("data: {\"choices\":[{\"delta\":{\"content\":\"thinking\"}}]}\n\n");
            sse.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{\"tool_calls\":[{{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{{\"name\":\"{call}\",\"arguments\":\"\"}}}}]}}}}]}}\n\n"));
            sse.push_str("data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"note\\\":\\\"s3cr3t\\\"}\"}}]}}]}\n\n");
            sse.push_str("data: [DONE]\n\n");
            ([(header::CONTENT_TYPE, "text/event-stream")], sse)
        }
    });
    support::serve_axum(app).await.0
}

fn chat_body(tools: &[&str], stream: bool) -> String {
    let tools: Vec<String> = tools
        .iter()
        .map(|t| format!(r#"{{"type":"function","function":{{"name":"{t}","parameters":{{}}}}}}"#))
        .collect();
    format!(
        r#"{{"model":"llama-3-8b","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}],"tools":[{}]}}"#,
        tools.join(",")
    )
}

const KEYS: &str =
    "[[keys]]\nkid = \"cc-1\"\nseed = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offered_tools_and_tool_calls_are_decided_for_the_caller_through_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cc-keys.toml"), KEYS).expect("keys");
    let mut config = test_config();
    config.agents.tools.enabled = true;
    config.agents.caller_context.keys_file = Some(dir.path().join("cc-keys.toml"));
    let tg = Tollgate::start(config).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let llm = start_llm(seen.clone()).await;
    // The example Envoy config, with the tool-call check's needs: ext_proc
    // fails closed and may switch a JSON answer to BUFFERED.
    let template = std::fs::read_to_string(support::repo().join("examples/envoy/envoy.yaml"))
        .expect("envoy.yaml")
        .replace(
            "failure_mode_allow: true",
            "failure_mode_allow: false\n              allow_mode_override: true",
        )
        .replace(
            "port_value: 50051",
            &format!("port_value: {}", tg.grpc.port()),
        )
        .replace("port_value: 8080", &format!("port_value: {}", llm.port()));
    let envoy = Envoy::start_template(&template).await;
    let listener = envoy.listener;
    let chat = move |key: &'static str, body: String, call: Option<&'static str>| async move {
        let mut headers = vec![("x-api-key", key), ("content-type", "application/json")];
        if let Some(c) = call {
            headers.push(("x-call", c));
        }
        raw_http(listener, "POST", "/v1/chat/completions", &headers, &body).await
    };

    // Offering an allowed and a forbidden tool: 403 naming the forbidden one;
    // the upstream never sees the request.
    let r = chat(
        DEMO_PAID_KEY,
        chat_body(&["get_weather", "send_email"], false),
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "tool_forbidden");
    assert_eq!(r.json()["error"]["tool"], "send_email");
    assert!(
        seen.lock().expect("lock").is_empty(),
        "the upstream was reached"
    );
    // A tool name with "::" is refused as a bad name, not looked up.
    let r = chat(DEMO_PAID_KEY, chat_body(&["a::b"], false), None).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "invalid_tool_name");

    // An allowed tool, called by the model: passes unchanged; the upstream
    // got a caller context signed with the published key.
    let r = chat(DEMO_PAID_KEY, chat_body(&["get_weather"], false), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    let token = seen.lock().expect("lock")[0]
        .clone()
        .expect("a caller context");
    let jwks = raw_http(
        tg.admin,
        "GET",
        "/.well-known/tollgate-caller-context-jwks.json",
        &[],
        "",
    )
    .await;
    assert_eq!(jwks.status, 200);
    assert_eq!(jwks.json()["keys"][0]["kid"], "cc-1");
    assert_eq!(jwks.json()["keys"][0]["crv"], "Ed25519");
    let ring = tollgate::agents::caller_context::KeyRing::parse(KEYS).expect("keys");
    let claims = ring
        .verify(&token, std::time::SystemTime::now())
        .expect("the issued context verifies");
    assert_eq!(
        (claims.sub.as_str(), claims.tenant.as_deref()),
        ("demo-paid", Some("acme"))
    );
    assert_eq!(claims.tools, ["get_weather"]);
    assert_eq!(claims.model.as_deref(), Some("llama-3-8b"));

    // The model calls a tool the caller may not call: the JSON answer is
    // replaced by Tollgate's 403, naming the tool, without its arguments.
    let r = chat(
        DEMO_PAID_KEY,
        chat_body(&["get_weather"], false),
        Some("send_email"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "tool_call_refused");
    assert_eq!(r.json()["error"]["tool"], "send_email");
    assert!(!r.body.contains("s3cr3t"), "{}", r.body);
    // A tool the request never offered is refused the same way.
    let r = chat(
        DEMO_PAID_KEY,
        chat_body(&["get_weather"], false),
        Some("search_docs"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"]["tool"], "search_docs");

    // The same in an event stream: the events before pass, the refused call
    // becomes an error event, nothing after it (the arguments) arrives.
    let r = chat(
        DEMO_PAID_KEY,
        chat_body(&["get_weather"], true),
        Some("send_email"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("thinking"), "{}", r.body);
    assert!(
        r.body
            .contains("event: error\ndata: {\"error\":{\"code\":\"tool_call_refused\""),
        "{}",
        r.body
    );
    assert!(!r.body.contains("\"name\":\"send_email\""), "{}", r.body);
    assert!(!r.body.contains("s3cr3t"), "{}", r.body);
    assert!(!r.body.contains("[DONE]"), "{}", r.body);
    // An allowed streamed call passes whole.
    let r = chat(DEMO_PAID_KEY, chat_body(&["get_weather"], true), None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("s3cr3t") && r.body.contains("[DONE]"),
        "{}",
        r.body
    );

    // An enterprise key may offer and receive calls of the high-risk tool.
    let r = chat(
        DEMO_ADMIN_KEY,
        chat_body(&["get_weather", "send_email"], false),
        Some("send_email"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("send_email"));
}

/// Bad tool lists over ext_authz (no Envoy needed): each is refused with a
/// reason, never allowed unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_lists_are_refused_with_a_reason() {
    use support::{check_request, ext_authz};
    let mut config = test_config();
    config.agents.tools.enabled = true;
    let tg = Tollgate::start(config).await;
    let json = ("content-type", "application/json");
    let key = ("x-api-key", DEMO_PAID_KEY);
    let cut = ("x-envoy-auth-partial-body", "true");
    let plain = ("content-type", "text/plain");
    let tools = |list: &str| {
        format!(r#"{{"model":"llama-3-8b","max_tokens":16,"messages":[],"tools":[{list}]}}"#)
    };
    // (what, headers, body, status, reason code)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            // (the chat route needs the body's model first; on a route that
            // does not, the unread tools refuse it: 400 malformed_body)
            "a cut body is refused, its tools unread",
            vec![key, json, cut],
            tools(r#"{"type":"function","function":{"name":"get_weather"}}"#),
            400,
            "missing_resource",
        ),
        (
            "a control character in a name",
            vec![key, json],
            tools(r#"{"type":"function","function":{"name":"get\u0007weather"}}"#),
            400,
            "invalid_tool_name",
        ),
        (
            "a repeated name field",
            vec![key, json],
            tools(r#"{"type":"function","function":{"name":"get_weather","name":"send_email"}}"#),
            400,
            "malformed_body",
        ),
        (
            "JSON sent as text/plain is not read, so not allowed unchecked",
            vec![key, plain],
            tools(r#"{"type":"function","function":{"name":"send_email"}}"#),
            400,
            "missing_resource",
        ),
        (
            "legacy functions",
            vec![key, json],
            r#"{"model":"llama-3-8b","max_tokens":16,"messages":[],"functions":[{"name":"send_email"}]}"#.into(),
            403,
            "tool_forbidden",
        ),
        (
            "a built-in tool the entities list",
            vec![key, json],
            tools(r#"{"type":"web_search"}"#),
            200,
            "allowed",
        ),
        (
            "a built-in tool nobody listed",
            vec![key, json],
            tools(r#"{"type":"code_interpreter"}"#),
            403,
            "tool_forbidden",
        ),
        (
            "no tools at all",
            vec![key, json],
            r#"{"model":"llama-3-8b","max_tokens":16,"messages":[]}"#.into(),
            200,
            "allowed",
        ),
    ];
    for (what, headers, body, status, code) in cases {
        let v = ext_authz(
            &tg,
            check_request("POST", "/v1/chat/completions", &headers, &body),
        )
        .await;
        assert_eq!((v.status, v.code.as_str()), (status, code), "{what}");
    }
}
