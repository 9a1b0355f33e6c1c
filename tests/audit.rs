//! The audit trail: records for every kind of decision through the real
//! listeners (ext_authz gRPC and forward-auth HTTP over loopback), no secret
//! in them, the hash chain and `tollgate audit verify`, rotation, and the
//! bounded queue dropping (and counting) when the sink stalls.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::{
    DEMO_FREE_KEY, DEMO_PAID_KEY, Tollgate, check_request, ext_authz, http_of, raw_http,
    set_source, test_config,
};
use tollgate::audit::{AuditConfig, AuditRecord, AuditSink, AuditTrail, VerifyError, verify};

const GLOBEX_KEY: &str = "tg_demo-globex_yBbjeNm0bA39bTc7QNb3XbD6xs4RtFQ62kcZfO";
const CHAT: &str = "/v1/chat/completions";
const PROMPT: &str = "the secret prompt 4711";

fn lines(path: &Path) -> Vec<String> {
    support::file_lines(path)
}

fn bad_line(result: Result<tollgate::audit::VerifyReport, VerifyError>) -> usize {
    match result {
        Err(VerifyError::BadLine { line, .. }) => line,
        other => panic!("expected a bad line, got {other:?}"),
    }
}

/// Runs one decision of each kind and returns the audit file.
async fn audited_traffic(dir: &Path) -> PathBuf {
    let path = dir.join("audit/trail.jsonl");
    let mut config = test_config();
    config.audit.enabled = true;
    config.audit.path = path.clone();
    config.server.forward_auth_listen = Some("127.0.0.1:0".parse().expect("addr"));
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<tollgate::quota::rules::QuotaRule>,
    }
    let rules: Rules = toml::from_str(
        "[[rules]]\nname = \"paid-key-per-minute\"\nper = [\"key\"]\nunit = \"minute\"\ntiers = { paid = 1 }\n",
    )
    .expect("rules");
    config.quota.rules = rules.rules;
    let mut tg = Tollgate::start(config).await;
    support::away_from_minute_boundary(Duration::from_secs(5)).await;
    let json = ("content-type", "application/json");
    let chat =
        format!(r#"{{"model":"llama-3-8b","messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#);
    let unknown = tollgate::identity::key_format::generate("nobody").expect("key");
    let free_bearer = format!("Bearer {DEMO_FREE_KEY}");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u16);
    let cases: Vec<Case> = vec![
        (
            "allow",
            vec![json, ("x-api-key", DEMO_PAID_KEY)],
            chat.clone(),
            200,
        ),
        (
            "deny",
            vec![json, ("authorization", free_bearer.as_str())],
            r#"{"model":"llama-3-70b"}"#.into(),
            403,
        ),
        (
            "unauth",
            vec![json, ("x-api-key", unknown.as_str())],
            chat.clone(),
            401,
        ),
        (
            "quota-1",
            vec![json, ("x-api-key", GLOBEX_KEY)],
            chat.clone(),
            200,
        ),
        (
            "quota-2",
            vec![json, ("x-api-key", GLOBEX_KEY)],
            chat.clone(),
            429,
        ),
    ];
    for (id, headers, body, want) in cases {
        let mut req = check_request("POST", CHAT, &headers, &body);
        http_of(&mut req).id = id.into();
        set_source(&mut req, Some("192.0.2.10"), "", "");
        assert_eq!(ext_authz(&tg, req).await.status, want, "{id}");
    }
    // The forward-auth adapter feeds the same trail.
    let fa = tg
        .running
        .as_ref()
        .and_then(|r| r.forward_auth_addr)
        .expect("forward-auth");
    let r = raw_http(
        fa,
        "GET",
        "/v1/models/llama-3-8b?api-version=1",
        &[("x-api-key", DEMO_FREE_KEY), ("x-request-id", "fa-1")],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    // Shutdown flushes the queue.
    tg.stop().await;
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_audited_without_secrets_and_the_chain_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = audited_traffic(dir.path()).await;
    let text = std::fs::read_to_string(&path).expect("audit file");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .filter(|r: &serde_json::Value| r["kind"] != "seal")
        .collect();
    assert_eq!(records.len(), 6, "{text}");
    // Shutdown sealed the file: its last line is the chain head.
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("\"kind\":\"seal\""))
    );
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("no record for {id}: {text}"))
    };

    let allow = by_id("allow");
    assert_eq!(allow["v"], tollgate::audit::SCHEMA_VERSION);
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["reason"], "allowed");
    assert_eq!(allow["status"], 200);
    assert_eq!(allow["caller"]["principal"], "ApiKey::\"demo-paid\"");
    assert_eq!(allow["caller"]["tenant"], "acme");
    assert_eq!(allow["caller"]["authn"], "api_key");
    assert_eq!(allow["caller"]["key_id"], "demo-paid");
    assert_eq!(allow["action"], "Action::\"chat\"");
    assert_eq!(allow["resource"], "Model::\"llama-3-8b\"");
    assert_eq!(allow["model"], "llama-3-8b");
    assert!(
        allow["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "keys-use-shared-models"))
    );
    assert!(
        allow["policy_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty())
    );
    assert_eq!(allow["quota"]["outcome"], "charged");
    assert_eq!(allow["quota"]["rule"], "paid-key-per-minute");
    assert_eq!(allow["client_address"], "192.0.2.10");
    let chat =
        format!(r#"{{"model":"llama-3-8b","messages":[{{"role":"user","content":"{PROMPT}"}}]}}"#);
    assert_eq!(
        allow["body_sha256"],
        hex::encode(Sha256::digest(chat.as_bytes()))
    );
    assert!(allow["time"].as_str().is_some_and(|t| t.ends_with('Z')));

    let deny = by_id("deny");
    assert_eq!(
        (deny["decision"].as_str(), deny["status"].as_u64()),
        (Some("deny"), Some(403))
    );
    assert_eq!(deny["reason"], "policy_denied");
    assert_eq!(deny["caller"]["key_id"], "demo-free");
    assert!(
        deny["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "free-tier-small-models-only"))
    );
    assert_eq!(deny["quota"]["outcome"], "none");

    let unauth = by_id("unauth");
    assert_eq!(unauth["reason"], "invalid_credential");
    assert_eq!(unauth["status"], 401);
    assert!(unauth["caller"].is_null());

    let over = by_id("quota-2");
    assert_eq!(
        (over["reason"].as_str(), over["status"].as_u64()),
        (Some("over_quota"), Some(429))
    );
    assert_eq!(over["quota"]["outcome"], "over");
    assert_eq!(over["quota"]["remaining"], 0);

    let fa = by_id("fa-1");
    assert_eq!(fa["decision"], "allow");
    assert_eq!(
        fa["path"], "/v1/models/llama-3-8b",
        "no query in the record"
    );
    assert_eq!(fa["model"], "llama-3-8b");
    assert_eq!(fa["client_address"], "127.0.0.1");

    // No credential, secret part of a key or prompt text, in any form.
    for secret in [DEMO_PAID_KEY, DEMO_FREE_KEY, GLOBEX_KEY, PROMPT] {
        let tail = secret.rsplit('_').next().unwrap_or(secret);
        assert!(
            !text.contains(secret) && !text.contains(tail),
            "{secret} leaked"
        );
    }

    let report = verify(std::slice::from_ref(&path)).expect("intact chain verifies");
    assert_eq!((report.records, report.first_seq), (6, Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_first_bad_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = audited_traffic(dir.path()).await;
    let original = lines(&path);
    let write = |name: &str, lines: &[String]| {
        let p = dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").expect("write");
        p
    };

    let mut deleted = original.clone();
    deleted.remove(2);
    assert_eq!(bad_line(verify(&[write("deleted", &deleted)])), 3);

    let mut swapped = original.clone();
    swapped.swap(1, 2);
    assert_eq!(bad_line(verify(&[write("swapped", &swapped)])), 2);

    let mut edited = original.clone();
    edited[3] = edited[3]
        .replace("\"deny\"", "\"allow\"")
        .replace("\"status\":", "\"status\": ");
    assert_ne!(edited[3], original[3]);
    assert_eq!(bad_line(verify(&[write("edited", &edited)])), 4);

    let mut first_gone = original.clone();
    first_gone.remove(0);
    let report = verify(&[write("first_gone", &first_gone)]).expect("continues a chain");
    assert_eq!(report.first_seq, Some(1), "reported as starting mid-chain");

    // The command line says the same, with the file and line.
    let cli = |file: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["audit", "verify"])
            .arg(file)
            .current_dir(support::repo())
            .output()
            .expect("run tollgate")
    };
    let ok = cli(&path);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: 6 records"));
    let bad = cli(&dir.path().join("deleted"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("deleted:3:"));
}

fn record(i: usize) -> AuditRecord {
    support::audit_record(i)
}

fn config(path: &Path, max_bytes: u64, queue: usize) -> AuditConfig {
    AuditConfig {
        enabled: true,
        sink: AuditSink::File,
        path: path.to_path_buf(),
        max_bytes,
        queue,
        ..AuditConfig::default()
    }
}

#[test]
fn rotation_and_restarts_keep_one_verifiable_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.jsonl");
    for run in 0..2 {
        let trail = AuditTrail::start(&config(&path, 4096, 1000), &path, None).expect("start");
        for i in 0..40 {
            trail.submit(record(run * 100 + i));
        }
        trail.close();
        assert_eq!((trail.written(), trail.dropped()), (40, 0));
    }
    let mut rotated: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("a.jsonl.")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort();
    assert!(rotated.len() >= 3, "rotated into several files");
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    files.push(path.clone());
    for f in &files {
        let size = std::fs::metadata(f).expect("meta").len();
        assert!(size <= 4096, "{} is {size} bytes", f.display());
    }
    let report = verify(&files).expect("the whole chain verifies");
    assert_eq!((report.records, report.first_seq), (80, Some(0)));
    // A later file alone continues the chain; a missing middle file is seen.
    assert!(verify(&files[1..]).expect("suffix").first_seq > Some(0));
    let mut gap = files.clone();
    gap.remove(1);
    match verify(&gap) {
        Err(VerifyError::BadLine { path, line, .. }) => {
            assert_eq!((path, line), (files[2].clone(), 1));
        }
        other => panic!("gap not detected: {other:?}"),
    }
}

#[test]
fn a_stalled_sink_drops_and_counts_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // Both ends open here, never read: the writer fills the pipe and stalls.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .expect("open fifo");
    let metrics = std::sync::Arc::new(tollgate::metrics::Metrics::new());
    let trail =
        AuditTrail::start(&config(&fifo, 1 << 30, 8), &fifo, Some(metrics.clone())).expect("start");
    // Far more than the pipe, the writer's buffer and the queue hold.
    for i in 0..3000 {
        trail.submit(record(i));
    }
    let dropped = trail.dropped();
    assert!(dropped > 0, "a stalled sink must drop, not block");
    assert!(metrics.encode().contains(&format!(
        "tollgate_audit_records_total{{result=\"dropped\"}} {dropped}"
    )));
    // Closing the pipe fails the stalled write; close() then returns.
    drop(held);
    trail.close();
    assert_eq!(trail.written() + trail.failed() + trail.dropped(), 3000);
}

#[test]
fn an_unwritable_audit_path_refuses_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "").expect("write");
    let mut config = test_config();
    config.audit.enabled = true;
    config.audit.path = file.join("audit.jsonl");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = runtime.enter();
    match tollgate::server::App::build(config) {
        Err(e) => assert!(e.to_string().contains("audit.path"), "{e}"),
        Ok(_) => panic!("started with an unwritable audit path"),
    }
}

