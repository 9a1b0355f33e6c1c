//! The audit trail's queue, writer thread and sinks.
//!
//! [`AuditTrail::submit`] never blocks and never fails a decision: it puts
//! the record on a bounded queue (`audit.queue` records) and, when the queue
//! is full because the sink is slower than the traffic, drops the record and
//! counts it (`tollgate_audit_records_total{result="dropped"}`). One writer
//! thread chains and writes the records; [`AuditTrail::close`] drains the
//! queue and flushes (on shutdown).
//!
//! Chaining: each line is the record with `seq` (position in the chain,
//! from 0), `prev` (the previous line's `hash`; [`GENESIS`] for `seq` 0) and
//! `hash` (lowercase hex SHA-256 of the line as written up to `hash`, with
//! the object closed: `{...,"prev":"…"}`), always the last key. The chain
//! runs across rotated files: the first line of a new file links to the
//! last line of the one rotated away, and a restart continues from the last
//! line of the existing file.
//!
//! A file the writer closes — rotated away, or at shutdown — ends with a
//! seal ([`super::seal`]): the chain head and the number of records since
//! the previous seal, signed when `audit.signing_key` is set.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, RwLock};
use std::thread::JoinHandle;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::record::AuditRecord;
use super::seal::{SEAL_PREFIX, SEAL_ROOM, Seal, SealKey};
use super::verify::GENESIS;

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditSink {
    /// `audit.path`, rotated at `audit.max_bytes`.
    File,
    /// Standard output, one line per record.
    Stdout,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Off by default.
    pub enabled: bool,
    pub sink: AuditSink,
    /// The file sink's file; rotated files are `PATH.1`, `PATH.2`, … (oldest
    /// first). Relative to the config file's directory.
    pub path: PathBuf,
    /// Rotate before a line would make the file larger than this (bytes).
    pub max_bytes: u64,
    /// Records held for the writer; beyond that they are dropped and counted.
    pub queue: usize,
    /// Also rotate when a wall-clock period of this many seconds ends
    /// (aligned to the Unix epoch: 86400 rotates at midnight UTC); 0 = size
    /// only.
    pub rotate_secs: u64,
    /// Ed25519 private key (PKCS#8 PEM, `openssl genpkey -algorithm
    /// ed25519`) that signs the seal written when a file is closed; unset:
    /// seals are hashed, not signed. Relative to the config file's
    /// directory. Keep it readable by Tollgate only.
    pub signing_key: Option<PathBuf>,
    /// A file holding a secret of at least 32 bytes (`openssl rand -base64
    /// 48 > audit-hash.key`; its bytes as they are) that keys the tool
    /// argument hashes of MCP records: HMAC-SHA256 (RFC 2104) instead of
    /// plain SHA-256, so that whoever reads the trail cannot find a
    /// low-entropy value (an amount, a name) by hashing guesses. Unset:
    /// plain SHA-256. Relative to the config file's directory. Keep it
    /// readable by Tollgate only.
    pub hash_key: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            sink: AuditSink::File,
            path: PathBuf::from("audit/tollgate-audit.jsonl"),
            max_bytes: 64 * 1024 * 1024,
            queue: 10_000,
            rotate_secs: 0,
            signing_key: None,
            hash_key: None,
        }
    }
}

/// Why the audit trail cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "audit.path {path}: cannot open for appending: {source}; fix the path or its permissions"
    )]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit.queue must be at least 1 and audit.max_bytes at least 4096")]
    Bounds,
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
    #[error("audit.signing_key {0}")]
    Key(#[from] super::seal::KeyError),
    #[error(
        "audit.hash_key {path}: {reason}; write at least 32 random bytes to it (openssl rand -base64 48)"
    )]
    HashKey { path: PathBuf, reason: String },
}

/// Counters the trail keeps (also exported as metrics).
#[derive(Debug, Default)]
struct Counts {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    /// The last write failed (cleared by the next good one).
    failing: std::sync::atomic::AtomicBool,
}

