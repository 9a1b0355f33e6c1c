//! Safe policy rollout: a shadow policy set (`policy.shadow_dir`) evaluated
//! beside the live one on every request, never changing the answer.
//!
//! The engine evaluates the same Cedar request (principal, action, resource,
//! context) against the shadow snapshot after the live one and compares the
//! two policy verdicts. A disagreement is counted
//! (`tollgate_shadow_disagreements_total{direction}`) and carried in the
//! decision's audit record (`shadow`) and log line, so an operator sees what
//! a change would do to real traffic before `tollgate policy promote`
//! ([`super::rollout`]) makes it live.
//!
//! Only the policy verdict is compared: identity, routing, body checks and
//! quotas are the live configuration's and the same for both sets, and a
//! request refused before policy evaluation has nothing to compare.

use serde::Serialize;

use super::evaluate::Verdict;

/// `allow_to_deny`: the live set allows, the shadow set would deny.
pub const ALLOW_TO_DENY: &str = "allow_to_deny";
/// `deny_to_allow`: the live set denies, the shadow set would allow.
pub const DENY_TO_ALLOW: &str = "deny_to_allow";

/// What the shadow set would have decided, when it disagrees with the live
/// set (the audit record's `shadow` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowVerdict {
    /// `allow` or `deny`: the shadow set's policy verdict.
    pub decision: &'static str,
    /// [`ALLOW_TO_DENY`] or [`DENY_TO_ALLOW`].
    pub direction: &'static str,
    /// Ids of the shadow policies that determined its verdict.
    pub policies: Vec<String>,
    /// Ids of the shadow policies that raised errors.
    pub errored_policies: Vec<String>,
    /// The shadow snapshot's version.
    pub policy_version: String,
}

/// Compares the live policy verdict with the shadow one; `Some` only when
/// they disagree.
pub fn compare(live_allow: bool, shadow: &Verdict, shadow_version: &str) -> Option<ShadowVerdict> {
    if live_allow == shadow.allow {
        return None;
    }
    Some(ShadowVerdict {
        decision: if shadow.allow { "allow" } else { "deny" },
        direction: if live_allow {
            ALLOW_TO_DENY
        } else {
            DENY_TO_ALLOW
        },
        policies: shadow.policies.clone(),
        errored_policies: shadow.errors.iter().map(|e| e.policy_id.clone()).collect(),
        policy_version: shadow_version.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(allow: bool) -> Verdict {
        Verdict {
            allow,
            policies: vec!["p".into()],
            errors: Vec::new(),
        }
    }

    #[test]
    fn only_disagreements_are_reported_with_their_direction() {
        assert_eq!(compare(true, &verdict(true), "v"), None);
        assert_eq!(compare(false, &verdict(false), "v"), None);
        let d = compare(true, &verdict(false), "v").expect("disagrees");
        assert_eq!((d.decision, d.direction), ("deny", ALLOW_TO_DENY));
        let d = compare(false, &verdict(true), "v").expect("disagrees");
        assert_eq!((d.decision, d.direction), ("allow", DENY_TO_ALLOW));
        assert_eq!(d.policy_version, "v");
    }
}
