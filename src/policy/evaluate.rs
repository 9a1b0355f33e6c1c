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
    let sliced = match (request.principal(), request.action()) {
        (Some(p), Some(a)) => snapshot.slices.get(p.type_name(), a),
        _ => None,
    };
    let policies = sliced.unwrap_or(&snapshot.policies);
    let response = authorizer.is_authorized(request, policies, entities);
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
