//! `request_cache_status`: whether the server-side warm-up of the user's cache has finished.
//! Replies SELF `cache_status_response` `{"is_primed"}`.
//!
//! Until the cache lands (chat-sync issue) there is nothing to warm, and the answer is `false`.

use super::{Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use chatsync_protocol::{CacheStatusResponse, Empty, ServerMessage};

/// Handles `request_cache_status`.
pub async fn handle(_ctx: &Ctx, _conn: &ConnHandle, _payload: Empty) -> Result<Outcome, Error> {
    Ok(Outcome::reply(ServerMessage::CacheStatusResponse(CacheStatusResponse { is_primed: false })))
}
