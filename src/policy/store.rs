//! Loading a policy directory into one immutable, validated [`Snapshot`].
//!
//! Everything is checked here so that deciding cannot fail for a reason a
//! file could have told us: policies parse, validate strictly against the
//! schema, entities conform to it, every action the route table produces is
//! declared, and the context Tollgate builds fits each action's context type.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::{
    Context, Entities, EntityUid, PolicyId, PolicySet, Schema, ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

use crate::config::line_col;

/// One problem in one file, at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// A policy directory that cannot be loaded, with every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct LoadError {
    pub diagnostics: Vec<Diagnostic>,
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the rest of Tollgate will ask of a snapshot; checked at load.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// Action ids (of type `Action`) the route table can produce.
    pub actions: Vec<String>,
    /// Contexts Tollgate may build, each of which must fit every action's
    /// context type.
    pub contexts: Vec<serde_json::Value>,
    /// Principal entities Tollgate may build, each of which must conform to
    /// the schema.
    pub principals: Vec<cedar_policy::Entity>,
}

/// A loaded, validated policy set with its schema and entities.
#[derive(Debug)]
pub struct Snapshot {
    pub policies: PolicySet,
    pub schema: Schema,
    pub entities: Entities,
    /// Short content hash of every file that went in; equal on every replica
    /// serving the same files.
    pub version: String,
    pub loaded_at: SystemTime,
    /// Policy id → file it came from.
    pub sources: BTreeMap<String, String>,
    /// The policies per (principal type, action) whose scope can match.
    pub slices: super::slice::Slices,
    /// The schema file's text, for readers that need the declared attribute
    /// names and types (the AuthZEN adapter), which `Schema` does not expose.
    pub schema_text: String,
}

struct SourceFile {
    name: String,
    text: String,
}

impl Snapshot {
    /// Loads `dir`: `*.cedar` policies, exactly one `*.cedarschema`, and an
    /// optional `entities.json`. Hidden entries (Kubernetes' `..data`) are
    /// skipped; symlinks are followed.
    pub fn load(dir: &Path, expect: &Expectations) -> Result<Self, LoadError> {
        let files = read_dir(dir)?;
        let mut diags = Vec::new();
        let mut hasher = Sha256::new();
        for f in &files {
            hasher.update(f.name.as_bytes());
            hasher.update([0]);
            hasher.update(f.text.as_bytes());
            hasher.update([0]);
        }
        let version = hex::encode(&hasher.finalize()[..6]);

        let schemas: Vec<&SourceFile> = files
            .iter()
            .filter(|f| f.name.ends_with(".cedarschema"))
            .collect();
        let schema_file = match schemas.as_slice() {
            [one] => *one,
            [] => {
                return Err(single(
                    &dir.display().to_string(),
                    "no *.cedarschema file; policies are validated against a schema",
                ));
            }
            [_, second, ..] => {
                return Err(single(
                    &second.name,
                    "more than one *.cedarschema file; keep one schema per directory",
                ));
            }
        };
        let schema = match Schema::from_cedarschema_str(&schema_file.text) {
            Ok((schema, _warnings)) => schema,
            Err(e) => {
                return Err(LoadError {
                    diagnostics: vec![diagnose(&schema_file.name, &schema_file.text, &e)],
                });
            }
        };

        let (policies, sources, texts) = parse_policies(&files, &mut diags);
        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        for err in validation.validation_errors() {
            let id = err.policy_id().to_string();
            let (file, text) = texts
                .get(&id)
                .map_or(("?", ""), |(f, t)| (f.as_str(), t.as_str()));
            diags.push(diagnose(file, text, err));
        }

        let entities = match files.iter().find(|f| f.name.ends_with("entities.json")) {
            Some(f) => load_entities(f, &schema, &mut diags),
            None => Entities::empty().add_entities([], Some(&schema)).ok(),
        };
        check_expectations(expect, &schema, &schema_file.name, &mut diags);

        match entities {
            Some(entities) if diags.is_empty() => Ok(Self {
                slices: super::slice::Slices::build(&policies, &schema),
                policies,
                schema,
                entities,
                version,
                loaded_at: SystemTime::now(),
                sources,
                schema_text: schema_file.text.clone(),
            }),
            _ => Err(LoadError { diagnostics: diags }),
        }
    }

