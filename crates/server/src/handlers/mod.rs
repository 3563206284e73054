//! The router: one exhaustive `match` over [`ClientMessage`], one file per message type.
//!
//! Every handler has the same shape:
//! `pub async fn handle(ctx: &Ctx, conn: &ConnHandle, payload: T) -> Result<Outcome, Error>`.
//! Handlers return what to send and to whom; they never touch a socket. The gateway encodes the
//! [`Outcome`] (the reply and SELF's copies with the `request_id`, the OTHERS copy once, shared).

mod ping;
mod request_cache_status;

use crate::config::Config;
use crate::error::Error;
use crate::hub::{ConnHandle, Hub};
use crate::store::Store;
use chatsync_protocol::{ClientMessage, Limits, ServerMessage};
use std::sync::Arc;

/// Everything a handler may use. Cheap to clone; no globals.
#[derive(Clone)]
pub struct Ctx {
    /// Durable truth.
    pub store: Arc<dyn Store>,
    /// Delivery to the user's connections.
    pub hub: Arc<dyn Hub>,
    /// The merged configuration.
    pub config: Arc<Config>,
    /// The limits announced in `connected` (from `config`).
    pub limits: Limits,
}

/// A broadcast caused by a request.
#[derive(Debug)]
pub enum Broadcast {
    /// To every other connection of the user.
    Others(ServerMessage),
    /// To every connection of the user; SELF's copy carries the `request_id`.
    All(ServerMessage),
}

/// What a handler wants sent. SELF receives its copies of `broadcasts` first, then `reply`.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Broadcasts, in order.
    pub broadcasts: Vec<Broadcast>,
    /// The direct reply to SELF.
    pub reply: Option<ServerMessage>,
}

impl Outcome {
    /// Only a reply to SELF.
    pub fn reply(message: ServerMessage) -> Outcome {
        Outcome { broadcasts: Vec::new(), reply: Some(message) }
    }

    /// Adds a broadcast.
    pub fn broadcast(mut self, b: Broadcast) -> Outcome {
        self.broadcasts.push(b);
        self
    }
}

/// Routes one decoded message to its handler.
pub async fn dispatch(ctx: &Ctx, conn: &ConnHandle, message: ClientMessage) -> Result<Outcome, Error> {
    match message {
        ClientMessage::Ping(p) => ping::handle(ctx, conn, p).await,
        ClientMessage::RequestCacheStatus(p) => request_cache_status::handle(ctx, conn, p).await,
        // The chat-sync handlers land with the chat-sync issue; until then these answer `unavailable`.
        ClientMessage::InitialSyncRequest(_)
        | ClientMessage::UpdateDraft(_)
        | ClientMessage::DeleteDraft(_)
        | ClientMessage::UpdateTitle(_)
        | ClientMessage::ChatMessageAdded(_)
        | ClientMessage::GetChatMessages(_)
        | ClientMessage::RequestChatContentBatch(_)
        | ClientMessage::DeleteChat(_)
        | ClientMessage::SyncOfflineChanges(_) => Err(Error::unavailable("chat sync is not implemented yet")),
    }
}