/// A running audit trail.
pub struct AuditTrail {
    sender: RwLock<Option<SyncSender<AuditRecord>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    counts: std::sync::Arc<Counts>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// The secret of keyed argument hashes (`audit.hash_key`).
    hash_key: Option<Vec<u8>>,
}

/// Secrets shorter than this are refused (RFC 2104 §3: no shorter than the
/// hash's output).
const MIN_HASH_KEY_BYTES: usize = 32;

impl AuditTrail {
    /// The secret that keys tool argument hashes, when `audit.hash_key` is
    /// set ([`crate::mcp::argument_hashes`]).
    pub fn hash_key(&self) -> Option<&[u8]> {
        self.hash_key.as_deref()
    }

    /// Opens the sink (so an unwritable path refuses start-up), reads the
    /// signing key (`config.signing_key`, already resolved) and starts the
    /// writer thread.
    pub fn start(
        config: &AuditConfig,
        path: &Path,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Result<Self, AuditError> {
        if config.queue == 0 || config.max_bytes < 4096 {
            return Err(AuditError::Bounds);
        }
        let key = config
            .signing_key
            .as_deref()
            .map(SealKey::load)
            .transpose()?;
        let hash_key = config
            .hash_key
            .as_deref()
            .map(|path| {
                let bytes = std::fs::read(path).map_err(|e| AuditError::HashKey {
                    path: path.to_path_buf(),
                    reason: format!("cannot read: {e}"),
                })?;
                if bytes.len() < MIN_HASH_KEY_BYTES {
                    return Err(AuditError::HashKey {
                        path: path.to_path_buf(),
                        reason: format!(
                            "holds {} bytes, fewer than {MIN_HASH_KEY_BYTES}",
                            bytes.len()
                        ),
                    });
                }
                Ok(bytes)
            })
            .transpose()?;
        let sink = match config.sink {
            AuditSink::Stdout => Sink::Stdout,
            AuditSink::File => Sink::open(path, config.max_bytes, config.rotate_secs, key)?,
        };
        let (sender, receiver) = std::sync::mpsc::sync_channel(config.queue);
        let counts = std::sync::Arc::new(Counts::default());
        let writer = {
            let counts = counts.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("tollgate-audit".into())
                .spawn(move || write_loop(receiver, sink, &counts, metrics.as_deref()))
                .map_err(AuditError::Thread)?
        };
        Ok(Self {
            sender: RwLock::new(Some(sender)),
            writer: Mutex::new(Some(writer)),
            counts,
            metrics,
            hash_key,
        })
    }

    /// Queues a record; never blocks. A full queue drops it and counts it.
    pub fn submit(&self, record: AuditRecord) {
        let Ok(guard) = self.sender.read() else {
            return;
        };
        let Some(sender) = guard.as_ref() else {
            return;
        };
        match sender.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.audit_record("dropped");
                }
            }
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Records written to the sink.
    pub fn written(&self) -> u64 {
        self.counts.written.load(Ordering::Relaxed)
    }

    /// Records the sink failed to take (a write error).
    pub fn failed(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }

    /// Whether the last record the writer handled failed to be written (a
    /// full disk, a path removed after start-up); `/readyz` reports it.
    pub fn failing(&self) -> bool {
        self.counts.failing.load(Ordering::Relaxed)
    }

    /// Stops taking records, writes what is queued, flushes and waits for
    /// the writer. Blocking; idempotent.
    pub fn close(&self) {
        if let Ok(mut sender) = self.sender.write() {
            sender.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("audit writer thread panicked");
        }
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        self.close();
    }
}

/// The chain position the next line continues from.
struct Chain {
    seq: u64,
    prev: String,
}

impl Chain {
    fn genesis() -> Self {
        Self {
            seq: 0,
            prev: GENESIS.to_string(),
        }
    }
}

enum Sink {
    Stdout,
    File {
        path: PathBuf,
        out: BufWriter<File>,
        size: u64,
        max_bytes: u64,
        chain: Chain,
        /// `audit.rotate_secs` (0: off) and the period the file belongs to.
        rotate_secs: u64,
        period: u64,
        /// Records written since the last seal (0: the file ends sealed).
        unsealed: u64,
        key: Option<SealKey>,
    },
}

