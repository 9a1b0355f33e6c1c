//! LLM usage facts the quota engine reads: how many tokens a request will
//! probably use (estimated before the call), how many it did use (reported
//! after it), and what they cost by the operator's price table.
//!
//! Money is held as integer **micro-dollars** (1 USD = 1,000,000) so sums
//! are exact and never drift; prices are configured in US dollars per million
//! tokens, which makes a price in micro-dollars per token numerically equal
//! to the configured number.

pub mod catalog;
pub mod response;
pub mod tokenizer;

use std::collections::BTreeMap;

use serde::Deserialize;

/// Tokens a request used, as the upstream's `usage` block reports them
/// (OpenAI `prompt_tokens` / `completion_tokens` /
/// `prompt_tokens_details.cached_tokens`; Anthropic `input_tokens` /
/// `output_tokens` / `cache_read_input_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    /// Input (prompt) tokens, cached ones included.
    pub input: u64,
    /// Output (completion) tokens, reasoning tokens included.
    pub output: u64,
    /// Of `input`, how many were served from the provider's prompt cache.
    pub cached_input: u64,
}

/// Largest token count accepted in a report or an estimate; more is absurd
/// for one request and is refused rather than charged.
pub const MAX_TOKENS: u64 = 100_000_000;

/// What a request is expected to use, from its body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The model the request names.
    pub model: Option<String>,
    /// Estimated input tokens (`None` when the body could not be read).
    pub input_tokens: Option<u64>,
    /// The request's output cap (`max_tokens` and its aliases), when given.
    pub max_output_tokens: Option<u64>,
}

/// Estimates the input tokens of an OpenAI- or Anthropic-style request body
/// without a tokenizer: one token per 4 bytes of text, rounded up, plus 4
/// per message ([`tokenizer::Counter::default`]). `None` when the body is
/// not a JSON object. Families mapped to an encoding are counted exactly by
/// [`catalog::Catalog::count_input`].
pub fn estimate_input_tokens(body: &[u8]) -> Option<u64> {
    tokenizer::Counter::default().count_body(body)
}

/// One model's prices, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Cached input tokens (defaults to the input price).
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Above this many input tokens the `*_above` prices apply to the whole
    /// request (long-context pricing).
    #[serde(default)]
    pub above_input_tokens: Option<u64>,
    #[serde(default)]
    pub input_above: Option<f64>,
    #[serde(default)]
    pub output_above: Option<f64>,
}

impl Price {
    fn check(&self, model: &str) -> Result<(), String> {
        let all = [
            Some(self.input),
            Some(self.output),
            self.cached_input,
            self.input_above,
            self.output_above,
        ];
        if all.iter().flatten().any(|p| !p.is_finite() || *p < 0.0) {
            return Err(format!(
                "quota.prices.{model:?}: prices must be finite and not negative"
            ));
        }
        if self.above_input_tokens.is_some()
            != (self.input_above.is_some() || self.output_above.is_some())
        {
            return Err(format!(
                "quota.prices.{model:?}: above_input_tokens goes with input_above and/or output_above"
            ));
        }
        Ok(())
    }

    /// The cost of `usage` in micro-dollars (rounded up).
    pub fn cost_micros(&self, usage: &TokenUsage) -> u64 {
        let long = self.above_input_tokens.is_some_and(|n| usage.input > n);
        let (input, output) = if long {
            (
                self.input_above.unwrap_or(self.input),
                self.output_above.unwrap_or(self.output),
            )
        } else {
            (self.input, self.output)
        };
        let cached = usage.cached_input.min(usage.input);
        let cached_price = self.cached_input.unwrap_or(input);
        // Dollars per million tokens = micro-dollars per token.
        let micros = (usage.input - cached) as f64 * input
            + cached as f64 * cached_price
            + usage.output as f64 * output;
        if micros.is_finite() && micros > 0.0 {
            // Saturates at u64::MAX for absurd inputs.
            micros.ceil() as u64
        } else {
            0
        }
    }
}

/// What to do for a model the price table does not list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UnknownModel {
    /// Refuse the request (`over_budget`): never a silent zero. The default.
    #[default]
    Deny,
    /// Price it like this listed model.
    PriceAs(String),
}

impl<'de> Deserialize<'de> for UnknownModel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(if text == "deny" {
            Self::Deny
        } else {
            Self::PriceAs(text)
        })
    }
}

/// The price table: model id → price.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prices {
    pub models: BTreeMap<String, Price>,
    pub unknown: UnknownModel,
}

impl Prices {
    /// Checks every price and that `unknown` names a listed model.
    pub fn validate(&self) -> Result<(), String> {
        for (model, price) in &self.models {
            price.check(model)?;
        }
        if let UnknownModel::PriceAs(m) = &self.unknown
            && !self.models.contains_key(m)
        {
            return Err(format!(
                "quota.unknown_model_price = {m:?} is not a model in quota.prices; use \"deny\" or a listed model"
            ));
        }
        Ok(())
    }

    /// The price of `model`, or `None` when it is unpriced and unknown models
    /// are denied.
    pub fn price(&self, model: Option<&str>) -> Option<&Price> {
        model
            .and_then(|m| self.models.get(m))
            .or_else(|| match &self.unknown {
                UnknownModel::Deny => None,
                UnknownModel::PriceAs(m) => self.models.get(m),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_count_the_text_fields() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"},{"role":"user","content":[{"type":"text","text":"abcd"}]}]}"#;
        // 12 bytes of text → 3 tokens, + 4 per message.
        assert_eq!(estimate_input_tokens(body), Some(3 + 8));
        assert_eq!(
            estimate_input_tokens(br#"{"input":["abcd","abcd"]}"#),
            Some(2)
        );
        assert_eq!(estimate_input_tokens(b"not json"), None);
        assert_eq!(estimate_input_tokens(b"[1]"), None);
    }

    #[test]
    fn costs_are_exact_micro_dollars_with_long_context_and_cache_prices() {
        let price = Price {
            input: 3.0,
            output: 15.0,
            cached_input: Some(0.3),
            above_input_tokens: Some(200_000),
            input_above: Some(6.0),
            output_above: Some(22.5),
        };
        let u = |input, output, cached_input| TokenUsage {
            input,
            output,
            cached_input,
        };
        assert_eq!(price.cost_micros(&u(1000, 100, 0)), 3000 + 1500);
        assert_eq!(price.cost_micros(&u(1000, 0, 1000)), 300);
        // Above 200k input tokens the whole request is priced higher.
        assert_eq!(price.cost_micros(&u(200_001, 0, 0)), 1_200_006);
        assert_eq!(price.cost_micros(&u(0, 0, 0)), 0);
    }

    #[test]
    fn unknown_models_are_denied_or_priced_as_named() {
        let mut prices = Prices::default();
        prices.models.insert(
            "small".into(),
            Price {
                input: 1.0,
                output: 2.0,
                cached_input: None,
                above_input_tokens: None,
                input_above: None,
                output_above: None,
            },
        );
        assert!(prices.price(Some("other")).is_none());
        prices.unknown = UnknownModel::PriceAs("small".into());
        assert!(prices.price(Some("other")).is_some());
        assert!(prices.validate().is_ok());
        prices.unknown = UnknownModel::PriceAs("nope".into());
        assert!(prices.validate().is_err());
    }
}
