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
//! Every key a script touches is passed in `KEYS` (Redis Cluster's key
//! declaration rule): the caller names the window keys from its estimate of
//! the Redis clock (local time plus the offset seen in earlier replies), and
//! the script, which reads `TIME`, refuses to act on a stale estimate and
//! returns the server time instead; the caller then retries once with it.
//! Nothing was written, so that retry cannot count twice.
//!
//! Every script echoes a per-call nonce (`ARGV[1]`) as the first element of
//! its reply. A multiplexed connection pairs replies with calls by order
//! only; a reply whose nonce is not the caller's proves the stream is out of
//! step, and the connection is dropped ([`crate::redis_conn`]) rather than
//! answering anyone from it. A call that times out or is abandoned drops its
//! connection too, for the same reason.
//!
//! Connections: made in the background by [`crate::redis_conn::Link`]; on
//! connect the store checks the node is a master (`ROLE`), loads the scripts
//! and reads `TIME`, so a connected store is one that can write. Nothing is
//! retried after a timeout or I/O error: the script may have committed, and
//! replaying it would count twice (the cluster client is built with zero
//! retries for that reason).
//!
//! Sentinel: every (re)connection asks the sentinels for the current master,
//! so after a failover the first `READONLY` (or a broken connection) leads to
//! the new master within a reconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script, Value};

use crate::metrics::StoreMetrics;
pub use crate::redis_conn::Target;
use crate::redis_conn::{Link, PoisonReason};

use super::memory::{Clock, SystemClock};
use super::{
    Algorithm, Charge, ChargeMode, ChargeResult, CounterKey, QuotaStore, Reservation, Reserved,
    SettleHow, SettleReport, StoreError, Unit, Usage,
};

mod settle;
pub use settle::{RESERVE_LUA, SETTLE_LUA};

/// Largest count or limit handled exactly (Lua numbers are doubles).
pub const MAX_COUNT: u64 = 1 << 53;

/// Offsets beyond this between a replica's clock and Redis are logged.
const SKEW_WARN_MS: i64 = 5_000;

/// The charge script (public for the benchmark that compares it with
/// `redis-benchmark`).
pub const CHARGE_LUA: &str = r"
-- KEYS: two per charge, all with one hash tag: the current window's key and
--   the previous window's (read by sliding windows only).
-- ARGV[1]: nonce, echoed first in the reply. Then 9 per charge: window index,
--   limit, window start ms, window end ms, expire-at ms, algorithm (0 fixed,
--   1 sliding), cost, shadow, always (1: usage recorded in full even over
--   the limit). The caller computes the window from the calendar (calendar
--   months differ in length); the script only checks that now is inside it.
-- Returns {nonce, status, now_ms, used_1, fits_1, ...}: status 1 applied,
--   0 refused (only always-charges applied), -1 stale window index (nothing
--   done; the caller retries with now_ms). used is before this charge.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
for i = 1, n do
  local a = 1 + (i - 1) * 9
  if now < tonumber(ARGV[a + 3]) or now >= tonumber(ARGV[a + 4]) then
    return {ARGV[1], -1, now}
  end
