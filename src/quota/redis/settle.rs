//! Reserve and settle on Redis: one script each (per hash slot group on
//! Cluster), and the expiry index they sweep (see [`crate::quota::reserve`]).
//!
//! Keys of a group share the group's hash tag (`<prefix>{<tag>}`, the
//! *base*): the reservation `<base>:resv:<sha256(request id)>`, its settled
//! marker `<base>:done:<…>`, the expiry index `<base>:expiring` (a sorted
//! set of request hashes by TTL deadline), and the concurrency counters
//! `<counter>:inflight`. On standalone Redis every reservation uses one base
//! (`<prefix>{tollgate}`), so one index covers them all. The scripts reach
//! the swept reservations' counters without declaring them in `KEYS`: they
//! are in the same slot (Redis Cluster only refuses keys of another slot).
//!
//! On Cluster, a settlement must know the groups a request reserved in: the
//! replica that reserved remembers them; any other reads the request's
//! group list (a record, `<prefix>{r:…}:rec:<…>`, kept for the TTL and
//! written at reserve in parallel with the group scripts) — one more round
//! trip there.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::{Script, Value};

use super::{Conn, MAX_COUNT, RedisStore};
use crate::quota::reserve::{
    Charged, Fate, SettleHow, SettleReport, Settled, StoredEntry, StoredPart, StoredSlot,
    measure_code, measure_of, price_array,
};
use crate::quota::{Charge, ChargeMode, CounterKey, Reservation, Reserved, StoreError, Usage};

