//! Reading a request's actual usage from the upstream's response: a JSON
//! body's `usage` block, or a server-sent-event stream, in the OpenAI
//! chat/completions, OpenAI Responses and Anthropic Messages formats.
//!
//! | format | input | output | cached input |
//! |---|---|---|---|
//! | OpenAI chat / completions | `prompt_tokens` | `completion_tokens` | `prompt_tokens_details.cached_tokens` |
//! | OpenAI Responses | `input_tokens` | `output_tokens` | `input_tokens_details.cached_tokens` |
//! | Anthropic Messages | `input_tokens` + `cache_read_input_tokens` + `cache_creation_input_tokens` | `output_tokens` | `cache_read_input_tokens` |
//!
//! Streams: OpenAI's final chunk carries `usage` (with
//! `stream_options.include_usage`); the Responses API's `response.completed`
//! event carries `response.usage`; Anthropic's `message_start` carries the
//! input and `message_delta` the (cumulative) output. A stream without any
//! usage is **counted from its deltas** — the generated text at one token per
//! 4 bytes — with the input left to the reservation's estimate.
//!
//! Bounded: a JSON body is buffered up to [`MAX_JSON_BYTES`]; an SSE line
//! longer than [`MAX_LINE_BYTES`] is skipped; numbers that are negative, not
//! integers or absurd are ignored.

use super::{MAX_TOKENS, TokenUsage};

/// Largest JSON response body read for its usage block.
pub const MAX_JSON_BYTES: usize = 4 << 20;
/// Longest SSE line kept.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// What the response said (or showed) was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observed {
    /// Input tokens, when the response reported them.
    pub input: Option<u64>,
    pub output: u64,
    pub cached_input: u64,
    /// Whether the numbers came from a usage block (else: counted).
    pub reported: bool,
}

impl Observed {
    /// As token usage, taking `estimated_input` when the response did not
    /// report its input.
    pub fn usage(&self, estimated_input: u64) -> TokenUsage {
        let input = self.input.unwrap_or(estimated_input);
        TokenUsage {
            input,
            output: self.output,
            cached_input: self.cached_input.min(input),
        }
    }
}

/// An incremental reader of one response.
#[derive(Debug, Default)]
pub struct UsageReader {
    sse: bool,
    json: Vec<u8>,
    json_too_big: bool,
    line: Vec<u8>,
    line_too_long: bool,
    found: Observed,
    streamed_text_bytes: u64,
}

fn count(v: Option<&serde_json::Value>) -> Option<u64> {
    v.and_then(serde_json::Value::as_u64)
        .filter(|&n| n <= MAX_TOKENS)
}

/// Reads a `usage` object in any of the three formats.
pub fn usage_of(usage: &serde_json::Value) -> Option<Observed> {
    let usage = usage.as_object()?;
    let get = |k: &str| count(usage.get(k));
    if let Some(prompt) = get("prompt_tokens") {
        return Some(Observed {
            input: Some(prompt),
            output: get("completion_tokens").unwrap_or(0),
            cached_input: count(
                usage
                    .get("prompt_tokens_details")
                    .and_then(|d| d.get("cached_tokens")),
            )
            .unwrap_or(0),
            reported: true,
        });
    }
    let input = get("input_tokens");
    let output = get("output_tokens");
    if input.is_none() && output.is_none() {
        return None;
    }
    let cache_read = get("cache_read_input_tokens");
    let cache_creation = get("cache_creation_input_tokens");
    let (input, cached) = if cache_read.is_some() || cache_creation.is_some() {
        // Anthropic counts cache reads and writes apart from input_tokens.
        let read = cache_read.unwrap_or(0);
        (
            input.map(|i| {
                i.saturating_add(read)
                    .saturating_add(cache_creation.unwrap_or(0))
            }),
            read,
        )
    } else {
        let cached = count(
            usage
                .get("input_tokens_details")
                .and_then(|d| d.get("cached_tokens")),
        );
        (input, cached.unwrap_or(0))
    };
    Some(Observed {
        input,
        output: output.unwrap_or(0),
        cached_input: cached,
        reported: true,
    })
}

