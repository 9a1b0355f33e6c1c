//! Policy tests as users write them: JSON files in `<policy dir>/tests/`,
//! each a list of requests with the expected decision and, optionally, the
//! exact set of policies expected to determine it.
//!
//! ```json
//! { "entities": [ ...Cedar entity JSON shared by the cases... ],
//!   "context":  { ...merged over Tollgate's base context for every case... },
//!   "cases": [
//!     { "name": "free keys may chat with small models",
//!       "principal": "ApiKey::\"free-key\"", "action": "Action::\"chat\"",
//!       "resource": "Model::\"llama-3-8b\"",
//!       "context": { "body": { "max_tokens": 256 } },
//!       "expect": "allow", "policies": ["free-tier-small-models"] } ] }
//! ```

use std::path::{Path, PathBuf};

use cedar_policy::Authorizer;
use serde::Deserialize;
use serde_json::Value;

use super::Snapshot;
use crate::config::OnEvaluationError;
use crate::engine::{CedarQuery, context, decide_query, parse_uid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    entities: Vec<Value>,
    #[serde(default)]
    context: Option<Value>,
    cases: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestCase {
    name: String,
    principal: String,
    action: String,
    resource: String,
    #[serde(default)]
    context: Option<Value>,
    #[serde(default)]
    entities: Vec<Value>,
    expect: Expect,
    #[serde(default)]
    policies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

impl Expect {
    fn word(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: String,
    pub name: String,
    /// `None` when the case passed; otherwise what went wrong.
    pub failure: Option<String>,
}

/// All results.
#[derive(Debug, Clone, Default)]
pub struct TestReport {
    pub results: Vec<CaseResult>,
}

impl TestReport {
    /// Number of passing cases.
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }

    /// Number of failing cases.
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }

    /// The human-readable report, ending in `N passed, M failed`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.results {
            match &r.failure {
                None => out.push_str(&format!("PASS {} :: {}\n", r.file, r.name)),
                Some(why) => {
                    out.push_str(&format!("FAIL {} :: {}\n     {}\n", r.file, r.name, why))
                }
            }
        }
        out.push_str(&format!(
            "\n{} passed, {} failed\n",
            self.passed(),
            self.failed()
        ));
        out
    }
}

/// Runs every `tests/*.json` under `dir` against `snapshot`.
pub fn run(
    dir: &Path,
    snapshot: &Snapshot,
    on_error: OnEvaluationError,
) -> Result<TestReport, String> {
    let tests_dir = dir.join("tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&tests_dir)
        .map_err(|e| format!("{}: cannot read test directory: {e}", tests_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no *.json test files", tests_dir.display()));
    }
    let authorizer = Authorizer::new();
    let mut report = TestReport::default();
    for path in files {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{name}: {e}"))?;
        let file: TestFile = serde_json::from_str(&text)
            .map_err(|e| format!("{name}:{}:{}: {e}", e.line(), e.column()))?;
        for case in &file.cases {
            let failure = run_case(&authorizer, snapshot, &file, case, on_error).err();
            report.results.push(CaseResult {
                file: name.clone(),
                name: case.name.clone(),
                failure,
            });
        }
    }
    Ok(report)
}

fn run_case(
    authorizer: &Authorizer,
    snapshot: &Snapshot,
    file: &TestFile,
    case: &TestCase,
    on_error: OnEvaluationError,
) -> Result<(), String> {
    // Actions in a namespace (an MCP server's, `Mcp::Action::"transfer"`)
    // have their own context (`{ input: … }`), not the HTTP request's.
    let namespaced = case
        .action
        .split_once("Action::")
        .is_some_and(|(ns, _)| !ns.is_empty());
    // So do the tool actions of chat routes (`{ kind, model? }`).
    let tool_action =
        [r#"Action::"offer_tool""#, r#"Action::"call_tool""#].contains(&case.action.as_str());
    let mut ctx = if namespaced || tool_action {
        Value::Object(serde_json::Map::new())
    } else {
        context::base()
    };
    if let Some(c) = &file.context {
        context::merge(&mut ctx, c);
    }
    if let Some(c) = &case.context {
        context::merge(&mut ctx, c);
    }
    let entities: Vec<Value> = file
        .entities
        .iter()
        .chain(&case.entities)
        .cloned()
        .collect();
    let query = CedarQuery {
        principal: parse_uid(&case.principal).map_err(|e| format!("principal: {e}"))?,
        action: parse_uid(&case.action).map_err(|e| format!("action: {e}"))?,
        resource: parse_uid(&case.resource).map_err(|e| format!("resource: {e}"))?,
        context: Some(ctx),
        entities: (!entities.is_empty()).then_some(Value::Array(entities)),
    };
    let verdict =
        decide_query(authorizer, snapshot, &query, on_error).map_err(|e| e.to_string())?;
    let got = if verdict.allow {
        Expect::Allow
    } else {
        Expect::Deny
    };
    let errors: Vec<String> = verdict
        .errors
        .iter()
        .map(|e| format!("{}: {}", e.policy_id, e.message))
        .collect();
    if got != case.expect {
        return Err(format!(
            "expected {}, got {} (determining policies: {:?}; errors: {:?})",
            case.expect.word(),
            got.word(),
            verdict.policies,
            errors
        ));
    }
    if let Some(want) = &case.policies {
        let mut want = want.clone();
        let mut have = verdict.policies.clone();
        want.sort();
        have.sort();
        if want != have {
            return Err(format!(
                "expected determining policies {want:?}, got {have:?}"
            ));
        }
    }
    Ok(())
}
