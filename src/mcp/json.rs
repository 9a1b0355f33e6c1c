//! Strict JSON for MCP bodies: a repeated object key anywhere refuses the
//! body (two parsers must never read two different `method`s or `amount`s
//! from one message), and nesting is bounded while parsing, before any
//! recursion over the value.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a body is not strict JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictJsonError {
    #[error("not JSON: {0}")]
    Syntax(String),
    #[error("object key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("nested deeper than {0} levels")]
    TooDeep(usize),
}

/// Parses `bytes` as JSON, refusing repeated keys and nesting deeper than
/// `max_depth` arrays/objects.
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Value, StrictJsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict {
        depth: 0,
        max_depth,
    }
    .deserialize_any(&mut de)
    .map_err(classify)?;
    de.end()
        .map_err(|e| StrictJsonError::Syntax(e.to_string()))?;
    Ok(value)
}

/// Our own errors travel through serde as custom messages with a marker.
fn classify(e: serde_json::Error) -> StrictJsonError {
    let text = e.to_string();
    if let Some(rest) = text.strip_prefix("\u{1}dup:") {
        let key = rest.rsplit_once(" at line").map_or(rest, |(k, _)| k);
        StrictJsonError::DuplicateKey(key.to_string())
    } else if let Some(rest) = text.strip_prefix("\u{1}deep:") {
        let n = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        StrictJsonError::TooDeep(n)
    } else {
        StrictJsonError::Syntax(text)
    }
}

#[derive(Clone, Copy)]
struct Strict {
    depth: usize,
    max_depth: usize,
}

impl Strict {
    fn deserialize_any<'de, D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn inner<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= self.max_depth {
            return Err(E::custom(format_args!("\u{1}deep:{}", self.max_depth)));
        }
        Ok(Self {
            depth: self.depth + 1,
            ..self
        })
    }
}

impl<'de> de::DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.inner()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(inner)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.inner()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("\u{1}dup:{key}")));
            }
            let v = map.next_value_seed(inner)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Nesting depth of a value (a scalar is 0).
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_and_deep_nesting_are_refused() {
        assert!(parse(br#"{"a":{"b":[1,2,{"c":null}]}}"#, 8).is_ok());
        assert_eq!(
            parse(br#"{"method":"a","m\u0065thod":"b"}"#, 8),
            Err(StrictJsonError::DuplicateKey("method".into()))
        );
        assert_eq!(
            parse(br#"{"p":{"x":1,"x":1}}"#, 8),
            Err(StrictJsonError::DuplicateKey("x".into()))
        );
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(
            parse(deep.as_bytes(), 16),
            Err(StrictJsonError::TooDeep(16))
        );
        assert!(matches!(parse(b"{} x", 8), Err(StrictJsonError::Syntax(_))));
        assert!(matches!(parse(b"{", 8), Err(StrictJsonError::Syntax(_))));
    }
}
