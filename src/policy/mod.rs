//! Cedar policies: loading a directory into a validated [`Snapshot`], keeping
//! the live one behind a cheap swappable handle, evaluating requests against
//! it, hot reload, and user-written policy tests.

pub mod entities;
pub mod evaluate;
pub mod guard;
pub mod manifest;
pub mod reads;
pub mod reload;
pub mod rollout;
pub mod shadow;
pub mod slice;
pub mod store;
pub mod testing;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use sha2::Digest;

pub use store::{Diagnostic, Expectations, LoadError, Snapshot, Sources};

/// How many distinct broken contents a store remembers between good loads.
pub const REMEMBERED_REJECTIONS: usize = 64;

/// The outcome of one reload attempt.
#[derive(Debug)]
pub enum Reload {
    /// The files hash to the version already live.
    Unchanged,
    /// A new snapshot is live.
    Swapped { version: String },
    /// The files are broken; the previous snapshot keeps serving.
    Rejected(LoadError),
    /// The files are the same broken content as the last rejected attempt:
    /// not a new failure, and the previous snapshot keeps serving.
    StillRejected,
}

/// What operators see about reloads (`/readyz`, `/policy`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub reloads: u64,
    pub failed_reloads: u64,
}

/// The live policy snapshot. Every request reads one consistent snapshot;
/// a reload builds a whole new one and swaps it in, or keeps the old.
pub struct PolicyStore {
    dir: PathBuf,
    expect: Expectations,
    current: ArcSwap<Snapshot>,
    status: Mutex<ReloadStatus>,
    /// Content versions rejected since the last good load (at most
    /// [`REMEMBERED_REJECTIONS`]), so that one bad save is one failure
    /// however many file events (or polls) follow it.
    /// Each entry is (content key, the error it gave).
    last_rejected: Mutex<std::collections::VecDeque<(String, String)>>,
}

impl PolicyStore {
    /// Loads `dir`; fails start-up on any problem.
    pub fn load(dir: &Path, expect: Expectations) -> Result<Self, LoadError> {
        let snapshot = Snapshot::load(dir, &expect)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            expect,
            current: ArcSwap::from_pointee(snapshot),
            status: Mutex::new(ReloadStatus::default()),
            last_rejected: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// The live snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The directory being served.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the directory and swaps in the result if it is valid.
    ///
    /// Besides everything [`Snapshot::load`] checks, a reload without a
    /// manifest is refused when a policy file that held policies is now
    /// present but holds none (a writer that truncated it and has not yet
    /// written it again); removing the file is how its policies are dropped.
    /// The same broken content is reported once, as [`Reload::StillRejected`]
    /// afterwards.
    pub fn reload(&self) -> Reload {
        let (result, key) = match Sources::read(&self.dir) {
            Ok(sources) => {
                if sources.version() == self.current.load().version {
                    self.clear_error();
                    return Reload::Unchanged;
                }
                // The manifest is part of what was tried: writing it after a
                // rejected edit is a new attempt.
                let manifest = std::fs::read(self.dir.join(manifest::MANIFEST_FILE))
                    .map(|bytes| hex::encode(&sha2::Sha256::digest(&bytes)[..6]))
                    .unwrap_or_default();
                let key = format!("{}/{manifest}", sources.version());
                if self.seen_rejected(&key) {
                    return Reload::StillRejected;
                }
                // Files unchanged since the live snapshot are not validated again.
                let live = self.current.load_full();
                let result = Snapshot::build(&self.dir, sources, &self.expect, Some(live))
                    .and_then(|fresh| self.refuse_emptied_files(fresh));
                (result, key)
            }
            Err(e) => {
                let key = format!("unreadable:{e}");
                (Err(e), key)
            }
        };
        match result {
            Ok(fresh) => {
                let version = fresh.version.clone();
                self.current.store(Arc::new(fresh));
                self.clear_error();
                let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
                status.reloads += 1;
                Reload::Swapped { version }
            }
            Err(_) if self.seen_rejected(&key) => Reload::StillRejected,
            Err(e) => {
                // A failure of this process, not of the files, is retried.
                let transient = e
                    .diagnostics
                    .iter()
                    .any(|d| d.message.starts_with(guard::NO_LOAD_THREAD));
                if !transient {
                    let mut seen = self.last_rejected.lock().unwrap_or_else(|p| p.into_inner());
                    if seen.len() == REMEMBERED_REJECTIONS {
                        seen.pop_front();
                    }
                    seen.push_back((key, e.to_string()));
                }
                let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
                status.failed_reloads += 1;
                status.last_error = Some(e.to_string());
                status.last_error_at = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
                Reload::Rejected(e)
            }
        }
    }

    /// Whether `key` was rejected since the last good load; if so its error
    /// is shown again as the last error (it is what the files say now).
    fn seen_rejected(&self, key: &str) -> bool {
        let message = self
            .last_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, m)| m.clone());
        let seen = message.is_some();
        if let Some(m) = message {
            self.status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .last_error = Some(m);
        }
        seen
    }

    fn clear_error(&self) {
        self.last_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = None;
    }

    /// Without a manifest, a file that held policies and now is present but
    /// holds none is taken for a partial write.
    fn refuse_emptied_files(&self, fresh: Snapshot) -> Result<Snapshot, LoadError> {
        if self.dir.join(manifest::MANIFEST_FILE).exists() {
            return Ok(fresh);
        }
        let current = self.current.load();
        let diagnostics: Vec<Diagnostic> = fresh
            .file_policies
            .iter()
            .filter(|&(_, &now)| now == 0)
            .filter_map(|(name, _)| {
                let before = current.file_policies.get(name).copied().unwrap_or(0);
                (before > 0).then(|| Diagnostic {
                    file: self.dir.join(name).display().to_string(),
                    line: 1,
                    col: 1,
                    message: format!(
                        "the file held {before} policies and now holds none; refused as a possibly partial write (delete the file to drop its policies, or use a manifest)"
                    ),
                })
            })
            .collect();
        if diagnostics.is_empty() {
            Ok(fresh)
        } else {
            Err(LoadError { diagnostics })
        }
    }

    /// Reload counters and the last error, if the newest files are broken.
    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
