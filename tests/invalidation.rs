//! One invalidation channel across replicas: a key revocation and a key's
//! tier change reach every running replica at once, not when a cache expires
//! (issues 8.10 and 15.2).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use support::{RedisServer, Tollgate, eventually};

type Client = AuthorizationClient<tonic::transport::Channel>;

/// (HTTP status, reason code).
async fn check(c: &mut Client, key: &str) -> (u16, String) {
    let resp = c
        .check(support::check_request(
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", key)],
            r#"{"model":"llama-3-8b"}"#,
        ))
        .await
        .expect("check")
        .into_inner();
    match resp.http_response.expect("http_response") {
        HttpResponse::OkResponse(_) => (200, "allowed".into()),
        HttpResponse::DeniedResponse(d) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).expect("json");
            (
                d.status.map_or(0, |s| s.code as u16),
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
        HttpResponse::ErrorResponse(e) => panic!("{e:?}"),
    }
}

fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run tollgate");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A config with Redis-held keys cached for a minute (so only the push can
/// make a change take effect quickly) and a per-key quota by tier.
fn setup(redis: &RedisServer, dir: &tempfile::TempDir) -> std::path::PathBuf {
    let repo = support::repo();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[policy]\ndir = {:?}\nwatch = false\n\
             [identity]\napi_keys_file = {:?}\napi_keys_redis_url = {:?}\napi_keys_cache_ms = 60000\n\
             [quota]\nstore = \"redis\"\nredis_url = {:?}\nlimits_file = {:?}\n\
             [[quota.rules]]\nname = \"per-key\"\nper = [\"key\"]\nunit = \"hour\"\ntiers = {{ free = 1, paid = 100 }}\n",
            repo.join("policies"),
            repo.join("examples/keys.toml"),
            redis.url(),
            redis.url(),
            repo.join("examples/limits.yaml")
        ),
    )
    .expect("config");
    path
}

async fn replica(path: &std::path::Path) -> (Tollgate, Client) {
    let mut config = tollgate::config::Config::load(Some(path)).expect("config");
    config.server.grpc_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    let tg = Tollgate::start(config).await;
    tg.wait_for_store().await;
    let c = AuthorizationClient::new(tg.channel().await);
    (tg, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_replica_within_a_second() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = setup(&redis, &dir);
    let key = cli(
        &path,
        &[
            "keys",
            "create",
            "--id",
            "rev-1",
            "--tenant",
            "acme",
            "--tier",
            "paid",
            "--scope",
            "llm:generate",
        ],
    );
    let (_a, mut ca) = replica(&path).await;
    let (_b, mut cb) = replica(&path).await;
    // Both replicas cache the record (for a minute).
    assert_eq!(check(&mut ca, &key).await.0, 200);
    assert_eq!(check(&mut cb, &key).await.0, 200);
    cli(&path, &["keys", "revoke", "rev-1"]);
    let revoked_at = Instant::now();
    let refused = eventually(Duration::from_secs(1), || {
        let (mut ca, mut cb) = (ca.clone(), cb.clone());
        let key = key.clone();
        async move {
            check(&mut ca, &key).await.1 == "revoked_credential"
                && check(&mut cb, &key).await.1 == "revoked_credential"
        }
    })
    .await;
    assert!(
        refused,
        "replicas still accept a revoked key {:?} after the revoke (cache TTL is 60 s)",
        revoked_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_change_reaches_the_quota_of_every_replica() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = setup(&redis, &dir);
    let key = cli(
        &path,
        &[
            "keys",
            "create",
            "--id",
            "mover",
            "--tenant",
            "acme",
            "--tier",
            "free",
            "--scope",
            "llm:generate",
        ],
    );
    let (_a, mut ca) = replica(&path).await;
    let (_b, mut cb) = replica(&path).await;
    assert_eq!(check(&mut ca, &key).await.0, 200, "free: 1 per hour");
    assert_eq!(check(&mut ca, &key).await, (429, "over_quota".into()));
    assert_eq!(check(&mut cb, &key).await, (429, "over_quota".into()));
    // An operator moves the key to the paid tier and announces the change.
    redis.cli(&["hset", "tg:apikey:mover", "tier", "paid"]);
    redis.cli(&["publish", "tg:invalidate", "key mover"]);
    for c in [&mut ca, &mut cb] {
        let cc = c.clone();
        let key = key.clone();
        let ok = eventually(Duration::from_secs(1), || {
            let (mut c, key) = (cc.clone(), key.clone());
            async move { check(&mut c, &key).await.0 == 200 }
        })
        .await;
        assert!(ok, "a replica still answers 429 under the old tier");
    }
}
