//! The application-backend API (SERVER_API.md): `/v1/api` on the WebSocket listener, authenticated with
//! API keys, JSON in and out, one file per resource.
//!
//! This file holds what every resource shares: the router (API-key check on every route), [`ApiError`]
//! (the one translation of failures into `{"error":{"code","message","field"?}}` and an HTTP status),
//! the [`Body`] extractor (size limit, `invalid_json` / `invalid_payload` naming the field) and the path id
//! checks. Handlers have the shape `async fn(State<ApiState>, Path<…>, Body<T>) -> ApiResult<impl
//! IntoResponse>` and never see an unvalidated id or an unauthenticated request.

mod devices;
pub mod key_cache;
pub mod keys;
pub mod messages;
pub mod rate;
mod sessions;
mod streams;
mod users;

use crate::handlers::Ctx;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use chatsync_protocol::api::{ApiErrorBody, ApiErrorDetail};
use chatsync_protocol::ChatId;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// Largest accepted request body (SERVER_API.md section 1).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// State of every API handler.
#[derive(Clone)]
pub struct ApiState {
    /// The node's handler context (the same one the WebSocket handlers use).
    pub ctx: Arc<Ctx>,
    /// The per-key request limit (`None`: no limit).
    pub rate: Option<Arc<rate::ApiRateLimit>>,
    /// The node's cache of API keys (cluster nodes only, see [`key_cache`]).
    pub key_cache: Option<Arc<key_cache::KeyCache>>,
    /// The server's tracker of tasks that shutdown waits for (before it closes the store): the requests
    /// run by [`to_completion`] are among them.
    pub tasks: tokio_util::task::TaskTracker,
}

/// Result of an API handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// The `/v1/api` router: every resource's routes behind the API-key check. `tasks` is the server's
/// tracker of the tasks its shutdown waits for.
pub fn router(ctx: Arc<Ctx>, tasks: tokio_util::task::TaskTracker) -> Router {
    let rate = rate::ApiRateLimit::new(ctx.config.api_rate_per_sec, ctx.config.api_rate_burst).map(Arc::new);
    let key_cache = key_cache::KeyCache::from_config(&ctx.config).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no API key cache: every request looks its key up in the store");
        None
    });
    let state = ApiState { ctx, rate, key_cache, tasks };
    let api = Router::new()
        .merge(users::routes())
        .merge(sessions::routes())
        .merge(devices::routes())
        .merge(streams::routes())
        .merge(messages::routes())
        .fallback(|| async { ApiError::not_found("No such endpoint.") })
        // A known path with another method: the same 404 (SERVER_API.md's codes have no 405).
        .method_not_allowed_fallback(|| async { ApiError::not_found("No such endpoint for this method.") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), keys::authenticate))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), to_completion))
        .layer(axum::middleware::map_response(no_store))
        .with_state(state);
    // `nest` routes `/v1/api` and the paths below it, not `/v1/api/`: that one goes to the same router
    // (which has no route for it), so it is authenticated and answered in the API's format too.
    Router::new().nest("/v1/api", api.clone()).route_service("/v1/api/", api.into_service())
}

/// Every API response, errors included, says `Cache-Control: no-store` (a session token or a user's data
/// must stay in no cache between the backend and the server: RFC 9111 section 5.2.2.5, as OAuth token
/// responses do) and `X-Content-Type-Options: nosniff` (a JSON body is never read as anything else).
async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    headers.insert(axum::http::header::X_CONTENT_TYPE_OPTIONS, axum::http::HeaderValue::from_static("nosniff"));
    response
}

/// Runs every request but a `GET` in a task of its own, awaited. hyper drops a request's future when its
/// client goes away, and a write cut there would stay half done: a message committed but never broadcast
/// (its retry is a `duplicate`), a stream taken from the registry but neither completed nor put back. The
/// task is tracked, so a shutdown waits for it (up to `shutdown_timeout_secs`) before it closes the store.
/// A panic in a handler becomes a 500 `internal` instead of a dropped connection.
async fn to_completion(
    axum::extract::State(state): axum::extract::State<ApiState>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() == axum::http::Method::GET {
        return next.run(request).await;
    }
    match state.tasks.spawn(next.run(request)).await {
        Ok(response) => response,
        Err(e) => ApiError::internal(format!("API handler: {e}")).into_response(),
    }
}

