//! The Grafana dashboard and the Prometheus alert rules in examples/ only
//! use metrics a running Tollgate exports.

mod support;

use support::{Tollgate, metrics_text, test_config};

/// Every `tollgate_*` metric name in `text`.
fn referenced(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("tollgate_")
        .filter(|(at, _)| {
            // Not part of a longer identifier (a job label value, say).
            text[..*at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        })
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_use_only_exported_metrics() {
    // A family is exported once it has a series: record one of each, then
    // read /metrics off a running Tollgate's registry encoding.
    let metrics = tollgate::metrics::Metrics::new();
    metrics.decision(tollgate::metrics::Api::ExtAuthz, "allow", "allowed", 0.001);
    metrics.rate_limit("ok", 1, 0.001);
    metrics.quota_store_error("redis");
    metrics.quota_fail_open("rule");
    metrics.rate_limit_unknown_domain();
    metrics.invalidation("all");
    metrics.reload("policies", "rejected");
    metrics.policy_version("v1");
    metrics.jwks_fetch("issuer", "failed");
    metrics.jwks_keys_refused("issuer", 1);
    metrics.audit_record("dropped");
    metrics.usage_charged("rule", "tokens", "other", (Some("acme"), Some("paid")), 1);
    metrics.limit_decision("llm.tenant", "over_limit");
    metrics.store().reconnect("timeout");
    metrics.store().clock_offset_ms(1);
    let exported = metrics.encode();
    // The admin listener serves the same encoding.
    let mut tg = Tollgate::start(test_config()).await;
    assert!(metrics_text(tg.admin).await.contains("# TYPE tollgate_"));
    tg.stop().await;
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for file in [
        "examples/grafana/tollgate.json",
        "examples/prometheus/alerts.yaml",
    ] {
        let text = std::fs::read_to_string(support::repo().join(file)).expect(file);
        if file.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).expect("dashboard is JSON");
        }
        let names = referenced(&text);
        assert!(names.len() >= 5, "{file} references {names:?}");
        for name in names {
            let family = ["_bucket", "_total"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                families.contains(&family),
                "{file} uses {name}, which Tollgate does not export; exported: {families:?}"
            );
        }
    }
}
