//! `entities.json`: the entities policies may refer to, checked against the
//! schema one by one so that a problem is reported where it is.

use cedar_policy::{Entities, Schema};

use super::store::{Diagnostic, flatten};
use crate::config::line_col;

/// Parses `entities.json` (`name`, `text`) against `schema`, reporting each
/// bad entity at its own position; `None` when anything is wrong.
pub(super) fn load(
    name: &str,
    text: &str,
    schema: &Schema,
    diags: &mut Vec<Diagnostic>,
) -> Option<Entities> {
    let at = |offset: usize, message: String| {
        let (line, col) = line_col(text, offset);
        Diagnostic {
            file: name.to_string(),
            line,
            col,
            message,
        }
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            diags.push(Diagnostic {
                file: name.to_string(),
                line: e.line(),
                col: e.column(),
                message: e.to_string(),
            });
            return None;
        }
    };
    let Some(items) = value.as_array() else {
        diags.push(at(
            0,
            "entities file must be a JSON array of entities".into(),
        ));
        return None;
    };
    // Check each entity alone first, so a problem is reported where it is.
    let offsets = array_element_offsets(text);
    let before = diags.len();
    for (i, item) in items.iter().enumerate() {
        if let Err(e) =
            Entities::from_json_value(serde_json::Value::Array(vec![item.clone()]), Some(schema))
        {
            let offset = offsets.get(i).copied().unwrap_or(0);
            diags.push(at(offset, format!("entity #{}: {}", i + 1, flatten(&e))));
        }
    }
    if diags.len() > before {
        return None;
    }
    match Entities::from_json_value(value, Some(schema)) {
        Ok(entities) => Some(entities),
        Err(e) => {
            diags.push(at(0, flatten(&e)));
            None
        }
    }
}

/// Byte offsets of the elements of a top-level JSON array.
fn array_element_offsets(text: &str) -> Vec<usize> {
    let mut offsets = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut expecting) = (0usize, false, false, false);
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if expecting && !c.is_whitespace() && c != ']' {
            offsets.push(i);
            expecting = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 && c == '[' {
                    expecting = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    offsets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_offsets_skip_strings_and_nesting() {
        let text = r#"[ {"a": "x,]"}, {"b": [1, 2]} ,3]"#;
        let offs = array_element_offsets(text);
        assert_eq!(offs.len(), 3);
        assert!(text[offs[0]..].starts_with("{\"a\""));
        assert!(text[offs[1]..].starts_with("{\"b\""));
        assert!(text[offs[2]..].starts_with('3'));
    }
}
