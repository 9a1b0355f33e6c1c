//! The decision log and the audit trail.
//!
//! The decision log ([`record`]) is one structured `tracing` line per
//! decision (target `tollgate::decision`; JSON when `log.format = "json"`).
//!
//! The audit trail ([`AuditTrail`], `[audit]` in the config) is a side
//! channel beside it: one hash-chained JSON line per decision
//! ([`AuditRecord`], schema [`SCHEMA_VERSION`]), queued without blocking the
//! decision and written by its own thread to a size-rotated file or stdout.
//! A file the writer closes ends with a [`seal`] of the chain head, signed
//! with Ed25519 when `audit.signing_key` is set. [`verify`] checks a chain
//! (`tollgate audit verify [--public-key PUB.pem] FILE...`).
//!
//! Both carry who, what, the verdict, which policies decided and the quota
//! outcome — never a credential, a header value or a body (the trail keeps
//! the body's SHA-256).

pub mod query;
mod record;
pub mod seal;
pub mod suggest;
mod trail;
mod verify;

pub use record::{
    AuditRecord, Caller, ChainLink, McpAudit, QuotaOutcome, ResponseFacts, SCHEMA_VERSION,
    UsageFacts,
};
pub use trail::{AuditConfig, AuditError, AuditSink, AuditTrail};
pub use verify::{GENESIS, VerifyError, VerifyReport, verify, verify_with};

use std::time::Duration;

use crate::decision::Decision;

/// Logs one decision.
pub fn record(decision: &Decision, elapsed: Duration) {
    // Nothing below is worth building when the log level filters it out.
    if !tracing::enabled!(target: "tollgate::decision", tracing::Level::INFO) {
        return;
    }
    let principal = decision.principal.as_ref().map(|p| p.uid());
    let tenant = decision
        .principal
        .as_ref()
        .and_then(|p| p.tenant.as_deref());
    let errors: Vec<&str> = decision
        .errors
        .iter()
        .map(|e| e.policy_id.as_str())
        .collect();
    let quota_rule = decision.quota.as_ref().map(|q| q.rule.as_str());
    let quota_remaining = decision.quota.as_ref().map(|q| q.remaining);
    tracing::info!(
        target: "tollgate::decision",
        request_id = %decision.request_id,
        trace_id = decision.trace_id.as_deref().unwrap_or("-"),
        principal = principal.as_deref().unwrap_or("-"),
        tenant = tenant.unwrap_or("-"),
        action = decision.action.as_deref().unwrap_or("-"),
        resource = decision.resource.as_deref().unwrap_or("-"),
        decision = decision.outcome.verdict(),
        reason = decision.outcome.reason().code(),
        policies = %decision.policies.join(","),
        errored_policies = %errors.join(","),
        policy_version = %decision.policy_version,
        quota_rule = quota_rule.unwrap_or("-"),
        quota_remaining,
        shadow = decision.shadow.as_ref().map_or("-", |s| s.direction),
        latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        "decision"
    );
}
