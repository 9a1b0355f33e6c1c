//! A Redis connection made in the background and then kept: until the first
//! connection succeeds, a task keeps trying, and callers fail fast instead of
//! waiting (so no request ever sets up a connection). Once made, redis-rs'
//! `ConnectionManager` and cluster connection reconnect by themselves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

/// A connection of type `C`, once there is one.
pub struct Lazy<C> {
    conn: Arc<ArcSwapOption<C>>,
    task: tokio::task::JoinHandle<()>,
}

impl<C> Drop for Lazy<C> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<C: Clone + Send + Sync + 'static> Lazy<C> {
    /// Calls `connect` until it succeeds, 250 ms apart. Must run inside a
    /// Tokio runtime.
    pub fn spawn<F, Fut>(what: &'static str, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<C, redis::RedisError>> + Send,
    {
        let conn: Arc<ArcSwapOption<C>> = Arc::new(ArcSwapOption::empty());
        let slot = conn.clone();
        let task = tokio::spawn(async move {
            loop {
                match connect().await {
                    Ok(c) => {
                        slot.store(Some(Arc::new(c)));
                        tracing::info!(what, "connected");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(what, error = %e, "not reachable yet; retrying");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        });
        Self { conn, task }
    }

    /// The connection, if made.
    pub fn get(&self) -> Option<C> {
        self.conn.load_full().map(|c| (*c).clone())
    }

    /// Whether the connection has been made.
    pub fn connected(&self) -> bool {
        self.conn.load().is_some()
    }
}

/// `ConnectionManager` settings: `timeout` (at least 200 ms) bounds
/// connecting and every response.
pub fn manager_config(timeout: Duration) -> redis::aio::ConnectionManagerConfig {
    let timeout = timeout.max(Duration::from_millis(200));
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
}

/// A standalone-Redis `ConnectionManager` for `url`, made in the background.
pub fn standalone(
    url: &str,
    timeout: Duration,
    what: &'static str,
) -> Result<Lazy<redis::aio::ConnectionManager>, String> {
    let client = redis::Client::open(url).map_err(|e| format!("redis url {url:?}: {e}"))?;
    let config = manager_config(timeout);
    Ok(Lazy::spawn(what, move || {
        redis::aio::ConnectionManager::new_with_config(client.clone(), config.clone())
    }))
}
