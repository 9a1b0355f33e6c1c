//! Safe policy rollout: a shadow policy set evaluated beside the live one
//! (through the real ext_authz and tollgate.v1 listeners), never changing an
//! answer, its disagreements counted and audited; `tollgate policy promote`
//! makes it live for a running server and `rollback` swaps back.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{
    DEMO_FREE_KEY, DEMO_PAID_KEY, Tollgate, check_request, copy_policies, eventually, ext_authz,
    metric, metrics_text, test_config,
};

const CHAT: &str = "/v1/chat/completions";
const NO_SMALL_MODEL: &str =
    "@id(\"shadow-no-8b\")\nforbid (principal, action, resource == Model::\"llama-3-8b\");\n";

/// The shadow change: no one may use llama-3-8b any more (allow → deny for
/// paid keys), and free keys may use large models (deny → allow).
fn shadow_set() -> tempfile::TempDir {
    let dir = copy_policies();
    std::fs::write(dir.path().join("shadow.cedar"), NO_SMALL_MODEL).expect("write");
    let endpoint = dir.path().join("endpoint.cedar");
    let text = std::fs::read_to_string(&endpoint).expect("read");
    let relaxed = text.replace(
        "principal.tier == \"free\" && resource.size != \"small\"",
        "principal.tier == \"free\" && resource.size == \"no-such-size\"",
    );
    assert_ne!(
        text, relaxed,
        "the example policy changed; update this test"
    );
    std::fs::write(&endpoint, relaxed).expect("write");
    dir
}

fn chat(
    model: &str,
    key: &str,
    id: &str,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
    let mut request = check_request(
        "POST",
        CHAT,
        &[("content-type", "application/json"), ("x-api-key", key)],
        &body,
    );
    support::http_of(&mut request).id = id.into();
    request
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test]
async fn shadow_disagreements_are_counted_and_audited_without_changing_answers() {
    let (live, shadow, out) = (
        copy_policies(),
        shadow_set(),
        tempfile::tempdir().expect("tmp"),
    );
    let audit = out.path().join("audit.jsonl");
    let mut config = test_config();
    config.policy.dir = live.path().to_path_buf();
    config.policy.shadow_dir = Some(shadow.path().to_path_buf());
    config.audit.enabled = true;
    config.audit.path = audit.clone();
    let mut tg = Tollgate::start(config).await;

    // METHOD model key ⇒ live answer (unchanged), shadow direction.
    let cases = [
        (
            "llama-3-8b",
            DEMO_PAID_KEY,
            "paid-8b",
            200,
            Some("allow_to_deny"),
        ),
        (
            "llama-3-70b",
            DEMO_FREE_KEY,
            "free-70b",
            403,
            Some("deny_to_allow"),
        ),
        ("llama-3-70b", DEMO_PAID_KEY, "paid-70b", 200, None),
        ("llama-3-8b", "tg_nobody_x", "unauth", 401, None),
    ];
    for (model, key, id, status, _) in cases {
        let verdict = ext_authz(&tg, chat(model, key, id)).await;
        assert_eq!(verdict.status, status, "{id}: the live set decides");
    }

    // tollgate.v1: the same comparison on a direct query.
    let query = tollgate::proto::CheckRequest {
        principal: Some(tollgate::proto::EntityUid {
            r#type: "ApiKey".into(),
            id: "shadow-query".into(),
        }),
        action: Some(tollgate::proto::EntityUid {
            r#type: "Action".into(),
            id: "chat".into(),
        }),
        resource: Some(tollgate::proto::EntityUid {
            r#type: "Model".into(),
            id: "llama-3-8b".into(),
        }),
        context_json: support::chat_query_context(),
        entities_json: support::api_key_entity_json("shadow-query", "paid"),
    };
    let answer =
        tollgate::proto::decision_service_client::DecisionServiceClient::new(tg.channel().await)
            .check(query)
            .await
            .expect("check")
            .into_inner();
    assert_eq!(answer.decision, tollgate::proto::Decision::Allow as i32);

    let text = metrics_text(tg.admin).await;
    let count = |direction: &str| {
        metric(
            &text,
            &format!("tollgate_shadow_disagreements_total{{direction=\"{direction}\"}}"),
        )
    };
    assert_eq!(count("allow_to_deny"), Some(2.0), "{text}");
    assert_eq!(count("deny_to_allow"), Some(1.0), "{text}");

    tg.stop().await;
    let records = records(&audit);
    for (_, _, id, _, direction) in cases {
        let record = records
            .iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("no record {id}"));
        assert_eq!(record["shadow"]["direction"].as_str(), direction, "{id}");
        if direction.is_some() {
            assert_ne!(record["shadow"]["policy_version"], record["policy_version"]);
        }
    }
    let paid = records
        .iter()
        .find(|r| r["request_id"] == "paid-8b")
        .expect("record");
    assert_eq!(paid["decision"], "allow");
    assert_eq!(paid["shadow"]["decision"], "deny");
    assert_eq!(
        paid["shadow"]["policies"],
        serde_json::json!(["shadow-no-8b"])
    );
    let query_record = records
        .iter()
        .find(|r| r["api"] == "decision_api")
        .expect("query record");
    assert_eq!(query_record["shadow"]["direction"], "allow_to_deny");
}

fn tollgate_cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run tollgate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn promote_makes_the_shadow_live_and_rollback_restores_the_previous_set() {
    let root = tempfile::tempdir().expect("tmp");
    let live = root.path().join("policies");
    let shadow = shadow_set();
    std::fs::rename(copy_policies().keep(), &live).expect("live set");
    let config_file = root.path().join("tollgate.toml");
    std::fs::write(
        &config_file,
        format!(
            "[policy]\ndir = {live:?}\nshadow_dir = {:?}\n[identity]\napi_keys_file = {:?}\n",
            shadow.path(),
            support::repo().join("examples/keys.toml"),
        ),
    )
    .expect("config");

    let mut config = test_config();
    config.policy.dir = live.clone();
    config.policy.shadow_dir = Some(shadow.path().to_path_buf());
    config.policy.watch = true;
    config.policy.reload_debounce_ms = 50;
    let mut tg = Tollgate::start(config).await;
    let server = &tg;
    let status = move || async move {
        ext_authz(server, chat("llama-3-8b", DEMO_PAID_KEY, "p"))
            .await
            .status
    };
    assert_eq!(status().await, 200);

    // A shadow set that does not load is never promoted.
    std::fs::write(shadow.path().join("broken.cedar"), "permit (principal,").expect("write");
    let (ok, text) = tollgate_cli(&config_file, &["policy", "promote"]);
    assert!(!ok, "a broken shadow set must be refused: {text}");
    assert!(text.contains("broken.cedar"), "{text}");
    assert!(!live.join("shadow.cedar").exists());
    std::fs::remove_file(shadow.path().join("broken.cedar")).expect("rm");

    let (ok, text) = tollgate_cli(&config_file, &["policy", "promote"]);
    assert!(ok, "{text}");
    assert!(live.join("shadow.cedar").exists());
    assert!(
        root.path()
            .join("policies.previous/endpoint.cedar")
            .exists()
    );
    let denied = eventually(Duration::from_secs(10), || async { status().await == 403 }).await;
    assert!(denied, "the running server did not take the promoted set");

    let (ok, text) = tollgate_cli(&config_file, &["policy", "rollback"]);
    assert!(ok, "{text}");
    assert!(!live.join("shadow.cedar").exists());
    let allowed = eventually(Duration::from_secs(10), || async { status().await == 200 }).await;
    assert!(
        allowed,
        "the running server did not take the rolled-back set"
    );
    tg.stop().await;
}
