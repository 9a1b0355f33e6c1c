//! Request path canonicalization.
//!
//! A policy decision about `/v1/models/acme-private` is only worth something
//! if the upstream serves exactly that path. Servers disagree on how to read
//! `%2F`, `\`, `//`, `.` and `..`, so every ambiguous form is refused here
//! rather than guessed: the path is split from its query, percent-decoded
//! exactly once, and accepted only if no reading of it could differ.

use std::collections::BTreeMap;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty or does not start with '/'")]
    NotAbsolute,
    #[error("path contains an invalid percent-encoding")]
    BadEncoding,
    #[error("path contains an encoded '/', '\\' or '%'")]
    EncodedSeparator,
    #[error("path contains a backslash")]
    Backslash,
    #[error("path contains an empty segment ('//')")]
    EmptySegment,
    #[error("path contains a '.' or '..' segment")]
    DotSegment,
    #[error("path contains a control character, NUL or ';'")]
    ForbiddenCharacter,
    #[error("path is not valid UTF-8 once decoded")]
    NotUtf8,
}

/// A path that passed canonicalization, with its parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    /// Decoded path, always starting with '/'.
    pub path: String,
    /// Decoded query parameters; a repeated name keeps its first value.
    pub query: BTreeMap<String, String>,
}

impl CanonicalPath {
    /// The path's segments (without the leading empty one).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').skip(1)
    }
}

/// Canonicalizes a raw `:path` (path plus optional query, as Envoy sends it).
pub fn canonicalize(raw: &str) -> Result<CanonicalPath, PathError> {
    let (raw_path, raw_query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    // Envoy strips fragments; anything after '#' would be ambiguous.
    if raw_path.contains('#') {
        return Err(PathError::ForbiddenCharacter);
    }
    if !raw_path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_path(raw_path)?;
    if decoded.len() > 1 {
        // A trailing slash is a distinct resource for most upstreams; keep it
        // but treat it like any other empty segment below.
        for segment in decoded[1..].split('/') {
            match segment {
                "" => return Err(PathError::EmptySegment),
                "." | ".." => return Err(PathError::DotSegment),
                _ => {}
            }
        }
    }
    let query = raw_query.map(parse_query).unwrap_or_default();
    Ok(CanonicalPath {
        path: decoded,
        query,
    })
}

fn decode_path(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let decoded = if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEncoding)?;
            let value = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::BadEncoding)?;
            i += 3;
            // Decoding these would change the path's structure, or leave a
            // second layer of encoding for the upstream to decode again.
            if matches!(value, b'/' | b'\\' | b'%') {
                return Err(PathError::EncodedSeparator);
            }
            value
        } else {
            i += 1;
            if b == b'\\' {
                return Err(PathError::Backslash);
            }
            b
        };
        if decoded < 0x20 || decoded == 0x7f || decoded == b';' {
            return Err(PathError::ForbiddenCharacter);
        }
        out.push(decoded);
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8)
}

fn parse_query(raw: &str) -> BTreeMap<String, String> {
    let mut query = BTreeMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (decode_query_part(k), decode_query_part(v)) else {
            continue;
        };
        query.entry(k).or_insert(v);
    }
    query
}

fn decode_query_part(raw: &str) -> Option<String> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_table() {
        use PathError::*;
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/v1/chat/completions", Ok("/v1/chat/completions")),
            ("/", Ok("/")),
            ("/v1/models/llama%2D3", Ok("/v1/models/llama-3")),
            ("/v1/models/caf%C3%A9", Ok("/v1/models/café")),
            (
                "/v1/chat/completions?stream=true",
                Ok("/v1/chat/completions"),
            ),
            ("", Err(NotAbsolute)),
            ("v1/chat", Err(NotAbsolute)),
            ("/v1//chat", Err(EmptySegment)),
            ("//v1/chat", Err(EmptySegment)),
            ("/v1/chat/", Err(EmptySegment)),
            ("/v1/../admin", Err(DotSegment)),
            ("/v1/./chat", Err(DotSegment)),
            ("/v1/%2e%2e/admin", Err(DotSegment)),
            ("/v1/%2E%2E/admin", Err(DotSegment)),
            ("/v1/.%2e/admin", Err(DotSegment)),
            ("/v1/models%2Fsecret", Err(EncodedSeparator)),
            ("/v1/models%2fsecret", Err(EncodedSeparator)),
            ("/v1/models%5Csecret", Err(EncodedSeparator)),
            ("/v1/models%252Fsecret", Err(EncodedSeparator)),
            ("/v1\\models", Err(Backslash)),
            ("/v1/models%00", Err(ForbiddenCharacter)),
            ("/v1/models;jsessionid=1", Err(ForbiddenCharacter)),
            ("/v1/models%3Bx", Err(ForbiddenCharacter)),
            ("/v1/%zz", Err(BadEncoding)),
            ("/v1/%2", Err(BadEncoding)),
            ("/v1/%C3", Err(NotUtf8)),
        ];
        for (raw, want) in cases {
            let got = canonicalize(raw).map(|c| c.path);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "path {raw:?}");
        }
    }

    #[test]
    fn case_is_preserved_not_folded() {
        // Routes match case-sensitively, so `/V1/...` is simply another path.
        assert_eq!(
            canonicalize("/V1/Chat/Completions").map(|c| c.path),
            Ok("/V1/Chat/Completions".to_string())
        );
    }

    #[test]
    fn query_is_parsed_and_decoded_once() {
        let c = canonicalize("/x?api-version=2024%2D02&a=1&a=2&q=a+b&bad=%ff").expect("ok");
        assert_eq!(
            c.query.get("api-version").map(String::as_str),
            Some("2024-02")
        );
        assert_eq!(c.query.get("a").map(String::as_str), Some("1"));
        assert_eq!(c.query.get("q").map(String::as_str), Some("a b"));
        assert!(!c.query.contains_key("bad"));
    }

    proptest::proptest! {
        /// Whatever is accepted is unambiguous, and canonical: feeding it
        /// back gives the same path.
        #[test]
        fn accepted_paths_are_canonical_and_stable(raw in "(/|[a-z]|%2[eEfF]|%5[cC]|%25|%4[01]|\\.|\\.\\.|\\\\|;|%00|%C3%A9){0,12}(\\?[a-z=&%]{0,6})?") {
            if let Ok(c) = canonicalize(&raw) {
                proptest::prop_assert!(c.path.starts_with('/'));
                proptest::prop_assert!(!c.path.contains('\\') && !c.path.contains('%') && !c.path.contains(';'));
                if c.path.len() > 1 {
                    for seg in c.path[1..].split('/') {
                        proptest::prop_assert!(!seg.is_empty() && seg != "." && seg != "..", "segment {seg:?} in {:?}", c.path);
                    }
                }
                let again = canonicalize(&c.path).map(|c| c.path);
                proptest::prop_assert_eq!(again, Ok(c.path.clone()));
            }
        }
    }
}
