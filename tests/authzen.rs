//! The OpenID AuthZEN Authorization API 1.0 certification scenario
//! (openid/authzen `certification/authorization-api-1_0-scenario.md`), one
//! test per test id, against the real `tollgate serve` with the fixture of
//! `examples/authzen/` over loopback; plus bad input.

mod support;

use std::net::SocketAddr;

use serde_json::{Value, json};
use support::{HttpResponse, ServeChild, raw_http};
use tokio::sync::OnceCell;

/// A running PDP with the example fixture.
struct Pdp {
    addr: SocketAddr,
    _child: ServeChild,
    _dir: tempfile::TempDir,
}

impl Pdp {
    /// Starts `tollgate serve` with `examples/authzen/tollgate.toml`, moved
    /// to free ports; `authzen_extra` lines replace its `reasons` line.
    async fn start(authzen_extra: &str) -> Self {
        let policies = support::repo().join("examples/authzen/policies");
        Self::start_with(authzen_extra, &policies).await
    }

    /// As [`Self::start`], serving the policy directory `policies`.
    async fn start_with(authzen_extra: &str, policies: &std::path::Path) -> Self {
        let repo = support::repo();
        let example = repo.join("examples/authzen");
        let port = support::free_port();
        let text = std::fs::read_to_string(example.join("tollgate.toml")).expect("example config");
        let text = text
            .replace("127.0.0.1:50051", "127.0.0.1:0")
            .replace("127.0.0.1:9090", "127.0.0.1:0")
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace(
                "dir = \"policies\"",
                &format!("dir = {policies:?}\nwatch = false"),
            )
            .replace(
                "\"../keys.toml\"",
                &format!("{:?}", repo.join("examples/keys.toml")),
            )
            .replace(
                "\"../limits.yaml\"",
                &format!("{:?}", repo.join("examples/limits.yaml")),
            )
            .replace(
                "reasons = \"on_request\"",
                if authzen_extra.is_empty() {
                    "reasons = \"on_request\""
                } else {
                    authzen_extra
                },
            );
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("tollgate.toml");
        std::fs::write(&config, text).expect("write config");
        let child = ServeChild::spawn(&config, &dir.path().join("tollgate.log"));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        assert!(
            support::wait_listening(addr).await,
            "authzen listener did not come up: {}",
            std::fs::read_to_string(dir.path().join("tollgate.log")).unwrap_or_default()
        );
        Self {
            addr,
            _child: child,
            _dir: dir,
        }
    }

    async fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        raw_http(self.addr, "POST", path, headers, body).await
    }

    async fn post(&self, path: &str, body: &Value) -> HttpResponse {
        self.post_raw(
            path,
            &[("content-type", "application/json")],
            &body.to_string(),
        )
        .await
    }

    /// POSTs and expects `200 application/json`; returns the body.
    async fn ok(&self, path: &str, body: Value) -> Value {
        let r = self.post(path, &body).await;
        assert_eq!(r.status, 200, "{path} {body}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.json()
    }

    async fn decision(&self, body: Value) -> bool {
        let v = self.ok(EVALUATION, body).await;
        v["decision"]
            .as_bool()
            .unwrap_or_else(|| panic!("decision is not a boolean: {v}"))
    }

    async fn batch(&self, body: Value) -> Vec<bool> {
        let v = self.ok(EVALUATIONS, body).await;
        v["evaluations"]
            .as_array()
            .unwrap_or_else(|| panic!("no evaluations array: {v}"))
            .iter()
            .map(|e| e["decision"].as_bool().expect("decision is a boolean"))
            .collect()
    }

    async fn status(&self, path: &str, body: Value) -> u16 {
        self.post(path, &body).await.status
    }

    /// Search result ids (or names for action search).
    async fn search(&self, path: &str, body: Value) -> Vec<String> {
        let v = self.ok(path, body).await;
        let results = v["results"]
            .as_array()
            .unwrap_or_else(|| panic!("results is not an array: {v}"));
        results
            .iter()
            .map(|r| {
                if path == SEARCH_ACTION {
                    r["name"].as_str().expect("name").to_string()
                } else {
                    r["id"].as_str().expect("id").to_string()
                }
            })
            .collect()
    }
}

const EVALUATION: &str = "/access/v1/evaluation";
const EVALUATIONS: &str = "/access/v1/evaluations";
const SEARCH_SUBJECT: &str = "/access/v1/search/subject";
const SEARCH_RESOURCE: &str = "/access/v1/search/resource";
const SEARCH_ACTION: &str = "/access/v1/search/action";

/// One fixture PDP shared by the tests of this file.
async fn pdp() -> &'static Pdp {
    static PDP: OnceCell<Pdp> = OnceCell::const_new();
    PDP.get_or_init(|| Pdp::start("")).await
}

fn alice() -> Value {
    json!({"type": "user", "id": "alice"})
}
fn bob() -> Value {
    json!({"type": "user", "id": "bob"})
}
fn record(id: &str) -> Value {
    json!({"type": "record", "id": id})
}
fn act(name: &str) -> Value {
    json!({"name": name})
}
fn req(subject: Value, action: Value, resource: Value) -> Value {
    json!({"subject": subject, "action": action, "resource": resource})
}

