//! OpenAI-style tools: the `tools` (and legacy `functions`) a chat
//! completions or Responses request offers, and the tool calls a model's
//! answer makes — in a JSON body or an event stream.
//!
//! Offered tools are named by `function.name` (chat completions), `name`
//! (Responses `function` and `custom` tools) or, for tools the provider
//! runs itself (`web_search`, `file_search`, `code_interpreter`, `mcp`, …),
//! `builtin:<type>`. A function name must be 1–64 of `A-Z a-z 0-9 _ -`
//! (OpenAI's rule); anything else (control characters, `::`, `/`) refuses
//! the request rather than naming an entity a policy never expected.
//!
//! Tool calls are read wherever the providers put them: `tool_calls[].
//! function.name` (chat completions, also streamed deltas), legacy
//! `function_call.name`, and items of type `function_call`,
//! `custom_tool_call` (Responses, also `response.output_item.*` events) or
//! `tool_use` (Anthropic Messages).

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

/// Why the offered tools cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// Not the JSON shape of a tool list (wrong types, a repeated field).
    #[error("tools are not a list of tool objects: {0}")]
    Malformed(String),
    /// A name that is not a valid tool name.
    #[error("tool name is not 1-64 of A-Z a-z 0-9 _ -")]
    BadName,
}

/// Whether a tool is a function the caller's runtime executes or one the
/// provider runs (`context.kind` of `offer_tool` / `call_tool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    Function,
    Builtin,
}

impl ToolKind {
    /// `"function"` or `"builtin"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Function => "function",
            Self::Builtin => "builtin",
        }
    }
}

/// One offered tool: its entity id (`Tool::"<name>"`) and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedTool {
    pub name: String,
    pub kind: ToolKind,
}

#[derive(Deserialize)]
struct ToolsBody {
    tools: Option<Vec<ToolSpec>>,
    functions: Option<Vec<FunctionSpec>>,
}

#[derive(Deserialize)]
struct ToolSpec {
    #[serde(rename = "type")]
    kind: String,
    function: Option<FunctionSpec>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct FunctionSpec {
    name: String,
}

/// A function tool name as OpenAI accepts it: 1–64 of `A-Z a-z 0-9 _ -`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The tools a request body offers, in order, each once. A body without
/// `tools` or `functions` offers none.
pub fn offered(body: &[u8]) -> Result<Vec<OfferedTool>, ToolError> {
    let parsed: ToolsBody =
        serde_json::from_slice(body).map_err(|e| ToolError::Malformed(e.to_string()))?;
    let mut out: Vec<OfferedTool> = Vec::new();
    let mut push = |name: String, kind: ToolKind| {
        if !out.iter().any(|t| t.name == name) {
            out.push(OfferedTool { name, kind });
        }
    };
    for spec in parsed.tools.unwrap_or_default() {
        match spec.kind.as_str() {
            "function" | "custom" => {
                let name = match (spec.function.map(|f| f.name), spec.name) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(ToolError::Malformed("two different names".into()));
                    }
                    (Some(n), _) | (None, Some(n)) => n,
                    (None, None) => return Err(ToolError::Malformed("a tool without name".into())),
                };
                if !valid_name(&name) {
                    return Err(ToolError::BadName);
                }
                push(name, ToolKind::Function);
            }
            other => {
                if !valid_name(other) {
                    return Err(ToolError::BadName);
                }
                push(format!("builtin:{other}"), ToolKind::Builtin);
            }
        }
    }
    for f in parsed.functions.unwrap_or_default() {
        if !valid_name(&f.name) {
            return Err(ToolError::BadName);
        }
        push(f.name, ToolKind::Function);
    }
    Ok(out)
}

/// Item types that are a call of a named tool.
const CALL_ITEM_TYPES: [&str; 3] = ["function_call", "custom_tool_call", "tool_use"];

/// Every tool name a response (or one streamed event) calls, in order.
/// A call whose name is not a string is reported as `""` (never callable).
pub fn called(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(calls)) = map.get("tool_calls") {
                for call in calls {
                    if let Some(f) = call.get("function")
                        && let Some(name) = f.get("name")
                    {
                        out.push(name.as_str().unwrap_or_default().to_string());
                    }
                }
            }
            if let Some(Value::Object(f)) = map.get("function_call")
                && let Some(name) = f.get("name")
            {
                out.push(name.as_str().unwrap_or_default().to_string());
            }
            if map
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| CALL_ITEM_TYPES.contains(&t))
                && let Some(name) = map.get("name")
            {
                out.push(name.as_str().unwrap_or_default().to_string());
            }
            for (key, v) in map {
                if key != "tool_calls" {
                    called(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| called(v, out)),
        _ => {}
    }
}

/// The first called tool not in `callable`, if any.
fn first_refused(value: &Value, callable: &HashSet<String>) -> Option<String> {
    let mut names = Vec::new();
    called(value, &mut names);
    names.into_iter().find(|n| !callable.contains(n))
}

/// Why a response was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The tool called that the caller may not call; `None` when the body
    /// could not be read (too large, not JSON).
    pub tool: Option<String>,
}

