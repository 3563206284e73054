//! Users (SERVER_API.md section 2): `POST /v1/api/users`, `GET /v1/api/users/{user_id}`.

use super::Path;
use super::{path_user_id, rfc3339, valid_user_id, ApiError, ApiResult, ApiState, Body};
use crate::store::{now_millis, StoreError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chatsync_protocol::api::{CreateUser, UserCreated, UserInfo};

/// The routes of this resource.
pub fn routes() -> Router<ApiState> {
    Router::new().route("/users", post(create)).route("/users/{user_id}", get(show))
}

async fn create(State(s): State<ApiState>, Body(body): Body<CreateUser>) -> ApiResult<(StatusCode, Json<UserCreated>)> {
    if !valid_user_id(&body.user_id) {
        return Err(ApiError::invalid_payload("user_id", "Invalid user id: use 1-64 characters of [A-Za-z0-9_.@-]."));
    }
    match s.ctx.store.create_user(&body.user_id, body.tfa, now_millis()).await {
        Ok(()) => {
            // The user's data key now, not in its first write (the user exists whatever comes of it).
            s.ctx.keys.ensure_user_key(s.ctx.chats.as_ref(), &body.user_id).await;
            Ok((StatusCode::CREATED, Json(UserCreated { user_id: body.user_id })))
        }
        Err(StoreError::AlreadyExists) => Err(ApiError::conflict("A user with this id exists.")),
        Err(e) => Err(e.into()),
    }
}

async fn show(State(s): State<ApiState>, Path(user_id): Path<String>) -> ApiResult<Json<UserInfo>> {
    let user_id = path_user_id(&user_id)?;
    let Some(summary) = s.ctx.store.user_summary(&user_id).await? else {
        return Err(ApiError::not_found("No user has this id."));
    };
    Ok(Json(UserInfo {
        user_id: summary.user.user_id,
        tfa: summary.user.tfa_enabled,
        created_at: rfc3339(summary.user.created_at),
        chat_count: summary.chat_count,
        device_count: summary.device_count,
    }))
}
