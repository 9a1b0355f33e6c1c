//! Reading a compact JWS before any key is touched: both JSON parts parsed
//! strictly (a duplicate member name anywhere is refused, RFC 8725 §3.12 /
//! RFC 7519 §4), `crit` refused (RFC 7515 §4.1.11: Tollgate understands no
//! extension), and the token-type rules that keep ID, refresh, logout and
//! security-event tokens out (RFC 8725 §3.11, RFC 9068 §4).

use base64::Engine as _;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::decision::Reason;

/// `typ` values that name a token which is never an access token, after
/// [`normalize_type`].
pub const REFUSED_TYPES: [&str; 4] = ["id+jwt", "refresh+jwt", "logout+jwt", "secevent+jwt"];

/// A JWT's decoded header and payload, each checked for duplicate members.
#[derive(Debug)]
pub struct Parts {
    pub header: Map<String, Value>,
    pub payload: Map<String, Value>,
}

impl Parts {
    /// Decodes the first two base64url parts of `token` strictly; any
    /// decoding error, a non-object part or a duplicate member name at any
    /// depth is `malformed_credential`.
    pub fn decode(token: &str) -> Result<Self, Reason> {
        let mut it = token.split('.');
        let (Some(h), Some(p), Some(_), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(Reason::MalformedCredential);
        };
        Ok(Self {
            header: object(h)?,
            payload: object(p)?,
        })
    }

    /// The header's `crit` member: any at all is refused, since Tollgate
    /// implements no JWS extension (`b64`, …) and RFC 7515 §4.1.11 says a
    /// recipient that does not understand a listed extension must reject.
    pub fn check_crit(&self) -> Result<(), Reason> {
        if self.header.contains_key("crit") {
            return Err(Reason::InvalidCredential);
        }
        Ok(())
    }

    /// The header's `typ`, if present; a non-string `typ` is malformed.
    pub fn typ(&self) -> Result<Option<&str>, Reason> {
        match self.header.get("typ") {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Reason::MalformedCredential),
        }
    }
}

fn object(part: &str) -> Result<Map<String, Value>, Reason> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Reason::MalformedCredential)?;
    match parse_strict(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Reason::MalformedCredential),
    }
}

/// Parses JSON like `serde_json::from_slice::<Value>`, but refuses a
/// duplicate member name in any object, at any depth: two parsers that
/// resolve duplicates differently (first wins, last wins) would see two
/// different tokens. Nesting is bounded by serde_json's recursion limit.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|s| s.0)
}

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Strict(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut m = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if m.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate member name {key:?}"
                )));
            }
            let Strict(v) = map.next_value()?;
            m.insert(key, v);
        }
        Ok(Strict(Value::Object(m)))
    }
}

/// A `typ` value in the form it is compared in: RFC 7515 §4.1.9 makes media
/// types case-insensitive and lets `application/` be omitted.
pub fn normalize_type(typ: &str) -> String {
    let lower = typ.trim().to_ascii_lowercase();
    match lower.strip_prefix("application/") {
        Some(rest) => rest.to_string(),
        None => lower,
    }
}

/// Payload members that mark a token as an OIDC ID token (or another token
/// that is not an access token), whatever its header says: a `token_use`
/// other than `access` (Amazon Cognito), and a payload `typ` of `ID`,
/// `Refresh` or `Logout` (Keycloak). The configured `id_token_claims`
/// (`nonce`, `at_hash`, … by default) are checked by the caller.
pub fn payload_says_not_access(payload: &Map<String, Value>) -> bool {
    if let Some(use_) = payload.get("token_use")
        && use_.as_str() != Some("access")
    {
        return true;
    }
    matches!(payload.get("typ").and_then(Value::as_str),
        Some(t) if ["id", "refresh", "logout"].iter().any(|x| t.eq_ignore_ascii_case(x)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn duplicates_are_refused_at_any_depth() {
        for json in [
            r#"{"a":1,"a":1}"#,
            r#"{"tenant":"acme","x":1,"tenant":"globex"}"#,
            r#"{"o":{"k":1,"k":2}}"#,
            r#"{"l":[{"k":1,"k":2}]}"#,
        ] {
            assert!(parse_strict(json.as_bytes()).is_err(), "{json}");
        }
        let ok = parse_strict(br#"{"a":{"b":[1,2.5,"x",null,true]},"c":-3}"#).expect("parses");
        assert_eq!(ok["a"]["b"][1], 2.5);
        assert_eq!(ok["c"], -3);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(parse_strict(deep.as_bytes()).is_err());
    }

    #[test]
    fn parts_decode_and_refuse() {
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"sub":"a"}"#)
        );
        assert!(Parts::decode(&token).is_ok());
        let dup = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","alg":"none"}"#),
            b64(r#"{"sub":"a"}"#)
        );
        assert_eq!(
            Parts::decode(&dup).map(|_| ()),
            Err(Reason::MalformedCredential)
        );
        let crit = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256","crit":["b64"],"b64":false}"#),
            b64(r#"{"sub":"a"}"#)
        );
        assert_eq!(
            Parts::decode(&crit).expect("decodes").check_crit(),
            Err(Reason::InvalidCredential)
        );
        assert!(Parts::decode("a.b").is_err());
        assert!(Parts::decode(&format!("{}.{}.s.x", b64("{}"), b64("{}"))).is_err());
        assert!(Parts::decode(&format!("{}.{}.s", b64("[]"), b64("{}"))).is_err());
    }

    proptest::proptest! {
        /// Any token text: an answer, never a panic.
        #[test]
        fn any_token_text_is_answered(raw in "[A-Za-z0-9_.=-]{0,300}") {
            let _ = Parts::decode(&raw);
        }

        /// Any JSON object with one member name repeated is refused, and the
        /// same object without the repeat parses to what serde_json reads.
        #[test]
        fn a_repeated_name_is_always_refused(
            members in proptest::collection::btree_map("[a-z\\u{e9}]{0,6}", 0i64..1000, 1..6),
            pick in 0usize..6,
        ) {
            let plain = serde_json::to_string(&members).expect("json");
            let parsed = parse_strict(plain.as_bytes()).expect("no repeat");
            proptest::prop_assert_eq!(parsed, serde_json::from_str::<Value>(&plain).expect("json"));
            let (name, _) = members.iter().nth(pick % members.len()).expect("member");
            let repeated = format!("{},{}:1}}", &plain[..plain.len() - 1], serde_json::to_string(name).expect("json"));
            proptest::prop_assert!(parse_strict(repeated.as_bytes()).is_err(), "{}", repeated);
        }
    }

    #[test]
    fn types_normalize() {
        assert_eq!(normalize_type("application/AT+JWT"), "at+jwt");
        assert_eq!(normalize_type("JWT"), "jwt");
    }

    #[test]
    fn payload_markers() {
        let m = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert!(payload_says_not_access(&m(
            serde_json::json!({"token_use": "id"})
        )));
        assert!(payload_says_not_access(&m(
            serde_json::json!({"typ": "ID"})
        )));
        assert!(!payload_says_not_access(&m(
            serde_json::json!({"token_use": "access", "typ": "Bearer", "azp": "c"})
        )));
    }
}
