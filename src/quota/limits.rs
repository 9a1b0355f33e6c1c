//! Limits in the YAML format of Envoy's reference rate limit service, so an
//! existing config comes over unchanged and gets the same answers.
//!
//! ```yaml
//! domain: llm
//! descriptors:
//!   - key: tenant
//!     rate_limit: { unit: minute, requests_per_unit: 1000 }
//!     descriptors:
//!       - key: model
//!         value: llama-3-70b
//!         rate_limit: { unit: minute, requests_per_unit: 100, name: big-model }
//! ```
//!
//! Additive fields the reference lacks, inside `rate_limit`: `algorithm`
//! (`fixed_window`, the reference's, or `sliding_window`), `failure_mode`
//! (`deny`, `allow`, `gateway`) and `charge` (`admission`, the default:
//! all-or-nothing; `always`: hits are usage that already happened and are
//! counted in full even past the limit — for limits charged after the
//! response, such as tokens with Envoy's `apply_on_stream_done`).
//!
//! Units: `second`, `minute`, `hour`, `day`, `week`, `month` (30 days),
//! `year` (365 days), any case. `requests_per_unit: 0` refuses every request
//! (a block list, as in the reference's documentation).
//!
//! Matching follows the reference service: each request entry descends one
//! level, trying the entry's key **and** value, then a wildcard
//! `value: prefix*` of the same key, then the bare `key` (any value, one
//! counter per value); a limit applies only when found at the request's last
//! entry. Keys and values are matched as a pair, never joined into one
//! string, so `(user, internal)` cannot reach a `user_internal` limit (the
//! reference service joins them with `_` and can be fooled that way).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::{Algorithm, ChargeMode, FailureMode, Unit};

/// A limits file that cannot be loaded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct LimitsError {
    pub file: String,
    pub line: u64,
    pub col: u64,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRoot {
    domain: Spanned<String>,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDescriptor {
    key: Spanned<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<Spanned<YamlRateLimit>>,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
    #[serde(default)]
    shadow_mode: bool,
    #[serde(default)]
    detailed_metric: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRateLimit {
    #[serde(default)]
    requests_per_unit: Option<Spanned<i64>>,
    #[serde(default)]
    unit: Option<Spanned<String>>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    replaces: Vec<YamlReplace>,
    #[serde(default)]
    algorithm: Option<Algorithm>,
    #[serde(default)]
    failure_mode: Option<FailureMode>,
    #[serde(default)]
    charge: Option<ChargeMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlReplace {
    name: String,
}

/// One configured limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitDef {
    /// Dotted path in the config (`llm.tenant.model_llama-3-70b`), for
    /// metrics and logs.
    pub full_key: String,
    pub name: Option<String>,
    pub unit: Unit,
    pub requests_per_unit: u64,
    pub unlimited: bool,
    pub shadow: bool,
    pub detailed_metric: bool,
    pub algorithm: Algorithm,
    pub failure_mode: FailureMode,
    /// How hits on this limit are charged.
    pub charge: ChargeMode,
    pub replaces: Vec<String>,
}

#[derive(Debug, Default)]
struct Node {
    /// Children with a value: key → value → node.
    exact: HashMap<String, HashMap<String, Node>>,
    /// Children with `value: "prefix*"`: (key, prefix, node), in file order.
    wildcards: Vec<(String, String, Node)>,
    /// Children without a value (any value of the key).
    any: HashMap<String, Node>,
    limit: Option<Arc<LimitDef>>,
}

impl Node {
    fn is_leaf(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty() && self.any.is_empty()
    }

    fn child(&self, key: &str, value: &str) -> Option<&Node> {
        self.exact
            .get(key)
            .and_then(|values| values.get(value))
            .or_else(|| {
                self.wildcards
                    .iter()
                    .find(|(k, prefix, _)| k == key && value.starts_with(prefix.as_str()))
                    .map(|(_, _, node)| node)
            })
            .or_else(|| self.any.get(key))
    }
}

/// Every domain's limits.
#[derive(Debug, Default)]
pub struct LimitSet {
    domains: HashMap<String, Node>,
    /// Content hash of the files.
    pub version: String,
}

impl LimitSet {
    /// The limit for one request descriptor, as the reference service finds it.
    pub fn lookup(&self, domain: &str, entries: &[(String, String)]) -> Option<Arc<LimitDef>> {
        let mut node = self.domains.get(domain)?;
        let mut found = None;
        for (i, (key, value)) in entries.iter().enumerate() {
            let Some(next) = node.child(key, value) else {
                break;
            };
            if i + 1 == entries.len() {
                found = next.limit.clone();
            }
            if next.is_leaf() {
                break;
            }
            node = next;
        }
        found
    }

    /// Whether `domain` has any limits.
    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// Loads a file, or every `*.yaml` / `*.yml` file of a directory.
    pub fn load(path: &Path) -> Result<Self, LimitsError> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| whole_file(path, format!("cannot read limits directory: {e}")))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
                    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
                })
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        let mut set = Self::default();
        let mut hasher = Sha256::new();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| whole_file(&file, format!("cannot read: {e}")))?;
            hasher.update(file.display().to_string().as_bytes());
            hasher.update(text.as_bytes());
            set.add(&text, &file.display().to_string())?;
        }
        set.version = hex::encode(&hasher.finalize()[..6]);
        Ok(set)
    }

    /// Parses one file's text into this set.
    pub fn add(&mut self, text: &str, file: &str) -> Result<(), LimitsError> {
        let root: YamlRoot = serde_saphyr::from_str(text).map_err(|e| {
            let (line, col) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            LimitsError {
                file: file.to_string(),
                line,
                col,
                message: first_line(&e.to_string()),
            }
        })?;
        let at = |s: &serde_saphyr::Location, message: String| LimitsError {
            file: file.to_string(),
            line: s.line(),
            col: s.column(),
            message,
        };
        if root.domain.value.is_empty() {
            return Err(at(&root.domain.referenced, "domain is empty".into()));
        }
        if self.domains.contains_key(&root.domain.value) {
            return Err(at(
                &root.domain.referenced,
                format!("duplicate domain {:?}", root.domain.value),
            ));
        }
        let mut node = Node::default();
        load_level(&mut node, &root.domain.value, &root.descriptors, &at)?;
        self.domains.insert(root.domain.value, node);
        Ok(())
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or(text).trim().to_string()
}

