//! `request_cache_status`: whether the server-side warm-up of the user's cache has finished.
//! SELF `cache_status_response` `{"is_primed"}`.

use super::{Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use chatsync_protocol::{CacheStatusResponse, Empty, ServerMessage};

/// Handles `request_cache_status`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, _payload: Empty) -> Result<Outcome, Error> {
    let is_primed = ctx.cache.is_primed(&conn.user_id).await;
    Ok(Outcome::reply(ServerMessage::CacheStatusResponse(CacheStatusResponse { is_primed })))
}
