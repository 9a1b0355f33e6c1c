//! Seals: every audit file the writer closes (rotation, shutdown) ends with
//! the chain head and its record count, signed with an Ed25519 key OpenSSL
//! made. `tollgate audit verify --public-key` accepts the intact files and
//! names the first bad line for a removed file, a file cut at its end, a
//! chain an attacker edited and re-hashed (which hashes alone cannot see),
//! and a seal signed by another key.

mod support;

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use support::audit_record as record;
use tollgate::audit::seal::load_public_key;
use tollgate::audit::{AuditConfig, AuditSink, AuditTrail, VerifyError, verify, verify_with};

/// An Ed25519 key pair made by `openssl`: `(private PEM, public PEM)`.
fn openssl_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        private.to_str().expect("utf-8"),
    ]);
    run(&[
        "pkey",
        "-in",
        private.to_str().expect("utf-8"),
        "-pubout",
        "-out",
        public.to_str().expect("utf-8"),
    ]);
    (private, public)
}

/// Two runs of 40 records each into 4 KiB files signed with `key`: the
/// files, oldest first.
fn signed_trail(dir: &Path, key: &Path) -> Vec<PathBuf> {
    let path = dir.join("a.jsonl");
    let config = AuditConfig {
        enabled: true,
        sink: AuditSink::File,
        path: path.clone(),
        max_bytes: 4096,
        queue: 1000,
        signing_key: Some(key.to_path_buf()),
        ..AuditConfig::default()
    };
    for run in 0..2 {
        let trail = AuditTrail::start(&config, &path, None).expect("start");
        for i in 0..40 {
            trail.submit(record(run * 100 + i));
        }
        trail.close();
        assert_eq!(trail.written(), 40);
    }
    let mut files: Vec<PathBuf> = (1..)
        .map(|n| dir.join(format!("a.jsonl.{n}")))
        .take_while(|p| p.exists())
        .collect();
    assert!(files.len() >= 3, "rotated into several files");
    files.push(path);
    files
}

fn lines(path: &Path) -> Vec<String> {
    support::file_lines(path)
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write");
}

fn bad(result: Result<tollgate::audit::VerifyReport, VerifyError>) -> (PathBuf, usize, String) {
    match result {
        Err(VerifyError::BadLine {
            path,
            line,
            problem,
        }) => (path, line, problem),
        other => panic!("expected a bad line, got {other:?}"),
    }
}

/// What an attacker without the key can do: re-chain every line of
/// `files` from the start, so every `seq`, `prev` and `hash` matches again.
fn rehash(files: &[PathBuf]) {
    let mut prev = tollgate::audit::GENESIS.to_string();
    let mut seq = 0;
    for f in files {
        let mut out = Vec::new();
        for line in lines(f) {
            let body = &line[..line.len() - (9 + 64 + 2)];
            let at = body.rfind(",\"seq\":").expect("seq");
            let body = format!("{},\"seq\":{seq},\"prev\":\"{prev}\"", &body[..at]);
            seq += 1;
            prev = hex::encode(Sha256::digest(format!("{body}}}").as_bytes()));
            out.push(format!("{body},\"hash\":\"{prev}\"}}"));
        }
        write_lines(f, &out);
    }
}

#[test]
fn rotation_and_shutdown_seal_each_file_and_the_signatures_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = openssl_key(dir.path(), "signing");
    let files = signed_trail(dir.path(), &key);
    let public = load_public_key(&public).expect("public key");
    let report = verify_with(&files, Some(&public)).expect("intact and signed");
    assert_eq!((report.records, report.first_seq), (80, Some(0)));
    assert!(report.seals as usize >= files.len(), "{report:?}");
    assert_eq!(report.signed, report.seals);
    assert_eq!(report.unsealed, 0, "shutdown sealed the last file");
    for f in &files {
        let last = lines(f).pop().expect("a line");
        let seal: serde_json::Value = serde_json::from_str(&last).expect("json");
        assert_eq!(seal["kind"], "seal", "{} ends sealed", f.display());
        assert_eq!(seal["sig"].as_str().map(str::len), Some(128));
        assert!(last.starts_with(tollgate::audit::seal::SEAL_PREFIX));
        assert!(std::fs::metadata(f).expect("meta").len() <= 4096);
    }
    // The private key never reaches the trail.
    let pem = std::fs::read_to_string(&key).expect("key");
    let secret_line = pem.lines().nth(1).expect("base64 line");
    for f in &files {
        assert!(
            !std::fs::read_to_string(f)
                .expect("read")
                .contains(secret_line)
        );
    }

    // The command line agrees, and says so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["audit", "verify", "--public-key"])
        .arg(dir.path().join("signing.pub.pem"))
        .args(&files)
        .output()
        .expect("run tollgate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("ok: 80 records"), "{stdout}");
    assert!(stdout.contains("0 records after the last seal"), "{stdout}");
}

