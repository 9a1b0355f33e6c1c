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
    /// The context paths the policies read (the decision cache's key).
    pub context_reads: super::reads::ContextReads,
    /// The schema file's text, for readers that need the declared attribute
    /// names and types (the AuthZEN adapter), which `Schema` does not expose.
    pub schema_text: String,
    /// Policy file name (inside the directory) → how many policies it holds.
    pub file_policies: BTreeMap<String, usize>,
    /// How many policies were parsed and validated to build this snapshot;
    /// the others were reused from the previous snapshot (unchanged files,
    /// same schema).
    pub validated_policies: usize,
    /// Per policy file (path as read): what it gave, for the next reload.
    parsed: HashMap<String, ParsedFile>,
    /// SHA-256 of the schema the policies were validated against.
    schema_digest: [u8; 32],
}

struct SourceFile {
    /// The path as given, for messages.
    name: String,
    /// The file name inside the directory, for the manifest.
    rel: String,
    text: String,
    /// SHA-256 of the text: an unchanged file is recognised by it.
    digest: [u8; 32],
}

/// What one policy file gave the snapshot that loaded it: a reload reuses
/// it, without parsing or validating again, while the file's text and the
/// schema are the same.
#[derive(Debug, Clone)]
pub struct ParsedFile {
    digest: [u8; 32],
    /// The file's policies in order, with the tenant the index files each
    /// under.
    policies: Vec<(PolicyId, Option<EntityUid>)>,
    /// What the file's policies read of the context.
    reads: super::reads::ContextReads,
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
        Self::build(dir, sources, expect, None)
    }

    /// Builds a snapshot from files already read (see [`Snapshot::load`]).
    ///
    /// With `previous` (the live snapshot, on a reload), a policy file whose
    /// text is what `previous` was built from, with the same schema, is not
    /// parsed, scanned or validated again: its policies are taken from
    /// `previous`. Everything that spans files (duplicate ids, entities, the
    /// manifest, expectations, the index) is checked on the whole set.
    pub fn build(
        dir: &Path,
        sources: Sources,
        expect: &Expectations,
        previous: Option<std::sync::Arc<Snapshot>>,
    ) -> Result<Self, LoadError> {
        let (owned, expect) = (dir.to_path_buf(), expect.clone());
        super::guard::on_load_thread(move || {
            Self::build_here(&owned, sources, &expect, previous.as_deref())
        })
        .map_err(|message| single(&dir_name(dir), &message))?
    }

    fn build_here(
        dir: &Path,
        sources: Sources,
        expect: &Expectations,
        previous: Option<&Snapshot>,
    ) -> Result<Self, LoadError> {
        let Sources { files, version } = sources;
        let mut diags = Vec::new();
        let schema_digest = {
            let mut schemas = files.iter().filter(|f| f.name.ends_with(".cedarschema"));
            match (schemas.next(), schemas.next()) {
                (Some(one), None) => one.digest,
                _ => [0; 32],
            }
        };
        // Policies validated against another schema are validated again.
        let previous =
            previous.filter(|p| p.schema_digest == schema_digest && schema_digest != [0; 32]);
        let reusable = |f: &SourceFile| -> Option<&ParsedFile> {
            previous?
                .parsed
                .get(&f.name)
                .filter(|parsed| parsed.digest == f.digest)
        };
        for f in files.iter().filter(|f| reusable(f).is_none()) {
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

        let parsed = parse_policies(&files, previous, &mut diags);
        if !diags.is_empty() {
            // Too deep or unparsable: validating would only repeat it.
            return Err(LoadError { diagnostics: diags });
        }
        let Parsed {
            set: policies,
            fresh,
            sources,
            file_of,
            files: parsed,
        } = parsed;
        // Cedar validates each policy on its own, so validating only the new
        // ones is the same as validating the set.
        let validation = Validator::new(schema.clone()).validate(&fresh, ValidationMode::Strict);
        for err in validation.validation_errors() {
            let id = err.policy_id().to_string();
            let (file, text) = file_of
                .get(&id)
                .and_then(|&i| files.get(i))
                .map_or(("?", ""), |f| (f.name.as_str(), f.text.as_str()));
            diags.push(diagnose(file, text, err));
        }

        let entities = match files.iter().find(|f| f.name.ends_with("entities.json")) {
            Some(f) => super::entities::load(&f.name, &f.text, &schema, &mut diags),
            None => Entities::empty().add_entities([], Some(&schema)).ok(),
        };
        check_expectations(expect, &schema, &schema_file.name, &mut diags);

        let mut per_file: HashMap<&str, usize> = HashMap::new();
        for file in sources.values() {
            *per_file.entry(file.as_str()).or_default() += 1;
        }
        let file_policies: BTreeMap<String, usize> = files
            .iter()
            .filter(|f| f.name.ends_with(".cedar"))
            .map(|f| {
                let n = per_file.get(f.name.as_str()).copied().unwrap_or(0);
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
                slices: super::slice::Slices::build(
                    parsed
                        .values()
                        .flat_map(|f| &f.policies)
                        .filter_map(|(id, tenant)| {
                            policies.policy(id).map(|p| (p, tenant.as_ref()))
                        }),
                    &schema,
                ),
                context_reads: parsed.values().fold(
                    super::reads::ContextReads::default(),
                    |mut all, file| {
                        all.extend(&file.reads);
                        all
                    },
                ),
                validated_policies: fresh.policies().count(),
                parsed,
                schema_digest,
                policies,
                schema,
                entities,
                version,
                loaded_at: SystemTime::now(),
                sources,
                schema_text: schema_file.text.clone(),
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
                    digest: Sha256::digest(text.as_bytes()).into(),
                    text,
                })
                .map_err(|e| single(&name, &format!("cannot read: {e}")))
        })
        .collect()
}