/// A failed API request: the status and the error body. Internal detail is logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ApiErrorDetail,
    internal: Option<String>,
    /// Seconds for `Retry-After` (429 only).
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>, field: Option<&str>) -> ApiError {
        let detail = ApiErrorDetail { code: code.to_owned(), message: message.into(), field: field.map(str::to_owned) };
        ApiError { status, detail, internal: None, retry_after: None }
    }

    /// 400 `invalid_json`: the body is not JSON.
    pub fn invalid_json(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message, None)
    }

    /// 400 `invalid_payload` naming `field` (a dotted path, or a path segment).
    pub fn invalid_payload(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_payload", message, Some(field))
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "A valid API key is required (Authorization: Bearer <api key>).",
            None,
        )
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message, None)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message, None)
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large() -> ApiError {
        let message = format!("The request body is larger than {MAX_BODY_BYTES} bytes.");
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message, None)
    }

    /// 422 `limit_exceeded` naming the limit's field.
    pub fn limit_exceeded(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "limit_exceeded", message, Some(field))
    }

    /// 429 `rate_limited` with `Retry-After: secs`.
    pub fn rate_limited(secs: u64) -> ApiError {
        let message = format!("Too many requests with this API key; retry in {secs} s.");
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message, None);
        e.retry_after = Some(secs);
        e
    }

    /// 503 `unavailable`; `detail` is logged.
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "A backend is temporarily unavailable; retry later.",
            None,
        );
        e.internal = Some(detail.into());
        e
    }

    /// 500 `internal`; `detail` is logged.
    pub fn internal(detail: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error.", None);
        e.internal = Some(detail.into());
        e
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &str {
        &self.detail.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(detail) = &self.internal {
            tracing::warn!(code = %self.detail.code, %detail, "API request failed");
        }
        crate::metrics::api_error(&self.detail.code);
        let mut response = (self.status, axum::Json(ApiErrorBody { error: self.detail })).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 9110 section 15.5.2: a 401 MUST carry a challenge; HTTP clients read the scheme from it.
            let challenge = axum::http::HeaderValue::from_static("Bearer realm=\"chatsync\"");
            response.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> ApiError {
        use chatsync_protocol::ErrorCode as C;
        let internal = e.internal_detail().map(str::to_owned);
        let p = e.into_payload();
        let status = match p.code {
            C::InvalidJson | C::InvalidMessage | C::UnknownType | C::InvalidPayload => StatusCode::BAD_REQUEST,
            C::LimitExceeded => StatusCode::UNPROCESSABLE_ENTITY,
            C::NotFound => StatusCode::NOT_FOUND,
            C::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            C::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            C::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut out = ApiError::new(status, p.code.as_str(), p.message, p.field.as_deref());
        out.internal = internal;
        out
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        match e {
            crate::store::StoreError::Unavailable(d) => ApiError::unavailable(d),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// A JSON request body of type `T`: at most [`MAX_BODY_BYTES`] (413), JSON (`invalid_json`), and of the
/// right shape (`invalid_payload` naming the dotted path of the first bad field; unknown fields are bad).
#[derive(Debug, Clone)]
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large()
            } else {
                ApiError::invalid_json("The request body could not be read.")
            }
        })?;
        parse_body(&bytes).map(Body)
    }
}

/// The path's segments (axum's `Path`), with a segment that does not decode (a `%FF`, not UTF-8) refused as
/// 400 `invalid_payload` naming `path`, in the API's error format. The ids in it are checked by the
/// handlers (`path_user_id`, `path_chat_id`, …), which name the segment.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> axum::extract::FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(t)| Path(t))
            .map_err(|_| ApiError::invalid_payload("path", "A path segment is not valid percent-encoded UTF-8."))
    }
}

/// Parses a request body (also for an empty body where every field is optional: `{}`). Every body is a JSON
/// object: serde would also read a struct from an array (its fields by position), so any other JSON value
/// is refused up front (`invalid_payload` naming `body`).
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        return Err(ApiError::invalid_json(format!("The request body is not valid JSON ({e}).")));
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid_payload("body", "The request body must be a JSON object."));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // serde's own message names the problem ("unknown field `x`", "missing field `y`", "invalid type").
        let message = e.inner().to_string();
        let field = error_field(&e.path().to_string(), &message);
        ApiError::invalid_payload(&field, format!("Invalid payload: {message}."))
    })
}

/// The dotted path of the field a body's error is about. serde_path_to_error's path ends at the value being
/// read, which for a missing or a repeated field is the object that holds (or lacks) it (`.` for the body
/// itself): the field is named in serde's message instead ("missing field `x`", "duplicate field `x`"),
/// and is joined to that path.
fn error_field(path: &str, message: &str) -> String {
    let named = ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(f, _)| f);
    match (path, named) {
        (".", Some(field)) => field.to_owned(),
        (".", None) => "body".to_owned(),
        (path, Some(field)) => format!("{path}.{field}"),
        (path, None) => path.to_owned(),
    }
}

pub use crate::cli::{is_device_hash, valid_user_id};

/// A user id from the path (400 naming `user_id` when malformed).
pub fn path_user_id(id: &str) -> ApiResult<String> {
    if valid_user_id(id) {
        Ok(id.to_owned())
    } else {
        Err(ApiError::invalid_payload("user_id", "Invalid user id: use 1-64 characters of [A-Za-z0-9_.@-]."))
    }
}

/// A chat id from the path (400 naming `chat_id` when malformed).
pub fn path_chat_id(id: &str) -> ApiResult<ChatId> {
    ChatId::new(id).map_err(|why| ApiError::invalid_payload("chat_id", format!("Invalid chat id: {why}.")))
}

/// RFC 3339 (UTC, seconds) of a store time, as the API reports times.
pub fn rfc3339(ms: crate::store::Millis) -> String {
    humantime::format_rfc3339_seconds(crate::store::system_time(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::error_field;

    #[test]
    fn a_missing_or_repeated_field_is_named_by_its_whole_path() {
        assert_eq!(error_field(".", "missing field `sender_name` at line 1 column 40"), "sender_name");
        assert_eq!(error_field("a", "missing field `b` at line 1 column 9"), "a.b");
        assert_eq!(error_field("a[0]", "missing field `b`"), "a[0].b");
        assert_eq!(error_field(".", "unknown field `x`, expected `y`"), "body");
        assert_eq!(error_field("seq", "invalid type: string \"1\", expected u64"), "seq");
        assert_eq!(error_field(".", "duplicate field `seq` at line 1 column 14"), "seq");
        assert_eq!(error_field("a", "duplicate field `b`"), "a.b");
    }
}