fn whole_file(path: &Path, message: String) -> LimitsError {
    LimitsError {
        file: path.display().to_string(),
        line: 1,
        col: 1,
        message,
    }
}

type At<'a> = dyn Fn(&serde_saphyr::Location, String) -> LimitsError + 'a;

fn load_level(
    node: &mut Node,
    parent: &str,
    descriptors: &[YamlDescriptor],
    at: &At<'_>,
) -> Result<(), LimitsError> {
    for d in descriptors {
        if d.key.value.is_empty() {
            return Err(at(&d.key.referenced, "descriptor has an empty key".into()));
        }
        let key = d.key.value.clone();
        let value = d.value.clone().filter(|v| !v.is_empty());
        let full_key = match &value {
            Some(v) => format!("{parent}.{key}_{v}"),
            None => format!("{parent}.{key}"),
        };
        let duplicate = match &value {
            Some(v) => match v.strip_suffix('*') {
                Some(prefix) => node
                    .wildcards
                    .iter()
                    .any(|(k, p, _)| *k == key && p == prefix),
                None => node.exact.get(&key).is_some_and(|m| m.contains_key(v)),
            },
            None => node.any.contains_key(&key),
        };
        if duplicate {
            return Err(at(
                &d.key.referenced,
                format!("duplicate descriptor {full_key:?}"),
            ));
        }
        let limit = d
            .rate_limit
            .as_ref()
            .map(|rl| compile_limit(rl, d, &full_key, at))
            .transpose()?;
        let mut child = Node {
            limit: limit.map(Arc::new),
            ..Node::default()
        };
        load_level(&mut child, &full_key, &d.descriptors, at)?;
        match value {
            Some(v) => match v.strip_suffix('*') {
                Some(prefix) => node.wildcards.push((key, prefix.to_string(), child)),
                None => {
                    node.exact.entry(key).or_default().insert(v, child);
                }
            },
            None => {
                node.any.insert(key, child);
            }
        }
    }
    Ok(())
}

