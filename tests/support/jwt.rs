//! JWT test helpers: key pairs made with openssl, tokens signed here (also
//! hand-built ones with any header or payload bytes), and an identity
//! provider on loopback whose JWKS and discovery answers a test can change,
//! slow down, grow or take away while Tollgate runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const ISS: &str = "https://idp.example.test/";
pub const AUD: &str = "tollgate";

/// A private key that signs tokens.
pub struct Signer {
    pub key: EncodingKey,
    pub alg: Algorithm,
    pub kid: String,
}

/// Generates a key pair with openssl (`rsa` with `bits`, `ec` P-256, `ed`
/// Ed25519) and returns the signer and its public JWK as JSON, `kid` set.
pub fn keypair(dir: &std::path::Path, kind: &str, bits: u32, kid: &str) -> (Signer, Value) {
    let path = dir.join(format!("{kid}-{kind}-{bits}.pem"));
    let rsa_bits = format!("rsa_keygen_bits:{bits}");
    let args: Vec<&str> = match kind {
        "rsa" => vec!["genpkey", "-algorithm", "RSA", "-pkeyopt", &rsa_bits],
        "ec" => vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
        _ => vec!["genpkey", "-algorithm", "ed25519"],
    };
    let out = Command::new("openssl")
        .args(&args)
        .arg("-out")
        .arg(&path)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read(&path).expect("pem");
    let (key, alg) = match kind {
        "rsa" => (EncodingKey::from_rsa_pem(&pem), Algorithm::RS256),
        "ec" => (EncodingKey::from_ec_pem(&pem), Algorithm::ES256),
        _ => (EncodingKey::from_ed_pem(&pem), Algorithm::EdDSA),
    };
    let key = key.expect("encoding key");
    let mut jwk = Jwk::from_encoding_key(&key, alg).expect("jwk");
    jwk.common.key_id = Some(kid.to_string());
    let mut jwk = serde_json::to_value(&jwk).expect("jwk json");
    // Jwk::from_encoding_key states `alg`; most IdPs do not.
    if let Some(o) = jwk.as_object_mut() {
        o.remove("alg");
    }
    (
        Signer {
            key,
            alg,
            kid: kid.to_string(),
        },
        jwk,
    )
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Valid access-token claims for [`ISS`] / [`AUD`].
pub fn claims() -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 300, "tenant": "acme", "tier": "paid", "scope": "llm:generate"})
}

/// `claims()` with `patch` applied (a null removes the member).
pub fn claims_with(patch: Value) -> Value {
    let mut c = claims();
    for (k, v) in patch.as_object().expect("object") {
        if v.is_null() {
            c.as_object_mut().expect("object").remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// A token with header `{alg, kid, typ: "JWT"}`.
pub fn mint(s: &Signer, claims: &Value) -> String {
    let mut header = Header::new(s.alg);
    header.kid = Some(s.kid.clone());
    jsonwebtoken::encode(&header, claims, &s.key).expect("sign")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A correctly signed token whose header and payload are exactly these
/// JSON texts (duplicate members, `crit`, any `typ`, …).
pub fn mint_raw(s: &Signer, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &s.key, s.alg).expect("sign");
    format!("{input}.{sig}")
}

/// What the identity provider answers on one path.
#[derive(Clone)]
struct Answer {
    body: String,
    delay: Duration,
}

/// An identity provider on loopback: answers per path, changeable at run
/// time, counting requests; stops when dropped.
pub struct Idp {
    pub addr: SocketAddr,
    pub fetches: Arc<AtomicU64>,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("addr")).await
    }

    /// Starts on `addr` (for a provider that comes up after Tollgate).
    pub async fn start_on(addr: SocketAddr) -> Self {
        let fetches = Arc::new(AtomicU64::new(0));
        let answers: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let (count, table) = (fetches.clone(), answers.clone());
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            count.fetch_add(1, Ordering::SeqCst);
            let answer = table.lock().expect("lock").get(uri.path()).cloned();
            async move {
                match answer {
                    Some(a) => {
                        // The provider being slow, not the test waiting.
                        tokio::time::sleep(a.delay).await;
                        (
                            axum::http::StatusCode::OK,
                            [("content-type", "application/json")],
                            a.body,
                        )
                    }
                    None => (
                        axum::http::StatusCode::NOT_FOUND,
                        [("content-type", "text/plain")],
                        String::new(),
                    ),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            fetches,
            answers,
            task,
        }
    }

    /// Answers `path` with `body` after `delay`.
    pub fn answer(&self, path: &str, body: String, delay: Duration) {
        self.answers
            .lock()
            .expect("lock")
            .insert(path.to_string(), Answer { body, delay });
    }

    /// Serves `keys` as the JWKS at `/jwks`, promptly.
    pub fn jwks(&self, keys: &[&Value]) {
        self.answer("/jwks", json!({ "keys": keys }).to_string(), Duration::ZERO);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// An issuer config for [`ISS`] reading `jwks_url`, plus `extra` TOML lines.
pub fn issuer(jwks_url: &str, extra: &str) -> tollgate::identity::jwt::IssuerConfig {
    toml::from_str(&format!(
        "name = \"idp\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\njwks_url = \"{jwks_url}\"\nleeway_secs = 30\n{extra}\n"
    ))
    .expect("issuer config")
}

pub type Client = AuthorizationClient<tonic::transport::Channel>;

/// Asks ext_authz about a chat request with `Authorization: Bearer token`:
/// (HTTP status, reason code).
pub async fn check_bearer(c: &mut Client, token: &str) -> (u16, String) {
    let request = super::check_request(
        "POST",
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {token}"))],
        r#"{"model":"llama-3-8b"}"#,
    );
    let resp = c.check(request).await.expect("check").into_inner();
    match resp.http_response.expect("http_response") {
        HttpResponse::OkResponse(_) => (200, "allowed".into()),
        HttpResponse::DeniedResponse(d) => {
            let body: Value = serde_json::from_str(&d.body).expect("json");
            (
                d.status.map_or(0, |s| s.code as u16),
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
        HttpResponse::ErrorResponse(e) => panic!("{e:?}"),
    }
}

/// Waits (bounded) until `/readyz` answers `status`.
pub async fn wait_ready(admin: SocketAddr, status: u16, limit: Duration) -> bool {
    super::eventually(limit, || async move {
        super::raw_http(admin, "GET", "/readyz", &[], "")
            .await
            .status
            == status
    })
    .await
}

/// The value of one counter sample on `/metrics` (0 when absent): `series`
/// is the metric name with its labels, as exposed.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = super::raw_http(admin, "GET", "/metrics", &[], "")
        .await
        .body;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
