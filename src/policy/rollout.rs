//! `tollgate policy promote` and `tollgate policy rollback`: moving policy
//! sets between the shadow, live and previous directories.
//!
//! Promote checks the shadow set loads (schema, validation, manifest) with
//! the running configuration's expectations, copies the live set to the
//! previous directory, then copies the shadow set over the live one. Rollback
//! swaps the live and previous sets, so a second rollback undoes the first.
//! The shadow directory is left as it is (after a promote it equals the live
//! set, so it stops disagreeing).
//!
//! Directories are updated in place, never renamed: the watcher of a running
//! Tollgate holds the live directory itself, and a rename would leave it
//! watching the old set. Each file is written beside its target and renamed
//! over it, and `manifest.json` goes last: with a manifest, a reload that
//! sees a half-copied directory is refused by the manifest check and the
//! next one, after the manifest, takes the whole new set. That is why a
//! promote into a live directory that uses a manifest requires one in the
//! shadow set too.

use std::path::{Path, PathBuf};

use super::manifest::MANIFEST_FILE;

/// The three directories a rollout moves sets between.
#[derive(Debug, Clone)]
pub struct RolloutDirs {
    /// `policy.dir`.
    pub live: PathBuf,
    /// `policy.shadow_dir`.
    pub shadow: Option<PathBuf>,
    /// `policy.previous_dir`, default `DIR.previous`.
    pub previous: PathBuf,
}

/// Why a promote or rollback did nothing (or, for [`RolloutError::Io`],
/// stopped part way: run it again).
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("policy.shadow_dir is not set; nothing to promote")]
    NoShadow,
    #[error("{0}: no previous policy set to roll back to (promote keeps one)")]
    NoPrevious(PathBuf),
    #[error("{dir}: the policy set does not load, nothing changed:\n{message}")]
    Invalid { dir: PathBuf, message: String },
    #[error(
        "{live} uses a manifest but {shadow} has none: run `tollgate manifest {shadow}` first, so the live directory never reloads half-copied"
    )]
    ManifestMissing { live: PathBuf, shadow: PathBuf },
    #[error("{path}: {source}; the directories may be partly copied, run the command again")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RolloutDirs {
    /// The default previous directory for `live`: `DIR.previous` beside it.
    pub fn default_previous(live: &Path) -> PathBuf {
        let mut name = live
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "policies".into());
        name.push(".previous");
        live.with_file_name(name)
    }
}

/// Makes the shadow set live, keeping the live one in `previous`. `check`
/// loads a directory as the server would and says why it cannot.
pub fn promote(
    dirs: &RolloutDirs,
    check: impl Fn(&Path) -> Result<(), String>,
) -> Result<(), RolloutError> {
    let shadow = dirs.shadow.as_ref().ok_or(RolloutError::NoShadow)?;
    check(shadow).map_err(|message| RolloutError::Invalid {
        dir: shadow.clone(),
        message,
    })?;
    if dirs.live.join(MANIFEST_FILE).exists() && !shadow.join(MANIFEST_FILE).exists() {
        return Err(RolloutError::ManifestMissing {
            live: dirs.live.clone(),
            shadow: shadow.clone(),
        });
    }
    mirror(&dirs.live, &dirs.previous)?;
    mirror(shadow, &dirs.live)
}

/// Swaps the live and previous sets.
pub fn rollback(
    dirs: &RolloutDirs,
    check: impl Fn(&Path) -> Result<(), String>,
) -> Result<(), RolloutError> {
    if !dirs.previous.is_dir() {
        return Err(RolloutError::NoPrevious(dirs.previous.clone()));
    }
    check(&dirs.previous).map_err(|message| RolloutError::Invalid {
        dir: dirs.previous.clone(),
        message,
    })?;
    // The live set waits beside it while the previous one is copied in.
    let mut name = std::ffi::OsString::from(".");
    name.push(dirs.live.file_name().unwrap_or_default());
    name.push(".rollback");
    let hold = dirs.live.with_file_name(name);
    mirror(&dirs.live, &hold)?;
    mirror(&dirs.previous, &dirs.live)?;
    mirror(&hold, &dirs.previous)?;
    std::fs::remove_dir_all(&hold).map_err(|e| io(&hold, e))
}

