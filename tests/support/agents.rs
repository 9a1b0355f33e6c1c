//! Signed caller contexts for the agents tests: the header, the runtime's
//! mTLS identity, fixed Ed25519 seeds, and contexts signed for the demo paid
//! key as the agent runtime would receive them.

use std::time::{Duration, SystemTime};

use tollgate::agents::caller_context::{Claims, KeyRing};
use tollgate::identity::{Principal, PrincipalKind};

/// The caller-context header (`agents.caller_context.header`'s default).
pub const CC: &str = "x-tollgate-caller-context";
/// The agent runtime's SPIFFE id (trust domain `acme.example`).
pub const RUNTIME: &str = "spiffe://acme.example/ns/agents/sa/runtime";
pub const SEED_NEW: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
pub const SEED_OLD: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
pub const SEED_RETIRED: &str = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";
pub const SEED_STRANGER: &str = "BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=";

/// A key ring of one key.
pub fn one_key(kid: &str, seed: &str) -> KeyRing {
    KeyRing::parse(&format!("[[keys]]\nkid = \"{kid}\"\nseed = \"{seed}\"\n")).expect("key")
}

/// What a context issued to the demo paid key (tenant acme) for request
/// `rid` says, with `tools` callable, issued at `iat` for 300 s.
pub fn paid_claims(rid: &str, tools: &[&str], iat: SystemTime) -> Claims {
    let p = Principal {
        kind: PrincipalKind::ApiKey,
        id: "demo-paid".into(),
        tenant: Some("acme".into()),
        tier: Some("paid".into()),
        scopes: vec!["llm:generate".into()],
        groups: vec![],
        models: vec![],
    };
    let tools = tools.iter().map(|t| t.to_string()).collect();
    Claims::for_request(
        &p,
        rid,
        Some("llama-3-8b"),
        tools,
        iat,
        Duration::from_secs(300),
    )
}