    /// Number of policies.
    pub fn policy_count(&self) -> usize {
        self.policies.policies().count()
    }
}

fn single(file: &str, message: &str) -> LoadError {
    LoadError {
        diagnostics: vec![Diagnostic {
            file: file.to_string(),
            line: 1,
            col: 1,
            message: message.to_string(),
        }],
    }
}

fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        single(
            &dir.display().to_string(),
            &format!("cannot read policy directory: {e}"),
        )
    })?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            !name.starts_with('.')
                && (name.ends_with(".cedar")
                    || name.ends_with(".cedarschema")
                    || name == "entities.json")
                && p.is_file()
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p.display().to_string();
            std::fs::read_to_string(&p)
                .map(|text| SourceFile {
                    name: name.clone(),
                    text,
                })
                .map_err(|e| single(&name, &format!("cannot read: {e}")))
        })
        .collect()
}

type PolicyTexts = HashMap<String, (String, String)>;

fn parse_policies(
    files: &[SourceFile],
    diags: &mut Vec<Diagnostic>,
) -> (PolicySet, BTreeMap<String, String>, PolicyTexts) {
    let mut set = PolicySet::new();
    let mut sources = BTreeMap::new();
    let mut texts = HashMap::new();
    for file in files.iter().filter(|f| f.name.ends_with(".cedar")) {
        let parsed = match PolicySet::from_str(&file.text) {
            Ok(p) => p,
            Err(errs) => {
                diags.extend(errs.iter().map(|e| diagnose(&file.name, &file.text, e)));
                continue;
            }
        };
        if parsed.templates().next().is_some() {
            diags.push(Diagnostic {
                file: file.name.clone(),
                line: 1,
                col: 1,
                message: "policy templates (?principal / ?resource) are not supported; write static policies".into(),
            });
        }
        let stem = Path::new(&file.name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("policy")
            .to_string();
        let mut policies: Vec<_> = parsed.policies().collect();
        // `from_str` names policies policy0, policy1, … in file order.
        policies.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(0)
        });
        for (n, policy) in policies.into_iter().enumerate() {
            let id = policy
                .annotation("id")
                .map_or_else(|| format!("{stem}.{}", n + 1), str::to_string);
            if let Some(previous) = sources.get(&id) {
                let offset = file.text.find(&format!("\"{id}\"")).unwrap_or(0);
                let (line, col) = line_col(&file.text, offset);
                diags.push(Diagnostic {
                    file: file.name.clone(),
                    line,
                    col,
                    message: format!("duplicate policy id {id:?} (also in {previous})"),
                });
                continue;
            }
            if let Err(e) = set.add(policy.new_id(PolicyId::new(&id))) {
                diags.push(Diagnostic {
                    file: file.name.clone(),
                    line: 1,
                    col: 1,
                    message: e.to_string(),
                });
                continue;
            }
            sources.insert(id.clone(), file.name.clone());
            texts.insert(id, (file.name.clone(), file.text.clone()));
        }
    }
    (set, sources, texts)
}

/// Turns a Cedar diagnostic into `file:line:col: message` using its first
/// labelled span, which points into the file's text.
fn diagnose(file: &str, text: &str, err: &dyn miette::Diagnostic) -> Diagnostic {
    let offset = err
        .labels()
        .and_then(|mut labels| labels.next())
        .map_or(0, |label| label.offset());
    let (line, col) = line_col(text, offset);
    let mut message = err.to_string();
    if let Some(help) = err.help() {
        message.push_str("; ");
        message.push_str(&help.to_string());
    }
    Diagnostic {
        file: file.to_string(),
        line,
        col,
        message: message.replace('\n', " "),
    }
}

