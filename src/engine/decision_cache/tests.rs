use super::*;
use crate::engine::context::{UsageFacts, build};
use crate::request::HttpRequest;
use serde_json::Value;

/// Every node of the JSON context (records and leaves), by path.
fn flatten(value: &Value, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, Node)>) {
    let node = match value {
        Value::Object(map) if map.contains_key("__extn") => Node::Ip(
            value["__extn"]["arg"]
                .as_str()
                .expect("ip argument")
                .to_string(),
        ),
        Value::Object(map) => {
            if !path.is_empty() {
                out.push((path.clone(), Node::Record));
            }
            for (k, v) in map {
                path.push(k.clone());
                flatten(v, path, out);
                path.pop();
            }
            return;
        }
        Value::Bool(b) => Node::Bool(*b),
        Value::Number(n) => Node::Long(n.as_i64().expect("long")),
        Value::String(s) => Node::Str(s.clone()),
        other => panic!("unexpected context value {other}"),
    };
    out.push((path.clone(), node));
}

/// For every combination of optional inputs, the projection with every node
/// wanted is exactly the context's nodes: the key can miss nothing the
/// context holds.
#[test]
fn the_projection_holds_every_node_of_the_context() {
    let config = ContextConfig {
        headers: vec!["x-team".into(), "x-region".into()],
        query_params: vec!["api-version".into()],
        ..ContextConfig::default()
    };
    let paths = shape(&config);
    let info = crate::usage::catalog::ModelInfo {
        family: Some("f".into()),
        context_window: Some(100),
        max_output_tokens: Some(5),
        default_output_tokens: None,
    };
    let usages = [
        None,
        Some(UsageFacts::default()),
        Some(UsageFacts {
            estimated_input_tokens: Some(7),
            max_output_tokens: Some(9),
            family: Some("f"),
            model: Some(&info),
        }),
    ];
    let bodies = crate::engine::context::bodies();
    for with_extras in [false, true] {
        let mut request = HttpRequest {
            method: "POST".into(),
            host: "API.example.com:443".into(),
            tls: with_extras,
            source_ip: with_extras.then(|| "10.1.2.3".parse().expect("ip")),
            ..Default::default()
        };
        if with_extras {
            request.headers.insert("x-team".into(), "search".into());
        }
        let raw = if with_extras {
            "/v1/chat?api-version=1&other=2"
        } else {
            "/v1/chat"
        };
        let path = crate::path::canonicalize(raw).expect("path");
        for body in &bodies {
            for usage in &usages {
                for (route_name, route_tenant) in [(None, None), (Some("chat"), Some("acme"))] {
                    let inputs = ContextInputs {
                        request: &request,
                        path: &path,
                        body,
                        route_name,
                        route_tenant,
                        authn: "api_key",
                        usage: usage.as_ref(),
                    };
                    let mut want = Vec::new();
                    flatten(&build(&config, &inputs), &mut Vec::new(), &mut want);
                    want.sort();
                    let mut got: Vec<(Vec<String>, Node)> =
                        project(&config, &inputs, &vec![true; paths.len()])
                            .into_iter()
                            .map(|(id, node)| {
                                let path = paths[usize::from(id)]
                                    .iter()
                                    .map(|s| s.to_string())
                                    .collect();
                                (path, node)
                            })
                            .collect();
                    got.sort();
                    assert_eq!(got, want);
                }
            }
        }
    }
}

#[test]
fn only_the_nodes_a_policy_reads_are_wanted() {
    let config = ContextConfig {
        headers: vec!["x-team".into()],
        ..ContextConfig::default()
    };
    let reads = ContextReads::Paths(
        [vec!["http".to_string(), "method".to_string()]]
            .into_iter()
            .collect(),
    );
    let wanted = wanted(&config, &reads);
    let named: Vec<Vec<&str>> = shape(&config)
        .into_iter()
        .zip(&wanted)
        .filter(|(_, w)| **w)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(named, vec![vec!["http"], vec!["http", "method"]]);
}
