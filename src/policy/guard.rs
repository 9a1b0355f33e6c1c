//! Bounds on how deeply policy files may nest, checked before and after
//! parsing.
//!
//! Cedar's parser, validator and evaluator recurse once per level of an
//! expression: 10,000 nested parentheses overflow any thread's stack, and a
//! stack overflow aborts the whole process rather than failing one reload.
//! So a file is first scanned without parsing (brackets outside string
//! literals and comments, and the operators of each policy, which bound how
//! deep its syntax tree can be), parsing then runs on a thread with a large
//! stack ([`LOAD_STACK_BYTES`]), and every parsed policy's real depth is
//! measured so that nothing deeper than [`MAX_EXPRESSION_DEPTH`] ever reaches
//! the request path, whose threads have ordinary stacks.

use super::store::Diagnostic;
use crate::config::line_col;

/// Deepest bracket nesting (`(`, `[`, `{`) accepted in a policy, schema or
/// entities file.
pub const MAX_NESTING: usize = 64;

/// Most operators, keywords and brackets in one policy. Each can add one
/// level to the policy's syntax tree, so this bounds the work (and stack)
/// parsing needs before the real depth is known.
pub const MAX_POLICY_OPERATORS: usize = 2_000;

/// Deepest expression tree (levels of operators, calls, sets, records,
/// `if`) accepted in a policy; deeper ones are refused at load so that
/// evaluation on a request thread stays within its stack.
pub const MAX_EXPRESSION_DEPTH: usize = 128;

/// Stack of the thread that parses and validates a policy directory. The
/// limits above keep the need far below it; it is reserved address space,
/// touched only as used.
pub const LOAD_STACK_BYTES: usize = 256 * 1024 * 1024;

/// Which grammar a file is in, for the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `*.cedar`: `//` comments, string literals, policies ending in `;`.
    Policy,
    /// `*.cedarschema`: `//` comments and string literals.
    Schema,
    /// JSON: string literals only.
    Json,
}

/// Checks `text` against [`MAX_NESTING`] and, for policies,
/// [`MAX_POLICY_OPERATORS`]; the error points at where the limit is passed.
pub fn scan(file: &str, text: &str, syntax: Syntax) -> Result<(), Diagnostic> {
    let bytes = text.as_bytes();
    let at = |offset: usize, message: String| {
        let (line, col) = line_col(text, offset);
        Diagnostic {
            file: file.to_string(),
            line,
            col,
            message,
        }
    };
    let comments = syntax != Syntax::Json;
    let (mut depth, mut operators, mut policy_start) = (0usize, 0usize, 0usize);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'"' => {
                // Skip the string literal, escapes included.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if comments && bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                operators += 1;
                if depth > MAX_NESTING {
                    return Err(at(
                        i,
                        format!(
                            "brackets nest deeper than {MAX_NESTING} levels; flatten the expression"
                        ),
                    ));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b';' if depth == 0 => {
                operators = 0;
                policy_start = i + 1;
            }
            b'!' | b'-' | b'+' | b'*' | b'<' | b'>' | b'=' | b'&' | b'|' | b'.' => operators += 1,
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if matches!(&text[start..i], "if" | "in" | "has" | "like" | "is") {
                    operators += 1;
                }
                continue;
            }
            _ => {}
        }
        if syntax == Syntax::Policy && operators > MAX_POLICY_OPERATORS {
            let start = policy_start
                + (text.len() - policy_start - text[policy_start..].trim_start().len());
            return Err(at(
                start,
                format!(
                    "policy has more than {MAX_POLICY_OPERATORS} operators; split it into several policies"
                ),
            ));
        }
        i += 1;
    }
    Ok(())
}

/// Byte offsets where each policy of a `.cedar` file starts (its first
/// character after the previous policy's `;`), for messages.
pub fn policy_starts(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let (mut starts, mut depth, mut i, mut pending) = (Vec::new(), 0usize, 0, true);
    while i < bytes.len() {
        let b = bytes[i];
        if pending && !b.is_ascii_whitespace() && !(b == b'/' && bytes.get(i + 1) == Some(&b'/')) {
            starts.push(i);
            pending = false;
        }
        match b {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b';' if depth == 0 => pending = true,
            _ => {}
        }
        i += 1;
    }
    starts
}