end
-- Counts are incremented first and taken back if the charge is refused:
-- the script runs atomically, so no one sees the intermediate counts, and
-- the common case (it fits) is one INCRBY per counter instead of a GET and
-- an INCRBY. A counter charged twice in one call sees its first charge,
-- as it would one after the other.
local out = {ARGV[1], 1, now}
local ok = true
for i = 1, n do
  local a = 1 + (i - 1) * 9
  local limit, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 7])
  local sliding = ARGV[a + 6] == '1'
  local cur_key = KEYS[2 * i - 1]
  local u
  if cost > 0 then
    local after = redis.call('INCRBY', cur_key, cost)
    -- A window key is only ever created here, with its expiry, so a fixed
    -- window that already held a count has it: skip the second write.
    -- Sliding windows always set it (they keep their key a window longer).
    if sliding or after == cost then
      redis.call('PEXPIREAT', cur_key, ARGV[a + 5])
    end
    u = after - cost
  else
    -- Never INCRBY 0: it would create a key without an expiry.
    u = tonumber(redis.call('GET', cur_key) or '0')
  end
  if sliding then
    local start, stop = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local prev = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
    local len = stop - start
    u = math.ceil(prev * (len - (now - start)) / len) + u
  end
  local f
  if cost == 0 then f = u < limit else f = (u + cost) <= limit end
  if (not f) and ARGV[a + 8] == '0' and ARGV[a + 9] == '0' then ok = false end
  out[#out + 1] = u
  out[#out + 1] = f and 1 or 0
end
if not ok then
  -- Refused: only always-charges (usage recorded in full) stay counted.
  out[2] = 0
  for i = 1, n do
    local a = 1 + (i - 1) * 9
    local cost = tonumber(ARGV[a + 7])
    if cost > 0 and ARGV[a + 9] == '0' then
      redis.call('DECRBY', KEYS[2 * i - 1], cost)
    end
  end
end
return out
";

const REFUND_LUA: &str = r"
-- KEYS[i]: window keys that were charged; ARGV[1]: nonce; ARGV[i + 1]: cost.
for i = 1, #KEYS do
  local cost = tonumber(ARGV[i + 1])
  if cost > 0 and redis.call('EXISTS', KEYS[i]) == 1 then redis.call('DECRBY', KEYS[i], cost) end
end
return {ARGV[1]}
";

const RESET_LUA: &str = r"
-- KEYS: every window key of a counter that can hold a count; ARGV[1]: nonce.
redis.call('DEL', unpack(KEYS))
return {ARGV[1]}
";

const RECORD_LUA: &str = r"
-- KEYS[1]: a reservation record. ARGV[1]: nonce; ARGV[2]: put | merge | get;
-- ARGV[3]: record text, ARGV[4]: ttl ms (put, merge). Returns {nonce, record
-- or ''} for get, {nonce, 'kept' or ''} for put (an existing record is kept).
-- merge: the record's lines become the union of its lines and ARGV[3]'s, and
-- it lives at least ARGV[4] ms more (never less than it had left).
if ARGV[2] == 'merge' then
  local text = ARGV[3]
  local old = redis.call('GET', KEYS[1])
  if old then
    local seen = {}
    for line in string.gmatch(text, '[^\n]+') do seen[line] = true end
    for line in string.gmatch(old, '[^\n]+') do
      if not seen[line] then
        text = text .. '\n' .. line
        seen[line] = true
      end
    end
  end
  local ttl = tonumber(ARGV[4])
  local left = redis.call('PTTL', KEYS[1])
  if left > ttl then ttl = left end
  redis.call('SET', KEYS[1], text, 'PX', ttl)
  return {ARGV[1], 'kept'}
end
if ARGV[2] == 'put' then
  if redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4], 'NX') then
    return {ARGV[1], 'kept'}
  end
  return {ARGV[1], ''}
end
return {ARGV[1], redis.call('GET', KEYS[1]) or ''}
";

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// Clock offset bookkeeping shared with the connecting task.
struct Clocks {
    /// Redis time minus local time, ms; `i64::MIN` until first seen.
    offset_ms: AtomicI64,
    last_warn_ms: AtomicU64,
    local: SystemClock,
    metrics: Arc<StoreMetrics>,
}

impl Clocks {
    fn observe(&self, redis_now_ms: u64) {
        let local = self.local.now_ms();
        let offset = i64::try_from(redis_now_ms).unwrap_or(i64::MAX)
            - i64::try_from(local).unwrap_or(i64::MAX);
        self.offset_ms.store(offset, Ordering::Relaxed);
        self.metrics.clock_offset_ms(offset);
        if offset.abs() > SKEW_WARN_MS {
            let last = self.last_warn_ms.load(Ordering::Relaxed);
            if local.saturating_sub(last) > 60_000 {
                self.last_warn_ms.store(local, Ordering::Relaxed);
                tracing::warn!(
                    offset_ms = offset,
                    "this replica's clock and the quota store's (Redis TIME) differ by more than 5 s; \
                     windows follow Redis, but token expiry and logs use the local clock — fix NTP"
                );
            }
        }
    }

    /// Best estimate of the Redis clock now, ms.
    fn redis_now_ms(&self) -> u64 {
        let local = self.local.now_ms();
        match self.offset_ms.load(Ordering::Relaxed) {
            i64::MIN => local,
            o => local.saturating_add_signed(o),
        }
    }