#[test]
fn removed_files_and_cut_files_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = openssl_key(dir.path(), "signing");
    let files = signed_trail(dir.path(), &key);
    let public = load_public_key(&public).expect("public key");

    // A middle file removed: the next file's first line breaks the chain.
    let mut gap = files.clone();
    gap.remove(1);
    let (path, line, _) = bad(verify_with(&gap, Some(&public)));
    assert_eq!((path, line), (files[2].clone(), 1));

    // The first file removed: still a chain, reported as not from genesis,
    // and the command line warns.
    let report = verify_with(&files[1..], Some(&public)).expect("a suffix");
    assert!(report.first_seq > Some(0));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["audit", "verify"])
        .args(&files[1..])
        .output()
        .expect("run tollgate");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not at genesis"));

    // A rotated file's end cut off (its last record and its seal): hashes
    // see the break at the next file's first line; with the key, the cut
    // file itself is named, at its new last line.
    let cut_dir = dir.path().join("cut");
    std::fs::create_dir(&cut_dir).expect("dir");
    let first = lines(&files[0]);
    let cut = cut_dir.join("a.jsonl.1");
    write_lines(&cut, &first[..first.len() - 2]);
    let (path, line, _) = bad(verify(&[cut.clone(), files[1].clone()]));
    assert_eq!((path, line), (files[1].clone(), 1));
    let (path, line, problem) = bad(verify_with(&[cut.clone(), files[1].clone()], Some(&public)));
    assert_eq!((path, line), (cut, first.len() - 2), "{problem}");
    assert!(problem.contains("without a seal"), "{problem}");
}

#[test]
fn a_rehashed_forgery_passes_hashes_but_not_signatures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = openssl_key(dir.path(), "signing");
    let files = signed_trail(dir.path(), &key);
    let public = load_public_key(&public).expect("public key");

    // Edit the third record (deny becomes allow) and re-chain everything.
    let mut first = lines(&files[0]);
    assert!(first[2].contains("\"decision\":\"deny\""));
    first[2] = first[2].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    write_lines(&files[0], &first);
    rehash(&files);
    verify(&files).expect("hashes alone are fooled by a re-chained trail");
    // The first seal after the edit is named: its signature covers the
    // original chain head.
    let seal_line = first
        .iter()
        .position(|l| l.starts_with(tollgate::audit::seal::SEAL_PREFIX))
        .expect("a seal")
        + 1;
    let (path, line, problem) = bad(verify_with(&files, Some(&public)));
    assert_eq!((path, line), (files[0].clone(), seal_line));
    assert!(problem.contains("signature"), "{problem}");

    // A record removed and the chain re-hashed: the seal's count names it
    // even without the key, once a seal anchors the count.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let files = signed_trail(dir2.path(), &key);
    let mut second = lines(&files[1]);
    second.remove(3);
    write_lines(&files[1], &second);
    rehash(&files);
    let (path, line, problem) = bad(verify(&files));
    let seal_line = second
        .iter()
        .position(|l| l.starts_with(tollgate::audit::seal::SEAL_PREFIX))
        .expect("a seal")
        + 1;
    assert_eq!((path, line), (files[1].clone(), seal_line));
    assert!(problem.contains("records"), "{problem}");
}

#[test]
fn another_key_or_an_unsigned_trail_fails_and_a_bad_key_refuses_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, _) = openssl_key(dir.path(), "signing");
    let (_, other) = openssl_key(dir.path(), "other");
    let files = signed_trail(dir.path(), &key);
    let other = load_public_key(&other).expect("public key");
    let (_, _, problem) = bad(verify_with(&files, Some(&other)));
    assert!(problem.contains("another key"), "{problem}");

    // Unsigned seals: fine without a key, refused with one.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).expect("dir");
    let path = plain.join("p.jsonl");
    let config = AuditConfig {
        enabled: true,
        path: path.clone(),
        ..AuditConfig::default()
    };
    let trail = AuditTrail::start(&config, &path, None).expect("start");
    trail.submit(record(1));
    trail.close();
    let report = verify(std::slice::from_ref(&path)).expect("hashed seals verify");
    assert_eq!((report.records, report.seals, report.signed), (1, 1, 0));
    let (_, line, problem) = bad(verify_with(&[path], Some(&other)));
    assert_eq!(line, 2);
    assert!(problem.contains("not signed"), "{problem}");

    // A key that is not an Ed25519 private key refuses start-up.
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(
        &bogus,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let mut config = support::test_config();
    config.audit.enabled = true;
    config.audit.path = dir.path().join("x.jsonl");
    config.audit.signing_key = Some(bogus);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = runtime.enter();
    match tollgate::server::App::build(config) {
        Err(e) => assert!(e.to_string().contains("audit.signing_key"), "{e}"),
        Ok(_) => panic!("started with a bad signing key"),
    }
}
