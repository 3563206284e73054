//! Authentication and device binding during the upgrade (PROTOCOL.md section 2).
//!
//! The token comes from the `auth_refresh_token` cookie, then `Authorization: Bearer`, then the
//! `token` query parameter. Only SHA-256(token) is looked up. A failure is a [`CloseReason`], sent
//! after the upgrade so browsers can read it. Tokens never reach a log line.
//!
//! With JWT connection tokens configured ([`Ctx::jwt`]), a token shaped like a JWT (two dots:
//! [`jwt::looks_like_jwt`]; session tokens have none) is verified as a JWT and never looked up as a
//! session; every other token is a session token as before. Without that configuration every token is
//! a session token.

use super::jwt::{self, JwtVerifier};
use crate::handlers::Ctx;
use crate::hub::CloseReason;
use crate::store::{now_millis, Millis, NewSession, Session, Store, StoreError};
use axum::http::{header, HeaderMap};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Longest token accepted; longer ones are `Invalid session` without being hashed.
const MAX_TOKEN_LEN: usize = 1024;

/// The prefix of every session token issued (`cs_` + 43 characters of base64url). It keeps tokens from
/// starting with `-` (which command lines read as a flag) and lets secret scanners recognise a leaked
/// token. Validation does not require it: only SHA-256(token) is stored, so tokens issued before the
/// prefix existed keep working.
pub const TOKEN_PREFIX: &str = "cs_";

/// The query parameters the endpoint reads.
#[derive(Debug, Default, Deserialize)]
pub struct WsQuery {
    /// Token, for clients that can set neither cookie nor header.
    pub token: Option<String>,
    /// Device id, for clients that cannot set `X-Device-Id`.
    pub device_id: Option<String>,
}

impl WsQuery {
    /// The parameters read from the query's pairs. A parameter given twice counts with its first value, as
    /// a repeated header or cookie does (read as a struct, a repeated one failed the whole query, which then
    /// silently fell back to the fingerprint for the device and lost the query token).
    pub fn from_pairs(pairs: Vec<(String, String)>) -> WsQuery {
        let mut query = WsQuery::default();
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "token" => &mut query.token,
                "device_id" => &mut query.device_id,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        query
    }
}

/// What the client presented.
pub struct Credentials {
    token: Option<String>,
    /// The token came from the `auth_refresh_token` cookie (see [`Credentials::from_cookie`]).
    from_cookie: bool,
    /// `None` when the client sent a malformed device id.
    device: Option<String>,
    /// The device id the client gave, when valid (kept as the device's label).
    device_id: Option<String>,
    /// The client named its device (`X-Device-Id` / `device_id`) rather than being fingerprinted.
    explicit_device: bool,
}

/// The outcome of a successful authentication.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Session id.
    pub session_id: String,
    /// User id.
    pub user_id: String,
    /// Device fingerprint hash.
    pub device_hash: String,
    /// When the credential stops being valid while connected (a JWT's `exp` plus the leeway, unix
    /// milliseconds); `None` for session tokens, whose expiry is checked when connecting.
    pub expires_at: Option<Millis>,
    /// The device's label (the client's device id, or a JWT's `device` claim), recorded with the device
    /// once the connection is registered (a connection refused by a cap records no device).
    pub device_label: Option<String>,
    /// For a session token: what to check again once the connection is registered ([`Recheck`]).
    pub recheck: Option<Recheck>,
    /// The user of a JWT does not exist yet: it is created by the admission, once the connection is
    /// registered (SERVER_API.md section 6: "on first successful connection"), so that a connection refused
    /// meanwhile (`Server overloaded`) creates none.
    pub create_user: bool,
}

/// A session read before its connection was registered may have been revoked in between, by a
/// revocation that looked for the connection before it was there: the hub's count of session closes
/// when the session was read ([`crate::hub::Hub::revocations`]), and the token's hash to read it again
/// when that count moved.
#[derive(Debug, Clone, Copy)]
pub struct Recheck {
    /// The hub's count of session closes before the session was read.
    pub revocations: u64,
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
}

/// Lowercase hex SHA-256 of `input`.
pub fn sha256_hex(input: &str) -> String {
    hex::encode(Sha256::digest(input.as_bytes()))
}

/// SHA-256 of a token, as stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The device hash for an explicit device id (`X-Device-Id`, `device_id`, `--device-id`).
/// `None` when the id is not 1-128 printable ASCII characters.
pub fn device_hash_for_id(device_id: &str) -> Option<String> {
    let ok = !device_id.is_empty() && device_id.len() <= 128 && device_id.bytes().all(|b| (0x20..=0x7e).contains(&b));
    ok.then(|| sha256_hex(&format!("id:{device_id}")))
}