    fn known(&self) -> Option<i64> {
        Some(self.offset_ms.load(Ordering::Relaxed)).filter(|&o| o != i64::MIN)
    }
}

/// The Redis [`QuotaStore`].
pub struct RedisStore {
    link: Arc<Link<Conn>>,
    charge: Script,
    refund: Script,
    reset: Script,
    record: Script,
    reserve: Script,
    settle: Script,
    sweep: Script,
    groups: settle::Groups,
    prefix: String,
    kind: &'static str,
    clocks: Arc<Clocks>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

/// Checks a fresh standalone connection can serve writes, loads the scripts
/// and reads the server clock.
async fn set_up(conn: &mut MultiplexedConnection, clocks: &Clocks) -> Result<(), RedisError> {
    let role: Vec<Value> = redis::cmd("ROLE").query_async(conn).await?;
    if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
        return Err(RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "node is not a master",
        )));
    }
    for lua in [CHARGE_LUA, REFUND_LUA, RESET_LUA, RECORD_LUA] {
        Script::new(lua).prepare_invoke().load_async(conn).await?;
    }
    for script in settle::scripts() {
        script.prepare_invoke().load_async(conn).await?;
    }
    read_time(conn, clocks).await
}

async fn read_time<C: ConnectionLike + Send>(
    conn: &mut C,
    clocks: &Clocks,
) -> Result<(), RedisError> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    clocks.observe(secs.saturating_mul(1000).saturating_add(micros / 1000));
    Ok(())
}

