//! Redis and Redis Cluster stores.
//!
//! Each group of charges is one round trip: one Lua script, run with EVALSHA
//! (redis-rs reloads it and retries only on NOSCRIPT, when it certainly did
//! not run — after a restart or failover flushed the script cache). One script
//! rather than MULTI/EXEC because the decision (do all counters fit?) must be
//! taken inside Redis between the reads and the writes. Time comes from the
//! server (`TIME` inside the script), so replicas with skewed clocks share
//! windows. Every key is written with its expiry in the same script.
//!
//! Cluster: every counter key carries a hash tag (`{…}`) naming its group,
//! and the window keys the script derives keep that tag, so a group lives in
//! one slot and its charge is atomic. Charges of one request that fall into
//! different groups are sent one group per round trip; if a later group
//! refuses, the earlier ones are refunded. That is all-or-nothing for the
//! counts, but not atomic: a concurrent request may briefly see the charge.
//! Keep limits that must be exact together under one group.
//!
//! Connections: redis-rs `ConnectionManager` (standalone) and the async
//! cluster connection both reconnect by themselves; no request sets up a
//! connection. Until the first connection succeeds a background task keeps
//! trying, and requests fail fast (each limit's failure mode applies).
//! Nothing is retried after a timeout or I/O error: the script may have
//! committed, and replaying it would count twice (the cluster client is built
//! with zero retries for that reason).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script};

use crate::redis_conn::Lazy;

use super::{
    Algorithm, Charge, ChargeResult, CounterKey, QuotaStore, StoreError, Usage, reset_after,
};

/// Largest count or limit handled exactly (Lua numbers are doubles).
pub const MAX_COUNT: u64 = 1 << 53;

/// The charge script (public for the benchmark that compares it with
/// `redis-benchmark`).
pub const CHARGE_LUA: &str = r"
-- KEYS[i]: counter base names, all with one hash tag.
-- ARGV per key (5 each): limit, window_ms, algorithm (0 fixed, 1 sliding), cost, shadow.
-- Returns {applied, now_ms, used_1, fits_1, used_2, fits_2, ...}; used is before this charge.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local used, fits, pending = {}, {}, {}
local ok = true
for i = 1, n do
  local a = (i - 1) * 5
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local algo, cost, shadow = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local w = math.floor(now / window)
  local cur_key = KEYS[i] .. ':' .. string.format('%d', w)
  local cur = tonumber(redis.call('GET', cur_key) or '0') + (pending[cur_key] or 0)
  local u = cur
  if algo == 1 then
    local prev = tonumber(redis.call('GET', KEYS[i] .. ':' .. string.format('%d', w - 1)) or '0')
    local elapsed = now - w * window
    u = math.ceil(prev * (window - elapsed) / window) + cur
  end
  local f = (u + cost) <= limit
  if (not f) and shadow == 0 then ok = false end
  pending[cur_key] = (pending[cur_key] or 0) + cost
  used[i] = u
  fits[i] = f and 1 or 0