// ---- Basic Core ----

#[tokio::test]
async fn c_2_2_1_fixture_permit() {
    assert!(
        pdp()
            .await
            .decision(req(alice(), act("read"), record("record-1")))
            .await
    );
}

#[tokio::test]
async fn c_2_2_2_fixture_deny() {
    assert!(
        !pdp()
            .await
            .decision(req(bob(), act("write"), record("record-1")))
            .await
    );
}

#[tokio::test]
async fn c_2_2_3_optional_context() {
    let mut body = req(alice(), act("read"), record("record-1"));
    body["context"] = json!({"time": "2025-06-27T18:03-07:00", "ip": "192.168.1.1"});
    assert!(pdp().await.decision(body).await);
}

#[tokio::test]
async fn c_2_2_8_additional_properties() {
    let body = json!({
        "subject": {"type": "user", "id": "alice", "properties": {"department": "Sales", "role": "manager"}},
        "action": {"name": "read", "properties": {"method": "GET"}},
        "resource": {"type": "record", "id": "record-1", "properties": {"status": "active", "owner": "bob"}}
    });
    assert!(pdp().await.decision(body).await);
}

#[tokio::test]
async fn c_2_2_9_unknown_fields_ignored() {
    let mut body = req(alice(), act("read"), record("record-1"));
    body["foo"] = json!("bar");
    body["futureField"] = json!({"nested": true});
    body["subject"]["futureField"] = json!(1);
    assert!(pdp().await.decision(body).await);
}

#[tokio::test]
async fn c_2_3_response_format() {
    let pdp = pdp().await;
    let v = pdp
        .ok(EVALUATION, req(bob(), act("read"), record("record-1")))
        .await;
    assert_eq!(v["decision"], json!(true));
    // Context, when present, is an object; asked for, it names the
    // determining policies.
    let mut body = req(bob(), act("read"), record("record-1"));
    body["options"] = json!({"reasons": true});
    let v = pdp.ok(EVALUATION, body).await;
    assert!(v["context"].is_object(), "{v}");
    assert_eq!(v["context"]["determining_policies"], json!(["staff-read"]));
}

#[tokio::test]
async fn c_2_4_error_handling() {
    let pdp = pdp().await;
    let full = req(alice(), act("read"), record("record-1"));
    // 2.4.1 missing required members; 2.4.2 missing sub-members; 2.4.6 types.
    let cases: Vec<(&str, Value)> = vec![
        (
            "missing subject",
            json!({"action": act("read"), "resource": record("record-1")}),
        ),
        (
            "missing action",
            json!({"subject": alice(), "resource": record("record-1")}),
        ),
        (
            "missing resource",
            json!({"subject": alice(), "action": act("read")}),
        ),
        (
            "subject.type",
            req(json!({"id": "alice"}), act("read"), record("record-1")),
        ),
        (
            "subject.id",
            req(json!({"type": "user"}), act("read"), record("record-1")),
        ),
        ("action.name", req(alice(), json!({}), record("record-1"))),
        (
            "resource.type",
            req(alice(), act("read"), json!({"id": "record-1"})),
        ),
        (
            "resource.id",
            req(alice(), act("read"), json!({"type": "record"})),
        ),
        (
            "subject string",
            req(json!("alice"), act("read"), record("record-1")),
        ),
        (
            "name number",
            req(alice(), json!({"name": 123}), record("record-1")),
        ),
        ("body array", json!([full.clone()])),
    ];
    for (what, body) in cases {
        let r = pdp.post(EVALUATION, &body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        assert!(!r.body.is_empty(), "{what}: an error message string");
    }
    let text = full.to_string();
    // 2.4.3 content type.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let r = pdp.post_raw(EVALUATION, &headers, &text).await;
        assert_eq!(r.status, 400, "content-type {ct:?}");
    }
    let r = pdp
        .post_raw(
            EVALUATION,
            &[("content-type", "application/json; charset=utf-8")],
            &text,
        )
        .await;
    assert_eq!(r.status, 200, "parameters after the media type are fine");
    // 2.4.4 malformed JSON; 2.4.5 empty body.
    for body in ["{\"subject\": ", "not json", "", "   "] {
        let r = pdp
            .post_raw(EVALUATION, &[("content-type", "application/json")], body)
            .await;
        assert_eq!(r.status, 400, "{body:?}");
    }
}

