//! Reserve at ext_authz, settle through ext_proc and `ReportUsage`, on real
//! Tollgate servers over loopback gRPC sharing a real Redis (and a real
//! Redis Cluster): exactness under concurrency across two replicas,
//! concurrency limits, the fates of requests that do not finish, and the
//! tenant and tier labels of the usage metric on the settling replica.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
use support::{
    FaultProxy, RedisCluster, RedisServer, Tollgate, eventually, ext_authz, metric_prefix,
    metrics_text, test_config,
};
use tollgate::config::{Config, StoreKind};
use tollgate::proto::report_usage_response::Result as Settle;

/// 103 estimated input tokens plus `max_tokens`.
fn chat(id: &str, max_tokens: u64) -> CheckRequest {
    let body = serde_json::json!({
        "model": "llama-3-8b",
        "max_tokens": max_tokens,
        "stream": true,
        "messages": [{ "role": "user", "content": "x".repeat(396) }],
    })
    .to_string();
    let mut req = support::check_request(
        "POST",
        "/v1/chat/completions",
        &[
            ("x-api-key", support::DEMO_PAID_KEY),
            ("content-type", "application/json"),
        ],
        &body,
    );
    support::http_of(&mut req).id = id.to_string();
    req
}

/// A config whose `[quota]` is `quota` (TOML), on `store`.
fn config(quota: &str, store: &Store) -> Config {
    #[derive(serde::Deserialize)]
    struct Quota {
        quota: tollgate::config::QuotaConfig,
    }
    let parsed: Quota = toml::from_str(quota).expect("quota toml");
    let mut config = test_config();
    config.quota = parsed.quota;
    config.quota.deadline_ms = 1000;
    match store {
        Store::Redis(url) => {
            config.quota.store = StoreKind::Redis;
            config.quota.redis_url = url.clone();
        }
        Store::Cluster(nodes) => {
            config.quota.store = StoreKind::RedisCluster;
            config.quota.redis_cluster_nodes = nodes.clone();
        }
    }
    config
}

enum Store {
    Redis(String),
    Cluster(Vec<String>),
}

fn rules(tokens: u64, concurrent: u64, extra: &str) -> String {
    format!(
        r#"
[quota]
reservation_ttl_secs = 2
sweep_interval_secs = 1
{extra}
[[quota.rules]]
name = "key-tokens"
per = ["key"]
unit = "hour"
cost = "tokens"
limit = {tokens}

[[quota.rules]]
name = "key-inflight"
per = ["key"]
cost = "concurrent"
limit = {concurrent}
"#
    )
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    support::header_map(pairs)
}

fn message(request: In) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        ..Default::default()
    }
}

/// How the streamed response goes.
#[derive(Clone, Copy)]
enum Ending {
    /// A final usage chunk (input, output), then the end of the body.
    Usage(u64, u64),
    /// One delta ("abcd", 1 token counted), then the client goes away.
    Disconnect,
    /// The upstream answers this status without a body worth reading.
    Status(u16),
}

/// One response streamed through Tollgate's ext_proc, as Envoy streams it;
/// `before_end` runs just before the message that ends the exchange.
async fn stream(tg: &Tollgate, id: &str, ending: Ending, before_end: impl FnOnce()) {
    let mut before_end = Some(before_end);
    let mut end = move || {
        if let Some(f) = before_end.take() {
            f();
        }
    };
    let (tx, mut replies) = support::ext_proc_stream(tg).await;
    let mut send = async |m: In| {
        tx.send(message(m)).await.expect("send");
        replies.message().await.expect("reply").expect("a reply");
    };
    send(In::RequestHeaders(HttpHeaders {
        headers: Some(headers(&[
            (":path", "/v1/chat/completions"),
            ("x-request-id", id),
        ])),
        ..Default::default()
    }))
    .await;
    let status = match ending {
        Ending::Status(s) => s.to_string(),
        _ => "200".to_string(),
    };
    if let Ending::Status(_) = ending {
        end();
    }
    send(In::ResponseHeaders(HttpHeaders {
        headers: Some(headers(&[
            (":status", &status),
            ("content-type", "text/event-stream"),
        ])),
        ..Default::default()
    }))
    .await;
    let delta = "data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\n\n";
    match ending {
        Ending::Status(_) => {}
        Ending::Disconnect => {
            send(In::ResponseBody(HttpBody {
                body: delta.as_bytes().to_vec(),
                end_of_stream: false,
                ..Default::default()
            }))
            .await;
            end();
            // The client went away: Envoy ends the gRPC stream.
            drop(tx);
        }
        Ending::Usage(input, output) => {
            send(In::ResponseBody(HttpBody {
                body: delta.as_bytes().to_vec(),
                end_of_stream: false,
                ..Default::default()
            }))
            .await;
            end();
            let last = format!(
                "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{input},\"completion_tokens\":{output}}}}}\n\ndata: [DONE]\n\n"
            );
            send(In::ResponseBody(HttpBody {
                body: last.into_bytes(),
                end_of_stream: true,
                ..Default::default()
            }))
            .await;
        }
    }
}