/// Lua shared by the reserve, settle, sweep and in-flight scripts.
macro_rules! settle_lua {
    () => {
        r"
local function amount(c, input, output, cached, p, reserved)
  if c == 1 then return input + output end
  if c == 2 then return input end
  if c == 3 then return output end
  if c == 4 then
    if #p == 0 then return reserved end
    local inp, outp = p[1], p[2]
    if p[4] >= 0 and input > p[4] then
      if p[5] >= 0 then inp = p[5] end
      if p[6] >= 0 then outp = p[6] end
    end
    local cp = inp
    if p[3] >= 0 then cp = p[3] end
    local ca = math.min(cached, input)
    -- The same operations, in the same order, as Price::cost_micros.
    local micros = (input - ca) * inp + ca * cp + output * outp
    if micros > 0 and micros < math.huge then return math.ceil(micros) end
    return 0
  end
  return reserved
end
-- how: 0 by usage, 1 release, 2 keep, 3 TTL fate (per entry).
-- Returns nil when no reservation is kept, else {input, model, tenant, tier,
-- rule, code,
-- amount, ..., '|', slot rule, ...}.
local function settle_part(pkey, how, input, output, cached)
  local raw = redis.call('GET', pkey)
  if not raw then return nil end
  local part = cjson.decode(raw)
  if input < 0 then input = part.i end
  if input < 0 then input = 0 end
  local out = {input, part.m, part.t or '', part.g or ''}
  for _, e in ipairs(part.e) do
    local actual
    if how == 1 then actual = 0
    elseif how == 2 then actual = e.a
    elseif how == 3 then
      if e.f == 1 then actual = 0 else actual = e.a end
    else actual = amount(e.c, input, output, cached, part.p, e.a) end
    local d = actual - e.a
    if d ~= 0 then
      -- An expired window is left alone: no key without its expiry.
      local v = redis.call('GET', e.k)
      if v then
        local n = tonumber(v) + d
        if n < 0 then n = 0 end
        redis.call('SET', e.k, string.format('%d', n), 'KEEPTTL')
      end
    end
    out[#out + 1] = e.r
    out[#out + 1] = e.c
    out[#out + 1] = actual
  end
  out[#out + 1] = '|'
  for _, s in ipairs(part.s) do
    if tonumber(redis.call('GET', s.k) or '0') > 0 then redis.call('DECR', s.k) end
    out[#out + 1] = s.r
  end
  redis.call('DEL', pkey)
  return out
end
-- Applies the TTL fate of at most `limit` due reservations of `base`.
local function sweep(base, now, limit)
  local x = base .. ':expiring'
  local due = redis.call('ZRANGEBYSCORE', x, '-inf', now, 'LIMIT', 0, limit)
  for _, h in ipairs(due) do
    settle_part(base .. ':resv:' .. h, 3, -1, 0, 0)
    redis.call('ZREM', x, h)
    redis.call('SET', base .. ':done:' .. h, '1', 'PX', 60000)
  end
  return #due
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"
    };
}

/// Reserve: the charge script's check and apply, plus slots, the kept
/// reservation and its index entry, after a bounded sweep.
pub const RESERVE_LUA: &str = concat!(
    settle_lua!(),
    r"
-- KEYS: reservation, marker, index, then two per charge (current and
--   previous window), then one per slot.
-- ARGV: nonce, base, request hash, reservation JSON ('' keeps none), ttl ms,
--   slot key ttl ms, charge count, sweep limit, then 9 per charge (as the
--   charge script), then 2 per slot (limit, shadow).
-- Returns {nonce, status, now, used, fits per charge, then per slot}:
--   status 1 applied, 0 refused, -1 stale window (nothing done), -2 the
--   request id is already reserved or settled (nothing done).
local nc = tonumber(ARGV[7])
local ns = #KEYS - 3 - 2 * nc
for i = 1, nc do
  local a = 8 + (i - 1) * 9
  if now < tonumber(ARGV[a + 3]) or now >= tonumber(ARGV[a + 4]) then
    return {ARGV[1], -1, now}
  end
end
sweep(ARGV[2], now, tonumber(ARGV[8]))
if ARGV[4] ~= '' and (redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1) then
  return {ARGV[1], -2, now}
end
local used, fits, pending = {}, {}, {}
local ok = true
for i = 1, nc do
  local a = 8 + (i - 1) * 9
  local limit, start, stop = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local algo, cost = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local shadow, always = tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  local cur_key = KEYS[3 + 2 * i - 1]
  local u = tonumber(redis.call('GET', cur_key) or '0') + (pending[cur_key] or 0)
  if algo == 1 then
    local prev = tonumber(redis.call('GET', KEYS[3 + 2 * i]) or '0')
    local len = stop - start
    u = math.ceil(prev * (len - (now - start)) / len) + u
  end
  local f
  if cost == 0 then f = u < limit else f = (u + cost) <= limit end
  if (not f) and shadow == 0 and always == 0 then ok = false end
  pending[cur_key] = (pending[cur_key] or 0) + cost
  used[i] = u
  fits[i] = f and 1 or 0
end
local s0 = 8 + 9 * nc
for j = 1, ns do
  local u = tonumber(redis.call('GET', KEYS[3 + 2 * nc + j]) or '0')
  local f = (u + 1) <= tonumber(ARGV[s0 + 2 * j - 1])
  if (not f) and tonumber(ARGV[s0 + 2 * j]) == 0 then ok = false end
  used[nc + j] = u
  fits[nc + j] = f and 1 or 0
end
local out = {ARGV[1], ok and 1 or 0, now}
for i = 1, nc do
  local a = 8 + (i - 1) * 9
  local algo, cost, always = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7]), tonumber(ARGV[a + 9])
  if cost > 0 and (ok or always == 1) then
    local after = redis.call('INCRBY', KEYS[3 + 2 * i - 1], cost)
    if algo == 1 or after == cost then
      redis.call('PEXPIREAT', KEYS[3 + 2 * i - 1], tonumber(ARGV[a + 5]))
    end
  end
end
if ok then
  for j = 1, ns do
    -- Refreshed on every reservation: when it expires, every reservation
    -- holding one of its slots is past its TTL, so no slot stays taken.
    redis.call('INCR', KEYS[3 + 2 * nc + j])
    redis.call('PEXPIRE', KEYS[3 + 2 * nc + j], ARGV[6])
  end
  if ARGV[4] ~= '' then
    local ttl = tonumber(ARGV[5])
    redis.call('SET', KEYS[1], ARGV[4], 'PX', ttl + 86400000)
    redis.call('ZADD', KEYS[3], now + ttl, ARGV[3])
    -- Every entry's deadline is before this: the index outlives them all.
    redis.call('PEXPIRE', KEYS[3], ttl + 86400000)
  end
end
for i = 1, nc + ns do
  out[#out + 1] = used[i]
  out[#out + 1] = fits[i]
end
return out
"
);

/// Settle: replaces the reservation, releases its slots and marks the
/// request settled, in one step.
pub const SETTLE_LUA: &str = concat!(
    settle_lua!(),
    r"
-- KEYS: reservation, marker, index. ARGV: nonce, base, request hash, how
--   (0 usage, 1 release, 2 keep), input (-1: the estimate), output, cached,
--   marker ttl ms, sweep limit.
-- Returns {nonce, 1, input, model, tenant, tier, rule, code, amount, ..., '|', slot rule,
--   ...} when settled now, {nonce, 0} when settled before (or by its TTL),
--   {nonce, -1} when no reservation is kept.
sweep(ARGV[2], now, tonumber(ARGV[9]))
if redis.call('EXISTS', KEYS[2]) == 1 then return {ARGV[1], 0} end
local r = settle_part(KEYS[1], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]))
if not r then return {ARGV[1], -1} end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[8])
local out = {ARGV[1], 1}
for _, v in ipairs(r) do out[#out + 1] = v end
return out
"
);

/// The bounded background sweep of one base, or (with a slot key) the
/// requests in flight on it after sweeping.
pub const SWEEP_LUA: &str = concat!(
    settle_lua!(),
    r"
-- KEYS[1]: index; KEYS[2] (optional): a concurrency counter.
-- ARGV: nonce, base, limit. Returns {nonce, swept, in flight}.
local n = sweep(ARGV[2], now, tonumber(ARGV[3]))
local f = 0
if KEYS[2] then f = tonumber(redis.call('GET', KEYS[2]) or '0') end
return {ARGV[1], n, f}
"
);

/// Reservations the background sweep handles per base and tick, at most.
const SWEEP_BATCH: u64 = 16;

/// How long a settled marker outlives the reservation's TTL (and the slot
/// counter its last reservation).
const MARKER_GRACE_MS: u64 = 60_000;

/// How long the marker of a settlement is kept.
const SETTLED_MARKER_MS: u64 = 3_600_000;

/// What the store remembers between reserve and settle on this replica.
#[derive(Default)]
pub(super) struct Groups {
    /// Request id → the bases it reserved in (Cluster), bounded.
    by_request: Mutex<HashMap<String, (Vec<String>, u64)>>,
    /// Bases with reservations seen recently, for the background sweep
    /// (bounded).
    bases: Mutex<HashMap<String, u64>>,
}

/// Entries kept in each [`Groups`] map, at most.
const GROUPS_MAX: usize = 100_000;

fn remember<V>(
    map: &Mutex<HashMap<String, V>>,
    key: String,
    value: V,
    now: u64,
    exp: fn(&V) -> u64,
) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    if m.len() >= GROUPS_MAX {
        m.retain(|_, v| exp(v) > now);
        if m.len() >= GROUPS_MAX {
            return;
        }
    }
    m.insert(key, value);
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn unexpected() -> StoreError {
    StoreError::Backend("unexpected settle script reply".into())
}

/// One slot group of a reservation: indexes into the charges and slots.
struct Group {
    base: String,
    charges: Vec<usize>,
    slots: Vec<usize>,
}

impl RedisStore {
    /// `<prefix>{<tag>}` of a counter, or the one standalone base.
    fn base_of(&self, key: &CounterKey, single: bool) -> String {
        if single {
            return format!("{}{{tollgate}}", self.prefix);
        }
        let b = key.redis_base(&self.prefix);
        b[..b.find('}').map_or(b.len(), |i| i + 1)].to_string()
    }

    fn groups_key(&self, request_id: &str) -> String {
        format!("resv-groups:{request_id}")
    }

    fn slot_key(&self, key: &CounterKey) -> String {
        format!("{}:inflight", key.redis_base(&self.prefix))
    }

    fn part_of(&self, r: &Reservation, g: &Group, windows: &[u64]) -> Option<String> {
        let mut e = Vec::new();
        for (pos, &i) in g.charges.iter().enumerate() {
            let (c, Some(b)) = (&r.charges[i], &r.budgets[i]) else {
                continue;
            };
            e.push(StoredEntry {
                k: self.window_key(c, windows.get(pos).copied().unwrap_or(0)),
                a: c.cost.min(MAX_COUNT),
                c: measure_code(b.measure),
                f: u8::from(b.on_expiry == Fate::Release),
                r: b.rule.clone(),
            });
        }
        let s: Vec<StoredSlot> = g
            .slots
            .iter()
            .map(|&j| StoredSlot {
                k: self.slot_key(&r.slots[j].key),
                r: r.slots[j].rule.clone(),
            })
            .collect();
        if e.is_empty() && s.is_empty() {
            return None;
        }
        let part = StoredPart {
            m: r.model.clone().unwrap_or_default(),
            t: r.labels.tenant.clone().unwrap_or_default(),
            g: r.labels.tier.clone().unwrap_or_default(),
            i: r.input_estimate
                .and_then(|i| i64::try_from(i).ok())
                .unwrap_or(-1),
            p: price_array(r.price.as_ref()),
            e,
            s,
        };
        serde_json::to_string(&part).ok()
    }

    /// Reserves one group: `Ok((status, now, per-item (used, fits),
    /// windows))`.
    async fn reserve_group(
        &self,
        conn: &mut Conn,
        generation: u64,
        r: &Reservation,
        g: &Group,
        hash: &str,
    ) -> Result<(i64, u64, Vec<(u64, bool)>, Vec<u64>), StoreError> {
        for _ in 0..3 {
            let now = self.clocks.redis_now_ms();
            let windows: Vec<u64> = g
                .charges
                .iter()
                .map(|&i| r.charges[i].unit.window_of(now))
                .collect();
            let part = self.part_of(r, g, &windows).unwrap_or_default();
            let nonce = self.next_nonce();
            let mut inv = self.reserve.prepare_invoke();
            inv.key(format!("{}:resv:{hash}", g.base))
                .key(format!("{}:done:{hash}", g.base))
                .key(format!("{}:expiring", g.base))
                .arg(&nonce)
                .arg(&g.base)
                .arg(hash)
                .arg(&part)
                .arg(ms(r.ttl))
                .arg(ms(r.ttl).saturating_add(MARKER_GRACE_MS))
                .arg(g.charges.len())
                .arg(SWEEP_BATCH);
            for (&i, &w) in g.charges.iter().zip(&windows) {
                self.charge_args(&mut inv, &r.charges[i], w);
            }
            for &j in &g.slots {
                let s = &r.slots[j];
                inv.key(self.slot_key(&s.key))
                    .arg(s.limit.min(MAX_COUNT))
                    .arg(u8::from(s.shadow));
            }
            let out = self.call(conn, generation, &inv, &nonce).await?;
            let (Some(status), Some(server_now)) = (int(out.first()), int(out.get(1))) else {
                return Err(unexpected());
            };
            let server_now = u64::try_from(server_now).unwrap_or(0);
            self.clocks.observe(server_now);
            if status == -1 {
                continue;
            }
            let per: Vec<(u64, bool)> = out[2..]
                .chunks(2)
                .map(|p| {
                    (
                        u64::try_from(int(p.first()).unwrap_or(0)).unwrap_or(0),
                        int(p.get(1)) == Some(1),
                    )
                })
                .collect();
            if status != -2 && per.len() != g.charges.len() + g.slots.len() {
                return Err(unexpected());
            }
            return Ok((status, server_now, per, windows));
        }
        Err(StoreError::Backend(
            "redis clock kept crossing window boundaries; try again".into(),
        ))
    }

    /// Settles the reservation of one base.
    async fn settle_base(
        &self,
        conn: &mut Conn,
        generation: u64,
        base: &str,
        hash: &str,
        how: &SettleHow,
        marker_ms: u64,
    ) -> Result<SettleReport, StoreError> {
        let (code, input, output, cached) = match *how {
            SettleHow::Usage {
                input,
                output,
                cached,
            } => (
                0,
                input.map_or(-1, |i| i64::try_from(i.min(MAX_COUNT)).unwrap_or(-1)),
                output.min(MAX_COUNT),
                cached.min(MAX_COUNT),
            ),
            SettleHow::Release => (1, -1, 0, 0),
            SettleHow::Keep => (2, -1, 0, 0),
        };
        let nonce = self.next_nonce();
        let mut inv = self.settle.prepare_invoke();
        inv.key(format!("{base}:resv:{hash}"))
            .key(format!("{base}:done:{hash}"))
            .key(format!("{base}:expiring"))
            .arg(&nonce)
            .arg(base)
            .arg(hash)
            .arg(code)
            .arg(input)
            .arg(output)
            .arg(cached)
            .arg(marker_ms)
            .arg(SWEEP_BATCH);
        let out = self.call(conn, generation, &inv, &nonce).await?;
        match int(out.first()) {
            Some(0) => return Ok(SettleReport::nothing(Settled::Already)),
            Some(-1) => return Ok(SettleReport::nothing(Settled::Unknown)),
            Some(1) => {}
            _ => return Err(unexpected()),
        }
        let input = u64::try_from(int(out.get(1)).ok_or_else(unexpected)?).unwrap_or(0);
        let model = text(out.get(2)).filter(|m| !m.is_empty());
        let labels = crate::quota::reserve::UsageLabels {
            tenant: text(out.get(3)).filter(|t| !t.is_empty()),
            tier: text(out.get(4)).filter(|t| !t.is_empty()),
        };
        let mut charged = Vec::new();
        let mut released = Vec::new();
        let mut rest = out.get(5..).unwrap_or_default().iter();
        while let Some(v) = rest.next() {
            let rule = text(Some(v)).ok_or_else(unexpected)?;
            if rule == "|" {
                released.extend(rest.by_ref().filter_map(|v| text(Some(v))));
                break;
            }
            let code = int(rest.next()).ok_or_else(unexpected)?;
            let amount = int(rest.next()).ok_or_else(unexpected)?;
            charged.push(Charged {
                rule,
                measure: measure_of(u64::try_from(code).unwrap_or(0)),
                amount: u64::try_from(amount).unwrap_or(0),
            });
        }
        let (output, cached) = match *how {
            SettleHow::Usage { output, cached, .. } => (output, cached),
            _ => (0, 0),
        };
        Ok(SettleReport {
            settled: Settled::Now,
            model,
            labels,
            charged,
            released,
            usage: crate::usage::TokenUsage {
                input,
                output,
                cached_input: cached,
            },
        })
    }

    pub(super) async fn reserve_now(&self, r: &Reservation) -> Result<Reserved, StoreError> {
        let (mut conn, generation) = self.conn()?;
        let single = matches!(conn, Conn::Single(_));
        let hash = Self::request_hash(&r.request_id);
        let mut groups: Vec<Group> = Vec::new();
        let mut group_of = |base: String| -> usize {
            match groups.iter().position(|g| g.base == base) {
                Some(i) => i,
                None => {
                    groups.push(Group {
                        base,
                        charges: Vec::new(),
                        slots: Vec::new(),
                    });
                    groups.len() - 1
                }
            }
        };
        let mut placed: Vec<(usize, bool, usize)> = Vec::new();
        for (i, c) in r.charges.iter().enumerate() {
            placed.push((group_of(self.base_of(&c.key, single)), true, i));
        }
        for (j, s) in r.slots.iter().enumerate() {
            placed.push((group_of(self.base_of(&s.key, single)), false, j));
        }
        for (g, is_charge, i) in placed {
            if is_charge {
                groups[g].charges.push(i);
            } else {
                groups[g].slots.push(i);
            }
        }
        let now = self.clocks.redis_now_ms();
        let keep_until = now
            .saturating_add(ms(r.ttl))
            .saturating_add(MARKER_GRACE_MS);
        let kept = r.kept();
        // On Cluster a settlement on another replica needs the groups:
        // written beside the first group's script, not after it.
        let pointer = async {
            if single || !kept {
                return Ok(true);
            }
            let bases: Vec<&str> = groups.iter().map(|g| g.base.as_str()).collect();
            let text = bases.join("\n");
            // Merged, never kept as it was: an earlier attempt of the same
            // request id (refused, then retried) may have written it with a
            // TTL that ends before this reservation's. It outlives the
            // reservation by the marker grace, so that a late settlement on
            // any replica reaches the base whose sweep settles it by its
            // fate and answers "already settled", as the reserving replica
            // would.
            let ttl = r.ttl + Duration::from_millis(MARKER_GRACE_MS);
            self.record_op(&self.groups_key(&r.request_id), "merge", &text, ttl)
                .await
                .map(|v| v.is_some())
        };
        let reserve = async {
            let n = r.charges.len() + r.slots.len();
            let mut usage: Vec<Option<Usage>> = vec![None; n];
            let mut applied: Vec<(usize, Vec<u64>)> = Vec::new();
            let mut ok = true;
            let mut duplicate = false;
            for (gi, g) in groups.iter().enumerate() {
                let (status, server_now, per, windows) = self
                    .reserve_group(&mut conn, generation, r, g, &hash)
                    .await?;
                if status == -2 {
                    duplicate = true;
                    ok = false;
                    break;
                }
                let items = g
                    .charges
                    .iter()
                    .map(|&i| (i, Some(&r.charges[i])))
                    .chain(g.slots.iter().map(|&j| (r.charges.len() + j, None)));
                for (pos, ((slot, charge), &(used, fits))) in items.zip(&per).enumerate() {
                    let (cost, reset, counted) = match charge {
                        Some(c) => (
                            c.cost,
                            c.unit.reset_after(server_now),
                            status == 1 || c.mode == ChargeMode::Always,
                        ),
                        None => (1, crate::quota::memory::SLOT_RETRY, status == 1),
                    };
                    usage[slot] = Some(Usage {
                        fits,
                        used: if counted {
                            used.saturating_add(cost)
                        } else {
                            used
                        },
                        reset,
                        window: windows.get(pos).copied().unwrap_or(0),
                    });
                }
                if status == 1 {
                    applied.push((gi, windows));
                } else {
                    ok = false;
                    break;
                }
            }
            if !ok {
                // An earlier group took its charges: give them back.
                for (gi, windows) in &applied {
                    self.undo_group(&mut conn, generation, r, &groups[*gi], windows, &hash)
                        .await;
                    for &i in &groups[*gi].charges {
                        if let Some(u) = usage[i]
                            .as_mut()
                            .filter(|_| r.charges[i].mode == ChargeMode::Admission)
                        {
                            u.used = u.used.saturating_sub(r.charges[i].cost);
                        }
                    }
                }
            }
            Ok::<_, StoreError>(Reserved {
                applied: ok,
                duplicate,
                usage,
            })
        };
        let (reserved, pointer) = tokio::join!(reserve, pointer);
        let reserved = reserved?;
        if reserved.applied && kept {
            if let Err(e) = pointer {
                tracing::warn!(error = %e, "reservation groups could not be recorded; another replica cannot settle it before its TTL");
            }
            let bases: Vec<String> = groups.iter().map(|g| g.base.clone()).collect();
            for b in &bases {
                remember(&self.groups.bases, b.clone(), keep_until, now, |v| *v);
            }
            remember(
                &self.groups.by_request,
                r.request_id.clone(),
                (bases, keep_until),
                now,
                |v| v.1,
            );
        }
        Ok(reserved)
    }

    /// Gives back one applied group of a reservation a later group refused.
    async fn undo_group(
        &self,
        conn: &mut Conn,
        generation: u64,
        r: &Reservation,
        g: &Group,
        windows: &[u64],
        hash: &str,
    ) {
        // Request counts by refund; budgets and slots by releasing the kept
        // reservation (which refunds them).
        let (counts, counts_w): (Vec<&Charge>, Vec<u64>) = g
            .charges
            .iter()
            .zip(windows)
            .filter(|&(&i, _)| r.budgets[i].is_none())
            .map(|(&i, &w)| (&r.charges[i], w))
            .unzip();
        if !counts.is_empty() {
            self.refund_group(conn, generation, &counts, &counts_w)
                .await;
        }
        if self.part_of(r, g, windows).is_some()
            && let Err(e) = self
                .settle_base(conn, generation, &g.base, hash, &SettleHow::Release, 1000)
                .await
        {
            tracing::error!(error = %e, "could not release a cross-slot reservation; its TTL fate will");
        }
    }

    pub(super) async fn settle_now(
        &self,
        request_id: &str,
        how: &SettleHow,
    ) -> Result<SettleReport, StoreError> {
        let (mut conn, generation) = self.conn()?;
        let single = matches!(conn, Conn::Single(_));
        let hash = Self::request_hash(request_id);
        let bases: Vec<String> = if single {
            vec![format!("{}{{tollgate}}", self.prefix)]
        } else {
            let known = self
                .groups
                .by_request
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(request_id)
                .map(|(b, _)| b.clone());
            match known {
                Some(b) => b,
                None => match self
                    .record_op(
                        &self.groups_key(request_id),
                        "get",
                        "",
                        Duration::from_millis(1),
                    )
                    .await?
                {
                    Some(text) => text.lines().map(str::to_string).collect(),
                    None => return Ok(SettleReport::nothing(Settled::Unknown)),
                },
            }
        };
        // A report retried within the hour finds the request settled.
        let marker_ms = SETTLED_MARKER_MS;
        let mut report = SettleReport::nothing(Settled::Unknown);
        for base in &bases {
            let one = self
                .settle_base(&mut conn, generation, base, &hash, how, marker_ms)
                .await?;
            match (report.settled, one.settled) {
                (_, Settled::Now) => {
                    report.settled = Settled::Now;
                    report.model = one.model.or(report.model.take());
                    if one.labels != crate::quota::reserve::UsageLabels::default() {
                        report.labels = one.labels;
                    }
                    report.charged.extend(one.charged);
                    report.released.extend(one.released);
                    report.usage = one.usage;
                }
                (Settled::Unknown, Settled::Already) => report.settled = Settled::Already,
                _ => {}
            }
        }
        self.groups
            .by_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(request_id);
        Ok(report)
    }

    /// The bounded background sweep: the standalone base, or each base this
    /// replica reserved in recently (Cluster).
    pub(super) async fn sweep_now(&self, max: usize) -> Result<u64, StoreError> {
        let (mut conn, generation) = self.conn()?;
        let bases: Vec<String> = if matches!(conn, Conn::Single(_)) {
            vec![format!("{}{{tollgate}}", self.prefix)]
        } else {
            let now = self.clocks.redis_now_ms();
            let mut m = self.groups.bases.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|_, until| *until > now);
            m.keys().cloned().collect()
        };
        let mut swept = 0;
        for base in bases {
            let (n, _) = self
                .sweep_base(&mut conn, generation, &base, None, max)
                .await?;
            swept += n;
        }
        Ok(swept)
    }

    async fn sweep_base(
        &self,
        conn: &mut Conn,
        generation: u64,
        base: &str,
        slot: Option<String>,
        max: usize,
    ) -> Result<(u64, u64), StoreError> {
        let nonce = self.next_nonce();
        let mut inv = self.sweep.prepare_invoke();
        inv.key(format!("{base}:expiring"));
        if let Some(s) = slot {
            inv.key(s);
        }
        inv.arg(&nonce).arg(base).arg(max);
        let out = self.call(conn, generation, &inv, &nonce).await?;
        let n = int(out.first()).ok_or_else(unexpected)?;
        let f = int(out.get(1)).ok_or_else(unexpected)?;
        Ok((u64::try_from(n).unwrap_or(0), u64::try_from(f).unwrap_or(0)))
    }

    pub(super) async fn in_flight_now(&self, key: &CounterKey) -> Result<u64, StoreError> {
        let (mut conn, generation) = self.conn()?;
        let single = matches!(conn, Conn::Single(_));
        let base = self.base_of(key, single);
        let slot = self.slot_key(key);
        self.sweep_base(&mut conn, generation, &base, Some(slot), 1000)
            .await
            .map(|(_, f)| f)
    }
}

/// The scripts this module adds, for loading on connect.
pub(super) fn scripts() -> [Script; 3] {
    [
        Script::new(RESERVE_LUA),
        Script::new(SETTLE_LUA),
        Script::new(SWEEP_LUA),
    ]
}