#[tokio::test]
async fn c_2_5_request_id_header() {
    let pdp = pdp().await;
    let body = req(alice(), act("read"), record("record-1")).to_string();
    let id = "bfe9eb29-ab87-4ca3-be83-a1d5d8305716";
    let r = pdp
        .post_raw(
            EVALUATION,
            &[("content-type", "application/json"), ("X-Request-ID", id)],
            &body,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some(id));
    // Echoed on errors too, and on every endpoint.
    let r = pdp
        .post_raw(EVALUATIONS, &[("x-request-id", "e-1")], &body)
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-request-id"), Some("e-1"));
    // Absent: no failure.
    let r = pdp
        .post_raw(EVALUATION, &[("content-type", "application/json")], &body)
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn c_2_6_idempotency() {
    let pdp = pdp().await;
    for _ in 0..5 {
        assert!(
            pdp.decision(req(alice(), act("read"), record("record-1")))
                .await
        );
        assert!(
            !pdp.decision(req(bob(), act("write"), record("record-1")))
                .await
        );
    }
}

// ---- Basic Properties ----

#[tokio::test]
async fn c_2_2_4_deny_on_resource_properties() {
    let resource =
        json!({"type": "record", "id": "record-2", "properties": {"status": "archived"}});
    assert!(
        !pdp()
            .await
            .decision(req(alice(), act("write"), resource))
            .await
    );
    // The deny follows the property, not the id: record-1 said archived too.
    let resource =
        json!({"type": "record", "id": "record-1", "properties": {"status": "archived"}});
    assert!(
        !pdp()
            .await
            .decision(req(alice(), act("write"), resource))
            .await
    );
}

#[tokio::test]
async fn c_2_2_5_permit_on_subject_properties() {
    let subject = json!({"type": "user", "id": "bob", "properties": {"role": "admin"}});
    let resource =
        json!({"type": "record", "id": "record-2", "properties": {"status": "archived"}});
    assert!(
        pdp()
            .await
            .decision(req(subject, act("write"), resource.clone()))
            .await
    );
    // "A subject with role admin": not only bob.
    let subject = json!({"type": "user", "id": "carol", "properties": {"role": "admin"}});
    assert!(
        pdp()
            .await
            .decision(req(subject, act("write"), resource))
            .await
    );
}

#[tokio::test]
async fn c_2_2_6_permit_on_action_properties() {
    let action = json!({"name": "delete", "properties": {"soft": true}});
    assert!(
        pdp()
            .await
            .decision(req(alice(), action, record("record-1")))
            .await
    );
}

#[tokio::test]
async fn c_2_2_7_deny_on_action_properties() {
    let pdp = pdp().await;
    let action = json!({"name": "delete", "properties": {"soft": false}});
    assert!(!pdp.decision(req(alice(), action, record("record-1"))).await);
    // No properties, or a value the schema cannot type: deny, never allow.
    assert!(
        !pdp.decision(req(alice(), act("delete"), record("record-1")))
            .await
    );
    let action = json!({"name": "delete", "properties": {"soft": "yes"}});
    let v = pdp
        .ok(EVALUATION, req(alice(), action, record("record-1")))
        .await;
    assert_eq!(v["decision"], json!(false));
}

// ---- Batch Core ----

#[tokio::test]
async fn c_3_2_1_batch_with_evaluations_array() {
    let body = json!({"subject": alice(), "action": act("read"),
        "evaluations": [{"resource": record("record-1")}, {"resource": record("record-2")}]});
    let v = pdp().await.ok(EVALUATIONS, body).await;
    let items = v["evaluations"].as_array().expect("array");
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|i| i["decision"].is_boolean()));
    assert!(v.get("decision").is_none(), "top-level decision omitted");
}

#[tokio::test]
async fn c_3_2_2_batch_fixture_decisions() {
    let body = json!({"subject": bob(), "resource": record("record-1"),
        "evaluations": [{"action": act("read")}, {"action": act("write")}]});
    assert_eq!(pdp().await.batch(body).await, [true, false]);
}

#[tokio::test]
async fn c_3_2_5_batch_without_defaults() {
    let body = json!({"evaluations": [
        req(alice(), act("read"), record("record-1")),
        req(bob(), act("write"), record("record-1")),
    ]});
    assert_eq!(pdp().await.batch(body).await, [true, false]);
}

#[tokio::test]
async fn c_3_2_6_batch_context_inheritance() {
    let body = json!({"subject": alice(), "action": act("read"),
    "context": {"time": "2025-06-27T18:03-07:00"},
    "evaluations": [
        {"resource": record("record-1")},
        {"resource": record("record-2"), "context": {"time": "2025-06-27T19:00-07:00", "source": "batch-override"}}
    ]});
    assert_eq!(pdp().await.batch(body).await.len(), 2);
}

#[tokio::test]
async fn c_3_3_batch_length_and_order() {
    let items: Vec<Value> = (0..7)
        .map(|i| {
            if i % 2 == 0 {
                req(alice(), act("read"), record("record-1"))
            } else {
                req(bob(), act("write"), record("record-1"))
            }
        })
        .collect();
    let got = pdp().await.batch(json!({"evaluations": items})).await;
    assert_eq!(got, [true, false, true, false, true, false, true]);
}

