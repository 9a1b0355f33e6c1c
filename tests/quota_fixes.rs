//! Regression tests for the quota faults an acceptance run and peers' bug
//! reports found: lost Redis replies, recovery time, resets reaching every
//! replica, answers invented from the over-limit cache, units and zero
//! limits, statuses of refused requests, visible fail-open, declared script
//! keys, readiness before the store is usable, usage recorded past the limit,
//! descriptor collisions and unknown domains.

mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use support::{
    FaultProxy, RedisServer, Tollgate, eventually, free_port, metric_prefix, metrics_text,
    raw_http, redis_cli, test_config,
};
use tollgate::config::{Config, StoreKind};

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

type Client = RateLimitServiceClient<tonic::transport::Channel>;

const LIMITS: &str = r#"
domain: fix
descriptors:
  - key: small
    rate_limit: { unit: hour, requests_per_unit: 3 }
  - key: roomy
    rate_limit: { unit: hour, requests_per_unit: 1000000 }
  - key: spent
    rate_limit: { unit: hour, requests_per_unit: 1, algorithm: sliding_window }
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 2 }
  - key: user_internal
    rate_limit: { unlimited: true }
  - key: monthly
    rate_limit: { unit: month, requests_per_unit: 2 }
  - key: blocked
    rate_limit: { unit: second, requests_per_unit: 0 }
  - key: tokens
    rate_limit: { unit: minute, requests_per_unit: 1000, charge: always }
  - key: open
    rate_limit: { unit: hour, requests_per_unit: 10, failure_mode: allow }
  - key: sliding
    rate_limit: { unit: minute, requests_per_unit: 100, algorithm: sliding_window }
"#;

fn write_limits(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("limits.yaml");
    std::fs::write(&path, text).expect("write limits");
    path
}

fn config_on(dir: &tempfile::TempDir, redis_url: Option<String>) -> Config {
    let mut config = test_config();
    config.quota.limits_file = Some(write_limits(dir, LIMITS));
    if let Some(url) = redis_url {
        config.quota.store = StoreKind::Redis;
        config.quota.redis_url = url;
    }
    config.quota.deadline_ms = 200;
    config
}

fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
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

fn request(descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: "fix".into(),
        descriptors,
        hits_addend: hits,
    }
}

async fn ask(c: &mut Client, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r).await.expect("answer").into_inner()
}

async fn overall(c: &mut Client, key: &str, value: &str) -> i32 {
    ask(c, request(vec![desc(&[(key, value)])], 1))
        .await
        .overall_code
}

async fn client(tg: &Tollgate) -> Client {
    RateLimitServiceClient::new(tg.channel().await)
}

/// Issue 7.1: a lost reply never lets later calls receive each other's
/// answers; the connection is dropped and remade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_redis_reply_never_shifts_answers() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, Some(proxy.url()))).await;
    tg.wait_for_store().await;
    let mut c = client(&tg).await;

    // Sequential: the call whose reply is lost fails (Redis counted it);
    // every later answer must be the store's own for that call: its
    // remaining count equals what Redis holds right after it.
    proxy.drop_next_reply();
    assert_eq!(
        overall(&mut c, "small", "a").await,
        OVER,
        "deadline passes: deny"
    );
    assert!(proxy.dropped() >= 1);
    tg.wait_for_store().await;
    let counted = || {
        let keys = redis.cli(&["--scan", "--pattern", "tg:*"]);
        keys.lines()
            .filter_map(|k| redis.cli(&["get", k]).trim().parse::<u32>().ok())
            .sum::<u32>()
    };
    let mut refused = false;
    for _ in 0..6 {
        let r = ask(&mut c, request(vec![desc(&[("small", "a")])], 1)).await;
        let now = counted();
        if r.overall_code == OK {
            assert!(!refused, "an OK after the counter was full");
            assert_eq!(
                r.statuses[0].limit_remaining,
                3 - now,
                "the answer is not the one for this call (Redis holds {now})"
            );
        } else {
            assert!(now >= 3, "refused while Redis holds only {now} of 3");
            refused = true;
        }
    }
    assert!(refused, "the limit of 3 was never reached");

    // Concurrent: a counter that must refuse never gets another call's OK.
    assert_eq!(overall(&mut c, "spent", "b").await, OK);
    let mut tasks = Vec::new();
    for i in 0..400 {
        if i == 50 || i == 200 {
            proxy.drop_next_reply();
        }
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (key, value) = if i % 2 == 0 {
                ("spent", "b")
            } else {
                ("roomy", "c")
            };
            (key, overall(&mut c, key, value).await)
        }));
    }
    let mut wrong = 0;
    for t in tasks {
        let (key, code) = t.await.expect("task");
        if key == "spent" && code == OK {
            wrong += 1;
        }
    }
    assert_eq!(wrong, 0, "requests that must be OVER_LIMIT got OK");
    let m = metrics_text(tg.admin).await;
    assert!(
        metric_prefix(&m, "tollgate_quota_store_reconnects_total{reason=") >= 1.0,
        "{m}"
    );
}