end
local out = {ok and 1 or 0, now}
for i = 1, n do
  local a = (i - 1) * 5
  local window, algo, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if ok and cost > 0 then
    local w = math.floor(now / window)
    local cur_key = KEYS[i] .. ':' .. string.format('%d', w)
    redis.call('INCRBY', cur_key, cost)
    local keep = 1
    if algo == 1 then keep = 2 end
    redis.call('PEXPIREAT', cur_key, (w + keep) * window + 1000)
  end
  out[#out + 1] = used[i]
  out[#out + 1] = fits[i]
end
return out
";

const REFUND_LUA: &str = r"
-- KEYS[i]: counter base names; ARGV per key (2 each): window_ms, cost.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  local window, cost = tonumber(ARGV[(i - 1) * 2 + 1]), tonumber(ARGV[(i - 1) * 2 + 2])
  local k = KEYS[i] .. ':' .. string.format('%d', math.floor(now / window))
  if cost > 0 and redis.call('EXISTS', k) == 1 then redis.call('DECRBY', k, cost) end
end
return 1
";

const RESET_LUA: &str = r"
-- KEYS[1]: a counter base name. Deletes its current and previous window for every unit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, window in ipairs({1000, 60000, 3600000, 86400000}) do
  local w = math.floor(now / window)
  redis.call('DEL', KEYS[1] .. ':' .. string.format('%d', w), KEYS[1] .. ':' .. string.format('%d', w - 1))
end
return 1
";

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Where the store connects.
#[derive(Debug, Clone)]
pub enum Target {
    /// `redis://host:port/db`.
    Standalone(String),
    /// Seed nodes of a cluster.
    Cluster(Vec<String>),
}

/// The Redis [`QuotaStore`].
pub struct RedisStore {
    conn: Lazy<Conn>,
    charge: Script,
    refund: Script,
    reset: Script,
    prefix: String,
    kind: &'static str,
}

impl RedisStore {
    /// Starts connecting in the background; `timeout` bounds connection set-up
    /// and each response. Must be called inside a Tokio runtime.
    pub fn connect(target: Target, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let (conn, kind) = match target {
            Target::Standalone(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| StoreError::Backend(format!("redis url {url:?}: {e}")))?;
                let config = crate::redis_conn::manager_config(timeout);
                (
                    Lazy::spawn("redis quota store", move || {
                        let (client, config) = (client.clone(), config.clone());
                        async move {
                            ConnectionManager::new_with_config(client, config)
                                .await
                                .map(Conn::Single)
                        }
                    }),
                    "redis",
                )
            }
            Target::Cluster(nodes) => {
                let timeout = timeout.max(Duration::from_millis(200));
                let client = ClusterClient::builder(nodes.clone())
                    .retries(0)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(|e| {
                        StoreError::Backend(format!("redis cluster nodes {nodes:?}: {e}"))
                    })?;
                (
                    Lazy::spawn("redis cluster quota store", move || {
                        let client = client.clone();
                        async move { client.get_async_connection().await.map(Conn::Cluster) }
                    }),
                    "redis_cluster",
                )
            }
        };
        Ok(Self {
            conn,
            charge: Script::new(CHARGE_LUA),
            refund: Script::new(REFUND_LUA),
            reset: Script::new(RESET_LUA),
            prefix: prefix.to_string(),
            kind,
        })
    }

    /// Whether a connection has been established.
    pub fn connected(&self) -> bool {
        self.conn.connected()
    }

    fn conn(&self) -> Result<Conn, StoreError> {
        self.conn
            .get()
            .ok_or_else(|| StoreError::Backend("not connected to redis yet".into()))
    }

    async fn charge_group(
        &self,
        conn: &mut Conn,
        charges: &[&Charge],
    ) -> Result<(bool, u64, Vec<(u64, bool)>), StoreError> {
        let mut inv = self.charge.prepare_invoke();
        for c in charges {
            inv.key(c.key.redis_base(&self.prefix))
                .arg(c.limit.min(MAX_COUNT))
                .arg(c.unit.millis())
                .arg(u8::from(c.algorithm == Algorithm::SlidingWindow))
                .arg(c.cost.min(MAX_COUNT))
                .arg(u8::from(c.shadow));
        }
        let out: Vec<i64> = invoke(&inv, conn).await?;
        let (Some(&applied), Some(&now)) = (out.first(), out.get(1)) else {
            return Err(StoreError::Backend("unexpected script reply".into()));
        };
        let per: Vec<(u64, bool)> = out[2..]
            .chunks(2)
            .map(|p| (u64::try_from(p[0]).unwrap_or(0), p.get(1) == Some(&1)))
            .collect();
        if per.len() != charges.len() {
            return Err(StoreError::Backend("unexpected script reply length".into()));
        }
        Ok((applied == 1, u64::try_from(now).unwrap_or(0), per))
    }

    async fn refund_group(&self, conn: &mut Conn, charges: &[&Charge]) {
        let mut inv = self.refund.prepare_invoke();
        for c in charges {
            inv.key(c.key.redis_base(&self.prefix))
                .arg(c.unit.millis())
                .arg(c.cost.min(MAX_COUNT));
        }
        if let Err(e) = invoke::<i64>(&inv, conn).await {
            tracing::error!(error = %e, "could not refund a cross-slot charge; counts may be high until the window resets");
        }
    }
}

async fn invoke<T: redis::FromRedisValue>(
    inv: &redis::ScriptInvocation<'_>,
    conn: &mut Conn,
) -> Result<T, StoreError> {
    let result: Result<T, RedisError> = inv.invoke_async(conn).await;
    result.map_err(|e| StoreError::Backend(e.to_string()))
}

#[tonic::async_trait]
impl QuotaStore for RedisStore {
    async fn charge(&self, charges: &[Charge]) -> Result<ChargeResult, StoreError> {
        let mut conn = self.conn()?;
        // Group by hash tag; standalone Redis takes everything in one call.
        let mut groups: Vec<([u8; 8], Vec<usize>)> = Vec::new();
        for (i, c) in charges.iter().enumerate() {
            let g = if matches!(conn, Conn::Single(_)) {
                [0; 8]
            } else {
                c.key.group()
            };
            match groups.iter_mut().find(|(k, _)| *k == g) {
                Some((_, v)) => v.push(i),
                None => groups.push((g, vec![i])),
            }
        }
        let mut usage = vec![None; charges.len()];
        let mut applied_groups: Vec<Vec<&Charge>> = Vec::new();
        let mut all_applied = true;
        for (_, idx) in &groups {
            let group: Vec<&Charge> = idx.iter().map(|&i| &charges[i]).collect();
            let (applied, now, per) = self.charge_group(&mut conn, &group).await?;
            for (&i, (used, fits)) in idx.iter().zip(per) {
                let c = &charges[i];
                usage[i] = Some(Usage {
                    fits,
                    used: if applied {
                        used.saturating_add(c.cost)
                    } else {
                        used
                    },
                    reset: reset_after(now, c.unit.millis()),
                });
            }
            if applied {
                applied_groups.push(group);
            } else {
                all_applied = false;
                break;
            }
        }
        if !all_applied {
            for group in &applied_groups {
                self.refund_group(&mut conn, group).await;
            }
        }
        // Groups after a refusal were not asked; report them as untouched.
        let usage = usage
            .into_iter()
            .zip(charges)
            .map(|(u, c)| {
                u.unwrap_or(Usage {
                    fits: true,
                    used: 0,
                    reset: Duration::from_millis(c.unit.millis()),
                })
            })
            .collect();
        Ok(ChargeResult {
            applied: all_applied,
            usage,
        })
    }

    async fn reset(&self, key: &CounterKey) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut inv = self.reset.prepare_invoke();
        inv.key(key.redis_base(&self.prefix));
        invoke::<i64>(&inv, &mut conn).await.map(|_| ())
    }

    fn kind(&self) -> &'static str {
        self.kind
    }

    fn connected(&self) -> bool {
        RedisStore::connected(self)
    }
}

/// Lets one script invocation serve both connection kinds.
impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
