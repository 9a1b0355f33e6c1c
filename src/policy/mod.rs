//! Cedar policies: loading a directory into a validated [`Snapshot`], keeping
//! the live one behind a cheap swappable handle, evaluating requests against
//! it, hot reload, and user-written policy tests.

pub mod evaluate;
pub mod reload;
pub mod slice;
pub mod store;
pub mod testing;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

pub use store::{Diagnostic, Expectations, LoadError, Snapshot};

/// The outcome of one reload attempt.
#[derive(Debug)]
pub enum Reload {
    /// The files hash to the version already live.
    Unchanged,
    /// A new snapshot is live.
    Swapped { version: String },
    /// The files are broken; the previous snapshot keeps serving.
    Rejected(LoadError),
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
    pub fn reload(&self) -> Reload {
        let result = Snapshot::load(&self.dir, &self.expect);
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(fresh) if fresh.version == self.current.load().version => {
                status.last_error = None;
                Reload::Unchanged
            }
            Ok(fresh) => {
                let version = fresh.version.clone();
                self.current.store(Arc::new(fresh));
                status.reloads += 1;
                status.last_error = None;
                Reload::Swapped { version }
            }
            Err(e) => {
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

    /// Reload counters and the last error, if the newest files are broken.
    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
