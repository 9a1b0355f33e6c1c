//! Counting a request's input tokens before it reaches the model.
//!
//! A model family the operator maps to one of tiktoken's encodings
//! (`cl100k_base`, `o200k_base`, `p50k_base`, `r50k_base`) is counted with
//! the real encoder (the `tiktoken-rs` crate, whose vocabularies are compiled
//! in: nothing is downloaded). Chat `messages` add the per-message framing
//! OpenAI documents for its chat models ("How to count tokens with
//! tiktoken"): 3 tokens per message, 1 more per `name`, and 3 that prime the
//! reply. Any other family is **estimated**: one token per
//! `bytes_per_token` bytes of text (default 4, the usual rule of thumb for
//! English under BPE tokenizers), rounded up, plus 4 tokens per message.
//!
//! An encoder is built once per process (a few hundred milliseconds for
//! `o200k_base`) and shared; [`Counter::warm`] builds it at load, so no
//! request pays for it.

use serde::Deserialize;
use tiktoken_rs::CoreBPE;

use super::MAX_TOKENS;

/// A tiktoken encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// GPT-4, GPT-3.5, `text-embedding-3-*`.
    Cl100kBase,
    /// GPT-4o, GPT-4.1, GPT-5, o-series.
    O200kBase,
    /// Codex, `text-davinci-002/003`.
    P50kBase,
    /// GPT-3 (`gpt2`).
    R50kBase,
}

impl Encoding {
    /// The shared encoder (built on first use).
    fn bpe(self) -> &'static CoreBPE {
        match self {
            Self::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Self::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Self::P50kBase => tiktoken_rs::p50k_base_singleton(),
            Self::R50kBase => tiktoken_rs::r50k_base_singleton(),
        }
    }

    /// The name the config uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cl100kBase => "cl100k_base",
            Self::O200kBase => "o200k_base",
            Self::P50kBase => "p50k_base",
            Self::R50kBase => "r50k_base",
        }
    }
}

/// The default bytes per token of an estimated family.
pub const DEFAULT_BYTES_PER_TOKEN: f64 = 4.0;

/// Text longer than this is handed to the encoder in chunks. BPE merging
/// grows faster than linearly with the length of a piece, and a piece can be
/// a whole string without spaces, so a body of one long word must not cost
/// seconds. A chunk ends just before a space that follows a non-space —
/// where tiktoken's pre-tokenizer starts a new piece anyway, so the count is
/// the encoder's own.
const CHUNK_BYTES: usize = 4096;

/// A run with no such space is cut at this length (at a UTF-8 boundary):
/// the count may then exceed the encoder's by a token per cut.
const HARD_CHUNK_BYTES: usize = 16384;

/// Where the next chunk of `text` ends.
fn chunk_end(text: &str) -> usize {
    if text.len() <= CHUNK_BYTES {
        return text.len();
    }
    let bytes = text.as_bytes();
    let limit = text.len().min(HARD_CHUNK_BYTES);
    if let Some(p) =
        (CHUNK_BYTES..limit).find(|&p| bytes[p] == b' ' && !bytes[p - 1].is_ascii_whitespace())
    {
        return p;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// How one family's text is counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Counter {
    /// The real encoder.
    Bpe(Encoding),
    /// An estimate: `bytes / bytes_per_token`, rounded up.
    Estimate { bytes_per_token: f64 },
}

impl Default for Counter {
    fn default() -> Self {
        Self::Estimate {
            bytes_per_token: DEFAULT_BYTES_PER_TOKEN,
        }
    }
}

/// The text-bearing parts of a request body.
#[derive(Debug, Default)]
struct Parts<'a> {
    texts: Vec<&'a str>,
    messages: u64,
    names: u64,
    /// Pre-tokenized input (`input: [[1, 2, 3]]`): counted as given.
    token_ids: u64,
}

/// Most JSON values looked at in one body; the rest is not counted (the
/// body size limit bounds a body long before this matters).
const MAX_VISITED: usize = 100_000;

impl Counter {
    /// Builds the encoder now, so the first request does not.
    pub fn warm(self) {
        if let Self::Bpe(e) = self {
            let _ = e.bpe().encode_ordinary("warm");
        }
    }

