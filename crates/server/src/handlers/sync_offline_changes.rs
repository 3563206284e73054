//! `sync_offline_changes`: applies changes a client made offline, in order, each on its own. A change
//! applies only if the component's current version is at most its `version_before_edit` (checked in the
//! write's transaction); otherwise it is a conflict and is discarded. Each applied change is broadcast
//! to ALL as the live message would be; then SELF `offline_sync_complete` with one result per change.

use super::common::{check_draft, check_title, versions};
use super::{delete_draft, update_draft, update_title, Broadcast, Ctx, Outcome};
use crate::error::Error;
use crate::hub::ConnHandle;
use crate::store::chats::WriteResult;
use chatsync_protocol::{
    DraftDeleted, ErrorCode, OfflineChange, OfflineChangeType, OfflineResult, OfflineStatus, OfflineSyncComplete,
    ServerMessage, SyncOfflineChanges,
};
use serde_json::Value;

/// Handles `sync_offline_changes`.
pub async fn handle(ctx: &Ctx, conn: &ConnHandle, p: SyncOfflineChanges) -> Result<Outcome, Error> {
    let max = ctx.limits.max_offline_changes as usize;
    if p.changes.len() > max {
        return Err(Error::limit_exceeded("changes", format!("More than max_offline_changes ({max}) changes.")));
    }
    let mut outcome = Outcome::default();
    let mut summary = OfflineSyncComplete { processed: 0, conflicts: 0, errors: 0, results: Vec::new() };
    for raw in &p.changes {
        let result = match OfflineChange::parse(raw) {
            Err(_) => OfflineResult {
                change_id: raw.get("change_id").and_then(Value::as_str).map(str::to_owned),
                chat_id: raw.get("chat_id").and_then(Value::as_str).map(str::to_owned),
                kind: raw.get("type").and_then(|t| serde_json::from_value(t.clone()).ok()),
                status: OfflineStatus::Error,
                code: Some(ErrorCode::InvalidPayload),
                versions: None,
            },
            Ok(change) => apply(ctx, conn, change, &mut outcome).await,
        };
        match result.status {
            OfflineStatus::Applied => summary.processed += 1,
            OfflineStatus::Conflict => summary.conflicts += 1,
            OfflineStatus::Error => summary.errors += 1,
        }
        summary.results.push(result);
    }
    outcome.replies.push(ServerMessage::OfflineSyncComplete(summary));
    Ok(outcome)
}

/// Applies one valid change, queueing its broadcast on success.
async fn apply(ctx: &Ctx, conn: &ConnHandle, change: OfflineChange, outcome: &mut Outcome) -> OfflineResult {
    let mut result = OfflineResult {
        change_id: change.change_id.clone(),
        chat_id: Some(change.chat_id.to_string()),
        kind: Some(change.kind),
        status: OfflineStatus::Error,
        code: None,
        versions: None,
    };
    match apply_change(ctx, conn, &change).await {
        Ok((WriteResult::Applied(chat), event)) => {
            result.status = OfflineStatus::Applied;
            result.versions = Some(versions(&chat));
            outcome.broadcasts.extend(event.map(Broadcast::All));
        }
        // Deleting a draft that is already gone reaches the state the client wanted: applied, no event,
        // if the client had seen the draft's latest version; otherwise a conflict like any change
        // (PROTOCOL.md: it applies only if the version is at most its `version_before_edit`), so the
        // client learns that the draft moved on meanwhile. A negative `version_before_edit` is below
        // every version: a conflict, as for titles and drafts; except for a chat with nothing in it yet,
        // which this change may just have created (docs/PROTOCOL.md section 8: applied, whatever
        // `version_before_edit` says).
        Ok((WriteResult::NoDraft(chat), _)) => {
            let empty = chat.draft_v == 0 && chat.title_v == 0 && chat.messages_v == 0;
            let current = empty || i64::try_from(chat.draft_v).is_ok_and(|v| v <= change.version_before_edit);
            result.status = if current { OfflineStatus::Applied } else { OfflineStatus::Conflict };
            result.versions = Some(versions(&chat));
        }
        Ok((WriteResult::Conflict(chat), _)) => {
            result.status = OfflineStatus::Conflict;
            result.versions = Some(versions(&chat));
        }
        Ok((other, _)) => {
            tracing::warn!(result = ?other, "unexpected offline change result");
            result.code = Some(ErrorCode::Internal);
        }
        Err(e) => {
            if let Some(detail) = e.internal_detail() {
                tracing::warn!(code = %e.code(), detail, "offline change failed");
            }
            result.code = Some(e.code());
        }
    }
    result
}

async fn apply_change(
    ctx: &Ctx,
    conn: &ConnHandle,
    change: &OfflineChange,
) -> Result<(WriteResult, Option<ServerMessage>), Error> {
    let user = conn.user_id.as_str();
    let chat_id = change.chat_id.as_str();
    let cond = Some(change.version_before_edit);
    match change.kind {
        OfflineChangeType::Title => {
            let title = change.value.as_str().unwrap_or_default();
            check_title(ctx, title, "value")?;
            let written = update_title::apply(ctx, user, chat_id, title, cond).await?;
            let event = match &written {
                WriteResult::Applied(chat) => Some(update_title::event(&change.chat_id, chat, title.to_owned())),
                _ => None,
            };
            Ok((written, event))
        }
        OfflineChangeType::Draft => {
            let draft = change.value.as_object();
            if let Some(d) = draft {
                check_draft(ctx, d, "value")?;
            }
            let written = update_draft::apply(ctx, user, chat_id, draft, cond).await?;
            let event = match &written {
                WriteResult::Applied(chat) => Some(update_draft::event(&change.chat_id, chat, draft.cloned())),
                _ => None,
            };
            Ok((written, event))
        }
        OfflineChangeType::DeleteDraft => {
            let written = delete_draft::apply(ctx, user, chat_id, cond, true).await?;
            let event = match &written {
                WriteResult::Applied(chat) => Some(ServerMessage::DraftDeleted(DraftDeleted {
                    chat_id: change.chat_id.clone(),
                    draft_v: chat.draft_v,
                })),
                _ => None,
            };
            Ok((written, event))
        }
    }
}
