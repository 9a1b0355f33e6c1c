//! Watching files for change and reloading, debounced.
//!
//! Directories are watched rather than files: editors save by writing a new
//! file and renaming it over the old one, and Kubernetes updates a mounted
//! ConfigMap by swapping the `..data` symlink, and both show up as events on
//! the directory, never on the old file. A periodic re-read backs the watcher
//! up on file systems that report nothing (network mounts).

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Keeps the watch alive; dropping it stops watching.
pub struct WatchHandle {
    _watcher: Option<notify::RecommendedWatcher>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls `on_change` (on a blocking thread) after changes under `dirs` have
/// been quiet for `debounce`, and every `poll` (zero disables polling).
pub fn watch<F>(
    dirs: Vec<PathBuf>,
    debounce: Duration,
    poll: Duration,
    on_change: F,
) -> Result<WatchHandle, notify::Error>
where
    F: Fn() + Send + Sync + 'static,
{
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full channel already means "reload pending".
            let _ = tx.try_send(());
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    let on_change = std::sync::Arc::new(on_change);
    let task = tokio::spawn(async move {
        let mut ticker = (!poll.is_zero()).then(|| {
            let mut t = tokio::time::interval(poll);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let tick = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // Debounce: wait until no event arrived for `debounce`.
                    while let Ok(Some(())) = tokio::time::timeout(debounce, rx.recv()).await {}
                }
                () = tick => {}
            }
            let f = on_change.clone();
            let _ = tokio::task::spawn_blocking(move || f()).await;
        }
    });
    Ok(WatchHandle {
        _watcher: Some(watcher),
        task,
    })
}
