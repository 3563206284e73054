//! The router: one exhaustive `match` over [`ClientMessage`], one file per message type.
//!
//! Every handler has the same shape:
//! `pub async fn handle(ctx: &Ctx, conn: &ConnHandle, payload: T) -> Result<Outcome, Error>`.
//! Handlers return what to send and to whom; they never touch a socket. The gateway encodes the
//! [`Outcome`] (the reply and SELF's copies with the `request_id`, the OTHERS copy once, shared).

mod bounded;
mod cancel_stream;
mod chat_message_added;
pub mod common;
mod delete_chat;
mod delete_draft;
mod get_chat_messages;
mod initial_sync_request;
mod mark_read;
mod ping;
mod request_cache_status;
mod request_chat_content_batch;
mod sync_offline_changes;
mod update_draft;
mod update_title;
pub mod warmup;

use crate::cache::Cache;
use crate::config::Config;
use crate::error::Error;
use crate::hub::{ConnHandle, Hub};
use crate::keys::Keyring;
use crate::pause::PausePoints;
use crate::store::chats::ChatStore;
use crate::store::Store;
use chatsync_protocol::{ClientMessage, Limits, ServerMessage};
use std::sync::Arc;

/// Everything a handler may use. Cheap to clone; no globals.
#[derive(Clone)]
pub struct Ctx {
    /// Durable truth for users, sessions and devices.
    pub store: Arc<dyn Store>,
    /// Durable truth for chats, messages and wrapped keys.
    pub chats: Arc<dyn ChatStore>,
    /// The webhook outbox (whatever the configuration; read and written only with a webhook URL).
    pub events: Arc<dyn crate::store::events::EventStore>,
    /// Webhook state, when a webhook URL is configured (SERVER_API.md section 5; see `webhooks/`).
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// Fast copy of chat lists and recent messages (ciphertext only).
    pub cache: Arc<dyn Cache>,
    /// Master key and unwrapped data keys (process memory only).
    pub keys: Arc<Keyring>,
    /// The data directory lock, held while this context serves (see [`crate::datadir`]).
    pub data_dir_lock: Arc<crate::datadir::DataDirLock>,
    /// The cluster bus (`None` on a single node).
    pub bus: Option<Arc<crate::cluster::Bus>>,
    /// Delivery to the user's connections.
    pub hub: Arc<dyn Hub>,
    /// The merged configuration.
    pub config: Arc<Config>,
    /// The limits announced in `connected` (from `config`).
    pub limits: Limits,
    /// The verifier of JWT connection tokens, when configured (SERVER_API.md section 6).
    pub jwt: Option<Arc<crate::gateway::jwt::JwtVerifier>>,
    /// Pause points for deterministic race tests (never armed in production).
    pub pauses: Arc<PausePoints>,
    /// The open streams (SERVER_API.md section 4): memory, or Redis in a cluster.
    pub streams: Arc<dyn crate::streams::StreamRegistry>,
}

/// A broadcast caused by a request.
#[derive(Debug)]
pub enum Broadcast {
    /// To every other connection of the user.
    Others(ServerMessage),
    /// To every connection of the user; SELF's copy carries the `request_id`.
    All(ServerMessage),
}

/// What a handler wants sent. SELF receives its copies of `broadcasts` first, then `replies`, then the
/// `lazy` parts.
#[derive(Default)]
pub struct Outcome {
    /// Broadcasts, in order.
    pub broadcasts: Vec<Broadcast>,
    /// The direct reply to SELF: one frame, or the parts of a bounded reply, in order.
    pub replies: Vec<ServerMessage>,
    /// Parts of a reply made one at a time, each when the client has room for it, so that a big reply
    /// never sits in memory whole. An error ends the reply (the client discards the parts it got).
    pub lazy: Option<LazyParts>,
}

/// See [`Outcome::lazy`].
pub type LazyParts = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<ServerMessage, Error>> + Send>>;

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("broadcasts", &self.broadcasts)
            .field("replies", &self.replies)
            .field("lazy", &self.lazy.is_some())
            .finish()
    }
}

impl Outcome {
    /// Only a reply to SELF.
    pub fn reply(message: ServerMessage) -> Outcome {
        Outcome { replies: vec![message], ..Outcome::default() }
    }

