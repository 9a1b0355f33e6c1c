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

use super::guard::Syntax;
use super::manifest::{Loaded, Manifest};
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
    /// Policy file name (inside the directory) → how many policies it holds.
    pub file_policies: BTreeMap<String, usize>,
}

struct SourceFile {
    /// The path as given, for messages.
    name: String,
    /// The file name inside the directory, for the manifest.
    rel: String,
    text: String,
}

/// The files of a policy directory as read, and the version they hash to.
pub struct Sources {
    files: Vec<SourceFile>,
    version: String,
}

impl Sources {
    /// Reads `*.cedar`, `*.cedarschema` and `entities.json` from `dir`.
    /// Hidden entries (Kubernetes' `..data`) are skipped; symlinks are
    /// followed.
    pub fn read(dir: &Path) -> Result<Self, LoadError> {
        let files = read_dir(dir)?;
        let mut hasher = Sha256::new();
        for f in &files {
            hasher.update(f.name.as_bytes());
            hasher.update([0]);
            hasher.update(f.text.as_bytes());
            hasher.update([0]);
        }
        let version = hex::encode(&hasher.finalize()[..6]);
        Ok(Self { files, version })
    }

    /// Short content hash of every file; the version a snapshot built from
    /// these files carries.
    pub fn version(&self) -> &str {
        &self.version
    }
}

impl Snapshot {
    /// Loads `dir`: `*.cedar` policies, exactly one `*.cedarschema`, and an
    /// optional `entities.json`, checked against `manifest.json` when there
    /// is one. Runs on a thread with a large stack, after bounding how deep
    /// every file nests (see [`super::guard`]).
    pub fn load(dir: &Path, expect: &Expectations) -> Result<Self, LoadError> {
        let sources = Sources::read(dir)?;
        Self::build(dir, sources, expect)
    }

    /// Builds a snapshot from files already read (see [`Snapshot::load`]).
    pub fn build(dir: &Path, sources: Sources, expect: &Expectations) -> Result<Self, LoadError> {
        let (owned, expect) = (dir.to_path_buf(), expect.clone());
        super::guard::on_load_thread(move || Self::build_here(&owned, sources, &expect))
            .map_err(|message| single(&dir_name(dir), &message))?
    }

    fn build_here(dir: &Path, sources: Sources, expect: &Expectations) -> Result<Self, LoadError> {
        let Sources { files, version } = sources;
        let mut diags = Vec::new();
        for f in &files {
            let syntax = if f.name.ends_with(".cedarschema") {
                Syntax::Schema
            } else if f.name.ends_with(".cedar") {
                Syntax::Policy
            } else {
                Syntax::Json
            };
            if let Err(d) = super::guard::scan(&f.name, &f.text, syntax) {
                diags.push(d);
            }
        }
        if !diags.is_empty() {
            return Err(LoadError { diagnostics: diags });
        }

        let schemas: Vec<&SourceFile> = files
            .iter()
            .filter(|f| f.name.ends_with(".cedarschema"))
            .collect();
        let schema_file = match schemas.as_slice() {
            [one] => *one,
            [] => {
                return Err(single(
                    &dir_name(dir),
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
        if !diags.is_empty() {
            // Too deep or unparsable: validating would only repeat it.
            return Err(LoadError { diagnostics: diags });
        }
        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        for err in validation.validation_errors() {
            let id = err.policy_id().to_string();
            let (file, text) = texts
                .get(&id)
                .map_or(("?", ""), |(f, t)| (f.as_str(), t.as_str()));
            diags.push(diagnose(file, text, err));
        }

        let entities = match files.iter().find(|f| f.name.ends_with("entities.json")) {
            Some(f) => super::entities::load(&f.name, &f.text, &schema, &mut diags),
            None => Entities::empty().add_entities([], Some(&schema)).ok(),
        };
        check_expectations(expect, &schema, &schema_file.name, &mut diags);

        let file_policies: BTreeMap<String, usize> = files
            .iter()
            .filter(|f| f.name.ends_with(".cedar"))
            .map(|f| {
                let n = sources.values().filter(|src| **src == f.name).count();
                (f.rel.clone(), n)
            })
            .collect();
        match Manifest::read(dir) {
            Ok(Some(manifest)) => {
                let loaded: Vec<Loaded<'_>> = files
                    .iter()
                    .map(|f| Loaded {
                        name: &f.rel,
                        text: &f.text,
                        policies: file_policies.get(&f.rel).copied().unwrap_or(0),
                    })
                    .collect();
                diags.extend(manifest.check(dir, &loaded));
            }
            Ok(None) => {}
            Err(d) => diags.push(d),
        }

        match entities {
            Some(entities) if diags.is_empty() => Ok(Self {
                slices: super::slice::Slices::build(&policies, &schema),
                policies,
                schema,
                entities,
                version,
                loaded_at: SystemTime::now(),
                sources,
                file_policies,
            }),
            _ => Err(LoadError { diagnostics: diags }),
        }
    }

    /// Number of policies.
    pub fn policy_count(&self) -> usize {
        self.policies.policies().count()
    }

    /// The manifest describing the files this snapshot was built from, read
    /// again from `dir` (fails if they changed since).
    pub fn manifest(&self, dir: &Path) -> Result<Manifest, LoadError> {
        let sources = Sources::read(dir)?;
        if sources.version != self.version {
            return Err(single(
                &dir_name(dir),
                "the files changed while the manifest was being written; run it again",
            ));
        }
        let loaded: Vec<Loaded<'_>> = sources
            .files
            .iter()
            .map(|f| Loaded {
                name: &f.rel,
                text: &f.text,
                policies: self.file_policies.get(&f.rel).copied().unwrap_or(0),
            })
            .collect();
        Ok(Manifest::describe(&loaded))
    }
}

fn dir_name(dir: &Path) -> String {
    dir.display().to_string()
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
            let rel = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::fs::read_to_string(&p)
                .map(|text| SourceFile {
                    name: name.clone(),
                    rel,
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
            if let Err(message) = super::guard::check_expression_depth(policy) {
                let offset = super::guard::policy_starts(&file.text)
                    .get(n)
                    .copied()
                    .unwrap_or(0);
                let (line, col) = line_col(&file.text, offset);
                diags.push(Diagnostic {
                    file: file.name.clone(),
                    line,
                    col,
                    message: format!("policy {id:?}: {message}"),
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

pub(super) fn flatten(err: &dyn miette::Diagnostic) -> String {
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