impl Refusal {
    /// The error object clients see (`{"error":{…}}`): reason code
    /// `tool_call_refused`, the tool, the request id; never arguments.
    pub fn error_json(&self, request_id: &str) -> Value {
        let mut error = json!({
            "code": "tool_call_refused",
            "message": "the model called a tool the caller may not call",
            "request_id": request_id,
        });
        match &self.tool {
            Some(tool) => error["tool"] = json!(tool),
            None => error["message"] = json!("the response could not be checked for tool calls"),
        }
        json!({ "error": error })
    }
}

/// Checks a whole JSON response: `Err` names the first refused tool call.
pub fn check_json(
    body: &[u8],
    callable: &HashSet<String>,
    max_bytes: usize,
) -> Result<(), Refusal> {
    if body.len() > max_bytes {
        return Err(Refusal { tool: None });
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| Refusal { tool: None })?;
    match first_refused(&value, callable) {
        Some(tool) => Err(Refusal { tool: Some(tool) }),
        None => Ok(()),
    }
}

/// Checks an event stream as it passes, event by event: complete events
/// that call only callable tools pass on; the first event calling another
/// tool is replaced by an `error` event and everything after it is dropped.
/// An unfinished event larger than the bound is refused the same way.
pub struct SseGuard {
    callable: Arc<HashSet<String>>,
    request_id: String,
    pending: Vec<u8>,
    max_bytes: usize,
    refused: Option<Refusal>,
}

impl SseGuard {
    /// A guard for one response.
    pub fn new(callable: Arc<HashSet<String>>, request_id: String, max_bytes: usize) -> Self {
        Self {
            callable,
            request_id,
            pending: Vec::new(),
            max_bytes,
            refused: None,
        }
    }

    /// The refusal, once one happened.
    pub fn refused(&self) -> Option<&Refusal> {
        self.refused.as_ref()
    }

    /// Takes one chunk; returns what to send on in its place. At
    /// `end`, an unfinished last event is checked too.
    pub fn feed(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        if self.refused.is_some() {
            return Vec::new();
        }
        self.pending.extend_from_slice(chunk);
        let complete = if end {
            self.pending.len()
        } else {
            match last_boundary(&self.pending) {
                Some(at) => at,
                None if self.pending.len() > self.max_bytes => {
                    return self.refuse(Vec::new(), Refusal { tool: None });
                }
                None => return Vec::new(),
            }
        };
        let events: Vec<u8> = self.pending.drain(..complete).collect();
        let mut out = Vec::with_capacity(events.len());
        for event in split_events(&events) {
            if let Some(tool) = event_refusal(event, &self.callable) {
                return self.refuse(out, Refusal { tool: Some(tool) });
            }
            out.extend_from_slice(event);
        }
        out
    }

    fn refuse(&mut self, mut out: Vec<u8>, refusal: Refusal) -> Vec<u8> {
        let data = refusal.error_json(&self.request_id);
        out.extend_from_slice(format!("event: error\ndata: {data}\n\n").as_bytes());
        self.pending.clear();
        self.refused = Some(refusal);
        out
    }
}

/// The end (exclusive) of the last complete event: after a blank line.
fn last_boundary(buf: &[u8]) -> Option<usize> {
    (1..buf.len())
        .rev()
        .find(|&i| {
            buf[i] == b'\n' && (buf[i - 1] == b'\n' || (i >= 2 && &buf[i - 2..i] == b"\n\r"))
        })
        .map(|i| i + 1)
}

/// Events with their terminating blank line.
fn split_events(buf: &[u8]) -> Vec<&[u8]> {
    let mut events = Vec::new();
    let mut start = 0;
    for i in 1..buf.len() {
        if buf[i] == b'\n' && (buf[i - 1] == b'\n' || (i >= 2 && &buf[i - 2..i] == b"\n\r")) {
            events.push(&buf[start..=i]);
            start = i + 1;
        }
    }
    if start < buf.len() {
        events.push(&buf[start..]);
    }
    events
}

