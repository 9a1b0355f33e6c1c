//! The model catalog (`[usage]` in the config): which model belongs to which
//! family, how each family's input is counted, and each model's context
//! window and output limits.
//!
//! ```toml
//! [usage]
//! default_family = "other"            # for models in no family (optional)
//!
//! [usage.families.gpt-4o]
//! encoding = "o200k_base"             # cl100k_base, o200k_base, p50k_base, r50k_base
//! prefixes = ["gpt-4o", "o3"]         # model ids starting with these belong here
//!
//! [usage.families.other]
//! bytes_per_token = 3.5               # no encoding: an estimate (default 4)
//!
//! [usage.models."gpt-4o-mini"]
//! family = "gpt-4o"
//! context_window = 128000             # input + output tokens
//! max_output_tokens = 16384
//! default_output_tokens = 1024        # reserved when the request sets no max_tokens
//! price = "gpt-4o-mini-2024-07-18"    # a quota.prices entry (default: the model id)
//! ```
//!
//! Everything is checked when the config loads and the encoders are built
//! then, once per process.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Prices;
use super::tokenizer::{Counter, DEFAULT_BYTES_PER_TOKEN, Encoding};

/// `[usage]`: the model catalog.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Family name → how its input tokens are counted.
    pub families: BTreeMap<String, FamilyConfig>,
    /// Model id → its limits and family.
    pub models: BTreeMap<String, ModelConfig>,
    /// The family of models neither listed nor matched by a prefix. Unset:
    /// the default estimate (4 bytes per token).
    pub default_family: Option<String>,
}

/// `[usage.families.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FamilyConfig {
    /// Count with this tiktoken encoding.
    pub encoding: Option<Encoding>,
    /// Without an encoding: estimate one token per this many bytes
    /// (default 4).
    pub bytes_per_token: Option<f64>,
    /// Model ids starting with one of these belong to the family (the
    /// longest matching prefix wins).
    pub prefixes: Vec<String>,
}

/// `[usage.models."ID"]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub family: Option<String>,
    /// Largest input + output tokens of one request.
    pub context_window: Option<u64>,
    /// Largest output the model generates.
    pub max_output_tokens: Option<u64>,
    /// Output tokens assumed when a request sets no `max_tokens`.
    pub default_output_tokens: Option<u64>,
    /// The `quota.prices` entry this model is priced by (default: its id).
    pub price: Option<String>,
}

/// What the catalog says about one model, as policies see it
/// (`context.usage.model`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub family: Option<String>,
    pub context_window: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub default_output_tokens: Option<u64>,
}

/// The loaded catalog: encoders built, names resolved.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    families: BTreeMap<String, Counter>,
    /// (prefix, family), longest prefix first.
    prefixes: Vec<(String, String)>,
    models: BTreeMap<String, ModelInfo>,
    default: Counter,
    configured: bool,
}

impl UsageConfig {
    /// Checks names and numbers; the message names the key to fix.
    pub fn validate(&self, prices: &Prices) -> Result<(), String> {
        for (name, f) in &self.families {
            match (f.encoding, f.bytes_per_token) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "usage.families.{name:?}: set encoding or bytes_per_token, not both"
                    ));
                }
                (None, Some(b)) if !(b.is_finite() && b > 0.0) => {
                    return Err(format!(
                        "usage.families.{name:?}: bytes_per_token must be a number above 0, not {b}"
                    ));
                }
                _ => {}
            }
            if f.prefixes.iter().any(String::is_empty) {
                return Err(format!(
                    "usage.families.{name:?}: prefixes must not be empty strings"
                ));
            }
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, f) in &self.families {
            for p in &f.prefixes {
                if let Some(other) = seen.insert(p, name) {
                    return Err(format!(
                        "usage.families: prefix {p:?} is listed by both {other:?} and {name:?}; keep it in one"
                    ));
                }
            }
        }
        if let Some(d) = &self.default_family
            && !self.families.contains_key(d)
        {
            return Err(format!(
                "usage.default_family = {d:?} is not a family in usage.families"
            ));
        }
        for (id, m) in &self.models {
            let at = format!("usage.models.{id:?}");
            if let Some(f) = &m.family
                && !self.families.contains_key(f)
            {
                return Err(format!(
                    "{at}: family {f:?} is not in usage.families; add [usage.families.{f:?}]"
                ));
            }
            if m.context_window == Some(0) || m.max_output_tokens == Some(0) {
                return Err(format!(
                    "{at}: context_window and max_output_tokens must be at least 1"
                ));
            }
            if let (Some(w), Some(o)) = (m.context_window, m.max_output_tokens)
                && o > w
            {
                return Err(format!(
                    "{at}: max_output_tokens ({o}) is larger than context_window ({w})"
                ));
            }
            if let (Some(o), Some(d)) = (m.max_output_tokens, m.default_output_tokens)
                && d > o
            {
                return Err(format!(
                    "{at}: default_output_tokens ({d}) is larger than max_output_tokens ({o})"
                ));
            }
            if let Some(p) = &m.price
                && !prices.models.contains_key(p)
            {
                return Err(format!(
                    "{at}: price = {p:?} is not a model in quota.prices"
                ));
            }
        }
        Ok(())
    }
}