/// Depth of a JSON value, counted without recursion (a value built by a
/// recursive serializer may be deep).
pub fn json_depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            serde_json::Value::Array(items) => stack.extend(items.iter().map(|x| (x, d + 1))),
            serde_json::Value::Object(map) => stack.extend(map.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    deepest
}

/// Checks the expression depth of a parsed policy through its JSON form,
/// where every expression level is two JSON levels (`{"op": {"left": …}}`)
/// below a fixed envelope.
pub fn check_expression_depth(policy: &cedar_policy::Policy) -> Result<(), String> {
    const ENVELOPE: usize = 4;
    let json = policy
        .to_json()
        .map_err(|e| format!("cannot inspect the policy: {e}"))?;
    let depth = json_depth(&json).saturating_sub(ENVELOPE) / 2;
    if depth > MAX_EXPRESSION_DEPTH {
        return Err(format!(
            "expression nests {depth} levels deep, more than {MAX_EXPRESSION_DEPTH}; split it or use a set (`[..].contains(x)`) instead of long chains"
        ));
    }
    Ok(())
}

/// The start of the message when no loading thread could be started: a
/// transient failure (memory), not a property of the files.
pub const NO_LOAD_THREAD: &str = "cannot start the policy loading thread";

/// Runs `work` on a thread with [`LOAD_STACK_BYTES`] of stack (a quarter of
/// it where the system refuses that much) and waits for it. A thread that
/// cannot start, or that panics, is an error, never a crash of the caller.
pub fn on_load_thread<T, F>(work: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let work = std::sync::Arc::new(std::sync::Mutex::new(Some(work)));
    let mut last = None;
    for stack in [LOAD_STACK_BYTES, LOAD_STACK_BYTES / 4] {
        let job = work.clone();
        let spawned = std::thread::Builder::new()
            .name("policy-load".into())
            .stack_size(stack)
            .spawn(move || {
                let work = job.lock().ok().and_then(|mut w| w.take());
                work.map(|w| w())
            });
        match spawned {
            Ok(handle) => {
                return handle
                    .join()
                    .map_err(|_| "loading panicked; the previous policy set is kept".to_string())?
                    .ok_or_else(|| "loading did not run".to_string());
            }
            Err(e) => last = Some(e),
        }
    }
    Err(format!(
        "{NO_LOAD_THREAD}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_in_strings_and_comments_do_not_count() {
        let deep = "(".repeat(MAX_NESTING + 1);
        let text = format!(
            "// {deep}\npermit (principal, action, resource) when {{ \"{deep}\" == \"\\\"{deep}\" }};"
        );
        assert!(scan("p.cedar", &text, Syntax::Policy).is_ok());
    }

    #[test]
    fn too_deep_brackets_are_refused_where_they_pass_the_limit() {
        let text = format!(
            "\n\npermit (principal, action, resource) when {{ {}1{} }};",
            "(".repeat(10_000),
            ")".repeat(10_000)
        );
        let err = scan("p.cedar", &text, Syntax::Policy).expect_err("too deep");
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("nest deeper than"), "{err}");
        let json = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(scan("entities.json", &json, Syntax::Json).is_err());
    }

    #[test]
    fn long_operator_chains_are_refused_per_policy() {
        let chain = vec!["1"; MAX_POLICY_OPERATORS + 5].join(" + ");
        let text = format!(
            "permit (principal, action, resource);\npermit (principal, action, resource) when {{ {chain} > 0 }};"
        );
        let err = scan("p.cedar", &text, Syntax::Policy).expect_err("too many");
        assert_eq!(err.line, 2, "{err}");
        let short = vec!["1"; 100].join(" + ");
        let text =
            format!("permit (principal, action, resource) when {{ {short} > 0 }};\n").repeat(50);
        assert!(scan("p.cedar", &text, Syntax::Policy).is_ok());
    }

    #[test]
    fn policy_starts_skip_comments_and_strings() {
        let text = "// a;\npermit (principal, action, resource) when { \";\" == \"\" };\n\n@id(\"x\")\nforbid (principal, action, resource);\n";
        let starts = policy_starts(text);
        assert_eq!(starts.len(), 2);
        assert!(text[starts[0]..].starts_with("permit"));
        assert!(text[starts[1]..].starts_with("@id"));
    }

    #[test]
    fn json_depth_counts_levels() {
        assert_eq!(json_depth(&serde_json::json!(1)), 1);
        assert_eq!(json_depth(&serde_json::json!({"a": [1, {"b": 2}]})), 4);
    }
}
