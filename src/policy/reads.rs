//! Which parts of the request context a policy set reads, derived from the
//! policies' text: what the decision cache keys on.
//!
//! Each policy is walked in its JSON form ([`cedar_policy::Policy::to_json`],
//! Cedar's EST). An attribute access or `has` test whose chain of `.`/`has`
//! steps is rooted at `context` (`context.http.method`,
//! `context.http.headers["x-team"]`, `context.body has model`) records the
//! path of attribute names it names. Any other use of `context` — the
//! variable on its own (`context == {..}`, `context.getTag(..)`), a step
//! whose attribute is not a plain string, a JSON shape this walk does not
//! know — makes the set read [`ContextReads::Whole`]: the cache then keys
//! on the whole context. Over-keying costs hits; under-keying would serve a
//! wrong answer, so whatever the walk cannot narrow is taken as read.
//!
//! A read of a path covers everything under it (the value of
//! `context.http` depends on every field of `http`) and everything above it
//! (whether `context.body.model` exists depends on whether `body` does):
//! [`ContextReads::covers`] says whether a context node is in the key.

use std::collections::BTreeSet;

/// The context paths a policy set reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextReads {
    /// Only these attribute paths (and what is under and above them).
    Paths(BTreeSet<Vec<String>>),
    /// Some policy uses the context in a way the walk cannot narrow.
    Whole,
}

impl Default for ContextReads {
    fn default() -> Self {
        Self::Paths(BTreeSet::new())
    }
}

impl ContextReads {
    /// The context reads of one policy, from its JSON form.
    pub fn of_policy(policy_json: &serde_json::Value) -> Self {
        let mut reads = Self::default();
        walk(policy_json, &mut reads);
        reads
    }

    /// Adds what `other` reads.
    pub fn extend(&mut self, other: &ContextReads) {
        match (&mut *self, other) {
            (Self::Whole, _) => {}
            (_, Self::Whole) => *self = Self::Whole,
            (Self::Paths(mine), Self::Paths(theirs)) => {
                mine.extend(theirs.iter().cloned());
            }
        }
    }

    /// Whether the context node at `path` can change a decision: it is on,
    /// under or above a read path.
    pub fn covers(&self, path: &[&str]) -> bool {
        match self {
            Self::Whole => true,
            Self::Paths(paths) => paths
                .iter()
                .any(|read| read.iter().zip(path).all(|(r, p)| r.as_str() == *p)),
        }
    }
}

/// Records in `reads` every context access under `node`.
fn walk(node: &serde_json::Value, reads: &mut ContextReads) {
    if matches!(reads, ContextReads::Whole) {
        return;
    }
    match node {
        serde_json::Value::Object(map) => {
            if map.len() == 1 {
                if map.get("Var").and_then(|v| v.as_str()) == Some("context") {
                    // `context` on its own: its whole value is used.
                    *reads = ContextReads::Whole;
                    return;
                }
                if let Some(step) = map.get(".").or_else(|| map.get("has")) {
                    match context_path(step) {
                        Access::Context(path) => {
                            if let ContextReads::Paths(paths) = reads {
                                paths.insert(path);
                            }
                            return;
                        }
                        Access::Unclear => {
                            *reads = ContextReads::Whole;
                            return;
                        }
                        Access::Other => {}
                    }
                }
            }
            for value in map.values() {
                walk(value, reads);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                walk(item, reads);
            }
        }
        _ => {}
    }
}

enum Access {
    /// A chain of attribute steps rooted at `context`.
    Context(Vec<String>),
    /// Not rooted at `context` (its operand is walked as any expression).
    Other,
    /// A step this walk cannot read.
    Unclear,
}

/// The attribute path of a `.`/`has` step `{"left": .., "attr": ".."}`.
fn context_path(step: &serde_json::Value) -> Access {
    let mut path = Vec::new();
    let mut step = step;
    loop {
        let (Some(left), Some(attr)) = (step.get("left"), step.get("attr")) else {
            return Access::Unclear;
        };
        // `e has a.b` keeps its attribute list: `"attr": ["a", "b"]`.
        match attr {
            serde_json::Value::String(one) => path.push(one.clone()),
            serde_json::Value::Array(many) if !many.is_empty() => {
                for attr in many.iter().rev() {
                    let Some(attr) = attr.as_str() else {
                        return Access::Unclear;
                    };
                    path.push(attr.to_string());
                }
            }
            _ => return Access::Unclear,
        }
        let Some(map) = left.as_object() else {
            return Access::Other;
        };
        if map.len() == 1 && map.get("Var").and_then(|v| v.as_str()) == Some("context") {
            path.reverse();
            return Access::Context(path);
        }
        match map.get(".").or_else(|| map.get("has")) {
            Some(inner) if map.len() == 1 => step = inner,
            _ => return Access::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn reads(text: &str) -> ContextReads {
        let policy = cedar_policy::Policy::from_str(text).expect("parses");
        ContextReads::of_policy(&policy.to_json().expect("json"))
    }

    fn paths(list: &[&[&str]]) -> ContextReads {
        ContextReads::Paths(
            list.iter()
                .map(|p| p.iter().map(|s| s.to_string()).collect())
                .collect(),
        )
    }

    #[test]
    fn attribute_paths_rooted_at_context_are_collected() {
        let cases: &[(&str, ContextReads)] = &[
            ("permit (principal, action, resource);", paths(&[])),
            (
                r#"permit (principal, action, resource) when { context.http.method == "GET" };"#,
                paths(&[&["http", "method"]]),
            ),
            (
                r#"permit (principal, action, resource) when { context.http.headers["x-team"] == "a" && context.body has model };"#,
                paths(&[&["http", "headers", "x-team"], &["body", "model"]]),
            ),
            (
                r#"forbid (principal, action, resource) unless { principal.tier == "paid" || context.http has source_ip && context.http.source_ip.isInRange(ip("10.0.0.0/8")) };"#,
                paths(&[&["http", "source_ip"]]),
            ),
            (
                r#"permit (principal, action, resource) when { ["a"].contains(context.route.tenant) };"#,
                paths(&[&["route", "tenant"]]),
            ),
            (
                r#"permit (principal, action, resource) when { context.body has model.family };"#,
                paths(&[&["body", "model", "family"]]),
            ),
            (
                r#"permit (principal, action, resource) when { context == {} };"#,
                ContextReads::Whole,
            ),
            (
                r#"permit (principal, action, resource) when { {a: context}.a.http.tls };"#,
                ContextReads::Whole,
            ),
            (
                r#"permit (principal, action, resource) when { principal.tenant == resource.tenant };"#,
                paths(&[]),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(&reads(text), want, "{text}");
        }
    }

    #[test]
    fn a_read_covers_what_is_under_and_above_it() {
        let r = paths(&[&["http", "headers"], &["body", "model"]]);
        assert!(r.covers(&["http"]));
        assert!(r.covers(&["http", "headers"]));
        assert!(r.covers(&["http", "headers", "x-team"]));
        assert!(r.covers(&["body"]));
        assert!(r.covers(&["body", "model"]));
        assert!(!r.covers(&["body", "size"]));
        assert!(!r.covers(&["http", "method"]));
        assert!(!r.covers(&["route"]));
        assert!(ContextReads::Whole.covers(&["anything"]));
    }

    #[test]
    fn whole_absorbs_paths() {
        let mut r = paths(&[&["http"]]);
        r.extend(&ContextReads::Whole);
        assert_eq!(r, ContextReads::Whole);
        let mut r = ContextReads::Whole;
        r.extend(&paths(&[&["http"]]));
        assert_eq!(r, ContextReads::Whole);
    }
}
