//! The decision cache (`[policy] decision_cache`, issue 17 item 3), over
//! real gRPC on loopback: with the cache on, changing any input a policy
//! reads — a principal attribute, its tenant, the action, the resource,
//! each context attribute the policies read, entity data, the policies
//! themselves — changes the decision; inputs no policy reads are served
//! from the cache; and over generated request sequences a cached Tollgate
//! answers exactly as an uncached one.

mod support;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use support::{Tollgate, Verdict, check_request, eventually, ext_authz, http_of, test_config};
use tollgate::config::DecisionCacheConfig;

const PAID: &str = "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen";
const FREE: &str = "tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY";
const GLOBEX: &str = "tg_demo-globex_yBbjeNm0bA39bTc7QNb3XbD6xs4RtFQ62kcZfO";
const UMBRELLA: &str = "tg_demo-umbrella_kYTZxLjMiI7UD5dCvqflZcr3uDBRv1fY1JdIls";
const CHAT: &str = "/v1/chat/completions";
const EMBED: &str = "/v1/embeddings";

/// Policies reading context attributes the examples do not: a header, a
/// query parameter and the host.
const EXTRA: &str = r#"
@id("cache-blocked-team")
forbid (principal, action == Action::"chat", resource)
when { context.http.headers has "x-team" && context.http.headers["x-team"] == "blocked" };

@id("cache-old-api-version")
forbid (principal, action == Action::"chat", resource)
when { context.http.query has "api-version" && context.http.query["api-version"] == "0" };

@id("cache-blocked-host")
forbid (principal, action == Action::"chat", resource)
when { context.http.host == "blocked.example.com" };
"#;

const ON: DecisionCacheConfig = DecisionCacheConfig {
    max_entries: 10_000,
    ttl_secs: 600,
};

/// Policies (examples plus [`EXTRA`]) and keys in a directory the test may
/// edit; Tollgate watches both.
struct Setup {
    dir: tempfile::TempDir,
    tg: Tollgate,
}

impl Setup {
    async fn start(cache: Option<DecisionCacheConfig>) -> Self {
        let dir = support::copy_policies();
        std::fs::write(dir.path().join("cache.cedar"), EXTRA).expect("policy");
        let keys = dir.path().join("keys").join("keys.toml");
        std::fs::create_dir_all(keys.parent().expect("parent")).expect("mkdir");
        std::fs::copy(support::repo().join("examples/keys.toml"), &keys).expect("keys");
        let mut config = test_config();
        config.policy.dir = dir.path().to_path_buf();
        config.identity.api_keys_file = Some(keys);
        config.policy.watch = true;
        config.policy.reload_debounce_ms = 20;
        config.policy.reload_poll_secs = 1;
        config.policy.decision_cache = cache;
        let tg = Tollgate::start(config).await;
        Self { dir, tg }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    async fn hits(&self) -> f64 {
        let text = support::metrics_text(self.tg.admin).await;
        support::metric_prefix(&text, "tollgate_decision_cache_hits_total")
    }
}

/// One request: key, path, model, extra body fields, extra headers.
#[derive(Debug, Clone)]
struct Ask {
    key: String,
    path: &'static str,
    body: serde_json::Value,
    headers: Vec<(&'static str, String)>,
    host: Option<&'static str>,
    source_ip: Option<&'static str>,
}

fn ask(key: &str, path: &'static str, model: &str) -> Ask {
    Ask {
        key: key.to_string(),
        path,
        body: serde_json::json!({"model": model, "messages": []}),
        headers: Vec::new(),
        host: None,
        source_ip: None,
    }
}

impl Ask {
    fn body(mut self, field: &str, value: serde_json::Value) -> Self {
        self.body[field] = value;
        self
    }
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }
    fn path(mut self, path: &'static str) -> Self {
        self.path = path;
        self
    }
    fn host(mut self, host: &'static str) -> Self {
        self.host = Some(host);
        self
    }
    fn source_ip(mut self, ip: &'static str) -> Self {
        self.source_ip = Some(ip);
        self
    }

    async fn send(&self, tg: &Tollgate) -> (u16, String) {
        let v: Verdict = ext_authz(tg, self.request()).await;
        (v.status, v.code)
    }

    fn request(&self) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
        let mut headers: Vec<(&str, &str)> = vec![
            ("x-api-key", self.key.as_str()),
            ("content-type", "application/json"),
        ];
        headers.extend(self.headers.iter().map(|(k, v)| (*k, v.as_str())));
        let mut request = check_request("POST", self.path, &headers, &self.body.to_string());
        if let Some(host) = self.host {
            http_of(&mut request).host = host.into();
        }
        if let Some(ip) = self.source_ip {
            support::set_source(&mut request, Some(ip), "", "");
        }
        request
    }
}

