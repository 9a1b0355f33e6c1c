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
//! Removing lines at the very end cannot be seen from the file alone: keep
//! the chain head ([`VerifyReport::head`]) elsewhere to detect truncation.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `,"hash":"` + 64 hex + `"}`.
const HASH_TAIL: usize = 9 + 64 + 2;

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub files: usize,
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
    })
}

/// Verifies `files` as one chain.
pub fn verify(files: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport {
        records: 0,
        files: files.len(),
        first_seq: None,
        head: None,
    };
    let mut last: Option<(u64, String)> = None;
    for path in files {
        verify_file(path, &mut last, &mut report)?;
    }
    report.head = last.map(|(_, h)| h);
    Ok(report)
}

fn verify_file(
    path: &Path,
    last: &mut Option<(u64, String)>,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
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
        report.records += 1;
        *last = Some((parsed.seq, parsed.hash));
    }
    Ok(())
}
