//! The model catalog (issue 16, items 1 and 5): token counts that match
//! OpenAI's reference encoder, the context-window check before the model,
//! `context.usage` in policies, and budgets reserved with the real count.

mod support;

use std::process::Command;

use support::{Tollgate, ext_authz, test_config};
use tollgate::config::Config;
use tollgate::usage::tokenizer::{Counter, Encoding};

const ENCODINGS: [(Encoding, &str); 4] = [
    (Encoding::Cl100kBase, "cl100k_base"),
    (Encoding::O200kBase, "o200k_base"),
    (Encoding::P50kBase, "p50k_base"),
    (Encoding::R50kBase, "r50k_base"),
];

const TEXTS: [&str; 6] = [
    "hello world",
    "tiktoken is great!",
    "Größenwahn 日本語のテキスト 🚀",
    "<|endoftext|> is not special here",
    "    fn main() {\n        println!(\"{}\", 1 + 2);\n    }\n",
    "",
];

/// The `.tiktoken` vocabulary files `tiktoken-rs` compiles in, from the
/// cargo registry. The Python package checks each file's SHA-256 against
/// the hash OpenAI publishes, so both sides provably use one vocabulary.
fn vocabularies() -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let src = home.join("registry/src");
    let found = std::fs::read_dir(&src)
        .expect("cargo registry sources")
        .flatten()
        .flat_map(|index| {
            std::fs::read_dir(index.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|d| d.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("tiktoken-rs-0.12"))
        })
        .map(|p| p.join("assets"))
        .find(|p| p.join("cl100k_base.tiktoken").exists());
    found.unwrap_or_else(|| panic!("no tiktoken-rs assets under {}", src.display()))
}

/// Runs the reference encoder: one line per (encoding, text) and one per
/// (encoding, chat) with OpenAI's cookbook accounting.
fn reference_counts(chat: &serde_json::Value) -> Vec<String> {
    let cache = tempfile::tempdir().expect("tempdir");
    let assets = vocabularies();
    for (_, name) in ENCODINGS {
        // tiktoken's cache key: the SHA-1 of the file's URL.
        let url = format!("https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken");
        let key = Command::new("python3")
            .args([
                "-c",
                "import hashlib,sys;print(hashlib.sha1(sys.argv[1].encode()).hexdigest())",
                &url,
            ])
            .output()
            .expect("python3");
        let key = String::from_utf8_lossy(&key.stdout).trim().to_string();
        std::fs::copy(
            assets.join(format!("{name}.tiktoken")),
            cache.path().join(key),
        )
        .expect("copy vocabulary");
    }
    let script = r#"
import json, sys, tiktoken
texts, chat = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in ["cl100k_base", "o200k_base", "p50k_base", "r50k_base"]:
    enc = tiktoken.get_encoding(name)
    for t in texts:
        print(len(enc.encode_ordinary(t)))
    n = 3
    for m in chat:
        n += 3
        for k, v in m.items():
            n += len(enc.encode_ordinary(v)) + (1 if k == "name" else 0)
    print(n)
"#;
    let out = Command::new(support::python_bin())
        .env("TIKTOKEN_CACHE_DIR", cache.path())
        .args([
            "-c",
            script,
            &serde_json::to_string(&TEXTS).expect("json"),
            &chat.to_string(),
        ])
        .output()
        .expect("the test virtualenv's python (scripts/test installs tiktoken)");
    assert!(
        out.status.success(),
        "reference encoder failed (is PyPI `tiktoken` installed? scripts/test installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn counts_match_openais_reference_encoder() {
    let chat = serde_json::json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "name": "bob", "content": "Größenwahn 日本語 hello world"},
        {"role": "assistant", "content": "ok"},
    ]);
    let want = reference_counts(&chat);
    let body = serde_json::json!({"model": "m", "messages": chat}).to_string();
    let mut got = Vec::new();
    for (e, _) in ENCODINGS {
        let c = Counter::Bpe(e);
        got.extend(TEXTS.iter().map(|t| c.count_text(t).to_string()));
        got.push(c.count_body(body.as_bytes()).expect("counts").to_string());
    }
    assert_eq!(got, want);
}