fn load_entities(
    file: &SourceFile,
    schema: &Schema,
    diags: &mut Vec<Diagnostic>,
) -> Option<Entities> {
    let at = |offset: usize, message: String| {
        let (line, col) = line_col(&file.text, offset);
        Diagnostic {
            file: file.name.clone(),
            line,
            col,
            message,
        }
    };
    let value: serde_json::Value = match serde_json::from_str(&file.text) {
        Ok(v) => v,
        Err(e) => {
            diags.push(Diagnostic {
                file: file.name.clone(),
                line: e.line(),
                col: e.column(),
                message: e.to_string(),
            });
            return None;
        }
    };
    let Some(items) = value.as_array() else {
        diags.push(at(
            0,
            "entities file must be a JSON array of entities".into(),
        ));
        return None;
    };
    // Check each entity alone first, so a problem is reported where it is.
    let offsets = array_element_offsets(&file.text);
    let before = diags.len();
    for (i, item) in items.iter().enumerate() {
        if let Err(e) =
            Entities::from_json_value(serde_json::Value::Array(vec![item.clone()]), Some(schema))
        {
            let offset = offsets.get(i).copied().unwrap_or(0);
            diags.push(at(offset, format!("entity #{}: {}", i + 1, flatten(&e))));
        }
    }
    if diags.len() > before {
        return None;
    }
    match Entities::from_json_value(value, Some(schema)) {
        Ok(entities) => Some(entities),
        Err(e) => {
            diags.push(at(0, flatten(&e)));
            None
        }
    }
}

fn flatten(err: &dyn miette::Diagnostic) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    if let Some(help) = err.help() {
        message.push_str("; ");
        message.push_str(&help.to_string());
    }
    message.replace('\n', " ")
}

/// Byte offsets of the elements of a top-level JSON array.
fn array_element_offsets(text: &str) -> Vec<usize> {
    let mut offsets = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut expecting) = (0usize, false, false, false);
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if expecting && !c.is_whitespace() && c != ']' {
            offsets.push(i);
            expecting = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 && c == '[' {
                    expecting = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    offsets
}

fn check_expectations(
    expect: &Expectations,
    schema: &Schema,
    schema_name: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let declared: Vec<EntityUid> = schema.actions().cloned().collect();
    let at_schema = |message: String| Diagnostic {
        file: schema_name.to_string(),
        line: 1,
        col: 1,
        message,
    };
    let mut routed = Vec::new();
    for action in &expect.actions {
        let Ok(uid) = EntityUid::from_str(&format!("Action::{action:?}")) else {
            diags.push(at_schema(format!(
                "route action {action:?} is not a valid Cedar action id"
            )));
            continue;
        };
        if !declared.contains(&uid) {
            diags.push(at_schema(format!(
                "the route table produces action {action:?}, which the schema does not declare"
            )));
        } else if !routed.contains(&uid) {
            routed.push(uid);
        }
    }
    for principal in &expect.principals {
        if let Err(e) = Entities::from_entities([principal.clone()], Some(schema)) {
            diags.push(at_schema(format!(
                "the schema does not accept the principal entities Tollgate builds ({}): {}",
                principal.uid().type_name(),
                flatten(&e)
            )));
        }
    }
    for action in &routed {
        for context in &expect.contexts {
            if let Err(e) = Context::from_json_value(context.clone(), Some((schema, action))) {
                diags.push(at_schema(format!(
                    "the context type of {action} does not accept the context Tollgate builds: {}",
                    flatten(&e)
                )));
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_offsets_skip_strings_and_nesting() {
        let text = r#"[ {"a": "x,]"}, {"b": [1, 2]} ,3]"#;
        let offs = array_element_offsets(text);
        assert_eq!(offs.len(), 3);
        assert!(text[offs[0]..].starts_with("{\"a\""));
        assert!(text[offs[1]..].starts_with("{\"b\""));
        assert!(text[offs[2]..].starts_with('3'));
    }
}