/// The first tool an event calls that is not callable. An event whose data
/// is not JSON (`[DONE]`, comments) calls nothing.
fn event_refusal(event: &[u8], callable: &HashSet<String>) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return None;
    }
    let value: Value = serde_json::from_str(&data.join("\n")).ok()?;
    first_refused(&value, callable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tools: &[OfferedTool]) -> Vec<&str> {
        tools.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn offered_tools_are_read_from_every_shape() {
        let chat = br#"{"model":"m","tools":[{"type":"function","function":{"name":"get_weather","parameters":{}}},{"type":"function","function":{"name":"send_email"}}]}"#;
        assert_eq!(
            names(&offered(chat).unwrap()),
            ["get_weather", "send_email"]
        );
        let responses =
            br#"{"tools":[{"type":"function","name":"get_weather"},{"type":"web_search"}]}"#;
        let t = offered(responses).unwrap();
        assert_eq!(names(&t), ["get_weather", "builtin:web_search"]);
        assert_eq!(t[1].kind, ToolKind::Builtin);
        let legacy = br#"{"functions":[{"name":"get_weather"}],"tools":null}"#;
        assert_eq!(names(&offered(legacy).unwrap()), ["get_weather"]);
        assert!(offered(br#"{"messages":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn bad_tool_lists_are_refused() {
        for (body, bad_name) in [
            (
                &br#"{"tools":[{"type":"function","function":{"name":"a::b"}}]}"#[..],
                true,
            ),
            (
                br#"{"tools":[{"type":"function","function":{"name":"a\u0000b"}}]}"#,
                true,
            ),
            (
                br#"{"tools":[{"type":"function","function":{"name":""}}]}"#,
                true,
            ),
            (br#"{"functions":[{"name":"a/b"}]}"#, true),
            (br#"{"tools":[{"type":"x::y"}]}"#, true),
            (
                br#"{"tools":[{"type":"function","function":{"name":"a","name":"b"}}]}"#,
                false,
            ),
            (
                br#"{"tools":[{"type":"function","function":{"name":"a"},"name":"b"}]}"#,
                false,
            ),
            (br#"{"tools":[{"type":"function"}]}"#, false),
            (br#"{"tools":{"type":"function"}}"#, false),
            (
                br#"{"tools":[{"type":"function","function":{"name":7}}]}"#,
                false,
            ),
        ] {
            let e = offered(body).unwrap_err();
            assert_eq!(
                e == ToolError::BadName,
                bad_name,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    fn callable(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tool_calls_are_found_in_chat_responses_and_anthropic_messages() {
        let ok = callable(&["get_weather"]);
        let chat = br#"{"choices":[{"message":{"tool_calls":[{"id":"1","type":"function","function":{"name":"get_weather","arguments":"{}"}},{"id":"2","type":"function","function":{"name":"send_email","arguments":"{\"to\":\"x\"}"}}]}}]}"#;
        assert_eq!(
            check_json(chat, &ok, 1 << 20),
            Err(Refusal {
                tool: Some("send_email".into())
            })
        );
        let responses =
            br#"{"output":[{"type":"function_call","name":"get_weather","arguments":"{}"}]}"#;
        assert_eq!(check_json(responses, &ok, 1 << 20), Ok(()));
        let anthropic = br#"{"content":[{"type":"tool_use","name":"rm_rf","input":{}}]}"#;
        assert!(check_json(anthropic, &ok, 1 << 20).is_err());
        let legacy =
            br#"{"choices":[{"message":{"function_call":{"name":"x","arguments":"{}"}}}]}"#;
        assert!(check_json(legacy, &ok, 1 << 20).is_err());
        let odd = br#"{"choices":[{"message":{"tool_calls":[{"function":{"name":7}}]}}]}"#;
        assert!(check_json(odd, &ok, 1 << 20).is_err());
        assert!(check_json(b"not json", &ok, 1 << 20).is_err());
        assert!(check_json(br#"{"a":1}"#, &ok, 3).is_err(), "over the bound");
    }

    #[test]
    fn a_stream_is_cut_at_the_first_refused_call_whatever_the_chunking() {
        let ok = Arc::new(callable(&["get_weather"]));
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"name\":\"send_email\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\"{secret}\"}}]}}]}\n\n",
            "data: [DONE]\n\n"
        );
        for size in [1, 7, 64, stream.len()] {
            let mut g = SseGuard::new(ok.clone(), "r1".into(), 1 << 16);
            let chunks: Vec<&[u8]> = stream.as_bytes().chunks(size).collect();
            let mut out = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                out.extend(g.feed(c, i + 1 == chunks.len()));
            }
            let out = String::from_utf8(out).unwrap();
            assert!(out.contains("get_weather"), "{size}");
            assert!(!out.contains("\"name\":\"send_email\""), "{size}");
            assert!(!out.contains("secret"), "{size}");
            assert!(
                out.ends_with("\"tool\":\"send_email\"}}\n\n")
                    || out.contains("\"tool\":\"send_email\""),
                "{size}: {out}"
            );
            assert!(out.contains("event: error\ndata: {\"error\""), "{size}");
            assert_eq!(
                g.refused().and_then(|r| r.tool.as_deref()),
                Some("send_email")
            );
        }
    }

    #[test]
    fn an_allowed_stream_passes_unchanged_and_an_endless_event_is_bounded() {
        let ok = Arc::new(callable(&["get_weather"]));
        let stream = "event: response.output_item.added\r\ndata: {\"item\":{\"type\":\"function_call\",\"name\":\"get_weather\"}}\r\n\r\ndata: [DONE]\n\n";
        let mut g = SseGuard::new(ok.clone(), "r".into(), 1 << 16);
        let mut out = g.feed(&stream.as_bytes()[..20], false);
        out.extend(g.feed(&stream.as_bytes()[20..], true));
        assert_eq!(out, stream.as_bytes());
        let mut g = SseGuard::new(ok, "r".into(), 100);
        let mut refused = false;
        for _ in 0..10 {
            let out = g.feed(&[b'x'; 30], false);
            refused |= String::from_utf8_lossy(&out).contains("tool_call_refused");
        }
        assert!(refused && g.refused().is_some());
        assert!(g.feed(b"data: {}\n\n", true).is_empty());
    }
}
