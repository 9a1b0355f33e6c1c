//! The usage side of a decision: the request's estimated tokens (counted by
//! the catalog's tokenizer for the model's family), the context-window
//! check, and what policies see as `context.usage`.

use super::Engine;
use super::body::BodyFacts;
use super::context::UsageFacts;
use crate::request::HttpRequest;
use crate::usage::Estimate;

impl Engine {
    /// What the request is expected to use: input tokens counted from a
    /// whole JSON body, and its output cap — `max_tokens` (or an alias),
    /// else the model's `default_output_tokens` from the catalog.
    pub(super) fn estimate(
        &self,
        request: &HttpRequest,
        body: &BodyFacts,
        model: Option<&str>,
    ) -> Estimate {
        let input_tokens = request
            .body
            .as_deref()
            .filter(|_| body.complete)
            .and_then(|b| self.catalog.count_input(model, b));
        let max_output_tokens = body
            .max_tokens
            .and_then(|n| u64::try_from(n).ok())
            .or_else(|| {
                model
                    .and_then(|m| self.catalog.model(m))
                    .and_then(|m| m.default_output_tokens)
            });
        Estimate {
            model: model.map(str::to_string),
            input_tokens,
            max_output_tokens,
        }
    }

    /// Whether the estimated input plus the output cap exceed the model's
    /// context window. Unknown input (an unreadable body) is not refused
    /// here: budgets decide what an unestimated request reserves.
    pub(super) fn context_window_exceeded(&self, estimate: &Estimate) -> bool {
        let window = estimate
            .model
            .as_deref()
            .and_then(|m| self.catalog.model(m))
            .and_then(|m| m.context_window);
        match (window, estimate.input_tokens) {
            (Some(window), Some(input)) => {
                input.saturating_add(estimate.max_output_tokens.unwrap_or(0)) > window
            }
            _ => false,
        }
    }

    /// `context.usage` for the policy.
    pub(super) fn usage_facts<'a>(&'a self, estimate: Option<&Estimate>) -> Option<UsageFacts<'a>> {
        let estimate = estimate?;
        let model = estimate.model.as_deref();
        Some(UsageFacts {
            estimated_input_tokens: estimate.input_tokens,
            max_output_tokens: estimate.max_output_tokens,
            family: model.and_then(|m| self.catalog.family_of(m)),
            model: model.and_then(|m| self.catalog.model(m)),
        })
    }
}