/// Issue 7.2: service resumes within a second of Redis accepting
/// connections again, whatever the outage length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_an_outage_is_quick_whatever_its_length() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, Some(redis.url()))).await;
    tg.wait_for_store().await;
    let mut c = client(&tg).await;
    for outage in [1u64, 5, 10] {
        assert_eq!(overall(&mut c, "roomy", "r").await, OK);
        redis.kill();
        // Requests during the outage keep the reconnect loop busy.
        let until = Instant::now() + Duration::from_secs(outage);
        while Instant::now() < until {
            assert_eq!(
                overall(&mut c, "roomy", "r").await,
                OVER,
                "failure mode deny"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        redis.restart(); // returns once Redis answers PING
        let back = Instant::now();
        let c2 = c.clone();
        let recovered = eventually(Duration::from_secs(5), || {
            let mut c = c2.clone();
            async move { overall(&mut c, "roomy", "r").await == OK }
        })
        .await;
        assert!(recovered, "no recovery after a {outage} s outage");
        let took = back.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "recovery after a {outage} s outage took {took:?}"
        );
    }
}

/// Issues 7.3 and 15.2(b): `tollgate quota reset` reaches the over-limit
/// cache of every running replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_reset_reaches_every_replica() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Tollgate::start(config_on(&dir, Some(redis.url()))).await;
    let b = Tollgate::start(config_on(&dir, Some(redis.url()))).await;
    a.wait_for_store().await;
    b.wait_for_store().await;
    let (mut ca, mut cb) = (client(&a).await, client(&b).await);
    for _ in 0..3 {
        assert_eq!(overall(&mut ca, "small", "victim").await, OK);
    }
    // Both replicas learn the counter is over (and cache it).
    assert_eq!(overall(&mut ca, "small", "victim").await, OVER);
    assert_eq!(overall(&mut cb, "small", "victim").await, OVER);

    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\ndir = {:?}\n[quota]\nstore = \"redis\"\nredis_url = {:?}\nlimits_file = \"limits.yaml\"\n",
            support::repo().join("policies"),
            redis.url()
        ),
    )
    .expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&config)
        .args([
            "quota",
            "reset",
            "--domain",
            "fix",
            "--entry",
            "small=victim",
        ])
        .output()
        .expect("run tollgate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reset_at = Instant::now();
    for c in [&mut ca, &mut cb] {
        let cc = c.clone();
        let ok = eventually(Duration::from_secs(1), || {
            let mut c = cc.clone();
            async move { overall(&mut c, "small", "victim").await == OK }
        })
        .await;
        assert!(
            ok,
            "a replica still denies {:?} after the reset",
            reset_at.elapsed()
        );
    }
}

/// Issues 7.4 and 15.2(a): a cached answer is the store's answer under the
/// current limit, and other descriptors are not given invented numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_cache_answers_only_what_the_store_said() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, None)).await;
    let mut c = client(&tg).await;
    let with_override = |rpu: u32| {
        let mut d = desc(&[("user", "u1")]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: rpu,
            unit: 3, // HOUR
        });
        request(vec![d], 1)
    };
    assert_eq!(ask(&mut c, with_override(1)).await.overall_code, OK);
    assert_eq!(ask(&mut c, with_override(1)).await.overall_code, OVER);
    let r = ask(&mut c, with_override(100)).await;
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 98));
    let r = ask(&mut c, request(vec![desc(&[("user", "u1")])], 0)).await;
    assert_eq!(r.overall_code, OVER, "configured 2/hour, 2 used");

    // One descriptor answered from the cache: the other is not reported with
    // a made-up remaining count.
    // Three fit; the fourth is refused by the store, which the cache keeps.
    for _ in 0..4 {
        ask(&mut c, request(vec![desc(&[("small", "s")])], 1)).await;
    }
    let r = ask(
        &mut c,
        request(vec![desc(&[("small", "s")]), desc(&[("roomy", "x")])], 1),
    )
    .await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses.len(), 2);
    assert!(
        r.statuses[1].current_limit.is_none() && r.statuses[1].limit_remaining == 0,
        "an unasked descriptor has no invented numbers: {:?}",
        r.statuses[1]
    );
}