impl RedisStore {
    /// Starts connecting in the background; `timeout` bounds connection set-up
    /// and each response. Must be called inside a Tokio runtime.
    pub fn connect(
        target: Target,
        prefix: &str,
        timeout: Duration,
        metrics: Arc<StoreMetrics>,
    ) -> Result<Self, StoreError> {
        let clocks = Arc::new(Clocks {
            offset_ms: AtomicI64::new(i64::MIN),
            last_warn_ms: AtomicU64::new(0),
            local: SystemClock,
            metrics: metrics.clone(),
        });
        let on_poison: crate::redis_conn::OnPoison = {
            let metrics = metrics.clone();
            Arc::new(move |reason: PoisonReason| metrics.reconnect(reason.label()))
        };
        let config = crate::redis_conn::async_config(timeout);
        let (link, kind) = match target {
            Target::Standalone(url) => {
                let client = redis::Client::open(
                    crate::redis_conn::connection_info(&url).map_err(StoreError::Backend)?,
                )
                .map_err(|e| StoreError::Backend(format!("redis url: {e}")))?;
                let clocks = clocks.clone();
                (
                    Link::spawn("redis quota store", Some(on_poison), move || {
                        let (client, config, clocks) =
                            (client.clone(), config.clone(), clocks.clone());
                        Box::pin(async move {
                            let mut conn = client
                                .get_multiplexed_async_connection_with_config(&config)
                                .await?;
                            set_up(&mut conn, &clocks).await?;
                            Ok(Conn::Single(conn))
                        })
                    }),
                    "redis",
                )
            }
            Target::Sentinel {
                sentinels,
                master,
                master_url,
            } => {
                let clocks = clocks.clone();
                (
                    Link::spawn("redis sentinel quota store", Some(on_poison), move || {
                        let (sentinels, master, master_url, config, clocks) = (
                            sentinels.clone(),
                            master.clone(),
                            master_url.clone(),
                            config.clone(),
                            clocks.clone(),
                        );
                        Box::pin(async move {
                            let client = tokio::time::timeout(
                                timeout.max(Duration::from_millis(200)) * 2,
                                crate::redis_conn::sentinel_master(
                                    &sentinels,
                                    &master,
                                    master_url.as_deref(),
                                ),
                            )
                            .await
                            .map_err(|_| {
                                RedisError::from((
                                    redis::ErrorKind::Io,
                                    "sentinels did not answer in time",
                                ))
                            })??;
                            let mut conn = client
                                .get_multiplexed_async_connection_with_config(&config)
                                .await?;
                            set_up(&mut conn, &clocks).await?;
                            Ok(Conn::Single(conn))
                        })
                    }),
                    "redis_sentinel",
                )
            }
            Target::Cluster(nodes) => {
                let timeout = timeout.max(Duration::from_millis(200));
                let infos = nodes
                    .iter()
                    .map(|n| crate::redis_conn::connection_info(n))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(StoreError::Backend)?;
                let client = ClusterClient::builder(infos)
                    .retries(0)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(|e| {
                        StoreError::Backend(format!("redis cluster nodes {nodes:?}: {e}"))
                    })?;
                let clocks = clocks.clone();
                (
                    Link::spawn("redis cluster quota store", Some(on_poison), move || {
                        let (client, clocks) = (client.clone(), clocks.clone());
                        Box::pin(async move {
                            let mut conn = client.get_async_connection().await?;
                            read_time(&mut conn, &clocks).await?;
                            Ok(Conn::Cluster(conn))
                        })
                    }),
                    "redis_cluster",
                )
            }
        };
        let link = Arc::new(link);
        let ticker = {
            let (link, clocks) = (link.clone(), clocks.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    // Errors are counted by the poisoning; the next request
                    // or tick sees the new connection.
                    let _ = check_clock(&link, &clocks).await;
                }
            })
        };
        Ok(Self {
            link,
            charge: Script::new(CHARGE_LUA),
            refund: Script::new(REFUND_LUA),
            reset: Script::new(RESET_LUA),
            record: Script::new(RECORD_LUA),
            reserve: Script::new(settle::RESERVE_LUA),
            settle: Script::new(settle::SETTLE_LUA),
            sweep: Script::new(settle::SWEEP_LUA),
            groups: settle::Groups::default(),
            prefix: prefix.to_string(),
            kind,
            clocks,
            ticker,
        })
    }

    /// Reads the server clock now. Every 10 s a background task does the
    /// same, so the offset stays current and a dead or paused server is
    /// noticed before a request needs it.
    pub async fn check_clock(&self) -> Result<(), StoreError> {
        check_clock(&self.link, &self.clocks).await
    }

    /// Whether a connection is up and can write.
    pub fn connected(&self) -> bool {
        self.link.connected()
    }

    fn conn(&self) -> Result<(Conn, u64), StoreError> {
        self.link
            .get()
            .ok_or_else(|| StoreError::Backend("not connected to redis".into()))
    }

    fn next_nonce(&self) -> String {
        crate::redis_conn::next_nonce()
    }

    /// Runs `inv` and returns its reply after the nonce, or an error. The
    /// connection is poisoned on any doubt.
    async fn call(
        &self,
        conn: &mut Conn,
        generation: u64,
        inv: &redis::ScriptInvocation<'_>,
        nonce: &str,
    ) -> Result<Vec<Value>, StoreError> {
        let guard = self.link.guard(generation);
        let reply: Result<Vec<Value>, RedisError> = inv.invoke_async(conn).await;
        let mut reply = match reply {
            Ok(r) => r,
            Err(e) => return Err(failed(guard, &e)),
        };
        let echoed = matches!(reply.first(), Some(Value::BulkString(b)) if b == nonce.as_bytes());
        if !echoed {
            guard.poison(PoisonReason::Unattributed);
            return Err(StoreError::Backend(
                "a redis reply did not belong to its call; connection dropped".into(),
            ));
        }
        guard.disarm();
        reply.remove(0);
        Ok(reply)
    }

    /// SHA-256 of a request id, hex: request ids come from callers and never
    /// reach Redis in the clear.
    fn request_hash(request_id: &str) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(request_id.as_bytes()))
    }

    fn record_key(&self, request_id: &str) -> String {
        let h = Self::request_hash(request_id);
        format!("{}{{r:{}}}:rec:{h}", self.prefix, &h[..16])
    }

    async fn record_op(
        &self,
        request_id: &str,
        op: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let (mut conn, generation) = self.conn()?;
        let nonce = self.next_nonce();
        let mut inv = self.record.prepare_invoke();
        inv.key(self.record_key(request_id))
            .arg(&nonce)
            .arg(op)
            .arg(record)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        let out = self.call(&mut conn, generation, &inv, &nonce).await?;
        Ok(match out.first() {
            Some(Value::BulkString(b)) if !b.is_empty() => Some(
                String::from_utf8(b.clone())
                    .map_err(|_| StoreError::Backend("reservation record is not text".into()))?,
            ),
            _ => None,
        })
    }

    fn window_key(&self, c: &Charge, w: u64) -> String {
        format!("{}:{w}", c.key.redis_base(&self.prefix))
    }

    /// A charge's two keys and nine arguments, as the charge and reserve
    /// scripts read them, for window `w`.
    fn charge_args(&self, inv: &mut redis::ScriptInvocation<'_>, c: &Charge, w: u64) {
        // A sliding window's count is still read during the next window; a
        // second's grace covers clocks a little apart.
        let keep = u64::from(c.algorithm == Algorithm::SlidingWindow);
        inv.key(self.window_key(c, w))
            .key(self.window_key(c, w.saturating_sub(1)))
            .arg(w)
            .arg(c.limit.min(MAX_COUNT))
            .arg(c.unit.window_start(w))
            .arg(c.unit.window_end(w))
            .arg(c.unit.window_end(w + keep).saturating_add(1000))
            .arg(u8::from(c.algorithm == Algorithm::SlidingWindow))
            .arg(c.cost.min(MAX_COUNT))
            .arg(u8::from(c.shadow))
            .arg(u8::from(c.mode == ChargeMode::Always));
    }

    async fn charge_group(
        &self,
        conn: &mut Conn,
        generation: u64,
        charges: &[&Charge],
    ) -> Result<GroupAnswer, StoreError> {
        // A stale window estimate costs one more round trip; two are enough
        // unless the clock sits exactly on a boundary twice.
        for _ in 0..3 {
            let now = self.clocks.redis_now_ms();
            let nonce = self.next_nonce();
            let mut inv = self.charge.prepare_invoke();
            inv.arg(&nonce);
            let mut windows = Vec::with_capacity(charges.len());
            for c in charges {
                let w = c.unit.window_of(now);
                windows.push(w);
                self.charge_args(&mut inv, c, w);
            }
            let out = self.call(conn, generation, &inv, &nonce).await?;
            let ints: Vec<i64> = out
                .iter()
                .map(|v| match v {
                    Value::Int(i) => Some(*i),
                    _ => None,
                })
                .collect::<Option<_>>()
                .ok_or_else(|| StoreError::Backend("unexpected script reply".into()))?;
            let (Some(&status), Some(&server_now)) = (ints.first(), ints.get(1)) else {
                return Err(StoreError::Backend("unexpected script reply".into()));
            };
            let server_now = u64::try_from(server_now).unwrap_or(0);
            self.clocks.observe(server_now);
            if status == -1 {
                continue;
            }
            let per: Vec<(u64, bool)> = ints[2..]
                .chunks(2)
                .map(|p| (u64::try_from(p[0]).unwrap_or(0), p.get(1) == Some(&1)))
                .collect();
            if per.len() != charges.len() {
                return Err(StoreError::Backend("unexpected script reply length".into()));
            }
            return Ok(GroupAnswer {
                applied: status == 1,
                now: server_now,
                per,
                windows,
            });
        }
        Err(StoreError::Backend(
            "redis clock kept crossing window boundaries; try again".into(),
        ))
    }

    async fn refund_group(
        &self,
        conn: &mut Conn,
        generation: u64,
        charges: &[&Charge],
        windows: &[u64],
    ) {
        let nonce = self.next_nonce();
        let mut inv = self.refund.prepare_invoke();
        inv.arg(&nonce);
        for (c, &w) in charges.iter().zip(windows) {
            // Usage recorded in full stays recorded.
            let cost = if c.mode == ChargeMode::Always {
                0
            } else {
                c.cost
            };
            inv.key(self.window_key(c, w)).arg(cost.min(MAX_COUNT));
        }
        if let Err(e) = self.call(conn, generation, &inv, &nonce).await {
            tracing::error!(error = %e, "could not refund a cross-slot charge; counts may be high until the window resets");
        }
    }
}

