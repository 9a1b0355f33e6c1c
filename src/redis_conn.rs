//! Redis connections that are never trusted after a doubt.
//!
//! A [`Link`] holds one connection (a multiplexed standalone connection or a
//! cluster connection) made by a background task. Callers take the current
//! connection with its generation, and **poison** that generation when its
//! reply stream may be out of step: a response that timed out or was
//! abandoned (the caller's future dropped mid-call), a reply that does not
//! echo the caller's nonce, an I/O error, or a server error that means "this
//! node cannot serve you now" (`READONLY`, `LOADING`, `MASTERDOWN`,
//! `CLUSTERDOWN`, `TRYAGAIN`). A multiplexed connection pairs replies with
//! calls by order only, so after one lost reply every later caller would get
//! the previous caller's answer; a poisoned connection is dropped and never
//! used again, and the task reconnects at once, then with a backoff capped at
//! [`MAX_BACKOFF`] — so service resumes well within a second of the server
//! accepting connections again, however long the outage was (tested with
//! 1, 5 and 10 s outages).
//!
//! Until a connection is made, callers fail fast instead of waiting (no
//! request ever sets up a connection). Connections skip `CLIENT SETINFO`:
//! Redis before 7.2 rejects it and counts an `errorstat_ERR` per connect.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::{IntoConnectionInfo, RedisError};
use tokio::sync::Notify;

/// Longest wait between two connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// Why a connection was dropped, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoisonReason {
    /// A reply did not arrive in time or its caller gave up waiting.
    Timeout,
    /// A reply could not be attributed to its call (nonce mismatch, wrong shape).
    Unattributed,
    /// The connection broke.
    Io,
    /// The server said it cannot serve writes now (`READONLY`, `LOADING`,
    /// `MASTERDOWN`, `CLUSTERDOWN`, `TRYAGAIN`).
    NodeUnavailable,
}

impl PoisonReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Unattributed => "unattributed_reply",
            Self::Io => "io",
            Self::NodeUnavailable => "node_unavailable",
        }
    }

    /// Whether `error` means the connection cannot be trusted or used further;
    /// `None` for errors of the command alone (a script error, say).
    pub fn of(error: &RedisError) -> Option<Self> {
        if error.is_timeout() {
            return Some(Self::Timeout);
        }
        if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal() {
            return Some(Self::Io);
        }
        // A reply of the wrong shape, or one that does not parse, may be
        // another call's: the stream cannot be trusted.
        if matches!(
            error.kind(),
            redis::ErrorKind::UnexpectedReturnType | redis::ErrorKind::Parse
        ) {
            return Some(Self::Unattributed);
        }
        match error.code() {
            Some("READONLY" | "LOADING" | "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN") => {
                Some(Self::NodeUnavailable)
            }
            _ => None,
        }
    }
}

/// Called for every poisoning, for metrics.
pub type OnPoison = Arc<dyn Fn(PoisonReason) + Send + Sync>;

struct Held<C> {
    conn: C,
    generation: u64,
}

struct Inner<C> {
    current: ArcSwapOption<Held<C>>,
    wake: Notify,
    generation: AtomicU64,
    what: &'static str,
    on_poison: Option<OnPoison>,
}

/// A connection of type `C` that is replaced whenever it is poisoned.
pub struct Link<C> {
    inner: Arc<Inner<C>>,
    task: tokio::task::JoinHandle<()>,
}

impl<C> Drop for Link<C> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ConnectFuture<C> = Pin<Box<dyn Future<Output = Result<C, RedisError>> + Send>>;

impl<C: Clone + Send + Sync + 'static> Link<C> {
    /// Starts the connecting task: `connect` is called until it succeeds, and
    /// again whenever the connection is poisoned. Must run inside a Tokio
    /// runtime.
    pub fn spawn<F>(what: &'static str, on_poison: Option<OnPoison>, connect: F) -> Self
    where
        F: Fn() -> ConnectFuture<C> + Send + Sync + 'static,
    {
        let inner = Arc::new(Inner {
            current: ArcSwapOption::empty(),
            wake: Notify::new(),
            generation: AtomicU64::new(0),
            what,
            on_poison,
        });
        let state = inner.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::ZERO;
            let mut failures: u64 = 0;
            loop {
                if state.current.load().is_some() {
                    state.wake.notified().await;
                    continue;
                }
                match connect().await {
                    Ok(conn) => {
                        let generation = state.generation.fetch_add(1, Ordering::SeqCst) + 1;
                        state
                            .current
                            .store(Some(Arc::new(Held { conn, generation })));
                        tracing::info!(what = state.what, generation, "connected");
                        backoff = Duration::ZERO;
                        failures = 0;
                    }
                    Err(e) => {
                        failures += 1;
                        // First failure and then every 20th (about 5 s at the
                        // cap), so an outage does not flood the log.
                        if failures == 1 || failures.is_multiple_of(20) {
                            tracing::warn!(what = state.what, error = %e, failures, "not reachable; retrying");
                        }
                        backoff = (backoff * 2)
                            .max(Duration::from_millis(25))
                            .min(MAX_BACKOFF);
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
        });
        Self { inner, task }
    }

    /// The current connection and its generation, if there is one.
    pub fn get(&self) -> Option<(C, u64)> {
        self.inner
            .current
            .load_full()
            .map(|h| (h.conn.clone(), h.generation))
    }

    /// Whether a connection is up (made, set up, and not poisoned).
    pub fn connected(&self) -> bool {
        self.inner.current.load().is_some()
    }

    /// Drops connection `generation` (if it is still the current one) and
    /// starts reconnecting. Later poisonings of the same generation are no-ops.
    pub fn poison(&self, generation: u64, reason: PoisonReason) {
        let current = self.inner.current.load();
        if current.as_ref().is_some_and(|h| h.generation == generation) {
            let swapped = self
                .inner
                .current
                .compare_and_swap(&*current, None::<Arc<Held<C>>>);
            if swapped.as_ref().is_some_and(|h| h.generation == generation) {
                tracing::warn!(
                    what = self.inner.what,
                    generation,
                    reason = reason.label(),
                    "connection dropped; reconnecting"
                );
                if let Some(f) = &self.inner.on_poison {
                    f(reason);
                }
                self.inner.wake.notify_one();
            }
        }
    }

    /// A guard that poisons `generation` when dropped unarmed: hold it across
    /// a call, and [`Guard::disarm`] it once the reply is attributed. A caller
    /// whose future is dropped mid-call (a deadline) thereby poisons the
    /// connection, whose reply stream is then one reply behind.
    pub fn guard(&self, generation: u64) -> Guard<'_, C> {
        Guard {
            link: self,
            generation,
            armed: true,
        }
    }
}