#[tokio::test]
async fn c_3_4_batch_errors() {
    let pdp = pdp().await;
    // 3.4.1: a bad item is a deny with a context, the rest still decided.
    let body = json!({"subject": alice(), "action": act("read"),
        "options": {"evaluations_semantic": "execute_all"},
        "evaluations": [{"resource": record("record-1")}, {}, 7, {"resource": {"type": "record"}}]});
    let v = pdp.ok(EVALUATIONS, body).await;
    let items = v["evaluations"].as_array().expect("array");
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["decision"], json!(true));
    for item in &items[1..] {
        assert_eq!(item["decision"], json!(false), "{item}");
        assert!(item["context"].is_object(), "{item}");
    }
    // 3.4.2 / 3.4.3: no or empty evaluations → a single evaluation answer.
    for evaluations in [None, Some(json!([]))] {
        let mut body = req(alice(), act("read"), record("record-1"));
        if let Some(e) = evaluations {
            body["evaluations"] = e;
        }
        let v = pdp.ok(EVALUATIONS, body).await;
        assert_eq!(v, json!({"decision": true}));
    }
    // Top-level problems are whole-payload errors.
    for body in [
        json!({"subject": alice(), "action": act("read")}),
        json!({"evaluations": {}}),
        json!({"subject": "alice", "evaluations": [{"action": act("read"), "resource": record("record-1")}]}),
        json!({"options": {"evaluations_semantic": "first"}, "evaluations": [req(alice(), act("read"), record("record-1"))]}),
    ] {
        assert_eq!(pdp.status(EVALUATIONS, body.clone()).await, 400, "{body}");
    }
}

#[tokio::test]
async fn batch_short_circuit_semantics() {
    let pdp = pdp().await;
    let items = json!([
        req(alice(), act("read"), record("record-1")),
        req(bob(), act("write"), record("record-1")),
        req(alice(), act("read"), record("record-2")),
    ]);
    let with = |semantic: &str| json!({"options": {"evaluations_semantic": semantic}, "evaluations": items.clone()});
    assert_eq!(pdp.batch(with("execute_all")).await, [true, false, true]);
    assert_eq!(pdp.batch(with("deny_on_first_deny")).await, [true, false]);
    assert_eq!(pdp.batch(with("permit_on_first_permit")).await, [true]);
}

// ---- Batch Properties ----

#[tokio::test]
async fn c_3_2_3_batch_resource_properties() {
    let body = json!({"subject": alice(), "action": act("write"), "evaluations": [
        {"resource": {"type": "record", "id": "record-1", "properties": {"status": "active"}}},
        {"resource": {"type": "record", "id": "record-2", "properties": {"status": "archived"}}},
    ]});
    assert_eq!(pdp().await.batch(body).await, [true, false]);
}

#[tokio::test]
async fn c_3_2_4_batch_subject_properties() {
    let body = json!({"action": act("write"),
    "resource": {"type": "record", "id": "record-2", "properties": {"status": "archived"}},
    "evaluations": [
        {"subject": alice()},
        {"subject": {"type": "user", "id": "bob", "properties": {"role": "admin"}}},
    ]});
    assert_eq!(pdp().await.batch(body).await, [false, true]);
}

#[tokio::test]
async fn c_3_2_7_batch_default_inheritance() {
    let body = json!({"subject": alice(), "action": act("write"),
    "resource": {"type": "record", "id": "record-1", "properties": {"status": "active"}},
    "evaluations": [
        {},
        {"resource": {"type": "record", "id": "record-2", "properties": {"status": "archived"}}},
    ]});
    assert_eq!(pdp().await.batch(body).await, [true, false]);
}

// ---- Search Core ----

fn subject_search() -> Value {
    json!({"subject": {"type": "user"}, "action": act("read"), "resource": record("record-1")})
}

async fn assert_subject_results(body: Value) {
    let pdp = pdp().await;
    let v = pdp.ok(SEARCH_SUBJECT, body.clone()).await;
    for r in v["results"].as_array().expect("results") {
        assert_eq!(r["type"], json!("user"), "{v}");
        assert!(r["id"].is_string());
    }
    let ids = pdp.search(SEARCH_SUBJECT, body).await;
    assert!(
        ids.contains(&"alice".into()) && ids.contains(&"bob".into()),
        "{ids:?}"
    );
}

#[tokio::test]
async fn c_4_2_1_subject_search() {
    assert_subject_results(subject_search()).await;
}

#[tokio::test]
async fn c_4_2_2_subject_search_with_context() {
    let mut body = subject_search();
    body["context"] = json!({"time": "2025-06-27T18:03-07:00", "ip": "192.168.1.1"});
    assert_subject_results(body).await;
}

#[tokio::test]
async fn c_4_2_3_subject_search_ignores_subject_id() {
    let mut body = subject_search();
    body["subject"]["id"] = json!("alice");
    assert_subject_results(body).await;
}

fn resource_search() -> Value {
    json!({"subject": alice(), "action": act("read"), "resource": {"type": "record"}})
}

async fn assert_resource_results(body: Value) {
    let pdp = pdp().await;
    let v = pdp.ok(SEARCH_RESOURCE, body.clone()).await;
    for r in v["results"].as_array().expect("results") {
        assert_eq!(r["type"], json!("record"), "{v}");
    }
    let ids = pdp.search(SEARCH_RESOURCE, body).await;
    assert!(ids.contains(&"record-1".into()), "{ids:?}");
}