/// `ReportUsage`, or the gRPC error.
async fn report(tg: &Tollgate, id: &str, input: u64, output: u64) -> Result<i32, tonic::Status> {
    use tollgate::proto::ReportUsageRequest;
    use tollgate::proto::decision_service_client::DecisionServiceClient;
    let mut c = DecisionServiceClient::new(tg.channel().await);
    c.report_usage(ReportUsageRequest {
        request_id: id.into(),
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: 0,
    })
    .await
    .map(|r| r.into_inner().result)
}

fn header<'a>(v: &'a support::Verdict, name: &str) -> Option<&'a str> {
    v.deny_headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// 64 streamed requests, 4 slots, two replicas: ext_authz on one, the
/// stream's ext_proc on the other, and a duplicate `ReportUsage` on the
/// first. Never more than 4 admitted-and-unfinished; the budget ends up
/// charged exactly the sum of the usage the streams reported; a 429 for a
/// slot names the concurrency rule and carries its headers; after the TTL
/// no reservation is left.
async fn exact_across_replicas(store: Store, keys: impl Fn() -> Vec<String>) {
    // Actual usage: sum over i of (10 + i) + i = 4,672. Then one request of
    // 103 + 8,000 fills the budget exactly.
    let total: u64 = (0..64u64).map(|i| 10 + 2 * i).sum();
    let limit = total + 8103;
    let config = config(&rules(limit, 4, ""), &store);
    let a = Arc::new(Tollgate::start(config.clone()).await);
    let b = Arc::new(Tollgate::start(config).await);
    a.wait_for_store().await;
    b.wait_for_store().await;
    let in_flight = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let refused = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let (first, second) = if i % 2 == 0 {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        let (in_flight, peak, refused) = (in_flight.clone(), peak.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("s-{i}");
            loop {
                let v = ext_authz(&first, chat(&id, 1)).await;
                if v.status == 429 {
                    assert_eq!(v.code, "too_many_concurrent");
                    assert_eq!(header(&v, "ratelimit-limit"), Some("4"), "the slot's limit");
                    assert_eq!(header(&v, "ratelimit-remaining"), Some("0"));
                    assert!(header(&v, "retry-after").is_some());
                    refused.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                assert_eq!(v.status, 200, "{}", v.code);
                break;
            }
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let flight = in_flight.clone();
            stream(&second, &id, Ending::Usage(10 + i, i), move || {
                flight.fetch_sub(1, Ordering::SeqCst);
            })
            .await;
            // A gateway retrying its report, on the other replica.
            assert_eq!(
                report(&first, &id, 10 + i, i).await.expect("report"),
                Settle::AlreadySettled as i32
            );
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 4, "concurrency went to {peak}");
    assert!(refused.load(Ordering::SeqCst) > 0, "the limit was reached");
    let fill = ext_authz(&a, chat("fill", 8000)).await;
    assert_eq!(fill.status, 200, "exactly the rest fits: {}", fill.code);
    let more = ext_authz(&b, chat("more", 1)).await;
    assert_eq!((more.status, more.code.as_str()), (429, "over_budget"));
    assert_eq!(
        header(&more, "ratelimit-limit"),
        Some(limit.to_string().as_str())
    );
    // "fill" is never settled (a lost stream): after the TTL nothing is left.
    assert!(
        eventually(Duration::from_secs(15), || async {
            !keys().iter().any(|k| k.contains(":resv:"))
        })
        .await,
        "reservations left: {:?}",
        keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_settle_exactly_across_two_replicas_on_redis() {
    let redis = RedisServer::start();
    let keys = || redis.cli(&["--scan"]).lines().map(str::to_string).collect();
    exact_across_replicas(Store::Redis(redis.url()), keys).await;
    let slots: Vec<String> = redis
        .cli(&["--scan", "--pattern", "*:inflight"])
        .lines()
        .map(|k| redis.cli(&["get", k]).trim().to_string())
        .collect();
    assert!(slots.iter().all(|n| n == "0" || n.is_empty()), "{slots:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_settle_exactly_across_two_replicas_on_the_cluster() {
    let cluster = RedisCluster::start();
    let keys = || cluster.keys().into_iter().map(|(_, k)| k).collect();
    exact_across_replicas(Store::Cluster(cluster.urls()), keys).await;
}

/// A request id refused once (no slot free) and reserved on a retry is
/// settled by the other replica until its own TTL: the record of where it
/// reserved lives as long as the reservation, not as long as the refused
/// attempt's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_reservation_is_settled_by_any_replica_on_the_cluster() {
    let cluster = RedisCluster::start();
    let config = config(&rules(1000, 1, ""), &Store::Cluster(cluster.urls()));
    let a = Tollgate::start(config.clone()).await;
    let b = Tollgate::start(config).await;
    a.wait_for_store().await;
    b.wait_for_store().await;
    assert_eq!(ext_authz(&a, chat("hold", 1)).await.status, 200);
    let refused = ext_authz(&a, chat("late", 1)).await;
    assert_eq!(
        (refused.status, refused.code.as_str()),
        (429, "too_many_concurrent")
    );
    assert_eq!(
        report(&a, "hold", 10, 1).await.expect("report"),
        Settle::Settled as i32
    );
    // The refused attempt was 1.5 s ago; the reservation TTL is 2 s: the
    // retry's reservation is settled 1 s after it, past the refused
    // attempt's TTL and within its own.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ext_authz(&a, chat("late", 1)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        report(&b, "late", 10, 1).await.expect("report"),
        Settle::Settled as i32,
        "the other replica found the reservation"
    );
    assert_eq!(
        report(&a, "late", 10, 1).await.expect("report"),
        Settle::AlreadySettled as i32
    );
}

async fn charged(tg: &Tollgate) -> f64 {
    metric_prefix(
        &metrics_text(tg.admin).await,
        "tollgate_usage_charged_total{rule=\"key-tokens\"",
    )
}

/// A client gone mid-stream and an upstream error: each settles by its
/// configured fate, and each releases its slot at once (the limit is 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_responses_settle_by_their_fate() {
    let redis = RedisServer::start();
    let store = || Store::Redis(redis.url());
    // Defaults: a disconnect keeps the reservation (603), an upstream error
    // releases it (0).
    let tg = Tollgate::start(config(&rules(100_000, 1, ""), &store())).await;
    tg.wait_for_store().await;
    assert_eq!(ext_authz(&tg, chat("d1", 500)).await.status, 200);
    let busy = ext_authz(&tg, chat("d1-busy", 1)).await;
    assert_eq!(
        (busy.status, busy.code.as_str()),
        (429, "too_many_concurrent")
    );
    stream(&tg, "d1", Ending::Disconnect, || {}).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            charged(&tg).await == 603.0
        })
        .await,
        "disconnect: the reservation is charged (got {})",
        charged(&tg).await
    );
    assert_eq!(
        ext_authz(&tg, chat("e1", 500)).await.status,
        200,
        "slot released"
    );
    stream(&tg, "e1", Ending::Status(503), || {}).await;
    assert_eq!(charged(&tg).await, 603.0, "upstream error: released");
    assert_eq!(
        ext_authz(&tg, chat("next", 1)).await.status,
        200,
        "slot released"
    );
    drop(tg);

    // The other fates: what was generated (103 + 1), and the reservation
    // kept on an upstream error.
    let redis2 = RedisServer::start();
    let extra = "on_disconnect = \"generated\"\non_upstream_error = \"charge\"";
    let tg = Tollgate::start(config(
        &rules(100_000, 1, extra),
        &Store::Redis(redis2.url()),
    ))
    .await;
    tg.wait_for_store().await;
    assert_eq!(ext_authz(&tg, chat("d2", 500)).await.status, 200);
    stream(&tg, "d2", Ending::Disconnect, || {}).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            charged(&tg).await == 104.0
        })
        .await,
        "disconnect: what was generated (got {})",
        charged(&tg).await
    );
    assert_eq!(ext_authz(&tg, chat("e2", 500)).await.status, 200);
    stream(&tg, "e2", Ending::Status(500), || {}).await;
    assert_eq!(charged(&tg).await, 104.0 + 603.0, "upstream error: kept");
    assert_eq!(ext_authz(&tg, chat("next", 1)).await.status, 200);
}

