//! What an LLM request body says: `model`, `max_tokens`, `stream`, `tools`.

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::decision::Reason;
use crate::request::HttpRequest;

/// Facts about the body that policies may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// The gateway forwarded a body.
    pub present: bool,
    /// The body is whole and was read; when false the fields below are
    /// unknown, and a policy that needs them cannot be satisfied.
    pub complete: bool,
    /// Body size in bytes (declared size when the body was not forwarded).
    pub size: u64,
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub stream: Option<bool>,
    pub has_tools: Option<bool>,
}

/// The fields we read. Unknown fields are ignored; a field of the wrong type
/// or a duplicated field makes the body malformed — parsers that disagree on
/// `{"model":"a","model":"b"}` must not be able to disagree with us.
#[derive(Deserialize)]
struct LlmBody {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stream: Option<bool>,
    tools: Option<Vec<IgnoredAny>>,
    functions: Option<Vec<IgnoredAny>>,
}

/// Reads the body facts of a request.
pub fn inspect(request: &HttpRequest, max_bytes: usize) -> Result<BodyFacts, Reason> {
    let Some(body) = request.body.as_deref().filter(|b| !b.is_empty()) else {
        return Ok(BodyFacts {
            present: false,
            complete: !request.body_partial && request.declared_size.unwrap_or(0) == 0,
            size: request.declared_size.unwrap_or(0),
            ..Default::default()
        });
    };
    let size = request
        .declared_size
        .unwrap_or(body.len() as u64)
        .max(body.len() as u64);
    let mut facts = BodyFacts {
        present: true,
        complete: false,
        size,
        ..Default::default()
    };
    if request.body_partial || body.len() > max_bytes || !is_json(request.header("content-type")) {
        return Ok(facts);
    }
    let parsed: LlmBody = serde_json::from_slice(body).map_err(|_| Reason::MalformedBody)?;
    facts.complete = true;
    facts.model = parsed.model;
    facts.max_tokens = parsed.max_completion_tokens.or(parsed.max_tokens);
    facts.stream = Some(parsed.stream.unwrap_or(false));
    let tools = parsed.tools.map_or(0, |t| t.len()) + parsed.functions.map_or(0, |f| f.len());
    facts.has_tools = Some(tools > 0);
    Ok(facts)
}

/// JSON unless the client said otherwise: LLM APIs are JSON, and a missing
/// content type must not be a way around the body checks.
fn is_json(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(ct) => {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> HttpRequest {
        HttpRequest {
            body: Some(body.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn reads_llm_fields() {
        let f = inspect(
            &req(r#"{"model":"llama-3-8b","max_tokens":256,"stream":true,"tools":[{}],"messages":[]}"#),
            1 << 20,
        )
        .expect("parses");
        assert!(f.present && f.complete);
        assert_eq!(f.model.as_deref(), Some("llama-3-8b"));
        assert_eq!(f.max_tokens, Some(256));
        assert_eq!(f.stream, Some(true));
        assert_eq!(f.has_tools, Some(true));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for body in [
            "{not json",
            r#"{"model": 7}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"["model"]"#,
            r#"{"max_tokens":"many"}"#,
        ] {
            assert_eq!(
                inspect(&req(body), 1 << 20),
                Err(Reason::MalformedBody),
                "{body}"
            );
        }
    }

    #[test]
    fn partial_or_oversized_bodies_leave_fields_unknown() {
        let mut r = req(r#"{"model":"m"}"#);
        r.body_partial = true;
        let f = inspect(&r, 1 << 20).expect("ok");
        assert!(f.present && !f.complete && f.model.is_none());
        let f = inspect(&req(r#"{"model":"m"}"#), 4).expect("ok");
        assert!(!f.complete && f.model.is_none());
    }

    #[test]
    fn non_json_content_is_not_parsed() {
        let mut r = req("--boundary");
        r.headers.insert(
            "content-type".into(),
            "multipart/form-data; boundary=x".into(),
        );
        let f = inspect(&r, 1 << 20).expect("ok");
        assert!(f.present && !f.complete);
    }
}