#[tokio::test]
async fn c_4_3_1_resource_search() {
    assert_resource_results(resource_search()).await;
}

#[tokio::test]
async fn c_4_3_2_resource_search_with_context() {
    let mut body = resource_search();
    body["context"] = json!({"time": "2025-06-27T18:03-07:00", "ip": "192.168.1.1"});
    assert_resource_results(body).await;
}

#[tokio::test]
async fn c_4_3_3_resource_search_ignores_resource_id() {
    let mut body = resource_search();
    body["resource"]["id"] = json!("record-1");
    let with_id = pdp().await.search(SEARCH_RESOURCE, body).await;
    let without = pdp().await.search(SEARCH_RESOURCE, resource_search()).await;
    assert_eq!(with_id, without);
    assert!(with_id.contains(&"record-1".into()));
}

#[tokio::test]
async fn c_4_4_1_action_search() {
    let names = pdp()
        .await
        .search(
            SEARCH_ACTION,
            json!({"subject": alice(), "resource": record("record-1")}),
        )
        .await;
    assert!(
        names.contains(&"read".into()) && names.contains(&"write".into()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"delete".into()),
        "delete needs action properties"
    );
}

#[tokio::test]
async fn c_4_4_2_action_search_with_context() {
    let names = pdp()
        .await
        .search(
            SEARCH_ACTION,
            json!({"subject": alice(), "resource": record("record-1"),
            "context": {"time": "2025-06-27T18:03-07:00", "ip": "192.168.1.1"}}),
        )
        .await;
    assert!(
        names.contains(&"read".into()) && names.contains(&"write".into()),
        "{names:?}"
    );
}