/// A fresh random token ([`TOKEN_PREFIX`] then 32 random bytes in base64url) and the session record
/// that stores only its hash.
pub fn new_session(user_id: &str, device_hash: Option<String>, ttl: std::time::Duration) -> (String, NewSession) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let now = now_millis();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let session = NewSession {
        session_id: uuid::Uuid::new_v4().simple().to_string(),
        token_hash: token_hash(&token),
        user_id: user_id.to_owned(),
        device_hash,
        device_label: None,
        created_at: now,
        expires_at: Some(now.saturating_add(ttl_ms)),
    };
    (token, session)
}

/// Issues a session for `user_id` (optionally bound to a device) and returns its token.
/// Fails with [`StoreError::NotFound`] for an unknown user.
pub async fn issue_session(
    store: &dyn Store,
    user_id: &str,
    device_hash: Option<String>,
    ttl: std::time::Duration,
) -> Result<String, StoreError> {
    let (token, session) = new_session(user_id, device_hash, ttl);
    store.create_session(&session).await?;
    Ok(token)
}

/// Reads the token and device fingerprint from the upgrade request.
pub fn credentials(headers: &HeaderMap, query: &WsQuery) -> Credentials {
    let cookie = cookie_token(headers);
    let from_cookie = cookie.is_some();
    let token = cookie.or_else(|| bearer_token(headers)).or_else(|| query.token.clone().filter(|t| !t.is_empty()));
    let explicit_id = headers
        .get("x-device-id")
        .map(|v| std::str::from_utf8(v.as_bytes()).ok().map(str::to_owned))
        .or_else(|| query.device_id.clone().map(Some));
    let mut device_id = None;
    let explicit_device = explicit_id.is_some();
    let device = match explicit_id {
        Some(Some(id)) => {
            let hash = device_hash_for_id(&id);
            device_id = hash.is_some().then_some(id);
            hash
        }
        Some(None) => None,
        None => {
            let text = |name| {
                headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).unwrap_or_default()
            };
            Some(sha256_hex(&format!("ua:{}|lang:{}", text(header::USER_AGENT), text(header::ACCEPT_LANGUAGE))))
        }
    };
    Credentials { token, from_cookie, device, device_id, explicit_device }
}

impl Credentials {
    /// Whether the token is the cookie's: a browser sends it on any site's behalf, so it counts only
    /// with an allowed `Origin` (the gateway checks; PROTOCOL.md section 2).
    pub fn from_cookie(&self) -> bool {
        self.from_cookie
    }
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|cookies| {
        cookies.split(';').find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            // Empty, quoted or not, is no cookie (else `""` would outrank the bearer token, and be held to
            // the cookie's Origin rule).
            let value = value.trim_matches('"');
            (name == "auth_refresh_token" && !value.is_empty()).then(|| value.to_owned())
        })
    })
}

/// The credentials of `Authorization: Bearer <credentials>`, trimmed; the scheme is case-insensitive
/// (RFC 9110 section 11.1). Also the API key's reader on `/v1/api` (`api/keys.rs`).
pub fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// Checks the credentials against the store, binding the session to the device on first use.
pub async fn authenticate(ctx: &Ctx, creds: Credentials) -> Result<Authenticated, CloseReason> {
    let token = creds.token.ok_or(CloseReason::AUTH_REQUIRED)?;
    let device_hash = creds.device.ok_or(CloseReason::INVALID_DEVICE)?;
    if let Some(verifier) = ctx.jwt.as_deref().filter(|_| jwt::looks_like_jwt(&token)) {
        return authenticate_jwt(ctx, verifier, &token, device_hash, creds.device_id.as_deref(), creds.explicit_device)
            .await;
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(CloseReason::INVALID_SESSION);
    }
    let backend = |e: crate::store::StoreError| {
        tracing::warn!(error = %e, "authentication backend failure");
        CloseReason::AUTH_ERROR
    };
    let now = now_millis();
    let recheck = Recheck { revocations: ctx.hub.revocations(), token_hash: token_hash(&token) };
    let session: Session = ctx
        .store
        .session_by_token_hash(&recheck.token_hash)
        .await
        .map_err(backend)?
        .ok_or(CloseReason::INVALID_SESSION)?;
    if session.revoked_at.is_some() || session.expires_at.is_some_and(|t| t <= now) {
        return Err(CloseReason::INVALID_SESSION);
    }
    let bound = match &session.device_hash {
        Some(bound) => bound.clone(),
        None => ctx.store.bind_session_device(&session.session_id, &device_hash).await.map_err(backend)?,
    };
    if bound != device_hash {
        return Err(if session.user_tfa { CloseReason::DEVICE_MISMATCH_TFA } else { CloseReason::DEVICE_MISMATCH });
    }
    Ok(Authenticated {
        session_id: session.session_id,
        user_id: session.user_id,
        device_hash,
        expires_at: None,
        device_label: creds.device_id,
        recheck: Some(recheck),
        create_user: false,
    })
}

impl Recheck {
    /// Whether a session close began on this node since the session was read (then read it again).
    pub fn due(&self, ctx: &Ctx) -> bool {
        ctx.hub.revocations() != self.revocations
    }

