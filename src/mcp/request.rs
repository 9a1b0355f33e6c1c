//! An MCP JSON-RPC request as policy input: the body's `method`, `id`,
//! `params.name`, `params.uri`, `params.arguments` and `params._meta`, and
//! the Streamable HTTP request headers of the 2026-07-28 revision
//! (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`), which must agree with the
//! body: the revision requires servers to refuse a mismatch, and a gateway
//! that decided on the header while the server acts on the body would be
//! deciding on a value that is not served.

use base64::Engine as _;
use serde_json::{Map, Value};

use super::json::{self, StrictJsonError};

/// The first protocol revision whose clients must send `Mcp-Method` /
/// `Mcp-Name` (and the mapped `Mcp-Param-*` headers).
pub const HEADERS_REQUIRED_FROM: &str = "2026-07-28";

/// The only revision that allowed JSON-RPC batches (2025-06-18 removed them).
pub const BATCH_REVISION: &str = "2025-03-26";

/// Methods Tollgate knows by name. A method differing from one of these only
/// in case is refused: a case-insensitive server would run the method the
/// policy did not see.
pub const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "server/discover",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
];

/// Size and shape bounds for untrusted MCP bodies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest `params.arguments`, in bytes of its JSON text.
    pub max_argument_bytes: usize,
    /// Deepest nesting of the whole body (objects and arrays).
    pub max_depth: usize,
}

/// One parsed MCP request (a JSON-RPC request or notification).
#[derive(Debug, Clone, PartialEq)]
pub struct McpRequest {
    /// The JSON-RPC id; `None` for a notification.
    pub id: Option<Value>,
    pub method: String,
    /// `params.name` (tools/call, prompts/get).
    pub name: Option<String>,
    /// `params.uri` (resources/read, subscribe).
    pub uri: Option<String>,
    /// `params.arguments` (tools/call, prompts/get); an absent one is `{}`
    /// for tools/call.
    pub arguments: Map<String, Value>,
    /// `params._meta`, as sent (never logged).
    pub meta: Option<Map<String, Value>>,
    /// `Mcp-Param-*` headers: lowercase suffix → decoded value.
    pub param_headers: Vec<(String, String)>,
    /// `MCP-Protocol-Version`, when sent.
    pub protocol_version: Option<String>,
}

impl McpRequest {
    /// Whether this is a notification (no id, no answer expected).
    pub fn is_notification(&self) -> bool {
        self.id.is_none()
    }
}

/// Why an MCP request is refused before any policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum McpError {
    #[error("malformed JSON-RPC request: {0}")]
    Malformed(String),
    #[error("JSON-RPC batches are not accepted for protocol version {0:?}")]
    Batch(String),
    #[error("header mismatch: {0}")]
    HeaderMismatch(String),
    #[error("tool name is not a valid MCP tool name")]
    BadToolName,
    #[error("method {0:?} differs from a known method only in case")]
    MethodCase(String),
    #[error("arguments: {0}")]
    BadArguments(String),
}

impl From<StrictJsonError> for McpError {
    fn from(e: StrictJsonError) -> Self {
        match e {
            StrictJsonError::TooDeep(n) => Self::BadArguments(format!("nested deeper than {n}")),
            other => Self::Malformed(other.to_string()),
        }
    }
}

/// Whether `name` may name a tool: 1–128 of `A-Z a-z 0-9 _ - .` (the MCP
/// tool-name rule). This excludes control characters, `/` (Tollgate's
/// method actions contain one, so a tool can never shadow them) and `::`
/// (Cedar's namespace separator).
pub fn valid_tool_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Decodes a header value in the `=?base64?…?=` form (or returns it as is).
pub fn decode_header_value(raw: &str) -> Result<String, McpError> {
    let Some(inner) = raw
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    else {
        return Ok(raw.to_string());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(inner)
        .map_err(|_| McpError::HeaderMismatch("a base64 header value does not decode".into()))?;
    String::from_utf8(bytes)
        .map_err(|_| McpError::HeaderMismatch("a base64 header value is not UTF-8".into()))
}

/// Parses the body and headers (lowercase names) of a POST to an MCP
/// endpoint. Header/body agreement is checked for `Mcp-Method` and
/// `Mcp-Name` here; `Mcp-Param-*` values are checked against the arguments
/// once the tool's header mapping is known
/// ([`super::typing::check_param_headers`]).
pub fn parse(
    body: &[u8],
    headers: &std::collections::HashMap<String, String>,
    limits: Limits,
) -> Result<McpRequest, McpError> {
    let protocol_version = headers.get("mcp-protocol-version").cloned();
    let value = json::parse(body, limits.max_depth)?;
    let Value::Object(mut message) = value else {
        if value.is_array() {
            // Batches were allowed only in 2025-03-26; Tollgate decides one
            // call per request, so it refuses them for every revision and
            // says which one was asked for.
            let version = protocol_version.unwrap_or_else(|| BATCH_REVISION.into());
            return Err(McpError::Batch(version));
        }
        return Err(McpError::Malformed("the body is not a JSON object".into()));
    };
    if message.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(McpError::Malformed("jsonrpc must be \"2.0\"".into()));
    }
    let Some(Value::String(method)) = message.remove("method") else {
        return Err(McpError::Malformed(
            "method is missing or not a string (a response is not a request)".into(),
        ));
    };
    check_method(&method)?;
    let id = match message.remove("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(v),
        Some(_) => {
            return Err(McpError::Malformed(
                "id must be a string or a number".into(),
            ));
        }
    };
    let params = match message.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(McpError::Malformed("params must be an object".into())),
    };
    let Params {
        name,
        uri,
        arguments,
        meta,
    } = read_params(params)?;
    finish(
        McpRequest {
            id,
            method,
            name,
            uri,
            arguments,
            meta,
            param_headers: Vec::new(),
            protocol_version,
        },
        headers,
        limits,
    )
}

