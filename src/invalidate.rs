//! One invalidation channel for every replica: quota resets, limits reloads,
//! tier changes and key revocations all travel on it.
//!
//! Replicas keep local state that a change elsewhere makes wrong: the quota
//! engine's over-limit cache and the API key record cache. A change made by
//! `tollgate quota reset` or `tollgate keys revoke|create` is published on the
//! Redis pub/sub channel `<quota.key_prefix>invalidate`; every serving replica
//! subscribes and drops the affected state when the message arrives
//! (milliseconds on a healthy connection).
//!
//! Pub/sub is fire-and-forget, so a replica whose subscription was down may
//! miss a message. It therefore treats every (re)subscription as "anything
//! may have changed" ([`Invalidation::All`]) and drops everything, and the
//! caches' own bounds still hold as a fallback (the API key cache TTL,
//! `identity.api_keys_cache_ms`; an over-limit entry's window end).
//!
//! The channel's Redis is the quota store's (standalone, the first reachable
//! cluster node — cluster pub/sub reaches every node — or the Sentinel
//! master), else the API keys' Redis; with neither, invalidation is local to
//! the process.
//!
//! Wire format (one UTF-8 message): `quota_reset`, `limits`, `key <id>`,
//! `all`. Unknown messages are treated as `all`.

use std::time::Duration;

use crate::config::{Config, StoreKind};
use crate::redis_conn::{MAX_BACKOFF, Target};

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// A quota counter was reset.
    QuotaReset,
    /// Limits (or quota rules) changed.
    Limits,
    /// An API key record changed (revoked, created, tier or tenant changed).
    Key(String),
    /// Anything may have changed (a subscription gap, an unknown message).
    All,
}

impl Invalidation {
    /// The wire form.
    pub fn encode(&self) -> String {
        match self {
            Self::QuotaReset => "quota_reset".into(),
            Self::Limits => "limits".into(),
            Self::Key(id) => format!("key {id}"),
            Self::All => "all".into(),
        }
    }

    /// Reads the wire form; anything unknown is [`Invalidation::All`].
    pub fn decode(text: &str) -> Self {
        match text.split_once(' ') {
            Some(("key", id)) if !id.is_empty() => Self::Key(id.to_string()),
            _ => match text {
                "quota_reset" => Self::QuotaReset,
                "limits" => Self::Limits,
                _ => Self::All,
            },
        }
    }

    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::QuotaReset => "quota_reset",
            Self::Limits => "limits",
            Self::Key(_) => "key",
            Self::All => "all",
        }
    }
}

/// The pub/sub channel name for a key prefix.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}invalidate")
}

/// Where the channel lives for `config`, and its channel name.
pub fn target(config: &Config) -> Option<(Target, String)> {
    let q = &config.quota;
    let target = match q.store {
        StoreKind::Redis => Target::Standalone(q.redis_url.clone()),
        StoreKind::RedisCluster => Target::Cluster(q.redis_cluster_nodes.clone()),
        StoreKind::RedisSentinel => Target::Sentinel {
            sentinels: q.redis_sentinel_nodes.clone(),
            master: q.redis_sentinel_master.clone(),
            master_url: Some(q.redis_url.clone()),
        },
        StoreKind::Memory => Target::Standalone(config.identity.api_keys_redis_url.clone()?),
    };
    Some((target, channel(&q.key_prefix)))
}

/// A client for one server of `target` (`attempt` rotates through cluster
/// nodes).
async fn client_for(target: &Target, attempt: usize) -> Result<redis::Client, String> {
    let url = match target {
        Target::Standalone(url) => url.clone(),
        Target::Cluster(nodes) if !nodes.is_empty() => nodes[attempt % nodes.len()].clone(),
        Target::Cluster(_) => return Err("no cluster nodes".into()),
        Target::Sentinel {
            sentinels,
            master,
            master_url,
        } => {
            return crate::redis_conn::sentinel_master(sentinels, master, master_url.as_deref())
                .await
                .map_err(|e| e.to_string());
        }
    };
    let info = crate::redis_conn::connection_info(&url)?;
    redis::Client::open(info).map_err(|e| e.to_string())
}

/// Publishes `what` on the channel of `config` (used by the CLI after a
/// change). `Ok(false)` when the configuration has no channel.
pub async fn publish(config: &Config, what: &Invalidation) -> Result<bool, String> {
    let Some((target, channel)) = target(config) else {
        return Ok(false);
    };
    let client = client_for(&target, 0).await?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&crate::redis_conn::async_config(
            Duration::from_secs(2),
        ))
        .await
        .map_err(|e| e.to_string())?;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(what.encode())
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(true)
}

/// Subscribes in the background for as long as the returned handle lives,
/// calling `apply` for every message and [`Invalidation::All`] after every
/// (re)subscription. Must run inside a Tokio runtime.
pub fn subscribe<F>(target: Target, channel: String, apply: F) -> Subscription
where
    F: Fn(Invalidation) + Send + Sync + 'static,
{
    let task = tokio::spawn(async move {
        use tokio_stream::StreamExt;
        let mut attempt = 0usize;
        let mut backoff = Duration::ZERO;
        loop {
            let subscribed = async {
                let client = client_for(&target, attempt).await?;
                let mut pubsub =
                    tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
                        .await
                        .map_err(|_| "connect timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                pubsub
                    .subscribe(&channel)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(pubsub)
            }
            .await;
            match subscribed {
                Ok(mut pubsub) => {
                    tracing::info!(%channel, "invalidation channel subscribed");
                    backoff = Duration::ZERO;
                    // Whatever was published while unsubscribed is lost.
                    apply(Invalidation::All);
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let text: String = msg.get_payload().unwrap_or_default();
                        apply(Invalidation::decode(&text));
                    }
                    tracing::warn!(%channel, "invalidation channel lost; resubscribing");
                }
                Err(e) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        tracing::warn!(%channel, error = %e, "cannot subscribe to the invalidation channel; retrying");
                    }
                    backoff = (backoff * 2)
                        .max(Duration::from_millis(25))
                        .min(MAX_BACKOFF);
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    });
    Subscription { task }
}

/// A running subscription; dropping it unsubscribes.
pub struct Subscription {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips_and_unknown_means_all() {
        for i in [
            Invalidation::QuotaReset,
            Invalidation::Limits,
            Invalidation::Key("k1".into()),
            Invalidation::All,
        ] {
            assert_eq!(Invalidation::decode(&i.encode()), i);
        }
        assert_eq!(Invalidation::decode("key "), Invalidation::All);
        assert_eq!(Invalidation::decode("garbage"), Invalidation::All);
    }
}