/// The decision API and the rate limit service feed the same trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_api_and_rate_limit_answers_are_audited() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    use tollgate::proto::{self, EntityUid, decision_service_client::DecisionServiceClient};

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trail.jsonl");
    let limits = dir.path().join("limits.yaml");
    std::fs::write(
        &limits,
        "domain: llm\ndescriptors:\n  - key: tenant\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n",
    )
    .expect("limits");
    let mut config = test_config();
    config.audit.enabled = true;
    config.audit.path = path.clone();
    config.quota.limits_file = Some(limits);
    let mut tg = Tollgate::start(config).await;

    let uid = |ty: &str, id: &str| {
        Some(EntityUid {
            r#type: ty.into(),
            id: id.into(),
        })
    };
    let mut ctx = tollgate::engine::context::base();
    tollgate::engine::context::merge(
        &mut ctx,
        &serde_json::json!({"http": {"method": "POST", "headers": {"x-team": PROMPT}}, "authn": "api_key"}),
    );
    let mut api = DecisionServiceClient::new(tg.channel().await);
    api.check(proto::CheckRequest {
        principal: uid("ApiKey", "demo-paid"),
        action: uid("Action", "chat"),
        resource: uid("Model", "llama-3-8b"),
        context_json: ctx.to_string(),
        entities_json: String::new(),
    })
    .await
    .expect("decision api check");

    // A usage report for a request that reserved nothing is audited too.
    api.report_usage(proto::ReportUsageRequest {
        request_id: "never-reserved".into(),
        input_tokens: 12,
        output_tokens: 34,
        cached_input_tokens: 0,
    })
    .await
    .expect("report usage");

    let mut rls = RateLimitServiceClient::new(tg.channel().await);
    for _ in 0..2 {
        rls.should_rate_limit(RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "tenant".into(),
                    value: "acme-descriptor-value".into(),
                }],
                ..Default::default()
            }],
            hits_addend: 1,
        })
        .await
        .expect("rls");
    }
    tg.stop().await;

    let text = std::fs::read_to_string(&path).expect("trail");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let of = |api: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["api"] == api).collect()
    };
    let query = of("decision_api");
    assert_eq!(query.len(), 1, "{text}");
    assert_eq!(query[0]["caller"]["principal"], "ApiKey::\"demo-paid\"");
    assert_eq!(query[0]["caller"]["authn"], "query");
    assert_eq!(query[0]["action"], "Action::\"chat\"");
    let limited = of("ratelimit");
    assert_eq!(limited.len(), 2, "{text}");
    assert_eq!(limited[0]["decision"], "allow");
    assert_eq!(limited[0]["domain"], "llm");
    assert_eq!(limited[0]["quota"]["outcome"], "charged");
    assert_eq!(
        (
            limited[1]["status"].as_u64(),
            limited[1]["quota"]["outcome"].as_str()
        ),
        (Some(429), Some("over"))
    );
    assert_eq!(limited[1]["quota"]["rule"], "llm.tenant");
    assert!(!text.contains(PROMPT), "no query context in the trail");
    assert!(
        !text.contains("acme-descriptor-value"),
        "no descriptor values"
    );
    let usage = of("usage");
    assert_eq!(usage.len(), 1, "{text}");
    assert_eq!(usage[0]["request_id"], "never-reserved");
    assert_eq!(usage[0]["decision"], "settlement");
    assert_eq!(usage[0]["usage"]["output_tokens"], 34);
    assert_eq!(usage[0]["usage"]["result"], "unknown_request");
    assert_eq!(
        verify(std::slice::from_ref(&path))
            .expect("verifies")
            .records,
        4
    );
}

