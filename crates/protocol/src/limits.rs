//! The configurable limits announced in `connected` (PROTOCOL.md section 2).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Content and rate limits. The server enforces them and announces them in `connected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
// A limit missing from a greeting (an older or newer server) reads as the protocol's default: a client
// has a value to keep to, rather than failing every connection on the greeting.
#[serde(default)]
pub struct Limits {
    /// Largest accepted text frame, in bytes.
    pub max_frame_bytes: u32,
    /// Longest title, in Unicode scalar values.
    pub max_title_chars: u32,
    /// Longest draft text, in Unicode scalar values.
    pub max_draft_chars: u32,
    /// Most whitespace-separated words in a draft.
    pub max_draft_words: u32,
    /// Most changes in one `sync_offline_changes`.
    pub max_offline_changes: u32,
    /// Most chat ids in one `request_chat_content_batch`.
    pub max_batch_chats: u32,
    /// Most messages in one page (`get_chat_messages`, initial sync, content batch).
    pub max_page_messages: u32,
    /// Sustained requests per second per connection.
    pub rate_per_sec: u32,
    /// Requests a connection may send in a burst above the sustained rate.
    pub rate_burst: u32,
    /// Largest frame the server sends; larger replies are split or shortened ("Bounded replies").
    pub max_reply_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 65_536,
            max_title_chars: 255,
            max_draft_chars: 7_000,
            max_draft_words: 1_000,
            max_offline_changes: 500,
            max_batch_chats: 50,
            max_page_messages: 500,
            rate_per_sec: 100,
            rate_burst: 200,
            max_reply_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// Most entries in `initial_sync_request.chat_versions` (fixed by the protocol).
    pub const MAX_SYNC_CHAT_VERSIONS: usize = 10_000;
    /// Largest `chat_message_added` content, in bytes of JSON (fixed by the protocol).
    pub const MAX_MESSAGE_CONTENT_BYTES: usize = 32 * 1024;
    /// Deepest `chat_message_added` (and server API) content, in levels of nested JSON objects and arrays
    /// as [`json_depth`] counts them (fixed by the protocol). Deeper content would reach a reader's parser
    /// limit (serde_json's 128) once wrapped in the frames that carry it (initial sync, message pages).
    pub const MAX_MESSAGE_CONTENT_DEPTH: usize = 32;
    /// Deepest draft (`update_draft.draft_json`, an offline draft change's `value`), counted like message
    /// content and for the same reason: drafts travel inside `initial_sync_response` (fixed by the protocol).
    pub const MAX_DRAFT_DEPTH: usize = 32;
    /// Default page size of `get_chat_messages`.
    pub const DEFAULT_PAGE_MESSAGES: u32 = 100;
}

/// The nesting depth of a JSON value: the most objects and arrays on one path down from it, itself
/// included (`"x"`, `1` and `null` are 0; `{}` and `[]` are 1; `{"a":[{}]}` is 3). Iterative, so no input
/// can exhaust the stack however deep it is.
pub fn json_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 1)];
    while let Some((value, depth)) = pending.pop() {
        let containers = |v: &&Value| v.is_array() || v.is_object();
        match value {
            Value::Array(items) => pending.extend(items.iter().filter(containers).map(|v| (v, depth + 1))),
            Value::Object(members) => pending.extend(members.values().filter(containers).map(|v| (v, depth + 1))),
            _ => continue,
        }
        deepest = deepest.max(depth);
    }
    deepest
}

/// The nesting depth of a JSON object, as [`json_depth`] of it as a value (at least 1).
pub fn object_depth(members: &Map<String, Value>) -> usize {
    1 + members.values().map(json_depth).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `levels` objects, each the only member of the one around it.
    fn nested(levels: usize) -> Value {
        (1..levels).fold(json!({}), |inner, _| json!({ "a": inner }))
    }

    #[test]
    fn depth_counts_objects_and_arrays_on_the_deepest_path() {
        assert_eq!(json_depth(&json!("x")), 0);
        assert_eq!(json_depth(&json!(null)), 0);
        assert_eq!(json_depth(&json!({})), 1);
        assert_eq!(json_depth(&json!([])), 1);
        assert_eq!(json_depth(&json!({"a": [{}]})), 3);
        assert_eq!(json_depth(&json!({"a": 1, "b": [[1, [2]], {"c": "d"}], "e": {}})), 4);
        for levels in [1, 32, 33, 200] {
            assert_eq!(json_depth(&nested(levels)), levels);
            assert_eq!(object_depth(nested(levels).as_object().unwrap()), levels);
        }
    }

    #[test]
    fn depth_of_input_deeper_than_any_stack_is_counted_without_recursion() {
        // Built by hand (serde_json's parser stops at 128); dropped leaf first, as Value's drop recurses.
        let levels = 100_000;
        let mut deep = json!([]);
        for _ in 1..levels {
            deep = Value::Array(vec![deep]);
        }
        assert_eq!(json_depth(&deep), levels);
        while let Value::Array(mut items) = deep {
            deep = items.pop().unwrap_or(Value::Null);
        }
    }
}
