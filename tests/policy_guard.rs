//! Policy files that must never be activated, and must never take the
//! process down: nesting deep enough to overflow a stack, an emptied file
//! (a partial write), a directory that does not match its manifest; and a
//! broken save reported once however many file events follow it.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::{Tollgate, TollgateProcess, eventually, metric, raw_http, test_config};
use tollgate::proto::decision_service_client::DecisionServiceClient;
use tollgate::proto::{self, EntityUid};

const ALLOW: i32 = proto::Decision::Allow as i32;
const DENY: i32 = proto::Decision::Deny as i32;

/// A free key asking to chat with `model`, with `body` merged into the
/// context's body facts.
fn free_key(model: &str, body: serde_json::Value) -> proto::CheckRequest {
    let mut ctx = tollgate::engine::context::base();
    tollgate::engine::context::merge(
        &mut ctx,
        &serde_json::json!({"authn": "api_key", "body": body}),
    );
    proto::CheckRequest {
        principal: Some(EntityUid { r#type: "ApiKey".into(), id: "k".into() }),
        action: Some(EntityUid { r#type: "Action".into(), id: "chat".into() }),
        resource: Some(EntityUid { r#type: "Model".into(), id: model.into() }),
        context_json: ctx.to_string(),
        entities_json: serde_json::json!([{
            "uid": {"type": "ApiKey", "id": "k"},
            "attrs": {"tenant": {"__entity": {"type": "Tenant", "id": "acme"}}, "tier": "free", "scopes": ["llm:generate"], "models": []},
            "parents": [{"type": "Tenant", "id": "acme"}]
        }])
        .to_string(),
    }
}

/// Denied only by action.cedar's `max-tokens-ceiling`.
fn too_many_tokens() -> proto::CheckRequest {
    free_key(
        "llama-3-8b",
        serde_json::json!({"present": true, "complete": true, "size": 40, "max_tokens": 10000}),
    )
}

async fn ask(
    client: &mut DecisionServiceClient<tonic::transport::Channel>,
    request: proto::CheckRequest,
) -> (i32, String) {
    let r = client.check(request).await.expect("check").into_inner();
    (r.decision, r.policy_version)
}

async fn policy_status(admin: std::net::SocketAddr) -> serde_json::Value {
    raw_http(admin, "GET", "/policy", &[], "").await.json()
}

/// Waits until `/policy` reports a reload error containing every `want`.
async fn wait_for_error(admin: std::net::SocketAddr, want: &[&str]) -> serde_json::Value {
    let ok = eventually(Duration::from_secs(10), || async move {
        policy_status(admin).await["last_reload_error"]
            .as_str()
            .is_some_and(|e| want.iter().all(|w| e.contains(w)))
    })
    .await;
    let last = policy_status(admin).await;
    assert!(ok, "no reload error with {want:?}: {last}");
    last
}

/// Writes `path` as an editor does: a hidden temporary file renamed over
/// it, so no reload sees it half-written.
fn save(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).expect("name")
    ));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(support::repo())
        .output()
        .expect("run tollgate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Policy texts that nest too deeply in each way Cedar recurses, with what
/// the refusal says.
fn too_deep() -> Vec<(&'static str, String, &'static str)> {
    let head = "permit (principal, action, resource) when {";
    let parens = format!(
        "{head} {}true{} }};",
        "(".repeat(10_000),
        ")".repeat(10_000)
    );
    let sets = format!(
        "{head} {}1{} == [] }};",
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    let plus = format!("{head} {} > 0 }};", vec!["1"; 20_000].join(" + "));
    let ors = format!(
        "{head} {} }};",
        (0..200)
            .map(|i| format!("principal == ApiKey::\"k{i}\""))
            .collect::<Vec<_>>()
            .join(" || ")
    );
    let ifs = format!(
        "{head} {}false }};",
        "if principal == ApiKey::\"x\" then true else ".repeat(300)
    );
    vec![
        ("parens.cedar", parens, "nest deeper than 64"),
        ("sets.cedar", sets, "nest deeper than 64"),
        ("plus.cedar", plus, "more than 2000 operators"),
        ("ors.cedar", ors, "levels deep, more than 128"),
        ("ifs.cedar", ifs, "levels deep, more than 128"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_policies_are_refused_and_the_real_server_keeps_serving() {
    let dir = support::copy_policies();
    let mut tg = TollgateProcess::start(
        dir.path(),
        "",
        "watch = true\nreload_debounce_ms = 50\nreload_poll_secs = 0",
    )
    .await;
    let mut client = DecisionServiceClient::new(tg.channel().await);
    let (decision, version) = ask(&mut client, too_many_tokens()).await;
    assert_eq!(decision, DENY);

    for (name, text, why) in too_deep() {
        save(&dir.path().join(name), &text);
        let status = wait_for_error(tg.admin, &[name, why]).await;
        assert!(tg.alive(), "tollgate died on {name}: {}", tg.log());
        assert_eq!(status["version"], version.as_str(), "{name}");
        assert_eq!(
            ask(&mut client, too_many_tokens()).await,
            (DENY, version.clone())
        );
        std::fs::remove_file(dir.path().join(name)).expect("rm");
    }
    let metrics = raw_http(tg.admin, "GET", "/metrics", &[], "").await.body;
    let rejected = metric(
        &metrics,
        "tollgate_reloads_total{source=\"policies\",result=\"rejected\"}",
    );
    assert!(rejected.is_some_and(|n| n >= 5.0), "{metrics}");
    // A deep entities file and schema are refused the same way.
    let entities = dir.path().join("entities.json");
    let good = std::fs::read_to_string(&entities).expect("read");
    save(
        &entities,
        &format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
    );
    wait_for_error(tg.admin, &["entities.json:1:", "nest deeper than 64"]).await;
    save(&entities, &good);
    let schema = dir.path().join("schema.cedarschema");
    let mut deep = std::fs::read_to_string(&schema).expect("read");
    deep.push_str(&format!(
        "\ntype Deep = {}Long{};\n",
        "{ a: ".repeat(5_000),
        " }".repeat(5_000)
    ));
    save(&schema, &deep);
    wait_for_error(tg.admin, &["schema.cedarschema:", "nest deeper than 64"]).await;
    assert!(tg.alive(), "{}", tg.log());
    assert_eq!(ask(&mut client, too_many_tokens()).await, (DENY, version));
}

#[test]
fn validate_reports_nesting_with_file_and_line() {
    for (name, policy, why) in too_deep() {
        let dir = support::copy_policies();
        std::fs::write(dir.path().join(name), format!("\n{policy}")).expect("write");
        let out = tollgate(&["validate", dir.path().to_str().expect("utf8")]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {t}");
        assert!(
            t.contains(&format!("{name}:2:")) && t.contains(why),
            "{name}: {t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_just_inside_the_limits_load_and_decide_on_request_threads() {
    let dir = support::copy_policies();
    // 62 brackets inside `when { }`, and a chain of 100 alternatives.
    let chain = (0..100)
        .map(|i| format!("principal.tier == \"t{i}\""))
        .collect::<Vec<_>>()
        .join(" || ");
    std::fs::write(
        dir.path().join("deep.cedar"),
        format!(
            "@id(\"deep-but-allowed\")\nforbid (principal is ApiKey, action, resource) when {{ {}{chain} || principal.tier == \"free\"{} }};\n",
            "(".repeat(62),
            ")".repeat(62)
        ),
    )
    .expect("write");
    // The real binary: its request threads have the stack it sets.
    let tg = TollgateProcess::start(dir.path(), "", "watch = false").await;
    let mut client = DecisionServiceClient::new(tg.channel().await);
    let small = free_key("llama-3-8b", serde_json::json!({}));
    let r = client.check(small).await.expect("check").into_inner();
    assert_eq!(r.decision, DENY);
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(
        r.determining_policies
            .contains(&"deep-but-allowed".to_string()),
        "{r:?}"
    );
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
async fn an_emptied_policy_file_is_refused_until_it_is_removed() {
    let dir = support::copy_policies();
    let mut tg = start_watching(dir.path()).await;
    let mut client = DecisionServiceClient::new(tg.channel().await);
    let (decision, version) = ask(&mut client, too_many_tokens()).await;
    assert_eq!(decision, DENY);

    let action = dir.path().join("action.cedar");
    for emptied in ["", "\n  \n", "// nothing here yet\n"] {
        std::fs::write(&action, emptied).expect("truncate");
        wait_for_error(tg.admin, &["action.cedar:1:1:", "now holds none"]).await;
        assert_eq!(
            ask(&mut client, too_many_tokens()).await,
            (DENY, version.clone()),
            "an emptied action.cedar must not be activated"
        );
    }
    // Removing the file is how its policies are dropped.
    std::fs::remove_file(&action).expect("rm");
    let admin = tg.admin;
    let old = &version;
    let applied = eventually(Duration::from_secs(10), || async move {
        let s = policy_status(admin).await;
        s["version"] != old.as_str() && s["last_reload_error"].is_null()
    })
    .await;
    assert!(applied, "{}", policy_status(admin).await);
    assert_eq!(ask(&mut client, too_many_tokens()).await.0, ALLOW);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_guards_reloads_and_is_written_by_the_cli() {
    let dir = support::copy_policies();
    let d = dir.path().to_str().expect("utf8");
    let out = tollgate(&["manifest", d]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("manifest written"), "{}", text(&out));
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["policies"], 28);
    assert!(
        manifest["files"]["action.cedar"]["sha256"].is_string(),
        "{manifest}"
    );

    let mut tg = start_watching(dir.path()).await;
    let mut client = DecisionServiceClient::new(tg.channel().await);
    let (decision, version) = ask(&mut client, too_many_tokens()).await;
    assert_eq!(decision, DENY);

    // Any change the manifest does not describe is refused: an edit, a
    // truncation that drops only some policies, a new file.
    let action = dir.path().join("action.cedar");
    let original = std::fs::read_to_string(&action).expect("read");
    let cut = &original[..original
        .find("@id(\"max-tokens-ceiling\")")
        .expect("policy")];
    save(&action, cut);
    wait_for_error(
        tg.admin,
        &["manifest.json", "action.cedar does not match the manifest"],
    )
    .await;
    assert_eq!(
        ask(&mut client, too_many_tokens()).await,
        (DENY, version.clone())
    );
    save(&action, &original);
    save(
        &dir.path().join("extra.cedar"),
        "permit (principal, action, resource);",
    );
    wait_for_error(tg.admin, &["extra.cedar is not listed in the manifest"]).await;
    std::fs::remove_file(dir.path().join("extra.cedar")).expect("rm");

    // `tollgate validate` checks the manifest too.
    std::fs::write(&action, cut).expect("partial write");
    let out = tollgate(&["validate", d]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("does not match the manifest"),
        "{}",
        text(&out)
    );

    // The intended change, then the manifest: applied.
    let out = tollgate(&["manifest", d]);
    assert!(out.status.success(), "{}", text(&out));
    let admin = tg.admin;
    let applied = eventually(Duration::from_secs(10), || async move {
        policy_status(admin).await["policies"] == 25
    })
    .await;
    assert!(applied, "{}", policy_status(admin).await);
    assert_eq!(ask(&mut client, too_many_tokens()).await.0, ALLOW);

    // A manifest is not written for a broken directory.
    std::fs::write(
        &action,
        "permit (principal, action, resource) when { 1 + };",
    )
    .expect("write");
    let out = tollgate(&["manifest", d]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("manifest not written"),
        "{}",
        text(&out)
    );
    assert!(
        dir.path().join("manifest.json").exists(),
        "the old manifest stays"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broken_save_is_one_failure_however_many_events_follow() {
    let dir = support::copy_policies();
    let mut tg = start_watching(dir.path()).await;
    let admin = tg.admin;
    // Every reload of the policies, whatever its result.
    let attempts = || async move {
        let m = raw_http(admin, "GET", "/metrics", &[], "").await.body;
        ["unchanged", "rejected", "swapped"]
            .iter()
            .filter_map(|r| {
                metric(
                    &m,
                    &format!("tollgate_reloads_total{{source=\"policies\",result=\"{r}\"}}"),
                )
            })
            .sum::<f64>()
    };
    let tenant = dir.path().join("tenant.cedar");
    let broken = "permit (principal, action, resource) when { 1 + };";
    save(&tenant, broken);
    let first_error =
        wait_for_error(admin, &["tenant.cedar:1:"]).await["last_reload_error"].clone();
    // The same content saved again (and again): each save is a file event
    // and a reload, none of them a new failure.
    for _ in 0..3 {
        let before = attempts().await;
        save(&tenant, broken);
        let seen = eventually(Duration::from_secs(10), || async move {
            attempts().await > before
        })
        .await;
        assert!(seen, "the save did not cause a reload");
    }
    assert_eq!(policy_status(admin).await["failed_reloads"], 1);
    // Different broken content is a new failure.
    save(
        &tenant,
        "forbid (principal, action, resource) when { 2 * };",
    );
    let counted = eventually(Duration::from_secs(10), || async move {
        policy_status(admin).await["failed_reloads"] == 2
    })
    .await;
    assert!(counted, "{}", policy_status(admin).await);
    // Going back to the first broken content is not a third failure.
    let before = attempts().await;
    save(&tenant, broken);
    let seen = eventually(Duration::from_secs(10), || async move {
        attempts().await > before
    })
    .await;
    assert!(seen, "the save did not cause a reload");
    let status = policy_status(admin).await;
    assert_eq!(status["failed_reloads"], 2);
    assert_eq!(
        status["last_reload_error"], first_error,
        "the error shown is the one the files give now"
    );
    let m = raw_http(admin, "GET", "/metrics", &[], "").await.body;
    assert_eq!(
        metric(
            &m,
            "tollgate_reloads_total{source=\"policies\",result=\"rejected\"}"
        ),
        Some(2.0),
        "{m}"
    );
    tg.stop().await;
}
