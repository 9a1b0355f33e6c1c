//! Evaluating one Cedar request against a snapshot, with Tollgate's rule for
//! evaluation errors applied.

use cedar_policy::{AuthorizationError, Authorizer, Decision as CedarDecision, Entities, Request};

use super::Snapshot;
use crate::config::OnEvaluationError;
use crate::decision::PolicyErrorInfo;

/// Cedar's answer, after the evaluation-error rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allow: bool,
    /// Policies that determined the decision (`@id`s).
    pub policies: Vec<String>,
    pub errors: Vec<PolicyErrorInfo>,
}

/// Evaluates `request`. Cedar skips a policy whose condition errors — for a
/// `forbid` that can turn into an allow — so with [`OnEvaluationError::Deny`]
/// any error denies.
pub fn evaluate(
    authorizer: &Authorizer,
    snapshot: &Snapshot,
    request: &Request,
    entities: &Entities,
    on_error: OnEvaluationError,
) -> Verdict {
    let response = authorizer.is_authorized(request, &snapshot.policies, entities);
    let diagnostics = response.diagnostics();
    let errors: Vec<PolicyErrorInfo> = diagnostics
        .errors()
        .map(|e| match e {
            AuthorizationError::PolicyEvaluationError(e) => PolicyErrorInfo {
                policy_id: e.policy_id().to_string(),
                message: e.inner().to_string(),
            },
        })
        .collect();
    let cedar_allow = response.decision() == CedarDecision::Allow;
    let allow = cedar_allow && (errors.is_empty() || on_error == OnEvaluationError::Ignore);
    Verdict {
        allow,
        policies: diagnostics.reason().map(ToString::to_string).collect(),
        errors,
    }
}
