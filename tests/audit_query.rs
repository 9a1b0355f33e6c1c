//! `tollgate audit query` and `tollgate audit suggest-limits` on a trail
//! written by real traffic through the ext_authz and tollgate.v1 listeners:
//! denials, top spenders (usage settlements joined to their requests),
//! deny policies, time windows, and suggested limits that Tollgate's own
//! loaders accept.

mod support;

use std::path::Path;
use std::process::Command;

use support::{DEMO_FREE_KEY, DEMO_PAID_KEY, Tollgate, check_request, ext_authz, test_config};
use tollgate::proto::ReportUsageRequest;
use tollgate::proto::decision_service_client::DecisionServiceClient;

fn chat(
    id: &str,
    key: &str,
    model: &str,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let body = format!(r#"{{"model":"{model}","max_tokens":10,"messages":[]}}"#);
    let mut request = check_request(
        "POST",
        "/v1/chat/completions",
        &[("x-api-key", key), ("content-type", "application/json")],
        &body,
    );
    support::http_of(&mut request).id = id.into();
    request
}

fn tollgate(args: &[&str], file: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg(file)
        .output()
        .expect("run tollgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The data rows of a tab-separated answer, split into columns.
fn table(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

async fn traffic(audit: &Path) {
    let mut config = test_config();
    config.audit.enabled = true;
    config.audit.path = audit.to_path_buf();
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<tollgate::quota::rules::QuotaRule>,
    }
    let rules: Rules = toml::from_str(
        "[[rules]]\nname = \"key-tokens\"\nper = [\"key\"]\nunit = \"hour\"\ncost = \"tokens\"\nlimit = 1000000\n",
    )
    .expect("rules");
    config.quota.rules = rules.rules;
    let mut tg = Tollgate::start(config).await;
    let mut usage = DecisionServiceClient::new(tg.channel().await);
    for i in 0..5 {
        let id = format!("paid-{i}");
        assert_eq!(
            ext_authz(&tg, chat(&id, DEMO_PAID_KEY, "llama-3-8b"))
                .await
                .status,
            200
        );
        usage
            .report_usage(ReportUsageRequest {
                request_id: id,
                input_tokens: 100,
                output_tokens: 20,
                cached_input_tokens: 0,
            })
            .await
            .expect("report");
    }
    for i in 0..2 {
        let id = format!("free-{i}");
        assert_eq!(
            ext_authz(&tg, chat(&id, DEMO_FREE_KEY, "llama-3-8b"))
                .await
                .status,
            200
        );
    }
    for i in 0..3 {
        let id = format!("free-large-{i}");
        assert_eq!(
            ext_authz(&tg, chat(&id, DEMO_FREE_KEY, "llama-3-70b"))
                .await
                .status,
            403
        );
    }
    assert_eq!(
        ext_authz(&tg, chat("nobody", "tg_nobody_x", "llama-3-8b"))
            .await
            .status,
        401
    );
    tg.stop().await;
}

#[tokio::test]
async fn questions_and_suggested_limits_from_a_real_trail() {
    let dir = tempfile::tempdir().expect("tmp");
    let audit = dir.path().join("trail.jsonl");
    traffic(&audit).await;

    let (ok, denials) = tollgate(&["audit", "query", "denials"], &audit);
    assert!(ok, "{denials}");
    assert!(denials.starts_with("denies\tprincipal\t"), "{denials}");
    let rows = table(&denials);
    assert_eq!(
        rows[0][..5],
        [
            "3",
            "ApiKey::\"demo-free\"",
            "acme",
            "policy_denied",
            "free-tier-small-models-only"
        ],
        "{denials}"
    );
    assert!(
        rows.iter()
            .any(|r| r[0] == "1" && r[1] == "-" && r[3] == "malformed_credential"),
        "{denials}"
    );

    let (ok, policies) = tollgate(&["audit", "query", "deny-policies"], &audit);
    assert!(ok);
    assert_eq!(
        table(&policies)[0],
        ["3", "1", "free-tier-small-models-only"],
        "{policies}"
    );

    let (ok, spenders) = tollgate(&["audit", "query", "spenders"], &audit);
    assert!(ok);
    let rows = table(&spenders);
    assert_eq!(
        rows[0],
        ["600", "500", "100", "5", "ApiKey::\"demo-paid\"", "acme"],
        "{spenders}"
    );
    assert_eq!(
        rows[1],
        ["0", "0", "0", "2", "ApiKey::\"demo-free\"", "acme"],
        "{spenders}"
    );

    // Windows: everything is from the last hour, nothing from the future.
    let (_, recent) = tollgate(&["audit", "query", "denials", "--since", "1h"], &audit);
    assert_eq!(table(&recent).len(), 2, "{recent}");
    let (_, future) = tollgate(
        &[
            "audit",
            "query",
            "denials",
            "--since",
            "2999-01-01T00:00:00Z",
        ],
        &audit,
    );
    assert!(table(&future).is_empty(), "{future}");
    let (ok, _) = tollgate(
        &["audit", "query", "denials", "--since", "yesterday-ish"],
        &audit,
    );
    assert!(!ok, "a bad time is an error");

    // Year windows: all of this traffic falls into one of them.
    let (ok, suggested) = tollgate(
        &[
            "audit",
            "suggest-limits",
            "--unit",
            "year",
            "--percentile",
            "99",
        ],
        &audit,
    );
    assert!(ok, "{suggested}");
    let (rules_part, limits_part) = suggested
        .split_once("# Limits file (quota.limits_file):")
        .expect("both formats");
    #[derive(serde::Deserialize)]
    struct Quota {
        rules: Vec<tollgate::quota::rules::QuotaRule>,
    }
    #[derive(serde::Deserialize)]
    struct Root {
        quota: Quota,
    }
    let root: Root = toml::from_str(rules_part).expect("quota rules are TOML");
    let by_name = |name: &str| {
        root.quota
            .rules
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no rule {name} in {rules_part}"))
    };
    for rule in &root.quota.rules {
        rule.validate().expect("a valid rule");
    }
    let requests = by_name("key-requests-per-year");
    assert_eq!(requests.tiers.get("paid"), Some(&5.0));
    assert_eq!(requests.tiers.get("free"), Some(&2.0));
    assert_eq!(
        by_name("key-tokens-per-year").tiers.get("paid"),
        Some(&600.0)
    );

    let limits = dir.path().join("limits.yaml");
    std::fs::write(&limits, limits_part).expect("write");
    let set = tollgate::quota::limits::LimitSet::load(&limits).expect("a valid limits file");
    let tenant = set
        .lookup("tollgate", &[("tenant".into(), "acme".into())])
        .expect("tenant limit");
    assert_eq!(tenant.requests_per_unit, 7, "{limits_part}");
}
