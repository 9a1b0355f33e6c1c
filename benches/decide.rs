//! In-process costs: mapping an HTTP request to a Cedar request, Cedar
//! evaluation of the example policy set, and a whole ext_authz decision.
//!
//!     cargo bench --bench decide

use std::hint::black_box;
use std::path::PathBuf;

use cedar_policy::{Authorizer, Context, Entities, EntityUid, Request};
use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::config::{Config, OnEvaluationError};
use tollgate::engine::{body, context};
use tollgate::policy::evaluate::evaluate;
use tollgate::request::HttpRequest;
use tollgate::server::App;

// The same allocator as the `tollgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn config() -> Config {
    let mut config = Config::load(None).expect("defaults");
    config.base_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    config.policy.watch = false;
    config
}

fn chat_request() -> HttpRequest {
    let mut req = HttpRequest {
        request_id: "bench".into(),
        method: "POST".into(),
        raw_path: "/v1/chat/completions?api-version=2024-02-01".into(),
        host: "llm.example.com".into(),
        body: Some(
            br#"{"model":"llama-3-8b","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"hello"}]}"#
                .to_vec(),
        ),
        ..Default::default()
    };
    req.headers.insert(
        "x-api-key".into(),
        "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen".into(),
    );
    req.headers
        .insert("content-type".into(), "application/json".into());
    req.headers.insert("user-agent".into(), "bench".into());
    req
}

fn benches(c: &mut Criterion) {
    let config = config();
    let app = App::build(config.clone()).expect("app builds");
    let req = chat_request();

    c.bench_function("map_request (path, route, body, Cedar context)", |b| {
        let routes = config.route_table().expect("routes");
        b.iter(|| {
            let path = tollgate::path::canonicalize(black_box(&req.raw_path)).expect("path");
            let m = routes.find(&req.method, &path).expect("route");
            let facts = body::inspect(&req, 1 << 20).expect("body");
            let ctx = context::build_cedar(
                &config.context,
                &context::ContextInputs {
                    request: &req,
                    path: &path,
                    body: &facts,
                    route_name: Some(&m.route.name),
                    route_tenant: None,
                    authn: "api_key",
                    usage: None,
                },
            );
            black_box(ctx)
        })
    });

    let snapshot = app.engine.policies().snapshot();
    let principal: EntityUid = r#"ApiKey::"k""#.parse().expect("uid");
    let action: EntityUid = r#"Action::"chat""#.parse().expect("uid");
    let resource: EntityUid = r#"Model::"llama-3-8b""#.parse().expect("uid");
    let mut ctx = context::base();
    context::merge(
        &mut ctx,
        &serde_json::json!({"authn": "api_key", "http": {"method": "POST"}, "body": {"present": true, "max_tokens": 256}}),
    );
    let context =
        Context::from_json_value(ctx, Some((&snapshot.schema, &action))).expect("context");
    let request = Request::new(principal, action, resource, context, Some(&snapshot.schema))
        .expect("request");
    let key = serde_json::json!([{
        "uid": {"type": "ApiKey", "id": "k"},
        "attrs": {"tenant": {"__entity": {"type": "Tenant", "id": "acme"}}, "tier": "paid", "scopes": ["llm:generate"], "models": []},
        "parents": [{"type": "Tenant", "id": "acme"}]
    }]);
    let extra = Entities::from_json_value(key, Some(&snapshot.schema)).expect("entities");
    let entities = Entities::from_entities(
        snapshot.entities.iter().chain(extra.iter()).cloned(),
        Some(&snapshot.schema),
    )
    .expect("merged");
    let authorizer = Authorizer::new();
    c.bench_function("cedar_evaluate (example set)", |b| {
        b.iter(|| {
            black_box(evaluate(
                &authorizer,
                &snapshot,
                &request,
                &entities,
                OnEvaluationError::Deny,
            ))
        })
    });

    c.bench_function("cedar_context_from_json (schema-directed)", |b| {
        let action: EntityUid = r#"Action::"chat""#.parse().expect("uid");
        let mut ctx = context::base();
        context::merge(
            &mut ctx,
            &serde_json::json!({"authn": "api_key", "body": {"max_tokens": 256}}),
        );
        b.iter(|| {
            black_box(
                Context::from_json_value(ctx.clone(), Some((&snapshot.schema, &action)))
                    .expect("ctx"),
            )
        })
    });

    c.bench_function("cedar_context_from_json (no schema)", |b| {
        let mut ctx = context::base();
        context::merge(
            &mut ctx,
            &serde_json::json!({"authn": "api_key", "body": {"max_tokens": 256}}),
        );
        b.iter(|| black_box(Context::from_json_value(ctx.clone(), None).expect("ctx")))
    });

    c.bench_function("cedar_request_new (schema-validated)", |b| {
        let mut ctx = context::base();
        context::merge(
            &mut ctx,
            &serde_json::json!({"authn": "api_key", "body": {"max_tokens": 256}}),
        );
        let ctx = Context::from_json_value(ctx, None).expect("ctx");
        let p: EntityUid = r#"ApiKey::"k""#.parse().expect("uid");
        let a: EntityUid = r#"Action::"chat""#.parse().expect("uid");
        let r: EntityUid = r#"Model::"llama-3-8b""#.parse().expect("uid");
        b.iter(|| {
            black_box(
                Request::new(
                    p.clone(),
                    a.clone(),
                    r.clone(),
                    ctx.clone(),
                    Some(&snapshot.schema),
                )
                .expect("req"),
            )
        })
    });

    c.bench_function("entities_add_principal", |b| {
        let key = serde_json::json!([{
            "uid": {"type": "ApiKey", "id": "k2"},
            "attrs": {"tenant": {"__entity": {"type": "Tenant", "id": "acme"}}, "tier": "paid", "scopes": ["llm:generate"], "models": []},
            "parents": [{"type": "Tenant", "id": "acme"}]
        }]);
        let extra = Entities::from_json_value(key, Some(&snapshot.schema)).expect("entities");
        let entity = extra.iter().next().expect("one").clone();
        b.iter(|| {
            black_box(
                snapshot
                    .entities
                    .clone()
                    .add_entities([entity.clone()], Some(&snapshot.schema))
                    .expect("add"),
            )
        })
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    c.bench_function("decide_http (identity + mapping + cedar)", |b| {
        b.iter(|| black_box(rt.block_on(app.engine.decide_http(black_box(&req)))))
    });
}

criterion_group!(decide, benches);
criterion_main!(decide);