/// Issue 15.2(b): a limit raised by hot reload takes effect at once, though
/// the counter was cached as over under the old limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_raised_by_reload_takes_effect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_on(&dir, None);
    config.policy.watch = true;
    config.policy.reload_debounce_ms = 50;
    let tg = Tollgate::start(config).await;
    let mut c = client(&tg).await;
    for _ in 0..3 {
        assert_eq!(overall(&mut c, "small", "raise").await, OK);
    }
    assert_eq!(overall(&mut c, "small", "raise").await, OVER);
    assert_eq!(overall(&mut c, "small", "raise").await, OVER, "cached");
    write_limits(
        &dir,
        &LIMITS.replace(
            "rate_limit: { unit: hour, requests_per_unit: 3 }",
            "rate_limit: { unit: hour, requests_per_unit: 100 }",
        ),
    );
    let cc = c.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = cc.clone();
            async move { overall(&mut c, "small", "raise").await == OK }
        })
        .await,
        "still OVER_LIMIT under the raised limit"
    );
}

/// Issues 7.5 and 15.3: every unit, zero limits, and overrides that cannot
/// be honoured never become "unlimited".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unit_and_zero_limit_is_honoured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, None)).await;
    let mut c = client(&tg).await;
    assert_eq!(overall(&mut c, "monthly", "m").await, OK);
    assert_eq!(overall(&mut c, "monthly", "m").await, OK);
    let r = ask(&mut c, request(vec![desc(&[("monthly", "m")])], 1)).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(
        r.statuses[0].current_limit.as_ref().map(|l| l.unit),
        Some(5)
    );
    assert_eq!(
        overall(&mut c, "blocked", "b").await,
        OVER,
        "0 is a block list"
    );
    let with = |rpu: u32, unit: i32| {
        let mut d = desc(&[("roomy", "o")]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: rpu,
            unit,
        });
        request(vec![d], 1)
    };
    for (unit, name) in [(5, "MONTH"), (6, "YEAR"), (7, "WEEK")] {
        let mut d = desc(&[("roomy", name)]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: 1,
            unit,
        });
        let r = ask(&mut c, request(vec![d.clone()], 1)).await;
        assert_eq!(r.overall_code, OK, "{name}");
        let r = ask(&mut c, request(vec![d], 1)).await;
        assert_eq!(r.overall_code, OVER, "{name} override honoured");
    }
    assert_eq!(
        ask(&mut c, with(0, 3)).await.overall_code,
        OVER,
        "override 0"
    );
    assert_eq!(
        ask(&mut c, with(100, 0)).await.overall_code,
        OVER,
        "an UNKNOWN unit is not unlimited"
    );
    assert_eq!(ask(&mut c, with(100, 42)).await.overall_code, OVER);
}

/// Issue 7.6: a refused request gets one status per descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_request_gets_a_status_per_descriptor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, None)).await;
    let mut c = client(&tg).await;
    let mut r = request(vec![desc(&[("a", "1")]), desc(&[("b", "2")]), desc(&[])], 1);
    r.domain = String::new();
    let answer = ask(&mut c, r).await;
    assert_eq!(answer.overall_code, OVER);
    assert_eq!(answer.statuses.len(), 3);
    assert!(answer.statuses.iter().all(|s| s.code == OVER));
}