/// See [`Link::guard`].
pub struct Guard<'a, C: Clone + Send + Sync + 'static> {
    link: &'a Link<C>,
    generation: u64,
    armed: bool,
}

impl<C: Clone + Send + Sync + 'static> Guard<'_, C> {
    /// The reply was attributed: keep the connection.
    pub fn disarm(mut self) {
        self.armed = false;
    }

    /// Poison now with a specific reason.
    pub fn poison(mut self, reason: PoisonReason) {
        self.armed = false;
        self.link.poison(self.generation, reason);
    }
}

impl<C: Clone + Send + Sync + 'static> Drop for Guard<'_, C> {
    fn drop(&mut self) {
        if self.armed {
            self.link.poison(self.generation, PoisonReason::Timeout);
        }
    }
}

/// A nonce for one Redis call, echoed in its reply to prove the reply
/// belongs to it: unique within the process (a counter), and unlikely to
/// meet another process's (the counter starts at a random value).
pub fn next_nonce() -> String {
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    let counter = NEXT.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // Without randomness the start is 0: still unique per call here.
        let _ = getrandom::fill(&mut bytes);
        AtomicU64::new(u64::from_le_bytes(bytes) >> 1)
    });
    counter.fetch_add(1, Ordering::Relaxed).to_string()
}

/// `url` as connection info without `CLIENT SETINFO`.
pub fn connection_info(url: &str) -> Result<redis::ConnectionInfo, String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("redis url {:?}: {e}", redact(url)))?;
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    Ok(info.set_redis_settings(settings))
}

/// A URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Multiplexed-connection settings: `timeout` (at least 200 ms) bounds
/// connecting and every response.
pub fn async_config(timeout: Duration) -> redis::AsyncConnectionConfig {
    let timeout = timeout.max(Duration::from_millis(200));
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
}

/// A standalone-Redis multiplexed connection for `url`, made in the background
/// and replaced when poisoned.
pub fn standalone(
    url: &str,
    timeout: Duration,
    what: &'static str,
) -> Result<Link<redis::aio::MultiplexedConnection>, String> {
    let client = redis::Client::open(connection_info(url)?)
        .map_err(|e| format!("redis url {:?}: {e}", redact(url)))?;
    let config = async_config(timeout);
    Ok(Link::spawn(what, None, move || {
        let (client, config) = (client.clone(), config.clone());
        Box::pin(async move {
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
        })
    }))
}

/// Where a Redis connection goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// `redis://host:port/db`.
    Standalone(String),
    /// Seed nodes of a cluster.
    Cluster(Vec<String>),
    /// Sentinels watching the master named `master`: every (re)connection asks
    /// them for the current master, so a failover is followed.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        /// Database, user and password of the master connection, from a
        /// `redis://[user:pass@]host/db` URL (its host is ignored).
        master_url: Option<String>,
    },
}

/// A client for the master the sentinels name now.
pub async fn sentinel_master(
    sentinels: &[String],
    master: &str,
    master_url: Option<&str>,
) -> Result<redis::Client, RedisError> {
    use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
    let settings = match master_url {
        Some(url) => connection_info(url)
            .map_err(|e| RedisError::from((redis::ErrorKind::InvalidClientConfig, "bad url", e)))?
            .redis_settings()
            .clone(),
        None => redis::RedisConnectionInfo::default().set_skip_set_lib_name(),
    };
    let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
    let infos = sentinels
        .iter()
        .map(|s| {
            connection_info(s).map_err(|e| {
                RedisError::from((redis::ErrorKind::InvalidClientConfig, "bad url", e))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut client = SentinelClient::build(
        infos,
        master.to_string(),
        Some(node),
        SentinelServerType::Master,
    )?;
    client.async_get_client().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
    }

    #[test]
    fn node_errors_poison_and_script_errors_do_not() {
        let readonly = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
        ));
        assert_eq!(
            PoisonReason::of(&readonly),
            Some(PoisonReason::NodeUnavailable)
        );
        let script = RedisError::from((redis::ErrorKind::Client, "script failed"));
        assert_eq!(PoisonReason::of(&script), None);
    }
}