/// Poisons the connection when `e` says it cannot be trusted; the error for
/// the caller.
fn failed(guard: crate::redis_conn::Guard<'_, Conn>, e: &RedisError) -> StoreError {
    match PoisonReason::of(e) {
        Some(reason) => guard.poison(reason),
        None => guard.disarm(),
    }
    StoreError::Backend(e.to_string())
}

async fn check_clock(link: &Link<Conn>, clocks: &Clocks) -> Result<(), StoreError> {
    let (mut conn, generation) = link
        .get()
        .ok_or_else(|| StoreError::Backend("not connected to redis".into()))?;
    let guard = link.guard(generation);
    match read_time(&mut conn, clocks).await {
        Ok(()) => {
            guard.disarm();
            Ok(())
        }
        Err(e) => Err(failed(guard, &e)),
    }
}

struct GroupAnswer {
    applied: bool,
    now: u64,
    per: Vec<(u64, bool)>,
    windows: Vec<u64>,
}

#[tonic::async_trait]
impl QuotaStore for RedisStore {
    async fn charge(&self, charges: &[Charge]) -> Result<ChargeResult, StoreError> {
        let (mut conn, generation) = self.conn()?;
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
        let mut usage: Vec<Option<Usage>> = vec![None; charges.len()];
        let mut applied_groups: Vec<(Vec<usize>, Vec<u64>)> = Vec::new();
        let mut all_applied = true;
        for (_, idx) in &groups {
            let group: Vec<&Charge> = idx.iter().map(|&i| &charges[i]).collect();
            let answer = self.charge_group(&mut conn, generation, &group).await?;
            for (pos, (&i, &(used, fits))) in idx.iter().zip(&answer.per).enumerate() {
                let c = &charges[i];
                let counted = answer.applied || c.mode == ChargeMode::Always;
                usage[i] = Some(Usage {
                    fits,
                    used: if counted {
                        used.saturating_add(c.cost)
                    } else {
                        used
                    },
                    reset: c.unit.reset_after(answer.now),
                    window: answer.windows.get(pos).copied().unwrap_or(0),
                });
            }
            if answer.applied {
                applied_groups.push((idx.clone(), answer.windows));
            } else {
                all_applied = false;
                break;
            }
        }
        if !all_applied {
            for (idx, windows) in &applied_groups {
                let group: Vec<&Charge> = idx.iter().map(|&i| &charges[i]).collect();
                self.refund_group(&mut conn, generation, &group, windows)
                    .await;
                // Refunded: report the counts as they stand again.
                for &i in idx {
                    let c = &charges[i];
                    if let Some(u) = usage[i]
                        .as_mut()
                        .filter(|_| c.mode == ChargeMode::Admission)
                    {
                        u.used = u.used.saturating_sub(c.cost);
                    }
                }
            }
        }
        Ok(ChargeResult {
            applied: all_applied,
            usage,
        })
    }

