//! Devices (SERVER_API.md section 2): list a user's devices, revoke one (every session bound to it; their
//! sockets close as for a session revocation, see `sessions.rs`).

use super::sessions::close_everywhere;
use super::Path;
use super::{path_user_id, rfc3339, ApiError, ApiResult, ApiState};
use crate::store::now_millis;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use chatsync_protocol::api::{DeviceInfo, DeviceList};

/// The routes of this resource.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/users/{user_id}/devices", get(devices))
        .route("/users/{user_id}/devices/{device_hash}", delete(revoke_device))
}

async fn devices(State(s): State<ApiState>, Path(user_id): Path<String>) -> ApiResult<Json<DeviceList>> {
    let user_id = path_user_id(&user_id)?;
    if s.ctx.store.user(&user_id).await?.is_none() {
        return Err(ApiError::not_found("No user has this id."));
    }
    let devices = s.ctx.store.devices(&user_id).await?;
    Ok(Json(DeviceList {
        devices: devices
            .into_iter()
            .map(|d| DeviceInfo {
                device_hash: d.device_hash,
                first_seen: rfc3339(d.first_seen),
                last_seen: rfc3339(d.last_seen),
            })
            .collect(),
    }))
}

async fn revoke_device(
    State(s): State<ApiState>,
    Path((user_id, device_hash)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let user_id = path_user_id(&user_id)?;
    if !super::is_device_hash(&device_hash) {
        return Err(ApiError::invalid_payload("device_hash", "Invalid device hash: use 64 lowercase hex characters."));
    }
    // The sessions first: a session is bound to its device by its first connection, at authentication,
    // and the device is recorded only when a connection is admitted (a cap may refuse it, or it may be
    // in between), so a device the list lacks can still have a session bound to it.
    let ids = s.ctx.store.revoke_device(&user_id, &device_hash, now_millis()).await?;
    if !ids.is_empty() {
        close_everywhere(&s.ctx, ids).await;
        return Ok(StatusCode::NO_CONTENT);
    }
    // Known: listed, or named by one of the user's sessions (a retry after its sessions were revoked).
    let listed = s.ctx.store.devices(&user_id).await?.iter().any(|d| d.device_hash == device_hash);
    let known = listed
        || s.ctx.store.sessions_of(&user_id).await?.iter().any(|x| x.device_hash.as_deref() == Some(&device_hash));
    if !known {
        return Err(ApiError::not_found("The user has no device with this hash."));
    }
    Ok(StatusCode::NO_CONTENT)
}