fn allowed() -> (u16, String) {
    (200, "allowed".into())
}

/// Asks `before` twice (the second from the cache), then `after`: the two
/// decisions must differ as `want_after` says, and `before` stays as it was.
async fn changes(setup: &Setup, before: &Ask, after: &Ask, want_after: (u16, &str)) {
    let first = before.send(&setup.tg).await;
    assert_eq!(first, allowed(), "{before:?}");
    let hits = setup.hits().await;
    assert_eq!(before.send(&setup.tg).await, first);
    assert!(setup.hits().await > hits, "a repeated request is a hit");
    let got = after.send(&setup.tg).await;
    assert_eq!(
        (got.0, got.1.as_str()),
        want_after,
        "after changing one input: {after:?}"
    );
    assert_eq!(before.send(&setup.tg).await, first, "{before:?} again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_input_a_policy_reads_changes_the_cached_decision() {
    let mut setup = Setup::start(Some(ON)).await;
    let small = ask(PAID, CHAT, "llama-3-8b");
    let free_small = ask(FREE, CHAT, "llama-3-8b");
    let forbidden = (403, "policy_denied");
    // The action: tools are a chat-only restriction for the free tier.
    changes(
        &setup,
        &ask(FREE, EMBED, "text-embedding-small").body("tools", serde_json::json!([{}])),
        &ask(FREE, CHAT, "text-embedding-small").body("tools", serde_json::json!([{}])),
        forbidden,
    )
    .await;
    // The resource: the free tier is limited to small models.
    changes(
        &setup,
        &free_small,
        &ask(FREE, CHAT, "llama-3-70b"),
        forbidden,
    )
    .await;
    // The principal: another tenant's key on acme's private model.
    changes(
        &setup,
        &ask(PAID, CHAT, "acme-support-ft"),
        &ask(GLOBEX, CHAT, "acme-support-ft"),
        forbidden,
    )
    .await;
    // Each context attribute the policies read.
    let cases: Vec<(&str, Ask)> = vec![
        (
            "body.max_tokens",
            small.clone().body("max_tokens", 9000.into()),
        ),
        (
            "body.stream",
            free_small.clone().body("stream", true.into()),
        ),
        (
            "body.has_tools",
            free_small.clone().body("tools", serde_json::json!([{}])),
        ),
        (
            "http.headers.x-team",
            small.clone().header("x-team", "blocked"),
        ),
        (
            "http.query.api-version",
            small.clone().path("/v1/chat/completions?api-version=0"),
        ),
        ("http.host", small.clone().host("blocked.example.com")),
        (
            "body.complete",
            small.clone().header("x-envoy-auth-partial-body", "true"),
        ),
    ];
    for (what, after) in &cases {
        let before = if after.key == FREE {
            &free_small
        } else {
            &small
        };
        let got = after.send(&setup.tg).await;
        assert_ne!(got, allowed(), "{what}: {after:?}");
        assert_eq!(before.send(&setup.tg).await, allowed(), "{what}: before");
    }
    // The source address (umbrella's office network policy).
    let office = ask(UMBRELLA, CHAT, "llama-3-8b").source_ip("198.51.100.7");
    changes(
        &setup,
        &office,
        &office.clone().source_ip("203.0.113.9"),
        forbidden,
    )
    .await;

    // Inputs no policy reads are served from the cache: another content
    // type (in `context.http.headers`, read by no policy), another body
    // size, another request id.
    let hits = setup.hits().await;
    let utf8 = small
        .clone()
        .header("content-type", "application/json; charset=utf-8");
    assert_eq!(utf8.send(&setup.tg).await, allowed());
    assert_eq!(
        small
            .clone()
            .body("messages", serde_json::json!([{"role": "user"}]))
            .send(&setup.tg)
            .await,
        allowed()
    );
    assert!(
        setup.hits().await >= hits + 2.0,
        "unread inputs hit the cache"
    );
    // A value of a header a policy reads is part of the key.
    let misses = |text: &str| support::metric_prefix(text, "tollgate_decision_cache_misses_total");
    let before = misses(&support::metrics_text(setup.tg.admin).await);
    assert_eq!(
        small
            .clone()
            .header("x-team", "search")
            .send(&setup.tg)
            .await,
        allowed()
    );
    let after = misses(&support::metrics_text(setup.tg.admin).await);
    assert_eq!(after, before + 1.0, "x-team is read: a new value is a miss");
    setup.tg.stop().await;
}

/// Waits (bounded) until `ask` is answered `want`.
async fn becomes(setup: &Setup, ask: &Ask, want: (u16, &str)) -> bool {
    eventually(Duration::from_secs(10), || async {
        let got = ask.send(&setup.tg).await;
        (got.0, got.1.as_str()) == want
    })
    .await
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{from:?} in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

/// A cached allow, then one reloaded input changes: the decision follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_keys_entities_and_policies_change_the_cached_decision() {
    let mut setup = Setup::start(Some(ON)).await;
    let forbidden = (403, "policy_denied");
    let large = ask(PAID, CHAT, "llama-3-70b");
    let private = ask(PAID, CHAT, "acme-support-ft");
    for a in [&large, &private, &large, &private] {
        assert_eq!(a.send(&setup.tg).await, allowed());
    }
    assert!(setup.hits().await >= 2.0);

    // A principal attribute (the key's tier), same key id.
    let keys = setup.path("keys/keys.toml");
    let id = "id = \"demo-paid\"\nhash = \"sha256:08c1f3f7979539a5adf41b14fd9c60ca4718024d702613dfda11be467e5a2b4e\"\n";
    let record = |tenant: &str, tier: &str| format!("{id}tenant = \"{tenant}\"\ntier = \"{tier}\"");
    edit(&keys, &record("acme", "paid"), &record("acme", "free"));
    assert!(becomes(&setup, &large, forbidden).await, "tier change");
    // The principal's tenant, same key id (acme's private model).
    assert_eq!(private.send(&setup.tg).await, allowed());
    edit(&keys, &record("acme", "free"), &record("globex", "paid"));
    assert!(becomes(&setup, &private, forbidden).await, "tenant change");
    edit(&keys, &record("globex", "paid"), &record("acme", "paid"));
    assert!(
        becomes(&setup, &private, allowed_ref()).await,
        "tenant back"
    );

    // Entity data: the key's tenant is suspended (a parent entity).
    assert_eq!(large.send(&setup.tg).await, allowed());
    edit(
        &setup.path("entities.json"),
        r#""id": "acme" }, "attrs": { "suspended": false"#,
        r#""id": "acme" }, "attrs": { "suspended": true"#,
    );
    assert!(
        becomes(&setup, &large, forbidden).await,
        "entity data change"
    );
    edit(
        &setup.path("entities.json"),
        r#""id": "acme" }, "attrs": { "suspended": true"#,
        r#""id": "acme" }, "attrs": { "suspended": false"#,
    );
    assert!(
        becomes(&setup, &large, allowed_ref()).await,
        "entity data back"
    );

    // The policies: a new forbid.
    std::fs::write(
        setup.path("later.cedar"),
        "@id(\"later\")\nforbid (principal, action == Action::\"chat\", resource == Model::\"llama-3-70b\");\n",
    )
    .expect("policy");
    assert!(becomes(&setup, &large, forbidden).await, "policy reload");
    setup.tg.stop().await;
}

fn allowed_ref() -> (u16, &'static str) {
    (200, "allowed")
}

/// One Tollgate with the cache and one without, on the same files, shared by
/// every generated case.
struct Pair {
    runtime: tokio::runtime::Runtime,
    cached: Setup,
    plain: Setup,
}

fn pair() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (cached, plain) =
            runtime.block_on(async { (Setup::start(Some(ON)).await, Setup::start(None).await) });
        Pair {
            runtime,
            cached,
            plain,
        }
    })
}