    /// Tokens of `text` (special-token markers such as `<|endoftext|>` count
    /// as ordinary text: a client cannot smuggle control tokens in).
    pub fn count_text(self, text: &str) -> u64 {
        match self {
            Self::Bpe(e) => {
                let bpe = e.bpe();
                let mut total = 0u64;
                let mut rest = text;
                while !rest.is_empty() {
                    let (chunk, tail) = rest.split_at(chunk_end(rest));
                    total = total.saturating_add(bpe.encode_ordinary(chunk).len() as u64);
                    rest = tail;
                }
                total
            }
            Self::Estimate { bytes_per_token } => {
                let tokens = (text.len() as f64 / bytes_per_token).ceil();
                if tokens.is_finite() && tokens > 0.0 {
                    (tokens as u64).min(MAX_TOKENS)
                } else {
                    0
                }
            }
        }
    }

    /// Input tokens of an OpenAI- or Anthropic-style request body: chat
    /// `messages` (every string field of each message — role, content,
    /// name — and the `text` of content parts, tool call names and
    /// arguments), Anthropic `system`, `prompt` (string or array), and
    /// embeddings / Responses `input` (a string, an array of strings, an
    /// array of token-id arrays, or Responses message items). `None` when
    /// the body is not a JSON object.
    pub fn count_body(self, body: &[u8]) -> Option<u64> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let parts = collect(value.as_object()?, matches!(self, Self::Bpe(_)));
        let text: u64 = match self {
            Self::Bpe(_) => parts
                .texts
                .iter()
                .fold(0u64, |sum, t| sum.saturating_add(self.count_text(t))),
            // One division over all the text, as the estimate always was.
            Self::Estimate { bytes_per_token } => {
                let bytes = parts
                    .texts
                    .iter()
                    .fold(0u64, |sum, t| sum.saturating_add(t.len() as u64));
                let tokens = (bytes as f64 / bytes_per_token).ceil();
                if tokens.is_finite() && tokens > 0.0 {
                    (tokens as u64).min(MAX_TOKENS)
                } else {
                    0
                }
            }
        };
        let framing = match self {
            // The OpenAI cookbook's accounting for current chat models.
            Self::Bpe(_) => {
                let priming = if parts.messages > 0 { 3 } else { 0 };
                parts.messages * 3 + parts.names + priming
            }
            Self::Estimate { .. } => parts.messages * 4,
        };
        Some(
            text.saturating_add(framing)
                .saturating_add(parts.token_ids)
                .min(MAX_TOKENS),
        )
    }
}

