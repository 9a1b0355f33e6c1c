//! Envoy's rate limit service on a real gRPC listener: the reference limits
//! format's behaviours, bad input, and exact counting across replicas.

mod support;

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use support::{RedisCluster, RedisServer, Tollgate, away_from_minute_boundary, test_config};
use tollgate::config::{Config, StoreKind};

const OK: i32 = 1;
const OVER: i32 = 2;

const LIMITS: &str = r#"
domain: test
descriptors:
  - key: tenant
    rate_limit: { unit: hour, requests_per_unit: 100 }
    descriptors:
      - key: model
        value: big
        rate_limit: { unit: hour, requests_per_unit: 2, name: big-model }
  - key: path
    value: "/internal/*"
    rate_limit: { unlimited: true }
  - key: path
    rate_limit: { unit: day, requests_per_unit: 3 }
  - key: plan
    value: basic
    rate_limit: { unit: hour, requests_per_unit: 5, name: basic }
  - key: plan
    value: promo
    rate_limit: { unit: hour, requests_per_unit: 1, name: promo, replaces: [ { name: basic } ] }
  - key: shadowed
    rate_limit: { unit: hour, requests_per_unit: 1 }
    shadow_mode: true
  - key: budget
    rate_limit: { unit: hour, requests_per_unit: 5 }
  - key: unit
    value: s
    rate_limit: { unit: second, requests_per_unit: 1000 }
  - key: unit
    value: m
    rate_limit: { unit: minute, requests_per_unit: 1000 }
  - key: unit
    value: h
    rate_limit: { unit: hour, requests_per_unit: 1000 }
  - key: unit
    value: d
    rate_limit: { unit: day, requests_per_unit: 1000 }
  - key: exact
    rate_limit: { unit: minute, requests_per_unit: 500 }
"#;

fn config_with_limits(dir: &Path, limits: &str) -> Config {
    let path = dir.join("limits.yaml");
    std::fs::write(&path, limits).expect("write limits");
    let mut config = test_config();
    config.quota.limits_file = Some(path);
    config
}