/// The policies of a directory, assembled from new and reused files.
struct Parsed {
    /// Every policy.
    set: PolicySet,
    /// The policies parsed now (not reused), which need validating.
    fresh: PolicySet,
    /// Policy id → file it came from.
    sources: BTreeMap<String, String>,
    /// Policy id → index of its file in the files read.
    file_of: HashMap<String, usize>,
    /// Per policy file: what it gave.
    files: HashMap<String, ParsedFile>,
}

fn parse_policies(
    files: &[SourceFile],
    previous: Option<&Snapshot>,
    diags: &mut Vec<Diagnostic>,
) -> Parsed {
    let mut out = Parsed {
        set: PolicySet::new(),
        fresh: PolicySet::new(),
        sources: BTreeMap::new(),
        file_of: HashMap::new(),
        files: HashMap::new(),
    };
    for (index, file) in files.iter().enumerate() {
        if !file.name.ends_with(".cedar") {
            continue;
        }
        let reused = previous.and_then(|p| {
            let parsed = p
                .parsed
                .get(&file.name)
                .filter(|e| e.digest == file.digest)?;
            let policies = parsed
                .policies
                .iter()
                .map(|(id, tenant)| Some((p.policies.policy(id)?.clone(), tenant.clone(), false)))
                .collect::<Option<Vec<_>>>()?;
            Some((policies, parsed.reads.clone()))
        });
        let (policies, reads) = match reused {
            Some(policies) => policies,
            None => match parse_file(file, diags) {
                Some(policies) => policies,
                None => continue,
            },
        };
        let mut kept = Vec::with_capacity(policies.len());
        for (n, (policy, tenant, fresh)) in policies.into_iter().enumerate() {
            let id = policy.id().to_string();
            if let Some(previous) = out.sources.get(&id) {
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
            let added = match fresh {
                true => out.fresh.add(policy.clone()),
                false => Ok(()),
            };
            let added = match added {
                Ok(()) => out.set.add(policy),
                Err(e) => Err(e),
            };
            if let Err(e) = added {
                let offset = super::guard::policy_starts(&file.text)
                    .get(n)
                    .copied()
                    .unwrap_or(0);
                let (line, col) = line_col(&file.text, offset);
                diags.push(Diagnostic {
                    file: file.name.clone(),
                    line,
                    col,
                    message: e.to_string(),
                });
                continue;
            }
            out.sources.insert(id.clone(), file.name.clone());
            out.file_of.insert(id.clone(), index);
            kept.push((PolicyId::new(&id), tenant));
        }
        out.files.insert(
            file.name.clone(),
            ParsedFile {
                digest: file.digest,
                policies: kept,
                reads,
            },
        );
    }
    out
}

/// Parses one policy file: each policy under its final id (`@id`, else
/// `<file stem>.<n>`), its depth checked, and the tenant the index files it
/// under; `true` marks it as new; and what the file's policies read of the
/// context. `None` when the file does not parse.
#[allow(clippy::type_complexity)]
fn parse_file(
    file: &SourceFile,
    diags: &mut Vec<Diagnostic>,
) -> Option<(
    Vec<(cedar_policy::Policy, Option<EntityUid>, bool)>,
    super::reads::ContextReads,
)> {
    let parsed = match PolicySet::from_str(&file.text) {
        Ok(p) => p,
        Err(errs) => {
            diags.extend(errs.iter().map(|e| diagnose(&file.name, &file.text, e)));
            return None;
        }
    };
    if parsed.templates().next().is_some() {
        diags.push(Diagnostic {
            file: file.name.clone(),
            line: 1,
            col: 1,
            message:
                "policy templates (?principal / ?resource) are not supported; write static policies"
                    .into(),
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
    let mut out = Vec::with_capacity(policies.len());
    let mut reads = super::reads::ContextReads::default();
    let mut starts = None;
    for (n, policy) in policies.into_iter().enumerate() {
        let id = policy
            .annotation("id")
            .map_or_else(|| format!("{stem}.{}", n + 1), str::to_string);
        let json = policy
            .to_json()
            .map_err(|e| format!("cannot inspect the policy: {e}"));
        let checked = json.and_then(|json| {
            super::guard::check_json_depth(&json)?;
            reads.extend(&super::reads::ContextReads::of_policy(&json));
            Ok(super::slice::tenant_of(&json))
        });
        match checked {
            Ok(tenant) => out.push((policy.new_id(PolicyId::new(&id)), tenant, true)),
            Err(message) => {
                let offset = starts
                    .get_or_insert_with(|| super::guard::policy_starts(&file.text))
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
            }
        }
    }
    Some((out, reads))
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
