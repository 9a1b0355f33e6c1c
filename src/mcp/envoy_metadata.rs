//! An MCP request as Envoy's MCP filter (`envoy.filters.http.mcp`) saw it:
//! the dynamic metadata it emits, which ext_authz forwards in the
//! CheckRequest's `metadata_context` when listed in
//! `metadata_context_namespaces`.
//!
//! Envoy 1.40 writes under the namespace `envoy.filters.http.mcp` (builds
//! before 1.38 and the MCP router's default use `mcp_proxy`; both are read):
//! `{jsonrpc, method, id, params: {name | uri, _meta, arguments…},
//! is_mcp_request, status}` plus `is_exceeding_limit` when the body was
//! larger than the filter's buffer. `params.arguments` is present only when
//! the filter's `parser_config` extracts it for `tools/call`.
//!
//! The metadata is a protobuf `Struct`, and what Envoy 1.40 puts there is
//! lossy (observed by running it): numbers are doubles (an integer above
//! 2^53 comes back changed), a nested object becomes `{}` and an array is
//! left out altogether. So a request is decided from metadata alone only
//! when nothing was lost: integers within ±2^53, and a tool whose declared
//! input has no set or record attribute ([`flat_input`]); anything else is
//! refused, with the advice to send the body too. When ext_authz also has
//! the body, the body is decided and the metadata must agree with it on
//! everything it carries exactly ([`agree`]; a nested or inexact argument is
//! then left to the body): a filter and a server reading one request two ways would
//! otherwise let the policy see something else than what is served.

use serde_json::{Map, Value};

use super::request::{self, Limits, McpError, McpRequest};
use super::typing::Ty;

/// Metadata namespaces of Envoy's MCP filter, in the order they are read.
pub const NAMESPACES: [&str; 2] = ["envoy.filters.http.mcp", "mcp_proxy"];

/// Largest integer a double carries exactly (2^53).
const EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Reads the MCP filter's metadata (and the request's headers, lowercase
/// names) into the same [`McpRequest`] the body parser makes, with the same
/// checks: method spelling, tool name, argument size and depth, and
/// `Mcp-Method` / `Mcp-Name` agreement. `alone`: the metadata is all there
/// is to decide on, so an argument it cannot carry exactly refuses the
/// request; otherwise (the body came too) such an argument is left out, to
/// be decided from the body.
pub fn parse(
    metadata: &Value,
    headers: &std::collections::HashMap<String, String>,
    limits: Limits,
    alone: bool,
) -> Result<McpRequest, McpError> {
    let Value::Object(meta) = metadata else {
        return Err(McpError::Malformed("MCP metadata is not a struct".into()));
    };
    if meta.get("is_exceeding_limit") == Some(&Value::Bool(true)) {
        return Err(McpError::Malformed(
            "the MCP filter saw only part of the body (is_exceeding_limit)".into(),
        ));
    }
    if meta.get("is_mcp_request") != Some(&Value::Bool(true))
        || meta.get("status").and_then(Value::as_str) != Some("mcp_ok")
    {
        let status = meta.get("status").and_then(Value::as_str).unwrap_or("-");
        return Err(McpError::Malformed(format!(
            "the MCP filter did not read an MCP request (status {status})"
        )));
    }
    if super::json::depth(metadata) > limits.max_depth {
        return Err(McpError::BadArguments(format!(
            "nested deeper than {}",
            limits.max_depth
        )));
    }
    let Some(Value::String(method)) = meta.get("method") else {
        return Err(McpError::Malformed("metadata has no method".into()));
    };
    let method = method.clone();
    request::check_method(&method)?;
    let id = match meta.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Value::String(s.clone())),
        Some(Value::Number(n)) => Some(exact_number(n)?),
        Some(_) => {
            return Err(McpError::Malformed(
                "id must be a string or a number".into(),
            ));
        }
    };
    let params = match meta.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => return Err(McpError::Malformed("params must be a struct".into())),
    };
    let params = request::read_params(params)?;
    request::finish(
        McpRequest {
            id,
            method,
            name: params.name,
            uri: params.uri,
            arguments: exact_arguments(params.arguments, alone)?,
            meta: params.meta,
            param_headers: Vec::new(),
            protocol_version: headers.get("mcp-protocol-version").cloned(),
        },
        headers,
        limits,
    )
}

/// A metadata number as JSON: an integer when the double is one within
/// ±2^53, else the double; beyond that it may have been rounded.
fn exact_number(n: &serde_json::Number) -> Result<Value, McpError> {
    let Some(f) = n.as_f64() else {
        return Err(McpError::BadArguments("a number is not finite".into()));
    };
    if f.fract() == 0.0 && f.abs() <= EXACT_INTEGER {
        return Ok(Value::from(f as i64));
    }
    if f.abs() > EXACT_INTEGER {
        return Err(McpError::BadArguments(
            "an integer beyond 2^53 cannot be read exactly from Envoy's MCP metadata; send the body to ext_authz".into(),
        ));
    }
    Ok(Value::Number(n.clone()))
}

