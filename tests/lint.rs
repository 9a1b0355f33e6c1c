//! `tollgate lint envoy`: every Envoy configuration shipped in examples/
//! passes, and each setting Tollgate depends on is reported when broken.

mod support;

use std::path::Path;
use std::process::{Command, Output};

fn lint(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["lint", "envoy"])
        .arg(path)
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

/// Every Envoy configuration under examples/.
fn example_envoy_configs() -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![support::repo().join("examples")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && std::fs::read_to_string(&path).is_ok_and(|t| t.contains("static_resources"))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_example_envoy_config_passes() {
    let configs = example_envoy_configs();
    assert!(configs.len() >= 2, "{configs:?}");
    for path in configs {
        let out = lint(&path);
        assert!(out.status.success(), "{}: {}", path.display(), text(&out));
        assert!(text(&out).contains("0 errors"), "{}", text(&out));
    }
}

fn example(name: &str) -> String {
    std::fs::read_to_string(support::repo().join("examples/envoy").join(name)).expect("example")
}

fn replaced(base: &str, from: &str, to: &str) -> String {
    assert!(base.contains(from), "{from:?} not in the example");
    base.replace(from, to)
}

const BYPASS_ROUTE: &str = r#"              - match: { prefix: "/v1/" }
                route: { cluster: upstream }
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
"#;

const HEALTH_ROUTE: &str = r#"              - match: { path: "/healthz" }
                direct_response: { status: 200 }
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
"#;

const ROUTES: &str = "              routes:\n";

/// (file, bad config, what the report must say).
fn bad_configs() -> Vec<(&'static str, String, &'static str)> {
    let plain = example("envoy.yaml");
    let mtls = example("envoy-mtls.yaml");
    vec![
        (
            "fail-open",
            replaced(
                &plain,
                "failure_mode_allow: false",
                "failure_mode_allow: true",
            ),
            "failure_mode_allow: true lets every request through",
        ),
        (
            "rls-unstated",
            replaced(&plain, "failure_mode_deny: true", "domain_again_comment: x"),
            "does not state failure_mode_deny",
        ),
        (
            "rls-open",
            replaced(
                &plain,
                "failure_mode_deny: true",
                "failure_mode_deny: false",
            ),
            "warning",
        ),
        (
            "body-unbounded",
            replaced(
                &plain,
                "max_request_bytes: 65536",
                "pack_as_bytes_again: true",
            ),
            "without max_request_bytes",
        ),
        (
            "partial-unstated",
            replaced(
                &plain,
                "allow_partial_message: true",
                "pack_as_bytes_again: true",
            ),
            "does not state allow_partial_message",
        ),
        (
            "bypass-route",
            replaced(&plain, ROUTES, &format!("{ROUTES}{BYPASS_ROUTE}")),
            "only those may skip it",
        ),
        (
            "no-ext-authz",
            replaced(&plain, "ext_authz.v3.ExtAuthz\n", "ext_authz.v3.Nothing\n"),
            "no ext_authz filter",
        ),
        (
            "half-enabled",
            replaced(
                &plain,
                "failure_mode_allow: false",
                "failure_mode_allow: false\n              filter_enabled: { default_value: { numerator: 50 } }",
            ),
            "on only 50.0000% of requests",
        ),
        (
            "optional-client-cert",
            replaced(
                &mtls,
                "require_client_certificate: true",
                "require_client_certificate: false",
            ),
            "require_client_certificate: true",
        ),
        (
            "xfcc-forwarded",
            replaced(
                &mtls,
                "forward_client_cert_details: SANITIZE_SET",
                "forward_client_cert_details: APPEND_FORWARD",
            ),
            "SANITIZE_SET",
        ),
        (
            "any-ca",
            replaced(
                &mtls,
                "trusted_ca: { filename: /etc/envoy/tls/ca.crt }",
                "trusted_ca: { filename: /etc/envoy/tls/ca.crt }\n              trust_chain_verification: ACCEPT_UNTRUSTED",
            ),
            "ACCEPT_UNTRUSTED",
        ),
    ]
}

#[test]
fn each_broken_setting_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, yaml, want) in bad_configs() {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &yaml).expect("write");
        let out = lint(&path);
        let t = text(&out);
        assert!(t.contains(want), "{name}: {want:?} not in {t}");
        if want == "warning" {
            assert!(out.status.success(), "{name}: a warning alone passes: {t}");
        } else {
            assert_eq!(out.status.code(), Some(1), "{name}: {t}");
        }
    }
    // A body bound above what Tollgate parses is a warning.
    let huge = replaced(
        &example("envoy.yaml"),
        "max_request_bytes: 65536",
        "max_request_bytes: 8388608",
    );
    let path = dir.path().join("huge.yaml");
    std::fs::write(&path, huge).expect("write");
    let out = lint(&path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("warning") && text(&out).contains("context.max_body_bytes"),
        "{}",
        text(&out)
    );
    // A health route may skip ext_authz.
    let health = replaced(
        &example("envoy.yaml"),
        ROUTES,
        &format!("{ROUTES}{HEALTH_ROUTE}"),
    );
    let path = dir.path().join("health.yaml");
    std::fs::write(&path, health).expect("write");
    let out = lint(&path);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn every_problem_in_one_file_is_reported() {
    let mut yaml = example("envoy-mtls.yaml");
    for (from, to) in [
        ("failure_mode_allow: false", "failure_mode_allow: true"),
        ("failure_mode_deny: true", "timeout_again: 0.1s"),
        (
            "require_client_certificate: true",
            "require_client_certificate: false",
        ),
        (
            "forward_client_cert_details: SANITIZE_SET",
            "forward_client_cert_details: FORWARD_ONLY",
        ),
        (ROUTES, &format!("{ROUTES}{BYPASS_ROUTE}")),
    ] {
        yaml = replaced(&yaml, from, to);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("all.yaml");
    std::fs::write(&path, yaml).expect("write");
    let out = lint(&path);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    for want in [
        "failure_mode_allow: true",
        "does not state failure_mode_deny",
        "require_client_certificate: true",
        "SANITIZE_SET",
        "only those may skip it",
        "5 errors",
    ] {
        assert!(t.contains(want), "{want:?} not in {t}");
    }
}

#[test]
fn unreadable_or_unparsable_files_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "static_resources: [ {").expect("write");
    let out = lint(&path);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not YAML or JSON"), "{}", text(&out));
    let out = lint(&dir.path().join("missing.yaml"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn json_configs_are_linted_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, yaml, fails) in [
        ("good", example("envoy-mtls.yaml"), false),
        (
            "bad",
            replaced(
                &example("envoy-mtls.yaml"),
                "forward_client_cert_details: SANITIZE_SET",
                "forward_client_cert_details: FORWARD_ONLY",
            ),
            true,
        ),
    ] {
        let value: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml");
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&value).expect("json")).expect("write");
        let out = lint(&path);
        assert_eq!(
            out.status.code(),
            Some(i32::from(fails)),
            "{name}: {}",
            text(&out)
        );
    }
}