/// What Tollgate reads of `params` (the rest is left to the server).
pub(super) struct Params {
    pub name: Option<String>,
    pub uri: Option<String>,
    pub arguments: Map<String, Value>,
    pub meta: Option<Map<String, Value>>,
}

/// `params.name`, `params.uri`, `params.arguments` and `params._meta`,
/// each of its JSON type or absent.
pub(super) fn read_params(mut params: Map<String, Value>) -> Result<Params, McpError> {
    let name = match params.remove("name") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(McpError::Malformed("params.name must be a string".into())),
    };
    let uri = match params.remove("uri") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(McpError::Malformed("params.uri must be a string".into())),
    };
    let arguments = match params.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return Err(McpError::BadArguments("must be an object".into())),
    };
    let meta = match params.remove("_meta") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return Err(McpError::Malformed("params._meta must be an object".into())),
    };
    Ok(Params {
        name,
        uri,
        arguments,
        meta,
    })
}

/// A method string's own checks: no control characters, 1–128 bytes, and
/// not a known method in another case (a case-insensitive server would run
/// the method the policy did not see).
pub(super) fn check_method(method: &str) -> Result<(), McpError> {
    if method.bytes().any(|b| b.is_ascii_control()) || method.is_empty() || method.len() > 128 {
        return Err(McpError::Malformed(
            "method has control characters or a bad length".into(),
        ));
    }
    if !KNOWN_METHODS.contains(&method)
        && KNOWN_METHODS.iter().any(|k| k.eq_ignore_ascii_case(method))
    {
        return Err(McpError::MethodCase(method.to_string()));
    }
    Ok(())
}

/// The checks shared by every source of an MCP request (body or Envoy's
/// MCP filter metadata): argument size, what each method needs, and the
/// `Mcp-*` headers against the request.
pub(super) fn finish(
    mut request: McpRequest,
    headers: &std::collections::HashMap<String, String>,
    limits: Limits,
) -> Result<McpRequest, McpError> {
    let arguments = &request.arguments;
    let argument_bytes = serde_json::to_vec(&arguments).map_or(usize::MAX, |v| v.len());
    if argument_bytes > limits.max_argument_bytes {
        return Err(McpError::BadArguments(format!(
            "{argument_bytes} bytes, more than {}",
            limits.max_argument_bytes
        )));
    }
    let (method, name, uri) = (&request.method, &request.name, &request.uri);
    match method.as_str() {
        "tools/call" => match &name {
            Some(n) if valid_tool_name(n) => {}
            Some(_) => return Err(McpError::BadToolName),
            None => return Err(McpError::Malformed("tools/call needs params.name".into())),
        },
        "prompts/get" if name.is_none() => {
            return Err(McpError::Malformed("prompts/get needs params.name".into()));
        }
        "resources/read" if uri.is_none() => {
            return Err(McpError::Malformed(
                "resources/read needs params.uri".into(),
            ));
        }
        _ => {}
    }
    request.param_headers = param_headers(headers)?;
    check_headers(&request, headers)?;
    Ok(request)
}

fn param_headers(
    headers: &std::collections::HashMap<String, String>,
) -> Result<Vec<(String, String)>, McpError> {
    let mut out = Vec::new();
    for (name, value) in headers {
        if let Some(suffix) = name.strip_prefix("mcp-param-") {
            if value.contains(',') && !value.starts_with("=?base64?") {
                // Two copies merged by the gateway: which one counts is a guess.
                return Err(McpError::HeaderMismatch(format!(
                    "Mcp-Param-{suffix} is repeated"
                )));
            }
            out.push((suffix.to_string(), decode_header_value(value)?));
        }
    }
    out.sort();
    Ok(out)
}

