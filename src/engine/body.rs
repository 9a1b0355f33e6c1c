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
/// Numeric fields are read as JSON values so that their range is checked
/// here ([`token_limit`], [`in_range`]) rather than left to a policy.
#[derive(Deserialize)]
struct LlmBody {
    model: Option<String>,
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
    max_output_tokens: Option<serde_json::Value>,
    /// Anthropic's legacy text completions.
    max_tokens_to_sample: Option<serde_json::Value>,
    n: Option<serde_json::Value>,
    /// Gemini-style generation settings.
    #[serde(rename = "generationConfig")]
    generation_config: Option<GenerationConfig>,
    /// Ollama-style options (`num_predict: -1` means "no limit" there).
    options: Option<ModelOptions>,
    stream: Option<bool>,
    tools: Option<Vec<IgnoredAny>>,
    functions: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize)]
struct GenerationConfig {
    #[serde(rename = "maxOutputTokens")]
    max_output_tokens: Option<serde_json::Value>,
    #[serde(rename = "candidateCount")]
    candidate_count: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ModelOptions {
    num_predict: Option<serde_json::Value>,
}

/// Largest output-token limit accepted (`max_tokens`,
/// `max_completion_tokens`, `max_output_tokens`, `max_tokens_to_sample`,
/// `generationConfig.maxOutputTokens`, `options.num_predict`). Values run
/// from 1 to this;
/// -1 or 0 ("no limit" for some servers) and anything larger are refused,
/// so a policy comparing `context.body.max_tokens <= 512` never sees a value
/// that means "unlimited" upstream.
pub const MAX_TOKENS_LIMIT: i64 = 1_000_000;

/// Largest number of choices (`n`, `generationConfig.candidateCount`)
/// accepted; values run from 1 to this.
pub const MAX_CHOICES: i64 = 128;

/// A JSON integer in `1..=max`; anything else (negative, zero, fractional,
/// a string, larger than `max`) is [`Reason::InvalidParameter`].
fn in_range(value: &serde_json::Value, max: i64) -> Result<i64, Reason> {
    match value.as_i64() {
        Some(v) if (1..=max).contains(&v) => Ok(v),
        _ => Err(Reason::InvalidParameter),
    }
}

/// The output-token limit the body asks for. Its aliases are read together:
/// given more than once with different values, the upstream and the policy
/// could read different ones, so the body is refused.
fn token_limit(body: &LlmBody) -> Result<Option<i64>, Reason> {
    let mut limit = None;
    let generation = body.generation_config.as_ref();
    for value in [
        &body.max_tokens,
        &body.max_completion_tokens,
        &body.max_output_tokens,
        &body.max_tokens_to_sample,
        &generation.and_then(|g| g.max_output_tokens.clone()),
        &body.options.as_ref().and_then(|o| o.num_predict.clone()),
    ]
    .into_iter()
    .flatten()
    {
        let v = in_range(value, MAX_TOKENS_LIMIT)?;
        if limit.is_some_and(|l| l != v) {
            return Err(Reason::InvalidParameter);
        }
        limit = Some(v);
    }
    Ok(limit)
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
    facts.max_tokens = token_limit(&parsed)?;
    facts.model = parsed.model;
    let candidates = parsed
        .generation_config
        .as_ref()
        .and_then(|g| g.candidate_count.as_ref());
    for n in [parsed.n.as_ref(), candidates].into_iter().flatten() {
        in_range(n, MAX_CHOICES)?;
    }
    facts.stream = Some(parsed.stream.unwrap_or(false));
    let tools = parsed.tools.map_or(0, |t| t.len()) + parsed.functions.map_or(0, |f| f.len());
    facts.has_tools = Some(tools > 0);
    Ok(facts)
}

/// JSON unless the client said otherwise: LLM APIs are JSON, and a missing
/// content type must not be a way around the body checks.
pub(crate) fn is_json(content_type: Option<&str>) -> bool {
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
            r#"{"generationConfig":{"maxOutputTokens":1,"maxOutputTokens":9}}"#,
            r#"{"options":"fast"}"#,
            r#"["model"]"#,
        ] {
            assert_eq!(
                inspect(&req(body), 1 << 20),
                Err(Reason::MalformedBody),
                "{body}"
            );
        }
    }

    #[test]
    fn numeric_parameters_outside_their_range_are_refused() {
        for body in [
            r#"{"max_tokens":-1}"#,
            r#"{"max_tokens":0}"#,
            r#"{"max_tokens":256.5}"#,
            r#"{"max_tokens":1e3}"#,
            r#"{"max_tokens":"many"}"#,
            r#"{"max_tokens":"256"}"#,
            r#"{"max_tokens":1000001}"#,
            r#"{"max_tokens":18446744073709551616}"#,
            r#"{"max_completion_tokens":-1}"#,
            r#"{"max_output_tokens":-5}"#,
            r#"{"max_tokens":100,"max_completion_tokens":9000}"#,
            r#"{"n":0}"#,
            r#"{"n":-1}"#,
            r#"{"n":129}"#,
            r#"{"n":1.5}"#,
            r#"{"max_tokens_to_sample":-1}"#,
            r#"{"generationConfig":{"maxOutputTokens":-1}}"#,
            r#"{"generationConfig":{"candidateCount":0}}"#,
            r#"{"options":{"num_predict":-1}}"#,
            r#"{"options":{"num_predict":-2}}"#,
            r#"{"max_tokens":100,"options":{"num_predict":200}}"#,
        ] {
            assert_eq!(
                inspect(&req(body), 1 << 20),
                Err(Reason::InvalidParameter),
                "{body}"
            );
        }
        for (body, want) in [
            (r#"{"max_tokens":1}"#, Some(1)),
            (r#"{"max_tokens":1000000}"#, Some(1_000_000)),
            (r#"{"max_output_tokens":512}"#, Some(512)),
            (r#"{"max_tokens":64,"max_completion_tokens":64}"#, Some(64)),
            (r#"{"max_tokens":null,"n":128}"#, None),
            (r#"{"generationConfig":{"maxOutputTokens":300}}"#, Some(300)),
            (
                r#"{"options":{"num_predict":42,"temperature":0}}"#,
                Some(42),
            ),
        ] {
            let f = inspect(&req(body), 1 << 20).expect(body);
            assert_eq!(f.max_tokens, want, "{body}");
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
