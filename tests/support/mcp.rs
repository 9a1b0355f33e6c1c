//! The MCP end-to-end stack: Tollgate with `[mcp]` for `/mcp`, the example
//! MCP server and a real Envoy on one of the example configs, and the tool
//! decisions every such wiring must make.

use serde_json::{Value, json};

use super::{
    DEMO_ADMIN_KEY, DEMO_FREE_KEY, DEMO_PAID_KEY, Envoy, McpServer, Tollgate, free_port,
    mcp_client, test_config,
};

/// Tollgate, the bank MCP server and Envoy on `examples/envoy/<yaml>`.
pub struct McpStack {
    pub tg: Tollgate,
    pub mcp: McpServer,
    pub envoy: Envoy,
}

impl McpStack {
    /// Starts all three; `server_toml` adds lines to the `[[mcp.servers]]`
    /// entry (`resource` is set to Envoy's listener). The Envoy file is used
    /// as it is, with only its port numbers substituted.
    pub async fn start(yaml: &str, server_toml: &str) -> Self {
        let text = std::fs::read_to_string(super::repo().join("examples/envoy").join(yaml))
            .expect("Envoy config");
        Self::start_with(&text, server_toml).await
    }

    /// [`McpStack::start`] on an Envoy config's text.
    pub async fn start_with(yaml: &str, server_toml: &str) -> Self {
        let listen = free_port();
        let mut config = test_config();
        let toml = format!(
            "[mcp]\n[[mcp.servers]]\npath = \"/mcp\"\nserver = \"bank\"\nresource = \"http://127.0.0.1:{listen}/mcp\"\n{server_toml}\n"
        );
        #[derive(serde::Deserialize)]
        struct Mcp {
            mcp: tollgate::mcp::McpConfig,
        }
        config.mcp = toml::from_str::<Mcp>(&toml).expect("toml").mcp;
        let tg = Tollgate::start(config).await;
        let mcp = McpServer::start().await;
        let admin = free_port();
        let yaml = yaml
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
        Self { tg, mcp, envoy }
    }

    /// The MCP endpoint through Envoy.
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.envoy.listener)
    }

    /// Runs the SDK's client with `token` through `steps`.
    pub async fn client(&self, token: &'static str, steps: &'static [&'static str]) -> Vec<Value> {
        let url = self.url();
        tokio::task::spawn_blocking(move || mcp_client(&url, token, steps))
            .await
            .expect("client task")
    }

    /// The bank's tool decisions through the SDK's client: a paid key lists
    /// only what it may call, calls a small transfer and is refused a large
    /// one and a tool it may not use; an enterprise key may do both and
    /// sees delete_account; a free key sees only get_balance.
    pub async fn assert_bank_decisions(&self) {
        let paid = self
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
        let admin = self
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
        let free = self.client(DEMO_FREE_KEY, &["list"]).await;
        assert_eq!(free[0]["tools"], json!(["get_balance"]), "{free:?}");
    }
}

/// What ext_authz answered an MCP request: status, JSON-RPC error body
/// (deny), headers set (allow: for the MCP server; deny: for the client)
/// and removed (allow).
pub struct McpAnswer {
    pub status: u16,
    pub body: Value,
    pub headers: std::collections::HashMap<String, String>,
    pub removed: Vec<String>,
}

impl McpAnswer {
    /// A JSON-RPC 429 for request id 3: `-32029`, `over_quota`, naming
    /// `rule` and `tool`, with a `Retry-After` of 1 to `max_retry` seconds.
    pub fn assert_over_quota(&self, rule: &str, tool: &str, max_retry: u64) {
        assert_eq!(self.status, 429, "{}", self.body);
        assert_eq!(self.body["jsonrpc"], json!("2.0"));
        assert_eq!(self.body["id"], json!(3));
        assert_eq!(self.body["error"]["code"], json!(-32029));
        let data = &self.body["error"]["data"];
        assert_eq!(data["reason"], json!("over_quota"), "{}", self.body);
        assert_eq!((&data["tool"], &data["rule"]), (&json!(tool), &json!(rule)));
        let retry: u64 = self
            .headers
            .get("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((1..=max_retry).contains(&retry), "{retry}");
    }
}

/// Sends one CheckRequest for an MCP endpoint to Tollgate's ext_authz.
pub async fn ask_mcp(
    tg: &Tollgate,
    request: envoy_types::pb::envoy::service::auth::v3::CheckRequest,
) -> McpAnswer {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    let mut client = AuthorizationClient::new(tg.channel().await);
    let resp = client.check(request).await.expect("check").into_inner();
    let pairs = |headers: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>| {
        headers
            .into_iter()
            .filter_map(|h| h.header)
            .map(|h| (h.key, h.value))
            .collect()
    };
    match resp.http_response.expect("http_response") {
        HttpResponse::OkResponse(ok) => McpAnswer {
            status: 200,
            body: Value::Null,
            headers: pairs(ok.headers),
            removed: ok.headers_to_remove,
        },
        HttpResponse::DeniedResponse(d) => McpAnswer {
            status: d.status.map_or(0, |s| s.code as u16),
            body: serde_json::from_str(&d.body).expect("JSON-RPC error body"),
            headers: pairs(d.headers),
            removed: Vec::new(),
        },
        HttpResponse::ErrorResponse(e) => panic!("{e:?}"),
    }
}

/// A JSON-RPC `tools/call` of `tool` with `args` (id 3).
pub fn tools_call(tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
           "params": {"name": tool, "arguments": args}})
    .to_string()
}

/// `[mcp]` from the TOML of its section's body (`[[mcp.servers]]` …).
pub fn mcp_section(toml: &str) -> tollgate::mcp::McpConfig {
    #[derive(serde::Deserialize)]
    struct Mcp {
        mcp: tollgate::mcp::McpConfig,
    }
    toml::from_str::<Mcp>(&format!("[mcp]\n{toml}\n"))
        .expect("toml")
        .mcp
}
