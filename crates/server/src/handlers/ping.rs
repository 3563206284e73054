//! `ping`: liveness check at the protocol level. Replies SELF `pong` `{}`.

use super::{Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use chatsync_protocol::{Empty, ServerMessage};

/// Handles `ping`.
pub async fn handle(_ctx: &Ctx, _conn: &ConnHandle, _payload: Empty) -> Result<Outcome, Error> {
    Ok(Outcome::reply(ServerMessage::Pong(Empty {})))
}
