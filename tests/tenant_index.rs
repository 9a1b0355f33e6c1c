//! The tenant index (issue 17): evaluating only the policies that can apply
//! gives the decision, reasons and errors the whole set gives; and a reload
//! re-validates only the files that changed, with every load guard kept.

use std::path::Path;

use cedar_policy::{Authorizer, Context, Entities, EntityUid, Request};
use proptest::prelude::*;
use tollgate::config::OnEvaluationError;
use tollgate::policy::evaluate::{evaluate, evaluate_in};
use tollgate::policy::{Expectations, PolicyStore, Reload, Snapshot};

const SCHEMA: &str = r#"
entity Tenant;
entity Key in [Tenant] = { tenant: Tenant, n: Long };
entity Svc = { trust: String };
entity Doc = { secret: Bool };
action read, write appliesTo { principal: [Key, Svc], resource: [Doc], context: { n: Long } };
"#;

const TENANTS: usize = 4;

/// Conditions, some of which error: `resource.secret` on a document missing
/// from the entities, the product overflowing for |n| ≥ 2.
const CONDITIONS: [&str; 5] = [
    "true",
    "context.n > 1",
    "resource.secret",
    "context.n * 4611686018427387904 > 0",
    "principal.n == context.n",
];

/// One generated policy: (shape, effect, tenant, action, condition).
type Spec = (u8, bool, usize, u8, usize);

fn policy_text(i: usize, (shape, forbid, tenant, action, cond): Spec) -> String {
    let effect = if forbid { "forbid" } else { "permit" };
    let action = match action {
        0 => "action == Action::\"read\"",
        1 => "action == Action::\"write\"",
        _ => "action",
    };
    let t = format!("principal.tenant == Tenant::\"t{tenant}\"");
    let c = CONDITIONS[cond];
    let body = match shape {
        // Placed by the index.
        0 => format!("when {{ {t} && {c} }}"),
        1 => format!("when {{ Tenant::\"t{tenant}\" == principal.tenant && {c} }}"),
        2 => format!("when {{ {t} }} unless {{ {c} }}"),
        3 => format!("when {{ ({t} && {c}) && context.n != 7 }}"),
        // Not placed: the comparison is not evaluated first, or not at all.
        4 => format!("when {{ {c} && {t} }}"),
        5 => format!("when {{ {c} }} when {{ {t} }}"),
        6 => format!("unless {{ {c} }} when {{ {t} }}"),
        7 => format!("when {{ {t} || {c} }}"),
        _ => format!("when {{ principal in Tenant::\"t{tenant}\" && {c} }}"),
    };
    format!("@id(\"p{i}\")\n{effect} (principal is Key, {action}, resource) {body};\n")
}

fn any_scope_policy(i: usize, forbid: bool, cond: usize) -> String {
    // Any principal type: a Svc request reaches it too; only conditions every
    // principal type can evaluate.
    let effect = if forbid { "forbid" } else { "permit" };
    let c = ["true", "context.n > 1", "resource.secret"][cond % 3];
    format!("@id(\"any{i}\")\n{effect} (principal, action, resource) when {{ {c} }};\n")
}

fn load(dir: &Path, files: &[(String, String)]) -> Snapshot {
    std::fs::write(dir.join("schema.cedarschema"), SCHEMA).expect("schema");
    std::fs::write(
        dir.join("entities.json"),
        serde_json::json!([
            {"uid": {"type": "Doc", "id": "d1"}, "attrs": {"secret": false}, "parents": []},
            {"uid": {"type": "Doc", "id": "d2"}, "attrs": {"secret": true}, "parents": []},
        ])
        .to_string(),
    )
    .expect("entities");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("policy file");
    }
    Snapshot::load(dir, &Expectations::default()).expect("generated policies load")
}

