//! Redis faults: killed during load and restarted. Each limit's failure mode
//! answers within the deadline, nothing panics, counting resumes (the script
//! cache was flushed, so NOSCRIPT is handled), and no key is left without a
//! TTL.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use support::{RedisServer, Tollgate, eventually, test_config};
use tollgate::config::StoreKind;

const LIMITS: &str = r#"
domain: faults
descriptors:
  - key: deny
    rate_limit: { unit: hour, requests_per_unit: 1000000, failure_mode: deny }
  - key: allow
    rate_limit: { unit: hour, requests_per_unit: 1000000, failure_mode: allow }
  - key: gateway
    rate_limit: { unit: hour, requests_per_unit: 1000000, failure_mode: gateway }
  - key: counted
    rate_limit: { unit: hour, requests_per_unit: 1000000 }
"#;

fn req(key: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "faults".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: key.into(),
                value: "v".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

type Client = RateLimitServiceClient<tonic::transport::Channel>;

/// (overall code, remaining) or the gRPC code, and how long it took.
async fn ask(c: &mut Client, key: &str) -> (Result<(i32, u32), tonic::Code>, Duration) {
    let t = Instant::now();
    let r = c
        .should_rate_limit(req(key))
        .await
        .map(|r| {
            let r = r.into_inner();
            (
                r.overall_code,
                r.statuses.first().map_or(0, |s| s.limit_remaining),
            )
        })
        .map_err(|s| s.code());
    (r, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_load_and_restarted() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("limits.yaml");
    std::fs::write(&limits, LIMITS).expect("write");
    let mut config = test_config();
    config.quota.limits_file = Some(limits);
    config.quota.store = StoreKind::Redis;
    config.quota.redis_url = redis.url();
    config.quota.deadline_ms = 50;
    let mut tg = Tollgate::start(config).await;
    tg.wait_for_store().await;
    let mut c = RateLimitServiceClient::new(tg.channel().await);
    for key in ["deny", "allow", "gateway", "counted"] {
        assert_eq!(
            ask(&mut c, key).await.0,
            Ok((1, 999_999)),
            "{key} before the fault"
        );
    }

    // Load in the background, bounded in time by the stop flag and in count.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, mut c) = (stop.clone(), c.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                let _ = ask(&mut c, "counted").await;
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.kill();

    let slack = Duration::from_millis(400);
    for _ in 0..5 {
        let (deny, t) = ask(&mut c, "deny").await;
        assert_eq!(
            deny.map(|r| r.0),
            Ok(2),
            "deny limits deny while Redis is down"
        );
        assert!(
            t < Duration::from_millis(50) + slack,
            "deny answered after {t:?}"
        );
        let (allow, t) = ask(&mut c, "allow").await;
        assert_eq!(allow.map(|r| r.0), Ok(1), "allow limits allow");
        assert!(
            t < Duration::from_millis(50) + slack,
            "allow answered after {t:?}"
        );
        let (gateway, t) = ask(&mut c, "gateway").await;
        assert_eq!(
            gateway,
            Err(tonic::Code::Unavailable),
            "gateway limits defer to Envoy"
        );
        assert!(
            t < Duration::from_millis(50) + slack,
            "gateway answered after {t:?}"
        );
    }

    redis.restart();
    // Counting resumes on the fresh (empty) Redis, whose script cache is empty.
    let resumed = eventually(Duration::from_secs(15), || {
        let mut c = c.clone();
        async move { matches!(ask(&mut c, "deny").await.0, Ok((1, _))) }
    })
    .await;
    assert!(resumed, "counting did not resume after Redis came back");
    let (first, _) = ask(&mut c, "deny").await;
    let (second, _) = ask(&mut c, "deny").await;
    let (Ok((1, a)), Ok((1, b))) = (first, second) else {
        panic!("expected counting, got {first:?} then {second:?}");
    };
    assert_eq!(a, b + 1, "each request is counted once");
    let stats = redis.cli(&["info", "commandstats"]);
    assert!(
        stats.contains("cmdstat_script"),
        "the script was reloaded after NOSCRIPT: {stats}"
    );

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task ended without panicking");
    }
    for key in redis.cli(&["--scan"]).lines() {
        let ttl: i64 = redis.cli(&["pttl", key]).trim().parse().expect("pttl");
        assert!(ttl > 0, "{key} has no TTL");
    }
    // Still healthy.
    assert_eq!(ask(&mut c, "allow").await.0.map(|r| r.0), Ok(1));
    tg.stop().await;
}