/// The wall-clock period of `rotate_secs` that `at` falls in (0 when off).
fn period_of(at: std::time::SystemTime, rotate_secs: u64) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .checked_div(rotate_secs)
        .unwrap_or(0)
}

impl Sink {
    fn open(
        path: &Path,
        max_bytes: u64,
        rotate_secs: u64,
        key: Option<SealKey>,
    ) -> Result<Self, AuditError> {
        let err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        // Write-only: holding a read end of a pipe would keep a stalled
        // writer from ever seeing the reader go away.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let chain = meta
            .is_file()
            .then(|| last_link(path))
            .flatten()
            .unwrap_or_else(Chain::genesis);
        let unsealed = if meta.is_file() {
            records_since_seal(path)
        } else {
            0
        };
        // A file left by an earlier run belongs to the period it was last
        // written in, so a restart after the period ended rotates it.
        let written = meta
            .modified()
            .unwrap_or_else(|_| std::time::SystemTime::now());
        Ok(Self::File {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            size: if meta.is_file() { meta.len() } else { 0 },
            max_bytes,
            chain,
            rotate_secs,
            period: period_of(written, rotate_secs),
            unsealed,
            key,
        })
    }
}

/// Records after the last seal of the file at `path` (what a restart after
/// a crash continues from). Streams the file: bounded by `max_bytes`.
fn records_since_seal(path: &Path) -> u64 {
    let Ok(file) = File::open(path) else {
        return 0;
    };
    std::io::BufRead::lines(std::io::BufReader::new(file))
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .fold(0, |n, l| if l.starts_with(SEAL_PREFIX) { 0 } else { n + 1 })
}

/// The chain position after the last line of the file at `path`, if it
/// is a record. Reads only the tail: records are far shorter than 1 MiB.
fn last_link(path: &Path) -> Option<Chain> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(1 << 20)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let (seq, hash) = super::verify::link_of(last)?;
    Some(Chain {
        seq: seq + 1,
        prev: hash,
    })
}

/// A record at its chain position, as serialized before `hash`.
#[derive(serde::Serialize)]
struct Linked<'a, T> {
    #[serde(flatten)]
    record: &'a T,
    seq: u64,
    prev: &'a str,
}

/// Serializes `record` at chain position `chain`: `(line, hash)`.
fn chained<T: serde::Serialize>(record: &T, chain: &Chain) -> Option<(String, String)> {
    let body = serde_json::to_string(&Linked {
        record,
        seq: chain.seq,
        prev: &chain.prev,
    })
    .ok()?;
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let open = body.strip_suffix('}')?;
    Some((format!("{open},\"hash\":\"{hash}\"}}"), hash))
}

fn write_loop(
    receiver: Receiver<AuditRecord>,
    mut sink: Sink,
    counts: &Counts,
    metrics: Option<&crate::metrics::Metrics>,
) {
    let mut stdout_chain = Chain::genesis();
    let note = |result: &'static str| {
        if let Some(m) = metrics {
            m.audit_record(result);
        }
    };
    // Blocks for the first record of a batch, then takes what is queued and
    // flushes once the queue is empty: one write per burst, and nothing left
    // in the buffer while idle.
    // A record counts as written once the flush after its burst succeeded:
    // a buffered line is not on disk yet (a full disk fails at the flush).
    let count = |n: u64, ok: bool| {
        let (counter, result) = if ok {
            (&counts.written, "written")
        } else {
            (&counts.failed, "failed")
        };
        counter.fetch_add(n, Ordering::Relaxed);
        for _ in 0..n {
            note(result);
        }
    };
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        let (mut buffered, mut failing) = (0, false);
        while let Some(record) = next.take() {
            let ok = match &mut sink {
                Sink::Stdout => write_stdout(&record, &mut stdout_chain),
                Sink::File { .. } => write_file(&mut sink, &record),
            };
            if ok {
                buffered += 1;
            } else {
                count(1, false);
            }
            failing = !ok;
            next = receiver.try_recv().ok();
        }
        let flushed = flush(&mut sink);
        count(buffered, flushed);
        counts.failing.store(failing || !flushed, Ordering::Relaxed);
    }
    if let Err(e) = seal(&mut sink, "shutdown") {
        tracing::warn!(error = %e, "audit file not sealed at shutdown");
    }
    if !flush(&mut sink) {
        counts.failing.store(true, Ordering::Relaxed);
    }
}

