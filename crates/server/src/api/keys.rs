//! API keys (SERVER_API.md section 1): how they are made (`chatsync api-keys create`) and checked on every
//! `/v1/api` request.
//!
//! A key is `ck_` followed by 32 random bytes in base64url; only its SHA-256 is stored, next to a public
//! id (`ak_…`) used to list and revoke it. A revocation is in force on every node as soon as the command
//! returns: a single node looks every request's key up in the store (the embedded store answers on the
//! calling thread, see `store/sqlite.rs`); a cluster node keeps a cache that a revocation epoch in Redis
//! keeps true (`key_cache.rs`).

use super::{ApiError, ApiState};
use crate::gateway::auth::{bearer_token, token_hash};
use crate::store::{now_millis, Millis, Store, StoreError};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

/// The prefix of every API key. Session tokens start with `cs_`: neither is accepted in the other's place
/// (they live in different tables), and the prefixes tell a human or a secret scanner which is which.
pub const API_KEY_PREFIX: &str = "ck_";

/// `last_used_at` is written at most this often per key (a busy backend does not turn reads into writes).
const TOUCH_EVERY_MS: Millis = 60_000;

/// Creates a key: stores its hash and returns `(key_id, key)`. The key is shown once, never stored.
pub async fn create(store: &dyn Store, name: Option<&str>) -> Result<(String, String), StoreError> {
    let bytes: [u8; 32] = rand::random();
    let key = format!("{API_KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let key_id = format!("ak_{}", uuid::Uuid::new_v4().simple());
    store.create_api_key(&key_id, &token_hash(&key), name, now_millis()).await?;
    Ok((key_id, key))
}

/// Middleware: lets a request through only with `Authorization: Bearer <api key>` naming an unrevoked
/// key; 401 `unauthorized` otherwise (the same answer for a missing, malformed, unknown or revoked key).
/// With `--api-rate-per-sec`, a key over its rate gets 429 `rate_limited` ([`super::rate`]).
pub async fn authenticate(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    // The scheme is case-insensitive (`BEARER` too), as on `/v1/ws`: one reader for both.
    let Some(presented) = bearer_token(req.headers()) else {
        return ApiError::unauthorized().into_response();
    };
    let hash = token_hash(&presented);
    let looked_up = match &state.key_cache {
        Some(cache) => {
            let bus_up = state.ctx.bus.as_ref().is_some_and(|bus| bus.is_healthy());
            cache.lookup(state.ctx.store.as_ref(), &hash, bus_up).await
        }
        None => state.ctx.store.api_key_by_hash(&hash).await,
    };
    let key = match looked_up {
        Ok(Some(key)) if key.revoked_at.is_none() => key,
        Ok(_) => {
            tracing::info!(method = %req.method(), path = %req.uri().path(), "API request refused: unknown or revoked key");
            return ApiError::unauthorized().into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    if let Some(limit) = &state.rate {
        if let Err(secs) = limit.charge(&key.key_id, std::time::Instant::now()) {
            return ApiError::rate_limited(secs).into_response();
        }
    }
    let now = now_millis();
    if key.last_used_at.is_none_or(|t| now - t >= TOUCH_EVERY_MS) {
        if let Some(cache) = &state.key_cache {
            cache.touched(&hash, now);
        }
        let store = state.ctx.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.touch_api_key(&key.key_id, now).await {
                tracing::debug!(error = %e, "cannot record API key use");
            }
        });
    }
    let response = next.run(req).await;
    metrics::counter!(crate::metrics::API_REQUESTS, "status" => response.status().as_u16().to_string()).increment(1);
    response
}