/// Issue 7.7: fail-open is counted, marked when configured, and never
/// claims counted numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_is_visible() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_on(&dir, Some(redis.url()));
    config.response.quota_fail_open_header = "x-tollgate-quota".into();
    config.quota.ready_requires_store = false;
    let tg = Tollgate::start(config).await;
    tg.wait_for_store().await;
    let mut c = client(&tg).await;
    redis.kill();
    let r = ask(&mut c, request(vec![desc(&[("open", "o")])], 1)).await;
    assert_eq!(r.overall_code, OK, "failure_mode allow");
    assert!(r.statuses[0].current_limit.is_none(), "{:?}", r.statuses[0]);
    let headers: Vec<(&str, &str)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(headers, vec![("x-tollgate-quota", "store_unavailable")]);
    let m = metrics_text(tg.admin).await;
    assert_eq!(
        metric_prefix(&m, "tollgate_quota_fail_open_total{rule=\"fix.open\"}"),
        1.0,
        "{m}"
    );
}

/// Issue 7.8: the offset between this replica's clock and Redis is measured
/// and exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_offset_to_redis_is_exported() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, Some(redis.url()))).await;
    tg.wait_for_store().await;
    let ready = raw_http(tg.admin, "GET", "/readyz", &[], "").await.json();
    let offset = ready["quota_store"]["clock_offset_ms"]
        .as_i64()
        .expect("offset measured on connect");
    assert!(offset.abs() < 1000, "same machine, same clock: {offset}");
    let m = metrics_text(tg.admin).await;
    assert!(
        m.contains("tollgate_quota_store_clock_offset_seconds "),
        "{m}"
    );
}

/// Issue 7.9: every key a script touches is declared in KEYS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_declare_every_key_they_touch() {
    let redis = RedisServer::start();
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "monitor"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli monitor");
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, Some(redis.url()))).await;
    tg.wait_for_store().await;
    let mut c = client(&tg).await;
    for key in ["sliding", "small", "monthly"] {
        assert_eq!(overall(&mut c, key, "k").await, OK);
    }
    let keys = redis.cli(&["--scan"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = monitor.kill();
    let out = monitor.wait_with_output().expect("monitor output");
    let log = String::from_utf8_lossy(&out.stdout);
    let mut declared = std::collections::HashSet::new();
    for line in log
        .lines()
        .filter(|l| l.contains("\"EVALSHA\"") || l.contains("\"evalsha\""))
    {
        let args: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        let n: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(0);
        declared.extend(args.iter().skip(3).take(n).map(|s| s.to_string()));
    }
    assert!(!keys.trim().is_empty());
    for k in keys.lines() {
        assert!(
            declared.contains(k),
            "{k} was written but never declared in KEYS"
        );
    }
}

/// Issue 7.10: not ready until the store is connected and its scripts
/// loaded; once ready, the first burst answers within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_store_can_serve() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, Some(format!("redis://127.0.0.1:{port}/0")))).await;
    let status = raw_http(tg.admin, "GET", "/readyz", &[], "").await.status;
    assert_eq!(status, 503, "no Redis yet: not ready");
    let _redis = RedisServer::start_with_port(port);
    let admin = tg.admin;
    assert!(
        eventually(Duration::from_secs(2), || async move {
            raw_http(admin, "GET", "/readyz", &[], "").await.status == 200
        })
        .await
    );
    let c = client(&tg).await;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { overall(&mut c, "roomy", &format!("first-{i}")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), OK, "a first request failed");
    }
}

/// Issue 7.11: connections skip `CLIENT SETINFO`, which Redis 7.0 counts as
/// an error on every connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_raises_no_error_stats() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, Some(redis.url()))).await;
    tg.wait_for_store().await;
    let mut c = client(&tg).await;
    assert_eq!(overall(&mut c, "roomy", "x").await, OK);
    let stats = redis.cli(&["info", "errorstats"]);
    assert!(!stats.contains("errorstat_"), "{stats}");
}

/// Issue 15.1: usage reported after the fact is counted in full, so the
/// budget runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_charges_past_the_limit_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, None)).await;
    let mut c = client(&tg).await;
    let charge = |hits| request(vec![desc(&[("tokens", "u1")])], hits);
    let r = ask(&mut c, charge(900)).await;
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 100));
    let r = ask(&mut c, charge(500)).await;
    assert_eq!(r.overall_code, OVER, "1400 of 1000");
    // The next request's check (hits_addend 0 is read as 1 by the protocol;
    // a per-descriptor 0 only checks) is refused.
    let mut check = desc(&[("tokens", "u1")]);
    check.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
    assert_eq!(
        ask(&mut c, request(vec![check], 1)).await.overall_code,
        OVER
    );
    assert_eq!(ask(&mut c, charge(1)).await.overall_code, OVER);
}

