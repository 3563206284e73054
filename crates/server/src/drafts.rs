//! Draft text extraction and the draft limits (`max_draft_chars`, `max_draft_words`, and the fixed
//! nesting depth `Limits::MAX_DRAFT_DEPTH`), as pure functions.
//!
//! A draft is a JSON document (usually Tiptap). Its text is the string `text` member of every object at
//! any depth (the root's own `text` first), joined with single spaces and trimmed. `update_draft` and
//! `sync_offline_changes` check it through `handlers::common::check_draft`; the fuzz target `draft_text`
//! and the unit tests below call these functions directly.

use serde_json::{Map, Value};

/// Which draft limit a document exceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftLimit {
    /// Objects and arrays nested deeper than `Limits::MAX_DRAFT_DEPTH`.
    Depth,
    /// More Unicode scalar values than `max_draft_chars`.
    Chars,
    /// More whitespace-separated words than `max_draft_words`.
    Words,
}

/// The text of a draft: every string `text` member at any depth, joined with single spaces, trimmed.
pub fn draft_text(draft: &Map<String, Value>) -> String {
    fn collect<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(t)) = m.get("text") {
                    out.push(t);
                }
                for child in m.values() {
                    collect(child, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|x| collect(x, out)),
            _ => {}
        }
    }
    let mut parts = Vec::new();
    for v in draft.values() {
        collect(v, &mut parts);
    }
    if let Some(Value::String(t)) = draft.get("text") {
        parts.insert(0, t);
    }
    parts.join(" ").trim().to_owned()
}

/// Checks a draft's depth against `Limits::MAX_DRAFT_DEPTH`, then its text against `max_chars` (Unicode
/// scalar values) and `max_words` (whitespace-separated words); characters are checked before words.
pub fn check_limits(draft: &Map<String, Value>, max_chars: usize, max_words: usize) -> Result<(), DraftLimit> {
    if chatsync_protocol::object_depth(draft) > chatsync_protocol::Limits::MAX_DRAFT_DEPTH {
        return Err(DraftLimit::Depth);
    }
    let text = draft_text(draft);
    if text.chars().count() > max_chars {
        return Err(DraftLimit::Chars);
    }
    if text.split_whitespace().count() > max_words {
        return Err(DraftLimit::Words);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn text_of_nested_nodes_joined_and_trimmed() {
        let doc = map(json!({"text": " root ", "content": [
            {"type": "paragraph", "content": [{"type": "text", "text": "hello"}, {"text": 5}]},
            {"type": "text", "text": "world "}
        ]}));
        assert_eq!(draft_text(&doc), "root  hello world");
        assert_eq!(draft_text(&map(json!({"type": "doc"}))), "");
    }

    #[test]
    fn limits() {
        let doc = map(json!({"content": [{"text": "a bb ccc"}]}));
        assert_eq!(check_limits(&doc, 8, 3), Ok(()));
        assert_eq!(check_limits(&doc, 7, 3), Err(DraftLimit::Chars));
        assert_eq!(check_limits(&doc, 8, 2), Err(DraftLimit::Words));
        assert_eq!(check_limits(&map(json!({"text": "ééé"})), 3, 1), Ok(()));
        let nested = |levels: usize| (1..levels).fold(json!({"text": "a"}), |inner, _| json!({"a": inner}));
        let max = chatsync_protocol::Limits::MAX_DRAFT_DEPTH;
        assert_eq!(check_limits(&map(nested(max)), 8, 3), Ok(()));
        assert_eq!(check_limits(&map(nested(max + 1)), 8, 3), Err(DraftLimit::Depth));
    }
}
