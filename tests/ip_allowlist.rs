//! IP allow-lists: a key record's `allowed_cidrs`, the example Cedar
//! policies on `context.http.source_ip` (a tenant's office network,
//! fine-tuning only from the operators' networks), and
//! `context.trusted_hops`, through ext_authz `Check` and a real Envoy.

mod support;

use support::{
    Envoy, Tollgate, check_request, ext_authz, raw_http, set_source, start_upstream, test_config,
};

const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"llama-3-8b","messages":[]}"#;
/// `examples/keys.toml`: tenant acme, usable from 198.51.100.0/24 and
/// 2001:db8::/32 only.
const OFFICE_KEY: &str = "tg_demo-office_phnnxcNxums2sf8YCVR3qBQIdFmKxW5Q2OdFof";
/// `examples/keys.toml`: tenant umbrella, which `policies/network.cedar`
/// binds to 198.51.100.0/24.
const UMBRELLA_KEY: &str = "tg_demo-umbrella_kYTZxLjMiI7UD5dCvqflZcr3uDBRv1fY1JdIls";
const ADMIN_KEY: &str = "tg_demo-admin_FAcFFpAJpY3Jny1toWZvGvb2HtbM43Ex2LoCQa";

async fn check(
    tg: &Tollgate,
    path: &str,
    key: &str,
    peer: Option<&str>,
    xff: Option<&str>,
) -> (u16, String) {
    let mut headers = vec![("content-type", "application/json"), ("x-api-key", key)];
    if let Some(x) = xff {
        headers.push(("x-forwarded-for", x));
    }
    let mut req = check_request("POST", path, &headers, BODY);
    set_source(&mut req, peer, "", "");
    let v = ext_authz(tg, req).await;
    (v.status, v.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_usable_only_from_its_cidrs() {
    let mut tg = Tollgate::start(test_config()).await;
    let allowed = (200, "allowed".to_string());
    let refused = (403, "source_not_allowed".to_string());
    for (peer, want) in [
        (Some("198.51.100.9"), &allowed),
        (Some("2001:db8::5"), &allowed),
        (Some("::ffff:198.51.100.9"), &allowed),
        (Some("198.51.101.9"), &refused),
        (Some("127.0.0.1"), &refused),
        (None, &refused),
    ] {
        assert_eq!(
            &check(&tg, CHAT, OFFICE_KEY, peer, None).await,
            want,
            "{peer:?}"
        );
    }
    // The header a client writes is not the client address.
    assert_eq!(
        check(
            &tg,
            CHAT,
            OFFICE_KEY,
            Some("127.0.0.1"),
            Some("198.51.100.9")
        )
        .await,
        refused
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_bind_a_tenant_and_admin_actions_to_networks() {
    let mut tg = Tollgate::start(test_config()).await;
    let denied = (403, "policy_denied".to_string());
    assert_eq!(
        check(&tg, CHAT, UMBRELLA_KEY, Some("198.51.100.20"), None).await,
        (200, "allowed".into())
    );
    assert_eq!(
        check(&tg, CHAT, UMBRELLA_KEY, Some("203.0.113.9"), None).await,
        denied
    );
    assert_eq!(check(&tg, CHAT, UMBRELLA_KEY, None, None).await, denied);
    let jobs = "/v1/fine_tuning/jobs";
    for (peer, want) in [
        (Some("10.20.30.40"), 200),
        (Some("127.0.0.1"), 200),
        (Some("203.0.113.9"), 403),
        (None, 403),
    ] {
        assert_eq!(
            check(&tg, jobs, ADMIN_KEY, peer, None).await.0,
            want,
            "{peer:?}"
        );
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_hops_name_the_forwarded_entry_that_counts() {
    let mut config = test_config();
    config.context.trusted_hops = 1;
    let mut tg = Tollgate::start(config).await;
    // The rightmost entry, written by the one trusted proxy, is the client;
    // the client's own entries to its left are not.
    assert_eq!(
        check(
            &tg,
            CHAT,
            OFFICE_KEY,
            Some("10.0.0.1"),
            Some("198.51.100.9, 203.0.113.1")
        )
        .await,
        (403, "source_not_allowed".into())
    );
    assert_eq!(
        check(
            &tg,
            CHAT,
            OFFICE_KEY,
            Some("10.0.0.1"),
            Some("203.0.113.1, 198.51.100.9")
        )
        .await,
        (200, "allowed".into())
    );
    // Without the header, the peer address; a trusted entry that is not an
    // address is a malformed request, never a guess.
    assert_eq!(
        check(&tg, CHAT, OFFICE_KEY, Some("198.51.100.3"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        check(&tg, CHAT, OFFICE_KEY, Some("10.0.0.1"), Some("junk"))
            .await
            .1,
        "malformed_request"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_the_address_envoy_reports_decides() {
    let mut tg = Tollgate::start(test_config()).await;
    let (upstream, _task) = start_upstream().await;
    let envoy = Envoy::start(tg.grpc.port(), upstream.port()).await;
    let send = |key: &'static str, xff: Option<&'static str>| async move {
        let mut headers = vec![("content-type", "application/json"), ("x-api-key", key)];
        if let Some(x) = xff {
            headers.push(("x-forwarded-for", x));
        }
        raw_http(envoy.listener, "POST", CHAT, &headers, BODY).await
    };
    // The client is 127.0.0.1: outside umbrella's office network, and an
    // X-Forwarded-For naming an office address changes nothing.
    for xff in [None, Some("198.51.100.20")] {
        let r = send(UMBRELLA_KEY, xff).await;
        assert_eq!(r.status, 403, "{xff:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "policy_denied");
        let r = send(OFFICE_KEY, xff).await;
        assert_eq!(r.status, 403, "{xff:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "source_not_allowed");
    }
    // Fine-tuning from loopback (an operators' network) passes the policy.
    let r = raw_http(
        envoy.listener,
        "POST",
        "/v1/fine_tuning/jobs",
        &[
            ("content-type", "application/json"),
            ("x-api-key", ADMIN_KEY),
        ],
        BODY,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    tg.stop().await;
}