/// The entities a request carries: key `k` of tenant `t<k % TENANTS>` with
/// `n = k`, unless `missing` (then `principal.tenant` is an error).
fn request_entities(snapshot: &Snapshot, principal: &str, missing: bool) -> Entities {
    let mut entities: Vec<cedar_policy::Entity> = snapshot.entities.iter().cloned().collect();
    if let (false, Some(k)) = (missing, principal.strip_prefix("Key::")) {
        let k: i64 = k
            .trim_matches('"')
            .trim_start_matches('k')
            .parse()
            .unwrap_or(0);
        let tenant: EntityUid = format!("Tenant::\"t{}\"", k as usize % TENANTS)
            .parse()
            .expect("uid");
        entities.push(
            cedar_policy::Entity::new(
                principal.parse().expect("uid"),
                [
                    (
                        "tenant".to_string(),
                        cedar_policy::RestrictedExpression::new_entity_uid(tenant.clone()),
                    ),
                    (
                        "n".to_string(),
                        cedar_policy::RestrictedExpression::new_long(k),
                    ),
                ]
                .into_iter()
                .collect(),
                [tenant].into_iter().collect(),
            )
            .expect("entity"),
        );
    }
    if let Some(s) = principal.strip_prefix("Svc::") {
        let _ = s;
        entities.push(
            cedar_policy::Entity::new(
                principal.parse().expect("uid"),
                [(
                    "trust".to_string(),
                    cedar_policy::RestrictedExpression::new_string("x".into()),
                )]
                .into_iter()
                .collect(),
                Default::default(),
            )
            .expect("entity"),
        );
    }
    Entities::from_entities(entities, None).expect("entities")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn indexed_decisions_equal_unindexed_ones(
        specs in prop::collection::vec(
            (0u8..9, any::<bool>(), 0..TENANTS + 1, 0u8..3, 0..CONDITIONS.len()),
            1..24,
        ),
        any_scope in prop::collection::vec((any::<bool>(), 0usize..3), 0..3),
        one_file in any::<bool>(),
        requests in prop::collection::vec(
            (0u8..3, 0i64..8, any::<bool>(), 0u8..3, -3i64..6, any::<bool>()),
            1..12,
        ),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut files: Vec<(String, String)> = if one_file {
            let text: String = specs.iter().enumerate().map(|(i, s)| policy_text(i, *s)).collect();
            vec![("tenants.cedar".into(), text)]
        } else {
            specs
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("tenant-{i}.cedar"), policy_text(i, *s)))
                .collect()
        };
        files.push((
            "common.cedar".into(),
            any_scope.iter().enumerate().map(|(i, (f, c))| any_scope_policy(i, *f, *c)).collect(),
        ));
        let snapshot = load(dir.path(), &files);
        let placed_shapes = specs.iter().filter(|s| s.0 <= 3).count();
        prop_assert_eq!(snapshot.slices.placed(), placed_shapes);

        let authorizer = Authorizer::new();
        for (kind, k, missing, action, n, known_doc) in requests {
            let principal = match kind {
                0 | 1 => format!("Key::\"k{k}\""),
                _ => "Svc::\"s\"".to_string(),
            };
            let action = ["read", "write", "read"][action as usize];
            let resource = if known_doc { "Doc::\"d1\"" } else { "Doc::\"nowhere\"" };
            let entities = request_entities(&snapshot, &principal, missing);
            let context = Context::from_pairs([(
                "n".to_string(),
                cedar_policy::RestrictedExpression::new_long(n),
            )])
            .expect("context");
            let request = Request::new(
                principal.parse().expect("uid"),
                format!("Action::\"{action}\"").parse().expect("uid"),
                resource.parse().expect("uid"),
                context,
                None,
            )
            .expect("request");
            for on_error in [OnEvaluationError::Deny, OnEvaluationError::Ignore] {
                let indexed = evaluate(&authorizer, &snapshot, &request, &entities, on_error);
                let whole = evaluate_in(&authorizer, &snapshot.policies, &request, &entities, on_error);
                prop_assert_eq!(&indexed, &whole, "{} {} {} n={}", principal, action, resource, n);
            }
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

fn tenant_file(i: usize, method: &str) -> String {
    format!(
        "@id(\"t{i}\")\npermit (principal is Key, action == Action::\"read\", resource) when {{ principal.tenant == Tenant::\"t{i}\" && context.n == {method} }};\n"
    )
}

#[test]
fn a_reload_validates_only_the_changed_files_and_keeps_every_guard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(d, "schema.cedarschema", SCHEMA);
    for i in 0..20 {
        write(d, &format!("tenant-{i}.cedar"), &tenant_file(i, "1"));
    }
    let store = PolicyStore::load(d, Expectations::default()).expect("loads");
    assert_eq!(store.snapshot().validated_policies, 20);
    assert_eq!(store.snapshot().slices.placed(), 20);

    // One tenant's file changes: that file is validated, the rest reused.
    write(d, "tenant-3.cedar", &tenant_file(3, "2"));
    assert!(matches!(store.reload(), Reload::Swapped { .. }));
    let snapshot = store.snapshot();
    assert_eq!(snapshot.validated_policies, 1);
    assert_eq!(snapshot.policy_count(), 20);
    assert!(
        snapshot
            .policies
            .policies()
            .any(|p| p.id().to_string() == "t3" && p.to_string().contains("context.n == 2")),
        "the new text of t3 is live"
    );

    // A new file is validated on its own, and a bad one refused.
    write(
        d,
        "tenant-new.cedar",
        "@id(\"new\")\npermit (principal is Key, action, resource) when { principal.tenant == Tenant::\"t1\" && principal.nope };\n",
    );
    let Reload::Rejected(e) = store.reload() else {
        panic!("an invalid new file must be refused")
    };
    assert!(e.to_string().contains("tenant-new.cedar"), "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
    assert_eq!(
        store.snapshot().version,
        snapshot.version,
        "last good set kept"
    );

    // A duplicate id across a new and an unchanged file is still found.
    write(d, "tenant-new.cedar", &tenant_file(5, "3"));
    let Reload::Rejected(e) = store.reload() else {
        panic!("a duplicate id must be refused")
    };
    assert!(e.to_string().contains("duplicate policy id \"t5\""), "{e}");
    std::fs::remove_file(d.join("tenant-new.cedar")).expect("remove");

    // Nesting limits apply to a changed file.
    let deep = format!(
        "permit (principal, action, resource) when {{ {}true{} }};",
        "(".repeat(100),
        ")".repeat(100)
    );
    write(d, "tenant-7.cedar", &deep);
    let Reload::Rejected(e) = store.reload() else {
        panic!("nesting must be refused")
    };
    assert!(e.to_string().contains("nest deeper"), "{e}");

    // An emptied file (no manifest) is refused as a partial write.
    write(d, "tenant-7.cedar", "");
    let Reload::Rejected(e) = store.reload() else {
        panic!("an emptied file must be refused")
    };
    assert!(e.to_string().contains("now holds none"), "{e}");
    write(d, "tenant-7.cedar", &tenant_file(7, "1"));
    assert!(matches!(
        store.reload(),
        Reload::Unchanged | Reload::Swapped { .. }
    ));

    // A schema change re-validates every file: unchanged files that no
    // longer fit it are refused.
    write(
        d,
        "schema.cedarschema",
        &SCHEMA
            .replace("n: Long }", "m: Long }")
            .replace("context: { n: Long }", "context: { m: Long }"),
    );
    let Reload::Rejected(e) = store.reload() else {
        panic!("policies that no longer fit the schema must be refused")
    };
    assert!(e.to_string().contains("tenant-0.cedar"), "{e}");
    assert!(e.to_string().contains("tenant-19.cedar"), "{e}");
    write(d, "schema.cedarschema", SCHEMA);
    assert!(matches!(store.reload(), Reload::Unchanged));
}

#[test]
fn a_policy_of_another_tenant_is_not_evaluated_but_an_unplaced_one_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = vec![
        (
            "a.cedar".to_string(),
            "@id(\"t0-read\")\npermit (principal is Key, action == Action::\"read\", resource) when { principal.tenant == Tenant::\"t0\" };\n\
             @id(\"t1-errors\")\nforbid (principal is Key, action == Action::\"read\", resource) when { principal.tenant == Tenant::\"t1\" && resource.secret };\n\
             @id(\"late-check\")\nforbid (principal is Key, action == Action::\"read\", resource) when { resource.secret && principal.tenant == Tenant::\"t1\" };\n"
                .to_string(),
        ),
    ];
    let snapshot = load(dir.path(), &files);
    assert_eq!(snapshot.slices.placed(), 2);
    let authorizer = Authorizer::new();
    let ctx = || {
        Context::from_pairs([(
            "n".to_string(),
            cedar_policy::RestrictedExpression::new_long(0),
        )])
        .expect("context")
    };
    // k0 (tenant t0) reading a document missing from the entities: t1's
    // forbid would compare tenants first and stop; the unplaced forbid
    // errors, and the error denies.
    let entities = request_entities(&snapshot, "Key::\"k0\"", false);
    let request = Request::new(
        "Key::\"k0\"".parse().expect("uid"),
        "Action::\"read\"".parse().expect("uid"),
        "Doc::\"nowhere\"".parse().expect("uid"),
        ctx(),
        None,
    )
    .expect("request");
    let v = evaluate(
        &authorizer,
        &snapshot,
        &request,
        &entities,
        OnEvaluationError::Deny,
    );
    assert!(!v.allow);
    let ids: Vec<&str> = v.errors.iter().map(|e| e.policy_id.as_str()).collect();
    assert_eq!(ids, ["late-check"]);
    let v = evaluate(
        &authorizer,
        &snapshot,
        &request,
        &entities,
        OnEvaluationError::Ignore,
    );
    assert!(v.allow);
    assert_eq!(v.policies, ["t0-read"]);
}