/// `Mcp-Method` and `Mcp-Name` against the body: a present header must
/// match exactly; from [`HEADERS_REQUIRED_FROM`] on they must be present.
fn check_headers(
    request: &McpRequest,
    headers: &std::collections::HashMap<String, String>,
) -> Result<(), McpError> {
    let required = request
        .protocol_version
        .as_deref()
        .is_some_and(|v| v >= HEADERS_REQUIRED_FROM);
    match headers.get("mcp-method") {
        Some(h) if *h != request.method => {
            return Err(McpError::HeaderMismatch(
                "Mcp-Method does not match the body's method".into(),
            ));
        }
        None if required => {
            return Err(McpError::HeaderMismatch("Mcp-Method is missing".into()));
        }
        _ => {}
    }
    let body_name = match request.method.as_str() {
        "tools/call" | "prompts/get" => request.name.as_deref(),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            request.uri.as_deref()
        }
        _ => None,
    };
    match (headers.get("mcp-name"), body_name) {
        (Some(h), Some(b)) if decode_header_value(h)? != b => Err(McpError::HeaderMismatch(
            "Mcp-Name does not match the body's name".into(),
        )),
        (Some(_), None) => Err(McpError::HeaderMismatch(
            "Mcp-Name is sent for a method without a name".into(),
        )),
        (None, Some(_)) if required => Err(McpError::HeaderMismatch("Mcp-Name is missing".into())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const LIMITS: Limits = Limits {
        max_argument_bytes: 256,
        max_depth: 8,
    };

    fn h(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn call(name: &str, args: &str) -> String {
        format!(
            r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":{name:?},"arguments":{args},"_meta":{{"progressToken":1}}}}}}"#
        )
    }

    #[test]
    fn reads_a_tool_call() {
        let r = parse(
            call("transfer", r#"{"amount":5}"#).as_bytes(),
            &h(&[]),
            LIMITS,
        )
        .expect("parses");
        assert_eq!(r.method, "tools/call");
        assert_eq!(r.id, Some(Value::from(7)));
        assert_eq!(r.name.as_deref(), Some("transfer"));
        assert_eq!(r.arguments.get("amount"), Some(&Value::from(5)));
        assert!(r.meta.is_some());
    }

    #[test]
    fn refuses_bad_input() {
        let cases: Vec<(String, HashMap<String, String>)> = vec![
            (call("tr\u{7}ansfer", "{}"), h(&[])),
            (call("bank::transfer", "{}"), h(&[])),
            (call("", "{}"), h(&[])),
            (call("transfer", r#"{"a":[[[[[[[[[1]]]]]]]]]}"#), h(&[])),
            (
                call("transfer", &format!(r#"{{"a":"{}"}}"#, "x".repeat(300))),
                h(&[]),
            ),
            (call("transfer", "[1]"), h(&[])),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"x"}}"#.into(),
                h(&[]),
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list"}"#.into(),
                h(&[]),
            ),
            (
                r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#.into(),
                h(&[]),
            ),
            (r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#.into(), h(&[])),
            (
                r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#.into(),
                h(&[]),
            ),
            (call("transfer", "{}"), h(&[("mcp-method", "tools/list")])),
            (call("transfer", "{}"), h(&[("mcp-name", "other")])),
            (
                call("transfer", "{}"),
                h(&[("mcp-protocol-version", "2026-07-28")]),
            ),
            (
                call("transfer", "{}"),
                h(&[("mcp-param-x", "=?base64?***?=")]),
            ),
        ];
        for (body, headers) in cases {
            assert!(
                parse(body.as_bytes(), &headers, LIMITS).is_err(),
                "{body} {headers:?}"
            );
        }
    }

    #[test]
    fn headers_that_agree_pass_and_base64_decodes() {
        let headers = h(&[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?dHJhbnNmZXI=?="),
            ("mcp-param-region", "=?base64?SGVsbG8sIOS4lueVjA==?="),
        ]);
        let r = parse(call("transfer", "{}").as_bytes(), &headers, LIMITS).expect("agrees");
        assert_eq!(
            r.param_headers,
            vec![("region".to_string(), "Hello, 世界".to_string())]
        );
        let batch = parse(
            br#"[]"#,
            &h(&[("mcp-protocol-version", "2025-06-18")]),
            LIMITS,
        );
        assert_eq!(batch, Err(McpError::Batch("2025-06-18".into())));
    }
}
