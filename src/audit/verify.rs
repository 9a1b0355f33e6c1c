//! `tollgate audit verify`: checks a hash chain and names the first bad
//! line.
//!
//! A line is good when its `hash` is the SHA-256 of the line up to `hash`
//! (an edited line fails here), its `prev` is the previous line's `hash`
//! and its `seq` the previous `seq` + 1 (a removed or reordered line fails
//! at the first line after the gap). Files are one chain in the order given
//! (rotated files oldest first: `PATH.1 PATH.2 … PATH`). The first line
//! checked links to [`GENESIS`] when its `seq` is 0; a later `seq` means the
//! chain continues from a file not given, which is reported, not refused.
//!
//! Seals ([`super::seal`]) are checked as they come: a seal's `records`
//! must be the number of records since the previous seal, and with a public
//! key ([`verify_with`]) every seal must carry a valid signature and every
//! file but the last must end with one (rotation always seals the file it
//! closes), so removing lines at the end of a rotated file, or rewriting and
//! re-hashing the chain, is detected.
//!
//! Removing lines at the very end of the last file cannot be seen from the
//! files alone: keep the chain head ([`VerifyReport::head`]) elsewhere, or
//! rely on the seal written at shutdown ([`VerifyReport::unsealed`] counts
//! the records after the last seal).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

use super::seal::ReadSeal;

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `,"hash":"` + 64 hex + `"}`.
const HASH_TAIL: usize = 9 + 64 + 2;

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records (seals not included).
    pub records: u64,
    pub files: usize,
    /// Seal lines checked, and how many of them had their signature checked
    /// against the public key.
    pub seals: u64,
    pub signed: u64,
    /// Records after the last seal (written since the last rotation or
    /// shutdown; not yet covered by a seal).
    pub unsealed: u64,
    /// `seq` of the first record (0 when the chain starts at genesis).
    pub first_seq: Option<u64>,
    /// `hash` of the last record: the chain head to keep elsewhere.
    pub head: Option<String>,
}

/// Why a chain does not verify: the first bad line.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}")]
    BadLine {
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        problem: String,
    },
}

/// `(seq, hash)` of a well-formed line whose hash matches its content.
pub(crate) fn link_of(line: &str) -> Option<(u64, String)> {
    let parsed = parse(line).ok()?;
    Some((parsed.seq, parsed.hash))
}

struct Parsed {
    seq: u64,
    prev: String,
    hash: String,
    seal: Option<ReadSeal>,
}

fn parse(line: &str) -> Result<Parsed, String> {
    let split = line
        .len()
        .checked_sub(HASH_TAIL)
        .filter(|&at| line.is_char_boundary(at))
        .ok_or("not an audit record: no trailing \"hash\"")?;
    let (body, tail) = line.split_at(split);
    let hash = tail
        .strip_prefix(",\"hash\":\"")
        .and_then(|t| t.strip_suffix("\"}"))
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or("not an audit record: no trailing \"hash\"")?;
    let closed = format!("{body}}}");
    if hex::encode(Sha256::digest(closed.as_bytes())) != hash {
        return Err("the record does not match its hash: it was edited".into());
    }
    let value: serde_json::Value =
        serde_json::from_str(&closed).map_err(|e| format!("not JSON: {e}"))?;
    let seq = value["seq"].as_u64().ok_or("no \"seq\"")?;
    let prev = value["prev"].as_str().ok_or("no \"prev\"")?.to_string();
    Ok(Parsed {
        seq,
        prev,
        hash: hash.to_string(),
        seal: ReadSeal::of(&value),
    })
}

/// Verifies `files` as one chain, seals hashed but signatures unchecked.
pub fn verify(files: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    verify_with(files, None)
}

/// Verifies `files` as one chain; with `key`, every seal's signature too,
/// and that every file but the last ends with a seal.
pub fn verify_with(
    files: &[PathBuf],
    key: Option<&VerifyingKey>,
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport {
        records: 0,
        files: files.len(),
        seals: 0,
        signed: 0,
        unsealed: 0,
        first_seq: None,
        head: None,
    };
    let mut state = State::default();
    for (i, path) in files.iter().enumerate() {
        let lines = verify_file(path, key, &mut state, &mut report)?;
        let ends_sealed = state.last_was_seal;
        if key.is_some() && i + 1 < files.len() && !ends_sealed {
            return Err(VerifyError::BadLine {
                path: path.clone(),
                line: lines.max(1),
                problem: "the file ends without a seal, but a rotated file always ends with one: lines at its end were removed (or the files are out of order)".into(),
            });
        }
    }
    report.head = state.last.map(|(_, h)| h);
    report.unsealed = state.since_seal;
    Ok(report)
}

/// Where the walk along the chain is.
#[derive(Default)]
struct State {
    /// `(seq, hash)` of the previous line.
    last: Option<(u64, String)>,
    /// Records since the previous seal.
    since_seal: u64,
    /// A seal was seen, so `since_seal` counts from one (a chain given from
    /// the middle, or written before seals existed, cannot be counted).
    anchored: bool,
    last_was_seal: bool,
}

/// Checks one file; returns its number of lines.
fn verify_file(
    path: &Path,
    key: Option<&VerifyingKey>,
    state: &mut State,
    report: &mut VerifyReport,
) -> Result<usize, VerifyError> {
    let last = &mut state.last;
    let mut count = 0;
    let read_err = |source| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(read_err)?;
        let bad = |problem: String| VerifyError::BadLine {
            path: path.to_path_buf(),
            line: index + 1,
            problem,
        };
        let parsed = parse(&line).map_err(bad)?;
        match last {
            None if parsed.seq == 0 && parsed.prev != GENESIS => {
                return Err(bad(
                    "the first record of the chain does not start at genesis".into(),
                ));
            }
            None => report.first_seq = Some(parsed.seq),
            Some((seq, hash)) => {
                if parsed.prev != *hash || parsed.seq != *seq + 1 {
                    return Err(bad(format!(
                        "the chain breaks here (seq {} after {seq}; \"prev\" {} the previous line's hash): a record before this line was removed, reordered or edited",
                        parsed.seq,
                        if parsed.prev == *hash {
                            "matches"
                        } else {
                            "does not match"
                        }
                    )));
                }
            }
        }
        state.last_was_seal = parsed.seal.is_some();
        match &parsed.seal {
            None => {
                report.records += 1;
                state.since_seal += 1;
            }
            Some(seal) => {
                if state.anchored && seal.records != state.since_seal {
                    return Err(bad(format!(
                        "the seal covers {} records but {} follow the previous seal: records were removed or added",
                        seal.records, state.since_seal
                    )));
                }
                if let Some(key) = key {
                    seal.check(parsed.seq, &parsed.prev, key).map_err(bad)?;
                    report.signed += 1;
                }
                report.seals += 1;
                state.since_seal = 0;
                state.anchored = true;
            }
        }
        *last = Some((parsed.seq, parsed.hash));
        count = index + 1;
    }
    Ok(count)
}
