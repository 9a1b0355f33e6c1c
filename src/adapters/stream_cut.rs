//! Ending a watched stream that crosses a hard token budget
//! (`on_exceed = "end_stream"`, [`crate::quota::rules::OnExceed`]).
//!
//! ext_proc hands each response body chunk of a server-sent-event stream to
//! a [`StreamCut`]. It passes on **complete events only** (an event ends at
//! a blank line), feeding each to the request's [`UsageReader`]; a partial
//! event waits for the next chunk. When the output generated so far exceeds
//! the request's cutoff — what its reservation covered plus the budget's
//! headroom at admission ([`crate::engine::StreamCutoff`]), decided once so
//! no chunk costs a store round trip — the event that crossed it is
//! withheld and replaced by a final
//! `event: error` / `data: {"error":{"code":"over_budget","rule":…}}`; every
//! later chunk is dropped. The withheld event still counts as generated: the
//! request is settled for everything the upstream produced up to the cut.

use crate::engine::StreamCutoff;
use crate::usage::response::{MAX_LINE_BYTES, UsageReader};

/// One stream's cut state.
#[derive(Debug)]
pub(super) struct StreamCut {
    cutoff: StreamCutoff,
    /// The start of an event not yet complete.
    pending: Vec<u8>,
    ended: bool,
}

/// What to send on for one chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Passed {
    /// The body that replaces the chunk.
    pub body: Vec<u8>,
    /// The cutoff was crossed by this chunk: the stream is over.
    pub crossed: bool,
}

/// Where the first event in `buf` ends (after its blank line), for `\n\n`,
/// `\r\n\r\n` and mixed line ends.
fn event_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        }
    })
}

impl StreamCut {
    /// Cuts at `cutoff`.
    pub(super) fn new(cutoff: StreamCutoff) -> Self {
        Self {
            cutoff,
            pending: Vec::new(),
            ended: false,
        }
    }

    /// The rule whose budget ends the stream.
    pub(super) fn rule(&self) -> &str {
        &self.cutoff.rule
    }

    /// The final event sent in place of what crossed the budget.
    fn error_event(&self) -> Vec<u8> {
        let data = serde_json::json!({"error": {
            "code": "over_budget",
            "rule": self.cutoff.rule,
            "message": "the response crossed the token budget; the stream was ended",
        }});
        format!("event: error\ndata: {data}\n\n").into_bytes()
    }

    /// Feeds `event` to `reader`; `false` when it crossed the cutoff.
    fn fits(&self, reader: &mut UsageReader, event: &[u8]) -> bool {
        reader.feed(event);
        reader.output_so_far() <= self.cutoff.output_tokens
    }

    /// Reads the next body chunk: the complete events that fit are passed
    /// on, then, at the cut, the error event. Once cut, nothing passes.
    pub(super) fn chunk(
        &mut self,
        reader: &mut UsageReader,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Passed {
        let mut body = Vec::new();
        if self.ended {
            return Passed {
                body,
                crossed: false,
            };
        }
        self.pending.extend_from_slice(chunk);
        loop {
            let end = match event_end(&self.pending) {
                Some(end) => end,
                // A run without a blank line longer than the reader keeps
                // is passed as it is rather than buffered without bound.
                None if self.pending.len() > MAX_LINE_BYTES || end_of_stream => self.pending.len(),
                None => break,
            };
            if end == 0 {
                break;
            }
            let event: Vec<u8> = self.pending.drain(..end).collect();
            if !self.fits(reader, &event) {
                self.ended = true;
                self.pending = Vec::new();
                body.extend_from_slice(&self.error_event());
                return Passed {
                    body,
                    crossed: true,
                };
            }
            body.extend_from_slice(&event);
        }
        Passed {
            body,
            crossed: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(text: &str) -> String {
        format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
    }

    fn cut(tokens: u64) -> StreamCut {
        StreamCut::new(StreamCutoff {
            rule: "key-tokens".into(),
            output_tokens: tokens,
        })
    }

    #[test]
    fn events_pass_whole_until_the_cutoff_then_one_error_event() {
        let mut reader = UsageReader::new(Some("text/event-stream"));
        let mut c = cut(5);
        let stream = [delta("abcdefgh"), delta("abcdefgh"), delta("abcdefgh")].concat();
        // Split mid-event: the partial event waits.
        let (a, b) = stream.split_at(delta("abcdefgh").len() + 10);
        let first = c.chunk(&mut reader, a.as_bytes(), false);
        assert_eq!(first.body, delta("abcdefgh").into_bytes());
        assert!(!first.crossed);
        let second = c.chunk(&mut reader, b.as_bytes(), false);
        assert!(second.crossed);
        let text = String::from_utf8(second.body).unwrap_or_default();
        // 2 + 2 tokens fit in 5; the third event (6) is withheld.
        assert!(text.starts_with(&delta("abcdefgh")), "{text}");
        assert!(text.ends_with("\n\n"));
        let error = text.trim_start_matches(&delta("abcdefgh"));
        assert!(error.starts_with("event: error\ndata: "), "{error}");
        let data: serde_json::Value =
            serde_json::from_str(error.trim_start_matches("event: error\ndata: ").trim())
                .unwrap_or_default();
        assert_eq!(data["error"]["code"], "over_budget");
        assert_eq!(data["error"]["rule"], "key-tokens");
        // Everything generated is counted, the withheld event too.
        assert_eq!(reader.output_so_far(), 6);
        let after = c.chunk(&mut reader, delta("more").as_bytes(), true);
        assert_eq!((after.body.len(), after.crossed), (0, false));
    }

    #[test]
    fn a_stream_within_its_cutoff_passes_unchanged() {
        let mut reader = UsageReader::new(Some("text/event-stream"));
        let mut c = cut(100);
        let stream = format!("{}{}data: [DONE]", delta("ab"), delta("cd\\r"));
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(7) {
            out.extend(c.chunk(&mut reader, piece, false).body);
        }
        out.extend(c.chunk(&mut reader, b"\r\n\r\n", true).body);
        assert_eq!(out, format!("{stream}\r\n\r\n").into_bytes());
        assert_eq!(event_end(b"a\r\n\r\nb"), Some(5));
        assert_eq!(event_end(b"a\nb\n"), None);
    }
}