fn compile_limit(
    rl: &Spanned<YamlRateLimit>,
    d: &YamlDescriptor,
    full_key: &str,
    at: &At<'_>,
) -> Result<LimitDef, LimitsError> {
    let r = &rl.value;
    let unit = match (&r.unit, r.unlimited) {
        (Some(u), true) if Unit::parse(&u.value).is_some() => {
            return Err(at(&u.referenced, "an unlimited limit takes no unit".into()));
        }
        (_, true) => Unit::Second,
        // Envoy's rate limit filter asks once per request and never says when
        // the request ended, so a slot taken here could never be released.
        (Some(u), false) if u.value.eq_ignore_ascii_case("concurrent") => {
            return Err(at(
                &u.referenced,
                "the rate limit service cannot count requests in flight: Envoy never reports when a request ends, so a slot could not be released; use a quota rule with cost = \"concurrent\" (ext_authz reserves the slot, ext_proc or ReportUsage releases it)".into(),
            ));
        }
        (Some(u), false) => Unit::parse(&u.value).ok_or_else(|| {
            at(
                &u.referenced,
                format!(
                    "unknown unit {:?}; use second, minute, hour, day, week, month or year",
                    u.value
                ),
            )
        })?,
        (None, false) => {
            return Err(at(
                &rl.referenced,
                "rate_limit needs a unit (second, minute, hour, day, week, month, year)".into(),
            ));
        }
    };
    let requests_per_unit = match (&r.requests_per_unit, r.unlimited) {
        (_, true) => 0,
        // 0 is a block list: every request over the limit.
        (Some(n), false) if n.value >= 0 => u64::try_from(n.value).unwrap_or(0),
        (Some(n), false) => {
            return Err(at(
                &n.referenced,
                format!(
                    "requests_per_unit must be 0 (refuse all) or more, not {}",
                    n.value
                ),
            ));
        }
        (None, false) => {
            return Err(at(
                &rl.referenced,
                "rate_limit needs requests_per_unit".into(),
            ));
        }
    };
    for rep in &r.replaces {
        if rep.name.is_empty() {
            return Err(at(
                &rl.referenced,
                "a replaces entry has an empty name".into(),
            ));
        }
        if Some(&rep.name) == r.name.as_ref() {
            return Err(at(&rl.referenced, "a limit cannot replace itself".into()));
        }
    }
    Ok(LimitDef {
        full_key: full_key.to_string(),
        name: r.name.clone().filter(|n| !n.is_empty()),
        unit,
        requests_per_unit,
        unlimited: r.unlimited,
        shadow: d.shadow_mode,
        detailed_metric: d.detailed_metric,
        algorithm: r.algorithm.unwrap_or_default(),
        failure_mode: r.failure_mode.unwrap_or_default(),
        charge: r.charge.unwrap_or_default(),
        replaces: r.replaces.iter().map(|x| x.name.clone()).collect(),
    })
}

/// The live limits, swapped whole on reload; the last good set keeps serving
/// when an edit is broken.
pub struct LimitsStore {
    path: Option<PathBuf>,
    current: arc_swap::ArcSwap<LimitSet>,
}

impl LimitsStore {
    /// Loads `path` (or no limits at all).
    pub fn load(path: Option<&Path>) -> Result<Self, LimitsError> {
        let set = match path {
            Some(p) => LimitSet::load(p)?,
            None => LimitSet::default(),
        };
        Ok(Self {
            path: path.map(Path::to_path_buf),
            current: arc_swap::ArcSwap::from_pointee(set),
        })
    }

    /// The live set.
    pub fn current(&self) -> Arc<LimitSet> {
        self.current.load_full()
    }

    /// The configured file or directory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads; `Ok(true)` when a new set went live.
    pub fn reload(&self) -> Result<bool, LimitsError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let fresh = LimitSet::load(path)?;
        if fresh.version == self.current.load().version {
            return Ok(false);
        }
        self.current.store(Arc::new(fresh));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
domain: llm
descriptors:
  - key: tenant
    rate_limit: { unit: minute, requests_per_unit: 1000 }
    descriptors:
      - key: model
        value: llama-3-70b
        rate_limit: { unit: minute, requests_per_unit: 100, name: big }
      - key: model
        rate_limit: { unit: minute, requests_per_unit: 500 }
  - key: api_key
    value: "internal-*"
    rate_limit: { unlimited: true }
  - key: api_key
    rate_limit: { unit: second, requests_per_unit: 10, algorithm: sliding_window, failure_mode: allow }
    shadow_mode: true
"#;

    fn set() -> LimitSet {
        let mut s = LimitSet::default();
        s.add(YAML, "limits.yaml").expect("loads");
        s
    }

