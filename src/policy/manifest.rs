//! The policy manifest: `manifest.json` beside the policies, naming every
//! file the directory must hold, each file's SHA-256 and policy count, and
//! the total. A directory that does not match its manifest is refused, so a
//! half-written file (a writer that truncates, then writes) or a missing one
//! is never activated; the manifest is written last, by `tollgate manifest`.
//!
//! ```json
//! {"policies": 15, "files": {"action.cedar": {"sha256": "…", "policies": 6}, …}}
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store::Diagnostic;

/// File name of the manifest inside the policy directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a policy directory must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Total number of policies across all files.
    pub policies: usize,
    /// File name (relative to the directory) → what it must contain.
    pub files: BTreeMap<String, FileEntry>,
}

/// One expected file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// Policies in the file (0 for the schema and entities).
    pub policies: usize,
}

/// A file as loaded: its name relative to the directory, text and policy count.
pub struct Loaded<'a> {
    /// File name inside the policy directory.
    pub name: &'a str,
    /// The file's whole text.
    pub text: &'a str,
    /// Policies parsed from it (0 for the schema and entities).
    pub policies: usize,
}

/// SHA-256 of `text`, lowercase hex.
pub fn sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Manifest {
    /// The manifest describing `files` as they are.
    pub fn describe(files: &[Loaded<'_>]) -> Self {
        Self {
            policies: files.iter().map(|f| f.policies).sum(),
            files: files
                .iter()
                .map(|f| {
                    (
                        f.name.to_string(),
                        FileEntry {
                            sha256: sha256(f.text),
                            policies: f.policies,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Reads `dir/manifest.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>, Diagnostic> {
        let path = dir.join(MANIFEST_FILE);
        let at = |line: usize, col: usize, message: String| Diagnostic {
            file: path.display().to_string(),
            line,
            col,
            message,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(at(1, 1, format!("cannot read: {e}"))),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| at(e.line(), e.column(), format!("not a policy manifest: {e}")))
    }

    /// Every way `files` differ from this manifest, reported against the
    /// manifest file.
    pub fn check(&self, dir: &Path, files: &[Loaded<'_>]) -> Vec<Diagnostic> {
        let manifest = dir.join(MANIFEST_FILE).display().to_string();
        let problem = |message: String| Diagnostic {
            file: manifest.clone(),
            line: 1,
            col: 1,
            message,
        };
        let mut out = Vec::new();
        let actual = Self::describe(files);
        for (name, want) in &self.files {
            match actual.files.get(name) {
                None => out.push(problem(format!(
                    "{name} is listed but missing; restore it, or rewrite the manifest with `tollgate manifest`"
                ))),
                Some(got) if got.sha256 != want.sha256 => out.push(problem(format!(
                    "{name} does not match the manifest (sha256 {}…, manifest {}…, {} policies, manifest {}); a partial write? write the manifest after the policies with `tollgate manifest`",
                    short(&got.sha256),
                    short(&want.sha256),
                    got.policies,
                    want.policies
                ))),
                Some(_) => {}
            }
        }
        for name in actual.files.keys().filter(|n| !self.files.contains_key(*n)) {
            out.push(problem(format!(
                "{name} is not listed in the manifest; rewrite it with `tollgate manifest`"
            )));
        }
        if out.is_empty() && actual.policies != self.policies {
            out.push(problem(format!(
                "the directory holds {} policies, the manifest expects {}",
                actual.policies, self.policies
            )));
        }
        out
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_missing_or_extra_file_is_reported() {
        let files = [
            Loaded {
                name: "a.cedar",
                text: "x",
                policies: 1,
            },
            Loaded {
                name: "s.cedarschema",
                text: "y",
                policies: 0,
            },
        ];
        let manifest = Manifest::describe(&files);
        assert_eq!(manifest.policies, 1);
        assert!(manifest.check(Path::new("d"), &files).is_empty());
        let changed = [
            Loaded {
                name: "a.cedar",
                text: "",
                policies: 0,
            },
            Loaded {
                name: "t.cedar",
                text: "z",
                policies: 1,
            },
        ];
        let problems: Vec<String> = manifest
            .check(Path::new("d"), &changed)
            .iter()
            .map(|d| d.message.clone())
            .collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("a.cedar does not match"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("s.cedarschema is listed but missing"),
            "{problems:?}"
        );
        assert!(
            problems[2].starts_with("t.cedar is not listed"),
            "{problems:?}"
        );
    }
}
