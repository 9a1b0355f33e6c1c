//! The decision cache (`[policy] decision_cache`, off by default): reuses
//! Cedar's verdict for a repeated request.
//!
//! A verdict is a function of the policy set, the entities, the principal,
//! the action, the resource and the context. The key holds:
//! - the policy snapshot version (the cache is replaced whole when it
//!   changes; the version hashes every policy file, the schema and
//!   `entities.json`, so parents and resources the policies reach through
//!   the entities file are covered);
//! - the whole [`Principal`] (every field its entity is built from: id,
//!   kind, tenant, tier, scopes, groups, models);
//! - the action and the resource;
//! - exactly the context nodes the policy set reads
//!   ([`crate::policy::reads::ContextReads`], derived from the policy text
//!   on every load), each with its value, or the whole context when a
//!   policy uses it in a way that cannot be narrowed.
//!
//! Only the verdict is cached: identity is checked and quotas are charged
//! on every request. With a shadow policy set attached the cache is not
//! used (the shadow comparison needs the evaluated request).

use std::sync::Arc;

use super::context::{ContextInputs, cedar_ip, normalize_host};
use crate::config::{ContextConfig, DecisionCacheConfig};
use crate::identity::Principal;
use crate::policy::Snapshot;
use crate::policy::evaluate::Verdict;
use crate::policy::reads::ContextReads;

/// The value of one context node, as the key holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    /// A record (its presence; its fields are nodes of their own).
    Record,
    Bool(bool),
    Long(i64),
    Str(String),
    /// An `ip()` value, in the form the context gives Cedar.
    Ip(String),
}

/// The fixed nodes of the context [`super::context::build_cedar`] makes,
/// by id; the configured headers and query parameters follow.
const FIXED: &[&[&str]] = &[
    &["http"],
    &["http", "method"],
    &["http", "path"],
    &["http", "host"],
    &["http", "tls"],
    &["http", "headers"],
    &["http", "query"],
    &["http", "source_ip"],
    &["body"],
    &["body", "present"],
    &["body", "complete"],
    &["body", "size"],
    &["body", "model"],
    &["body", "max_tokens"],
    &["body", "stream"],
    &["body", "has_tools"],
    &["route"],
    &["route", "name"],
    &["route", "tenant"],
    &["authn"],
    &["usage"],
    &["usage", "estimated_input_tokens"],
    &["usage", "max_output_tokens"],
    &["usage", "model"],
    &["usage", "model", "family"],
    &["usage", "model", "context_window"],
    &["usage", "model", "max_output_tokens"],
];

/// Every node path the context can have with `config`, by id.
fn shape(config: &ContextConfig) -> Vec<Vec<&str>> {
    let mut paths: Vec<Vec<&str>> = FIXED.iter().map(|p| p.to_vec()).collect();
    for name in &config.headers {
        paths.push(vec!["http", "headers", name.as_str()]);
    }
    for name in &config.query_params {
        paths.push(vec!["http", "query", name.as_str()]);
    }
    paths
}

/// Which node ids `reads` covers.
pub fn wanted(config: &ContextConfig, reads: &ContextReads) -> Vec<bool> {
    shape(config)
        .iter()
        .map(|path| reads.covers(path))
        .collect()
}

