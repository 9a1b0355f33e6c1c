//! Hot reload: edits take effect within 2 s, broken edits leave the last good
//! set serving and are reported, Kubernetes-style symlink swaps are seen.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{Tollgate, eventually, raw_http, test_config};
use tollgate::proto::decision_service_client::DecisionServiceClient;
use tollgate::proto::{self, EntityUid};

fn free_key_on_large_model() -> proto::CheckRequest {
    let mut ctx = tollgate::engine::context::base();
    tollgate::engine::context::merge(&mut ctx, &serde_json::json!({"authn": "api_key"}));
    proto::CheckRequest {
        principal: Some(EntityUid { r#type: "ApiKey".into(), id: "k".into() }),
        action: Some(EntityUid { r#type: "Action".into(), id: "chat".into() }),
        resource: Some(EntityUid { r#type: "Model".into(), id: "llama-3-70b".into() }),
        context_json: ctx.to_string(),
        entities_json: serde_json::json!([{
            "uid": {"type": "ApiKey", "id": "k"},
            "attrs": {"tenant": {"__entity": {"type": "Tenant", "id": "acme"}}, "tier": "free", "scopes": ["llm:generate"], "models": []},
            "parents": [{"type": "Tenant", "id": "acme"}]
        }])
        .to_string(),
    }
}

async fn ask(client: &mut DecisionServiceClient<tonic::transport::Channel>) -> (i32, String) {
    let r = client
        .check(free_key_on_large_model())
        .await
        .expect("check")
        .into_inner();
    (r.decision, r.policy_version)
}

const ALLOW: i32 = proto::Decision::Allow as i32;
const DENY: i32 = proto::Decision::Deny as i32;

/// The example's endpoint.cedar without the free-tier model restriction.
fn relaxed_endpoint(original: &str) -> String {
    original.replace("resource.size != \"small\"", "resource.size == \"never\"")
}

async fn start_watching(dir: &Path) -> Tollgate {
    let mut config = test_config();
    config.policy.dir = dir.to_path_buf();
    config.policy.watch = true;
    config.policy.reload_debounce_ms = 50;
    config.policy.reload_poll_secs = 0;
    Tollgate::start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_apply_and_broken_edits_keep_the_last_good_set() {
    let dir = support::copy_policies();
    let mut tg = start_watching(dir.path()).await;
    let mut client = DecisionServiceClient::new(tg.channel().await);
    let (decision, v1) = ask(&mut client).await;
    assert_eq!(decision, DENY);

    let endpoint = dir.path().join("endpoint.cedar");
    let original = std::fs::read_to_string(&endpoint).expect("read");
    std::fs::write(&endpoint, relaxed_endpoint(&original)).expect("write");
    let changed = eventually(Duration::from_secs(2), || {
        let mut c = client.clone();
        async move { ask(&mut c).await.0 == ALLOW }
    })
    .await;
    assert!(changed, "the edit did not take effect within 2 s");
    let (_, v2) = ask(&mut client).await;
    assert_ne!(v1, v2, "a new policy set must carry a new version");

    // A broken edit: decisions and version stay, and the failure is visible.
    std::fs::write(
        dir.path().join("tenant.cedar"),
        "permit (principal, action, resource) when { 1 + };",
    )
    .expect("write");
    let admin = tg.admin;
    let reported = eventually(Duration::from_secs(2), || async move {
        let r = raw_http(admin, "GET", "/policy", &[], "").await;
        r.json()["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("tenant.cedar:1:"))
    })
    .await;
    assert!(reported, "the broken edit was not reported on /policy");
    assert_eq!(ask(&mut client).await, (ALLOW, v2.clone()));
    let ready = raw_http(admin, "GET", "/readyz", &[], "").await;
    assert_eq!(ready.status, 200, "still ready on the last good set");
    assert_eq!(ready.json()["version"], v2.as_str());
    let metrics = raw_http(admin, "GET", "/metrics", &[], "").await.body;
    assert!(
        metrics.contains("tollgate_reloads_total{source=\"policies\",result=\"rejected\"}"),
        "{metrics}"
    );
    tg.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().expect("tempdir");
    let mount = root.path();
    let first = mount.join("..2026_11_23_a");
    std::fs::create_dir(&first).expect("mkdir");
    let src = support::repo().join("policies");
    let names = [
        "schema.cedarschema",
        "endpoint.cedar",
        "tenant.cedar",
        "action.cedar",
        "entities.json",
    ];
    for name in names {
        std::fs::copy(src.join(name), first.join(name)).expect("copy");
    }
    symlink("..2026_11_23_a", mount.join("..data")).expect("symlink");
    for name in names {
        symlink(format!("..data/{name}"), mount.join(name)).expect("symlink");
    }
    let mut tg = start_watching(mount).await;
    let mut client = DecisionServiceClient::new(tg.channel().await);
    assert_eq!(ask(&mut client).await.0, DENY);

    // What the kubelet does: write a new timestamped dir, point ..data at it
    // with an atomic rename of a fresh symlink.
    let second = mount.join("..2026_11_23_b");
    std::fs::create_dir(&second).expect("mkdir");
    for name in names {
        std::fs::copy(first.join(name), second.join(name)).expect("copy");
    }
    let original = std::fs::read_to_string(second.join("endpoint.cedar")).expect("read");
    std::fs::write(second.join("endpoint.cedar"), relaxed_endpoint(&original)).expect("write");
    symlink("..2026_11_23_b", mount.join("..data_tmp")).expect("symlink");
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).expect("rename");

    let changed = eventually(Duration::from_secs(2), || {
        let mut c = client.clone();
        async move { ask(&mut c).await.0 == ALLOW }
    })
    .await;
    assert!(changed, "the symlink swap was not picked up within 2 s");
    tg.stop().await;
}