/// Tollgate on `LIMITS` with a Redis store, connected.
async fn on_redis(dir: &Path, redis: &RedisServer) -> Tollgate {
    let mut config = config_with_limits(dir, LIMITS);
    config.quota.store = StoreKind::Redis;
    config.quota.redis_url = redis.url();
    let tg = Tollgate::start(config).await;
    tg.wait_for_store().await;
    tg
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

async fn ask(
    client: &mut RateLimitServiceClient<tonic::transport::Channel>,
    req: RateLimitRequest,
) -> RateLimitResponse {
    client
        .should_rate_limit(req)
        .await
        .expect("rpc")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_format_behaviours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tg = Tollgate::start(config_with_limits(dir.path(), LIMITS)).await;
    let mut c = RateLimitServiceClient::new(tg.channel().await);

    // Nested descriptors: the deepest match at the last entry applies.
    let big = || {
        request(
            "test",
            vec![descriptor(&[("tenant", "acme"), ("model", "big")])],
            0,
        )
    };
    let r = ask(&mut c, big()).await;
    assert_eq!(r.overall_code, OK);
    let s = &r.statuses[0];
    let limit = s.current_limit.as_ref().expect("current limit");
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit, limit.unit),
        ("big-model", 2, 3)
    );
    assert_eq!(s.limit_remaining, 1);
    assert!(
        s.duration_until_reset
            .as_ref()
            .is_some_and(|d| d.seconds > 0 && d.seconds <= 3600)
    );
    assert_eq!(ask(&mut c, big()).await.overall_code, OK);
    let over = ask(&mut c, big()).await;
    assert_eq!((over.overall_code, over.statuses[0].code), (OVER, OVER));
    assert_eq!(over.statuses[0].limit_remaining, 0);
    assert!(
        over.response_headers_to_add
            .iter()
            .any(|h| h.key == "ratelimit-remaining" && h.value == "0")
    );
    // The parent level (tenant alone) is a separate counter.
    let tenant = ask(
        &mut c,
        request("test", vec![descriptor(&[("tenant", "acme")])], 0),
    )
    .await;
    assert_eq!(
        (tenant.overall_code, tenant.statuses[0].limit_remaining),
        (OK, 99)
    );
    // More entries than the config has levels: no limit.
    let deeper = ask(
        &mut c,
        request(
            "test",
            vec![descriptor(&[("tenant", "a"), ("model", "big"), ("x", "y")])],
            0,
        ),
    )
    .await;
    assert!(deeper.statuses[0].current_limit.is_none());

    // Wildcard value matched before the bare key; unlimited reports no limit.
    let internal = ask(
        &mut c,
        request("test", vec![descriptor(&[("path", "/internal/jobs")])], 0),
    )
    .await;
    assert_eq!(internal.overall_code, OK);
    assert!(internal.statuses[0].current_limit.is_none());
    assert_eq!(internal.statuses[0].limit_remaining, u32::MAX);
    // Bare key: one counter per value.
    for _ in 0..3 {
        assert_eq!(
            ask(
                &mut c,
                request("test", vec![descriptor(&[("path", "/a")])], 0)
            )
            .await
            .overall_code,
            OK
        );
    }
    assert_eq!(
        ask(
            &mut c,
            request("test", vec![descriptor(&[("path", "/a")])], 0)
        )
        .await
        .overall_code,
        OVER
    );
    assert_eq!(
        ask(
            &mut c,
            request("test", vec![descriptor(&[("path", "/b")])], 0)
        )
        .await
        .overall_code,
        OK
    );

    // replaces: promo replaces basic when both apply.
    let both = || {
        request(
            "test",
            vec![
                descriptor(&[("plan", "basic")]),
                descriptor(&[("plan", "promo")]),
            ],
            0,
        )
    };
    let first = ask(&mut c, both()).await;
    assert_eq!(first.overall_code, OK);
    assert!(
        first.statuses[0].current_limit.is_none(),
        "basic is replaced"
    );
    assert_eq!(
        first.statuses[1]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit),
        Some(1)
    );
    assert_eq!(
        ask(&mut c, both()).await.overall_code,
        OVER,
        "promo (1/hour) decides, not basic (5/hour)"
    );

    // Shadow mode counts but never denies.
    for _ in 0..3 {
        assert_eq!(
            ask(
                &mut c,
                request("test", vec![descriptor(&[("shadowed", "x")])], 0)
            )
            .await
            .overall_code,
            OK
        );
    }

    // hits_addend: request level, per-descriptor 0 (check only), huge.
    let r = ask(
        &mut c,
        request("test", vec![descriptor(&[("budget", "b")])], 3),
    )
    .await;
    assert_eq!(r.statuses[0].limit_remaining, 2);
    let mut check_only = descriptor(&[("budget", "b")]);
    check_only.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
    let r = ask(&mut c, request("test", vec![check_only], 0)).await;
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 2));
    let r = ask(
        &mut c,
        request("test", vec![descriptor(&[("budget", "b")])], u32::MAX),
    )
    .await;
    assert_eq!(r.overall_code, OVER);
    let mut one = descriptor(&[("budget", "b")]);
    one.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 1 });
    let r = ask(&mut c, request("test", vec![one], 50)).await;
    assert_eq!(
        (r.overall_code, r.statuses[0].limit_remaining),
        (OK, 1),
        "per-descriptor hits override the request's"
    );

    // Each unit is reported as Envoy's enum.
    let units = ask(
        &mut c,
        request(
            "test",
            ["s", "m", "h", "d"]
                .iter()
                .map(|u| descriptor(&[("unit", u)]))
                .collect(),
            0,
        ),
    )
    .await;
    let got: Vec<i32> = units
        .statuses
        .iter()
        .map(|s| s.current_limit.as_ref().map_or(0, |l| l.unit))
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4]);

    // Unknown domain or descriptor: OK, no limit.
    let r = ask(
        &mut c,
        request("nope", vec![descriptor(&[("tenant", "acme")])], 0),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    assert!(r.statuses[0].current_limit.is_none());
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_a_defined_answer_and_no_redis_call() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tg = on_redis(dir.path(), &redis).await;
    let mut c = RateLimitServiceClient::new(tg.channel().await);
    let many: Vec<RateLimitDescriptor> = (0..5000)
        .map(|i| descriptor(&[("tenant", &i.to_string())]))
        .collect();
    let huge = "v".repeat(60 * 1024);
    let cases = vec![
        (
            "empty domain",
            request("", vec![descriptor(&[("tenant", "a")])], 0),
        ),
        ("thousands of descriptors", request("test", many, 0)),
        (
            "60 KiB value",
            request("test", vec![descriptor(&[("tenant", &huge)])], 0),
        ),
        (
            "control characters",
            request("test", vec![descriptor(&[("tenant", "a\u{0}b\n")])], 0),
        ),
        (
            "empty key",
            request("test", vec![descriptor(&[("", "x")])], 0),
        ),
    ];
    for (name, req) in cases {
        let r = ask(&mut c, req).await;
        assert_eq!(
            r.overall_code, OVER,
            "{name}: garbage is refused by default"
        );
    }
    let stats = redis.cli(&["info", "commandstats"]);
    assert!(
        !stats.contains("cmdstat_evalsha") && !stats.contains("cmdstat_eval:"),
        "garbage reached Redis: {stats}"
    );
    tg.stop().await;
}

