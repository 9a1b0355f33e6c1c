//! Brute-force lockout (`identity.lockout`): a sprayer the test runs sends
//! wrong secrets through ext_authz `Check` (and through a real Envoy, whose
//! reported client address is what is locked); the failing source is
//! refused with 429 `locked_out` and `Retry-After`, the victim elsewhere is
//! not, and replicas sharing a Redis store agree.

mod support;

use support::{
    DEMO_FREE_KEY, DEMO_PAID_KEY, Envoy, RedisServer, Tollgate, check_request, ext_authz,
    metrics_text, raw_http, set_source, start_upstream, test_config,
};
use tollgate::config::StoreKind;
use tollgate::identity::key_format::generate;

const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"llama-3-8b","messages":[]}"#;

fn locking_config() -> tollgate::config::Config {
    let mut config = test_config();
    let lockout = &mut config.identity.lockout;
    lockout.enabled = true;
    lockout.key_failures = 3;
    lockout.address_failures = 8;
    lockout.cooldown_secs = 120;
    lockout.exempt_cidrs = vec!["203.0.113.0/24".parse().expect("cidr")];
    config
}

/// One `Check` of a chat request with `key` from `address`.
async fn check_from(tg: &Tollgate, address: &str, key: &str) -> support::Verdict {
    let mut req = check_request(
        "POST",
        CHAT,
        &[("content-type", "application/json"), ("x-api-key", key)],
        BODY,
    );
    set_source(&mut req, Some(address), "", "");
    ext_authz(tg, req).await
}

fn header<'a>(v: &'a support::Verdict, name: &str) -> Option<&'a str> {
    v.deny_headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Sprays `n` wrong secrets for the key id `id` from `address`, each one
/// refused as an invalid credential.
async fn spray(tg: &Tollgate, address: &str, id: &str, n: usize) {
    for _ in 0..n {
        let guess = generate(id).expect("key");
        let v = check_from(tg, address, &guess).await;
        assert_eq!((v.status, v.code.as_str()), (401, "invalid_credential"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sprayed_key_id_locks_the_sprayer_not_the_victim() {
    let mut tg = Tollgate::start(locking_config()).await;
    let attacker = "192.0.2.66";
    spray(&tg, attacker, "demo-paid", 3).await;

    // From the sprayer's address even the right secret is refused now.
    let locked = check_from(&tg, attacker, DEMO_PAID_KEY).await;
    assert_eq!((locked.status, locked.code.as_str()), (429, "locked_out"));
    let retry: u64 = header(&locked, "retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=120).contains(&retry), "retry-after {retry}");

    // The victim, at its own address, is not locked out; another key from
    // the sprayer's address is not either (below the address limit).
    let victim = check_from(&tg, "198.51.100.10", DEMO_PAID_KEY).await;
    assert_eq!(victim.status, 200, "{}", victim.code);
    let other = check_from(&tg, attacker, DEMO_FREE_KEY).await;
    assert_eq!(other.status, 200, "{}", other.code);

    let text = metrics_text(tg.admin).await;
    assert!(
        text.contains("tollgate_lockouts_total{kind=\"key\"} 1"),
        "{text}"
    );
    assert!(text.contains("tollgate_lockout_refusals_total{kind=\"key\"} 1"));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_locks_and_an_exempt_range_never_does() {
    let mut tg = Tollgate::start(locking_config()).await;
    // Eight different unknown key ids from one address: no pair reaches its
    // limit, the address does.
    for i in 0..8 {
        spray(&tg, "192.0.2.77", &format!("guess-{i}"), 1).await;
        spray(&tg, "203.0.113.9", &format!("guess-{i}"), 1).await;
    }
    let locked = check_from(&tg, "192.0.2.77", DEMO_FREE_KEY).await;
    assert_eq!((locked.status, locked.code.as_str()), (429, "locked_out"));
    let exempt = check_from(&tg, "203.0.113.9", DEMO_FREE_KEY).await;
    assert_eq!(exempt.status, 200, "{}", exempt.code);
    // A request without a credential authenticates nothing and is not
    // refused by the lock (policy decides: anonymous chat needs a key).
    let mut anonymous = check_request("POST", CHAT, &[], BODY);
    set_source(&mut anonymous, Some("192.0.2.77"), "", "");
    let v = ext_authz(&tg, anonymous).await;
    assert_eq!(v.code, "missing_credential");
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_agree_on_a_lock() {
    let redis = RedisServer::start();
    let replica = || {
        let mut config = locking_config();
        config.quota.store = StoreKind::Redis;
        config.quota.redis_url = redis.url();
        config
    };
    let mut a = Tollgate::start(replica()).await;
    let mut b = Tollgate::start(replica()).await;
    a.wait_for_store().await;
    b.wait_for_store().await;
    // Failures spread over both replicas add up.
    spray(&a, "192.0.2.88", "demo-paid", 2).await;
    spray(&b, "192.0.2.88", "demo-paid", 1).await;
    for tg in [&a, &b] {
        let v = check_from(tg, "192.0.2.88", DEMO_PAID_KEY).await;
        assert_eq!((v.status, v.code.as_str()), (429, "locked_out"));
    }
    let keys = redis.cli(&["--scan"]);
    assert!(
        !keys.contains("192.0.2.88") && !keys.contains("demo-paid"),
        "lockout names reach Redis hashed: {keys}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_the_reported_client_address_is_locked() {
    let mut tg = Tollgate::start(locking_config()).await;
    let (upstream, _task) = start_upstream().await;
    let envoy = Envoy::start(tg.grpc.port(), upstream.port()).await;
    let send = |key: String, xff: &'static str| async move {
        raw_http(
            envoy.listener,
            "POST",
            CHAT,
            &[
                ("content-type", "application/json"),
                ("x-api-key", key.as_str()),
                ("x-forwarded-for", xff),
            ],
            BODY,
        )
        .await
    };
    for _ in 0..3 {
        let r = send(generate("demo-paid").expect("key"), "198.51.100.200").await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    // A client cannot choose the address that is counted: another
    // X-Forwarded-For changes nothing.
    let locked = send(DEMO_PAID_KEY.to_string(), "203.0.113.77").await;
    assert_eq!(locked.status, 429, "{}", locked.body);
    assert_eq!(locked.json()["error"]["code"], "locked_out");
    assert!(locked.header("retry-after").is_some());
    let other = send(DEMO_FREE_KEY.to_string(), "198.51.100.200").await;
    assert_eq!(other.status, 200, "{}", other.body);
    tg.stop().await;
}