fn io(path: &Path, source: std::io::Error) -> RolloutError {
    RolloutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `to` hold exactly the files of `from` (recursively), replacing each
/// file by rename and writing `manifest.json` last.
fn mirror(from: &Path, to: &Path) -> Result<(), RolloutError> {
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    let mut manifest = None;
    let mut names = std::collections::HashSet::new();
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let name = entry.file_name();
        // Leftovers of an interrupted copy are not part of the set.
        if name.to_string_lossy().starts_with(".tollgate-") {
            continue;
        }
        let source = entry.path();
        names.insert(name.clone());
        if source.is_dir() {
            mirror(&source, &to.join(&name))?;
        } else if name == MANIFEST_FILE {
            manifest = Some(source);
        } else {
            copy_file(&source, &to.join(&name))?;
        }
    }
    for entry in std::fs::read_dir(to).map_err(|e| io(to, e))? {
        let entry = entry.map_err(|e| io(to, e))?;
        if names.contains(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| io(&path, e))?;
    }
    match manifest {
        Some(source) => copy_file(&source, &to.join(MANIFEST_FILE)),
        None => Ok(()),
    }
}

fn copy_file(from: &Path, to: &Path) -> Result<(), RolloutError> {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = to.with_file_name(format!(".tollgate-{name}.tmp"));
    std::fs::copy(from, &tmp).map_err(|e| io(from, e))?;
    std::fs::rename(&tmp, to).map_err(|e| io(to, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
    }

    fn read(dir: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                out.extend(
                    read(&path)
                        .into_iter()
                        .map(|(n, t)| (format!("{name}/{n}"), t)),
                );
            } else {
                out.push((name, std::fs::read_to_string(path).expect("read")));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn promote_then_rollback_twice() {
        let root = tempfile::tempdir().expect("tempdir");
        let dirs = RolloutDirs {
            live: root.path().join("policies"),
            shadow: Some(root.path().join("shadow")),
            previous: RolloutDirs::default_previous(&root.path().join("policies")),
        };
        assert!(dirs.previous.ends_with("policies.previous"));
        write(
            &dirs.live,
            &[
                ("a.cedar", "old a"),
                ("gone.cedar", "old"),
                ("tests/t.json", "old t"),
            ],
        );
        let shadow = dirs.shadow.clone().expect("shadow");
        write(&shadow, &[("a.cedar", "new a"), ("tests/t.json", "new t")]);
        let (old, new) = (read(&dirs.live), read(&shadow));

        assert!(matches!(
            rollback(&dirs, |_| Ok(())),
            Err(RolloutError::NoPrevious(_))
        ));
        let refused = promote(&dirs, |_| Err("bad".into()));
        assert!(matches!(refused, Err(RolloutError::Invalid { .. })));
        assert_eq!(read(&dirs.live), old, "a refused promote changes nothing");

        promote(&dirs, |_| Ok(())).expect("promote");
        assert_eq!(read(&dirs.live), new);
        assert_eq!(read(&dirs.previous), old);
        rollback(&dirs, |_| Ok(())).expect("rollback");
        assert_eq!(read(&dirs.live), old);
        assert_eq!(read(&dirs.previous), new);
        rollback(&dirs, |_| Ok(())).expect("rollback the rollback");
        assert_eq!(read(&dirs.live), new);
        assert_eq!(read(&shadow), new, "the shadow set is left as it is");
    }

    #[test]
    fn a_manifest_in_live_needs_one_in_shadow() {
        let root = tempfile::tempdir().expect("tempdir");
        let dirs = RolloutDirs {
            live: root.path().join("live"),
            shadow: Some(root.path().join("shadow")),
            previous: root.path().join("prev"),
        };
        write(&dirs.live, &[("a.cedar", "a"), (MANIFEST_FILE, "{}")]);
        write(dirs.shadow.as_ref().expect("shadow"), &[("a.cedar", "b")]);
        let refused = promote(&dirs, |_| Ok(()));
        assert!(matches!(refused, Err(RolloutError::ManifestMissing { .. })));
        assert!(!dirs.previous.exists());
    }
}