/// The present context nodes whose id is `wanted`, in id order: the same
/// nodes and values as [`super::context::build_cedar`] builds (a unit test
/// compares them with the JSON form).
pub fn project(
    config: &ContextConfig,
    inputs: &ContextInputs<'_>,
    wanted: &[bool],
) -> Vec<(u16, Node)> {
    let mut out = Vec::new();
    let mut put = |id: usize, node: &dyn Fn() -> Node| {
        if wanted.get(id).copied().unwrap_or(true) {
            out.push((u16::try_from(id).unwrap_or(u16::MAX), node()));
        }
    };
    let req = inputs.request;
    put(0, &|| Node::Record);
    put(1, &|| Node::Str(req.method.clone()));
    put(2, &|| Node::Str(inputs.path.path.clone()));
    put(3, &|| Node::Str(normalize_host(&req.host)));
    put(4, &|| Node::Bool(req.tls));
    put(5, &|| Node::Record);
    put(6, &|| Node::Record);
    if let Some(ip) = req.source_ip {
        put(7, &|| Node::Ip(cedar_ip(ip)));
    }
    let b = inputs.body;
    put(8, &|| Node::Record);
    put(9, &|| Node::Bool(b.present));
    put(10, &|| Node::Bool(b.complete));
    put(11, &|| {
        Node::Long(i64::try_from(b.size).unwrap_or(i64::MAX))
    });
    if let Some(m) = &b.model {
        put(12, &|| Node::Str(m.clone()));
    }
    if let Some(t) = b.max_tokens {
        put(13, &|| Node::Long(t));
    }
    if let Some(s) = b.stream {
        put(14, &|| Node::Bool(s));
    }
    if let Some(t) = b.has_tools {
        put(15, &|| Node::Bool(t));
    }
    put(16, &|| Node::Record);
    if let Some(n) = inputs.route_name {
        put(17, &|| Node::Str(n.to_string()));
    }
    if let Some(t) = inputs.route_tenant {
        put(18, &|| Node::Str(t.to_string()));
    }
    put(19, &|| Node::Str(inputs.authn.to_string()));
    if let Some(u) = inputs.usage {
        let (top, family, model) = u.fields();
        put(20, &|| Node::Record);
        for (name, v) in top {
            let id = if name == "estimated_input_tokens" {
                21
            } else {
                22
            };
            put(id, &|| Node::Long(v));
        }
        put(23, &|| Node::Record);
        if let Some(f) = family {
            put(24, &|| Node::Str(f.to_string()));
        }
        for (name, v) in model {
            let id = if name == "context_window" { 25 } else { 26 };
            put(id, &|| Node::Long(v));
        }
    }
    for (i, name) in config.headers.iter().enumerate() {
        if let Some(v) = req.header(name) {
            put(FIXED.len() + i, &|| Node::Str(v.to_string()));
        }
    }
    let queries = FIXED.len() + config.headers.len();
    for (i, name) in config.query_params.iter().enumerate() {
        if let Some(v) = inputs.path.query.get(name) {
            put(queries + i, &|| Node::Str(v.clone()));
        }
    }
    out.sort_unstable_by_key(|(id, _)| *id);
    out
}

/// What a cached verdict is looked up by (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub principal: Principal,
    pub action: String,
    pub resource: String,
    pub context: Vec<(u16, Node)>,
    /// `context.agent` and `context.via` of an agents hop (merged into the
    /// Cedar context after [`project`]'s parts): `(agent, via)`.
    pub hop: (Option<String>, Option<String>),
}

/// The verdicts of one policy snapshot version.
pub struct Generation {
    version: String,
    wanted: Vec<bool>,
    verdicts: moka::sync::Cache<Key, Arc<Verdict>>,
}

/// The decision cache.
pub struct DecisionCache {
    config: DecisionCacheConfig,
    /// False when the context configuration names a header or query
    /// parameter twice: the context could not be built then, an outcome the
    /// key does not capture, so nothing is cached.
    usable: bool,
    current: arc_swap::ArcSwap<Generation>,
}

impl DecisionCache {
    /// An empty cache for contexts built with `context`.
    pub fn new(config: DecisionCacheConfig, context: &ContextConfig) -> Self {
        let unique = |names: &[String]| {
            let mut sorted: Vec<&String> = names.iter().collect();
            sorted.sort();
            sorted.windows(2).all(|w| w[0] != w[1])
        };
        Self {
            usable: unique(&context.headers) && unique(&context.query_params),
            current: arc_swap::ArcSwap::from_pointee(Generation {
                version: String::new(),
                wanted: Vec::new(),
                verdicts: moka::sync::Cache::new(0),
            }),
            config,
        }
    }

    /// The cache of `snapshot`'s version (a fresh one after a reload) and
    /// which context nodes its key holds; `None` when nothing may be cached.
    pub fn generation(
        &self,
        snapshot: &Snapshot,
        context: &ContextConfig,
    ) -> Option<Arc<Generation>> {
        if !self.usable {
            return None;
        }
        let mut current = self.current.load_full();
        if current.version != snapshot.version {
            current = Arc::new(Generation {
                version: snapshot.version.clone(),
                wanted: wanted(context, &snapshot.context_reads),
                verdicts: moka::sync::Cache::builder()
                    .max_capacity(self.config.max_entries)
                    .time_to_live(std::time::Duration::from_secs(self.config.ttl_secs))
                    .build(),
            });
            self.current.store(current.clone());
        }
        Some(current)
    }
}

impl Generation {
    /// Which context node ids the key holds.
    pub fn wanted(&self) -> &[bool] {
        &self.wanted
    }

    /// The cached verdict for `key`.
    pub fn get(&self, key: &Key) -> Option<Arc<Verdict>> {
        self.verdicts.get(key)
    }

    /// Remembers `verdict` for `key`.
    pub fn insert(&self, key: Key, verdict: Arc<Verdict>) {
        self.verdicts.insert(key, verdict);
    }
}

#[cfg(test)]
mod tests;
