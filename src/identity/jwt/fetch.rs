//! Fetching key material over HTTP: which URLs may be fetched at all, and a
//! GET bounded in size (time is bounded by the caller around the whole
//! discovery + JWKS sequence).

use url::{Host, Url};

/// Parses an HTTP(S) URL Tollgate will fetch (JWKS, OIDC discovery, a
/// discovery document's `jwks_uri`). `https` always; plain `http` only when
/// the host is a loopback IP literal (`127.0.0.0/8`, `::1`) or exactly
/// `localhost`, where nobody on the network can read or alter the keys;
/// never with userinfo (`http://localhost:x@evil.example/` names
/// `evil.example`). The host is taken from the parsed URL, never a string
/// prefix. The error says what to fix.
pub fn checked_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{:?} is not a valid URL: {e}", shown(text)))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: the userinfo may be a credential.
        return Err(
            "a key URL has userinfo (user:password@ before the host); remove it".to_string(),
        );
    }
    let text = shown(text);
    let loopback = match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => Ok(url),
        "http" if loopback => Ok(url),
        "http" => Err(format!(
            "{text:?} must be https:// (plain http only for a loopback IP literal or localhost)"
        )),
        other => Err(format!("{text:?}: scheme {other:?} is not https")),
    }
}

/// At most 200 characters of a URL for a message: a discovery document is
/// remote input and may hold anything.
fn shown(text: &str) -> &str {
    text.char_indices()
        .nth(200)
        .map_or(text, |(i, _)| &text[..i])
}

/// Why one GET failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: no complete answer within fetch_timeout_ms")]
    Timeout { url: String },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: body larger than {max} bytes; raise max_jwks_bytes if it is genuine")]
    TooLarge { url: String, max: usize },
}

/// GETs `url` and returns its body, refusing (and not reading further than)
/// a body over `max` bytes, whatever `Content-Length` claims.
pub async fn get_bounded(
    http: &reqwest::Client,
    url: &Url,
    max: usize,
) -> Result<Vec<u8>, GetError> {
    let transport = |e: reqwest::Error| transport_error(url, e);
    let resp = http.get(url.clone()).send().await.map_err(transport)?;
    read_bounded(resp, url, max).await
}

/// Reads the body of `resp` (an answer from `url`), refusing a status other
/// than 2xx and (without reading further) a body over `max` bytes, whatever
/// `Content-Length` claims.
pub async fn read_bounded(
    mut resp: reqwest::Response,
    url: &Url,
    max: usize,
) -> Result<Vec<u8>, GetError> {
    let transport = |e: reqwest::Error| transport_error(url, e);
    if !resp.status().is_success() {
        return Err(GetError::Status {
            url: url.to_string(),
            status: resp.status().as_u16(),
        });
    }
    let too_large = || GetError::TooLarge {
        url: url.to_string(),
        max,
    };
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(max).unwrap_or(u64::MAX))
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A failed send or read from `url`, as a timeout or a transport error.
pub fn transport_error(url: &Url, e: reqwest::Error) -> GetError {
    if e.is_timeout() {
        GetError::Timeout {
            url: url.to_string(),
        }
    } else {
        GetError::Transport {
            url: url.to_string(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::checked_url;

    #[test]
    fn plain_http_only_for_real_loopback() {
        for ok in [
            "https://idp.example.com/jwks",
            "https://127.0.0.1/jwks",
            "http://127.0.0.1:8080/jwks",
            "http://127.1.2.3/jwks",
            "http://[::1]:9000/jwks",
            "http://localhost/jwks",
            "http://LOCALHOST:80/jwks",
        ] {
            assert!(checked_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://127.evil.example/jwks",
            "http://localhost:x@evil.example/jwks",
            "http://127.0.0.1@evil.example/jwks",
            "http://localhost.evil.example/jwks",
            "http://[::ffff:8.8.8.8]/jwks",
            "http://idp.example.com/jwks",
            "https://user:pw@idp.example.com/jwks",
            "https://user@idp.example.com/jwks",
            "file:///etc/passwd",
            "ftp://127.0.0.1/jwks",
            "127.0.0.1/jwks",
            "",
        ] {
            assert!(checked_url(bad).is_err(), "{bad}");
        }
    }
}
