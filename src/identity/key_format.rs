//! The API key format: `tg_<id>_<secret><checksum>`.
//!
//! - `tg_` is a public prefix, so secret scanners and people recognize a
//!   Tollgate key;
//! - `<id>` (lowercase letters, digits, `-`; 1–40) names the key's record and
//!   is safe to log;
//! - `<secret>` is 32 base62 characters (≈190 bits) from the OS RNG;
//! - `<checksum>` is the CRC32 of everything before it, 6 base62 characters,
//!   so a mistyped or truncated key is refused without any store lookup.

/// The public prefix of every key.
pub const PREFIX: &str = "tg_";
const SECRET_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
const MAX_ID_LEN: usize = 40;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Whether `id` can name a key.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn checksum(body: &str) -> String {
    let mut n = u64::from(crc32fast::hash(body.as_bytes()));
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The id of a well-formed key; `None` for anything malformed (wrong prefix,
/// id, length, alphabet or checksum).
pub fn parse(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, tail) = rest.split_once('_')?;
    if !valid_id(id)
        || tail.len() != SECRET_LEN + CHECKSUM_LEN
        || !tail.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    let (body, sum) = key.split_at(key.len() - CHECKSUM_LEN);
    (checksum(body) == sum).then_some(id)
}

/// A new key for `id`, from the OS random number generator.
pub fn generate(id: &str) -> Result<String, String> {
    if !valid_id(id) {
        return Err(format!(
            "key id {id:?}: use 1–40 lowercase letters, digits or '-'"
        ));
    }
    let mut secret = String::with_capacity(SECRET_LEN);
    let mut bytes = [0u8; 64];
    while secret.len() < SECRET_LEN {
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness from the OS: {e}"))?;
        // Rejection sampling keeps every character equally likely.
        for b in bytes {
            if b < 248 && secret.len() < SECRET_LEN {
                secret.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    let body = format!("{PREFIX}{id}_{secret}");
    let sum = checksum(&body);
    Ok(body + &sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_any_change_breaks_them() {
        let key = generate("demo-paid").expect("key");
        assert_eq!(parse(&key), Some("demo-paid"));
        assert!(key.starts_with("tg_demo-paid_"));
        // Flip each character of the secret+checksum: the checksum catches it.
        let tail_start = key.len() - SECRET_LEN - CHECKSUM_LEN;
        for i in tail_start..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).expect("utf8");
            assert_eq!(parse(&changed), None, "changed at {i}");
        }
        assert_ne!(
            generate("demo-paid").expect("key"),
            key,
            "secrets are random"
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        let key = generate("k1").expect("key");
        for bad in [
            "",
            "tg_",
            "sk_k1_0123456789",
            &key[..key.len() - 1],
            &format!("{key}x"),
            &key.replace("tg_k1", "tg_K1"),
            &key.replace("tg_k1_", "tg_k_1"),
            "tg_k1_!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert!(generate("Bad_Id").is_err());
    }
}