/// Reports until the store answers (bounded), as a gateway retries.
async fn retry_report(tg: &Tollgate, id: &str, input: u64, output: u64) -> Option<i32> {
    for _ in 0..100 {
        if let Ok(r) = report(tg, id, input, output).await {
            return Some(r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The settle script ran but its reply was lost (a connection cut, Redis
/// failing over): the report fails, the retry finds the request settled,
/// and the budget holds the usage once. Then Redis paused during a settle:
/// same outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_lost_in_flight_is_never_charged_twice() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port).await;
    // No background sweep to take the dropped reply.
    let extra = "sweep_interval_secs = 3600";
    // A TTL longer than the pause below: the retried report must settle,
    // not find the reservation expired.
    let text = rules(1000, 10, "")
        .replace("sweep_interval_secs = 1\n", "")
        .replace("reservation_ttl_secs = 2", "reservation_ttl_secs = 60");
    let text = text.replace("[quota]\n", &format!("[quota]\n{extra}\n"));
    let tg = Tollgate::start(config(&text, &Store::Redis(proxy.url()))).await;
    tg.wait_for_store().await;
    assert_eq!(
        ext_authz(&tg, chat("a", 500)).await.status,
        200,
        "603 reserved"
    );
    proxy.drop_next_reply();
    assert!(
        report(&tg, "a", 100, 50).await.is_err(),
        "the reply was lost"
    );
    assert_eq!(proxy.dropped(), 1);
    let retried = retry_report(&tg, "a", 100, 50).await;
    assert_eq!(retried, Some(Settle::AlreadySettled as i32));
    // 150 used: 850 more fits exactly, then nothing.
    assert_eq!(ext_authz(&tg, chat("b", 747)).await.status, 200);
    let c = ext_authz(&tg, chat("c", 1)).await;
    assert_eq!((c.status, c.code.as_str()), (429, "over_budget"));

    // Redis paused during the settle of "b" (850 reserved, 50 used): the
    // report times out; the queued script runs when Redis resumes.
    redis.cli(&["client", "pause", "3000", "all"]);
    assert!(report(&tg, "b", 25, 25).await.is_err(), "redis paused");
    let retried = retry_report(&tg, "b", 25, 25).await;
    assert!(
        retried == Some(Settle::AlreadySettled as i32) || retried == Some(Settle::Settled as i32),
        "{retried:?}"
    );
    assert_eq!(
        report(&tg, "b", 25, 25).await.expect("report"),
        Settle::AlreadySettled as i32
    );
    // 150 + 50 = 200 used: 800 (103 + 697) fits exactly.
    let d = ext_authz(&tg, chat("d", 697)).await;
    assert_eq!(d.status, 200, "{} {retried:?} {:?}", d.code, d.deny_headers);
    let e = ext_authz(&tg, chat("e", 1)).await;
    assert_eq!((e.status, e.code.as_str()), (429, "over_budget"));
}

/// The `tollgate_usage_charged_total` samples of rule `key-tokens`.
async fn charged_samples(tg: &Tollgate) -> Vec<String> {
    metrics_text(tg.admin)
        .await
        .lines()
        .filter(|l| l.starts_with("tollgate_usage_charged_total{rule=\"key-tokens\""))
        .map(str::to_string)
        .collect()
}

/// One replica reserves, the other settles (through ext_proc, and through
/// `ReportUsage`): the settling replica counts the usage under the caller's
/// tenant and tier, which it only learns from the reservation in the store.
async fn settling_replica_counts_tenant_and_tier(store: Store) {
    let config = config(&rules(100_000, 4, ""), &store);
    let a = Tollgate::start(config.clone()).await;
    let b = Tollgate::start(config).await;
    a.wait_for_store().await;
    b.wait_for_store().await;

    // The paid key (acme, paid), settled from the stream on the other replica.
    assert_eq!(ext_authz(&a, chat("l-paid", 100)).await.status, 200);
    stream(&b, "l-paid", Ending::Usage(120, 30), || {}).await;
    // The admin key (acme, enterprise), settled by a report to the other one.
    let mut admin = chat("l-admin", 100);
    support::http_of(&mut admin)
        .headers
        .insert("x-api-key".into(), support::DEMO_ADMIN_KEY.into());
    assert_eq!(ext_authz(&a, admin).await.status, 200);
    assert_eq!(
        report(&b, "l-admin", 200, 50).await.expect("report"),
        Settle::Settled as i32
    );

    let sample = |tier: &str| {
        format!(
            "tollgate_usage_charged_total{{rule=\"key-tokens\",unit=\"tokens\",model=\"other\",tenant=\"acme\",tier=\"{tier}\"}}"
        )
    };
    let want = [(sample("paid"), 150.0), (sample("enterprise"), 250.0)];
    let counted = eventually(Duration::from_secs(10), || async {
        let text = metrics_text(b.admin).await;
        want.iter()
            .all(|(s, v)| support::metric(&text, s) == Some(*v))
    })
    .await;
    assert!(counted, "{want:?} in {:?}", charged_samples(&b).await);
    // The reserving replica settled nothing, so counted nothing.
    assert!(
        charged_samples(&a).await.is_empty(),
        "{:?}",
        charged_samples(&a).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settling_replica_counts_tenant_and_tier_on_redis() {
    let redis = RedisServer::start();
    settling_replica_counts_tenant_and_tier(Store::Redis(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settling_replica_counts_tenant_and_tier_on_the_cluster() {
    let cluster = RedisCluster::start();
    settling_replica_counts_tenant_and_tier(Store::Cluster(cluster.urls())).await;
}