/// Walks the fields that carry input text, iteratively (no recursion on
/// untrusted nesting) and at most [`MAX_VISITED`] values. With
/// `every_message_field`, each string field of a message counts (the
/// cookbook's accounting); without, only its `content`.
fn collect(
    object: &serde_json::Map<String, serde_json::Value>,
    every_message_field: bool,
) -> Parts<'_> {
    use serde_json::Value;
    let mut parts = Parts::default();
    let mut stack: Vec<&Value> = Vec::new();
    for field in ["prompt", "system", "input"] {
        if let Some(v) = object.get(field) {
            stack.push(v);
        }
    }
    if let Some(list) = object.get("messages").and_then(Value::as_array) {
        for m in list {
            parts.messages += 1;
            match m {
                Value::Object(message) if every_message_field => {
                    if message.contains_key("name") {
                        parts.names += 1;
                    }
                    stack.extend(message.values());
                }
                Value::Object(message) => stack.extend(message.get("content")),
                other => stack.push(other),
            }
        }
    }
    let mut visited = 0usize;
    while let Some(v) = stack.pop() {
        visited += 1;
        if visited > MAX_VISITED {
            break;
        }
        match v {
            Value::String(s) => parts.texts.push(s),
            Value::Array(items) => {
                if !items.is_empty() && items.iter().all(Value::is_u64) {
                    // Token ids, as embeddings and completions accept.
                    parts.token_ids = parts.token_ids.saturating_add(items.len() as u64);
                } else {
                    stack.extend(items.iter());
                }
            }
            Value::Object(part) => {
                // Content parts (`{"type":"text","text":…}`), Responses
                // message items (`{"role":…,"content":…}`) and tool calls
                // (`{"function":{"name":…,"arguments":…}}`): their text, not
                // their type tags or image URLs.
                for key in ["text", "content", "function", "name", "arguments"] {
                    if let Some(inner) = part.get(key) {
                        stack.push(inner);
                    }
                }
            }
            _ => {}
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference counts from OpenAI's `tiktoken` Python package
    // (`len(tiktoken.get_encoding(name).encode_ordinary(text))`); the
    // integration test `usage_tokenizer` checks them against it live.
    const REFERENCE: &[(Encoding, &str, u64)] = &[
        (Encoding::Cl100kBase, "hello world", 2),
        (Encoding::Cl100kBase, "tiktoken is great!", 6),
        (Encoding::Cl100kBase, "Größenwahn 日本語のテキスト 🚀", 16),
        (Encoding::Cl100kBase, "<|endoftext|>", 7),
        (Encoding::O200kBase, "hello world", 2),
        (Encoding::O200kBase, "Größenwahn 日本語のテキスト 🚀", 13),
        (Encoding::P50kBase, "Größenwahn 日本語のテキスト 🚀", 20),
        (Encoding::R50kBase, "tiktoken is great!", 6),
    ];

    #[test]
    fn counts_match_the_reference_encoder() {
        for &(e, text, want) in REFERENCE {
            assert_eq!(
                Counter::Bpe(e).count_text(text),
                want,
                "{} {text:?}",
                e.name()
            );
        }
    }

    #[test]
    fn special_markers_are_ordinary_text() {
        let c = Counter::Bpe(Encoding::Cl100kBase);
        assert_eq!(c.count_text("<|endoftext|>"), 7);
    }

    #[test]
    fn long_texts_are_counted_in_chunks_exactly() {
        let bpe = Encoding::Cl100kBase.bpe();
        let c = Counter::Bpe(Encoding::Cl100kBase);
        for text in [
            "hello world".repeat(5000),
            "Größenwahn,  日本語 1234567 don't\n  stop ".repeat(2000),
        ] {
            assert_eq!(c.count_text(&text), bpe.encode_ordinary(&text).len() as u64);
        }
        // One word with no space: cut at UTF-8 boundaries, counted all the same.
        let word = "é".repeat(50_000);
        let n = c.count_text(&word);
        let whole = bpe.encode_ordinary(&word).len() as u64;
        assert!(n >= whole && n <= whole + 10, "{n} vs {whole}");
    }

    #[test]
    fn chat_framing_follows_the_cookbook() {
        let c = Counter::Bpe(Encoding::Cl100kBase);
        let body = br#"{"model":"gpt-4","messages":[{"role":"system","content":"hello world"},{"role":"user","name":"bob","content":[{"type":"text","text":"hello world"}]}]}"#;
        // texts: system(1) + hello world(2) + user(1) + bob(1) + hello world(2) = 7
        // framing: 2 messages * 3 + 1 name + 3 priming = 10
        assert_eq!(c.count_body(body), Some(17));
    }

    #[test]
    fn embeddings_input_forms() {
        let c = Counter::Bpe(Encoding::Cl100kBase);
        assert_eq!(c.count_body(br#"{"input":"hello world"}"#), Some(2));
        assert_eq!(
            c.count_body(br#"{"input":["hello world","hello world"]}"#),
            Some(4)
        );
        assert_eq!(c.count_body(br#"{"input":[[1,2,3],[4]]}"#), Some(4));
        assert_eq!(c.count_body(br#"{"prompt":["hello world"]}"#), Some(2));
        assert_eq!(c.count_body(b"not json"), None);
    }

    #[test]
    fn estimates_use_bytes_per_token() {
        let c = Counter::Estimate {
            bytes_per_token: 2.0,
        };
        assert_eq!(c.count_body(br#"{"prompt":"abcde"}"#), Some(3));
        assert_eq!(
            Counter::default().count_body(br#"{"messages":[{"content":"abcdefgh"}]}"#),
            Some(2 + 4)
        );
    }
}