impl UsageReader {
    /// A reader for a response with `content_type`.
    pub fn new(content_type: Option<&str>) -> Self {
        let sse = content_type.is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        });
        Self {
            sse,
            ..Self::default()
        }
    }

    /// Whether the response is a server-sent-event stream.
    pub fn is_sse(&self) -> bool {
        self.sse
    }

    /// Feeds the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.json.len() + chunk.len() > MAX_JSON_BYTES {
                self.json_too_big = true;
                self.json.clear();
            } else if !self.json_too_big {
                self.json.extend_from_slice(chunk);
            }
            return;
        }
        for &b in chunk {
            if b == b'\n' {
                if !self.line_too_long {
                    let line = std::mem::take(&mut self.line);
                    self.sse_line(&line);
                } else {
                    self.line.clear();
                }
                self.line_too_long = false;
            } else if self.line.len() < MAX_LINE_BYTES {
                self.line.push(b);
            } else {
                self.line_too_long = true;
            }
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            return;
        }
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        // OpenAI chat: the final chunk's `usage`; Anthropic message_delta's
        // cumulative `usage`.
        if let Some(u) = event.get("usage").and_then(usage_of) {
            self.merge(u);
        }
        // Responses API: response.completed carries response.usage.
        if let Some(u) = event
            .get("response")
            .and_then(|r| r.get("usage"))
            .and_then(usage_of)
        {
            self.merge(u);
        }
        // Anthropic message_start: message.usage holds the input.
        if let Some(u) = event
            .get("message")
            .and_then(|m| m.get("usage"))
            .and_then(usage_of)
        {
            self.merge(u);
        }
        // Generated text, for streams that never report usage.
        let mut text = 0u64;
        if let Some(choices) = event.get("choices").and_then(|c| c.as_array()) {
            for c in choices {
                if let Some(s) = c
                    .get("delta")
                    .and_then(|d| d.get("content"))
                    .and_then(|s| s.as_str())
                {
                    text += s.len() as u64;
                }
            }
        }
        if let Some(s) = event
            .get("delta")
            .and_then(|d| d.get("text").or_else(|| d.as_str().map(|_| d)))
            .and_then(|s| s.as_str())
        {
            text += s.len() as u64;
        }
        self.streamed_text_bytes = self.streamed_text_bytes.saturating_add(text);
    }

    /// Output tokens generated so far: the largest reported count, or the
    /// streamed text counted (one token per 4 bytes), whichever is larger.
    /// Cheap: no parsing beyond what [`Self::feed`] already did.
    pub fn output_so_far(&self) -> u64 {
        self.found
            .output
            .max(self.streamed_text_bytes.div_ceil(4))
            .min(MAX_TOKENS)
    }

    fn merge(&mut self, u: Observed) {
        let f = &mut self.found;
        f.reported = true;
        if u.input.is_some() {
            f.input = u.input;
            f.cached_input = u.cached_input;
        }
        // Output counts are cumulative in every format: keep the largest.
        f.output = f.output.max(u.output);
    }

    /// What the response used, as far as it was read.
    pub fn finish(mut self) -> Observed {
        if !self.sse {
            if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&self.json)
                && let Some(u) = body.get("usage").and_then(usage_of)
            {
                return u;
            }
            return Observed::default();
        }
        if !self.line.is_empty() && !self.line_too_long {
            let line = std::mem::take(&mut self.line);
            self.sse_line(&line);
        }
        if self.found.reported {
            return self.found;
        }
        Observed {
            output: self.streamed_text_bytes.div_ceil(4).min(MAX_TOKENS),
            ..Observed::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(content_type: &str, chunks: &[&str]) -> Observed {
        let mut r = UsageReader::new(Some(content_type));
        for c in chunks {
            r.feed(c.as_bytes());
        }
        r.finish()
    }

    #[test]
    fn json_bodies_in_each_format() {
        let chat = r#"{"id":"x","usage":{"prompt_tokens":120,"completion_tokens":30,"prompt_tokens_details":{"cached_tokens":100}}}"#;
        assert_eq!(
            read("application/json", &[&chat[..10], &chat[10..]]),
            Observed {
                input: Some(120),
                output: 30,
                cached_input: 100,
                reported: true
            }
        );
        let responses = r#"{"usage":{"input_tokens":50,"output_tokens":7,"input_tokens_details":{"cached_tokens":10},"output_tokens_details":{"reasoning_tokens":3}}}"#;
        assert_eq!(
            read("application/json", &[responses]),
            Observed {
                input: Some(50),
                output: 7,
                cached_input: 10,
                reported: true
            }
        );
        let anthropic = r#"{"usage":{"input_tokens":5,"cache_read_input_tokens":40,"cache_creation_input_tokens":2,"output_tokens":9}}"#;
        assert_eq!(
            read("application/json", &[anthropic]),
            Observed {
                input: Some(47),
                output: 9,
                cached_input: 40,
                reported: true
            }
        );
        assert_eq!(read("application/json", &["not json"]), Observed::default());
        let negative = r#"{"usage":{"prompt_tokens":-5,"completion_tokens":1e30}}"#;
        assert!(!read("application/json", &[negative]).reported);
    }

    #[test]
    fn streams_with_and_without_a_usage_chunk() {
        let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        let (a, b) = openai.split_at(37);
        assert_eq!(
            read("text/event-stream; charset=utf-8", &[a, b]),
            Observed {
                input: Some(11),
                output: 2,
                cached_input: 0,
                reported: true
            }
        );
        let anthropic = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        assert_eq!(
            read("text/event-stream", &[anthropic]),
            Observed {
                input: Some(25),
                output: 15,
                cached_input: 0,
                reported: true
            }
        );
        let responses = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":8,\"output_tokens\":4}}}\n\n";
        assert_eq!(read("text/event-stream", &[responses]).output, 4);
        // No usage anywhere: counted from the deltas, input unknown.
        let bare = "data: {\"choices\":[{\"delta\":{\"content\":\"abcdefgh\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"ij\"}}]}\n\n";
        let seen = read("text/event-stream", &[bare]);
        assert_eq!((seen.input, seen.output, seen.reported), (None, 3, false));
        assert_eq!(seen.usage(40).input, 40);
    }

    #[test]
    fn output_so_far_grows_with_the_deltas_and_the_reported_count() {
        let mut r = UsageReader::new(Some("text/event-stream"));
        assert_eq!(r.output_so_far(), 0);
        r.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"abcdefgh\"}}]}\n\n");
        assert_eq!(r.output_so_far(), 2);
        // A partial line is not counted until it ends.
        r.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"ijkl\"}}]}");
        assert_eq!(r.output_so_far(), 2);
        r.feed(b"\n\n");
        assert_eq!(r.output_so_far(), 3);
        // Anthropic's cumulative count wins when larger.
        r.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":40}}\n\n");
        assert_eq!(r.output_so_far(), 40);
    }
}