/// 64 clients hammer `exact` (500/minute) through `servers`; returns how many
/// were allowed.
async fn hammer(servers: &[&Tollgate]) -> usize {
    let mut channels = Vec::new();
    for s in servers {
        s.wait_for_store().await;
        channels.push(s.channel().await);
    }
    away_from_minute_boundary(Duration::from_secs(20)).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut client = RateLimitServiceClient::new(channels[i % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut allowed = 0;
            for _ in 0..12 {
                let r = client
                    .should_rate_limit(request("test", vec![descriptor(&[("exact", "one")])], 0))
                    .await
                    .expect("rpc")
                    .into_inner();
                if r.overall_code == OK {
                    allowed += 1;
                }
            }
            allowed
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_with_one_memory_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tg = Tollgate::start(config_with_limits(dir.path(), LIMITS)).await;
    assert_eq!(hammer(&[&tg]).await, 500);
    tg.stop().await;
}

/// Two servers on one shared store, configured by `store`.
async fn exact_with_two_servers(store: impl FnOnce(&mut Config)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_with_limits(dir.path(), LIMITS);
    store(&mut config);
    config.quota.deadline_ms = 2000;
    let mut a = Tollgate::start(config.clone()).await;
    let mut b = Tollgate::start(config).await;
    assert_eq!(hammer(&[&a, &b]).await, 500);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_with_two_servers_sharing_redis() {
    let redis = RedisServer::start();
    exact_with_two_servers(|c| {
        c.quota.store = StoreKind::Redis;
        c.quota.redis_url = redis.url();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    exact_with_two_servers(|c| {
        c.quota.store = StoreKind::RedisCluster;
        c.quota.redis_cluster_nodes = cluster.urls();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_key_stops_costing_redis_round_trips() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tg = on_redis(dir.path(), &redis).await;
    let mut c = RateLimitServiceClient::new(tg.channel().await);
    let mut over = 0;
    for _ in 0..200 {
        if ask(
            &mut c,
            request("test", vec![descriptor(&[("budget", "flood")])], 0),
        )
        .await
        .overall_code
            == OVER
        {
            over += 1;
        }
    }
    assert_eq!(over, 195);
    let stats = redis.cli(&["info", "commandstats"]);
    let calls: u64 = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .expect("evalsha stats");
    assert!(
        calls <= 10,
        "200 requests, 5 allowed, but {calls} script calls reached Redis"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hot_reload_and_keep_the_last_good_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_with_limits(
        dir.path(),
        "domain: r\ndescriptors:\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n",
    );
    config.policy.watch = true;
    config.policy.reload_debounce_ms = 50;
    config.policy.reload_poll_secs = 0;
    let mut tg = Tollgate::start(config).await;
    let mut c = RateLimitServiceClient::new(tg.channel().await);
    let limit_of = |r: &RateLimitResponse| {
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
    };
    assert_eq!(
        limit_of(&ask(&mut c, request("r", vec![descriptor(&[("k", "a")])], 0)).await),
        Some(1)
    );
    let file = dir.path().join("limits.yaml");
    std::fs::write(&file, "domain: r\ndescriptors:\n  - key: k\n    rate_limit: { unit: hour, requests_per_unit: 7 }\n").expect("write");
    let changed = support::eventually(Duration::from_secs(2), || {
        let mut c = c.clone();
        async move {
            limit_of(&ask(&mut c, request("r", vec![descriptor(&[("k", "b")])], 0)).await)
                == Some(7)
        }
    })
    .await;
    assert!(changed, "the new limit did not apply within 2 s");
    std::fs::write(&file, "domain: r\ndescriptors:\n  - key: k\n    rate_limit: { unit: fortnight, requests_per_unit: 7 }\n").expect("write");
    let admin = tg.admin;
    let rejected = support::eventually(Duration::from_secs(2), || async move {
        support::raw_http(admin, "GET", "/metrics", &[], "")
            .await
            .body
            .contains("tollgate_reloads_total{source=\"limits\",result=\"rejected\"}")
    })
    .await;
    assert!(rejected, "the broken edit was not reported");
    assert_eq!(
        limit_of(&ask(&mut c, request("r", vec![descriptor(&[("k", "c")])], 0)).await),
        Some(7)
    );
    tg.stop().await;
}

/// `detailed_metric: true` asks for per-limit series; other limits get none,
/// and the label is the limit's path, never a descriptor value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detailed_metric_limits_get_per_limit_series() {
    const DETAILED: &str = r#"
domain: test
descriptors:
  - key: tenant
    rate_limit: { unit: hour, requests_per_unit: 2 }
    detailed_metric: true
  - key: shadowed
    rate_limit: { unit: hour, requests_per_unit: 1 }
    shadow_mode: true
    detailed_metric: true
  - key: plain
    rate_limit: { unit: hour, requests_per_unit: 1 }
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tg = Tollgate::start(config_with_limits(dir.path(), DETAILED)).await;
    let mut c = RateLimitServiceClient::new(tg.channel().await);
    for (entry, times) in [
        (("tenant", "acme-secret-value"), 3),
        (("shadowed", "x"), 2),
        (("plain", "y"), 2),
    ] {
        for _ in 0..times {
            ask(&mut c, request("test", vec![descriptor(&[entry])], 0)).await;
        }
    }
    let m = support::metrics_text(tg.admin).await;
    let series = |limit: &str, outcome: &str| {
        support::metric(
            &m,
            &format!(
                "tollgate_rate_limit_limit_decisions_total{{limit=\"{limit}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(series("test.tenant", "within_limit"), Some(2.0), "{m}");
    assert_eq!(series("test.tenant", "over_limit"), Some(1.0), "{m}");
    assert_eq!(series("test.shadowed", "within_limit"), Some(1.0), "{m}");
    assert_eq!(series("test.shadowed", "shadow_over"), Some(1.0), "{m}");
    assert!(
        !m.contains("test.plain"),
        "no series without detailed_metric: {m}"
    );
    assert!(
        !m.contains("acme-secret-value"),
        "descriptor values are never labels"
    );
    tg.stop().await;
}