/// Top-level scalar arguments, numbers made exact. A struct or list value
/// (Envoy 1.40 empties nested structs in its metadata) or an inexact number
/// is refused when `strict`, else left out.
fn exact_arguments(
    arguments: Map<String, Value>,
    strict: bool,
) -> Result<Map<String, Value>, McpError> {
    let mut out = Map::new();
    for (k, v) in arguments {
        let v = match v {
            Value::Number(n) => match exact_number(&n) {
                Ok(v) => v,
                Err(_) if !strict => continue,
                Err(e) => return Err(e),
            },
            Value::Object(_) | Value::Array(_) if !strict => continue,
            Value::Object(_) | Value::Array(_) => {
                return Err(McpError::BadArguments(format!(
                    "argument {k:?} is nested, and Envoy's MCP metadata does not carry nested values; send the body to ext_authz"
                )));
            }
            scalar => scalar,
        };
        out.insert(k, v);
    }
    Ok(out)
}

/// Whether a tool's declared input can be carried whole by the MCP
/// filter's metadata: every attribute a scalar. Envoy drops list values
/// from its metadata without a trace, so a tool with a set (or record)
/// attribute cannot be decided from metadata alone: a policy on that
/// attribute would see it absent.
pub fn flat_input(ty: &Ty) -> bool {
    match ty {
        Ty::Record(attrs) => attrs
            .iter()
            .all(|a| matches!(a.ty, Ty::Long | Ty::Str | Ty::Bool | Ty::Decimal)),
        _ => false,
    }
}

/// The metadata's request against the body's: method, id, name and uri
/// must be equal, and every argument the metadata carries must equal the
/// body's (numbers compared as numbers).
pub fn agree(from_metadata: &McpRequest, from_body: &McpRequest) -> Result<(), McpError> {
    let same_id = match (&from_metadata.id, &from_body.id) {
        (Some(Value::Number(a)), Some(Value::Number(b))) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    };
    let same_arguments =
        from_metadata
            .arguments
            .iter()
            .all(|(k, v)| match (v, from_body.arguments.get(k)) {
                (Value::Number(a), Some(Value::Number(b))) => a.as_f64() == b.as_f64(),
                (a, b) => Some(a) == b,
            });
    if from_metadata.method != from_body.method
        || !same_id
        || from_metadata.name != from_body.name
        || from_metadata.uri != from_body.uri
        || !same_arguments
    {
        return Err(McpError::HeaderMismatch(
            "Envoy's MCP filter metadata does not match the body".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    const LIMITS: Limits = Limits {
        max_argument_bytes: 256,
        max_depth: 8,
    };

    /// What Envoy 1.40 emitted for a tools/call with `params.arguments`
    /// extracted (copied from its access log).
    fn observed(arguments: Value) -> Value {
        json!({"id": 7.0, "is_mcp_request": true, "jsonrpc": "2.0", "method": "tools/call",
               "params": {"_meta": {"progressToken": 1.0}, "arguments": arguments, "name": "transfer"},
               "status": "mcp_ok"})
    }

    #[test]
    fn reads_what_envoy_emits() {
        let r = parse(
            &observed(json!({"amount": 5.0, "to": "bob", "rate": 1.5, "memo": {}})),
            &HashMap::new(),
            LIMITS,
            false,
        )
        .expect("parses");
        assert_eq!(r.method, "tools/call");
        assert_eq!(r.id, Some(json!(7)));
        assert_eq!(r.name.as_deref(), Some("transfer"));
        assert_eq!(r.arguments.get("amount"), Some(&json!(5)));
        assert_eq!(r.arguments.get("rate"), Some(&json!(1.5)));
        let body = request::parse(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"to":"bob","rate":1.5}}}"#,
            &HashMap::new(),
            LIMITS,
        )
        .expect("body");
        assert_eq!(agree(&r, &body), Ok(()));
        let other = request::parse(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5000,"to":"bob","rate":1.5}}}"#,
            &HashMap::new(),
            LIMITS,
        )
        .expect("body");
        assert!(agree(&r, &other).is_err());
    }

    #[test]
    fn refuses_what_was_lost_or_is_bad() {
        let cases = [
            observed(json!({"amount": 12345678901234567168.0})),
            observed(json!({"nested": {}})),
            json!({"is_mcp_request": false, "status": "mcp_not_jsonrpc"}),
            json!({"id": 8.0, "is_exceeding_limit": true, "is_mcp_request": false, "jsonrpc": "2.0",
                   "method": "tools/call", "params": {"arguments": {}, "name": "transfer"},
                   "status": "mcp_body_too_large"}),
            json!({"id": 1.0, "is_mcp_request": true, "method": "Tools/Call", "status": "mcp_ok",
                   "params": {"name": "transfer"}}),
            json!({"id": 1.0, "is_mcp_request": true, "method": "tools/call", "status": "mcp_ok",
                   "params": {"name": "bank::transfer"}}),
            json!({"id": 1.0, "is_mcp_request": true, "method": "tools/call", "status": "mcp_ok"}),
            json!("tools/call"),
        ];
        for case in cases {
            assert!(
                parse(&case, &HashMap::new(), LIMITS, true).is_err(),
                "{case}"
            );
        }
        let headers: HashMap<String, String> =
            [("mcp-method".to_string(), "tools/list".to_string())].into();
        assert!(parse(&observed(json!({})), &headers, LIMITS, true).is_err());
    }
}