#[tokio::test]
async fn time_rotation_starts_a_file_per_period_and_keeps_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.jsonl");
    let mut cfg = config(&path, 1 << 20, 1000);
    cfg.rotate_secs = 1;
    let trail = AuditTrail::start(&cfg, &path, None).expect("start");
    let rotated = path.with_file_name("t.jsonl.1");
    // Records keep coming; a one-second period ends within the bound.
    let mut i = 0;
    let ok = support::eventually(Duration::from_secs(5), || {
        i += 1;
        trail.submit(record(i));
        let exists = rotated.exists();
        async move { exists }
    })
    .await;
    assert!(ok, "no rotation when the period ended");
    trail.submit(record(9999));
    trail.close();
    // Usually one rotation; another period may have ended meanwhile.
    let mut files: Vec<PathBuf> = (1..)
        .map(|n| path.with_file_name(format!("t.jsonl.{n}")))
        .take_while(|p| p.exists())
        .collect();
    files.push(path.clone());
    let report = verify(&files).expect("the chain spans the files");
    assert_eq!(report.records, trail.written());
    assert!(
        !lines(&path).is_empty(),
        "the new period's file has the later records"
    );
}

/// A sink that fails after start-up (here `/dev/full`: it opens, every
/// write fails) never refuses a decision; the failures are counted and
/// reported on `/readyz`, which stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_write_failures_are_counted_and_reported_on_readyz() {
    let mut config = test_config();
    config.audit.enabled = true;
    config.audit.path = PathBuf::from("/dev/full");
    let mut tg = Tollgate::start(config).await;
    let req = check_request("GET", "/v1/models", &[("x-api-key", DEMO_PAID_KEY)], "");
    assert_eq!(ext_authz(&tg, req).await.status, 200);
    let admin = tg.admin;
    let reported = support::eventually(Duration::from_secs(10), || async move {
        let r = raw_http(admin, "GET", "/readyz", &[], "").await;
        r.status == 200 && r.json()["audit"]["failing"] == true
    })
    .await;
    let r = raw_http(admin, "GET", "/readyz", &[], "").await;
    assert!(reported, "{} {}", r.status, r.body);
    assert!(
        r.json()["audit"]["failed"].as_u64() >= Some(1),
        "{}",
        r.body
    );
    tg.stop().await;
}
