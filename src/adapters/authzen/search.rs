//! Subject, Resource and Action Search (§8) by evaluation: every candidate
//! Tollgate knows — stored entities of the searched type, or the schema's
//! actions — is decided against the policies with the request's other
//! members, in a stable order, a bounded number per request. Pagination
//! tokens carry the offset of the next candidate, are bound to the query by hash, expire, and are
//! MACed with a per-process key, so one cannot be forged or replayed into
//! another query.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::mapping::{self, OverlayCache, SchemaShape, TypeMap};
use super::model::{self, ActionRef, BadRequest, EntityRef, Evaluation};
use crate::engine::{CedarQuery, Engine};
use crate::metrics::Api;
use crate::policy::Snapshot;

/// Which search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Subject,
    Resource,
    Action,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Subject => "subject",
            Self::Resource => "resource",
            Self::Action => "action",
        }
    }
}

/// Work bounds of one search request.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Results per page when the request gives no `page.limit`, and the most
    /// it may ask for.
    pub default_page: usize,
    pub max_page: usize,
    /// Candidates evaluated per request at most.
    pub max_candidates: usize,
    /// Page token lifetime.
    pub token_ttl_secs: u64,
}

/// A parsed search request.
struct SearchRequest {
    subject: EntityRef,
    action: Option<ActionRef>,
    resource: EntityRef,
    context: Map<String, Value>,
    limit: usize,
    token: Option<String>,
}

fn parse(
    target: Target,
    body: &Map<String, Value>,
    bounds: &Bounds,
) -> Result<SearchRequest, BadRequest> {
    let need = |key: &str| -> Result<&Value, BadRequest> {
        body.get(key)
            .filter(|v| !v.is_null())
            .ok_or_else(|| BadRequest(format!("{key}: missing")))
    };
    let subject = model::entity(need("subject")?, "subject", target != Target::Subject)?;
    let resource = model::entity(need("resource")?, "resource", target != Target::Resource)?;
    // Action Search omits `action`; if one is sent anyway it is ignored.
    let action = match target {
        Target::Action => None,
        _ => Some(model::action(need("action")?, "action")?),
    };
    let context = model::context(body)?;
    let (mut limit, mut token) = (0usize, None);
    if let Some(page) = body.get("page").filter(|v| !v.is_null()) {
        let page = page
            .as_object()
            .ok_or_else(|| BadRequest("page: must be a JSON object".into()))?;
        match page.get("limit") {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| {
                    BadRequest("page.limit: must be a non-negative integer".into())
                })?;
                limit = usize::try_from(n).unwrap_or(usize::MAX);
            }
        }
        match page.get("token") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::String(s)) => token = Some(s.clone()),
            Some(_) => return Err(BadRequest("page.token: must be a string".into())),
        }
    }
    let limit = if limit == 0 {
        bounds.default_page
    } else {
        limit.min(bounds.max_page)
    };
    Ok(SearchRequest {
        subject,
        action,
        resource,
        context,
        limit,
        token,
    })
}

/// What a search needs from the adapter.
pub struct Searcher<'a> {
    pub engine: &'a Engine,
    pub snapshot: &'a Snapshot,
    pub types: &'a TypeMap,
    pub shape: &'a SchemaShape,
    pub key: &'a [u8; 32],
    pub bounds: Bounds,
}