    /// A reply in several parts.
    pub fn parts(parts: Vec<ServerMessage>) -> Outcome {
        Outcome { replies: parts, ..Outcome::default() }
    }

    /// A reply whose parts are made as the client takes them.
    pub fn lazy(parts: LazyParts) -> Outcome {
        Outcome { lazy: Some(parts), ..Outcome::default() }
    }

    /// Adds a broadcast.
    pub fn broadcast(mut self, b: Broadcast) -> Outcome {
        self.broadcasts.push(b);
        self
    }
}

/// Routes one decoded message to its handler. Exhaustive: a new message type does not compile
/// until it has a handler.
pub async fn dispatch(ctx: &Ctx, conn: &ConnHandle, message: ClientMessage) -> Result<Outcome, Error> {
    // Every failure names the chat and message the request named (PROTOCOL.md section 4), also one that
    // comes from below the handler (the store, the keyring): without a `request_id`, that is how a
    // client tells which of its pipelined writes failed. Taken before the payload moves.
    let (chat_id, message_id) = context(&message);
    route(ctx, conn, message).await.map_err(|e| e.with_context(chat_id.as_deref(), message_id.as_deref()))
}

/// The chat and message ids a request names, for its errors' context, also of a request that the rate
/// limit dropped before dispatch (`gateway/connection.rs`). (An initial sync, a content batch and an
/// offline batch name no single chat; each offline change's result carries its own.)
pub fn context(message: &ClientMessage) -> (Option<String>, Option<String>) {
    let chat = |id: &chatsync_protocol::ChatId| Some(id.to_string());
    match message {
        ClientMessage::UpdateDraft(p) => (chat(&p.chat_id), None),
        ClientMessage::DeleteDraft(p) => (chat(&p.chat_id), None),
        ClientMessage::UpdateTitle(p) => (chat(&p.chat_id), None),
        ClientMessage::ChatMessageAdded(p) => (chat(&p.chat_id), Some(p.message.message_id.to_string())),
        ClientMessage::GetChatMessages(p) => (chat(&p.chat_id), None),
        ClientMessage::DeleteChat(p) => (chat(&p.chat_id), None),
        ClientMessage::CancelStream(p) => (chat(&p.chat_id), None),
        ClientMessage::MarkRead(p) => (chat(&p.chat_id), None),
        ClientMessage::Ping(_)
        | ClientMessage::InitialSyncRequest(_)
        | ClientMessage::RequestChatContentBatch(_)
        | ClientMessage::SyncOfflineChanges(_)
        | ClientMessage::RequestCacheStatus(_) => (None, None),
    }
}

/// The exhaustive `match` of [`dispatch`].
async fn route(ctx: &Ctx, conn: &ConnHandle, message: ClientMessage) -> Result<Outcome, Error> {
    match message {
        ClientMessage::Ping(p) => ping::handle(ctx, conn, p).await,
        ClientMessage::InitialSyncRequest(p) => initial_sync_request::handle(ctx, conn, p).await,
        ClientMessage::UpdateDraft(p) => update_draft::handle(ctx, conn, p).await,
        ClientMessage::DeleteDraft(p) => delete_draft::handle(ctx, conn, p).await,
        ClientMessage::UpdateTitle(p) => update_title::handle(ctx, conn, p).await,
        ClientMessage::ChatMessageAdded(p) => chat_message_added::handle(ctx, conn, p).await,
        ClientMessage::GetChatMessages(p) => get_chat_messages::handle(ctx, conn, p).await,
        ClientMessage::RequestChatContentBatch(p) => request_chat_content_batch::handle(ctx, conn, p).await,
        ClientMessage::DeleteChat(p) => delete_chat::handle(ctx, conn, p).await,
        ClientMessage::SyncOfflineChanges(p) => sync_offline_changes::handle(ctx, conn, p).await,
        ClientMessage::RequestCacheStatus(p) => request_cache_status::handle(ctx, conn, p).await,
        ClientMessage::CancelStream(p) => cancel_stream::handle(ctx, conn, p).await,
        ClientMessage::MarkRead(p) => mark_read::handle(ctx, conn, p).await,
    }
}
