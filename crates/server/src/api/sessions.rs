//! Sessions (SERVER_API.md section 2): issue a session token, revoke a session. A revocation (here or of a
//! device, `devices.rs`) closes the sessions' sockets with 1008 `Session revoked` on this
//! node at once, on the other nodes through the bus, and (as a fallback when the bus is down) at every
//! node's next revocation poll.

use super::Path;
use super::{path_user_id, rfc3339, ApiError, ApiResult, ApiState, Body};
use crate::gateway::auth;
use crate::handlers::Ctx;
use crate::hub::CloseReason;
use crate::store::{now_millis, StoreError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use chatsync_protocol::api::{CreateSession, SessionCreated};
use std::time::Duration;

/// Lifetime of a session issued without `ttl_secs` (as `chatsync sessions issue`).
const DEFAULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest accepted `ttl_secs` (ten years).
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// The routes of this resource.
pub fn routes() -> Router<ApiState> {
    Router::new().route("/users/{user_id}/sessions", post(issue)).route("/sessions/{session_id}", delete(revoke))
}

async fn issue(
    State(s): State<ApiState>,
    Path(user_id): Path<String>,
    Body(body): Body<CreateSession>,
) -> ApiResult<(StatusCode, Json<SessionCreated>)> {
    let user_id = path_user_id(&user_id)?;
    let device_hash = match &body.device_id {
        None => None,
        Some(id) => Some(auth::device_hash_for_id(id).ok_or_else(|| {
            ApiError::invalid_payload("device_id", "Invalid device id: use 1-128 printable ASCII characters.")
        })?),
    };
    let ttl = match body.ttl_secs {
        None => DEFAULT_TTL,
        Some(0) => return Err(ApiError::invalid_payload("ttl_secs", "ttl_secs must be greater than zero.")),
        Some(t) if t > MAX_TTL_SECS => {
            return Err(ApiError::invalid_payload("ttl_secs", format!("ttl_secs must be at most {MAX_TTL_SECS}.")))
        }
        Some(t) => Duration::from_secs(t),
    };
    let (token, mut session) = auth::new_session(&user_id, device_hash, ttl);
    session.device_label = body.device_id;
    match s.ctx.store.create_session(&session).await {
        Ok(()) => Ok((
            StatusCode::CREATED,
            Json(SessionCreated { session_id: session.session_id, token, expires_at: session.expires_at.map(rfc3339) }),
        )),
        Err(StoreError::NotFound) => Err(ApiError::not_found("No user has this id.")),
        Err(e) => Err(e.into()),
    }
}

async fn revoke(State(s): State<ApiState>, Path(session_id): Path<String>) -> ApiResult<StatusCode> {
    let valid =
        !session_id.is_empty() && session_id.len() <= 64 && session_id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !valid {
        return Err(ApiError::invalid_payload("session_id", "Invalid session id."));
    }
    match s.ctx.store.revoke_session_by_id(&session_id, now_millis()).await? {
        None => Err(ApiError::not_found("No session has this id.")),
        Some(_) => {
            close_everywhere(&s.ctx, vec![session_id]).await;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// Closes the sessions' connections on this node now and tells the other nodes through the bus.
pub(super) async fn close_everywhere(ctx: &Ctx, session_ids: Vec<String>) {
    ctx.hub.close_sessions(&session_ids, CloseReason::SESSION_REVOKED).await;
    if let Some(bus) = &ctx.bus {
        bus.publish_control(crate::cluster::BusMessage::SessionsRevoked { session_ids });
    }
}