impl Catalog {
    /// Builds the catalog of a validated config, and every encoder it names
    /// (once per process: they are shared).
    pub fn build(config: &UsageConfig) -> Self {
        let counter = |f: &FamilyConfig| match f.encoding {
            Some(e) => Counter::Bpe(e),
            None => Counter::Estimate {
                bytes_per_token: f.bytes_per_token.unwrap_or(DEFAULT_BYTES_PER_TOKEN),
            },
        };
        let families: BTreeMap<String, Counter> = config
            .families
            .iter()
            .map(|(name, f)| (name.clone(), counter(f)))
            .collect();
        for c in families.values() {
            c.warm();
        }
        let mut prefixes: Vec<(String, String)> = config
            .families
            .iter()
            .flat_map(|(name, f)| f.prefixes.iter().map(|p| (p.clone(), name.clone())))
            .collect();
        prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        let models = config
            .models
            .iter()
            .map(|(id, m)| {
                (
                    id.clone(),
                    ModelInfo {
                        family: m.family.clone(),
                        context_window: m.context_window,
                        max_output_tokens: m.max_output_tokens,
                        default_output_tokens: m.default_output_tokens,
                    },
                )
            })
            .collect();
        let default = config
            .default_family
            .as_ref()
            .and_then(|d| families.get(d).copied())
            .unwrap_or_default();
        Self {
            families,
            prefixes,
            models,
            default,
            configured: config != &UsageConfig::default(),
        }
    }

    /// Whether `[usage]` configures anything (else requests are not
    /// estimated unless a budget needs it, and policies see no
    /// `context.usage`).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// The catalog entry of `model`.
    pub fn model(&self, model: &str) -> Option<&ModelInfo> {
        self.models.get(model)
    }

    /// The family of `model`: its entry's, else the longest matching prefix.
    pub fn family_of<'a>(&'a self, model: &str) -> Option<&'a str> {
        self.models
            .get(model)
            .and_then(|m| m.family.as_deref())
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| model.starts_with(p.as_str()))
                    .map(|(_, f)| f.as_str())
            })
    }

    /// How `model`'s input is counted.
    pub fn counter(&self, model: Option<&str>) -> Counter {
        model
            .and_then(|m| self.family_of(m))
            .and_then(|f| self.families.get(f).copied())
            .unwrap_or(self.default)
    }

    /// The input tokens of `body` for `model` (`None`: not a JSON object).
    pub fn count_input(&self, model: Option<&str>, body: &[u8]) -> Option<u64> {
        self.counter(model).count_body(body)
    }

    /// Adds a price under each model id whose entry names another
    /// `quota.prices` entry, unless the id is priced itself.
    pub fn link_prices(config: &UsageConfig, prices: &mut Prices) {
        for (id, m) in &config.models {
            if let Some(p) = m.price.as_ref().and_then(|p| prices.models.get(p).copied()) {
                prices.models.entry(id.clone()).or_insert(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> UsageConfig {
        toml::from_str(
            r#"
            default_family = "other"
            [families.gpt]
            encoding = "cl100k_base"
            prefixes = ["gpt-4"]
            [families.gpt4o]
            encoding = "o200k_base"
            prefixes = ["gpt-4o"]
            [families.other]
            bytes_per_token = 2.0
            [models."gpt-4o-mini"]
            family = "gpt4o"
            context_window = 100
            max_output_tokens = 50
            "#,
        )
        .expect("parses")
    }

    #[test]
    fn families_resolve_by_entry_then_longest_prefix_then_default() {
        let c = Catalog::build(&config());
        assert_eq!(c.family_of("gpt-4o-mini"), Some("gpt4o"));
        assert_eq!(c.family_of("gpt-4o-2024"), Some("gpt4o"));
        assert_eq!(c.family_of("gpt-4-turbo"), Some("gpt"));
        assert_eq!(c.family_of("llama"), None);
        assert_eq!(
            c.counter(Some("gpt-4-turbo")),
            Counter::Bpe(Encoding::Cl100kBase)
        );
        assert_eq!(
            c.counter(Some("llama")),
            Counter::Estimate {
                bytes_per_token: 2.0
            }
        );
        assert!(c.is_configured());
        assert!(!Catalog::build(&UsageConfig::default()).is_configured());
    }

    #[test]
    fn bad_catalogs_are_refused_with_the_key_to_fix() {
        let prices = Prices::default();
        assert!(config().validate(&prices).is_ok());
        for (edit, want) in [
            (
                r#"[families.x]
                encoding = "cl100k_base"
                bytes_per_token = 3.0"#,
                "not both",
            ),
            (
                r#"[families.x]
                bytes_per_token = 0.0"#,
                "above 0",
            ),
            (
                r#"[models.m]
                family = "nope""#,
                "not in usage.families",
            ),
            (
                r#"[models.m]
                context_window = 10
                max_output_tokens = 20"#,
                "larger than context_window",
            ),
            (
                r#"[models.m]
                price = "nope""#,
                "not a model in quota.prices",
            ),
            (r#"default_family = "nope""#, "default_family"),
            (
                r#"[families.a]
                prefixes = ["x"]
                [families.b]
                prefixes = ["x"]"#,
                "listed by both",
            ),
        ] {
            let c: UsageConfig = toml::from_str(edit).expect(edit);
            let err = c.validate(&prices).expect_err(edit);
            assert!(err.contains(want), "{edit}: {err}");
        }
        assert!(toml::from_str::<UsageConfig>("[families.x]\nencoding = \"nope\"").is_err());
    }
}
