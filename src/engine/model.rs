//! Where a request names its model, and refusing requests that name it
//! twice.
//!
//! Upstreams differ on where they read the model: OpenAI-style servers read
//! the body's `model`, LiteLLM-style proxies prefer `?model=`, Azure-style
//! deployments and Gemini-style APIs put it in the path
//! (`/openai/deployments/{model}/…`, `/v1beta/models/{model}:generateContent`),
//! and some gateways take a header. A policy decides on one of them; if
//! another one disagrees, the upstream may serve a model the policy never
//! saw. So every source is read on every route, and different values are
//! refused with [`Reason::AmbiguousModel`].

use crate::decision::Reason;
use crate::path::CanonicalPath;
use crate::request::HttpRequest;

/// Path segments whose next segment names a model.
const MODEL_COLLECTIONS: [&str; 2] = ["models", "deployments"];

/// Every place the request names a model, as `(source, value)`.
fn sources<'a>(
    request: &'a HttpRequest,
    path: &'a CanonicalPath,
    path_params: &'a [(String, String)],
    body_model: Option<&'a str>,
    model_headers: &'a [String],
) -> Result<Vec<(&'static str, String)>, Reason> {
    let mut found: Vec<(&'static str, String)> = Vec::new();
    if let Some(m) = body_model {
        found.push(("body", m.to_string()));
    }
    // Every `model` query parameter, not only the first: an upstream may
    // read the last one.
    if let Some((_, raw_query)) = request.raw_path.split_once('?') {
        for pair in raw_query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8()
                    .map(|c| c.into_owned())
            };
            match decode(k) {
                Ok(name) if name == "model" => {
                    let value = decode(v).map_err(|_| Reason::AmbiguousModel)?;
                    found.push(("query", value));
                }
                Ok(_) => {}
                // A name that does not decode might be `model` to someone.
                Err(_) => return Err(Reason::AmbiguousModel),
            }
        }
    }
    for (name, value) in path_params {
        if name == "model" || name == "deployment" {
            found.push(("path", value.clone()));
        }
    }
    let segments: Vec<&str> = path.segments().collect();
    for pair in segments.windows(2) {
        if MODEL_COLLECTIONS.contains(&pair[0]) {
            // `gemini-pro:generateContent` names `gemini-pro`.
            let model = pair[1].split(':').next().unwrap_or(pair[1]);
            found.push(("path", model.to_string()));
        }
    }
    for name in model_headers {
        if let Some(v) = request.header(name) {
            found.push(("header", v.to_string()));
        }
    }
    Ok(found)
}

/// Checks that every place the request names a model names the same one.
/// Sources read: the body's `model`, every `model` query parameter, a path
/// capture named `model` or `deployment`, the segment after a `models` or
/// `deployments` path segment (up to a ':'), and the headers in
/// `context.model_headers`.
pub fn check_single(
    request: &HttpRequest,
    path: &CanonicalPath,
    path_params: &[(String, String)],
    body_model: Option<&str>,
    model_headers: &[String],
) -> Result<(), Reason> {
    let found = sources(request, path, path_params, body_model, model_headers)?;
    match found.split_first() {
        Some(((_, first), rest)) if rest.iter().any(|(_, v)| v != first) => {
            Err(Reason::AmbiguousModel)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw_path: &str, body: Option<&str>, header: Option<&str>) -> Result<(), Reason> {
        let mut request = HttpRequest {
            raw_path: raw_path.into(),
            ..Default::default()
        };
        if let Some(h) = header {
            request.headers.insert("x-model".into(), h.into());
        }
        let path = crate::path::canonicalize(raw_path).expect("path");
        check_single(&request, &path, &[], body, &["x-model".to_string()])
    }

    #[test]
    fn one_model_or_refused() {
        let amb = Err(Reason::AmbiguousModel);
        for (path, body, header, want) in [
            ("/v1/chat/completions", Some("a"), None, Ok(())),
            ("/v1/chat/completions?model=a", Some("a"), None, Ok(())),
            ("/v1/chat/completions?model=b", Some("a"), None, amb),
            ("/v1/chat/completions?model=a&model=b", None, None, amb),
            ("/v1/chat/completions?mod%65l=b", Some("a"), None, amb),
            (
                "/openai/deployments/b/chat/completions",
                Some("a"),
                None,
                amb,
            ),
            (
                "/openai/deployments/a/chat/completions",
                Some("a"),
                None,
                Ok(()),
            ),
            ("/v1beta/models/b:generateContent", Some("a"), None, amb),
            ("/v1/models/a", None, None, Ok(())),
            ("/v1/models", None, Some("a"), Ok(())),
            ("/v1/chat/completions", Some("a"), Some("b"), amb),
        ] {
            assert_eq!(
                check(path, body, header),
                want,
                "{path} {body:?} {header:?}"
            );
        }
    }
}
