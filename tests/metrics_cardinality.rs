//! Metric labels stay bounded: after 20,000 requests with distinct API
//! keys, paths and client addresses (through the real ext_authz and rate
//! limit listeners), the number of series on /metrics is what it was after
//! a warm-up that met every outcome once, and no key, path or address
//! appears in a label.

mod support;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use support::{DEMO_PAID_KEY, Tollgate, check_request, metrics_text, set_source, test_config};

const TOTAL: usize = 20_000;
const TASKS: usize = 8;

/// Request `i`: a distinct unknown key, a distinct path or the paid key on
/// a distinct model, always from a distinct client address; every fourth a
/// rate limit request with a distinct address descriptor.
async fn send(
    authz: &mut AuthorizationClient<tonic::transport::Channel>,
    rls: &mut RateLimitServiceClient<tonic::transport::Channel>,
    i: usize,
) {
    let address = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
    if i % 4 == 3 {
        let request = RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "remote_address".into(),
                    value: address,
                }],
                ..Default::default()
            }],
            hits_addend: 1,
        };
        rls.should_rate_limit(request).await.expect("rls");
        return;
    }
    let unknown_key = tollgate::identity::key_format::generate(&format!("k{i}")).expect("key");
    let (path, key, body) = match i % 4 {
        0 => (
            "/v1/chat/completions".to_string(),
            unknown_key.as_str(),
            r#"{"model":"llama-3-8b","messages":[]}"#.to_string(),
        ),
        1 => (
            format!("/v1/unknown/{i}?q={i}"),
            DEMO_PAID_KEY,
            String::new(),
        ),
        _ => (
            "/v1/chat/completions".to_string(),
            DEMO_PAID_KEY,
            format!(r#"{{"model":"model-{i}","messages":[]}}"#),
        ),
    };
    let mut request = check_request(
        "POST",
        &path,
        &[("x-api-key", key), ("content-type", "application/json")],
        &body,
    );
    set_source(&mut request, Some(&address), "", "");
    authz.check(request).await.expect("check");
}

/// Series lines (samples) of an exposition.
fn series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_stay_flat_under_distinct_keys_paths_and_addresses() {
    let mut config = test_config();
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<tollgate::quota::rules::QuotaRule>,
    }
    let rules: Rules = toml::from_str(
        "[[rules]]\nname = \"key-per-minute\"\nper = [\"key\"]\nunit = \"minute\"\ntiers = { paid = 1000000 }\n",
    )
    .expect("rules");
    config.quota.rules = rules.rules;
    let mut tg = Tollgate::start(config).await;
    let channel = tg.channel().await;
    let mut authz = AuthorizationClient::new(channel.clone());
    let mut rls = RateLimitServiceClient::new(channel.clone());

    // Warm-up: every kind of request once (several times over).
    for i in 0..64 {
        send(&mut authz, &mut rls, i).await;
    }
    let before = metrics_text(tg.admin).await;
    let before_series = series(&before).len();

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut authz = AuthorizationClient::new(channel.clone());
            let mut rls = RateLimitServiceClient::new(channel);
            for i in (1000 + t..1000 + TOTAL).step_by(TASKS) {
                send(&mut authz, &mut rls, i).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }

    let after = metrics_text(tg.admin).await;
    let decisions = support::metric_prefix(&after, "tollgate_decisions_total");
    assert!(decisions >= 1.0, "decisions were counted:\n{after}");
    let after_series = series(&after);
    assert_eq!(
        after_series.len(),
        before_series,
        "series grew from {before_series}; new ones:\n{}",
        after_series
            .iter()
            .filter(|s| !series(&before).contains(s))
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    );
    for needle in ["10.0.", "model-1", "/v1/unknown", "tg_k1", "k1000"] {
        assert!(
            !after.contains(needle),
            "{needle:?} leaked into a label:\n{after}"
        );
    }
    tg.stop().await;
}
