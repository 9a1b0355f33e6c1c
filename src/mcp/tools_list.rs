//! Filtering a `tools/list` answer to the tools the caller may call, in a
//! JSON body or a server-sent event stream (Streamable HTTP answers a POST
//! with either). Each JSON-RPC response carrying `result.tools` keeps only
//! the tools `keep` accepts, and its `cacheScope` (when the server set one)
//! becomes `"private"`: the list is now the caller's own, and a shared
//! cache must not hand it to another caller. Pagination needs nothing more:
//! every page is a response of its own and is filtered on its way.
//!
//! A body that does not parse is replaced by a JSON-RPC error rather than
//! passed on unfiltered.

use serde_json::{Value, json};

/// What one answer became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    pub body: Vec<u8>,
    /// Tools removed.
    pub hidden: usize,
}

/// The error that replaces an answer Tollgate could not read.
pub fn unreadable() -> Value {
    json!({"jsonrpc": "2.0", "id": null, "error": {
        "code": -32603, "message": "the tools/list answer could not be filtered"}})
}

/// Filters one JSON-RPC message in place; returns how many tools it hid.
fn filter_message(message: &mut Value, keep: &dyn Fn(&Value) -> bool) -> usize {
    let Some(result) = message.get_mut("result").and_then(Value::as_object_mut) else {
        return 0;
    };
    let mut hidden = 0;
    if let Some(Value::Array(tools)) = result.get_mut("tools") {
        let before = tools.len();
        tools.retain(|t| keep(t));
        hidden = before - tools.len();
    }
    if result.contains_key("cacheScope") || result.contains_key("ttlMs") {
        result.insert("cacheScope".into(), Value::String("private".into()));
    }
    hidden
}

/// Filters a JSON body.
pub fn filter_json(body: &[u8], keep: &dyn Fn(&Value) -> bool) -> Filtered {
    let Ok(mut message) = serde_json::from_slice::<Value>(body) else {
        return Filtered {
            body: unreadable().to_string().into_bytes(),
            hidden: 0,
        };
    };
    let hidden = match &mut message {
        Value::Array(batch) => batch.iter_mut().map(|m| filter_message(m, keep)).sum(),
        m => filter_message(m, keep),
    };
    Filtered {
        body: message.to_string().into_bytes(),
        hidden,
    }
}

/// Filters a whole `text/event-stream` body: events are separated by blank
/// lines; an event whose `data` is a JSON-RPC message is re-emitted with the
/// filtered message as one `data` line, its other fields kept.
pub fn filter_sse(body: &[u8], keep: &dyn Fn(&Value) -> bool) -> Filtered {
    let Ok(text) = std::str::from_utf8(body) else {
        return Filtered {
            body: format!("event: message\ndata: {}\n\n", unreadable()).into_bytes(),
            hidden: 0,
        };
    };
    let normalized = text.replace("\r\n", "\n");
    let mut out = String::with_capacity(normalized.len());
    let mut hidden = 0;
    for event in normalized.split("\n\n") {
        if event.trim().is_empty() {
            continue;
        }
        let mut others = Vec::new();
        let mut data = Vec::new();
        for line in event.lines() {
            match line.strip_prefix("data:") {
                Some(d) => data.push(d.strip_prefix(' ').unwrap_or(d)),
                None => others.push(line),
            }
        }
        for line in &others {
            out.push_str(line);
            out.push('\n');
        }
        if !data.is_empty() {
            let joined = data.join("\n");
            match serde_json::from_str::<Value>(&joined) {
                Ok(mut message) => {
                    hidden += filter_message(&mut message, keep);
                    out.push_str(&format!("data: {message}\n"));
                }
                // A data field that is not JSON is not an MCP message.
                Err(_) => {
                    for d in data {
                        out.push_str(&format!("data: {d}\n"));
                    }
                }
            }
        }
        out.push('\n');
    }
    Filtered {
        body: out.into_bytes(),
        hidden,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(t: &Value) -> bool {
        t.get("name") != Some(&json!("secret"))
    }

    #[test]
    fn json_and_sse_answers_lose_forbidden_tools() {
        let answer = json!({"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"ok"},{"name":"secret"}],"cacheScope":"public","ttlMs":1000}});
        let f = filter_json(answer.to_string().as_bytes(), &keep);
        let v: Value = serde_json::from_slice(&f.body).expect("json");
        assert_eq!(v["result"]["tools"], json!([{"name":"ok"}]));
        assert_eq!(v["result"]["cacheScope"], json!("private"));
        assert_eq!(f.hidden, 1);

        let sse = format!("event: message\r\nid: 3\r\ndata: {answer}\r\n\r\n: keepalive\n\n");
        let f = filter_sse(sse.as_bytes(), &keep);
        let text = String::from_utf8(f.body).expect("utf8");
        assert!(text.contains("id: 3\n") && text.contains("\"ok\"") && !text.contains("secret"));
        assert_eq!(f.hidden, 1);

        let broken = filter_json(b"{not json", &keep);
        assert!(String::from_utf8_lossy(&broken.body).contains("-32603"));
    }
}