/// `llama-3-8b` counted with cl100k_base, in an 8k window.
fn catalog_config() -> Config {
    let mut config = test_config();
    config.usage = toml::from_str(
        r#"
        [families.llama]
        encoding = "cl100k_base"
        prefixes = ["llama-3"]
        [models."llama-3-8b"]
        context_window = 8192
        max_output_tokens = 4096
        "#,
    )
    .expect("usage toml");
    config
}

/// A chat request whose user message is "hello world" `repeat` times over.
fn chat(
    id: &str,
    key: &str,
    repeat: usize,
    max_tokens: u64,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let body = serde_json::json!({
        "model": "llama-3-8b",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello world".repeat(repeat)}],
    })
    .to_string();
    let mut req = support::check_request(
        "POST",
        "/v1/chat/completions",
        &[("x-api-key", key), ("content-type", "application/json")],
        &body,
    );
    support::http_of(&mut req).id = id.to_string();
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_context_window_are_refused_before_the_model() {
    let tg = Tollgate::start(catalog_config()).await;
    let key = support::DEMO_PAID_KEY;
    // "hello world" × 2000: about 4000 tokens.
    let fits = ext_authz(&tg, chat("a", key, 2000, 4000)).await;
    assert_eq!((fits.status, fits.code.as_str()), (200, "allowed"));
    let over = ext_authz(&tg, chat("b", key, 2000, 4096 + 200)).await;
    // Over the model's max output is over the window too here.
    assert_eq!(
        (over.status, over.code.as_str()),
        (400, "context_window_exceeded")
    );
    let huge = ext_authz(&tg, chat("c", key, 5000, 1)).await;
    assert_eq!(
        (huge.status, huge.code.as_str()),
        (400, "context_window_exceeded")
    );
    // Without a catalog the same request is the policy's business only.
    let plain = Tollgate::start(test_config()).await;
    let v = ext_authz(&plain, chat("d", key, 5000, 1)).await;
    assert_eq!(v.status, 200, "{}", v.code);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_see_the_counted_input_tokens() {
    let tg = Tollgate::start(catalog_config()).await;
    // policies/action.cedar "free-tier-input-cap": free keys send at most
    // 4096 input tokens. "hello world" is 2 tokens (cl100k_base), the user
    // message adds "user" (1) and 3 + 3 of framing: 2n + 7.
    let free = support::DEMO_FREE_KEY;
    let at_cap = ext_authz(&tg, chat("a", free, 2044, 16)).await; // 4095
    assert_eq!(at_cap.status, 200, "{}", at_cap.code);
    let over = ext_authz(&tg, chat("b", free, 2045, 16)).await; // 4097
    assert_eq!((over.status, over.code.as_str()), (403, "policy_denied"));
    let paid = ext_authz(&tg, chat("c", support::DEMO_PAID_KEY, 2045, 16)).await;
    assert_eq!(paid.status, 200, "{}", paid.code);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_reserve_the_tokenizer_count() {
    // "hello world" once: 2 + 1 (role) + 6 framing = 9 input tokens, + 1
    // output = 10 reserved. The bytes/4 estimate would reserve 3 + 4 + 1 = 8,
    // and two requests (16) would fit under 19.
    let mut config = catalog_config();
    config.quota.rules = toml::from_str::<toml::Table>(
        r#"
        [[rules]]
        name = "key-tokens"
        per = ["key"]
        unit = "hour"
        cost = "tokens"
        limit = 19
        "#,
    )
    .expect("rules")
    .get("rules")
    .cloned()
    .expect("rules")
    .try_into()
    .expect("rules parse");
    let tg = Tollgate::start(config).await;
    let key = support::DEMO_PAID_KEY;
    let a = ext_authz(&tg, chat("a", key, 1, 1)).await;
    assert_eq!(a.status, 200, "{}", a.code);
    let b = ext_authz(&tg, chat("b", key, 1, 1)).await;
    assert_eq!((b.status, b.code.as_str()), (429, "over_budget"));
}

/// `tollgate usage get` shows each budget's used and remaining amount, in
/// tokens or dollars, per counter and window; `reset` empties them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_get_and_reset_show_the_budgets() {
    let redis = support::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = support::repo();
    let config_path = dir.path().join("c.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"[server]
grpc_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[policy]
dir = {:?}
watch = false
[identity]
api_keys_file = {:?}
[quota]
store = "redis"
redis_url = {:?}
limits_file = {:?}
[quota.prices."llama-3-8b"]
input = 1.0
output = 2.0
[[quota.rules]]
name = "key-tokens"
per = ["key"]
unit = "hour"
cost = "tokens"
limit = 1000
[[quota.rules]]
name = "tenant-usd"
per = ["tenant"]
unit = "calendar_month"
cost = "usd"
limit = 500
[[quota.rules]]
name = "key-inflight"
per = ["key"]
cost = "concurrent"
limit = 3
"#,
            repo.join("policies"),
            repo.join("examples/keys.toml"),
            redis.url(),
            repo.join("examples/limits.yaml"),
        ),
    )
    .expect("write");
    let config = Config::load(Some(&config_path)).expect("config");
    let mut tg = Tollgate::start(config).await;
    tg.wait_for_store().await;
    let v = ext_authz(&tg, chat("r1", support::DEMO_PAID_KEY, 10, 100)).await;
    assert_eq!(v.status, 200, "{}", v.code);
    assert_eq!(
        support::report_usage(&tg, "r1", 100, 50).await,
        tollgate::proto::report_usage_response::Result::Settled as i32
    );
    // What was charged, per rule and unit, with bounded model, tenant and
    // tier labels.
    let metrics = support::metrics_text(tg.admin).await;
    for sample in [
        r#"tollgate_usage_charged_total{rule="key-tokens",unit="tokens",model="llama-3-8b",tenant="acme",tier="paid"}"#,
        r#"tollgate_usage_charged_total{rule="tenant-usd",unit="usd_micros",model="llama-3-8b",tenant="acme",tier="paid"}"#,
    ] {
        let want = if sample.contains("usd") { 200.0 } else { 150.0 };
        assert_eq!(
            support::metric(&metrics, sample),
            Some(want),
            "{sample}\n{metrics}"
        );
    }
    let usage = |verb: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "--config",
                config_path.to_str().expect("utf8"),
                "usage",
                verb,
                "--principal",
                "ApiKey::\"demo-paid\"",
                "--tenant",
                "acme",
                "--tier",
                "paid",
                "--model",
                "llama-3-8b",
            ])
            .output()
            .expect("run tollgate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let shown = usage("get");
    // 150 tokens; 100 × $1/M + 50 × $2/M = $0.0002.
    assert!(
        shown.contains("key-tokens\tkey=demo-paid\ttokens\thour\t150\t1000\t850\t"),
        "{shown}"
    );
    assert!(
        shown.contains(
            "tenant-usd\ttenant=acme\tusd\tcalendar_month\t$0.000200\t$500.000000\t$499.999800\t"
        ),
        "{shown}"
    );
    assert!(
        shown.contains("key-inflight\tkey=demo-paid\tconcurrent\tin_flight\t0\t3\t3\t-"),
        "{shown}"
    );
    // A request admitted and not settled yet holds one slot.
    let v = ext_authz(&tg, chat("r2", support::DEMO_PAID_KEY, 10, 100)).await;
    assert_eq!(v.status, 200, "{}", v.code);
    let shown = usage("get");
    assert!(
        shown.contains("key-inflight\tkey=demo-paid\tconcurrent\tin_flight\t1\t3\t2\t-"),
        "{shown}"
    );
    let reset = usage("reset");
    assert!(
        !reset.contains("key-inflight"),
        "slots in use are not reset: {reset}"
    );
    assert!(
        reset.contains("reset key-tokens") && reset.contains("reset tenant-usd"),
        "{reset}"
    );
    let shown = usage("get");
    assert!(shown.contains("tokens\thour\t0\t1000\t1000\t"), "{shown}");
    assert!(shown.contains("calendar_month\t$0.000000\t"), "{shown}");
    tg.stop().await;
}