    /// Whether the session is revoked now (read again).
    pub async fn revoked(&self, ctx: &Ctx) -> Result<bool, crate::store::StoreError> {
        let session = ctx.store.session_by_token_hash(&self.token_hash).await?;
        Ok(session.is_none_or(|s| s.revoked_at.is_some()))
    }
}

/// The synthetic session id of a JWT connection (it has no row in `sessions`): `jwt:` and the first
/// 32 hex digits of SHA-256(token), so that connections can be told apart in logs and closed by id.
pub fn jwt_session_id(token: &str) -> String {
    format!("jwt:{}", &sha256_hex(token)[..32])
}

/// JWT connection tokens (SERVER_API.md section 6). The `device` claim binds the token to that device
/// id; a client that names a different device is refused with `Device mismatch` (with `2FA required`
/// for a 2FA user), one that names none is taken to be that device. A user that is absent is created by
/// the admission ([`create_user`]), once the connection is registered.
async fn authenticate_jwt(
    ctx: &Ctx,
    verifier: &JwtVerifier,
    token: &str,
    client_device: String,
    client_device_id: Option<&str>,
    explicit_device: bool,
) -> Result<Authenticated, CloseReason> {
    let verified = verifier.verify(token).map_err(|why| {
        tracing::info!(reason = %why, "JWT refused");
        CloseReason::INVALID_SESSION
    })?;
    let backend = |e: crate::store::StoreError| {
        tracing::warn!(error = %e, "authentication backend failure");
        CloseReason::AUTH_ERROR
    };
    let user = ctx.store.user(&verified.user_id).await.map_err(backend)?;
    let device_hash = match &verified.device_id {
        None => client_device,
        Some(id) => {
            let bound = device_hash_for_id(id).ok_or_else(|| {
                tracing::info!(reason = "malformed device claim", "JWT refused");
                CloseReason::INVALID_SESSION
            })?;
            if explicit_device && bound != client_device {
                let tfa = user.as_ref().is_some_and(|u| u.tfa_enabled);
                return Err(if tfa { CloseReason::DEVICE_MISMATCH_TFA } else { CloseReason::DEVICE_MISMATCH });
            }
            bound
        }
    };
    let device_label = verified.device_id.as_deref().or(client_device_id).map(str::to_owned);
    Ok(Authenticated {
        session_id: jwt_session_id(token),
        user_id: verified.user_id,
        device_hash,
        expires_at: Some(verified.expires_at),
        device_label,
        recheck: None,
        create_user: user.is_none(),
    })
}

/// Creates the user of a JWT connection being admitted, with its data key (SERVER_API.md section 6). A user
/// created meanwhile (another connection) is no error.
pub(crate) async fn create_user(ctx: &Ctx, user_id: &str) -> Result<(), StoreError> {
    match ctx.store.create_user(user_id, false, now_millis()).await {
        Ok(()) => {
            tracing::info!(user_id = %user_id, "user created on first JWT connection");
            // Its data key now, once, rather than in its first write (see `Keyring::ensure_user_key`).
            ctx.keys.ensure_user_key(ctx.chats.as_ref(), user_id).await;
            Ok(())
        }
        Err(StoreError::AlreadyExists) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn token_precedence_is_cookie_then_bearer_then_query() {
        let q = WsQuery { token: Some("q".into()), device_id: None };
        let all = headers(&[("cookie", "a=b; auth_refresh_token=c"), ("authorization", "Bearer h")]);
        assert_eq!(credentials(&all, &q).token.as_deref(), Some("c"));
        let bearer = headers(&[("authorization", "bearer h")]);
        assert_eq!(credentials(&bearer, &q).token.as_deref(), Some("h"));
        assert_eq!(credentials(&HeaderMap::new(), &q).token.as_deref(), Some("q"));
        assert_eq!(credentials(&HeaderMap::new(), &WsQuery::default()).token, None);
    }

    #[test]
    fn device_hash_follows_the_protocol() {
        let h = headers(&[("x-device-id", "phone-1")]);
        assert_eq!(credentials(&h, &WsQuery::default()).device.unwrap(), sha256_hex("id:phone-1"));
        let q = WsQuery { token: None, device_id: Some("tab".into()) };
        assert_eq!(credentials(&HeaderMap::new(), &q).device.unwrap(), sha256_hex("id:tab"));
        let h = headers(&[("user-agent", "UA"), ("accept-language", "en")]);
        assert_eq!(credentials(&h, &WsQuery::default()).device.unwrap(), sha256_hex("ua:UA|lang:en"));
        assert_eq!(credentials(&HeaderMap::new(), &WsQuery::default()).device.unwrap(), sha256_hex("ua:|lang:"));
        assert!(device_hash_for_id(&"x".repeat(129)).is_none());
        assert!(device_hash_for_id("").is_none());
        assert!(device_hash_for_id("tab\u{7f}").is_none());
    }
}
