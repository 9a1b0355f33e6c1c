//! The `tollgate` binary: validate, test, check, and start-up refusals.

mod support;

use std::process::{Command, Output};

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

#[test]
fn validate_accepts_the_examples() {
    let out = tollgate(&["validate"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("policies ok: 28 policies"),
        "{}",
        text(&out)
    );
}

#[test]
fn validate_reports_file_line_col_and_fails() {
    let cases = [
        (
            "action.cedar",
            "\n@id(\"bad\")\npermit (principal is ApiKey, action, resource) when { principal.tierr == \"x\" };\n",
            "action.cedar:",
            "tierr",
        ),
        (
            "tenant.cedar",
            "\npermit (principal, action, resource) when { 1 + };\n",
            "tenant.cedar:",
            "unexpected token",
        ),
        (
            "endpoint.cedar",
            "\n@id(\"suspended-tenant\")\npermit (principal, action, resource);\n",
            "tenant.cedar:",
            "duplicate policy id \"suspended-tenant\" (also in",
        ),
    ];
    for (file, append, want_file, want_msg) in cases {
        let dir = support::copy_policies();
        let path = dir.path().join(file);
        let mut content = std::fs::read_to_string(&path).expect("read");
        content.push_str(append);
        std::fs::write(&path, content).expect("write");
        let out = tollgate(&["validate", dir.path().to_str().expect("utf8")]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        let line = t
            .lines()
            .find(|l| l.contains(want_file))
            .unwrap_or_else(|| panic!("no {want_file} in {t}"));
        // file:line:col: message
        let after = line.split(want_file).nth(1).expect("position");
        let mut parts = after.splitn(3, ':');
        assert!(
            parts.next().is_some_and(|l| l.parse::<usize>().is_ok()),
            "{line}"
        );
        assert!(
            parts.next().is_some_and(|c| c.parse::<usize>().is_ok()),
            "{line}"
        );
        assert!(line.contains(want_msg), "{line}");
    }
}

#[test]
fn policy_tests_pass_on_the_examples_and_fail_on_a_wrong_expectation() {
    let out = tollgate(&["test"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(" passed, 0 failed"), "{t}");

    let dir = support::copy_policies();
    let tests = dir.path().join("tests/example.json");
    let content = std::fs::read_to_string(&tests).expect("read");
    // Flip the first case's expectation.
    let flipped = content.replacen("\"expect\": \"allow\"", "\"expect\": \"deny\"", 1);
    std::fs::write(&tests, flipped).expect("write");
    let out = tollgate(&["test", dir.path().to_str().expect("utf8")]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("FAIL") && t.contains("expected deny, got allow"),
        "{t}"
    );
    assert!(t.contains(" passed, 1 failed"), "{t}");
}

#[test]
fn check_explains_a_decision() {
    let entities = r#"[{"uid":{"type":"ApiKey","id":"k"},"attrs":{"tenant":{"__entity":{"type":"Tenant","id":"acme"}},"tier":"free","scopes":["llm:generate"],"models":[]},"parents":[{"type":"Tenant","id":"acme"}]}]"#;
    let out = tollgate(&[
        "check",
        "--principal",
        "ApiKey::\"k\"",
        "--action",
        "Action::\"chat\"",
        "--resource",
        "Model::\"llama-3-70b\"",
        "--entities",
        entities,
        "--context",
        r#"{"authn":"api_key"}"#,
    ]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("decision: deny") && t.contains("free-tier-small-models-only"),
        "{t}"
    );

    let out = tollgate(&[
        "check",
        "--principal",
        "ApiKey::\"k\"",
        "--action",
        "Action::\"chat\"",
        "--resource",
        "Model::\"llama-3-8b\"",
        "--entities",
        entities,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("decision: allow"));
}

/// `check` decides an API key principal as `serve` does: its entity comes
/// from the configured keys file (here the demo keys), no `--entities`.
#[test]
fn check_reads_key_principals_from_the_keys_file() {
    let check = |principal: &str, resource: &str| {
        tollgate(&[
            "check",
            "--principal",
            principal,
            "--action",
            "Action::\"chat\"",
            "--resource",
            resource,
        ])
    };
    let out = check("ApiKey::\"demo-paid\"", "Model::\"llama-3-8b\"");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("decision: allow") && t.contains("keys-use-shared-models"),
        "{t}"
    );
    // The key's tier comes from the file: free keys reach small models only.
    let out = check("ApiKey::\"demo-free\"", "Model::\"llama-3-70b\"");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("free-tier-small-models-only"), "{t}");
    // Its tenant too: acme's private model, not globex's.
    let out = check("ApiKey::\"demo-globex\"", "Model::\"acme-support-ft\"");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // A key id the file lacks: say what to pass instead.
    let out = check("ApiKey::\"nope\"", "Model::\"llama-3-8b\"");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("no key with id \"nope\"") && t.contains("--entities"),
        "{t}"
    );
}

#[test]
fn broken_config_stops_start_up_with_what_to_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[server]\ngrpc_listn = \"127.0.0.1:0\"\n",
            "unknown field `grpc_listn`",
        ),
        (
            "[[routes]]\nmethod = \"POST\"\npath = \"/x\"\naction = \"chat\"\nresource = 'Model::\"{body.nope}\"'\n",
            "unknown placeholder",
        ),
        (
            "[policy]\ndir = \"/nonexistent\"\n",
            "cannot read policy directory",
        ),
    ];
    for (i, (config, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, config).expect("write");
        let out = tollgate(&["--config", path.to_str().expect("utf8"), "serve"]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(t.contains(want), "{want:?} not in {t}");
    }
}

