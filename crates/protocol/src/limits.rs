//! The configurable limits announced in `connected` (PROTOCOL.md section 2).

use serde::{Deserialize, Serialize};

/// Content and rate limits. The server enforces them and announces them in `connected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
    /// Default page size of `get_chat_messages`.
    pub const DEFAULT_PAGE_MESSAGES: u32 = 100;
}