/// Ends the file with a seal of the chain head, when records follow the
/// last one.
fn seal(sink: &mut Sink, reason: &'static str) -> std::io::Result<()> {
    let Sink::File {
        out,
        size,
        chain,
        unsealed,
        key,
        ..
    } = sink
    else {
        return Ok(());
    };
    if *unsealed == 0 {
        return Ok(());
    }
    let seal = Seal::new(chain.seq, &chain.prev, *unsealed, reason, key.as_ref());
    let (line, hash) = chained(&seal, chain)
        .ok_or_else(|| std::io::Error::other("the seal could not be serialized"))?;
    writeln!(out, "{line}")?;
    *size += line.len() as u64 + 1;
    *unsealed = 0;
    chain.seq += 1;
    chain.prev = hash;
    Ok(())
}

/// Flushes the sink; false (and a warning) when it failed.
fn flush(sink: &mut Sink) -> bool {
    let result = match sink {
        Sink::Stdout => std::io::stdout().flush(),
        Sink::File { out, .. } => out.flush(),
    };
    if let Err(e) = &result {
        tracing::warn!(error = %e, "audit sink flush failed");
    }
    result.is_ok()
}

fn write_stdout(record: &AuditRecord, chain: &mut Chain) -> bool {
    let Some((line, hash)) = chained(record, chain) else {
        return false;
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").is_err() {
        return false;
    }
    chain.seq += 1;
    chain.prev = hash;
    true
}

fn write_file(sink: &mut Sink, record: &AuditRecord) -> bool {
    let Sink::File {
        size,
        max_bytes,
        chain,
        rotate_secs,
        period,
        ..
    } = sink
    else {
        return false;
    };
    // A record is far shorter than 1 MiB; its length decides rotation
    // before the seal moves the chain on.
    let Some((line, _)) = chained(record, chain) else {
        return false;
    };
    let len = line.len() as u64 + 1;
    let now = period_of(std::time::SystemTime::now(), *rotate_secs);
    let period_ended = std::mem::replace(period, now) != now;
    // Room is kept for the seal the rotation writes.
    if *size > 0 && (*size + len + SEAL_ROOM > *max_bytes || period_ended) {
        let rotated = seal(sink, "rotation").and_then(|()| match sink {
            Sink::File { path, out, .. } => rotate(path, out),
            Sink::Stdout => Ok(()),
        });
        match rotated {
            Ok(()) => {
                if let Sink::File { size, .. } = sink {
                    *size = 0;
                }
            }
            Err(e) => tracing::warn!(error = %e, "audit file rotation failed; still appending"),
        }
    }
    let Sink::File {
        out,
        size,
        chain,
        unsealed,
        ..
    } = sink
    else {
        return false;
    };
    let Some((line, hash)) = chained(record, chain) else {
        return false;
    };
    if let Err(e) = writeln!(out, "{line}") {
        tracing::warn!(error = %e, "audit record not written");
        return false;
    }
    *size += line.len() as u64 + 1;
    *unsealed += 1;
    chain.seq += 1;
    chain.prev = hash;
    true
}

/// Renames the current file to the next free `PATH.N` and opens a new one.
fn rotate(path: &Path, out: &mut BufWriter<File>) -> std::io::Result<()> {
    out.flush()?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let prefix = format!("{name}.");
    let highest = std::fs::read_dir(&dir)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(&prefix)?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    std::fs::rename(path, dir.join(format!("{prefix}{}", highest + 1)))?;
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    *out = BufWriter::new(file);
    Ok(())
}