#[test]
fn validate_reports_a_broken_limits_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("limits.yaml");
    // 0 is a block list (issue 15.3); a negative limit is the error.
    std::fs::write(&limits, "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: -1 }\n").expect("write");
    let config = dir.path().join("c.toml");
    let repo = support::repo();
    std::fs::write(
        &config,
        format!(
            "[policy]\ndir = {:?}\n[identity]\napi_keys_file = {:?}\n[quota]\nlimits_file = \"limits.yaml\"\n",
            repo.join("policies"),
            repo.join("examples/keys.toml")
        ),
    )
    .expect("write");
    let out = tollgate(&["--config", config.to_str().expect("utf8"), "validate"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("limits.yaml:4:") && t.contains("0 (refuse all) or more"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_get_and_reset_against_redis() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

    let redis = support::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("limits.yaml"),
        "domain: llm\ndescriptors:\n  - key: tenant\n    rate_limit: { unit: hour, requests_per_unit: 10 }\n",
    )
    .expect("write");
    let repo = support::repo();
    let config_path = dir.path().join("c.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[policy]\ndir = {:?}\nwatch = false\n\
             [identity]\napi_keys_file = {:?}\n[quota]\nstore = \"redis\"\nredis_url = {:?}\nlimits_file = \"limits.yaml\"\n",
            repo.join("policies"),
            repo.join("examples/keys.toml"),
            redis.url()
        ),
    )
    .expect("write");
    let config = tollgate::config::Config::load(Some(&config_path)).expect("config");
    let mut tg = support::Tollgate::start(config).await;
    tg.wait_for_store().await;
    let mut client = RateLimitServiceClient::new(tg.channel().await);
    for _ in 0..2 {
        client
            .should_rate_limit(RateLimitRequest {
                domain: "llm".into(),
                descriptors: vec![RateLimitDescriptor {
                    entries: vec![Entry {
                        key: "tenant".into(),
                        value: "acme".into(),
                    }],
                    ..Default::default()
                }],
                hits_addend: 0,
            })
            .await
            .expect("rpc");
    }
    let c = config_path.to_str().expect("utf8");
    let get = || {
        tollgate(&[
            "--config",
            c,
            "quota",
            "get",
            "--domain",
            "llm",
            "--entry",
            "tenant=acme",
        ])
    };
    let out = get();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("used: 2") && text(&out).contains("remaining: 8"),
        "{}",
        text(&out)
    );
    let out = tollgate(&[
        "--config",
        c,
        "quota",
        "reset",
        "--domain",
        "llm",
        "--entry",
        "tenant=acme",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&get()).contains("used: 0"));
    // Issue 7.11: a reader that closes the pipe early (`| head -1`) ends the
    // output quietly; nothing panics.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "--config",
            c,
            "quota",
            "get",
            "--domain",
            "llm",
            "--entry",
            "tenant=acme",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take()); // the reader is gone before anything is written
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    tg.stop().await;
}

/// Issue 7.11: errors name their cause once.
#[test]
fn errors_say_their_cause_once() {
    let out = tollgate(&["--config", "/nonexistent/tollgate.toml", "validate"]);
    assert!(!out.status.success());
    let t = text(&out);
    assert_eq!(t.matches("No such file or directory").count(), 1, "{t}");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("limits.yaml"),
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n",
    )
    .expect("write");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[policy]\ndir = {:?}\n[identity]\napi_keys_file = {:?}\n[quota]\nlimits_file = \"limits.yaml\"\n",
            support::repo().join("policies"),
            support::repo().join("examples/keys.toml"),
        ),
    )
    .expect("write");
    let out = tollgate(&["--config", config.to_str().expect("utf8"), "serve"]);
    assert!(!out.status.success());
    let t = text(&out);
    assert_eq!(t.matches("unknown unit").count(), 1, "{t}");
    assert!(t.contains("limits.yaml:4:"), "{t}");
}

#[test]
fn mcp_schema_generates_the_example_fragment_and_validate_types_arguments() {
    // The example schema ends with the fragment generated from the saved
    // tools list: regenerating it gives the same text.
    let out = tollgate(&["mcp", "schema", "examples/mcp/tools.json"]);
    assert!(out.status.success(), "{}", text(&out));
    let fragment = String::from_utf8_lossy(&out.stdout).into_owned();
    let schema = std::fs::read_to_string(support::repo().join("policies/schema.cedarschema"))
        .expect("schema");
    assert!(
        schema.ends_with(&fragment),
        "regenerate the MCP part of policies/schema.cedarschema"
    );
    assert!(fragment.contains("\"amount\": Long"), "{fragment}");

    // Policies on tool arguments are type-checked: a typo and a string
    // compared as a number are load errors; the right policy loads.
    for (condition, ok) in [
        ("context.input.amount > 10", true),
        ("context.input.amout > 10", false),
        ("context.input.amount > \"10\"", false),
    ] {
        let dir = support::copy_policies();
        let path = dir.path().join("mcp.cedar");
        let mut content = std::fs::read_to_string(&path).expect("read");
        content.push_str(&format!(
            "\n@id(\"typed\")\nforbid (principal, action == Mcp::Action::\"transfer\", resource) when {{ {condition} }};\n"
        ));
        std::fs::write(&path, content).expect("write");
        let out = tollgate(&["validate", dir.path().to_str().expect("utf8")]);
        assert_eq!(out.status.success(), ok, "{condition}: {}", text(&out));
    }

    let bad = tollgate(&["mcp", "schema", "Cargo.toml"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("not JSON"), "{}", text(&bad));
}
