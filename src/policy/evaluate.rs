//! Evaluating one Cedar request against a snapshot, with Tollgate's rule for
//! evaluation errors applied.

use cedar_policy::{
    AuthorizationError, Authorizer, Decision as CedarDecision, Entities, EntityUid, EvalResult,
    PolicySet, Request, Response,
};

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
///
/// Only the policies that can apply are evaluated: the slice of the
/// request's principal type and action, and inside it the policies the
/// tenant index could not place plus those of the principal's tenant (see
/// [`super::slice`]); the answer is the one the whole set gives.
pub fn evaluate(
    authorizer: &Authorizer,
    snapshot: &Snapshot,
    request: &Request,
    entities: &Entities,
    on_error: OnEvaluationError,
) -> Verdict {
    let (Some(principal), Some(action)) = (request.principal(), request.action()) else {
        return evaluate_in(authorizer, &snapshot.policies, request, entities, on_error);
    };
    let Some(slice) = snapshot.slices.get(principal.type_name(), action) else {
        return evaluate_in(authorizer, &snapshot.policies, request, entities, on_error);
    };
    if slice.by_tenant.is_empty() {
        return evaluate_in(authorizer, &slice.unplaced, request, entities, on_error);
    }
    let Some(tenant) = principal_tenant(entities, principal) else {
        // `principal.tenant` would not be a plain comparison for this
        // principal (an error, say): let Cedar see every policy.
        return evaluate_in(authorizer, &snapshot.policies, request, entities, on_error);
    };
    match slice.by_tenant.get(&tenant) {
        None => evaluate_in(authorizer, &slice.unplaced, request, entities, on_error),
        Some(own) => {
            let responses = [
                authorizer.is_authorized(request, &slice.unplaced, entities),
                authorizer.is_authorized(request, own, entities),
            ];
            verdict(&responses, on_error)
        }
    }
}

/// Evaluates `request` against exactly `policies`, with the same rule for
/// errors as [`evaluate`] (the unindexed answer).
pub fn evaluate_in(
    authorizer: &Authorizer,
    policies: &PolicySet,
    request: &Request,
    entities: &Entities,
    on_error: OnEvaluationError,
) -> Verdict {
    let response = authorizer.is_authorized(request, policies, entities);
    verdict(std::slice::from_ref(&response), on_error)
}

/// The principal's `tenant` attribute, when it is an entity reference.
fn principal_tenant(entities: &Entities, principal: &EntityUid) -> Option<EntityUid> {
    match entities
        .get(principal)?
        .attr(super::slice::TENANT_ATTRIBUTE)?
    {
        Ok(EvalResult::EntityUid(uid)) => Some(uid),
        _ => None,
    }
}

/// The verdict of the union of disjoint policy sets, from Cedar's answer for
/// each: Cedar's own rule over the union (a satisfied `forbid` denies, with
/// the satisfied forbids as reasons; else a satisfied `permit` allows, with
/// the satisfied permits; else deny) and every error.
fn verdict(responses: &[Response], on_error: OnEvaluationError) -> Verdict {
    let mut forbids = Vec::new();
    let mut permits = Vec::new();
    let mut errors = Vec::new();
    for response in responses {
        let diagnostics = response.diagnostics();
        // A deny with reasons names satisfied forbids; an allow names
        // satisfied permits; a deny without reasons is "nothing applied".
        let reasons = diagnostics.reason().map(ToString::to_string);
        match response.decision() {
            CedarDecision::Allow => permits.extend(reasons),
            CedarDecision::Deny => forbids.extend(reasons),
        }
        errors.extend(diagnostics.errors().map(|e| match e {
            AuthorizationError::PolicyEvaluationError(e) => PolicyErrorInfo {
                policy_id: e.policy_id().to_string(),
                message: e.inner().to_string(),
            },
        }));
    }
    let cedar_allow = forbids.is_empty() && !permits.is_empty();
    let mut policies = if forbids.is_empty() { permits } else { forbids };
    // Cedar's reasons are a set: report them in one order on every replica.
    policies.sort_unstable();
    errors.sort_unstable_by(|a, b| a.policy_id.cmp(&b.policy_id));
    let allow = cedar_allow && (errors.is_empty() || on_error == OnEvaluationError::Ignore);
    Verdict {
        allow,
        policies,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Expectations, Snapshot};
    use cedar_policy::{Context, EntityUid};

    /// A forbid whose condition errors is skipped by Cedar, so Cedar alone
    /// would allow; Tollgate's default turns the error into a deny.
    #[test]
    fn an_erroring_forbid_denies_unless_the_operator_opts_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("s.cedarschema"),
            "entity User = { age: Long }; entity Doc; action read appliesTo { principal: [User], resource: [Doc] };",
        )
        .expect("schema");
        std::fs::write(
            dir.path().join("p.cedar"),
            "@id(\"all\") permit (principal, action, resource);\n\
             @id(\"minors\") forbid (principal, action, resource) when { principal.age < 18 };",
        )
        .expect("policies");
        let snapshot = Snapshot::load(dir.path(), &Expectations::default()).expect("loads");
        let uid = |s: &str| s.parse::<EntityUid>().expect("uid");
        let request = Request::new(
            uid("User::\"u\""),
            uid("Action::\"read\""),
            uid("Doc::\"d\""),
            Context::empty(),
            None,
        )
        .expect("request");
        // User::"u" is not in the entities: reading its `age` errors.
        let entities = Entities::empty();
        let authorizer = Authorizer::new();
        let strict = evaluate(
            &authorizer,
            &snapshot,
            &request,
            &entities,
            OnEvaluationError::Deny,
        );
        assert!(!strict.allow);
        assert_eq!(strict.errors.len(), 1);
        assert_eq!(strict.errors[0].policy_id, "minors");
        let lenient = evaluate(
            &authorizer,
            &snapshot,
            &request,
            &entities,
            OnEvaluationError::Ignore,
        );
        assert!(lenient.allow);
        assert_eq!(lenient.policies, vec!["all".to_string()]);
    }
}