impl Searcher<'_> {
    /// Runs one search and returns the response body.
    pub fn run(&self, target: Target, body: &Map<String, Value>) -> Result<Value, BadRequest> {
        let req = parse(target, body, &self.bounds)?;
        let query_hash = query_hash(target, &req);
        let after = match &req.token {
            None => None,
            Some(token) => Some(self.open_token(token, &query_hash)?),
        };
        // §C.4.6: an input entity Tollgate neither stores nor is told
        // anything about matches nothing, whatever the policies would say of
        // an unknown id.
        let candidates = if self.inputs_known(target, &req) {
            self.candidates(target, &req)
        } else {
            Vec::new()
        };
        let start = after.unwrap_or(0).min(candidates.len());
        let mut overlays = OverlayCache::new();
        let mut results = Vec::new();
        let mut examined = 0usize;
        for candidate in &candidates[start..] {
            if results.len() >= req.limit || examined >= self.bounds.max_candidates {
                break;
            }
            examined += 1;
            if self.permitted(target, &req, candidate, &mut overlays) {
                results.push(match target {
                    Target::Subject => json!({"type": req.subject.ty, "id": candidate}),
                    Target::Resource => json!({"type": req.resource.ty, "id": candidate}),
                    Target::Action => json!({"name": candidate}),
                });
            }
        }
        let next = start + examined;
        let next_token = if next < candidates.len() {
            self.seal_token(&query_hash, next)
        } else {
            String::new()
        };
        Ok(json!({
            "page": {"next_token": next_token, "count": results.len()},
            "results": results,
        }))
    }

    fn inputs_known(&self, target: Target, req: &SearchRequest) -> bool {
        let known = |e: &EntityRef| {
            if !e.properties.is_empty() {
                return true;
            }
            let (ty, id) = mapping::uid_parts(self.types, e);
            crate::engine::principal::entity_uid(&ty, &id)
                .is_ok_and(|uid| self.snapshot.entities.get(&uid).is_some())
        };
        (target == Target::Subject || known(&req.subject))
            && (target == Target::Resource || known(&req.resource))
    }

    /// Candidate ids in a stable order: stored entities of the searched type,
    /// or the schema's actions. An unknown type has none.
    fn candidates(&self, target: Target, req: &SearchRequest) -> Vec<String> {
        let mut ids: Vec<String> = match target {
            Target::Subject | Target::Resource => {
                let searched = if target == Target::Subject {
                    &req.subject.ty
                } else {
                    &req.resource.ty
                };
                let Some(ty) = self.types.declared_type(self.snapshot, searched) else {
                    return Vec::new();
                };
                self.snapshot
                    .entities
                    .iter()
                    .filter(|e| e.uid().type_name() == &ty)
                    .map(|e| e.uid().id().unescaped().to_string())
                    .collect()
            }
            Target::Action => self
                .snapshot
                .schema
                .actions()
                .filter(|a| a.type_name().to_string() == self.types.action_type)
                .map(|a| a.id().unescaped().to_string())
                .collect(),
        };
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn permitted(
        &self,
        target: Target,
        req: &SearchRequest,
        candidate: &str,
        overlays: &mut OverlayCache,
    ) -> bool {
        let with_id = |e: &EntityRef| EntityRef {
            id: Some(candidate.to_string()),
            // The searched-for entity is a stored candidate; the request's
            // properties for it are not laid over every candidate.
            properties: Map::new(),
            ..e.clone()
        };
        let eval = Evaluation {
            subject: if target == Target::Subject {
                with_id(&req.subject)
            } else {
                req.subject.clone()
            },
            resource: if target == Target::Resource {
                with_id(&req.resource)
            } else {
                req.resource.clone()
            },
            action: req.action.clone().unwrap_or_else(|| ActionRef {
                name: candidate.to_string(),
                properties: Map::new(),
            }),
            context: req.context.clone(),
        };
        let Ok(mapped) =
            mapping::map_evaluation(self.types, self.shape, self.snapshot, &eval, overlays)
        else {
            return false;
        };
        let q: &CedarQuery = &mapped.query;
        self.engine
            .decide_on(self.snapshot, q, Some(&mapped.entities), Api::Authzen)
            .is_ok_and(|a| a.verdict.allow)
    }

    /// A token for the page starting at candidate `offset`. The offset, not
    /// the last id, is what it carries: an id examined but not permitted
    /// must not be readable from a token. If the candidates change between
    /// pages, results may repeat or be skipped, which §8.2 allows.
    fn seal_token(&self, query_hash: &str, offset: usize) -> String {
        let exp = now_secs().saturating_add(self.bounds.token_ttl_secs);
        let payload = json!({"q": query_hash, "c": offset, "e": exp}).to_string();
        let mac = hmac_sha256(self.key, payload.as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload.as_bytes()),
            URL_SAFE_NO_PAD.encode(mac)
        )
    }

    /// The offset of a token this process issued for this very query.
    fn open_token(&self, token: &str, query_hash: &str) -> Result<usize, BadRequest> {
        let forged = || {
            BadRequest("page.token: not a token this PDP issued for this query; start again without page.token".into())
        };
        let (payload, mac) = token.split_once('.').ok_or_else(forged)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| forged())?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| forged())?;
        let expected = hmac_sha256(self.key, &payload);
        if mac.len() != expected.len()
            || mac
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0
        {
            return Err(forged());
        }
        let payload: Value = serde_json::from_slice(&payload).map_err(|_| forged())?;
        if payload.get("q").and_then(Value::as_str) != Some(query_hash) {
            return Err(BadRequest(
                "page.token: issued for a different query; send the same subject, action, resource, context and page.limit as the first request".into(),
            ));
        }
        if payload.get("e").and_then(Value::as_u64).unwrap_or(0) < now_secs() {
            return Err(BadRequest(
                "page.token: expired; start again without page.token".into(),
            ));
        }
        payload
            .get("c")
            .and_then(Value::as_u64)
            .and_then(|c| usize::try_from(c).ok())
            .ok_or_else(forged)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Hash of everything a follow-up page must repeat (§8.2: entities and
/// pagination parameters identical), ids of the searched-for entity aside
/// since they are ignored.
fn query_hash(target: Target, req: &SearchRequest) -> String {
    let entity = |e: &EntityRef| json!({"type": e.ty, "id": e.id, "properties": e.properties});
    let canonical = canonical(&json!({
        "target": target.name(),
        "subject": entity(&req.subject),
        "resource": entity(&req.resource),
        "action": req.action.as_ref().map(|a| json!({"name": a.name, "properties": a.properties})),
        "context": req.context,
        "limit": req.limit,
    }));
    hex::encode(&Sha256::digest(canonical.as_bytes())[..16])
}

/// JSON text with object keys sorted, so equal values hash equally whatever
/// order the caller sent members in.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let inner: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&m[k])))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// HMAC-SHA-256 (RFC 2104) with a 32-byte key.
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 has a short key; this checks against a vector
    /// computed for a 32-byte key of 0x0b (RFC 4231 case 1 uses 20 bytes).
    #[test]
    fn hmac_matches_a_reference_implementation() {
        // HMAC-SHA256(key = 32 × 0x0b, "Hi There"), from Python's hmac module.
        let mac = hmac_sha256(&[0x0b; 32], b"Hi There");
        assert_eq!(
            hex::encode(mac),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
    }

    #[test]
    fn canonical_text_ignores_member_order() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"d":2,"c":3}],"x":null}}"#).expect("json");
        let b: Value =
            serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}"#).expect("json");
        assert_eq!(canonical(&a), canonical(&b));
    }
}