/// Issue 20.3: a descriptor key and value never collide with another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_keys_and_values_never_collide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, None)).await;
    let mut c = client(&tg).await;
    assert_eq!(overall(&mut c, "user", "internal").await, OK);
    assert_eq!(overall(&mut c, "user", "internal").await, OK);
    assert_eq!(
        overall(&mut c, "user", "internal").await,
        OVER,
        "(user, internal) is limited by `user`, not by `user_internal`"
    );
    let r = ask(&mut c, request(vec![desc(&[("user_internal", "x")])], 1)).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].limit_remaining, u32::MAX, "unlimited");
}

/// Issue 20.5: a domain without limits is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_domains_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, None)).await;
    let mut c = client(&tg).await;
    let mut r = request(vec![desc(&[("a", "1")])], 1);
    r.domain = "no-such-domain".into();
    assert_eq!(ask(&mut c, r.clone()).await.overall_code, OK);
    assert_eq!(ask(&mut c, r).await.overall_code, OK);
    let m = metrics_text(tg.admin).await;
    assert_eq!(
        metric_prefix(&m, "tollgate_rate_limit_unknown_domain_total "),
        2.0,
        "{m}"
    );
}

/// Issue 15.7: after a failover done by repointing an address, the old
/// master answers READONLY; the connection is dropped, readiness turns
/// false, and service resumes when the address serves a master again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_node_drops_the_connection_and_readiness() {
    let redis = RedisServer::start();
    let other = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let tg = Tollgate::start(config_on(&dir, Some(redis.url()))).await;
    tg.wait_for_store().await;
    let mut c = client(&tg).await;
    assert_eq!(overall(&mut c, "roomy", "f").await, OK);
    redis.cli(&["replicaof", "127.0.0.1", &other.port.to_string()]);
    let admin = tg.admin;
    let mut cc = c.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = cc.clone();
            async move {
                let _ = overall(&mut c, "roomy", "f").await;
                raw_http(admin, "GET", "/readyz", &[], "").await.status == 503
            }
        })
        .await,
        "a READONLY node still reads as ready"
    );
    let m = metrics_text(tg.admin).await;
    assert!(
        metric_prefix(
            &m,
            "tollgate_quota_store_reconnects_total{reason=\"node_unavailable\"}"
        ) >= 1.0,
        "{m}"
    );
    // The address serves a master again (the promoted node, say).
    redis.cli(&["replicaof", "no", "one"]);
    cc = c.clone();
    assert!(
        eventually(Duration::from_secs(3), || {
            let mut c = cc.clone();
            async move { overall(&mut c, "roomy", "f").await == OK }
        })
        .await
    );
    assert_eq!(overall(&mut c, "roomy", "f").await, OK);
}

/// Issue 15.7: Redis Sentinel; a failover is followed without a proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed() {
    // Redis 7 waits 5 s (repl-diskless-sync-delay) before a replica's first
    // full sync: without this, the replica may not hold the count in time.
    let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let sentinel = support::Sentinel::start("tg-master", master.port);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_on(&dir, None);
    config.quota.store = StoreKind::RedisSentinel;
    config.quota.redis_sentinel_nodes = vec![sentinel.url()];
    config.quota.redis_sentinel_master = "tg-master".into();
    let tg = Tollgate::start(config).await;
    tg.wait_for_store().await;
    let mut c = client(&tg).await;
    assert_eq!(overall(&mut c, "small", "s").await, OK);
    // Wait until the replica has the count, then fail over.
    assert!(
        eventually(Duration::from_secs(15), || async {
            redis_cli(replica.port, &["dbsize"]).trim() != "0"
        })
        .await
    );
    sentinel.failover("tg-master");
    assert!(
        eventually(Duration::from_secs(10), || async {
            redis_cli(replica.port, &["role"]).starts_with("master")
        })
        .await,
        "sentinel did not promote the replica"
    );
    let cc = c.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut c = cc.clone();
            async move { overall(&mut c, "small", "s").await == OK }
        })
        .await,
        "no service after the failover"
    );
    // One counted before the failover, one by the recovery check: exactly
    // one more fits under the limit of 3, so the count carried over.
    let mut more = 0;
    while overall(&mut c, "small", "s").await == OK {
        more += 1;
        assert!(more < 10, "never refused");
    }
    assert_eq!(more, 1, "counts carried over the failover");
}