#[tokio::test]
async fn c_4_5_pagination() {
    let pdp = pdp().await;
    let mut body = subject_search();
    body["page"] = json!({"limit": 1});
    let first = pdp.ok(SEARCH_SUBJECT, body.clone()).await;
    assert_eq!(first["results"].as_array().map(Vec::len), Some(1));
    let token = first["page"]["next_token"]
        .as_str()
        .expect("next_token string")
        .to_string();
    assert!(!token.is_empty(), "two subjects, one per page: {first}");
    let mut all = vec![first["results"][0]["id"].clone()];
    body["page"]["token"] = json!(token);
    let second = pdp.ok(SEARCH_SUBJECT, body.clone()).await;
    assert!(second["page"].is_object());
    assert!(second["page"]["next_token"].is_string());
    all.extend(
        second["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["id"].clone()),
    );
    let mut token = second["page"]["next_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    while !token.is_empty() {
        body["page"]["token"] = json!(token);
        let next = pdp.ok(SEARCH_SUBJECT, body.clone()).await;
        all.extend(
            next["results"]
                .as_array()
                .expect("results")
                .iter()
                .map(|r| r["id"].clone()),
        );
        token = next["page"]["next_token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    }
    assert_eq!(all, [json!("alice"), json!("bob")]);
    // A token only works for the query it was issued for, and cannot be made up.
    let mut other = body.clone();
    other["action"] = act("write");
    other["page"]["token"] = json!(first["page"]["next_token"]);
    assert_eq!(pdp.status(SEARCH_SUBJECT, other).await, 400);
    let mut changed_limit = body.clone();
    changed_limit["page"] = json!({"limit": 2, "token": first["page"]["next_token"]});
    assert_eq!(pdp.status(SEARCH_SUBJECT, changed_limit).await, 400);
    for forged in [
        "abc",
        "e30.AAAA",
        "eyJxIjoiIiwiYyI6IiIsImUiOjk5OTk5OTk5OTk5fQ.AAAA",
    ] {
        let mut b = body.clone();
        b["page"]["token"] = json!(forged);
        assert_eq!(pdp.status(SEARCH_SUBJECT, b).await, 400, "{forged}");
    }
    // Without pagination parameters: everything, and an empty next_token.
    let v = pdp.ok(SEARCH_SUBJECT, subject_search()).await;
    assert_eq!(v["page"]["next_token"], json!(""));
}

#[tokio::test]
async fn c_4_6_empty_results() {
    let pdp = pdp().await;
    let unknown_id = [
        (
            SEARCH_ACTION,
            json!({"subject": {"type": "user", "id": "nonexistent-user"}, "resource": record("record-1")}),
        ),
        (
            SEARCH_SUBJECT,
            json!({"subject": {"type": "user"}, "action": act("read"), "resource": record("nonexistent")}),
        ),
        (
            SEARCH_RESOURCE,
            json!({"subject": {"type": "user", "id": "nonexistent-user"}, "action": act("read"), "resource": {"type": "record"}}),
        ),
    ];
    let unknown_type = [
        (
            SEARCH_SUBJECT,
            json!({"subject": {"type": "spaceship"}, "action": act("read"), "resource": record("record-1")}),
        ),
        (
            SEARCH_RESOURCE,
            json!({"subject": alice(), "action": act("read"), "resource": {"type": "spaceship"}}),
        ),
        (
            SEARCH_ACTION,
            json!({"subject": {"type": "spaceship", "id": "x"}, "resource": record("record-1")}),
        ),
    ];
    for (path, body) in unknown_id.into_iter().chain(unknown_type) {
        let v = pdp.ok(path, body.clone()).await;
        assert_eq!(v["results"], json!([]), "{path} {body}");
    }
}

#[tokio::test]
async fn c_4_7_search_errors() {
    let pdp = pdp().await;
    let cases = [
        (
            SEARCH_SUBJECT,
            json!({"subject": {"type": "user"}, "resource": record("record-1")}),
        ),
        (
            SEARCH_RESOURCE,
            json!({"action": act("read"), "resource": {"type": "record"}}),
        ),
        (SEARCH_ACTION, json!({"subject": alice()})),
        (
            SEARCH_SUBJECT,
            json!({"subject": {"type": "user"}, "action": act("read"), "resource": {"type": "record"}}),
        ),
        (
            SEARCH_RESOURCE,
            json!({"subject": {"type": "user"}, "action": act("read"), "resource": {"type": "record"}}),
        ),
        (
            SEARCH_ACTION,
            json!({"subject": {"type": "user"}, "resource": record("record-1")}),
        ),
        (
            SEARCH_SUBJECT,
            json!({"subject": {"id": "alice"}, "action": act("read"), "resource": record("record-1")}),
        ),
        (
            SEARCH_SUBJECT,
            json!({"subject": {"type": "user"}, "action": act("read"), "resource": record("record-1"), "page": {"limit": -1}}),
        ),
    ];
    for (path, body) in cases {
        assert_eq!(pdp.status(path, body.clone()).await, 400, "{path} {body}");
    }
}

// ---- Search Properties ----

#[tokio::test]
async fn c_4_2_4_subject_search_with_resource_properties() {
    let body = json!({"subject": {"type": "user"}, "action": act("write"),
        "resource": {"type": "record", "id": "record-2", "properties": {"status": "archived"}}});
    let ids = pdp().await.search(SEARCH_SUBJECT, body).await;
    assert!(ids.contains(&"bob".into()), "{ids:?}");
}

#[tokio::test]
async fn c_4_3_4_resource_search_with_subject_properties() {
    let body = json!({"subject": {"type": "user", "id": "bob", "properties": {"role": "admin"}},
        "action": act("write"), "resource": {"type": "record"}});
    let ids = pdp().await.search(SEARCH_RESOURCE, body).await;
    assert!(ids.contains(&"record-2".into()), "{ids:?}");
}

#[tokio::test]
async fn c_4_4_3_action_search_with_properties() {
    let body = json!({"subject": {"type": "user", "id": "bob", "properties": {"role": "admin"}},
        "resource": {"type": "record", "id": "record-2", "properties": {"status": "archived"}}});
    let names = pdp().await.search(SEARCH_ACTION, body).await;
    assert!(names.contains(&"write".into()), "{names:?}");
}

// ---- Transport and Discovery ----

#[tokio::test]
async fn c_5_transport() {
    let pdp = pdp().await;
    for (path, body) in [
        (EVALUATION, req(alice(), act("read"), record("record-1"))),
        (
            EVALUATIONS,
            json!({"evaluations": [req(alice(), act("read"), record("record-1"))]}),
        ),
        (SEARCH_SUBJECT, subject_search()),
        (SEARCH_RESOURCE, resource_search()),
        (
            SEARCH_ACTION,
            json!({"subject": alice(), "resource": record("record-1")}),
        ),
    ] {
        let r = pdp.post(path, &body).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
    }
    let r = raw_http(pdp.addr, "GET", EVALUATION, &[], "").await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn c_6_discovery() {
    let pdp = pdp().await;
    let r = raw_http(
        pdp.addr,
        "GET",
        "/.well-known/authzen-configuration",
        &[("x-request-id", "m")],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-request-id"), Some("m"));
    let base = "https://pdp.example.com";
    assert_eq!(
        r.json(),
        json!({
            "policy_decision_point": base,
            "access_evaluation_endpoint": format!("{base}/access/v1/evaluation"),
            "access_evaluations_endpoint": format!("{base}/access/v1/evaluations"),
            "search_subject_endpoint": format!("{base}/access/v1/search/subject"),
            "search_resource_endpoint": format!("{base}/access/v1/search/resource"),
            "search_action_endpoint": format!("{base}/access/v1/search/action"),
        })
    );
}

// ---- Mapping and bad input ----

#[tokio::test]
async fn requests_the_schema_cannot_type_deny_with_a_reason() {
    let pdp = pdp().await;
    for body in [
        req(
            json!({"type": "spaceship", "id": "x"}),
            act("read"),
            record("record-1"),
        ),
        req(alice(), act("fly"), record("record-1")),
        req(
            json!({"type": "user", "id": "bob", "properties": {"role": 5}}),
            act("write"),
            json!({"type": "record", "id": "record-2", "properties": {"status": "archived"}}),
        ),
        req(
            json!({"type": "not a type!", "id": "x"}),
            act("read"),
            record("record-1"),
        ),
    ] {
        let v = pdp.ok(EVALUATION, body.clone()).await;
        assert_eq!(v["decision"], json!(false), "{body}");
        assert!(v["context"]["error"]["message"].is_string(), "{v}");
    }
}

#[tokio::test]
async fn stored_attributes_are_overridden_only_by_name() {
    let pdp = pdp().await;
    // bob is stored as an admin; saying he is not demotes him for this request.
    let subject = json!({"type": "user", "id": "bob", "properties": {"role": "viewer"}});
    let resource = json!({"type": "record", "id": "record-2"});
    assert!(
        !pdp.decision(req(subject, act("write"), resource.clone()))
            .await
    );
    // Unrelated properties leave the stored role and team membership alone.
    let subject = json!({"type": "user", "id": "bob", "properties": {"department": "x"}});
    assert!(
        pdp.decision(req(subject.clone(), act("write"), resource))
            .await
    );
    assert!(
        pdp.decision(req(subject, act("read"), record("record-1")))
            .await
    );
}

#[tokio::test]
async fn hostile_bodies_get_defined_answers() {
    let pdp = pdp().await;
    // Deep nesting in properties: a 400 from the JSON reader, not a crash.
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let body = format!(
        r#"{{"subject":{{"type":"user","id":"alice","properties":{{"x":{deep}}}}},"action":{{"name":"read"}},"resource":{{"type":"record","id":"record-1"}}}}"#
    );
    let r = pdp
        .post_raw(EVALUATION, &[("content-type", "application/json")], &body)
        .await;
    assert_eq!(r.status, 400);
    // Nested within the limit but undeclared: dropped, decided normally.
    let nested = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let body = body.replace(&deep, &nested);
    let r = pdp
        .post_raw(EVALUATION, &[("content-type", "application/json")], &body)
        .await;
    assert_eq!((r.status, r.json()["decision"].clone()), (200, json!(true)));
    // 10,000 items: refused whole; 1,000: all answered.
    let item = json!({"resource": record("record-1")});
    let many = |n: usize| json!({"subject": alice(), "action": act("read"), "evaluations": vec![item.clone(); n]});
    let r = pdp.post(EVALUATIONS, &many(10_000)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(pdp.batch(many(1000)).await, vec![true; 1000]);
    // The server is still answering.
    assert!(
        pdp.decision(req(alice(), act("read"), record("record-1")))
            .await
    );
}

#[tokio::test]
async fn limits_are_configurable() {
    let pdp = Pdp::start("max_body_bytes = 4096\nmax_evaluations = 3").await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(8192));
    let r = pdp
        .post_raw(EVALUATION, &[("content-type", "application/json")], &big)
        .await;
    assert_eq!(r.status, 413);
    let item = req(alice(), act("read"), record("record-1"));
    assert_eq!(
        pdp.batch(json!({"evaluations": vec![item.clone(); 3]}))
            .await,
        [true; 3]
    );
    let r = pdp
        .post(EVALUATIONS, &json!({"evaluations": vec![item; 4]}))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("at most 3"), "{}", r.body);
}

#[tokio::test]
async fn reasons_follow_the_configured_mode() {
    let never = Pdp::start("reasons = \"never\"").await;
    let mut body = req(alice(), act("read"), record("record-1"));
    body["options"] = json!({"reasons": true});
    assert_eq!(
        never.ok(EVALUATION, body.clone()).await,
        json!({"decision": true})
    );
    let always = Pdp::start("reasons = \"always\"").await;
    let v = always
        .ok(EVALUATION, req(alice(), act("read"), record("record-1")))
        .await;
    assert_eq!(v["context"]["determining_policies"], json!(["staff-read"]));
}

/// The fixture plus `n` more active records.
fn fixture_with_records(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = support::repo().join("examples/authzen/policies");
    for f in ["schema.cedarschema", "fixture.cedar"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let text = std::fs::read_to_string(src.join("entities.json")).expect("entities");
    let mut entities: Vec<Value> = serde_json::from_str(&text).expect("json");
    entities.extend((0..n).map(|i| {
        json!({"uid": {"type": "Fixture::Record", "id": format!("r{i:05}")},
               "attrs": {"status": "active"}, "parents": []})
    }));
    std::fs::write(
        dir.path().join("entities.json"),
        Value::Array(entities).to_string(),
    )
    .expect("write");
    dir
}

/// A search over 10,000 entities pages through all of them, each page
/// bounded by `search_max_candidates` evaluations, every token accepted once
/// per page in order.
#[tokio::test]
async fn search_over_ten_thousand_entities_is_paged_and_bounded() {
    let policies = fixture_with_records(10_000);
    let pdp = Pdp::start_with("search_max_candidates = 2500", policies.path()).await;
    let mut body = json!({"subject": alice(), "action": act("read"), "resource": {"type": "record"},
        "page": {"limit": 1000}});
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let v = pdp.ok(SEARCH_RESOURCE, body.clone()).await;
        let results = v["results"].as_array().expect("results");
        assert!(results.len() <= 1000);
        assert_eq!(v["page"]["count"], json!(results.len()));
        seen.extend(
            results
                .iter()
                .map(|r| r["id"].as_str().expect("id").to_string()),
        );
        pages += 1;
        let token = v["page"]["next_token"].as_str().expect("next_token");
        if token.is_empty() {
            break;
        }
        body["page"]["token"] = json!(token);
        assert!(pages < 20, "pagination must end");
    }
    assert_eq!(seen.len(), 10_002, "every record once");
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), seen.len());
    assert_eq!(pages, 11);
    // Bob may not write active records: every candidate is examined, at most
    // 2,500 per request, so the empty answer arrives over several pages.
    let mut body =
        json!({"subject": bob(), "action": act("write"), "resource": {"type": "record"}});
    let mut pages = 0;
    let mut found = Vec::new();
    loop {
        let v = pdp.ok(SEARCH_RESOURCE, body.clone()).await;
        found.extend(v["results"].as_array().expect("results").iter().cloned());
        pages += 1;
        let token = v["page"]["next_token"].as_str().expect("next_token");
        if token.is_empty() {
            break;
        }
        body["page"] = json!({"token": token});
        assert!(pages < 20, "pagination must end");
    }
    assert_eq!(pages, 5, "10,002 candidates at 2,500 per request");
    assert_eq!(found, [json!({"type": "record", "id": "record-2"})]);
}

/// Item 4 of issue 19: the calling PEP authenticates with the identity layer
/// (here API keys); no or a bad credential is 401 with `WWW-Authenticate`, a
/// caller not on the list is 403, metadata stays public.
#[tokio::test]
async fn callers_authenticate_when_configured() {
    let pdp =
        Pdp::start("caller_sources = [\"api_key\"]\nallowed_callers = ['ApiKey::\"demo-paid\"']")
            .await;
    let body = req(alice(), act("read"), record("record-1")).to_string();
    let json = ("content-type", "application/json");
    let paid = "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen";
    let bearer = format!("Bearer {paid}");
    for headers in [
        vec![json, ("x-api-key", paid)],
        vec![json, ("authorization", bearer.as_str())],
    ] {
        let r = pdp.post_raw(EVALUATION, &headers, &body).await;
        assert_eq!((r.status, r.json()), (200, json!({"decision": true})));
    }
    let wrong = "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fXX";
    for headers in [
        vec![json],
        vec![json, ("x-api-key", wrong)],
        vec![json, ("authorization", "Bearer nope")],
    ] {
        let r = pdp
            .post_raw(SEARCH_SUBJECT, &headers, &subject_search().to_string())
            .await;
        assert_eq!(r.status, 401, "{headers:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer"))
        );
    }
    let free = "tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY";
    let r = pdp
        .post_raw(EVALUATIONS, &[json, ("x-api-key", free)], &body)
        .await;
    assert_eq!(r.status, 403);
    let r = raw_http(
        pdp.addr,
        "GET",
        "/.well-known/authzen-configuration",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
}

/// Item 4 of issue 19: per-caller quotas on the API itself, counted per
/// authenticated principal in the quota store: the fourth call in the window
/// is 429 with `Retry-After`, another caller is unaffected.
#[tokio::test]
async fn each_caller_has_its_own_quota() {
    let pdp = Pdp::start(
        "caller_sources = [\"api_key\"]\ncaller_requests_per_unit = 3\ncaller_quota_unit = \"hour\"",
    )
    .await;
    let body = req(alice(), act("read"), record("record-1")).to_string();
    let json = ("content-type", "application/json");
    let paid = (
        "x-api-key",
        "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
    );
    let free = (
        "x-api-key",
        "tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY",
    );
    for _ in 0..3 {
        assert_eq!(
            pdp.post_raw(EVALUATION, &[json, paid], &body).await.status,
            200
        );
    }
    let r = pdp.post_raw(EVALUATION, &[json, paid], &body).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((1..=3600).contains(&retry), "{retry}");
    assert_eq!(
        pdp.post_raw(EVALUATION, &[json, free], &body).await.status,
        200
    );
}

/// A bad `[authzen]` section stops `tollgate validate` and `serve` with the
/// key named.
#[test]
fn bad_authzen_settings_are_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (setting, key) in [
        (
            "policy_decision_point = \"ftp://x\"",
            "authzen.policy_decision_point",
        ),
        (
            "policy_decision_point = \"https://pdp.example.com/?a=1\"",
            "authzen.policy_decision_point",
        ),
        ("action_type = \"not a type\"", "authzen.action_type"),
        ("max_evaluations = 0", "authzen.max_evaluations"),
        ("caller_sources = [\"mtls\"]", "authzen.caller_sources"),
        (
            "allowed_callers = ['ApiKey::\"x\"']",
            "authzen.allowed_callers",
        ),
    ] {
        let config = dir.path().join("c.toml");
        std::fs::write(&config, format!("[authzen]\n{setting}\n")).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["--config", config.to_str().expect("utf8"), "validate"])
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{setting}");
        assert!(text.contains(key), "{setting}: {text}");
    }
}