    async fn reset(&self, key: &CounterKey) -> Result<(), StoreError> {
        let (mut conn, generation) = self.conn()?;
        let now = self.clocks.redis_now_ms();
        let base = key.redis_base(&self.prefix);
        let nonce = self.next_nonce();
        let mut inv = self.reset.prepare_invoke();
        inv.arg(&nonce);
        // Every window that can hold a count now, for every unit, with one
        // either side of the estimate in case the clocks disagree slightly.
        for unit in Unit::ALL {
            let w = unit.window_of(now);
            for window in [w.saturating_sub(1), w, w + 1] {
                inv.key(format!("{base}:{window}"));
            }
        }
        self.call(&mut conn, generation, &inv, &nonce)
            .await
            .map(|_| ())
    }

    fn kind(&self) -> &'static str {
        self.kind
    }

    fn connected(&self) -> bool {
        RedisStore::connected(self)
    }

    fn clock_offset_ms(&self) -> Option<i64> {
        self.clocks.known()
    }

    async fn put_record(
        &self,
        name: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.record_op(name, "put", record, ttl)
            .await
            .map(|r| r.is_some())
    }

    async fn get_record(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.record_op(name, "get", "", Duration::from_millis(1))
            .await
    }

    async fn reserve(&self, reservation: &Reservation) -> Result<Reserved, StoreError> {
        self.reserve_now(reservation).await
    }

    async fn settle(&self, request_id: &str, how: &SettleHow) -> Result<SettleReport, StoreError> {
        self.settle_now(request_id, how).await
    }

    async fn sweep(&self, max: usize) -> Result<u64, StoreError> {
        self.sweep_now(max).await
    }

    async fn in_flight(&self, key: &CounterKey) -> Result<u64, StoreError> {
        self.in_flight_now(key).await
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
