//! `chat_message_added`: appends a message to one of the user's chats (creating the chat when the id is
//! new). SELF `chat_message_confirmed`; OTHERS `chat_message_added`. A repeated `message_id` changes
//! nothing and is confirmed with the original's versions and `"duplicate": true`, without a broadcast.
//! With a webhook URL, a stored message records `message.created` in the same transaction (a
//! duplicate records nothing).

use super::common::{rfc3339, seal_content, secs, write_chat, USER_SENDER};
use super::{Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::store::chats::{WriteOp, WriteResult};
use crate::store::now_millis;
use chatsync_protocol::{
    ChatMessageAdded, ChatMessageConfirmed, ClientTimestamp, Limits, MessageAddedEvent, MessageOut, MessagesVersion,
    ServerMessage,
};

/// Handles `chat_message_added`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: ChatMessageAdded) -> Result<Outcome, Error> {
    let ChatMessageAdded { chat_id, message } = p;
    let size = serde_json::to_vec(&message.content).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > Limits::MAX_MESSAGE_CONTENT_BYTES {
        return Err(Error::limit_exceeded(
            "message.content",
            format!("The message content is larger than {} bytes of JSON.", Limits::MAX_MESSAGE_CONTENT_BYTES),
        )
        .with_chat(chat_id.as_str())
        .with_message(message.message_id.as_str()));
    }
    if message.content.depth() > Limits::MAX_MESSAGE_CONTENT_DEPTH {
        return Err(Error::limit_exceeded(
            "message.content",
            format!(
                "The message content nests objects and arrays deeper than {} levels.",
                Limits::MAX_MESSAGE_CONTENT_DEPTH
            ),
        )
        .with_chat(chat_id.as_str())
        .with_message(message.message_id.as_str()));
    }
    let client_timestamp = match &message.timestamp {
        None => None,
        Some(ts) => Some(
            validated_timestamp(ts)
                .map_err(|e| e.with_chat(chat_id.as_str()).with_message(message.message_id.as_str()))?,
        ),
    };
    let now = now_millis();
    // Built once: the event id stays the same if the write is retried (a chat created meanwhile).
    let event = crate::webhooks::message_created(
        ctx,
        &conn.user_id,
        chat_id.as_str(),
        message.message_id.as_str(),
        &message.content,
        message.timestamp.as_ref(),
    )
    .await?;
    let result = write_chat(ctx, &conn.user_id, chat_id.as_str(), |target, key| WriteOp::Message {
        owner: conn.user_id.clone(),
        chat_id: chat_id.to_string(),
        message_id: message.message_id.to_string(),
        content: seal_content(key, chat_id.as_str(), message.message_id.as_str(), &message.content),
        client_timestamp: client_timestamp.clone(),
        sender: USER_SENDER.to_owned(),
        created_at: now,
        target,
        now,
        event: event.clone(),
    })
    .await?;
    let WriteResult::Message { chat, message: stored, duplicate } = result else {
        return Err(Error::internal(format!("unexpected message result {result:?}")));
    };
    let confirmed = ChatMessageConfirmed {
        chat_id: chat_id.clone(),
        message_id: message.message_id.clone(),
        temp_id: message.temp_id.clone(),
        new_messages_v: if duplicate { stored.seq } else { chat.messages_v },
        new_last_edited_overall_timestamp: secs(if duplicate { stored.created_at_ms } else { chat.last_edited_ms }),
        duplicate,
    };
    let reply = Outcome::reply(ServerMessage::ChatMessageConfirmed(confirmed));
    if duplicate {
        return Ok(reply);
    }
    crate::webhooks::recorded(ctx);
    ctx.cache.message_added(&conn.user_id, chat_id.as_str(), &stored).await;
    let event = MessageAddedEvent {
        chat_id,
        message: MessageOut {
            message_id: message.message_id,
            seq: stored.seq,
            sender_name: USER_SENDER.to_owned(),
            content: message.content,
            created_at: rfc3339(stored.created_at_ms),
            client_timestamp: message.timestamp,
        },
        versions: MessagesVersion { messages_v: chat.messages_v },
        last_edited_overall_timestamp: secs(chat.last_edited_ms),
    };
    Ok(reply.broadcast(Broadcast::Others(ServerMessage::ChatMessageAdded(event))))
}

/// Checks a client timestamp (finite, non-negative unix seconds, or RFC 3339) and returns it as stored.
fn validated_timestamp(ts: &ClientTimestamp) -> Result<String, Error> {
    let ok = match ts {
        ClientTimestamp::Unix(secs) => secs.is_finite() && *secs >= 0.0,
        ClientTimestamp::Text(text) => {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).is_ok()
        }
    };
    if !ok {
        return Err(Error::invalid_payload(
            "message.timestamp",
            "Invalid payload: field `message.timestamp` must be unix seconds or an RFC 3339 date-time.",
        ));
    }
    Ok(serde_json::to_string(ts).expect("a timestamp serializes"))
}