fn any_ask() -> impl Strategy<Value = Ask> {
    let keys = prop::sample::select(vec![PAID, FREE, GLOBEX, UMBRELLA, "tg_demo-paid_wrong"]);
    let paths = prop::sample::select(vec![
        CHAT,
        EMBED,
        "/v1/chat/completions?api-version=0",
        "/v1/chat/completions?api-version=2",
        "/v1/completions",
    ]);
    let models = prop::sample::select(vec![
        "llama-3-8b",
        "llama-3-70b",
        "acme-support-ft",
        "globex-legal-ft",
        "text-embedding-small",
    ]);
    let teams = prop::option::of(prop::sample::select(vec!["blocked", "search"]));
    let hosts = prop::option::of(prop::sample::select(vec![
        "blocked.example.com",
        "LLM.example.com:443",
    ]));
    let ips = prop::option::of(prop::sample::select(vec!["198.51.100.7", "203.0.113.9"]));
    let max_tokens = prop::option::of(prop::sample::select(vec![0i64, 100, 600, 9000]));
    let flags = (any::<bool>(), any::<bool>(), any::<bool>());
    (keys, paths, models, teams, hosts, ips, max_tokens, flags).prop_map(
        |(key, path, model, team, host, ip, max_tokens, (stream, tools, partial))| {
            let mut a = ask(key, path, model);
            if let Some(t) = max_tokens {
                a = a.body("max_tokens", t.into());
            }
            if stream {
                a = a.body("stream", true.into());
            }
            if tools {
                a = a.body("tools", serde_json::json!([{}]));
            }
            if partial {
                a = a.header("x-envoy-auth-partial-body", "true");
            }
            if let Some(t) = team {
                a = a.header("x-team", t);
            }
            a.host = host;
            a.source_ip = ip;
            a
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Over generated request sequences (repeats included, so that the
    /// cache answers many of them), the cached Tollgate gives every answer
    /// the uncached one gives.
    #[test]
    fn cached_and_uncached_decisions_agree(
        sequence in prop::collection::vec(any_ask(), 1..12),
        repeats in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let pair = pair();
        let mut asks = sequence.clone();
        asks.extend(repeats.iter().map(|i| i.get(&sequence).clone()));
        for a in &asks {
            let (cached, plain) = pair.runtime.block_on(async {
                (a.send(&pair.cached.tg).await, a.send(&pair.plain.tg).await)
            });
            prop_assert_eq!(cached, plain, "{:?}", a);
        }
    }
}

/// A grant the example policies leave out: users may fine-tune shared
/// models, so the example `no-finetune-via-service` forbid is what tells a
/// user's direct request from the same user's token carried by a service.
const USERS_FINETUNE: &str = r#"
@id("cache-users-finetune")
permit (principal is User, action == Action::"finetune", resource is Model)
when { !resource.private && context.body.complete };
"#;

/// A user's fine-tuning request with bearer `token`, from loopback (the
/// example `admin-networks` policy), carried by service `via` (its mTLS
/// identity) or sent directly: (status, reason code).
async fn finetune(tg: &Tollgate, token: &str, via: Option<&str>) -> (u16, String) {
    let auth = format!("Bearer {token}");
    let mut request = check_request(
        "POST",
        "/v1/fine_tuning/jobs",
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        r#"{"model":"llama-3-8b","training_file":"file-1"}"#,
    );
    support::set_source(&mut request, Some("127.0.0.1"), via.unwrap_or(""), "");
    let v: Verdict = ext_authz(tg, request).await;
    (v.status, v.code)
}

/// A token carrier's request (`context.via`) and the same user's direct
/// request are decided apart with the cache on, whichever is asked first:
/// a verdict cached for one is never the other's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carried_token_and_the_direct_request_are_cached_apart() {
    use support::agents::RUNTIME;
    use support::jwt::{Idp, claims_with, issuer, keypair, mint};
    let dir = support::copy_policies();
    std::fs::write(dir.path().join("users-finetune.cedar"), USERS_FINETUNE).expect("policy");
    let (signer, jwk) = keypair(dir.path(), "ec", 256, "k1");
    let idp = Idp::start().await;
    idp.jwks(&[&jwk]);
    let mut config = test_config();
    config.policy.dir = dir.path().to_path_buf();
    config.policy.decision_cache = Some(ON);
    config.identity.jwt_issuers = vec![issuer(&idp.url("/jwks"), "")];
    config.identity.mtls_trust_domains = vec!["acme.example".into()];
    config.agents.token_carriers = Some(vec![RUNTIME.into()]);
    let mut tg = Tollgate::start(config).await;
    let direct = (200, "allowed".to_string());
    let carried = (403, "policy_denied".to_string());

    // Alice directly first, then carried; Bob carried first, then directly.
    // Each request is asked twice, so the second answer is the cache's.
    let alice = mint(&signer, &claims_with(serde_json::json!({"sub": "alice"})));
    let bob = mint(&signer, &claims_with(serde_json::json!({"sub": "bob"})));
    for (who, token, order) in [
        ("alice", &alice, [None, Some(RUNTIME)]),
        ("bob", &bob, [Some(RUNTIME), None]),
    ] {
        for via in order {
            let want = if via.is_some() { &carried } else { &direct };
            for round in 0..2 {
                let got = finetune(&tg, token, via).await;
                assert_eq!(&got, want, "{who} via {via:?}, round {round}");
            }
        }
    }
    let text = support::metrics_text(tg.admin).await;
    assert!(
        support::metric_prefix(&text, "tollgate_decision_cache_hits_total") >= 4.0,
        "repeated requests were served cached"
    );
    tg.stop().await;
}