    fn e(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn lookups_follow_the_reference_rules() {
        let s = set();
        let rpu = |d: &str, p: &[(&str, &str)]| {
            s.lookup(d, &e(p))
                .map(|l| (l.requests_per_unit, l.unlimited))
        };
        assert_eq!(rpu("llm", &[("tenant", "acme")]), Some((1000, false)));
        assert_eq!(
            rpu("llm", &[("tenant", "acme"), ("model", "llama-3-70b")]),
            Some((100, false))
        );
        assert_eq!(
            rpu("llm", &[("tenant", "acme"), ("model", "other")]),
            Some((500, false))
        );
        assert_eq!(
            rpu("llm", &[("tenant", "acme"), ("model", "x"), ("extra", "y")]),
            None
        );
        assert_eq!(
            rpu("llm", &[("api_key", "internal-batch")]),
            Some((0, true))
        );
        assert_eq!(rpu("llm", &[("api_key", "k1")]), Some((10, false)));
        assert_eq!(rpu("llm", &[("user", "u")]), None);
        assert_eq!(rpu("other", &[("tenant", "acme")]), None);
        let k = s.lookup("llm", &e(&[("api_key", "k1")])).expect("limit");
        assert!(k.shadow);
        assert_eq!(
            (k.algorithm, k.failure_mode),
            (Algorithm::SlidingWindow, FailureMode::Allow)
        );
    }

    #[test]
    fn bad_files_are_refused_with_their_position() {
        let cases = [
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n",
                4,
                "unknown unit",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: concurrent, requests_per_unit: 4 }\n",
                4,
                "cannot count requests in flight",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: -5 }\n",
                4,
                "0 (refuse all) or more",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n  - key: a\n",
                4,
                "duplicate descriptor",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    colour: red\n",
                4,
                "colour",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unlimited: true, unit: second }\n",
                4,
                "no unit",
            ),
            ("domain: \"\"\n", 1, "domain is empty"),
        ];
        for (text, line, want) in cases {
            let err = LimitSet::default().add(text, "l.yaml").expect_err(want);
            assert_eq!(err.line, line, "{err}");
            assert!(err.to_string().starts_with("l.yaml:"), "{err}");
            assert!(err.message.contains(want), "{want:?} not in {err}");
        }
    }

    #[test]
    fn key_and_value_never_join_into_another_key() {
        let mut s = LimitSet::default();
        s.add(
            "domain: d\ndescriptors:\n  - key: user\n    rate_limit: { unit: hour, requests_per_unit: 2 }\n  - key: user_internal\n    rate_limit: { unlimited: true }\n  - key: a\n    value: \"b_c\"\n    rate_limit: { unit: hour, requests_per_unit: 7 }\n",
            "l.yaml",
        )
        .expect("loads");
        let rpu = |p: &[(&str, &str)]| {
            s.lookup("d", &e(p))
                .map(|l| (l.requests_per_unit, l.unlimited))
        };
        assert_eq!(rpu(&[("user", "internal")]), Some((2, false)));
        assert_eq!(rpu(&[("user_internal", "x")]), Some((0, true)));
        assert_eq!(rpu(&[("a_b", "c")]), None);
        assert_eq!(rpu(&[("a", "b_c")]), Some((7, false)));
    }

    proptest::proptest! {
        /// Over generated one-level files and requests whose keys and values
        /// hold `_`, `:`, `.`, `*`, `=` and non-ASCII, the limit found is
        /// exactly the reference's rule applied to (key, value) pairs: the
        /// exact pair, else the first wildcard of that key whose prefix the
        /// value has, else the bare key.
        #[test]
        fn lookup_matches_pairs_exactly(
            limits in proptest::collection::vec(("[ab_:.é]{1,3}", proptest::option::of("[ab_:.=é]{1,3}\\*?")), 1..12),
            requests in proptest::collection::vec(("[ab_:.é]{1,3}", "[ab_:.=*é]{0,4}"), 1..20),
        ) {
            let mut seen = std::collections::HashSet::new();
            let limits: Vec<(String, Option<String>)> = limits.into_iter().filter(|l| seen.insert(l.clone())).collect();
            let mut yaml = String::from("domain: d\ndescriptors:\n");
            for (i, (k, v)) in limits.iter().enumerate() {
                yaml.push_str(&format!("  - key: {}\n", serde_json::to_string(k).unwrap_or_default()));
                if let Some(v) = v {
                    yaml.push_str(&format!("    value: {}\n", serde_json::to_string(v).unwrap_or_default()));
                }
                yaml.push_str(&format!("    rate_limit: {{ unit: hour, requests_per_unit: {} }}\n", i + 1));
            }
            let mut set = LimitSet::default();
            set.add(&yaml, "gen.yaml").map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            for (k, v) in requests {
                let want = limits
                    .iter()
                    .position(|(lk, lv)| lk == &k && lv.as_deref() == Some(v.as_str()) && !v.ends_with('*'))
                    .or_else(|| limits.iter().position(|(lk, lv)| {
                        lk == &k && lv.as_deref().and_then(|lv| lv.strip_suffix('*')).is_some_and(|p| v.starts_with(p))
                    }))
                    .or_else(|| limits.iter().position(|(lk, lv)| lk == &k && lv.is_none()))
                    .map(|i| i as u64 + 1);
                let exact_literal_star = limits.iter().any(|(lk, lv)| lk == &k && lv.as_deref() == Some(v.as_str()));
                let got = set.lookup("d", &[(k.clone(), v.clone())]).map(|l| l.requests_per_unit);
                // A request value that itself ends in `*` equals a wildcard
                // entry's text; both rules agree it matches that entry.
                if !exact_literal_star {
                    proptest::prop_assert_eq!(got, want, "request ({:?}, {:?}) in {}", k, v, yaml);
                }
            }
        }
    }
}
