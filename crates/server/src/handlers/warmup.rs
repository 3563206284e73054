//! Server-initiated warm-up (no wire request): when a user connects and their cache is not warm, load
//! the most recently edited chat first (then ALL `priority_chat_ready` `{"chat_id"}`), then the whole
//! chat list and the most recent chats' messages (then ALL `cache_primed` `{"status":"full_sync_ready"}`).
//! One warm-up runs per user at a time; a warm-up overtaken by writes starts over (a few times at most),
//! and the user's last connection on this node closing cancels it.

use super::common::chat_id;
use super::Ctx;
use crate::cache::LoadToken;
use crate::error::Error;
use crate::hub::Audience;
use chatsync_protocol::{encode, CachePrimed, PriorityChatReady, ServerMessage};

/// Chats whose recent messages are loaded.
const WARM_CHATS: usize = 10;
/// Attempts before giving up (the next connection tries again).
const ATTEMPTS: usize = 3;

/// Warms the user's cache if needed, announcing progress to all of the user's connections. Stops as
/// soon as the user's last connection on this node closes.
pub async fn run(ctx: &Ctx, user_id: &str) {
    let Some(claim) = ctx.cache.begin_warm(user_id).await else { return };
    let primed = tokio::select! {
        _ = claim.cancelled.cancelled() => {
            tracing::debug!("warm-up cancelled: the user's last connection closed");
            return;
        }
        primed = attempts(ctx, user_id, claim.token) => primed,
    };
    ctx.cache.end_warm(user_id, &claim, primed).await;
    if primed {
        let done = ServerMessage::CachePrimed(CachePrimed { status: "full_sync_ready".into() });
        ctx.hub.deliver(user_id, Audience::All, encode(&done, None).into()).await;
    }
}

/// Up to [`ATTEMPTS`] loads; whether one was stored.
async fn attempts(ctx: &Ctx, user_id: &str, mut token: LoadToken) -> bool {
    let mut announced = false;
    for _ in 0..ATTEMPTS {
        match warm(ctx, user_id, token, &mut announced).await {
            Ok(true) => return true,
            Ok(false) => token = ctx.cache.begin_load(user_id).await,
            Err(e) => {
                tracing::warn!(code = %e.code(), detail = e.internal_detail().unwrap_or(""), "cache warm-up failed");
                return false;
            }
        }
    }
    false
}

/// One attempt; `Ok(false)` when a write overtook the load.
async fn warm(ctx: &Ctx, user_id: &str, token: LoadToken, announced: &mut bool) -> Result<bool, Error> {
    let chats = ctx.chats.chats(user_id).await?;
    let page = ctx.limits.max_page_messages;
    for (i, chat) in chats.iter().take(WARM_CHATS).enumerate() {
        if let Some((_, messages)) = ctx.chats.latest_messages(user_id, &chat.chat_id, page).await? {
            ctx.cache.put_messages(user_id, token, &chat.chat_id, messages).await;
        }
        if i == 0 && !*announced {
            *announced = true;
            let ready = ServerMessage::PriorityChatReady(PriorityChatReady { chat_id: chat_id(&chat.chat_id)? });
            ctx.hub.deliver(user_id, Audience::All, encode(&ready, None).into()).await;
        }
    }
    ctx.pauses.at(crate::pause::WARMUP_LOADED).await;
    Ok(ctx.cache.put_chats(user_id, token, chats).await)
}
