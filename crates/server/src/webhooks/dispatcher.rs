//! The webhook dispatcher: a task that claims due events from the outbox and POSTs them to the
//! configured URL, signed, in order per user (a user's next event is claimable only once the previous
//! one is delivered), different users in parallel (at most [`CONCURRENCY`] requests in flight).
//!
//! A delivery that is not answered 2xx within [`REQUEST_TIMEOUT`] is rescheduled in its row (attempts,
//! next attempt time: `webhook_backoff_base_ms` doubling, capped at 5 min, and never later than
//! `webhook_max_age_secs` after the event was created), which also releases its lease; one still failing
//! `webhook_max_age_secs` after it was created is dropped with an error log.
//! An event whose user's key cannot be read now (the store failing) is rescheduled the same way; one
//! whose body does not open under that key never will, and is dropped at once.
//! Because the schedule lives in the store, a restart resumes where the last process stopped; a node
//! that dies mid-request loses its leases after [`LEASE`]. A graceful stop starts no more deliveries but
//! lets those in flight end (within their attempt's deadline) and records their outcomes before the
//! store closes: a 2xx answered meanwhile is not delivered again after the restart.
//! An attempt (the key lookup, which waits for the store, and the request) is cut off [`ATTEMPT_BUDGET`]
//! after its claim, well inside the lease, and its outcome is recorded only if the event still holds that lease (a late result of an attempt whose
//! lease another node took over is dropped; that node delivers the event again). The dispatcher wakes when a write on this
//! node recorded an event, when one of its deliveries ends, and polls as a backstop (other nodes'
//! events, retries coming due).
//!
//! Logs carry the event type, id, attempt and HTTP status, never the body.

use super::{Event, Webhooks};
use crate::handlers::Ctx;
use crate::store::events::PendingEvent;
use crate::store::now_millis;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Most deliveries in flight per node (each for a different user).
pub const CONCURRENCY: usize = 16;
/// Longest wait for the backend's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claimed event stays leased to its node (longer than an attempt can take). Other nodes judge
/// its end by their own clocks: one more than `LEASE - ATTEMPT_BUDGET` (10 s) ahead can claim an event
/// whose attempt is still in flight here (SERVER_API.md section 7, "Order and retries").
pub const LEASE: Duration = Duration::from_secs(30);
/// How long one attempt (reading the user's key, which waits for the store, then the request) may take
/// from the claim: well inside [`LEASE`], which leaves the outcome 10 s to be recorded under the lease.
pub const ATTEMPT_BUDGET: Duration = Duration::from_secs(20);
const _: () = assert!(REQUEST_TIMEOUT.as_secs() < ATTEMPT_BUDGET.as_secs());
const _: () = assert!(ATTEMPT_BUDGET.as_secs() + 10 <= LEASE.as_secs());
/// Longest pause between two retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest pause between two looks at the outbox.
const POLL: Duration = Duration::from_secs(1);
/// How often the pending-events gauge is refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);

/// `sha256=<lowercase hex HMAC-SHA256(secret, body)>`, the `X-Chatsync-Signature` header value.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The pause after the `attempts`-th failed attempt (1-based): `base` doubling, capped at [`MAX_BACKOFF`].
pub fn backoff(base: Duration, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(20);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Runs the dispatcher until `shutdown`; then starts no more deliveries, lets those in flight end (each
/// is bounded by its attempt's deadline, [`ATTEMPT_BUDGET`] after its claim, its request by
/// [`REQUEST_TIMEOUT`]) and records their outcomes, so that a 2xx answered during a graceful stop counts
/// as delivered, and releases this node's remaining leases (events claimed as the stop came, not
/// started).
pub async fn run(ctx: Arc<Ctx>, hooks: Arc<Webhooks>, shutdown: CancellationToken) {
    let (Some(url), Some(secret)) = (ctx.config.webhook_url.clone(), ctx.config.webhook_secret.clone()) else {
        return;
    };
    let client = match reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("chatsync/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks are not delivered");
            return;
        }
    };
    let target = Arc::new(Target { client, url, secret: secret.expose().as_bytes().to_vec() });
    let base = Duration::from_millis(ctx.config.webhook_backoff_base_ms.max(1));
    let poll = POLL.min(base).max(Duration::from_millis(10));
    if let Err(e) = hooks.events.release_leases(&hooks.node).await {
        tracing::warn!(error = %e, "cannot release the webhook leases of a previous run");
    }
    tracing::info!(node = %hooks.node, "webhook dispatcher started");
    let mut in_flight = JoinSet::new();
    let mut gauge_at: Option<Instant> = None;
    loop {
        let free = CONCURRENCY.saturating_sub(in_flight.len());
        if free > 0 {
            let lease = LEASE.as_millis() as i64;
            // Taken before the claim's clock reading, so that every attempt ends inside its lease.
            let deadline = tokio::time::Instant::now() + ATTEMPT_BUDGET;
            match hooks.events.claim_events(&hooks.node, now_millis(), lease, free as u32).await {
                // A claim that ends after the stop signal starts nothing: its leases are released below.
                Ok(_) if shutdown.is_cancelled() => break,
                Ok(claimed) => {
                    for event in claimed {
                        in_flight.spawn(deliver(ctx.clone(), hooks.clone(), target.clone(), event, deadline));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot claim webhook events"),
            }
        }
        if gauge_at.is_none_or(|at| at.elapsed() >= GAUGE_EVERY) {
            gauge_at = Some(Instant::now());
            if let Ok(pending) = hooks.events.pending_events().await {
                metrics::gauge!(crate::metrics::WEBHOOK_PENDING).set(pending as f64);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = hooks.wake.notified() => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
    // A delivery cut off here could have reached the backend, which may have processed it: it would be
    // delivered again after the restart. Each ends by its own deadline, and records its outcome (under
    // its lease) before `run` closes the store.
    tracing::info!(in_flight = in_flight.len(), "webhook dispatcher stopping; letting the deliveries in flight end");
    ctx.pauses.at(crate::pause::WEBHOOKS_STOPPING).await;
    while in_flight.join_next().await.is_some() {}
    if let Err(e) = hooks.events.release_leases(&hooks.node).await {
        tracing::warn!(error = %e, "cannot release webhook leases on shutdown");
    }
    tracing::info!("webhook dispatcher stopped");
}

/// Where events go.
struct Target {
    client: reqwest::Client,
    url: String,
    secret: Vec<u8>,
}

/// What one attempt came to.
enum Outcome {
    /// The backend answered 2xx.
    Delivered,
    /// The event can never be delivered (its user's key or its body does not open): dropped at once.
    Undeliverable,
    /// Not delivered this time (a non-2xx status, no answer, the key not readable now, the attempt out of
    /// time): rescheduled, or dropped once too old.
    Failed(String),
}

/// Delivers one claimed event once, and records the outcome in its row. The attempt (the user's key, the
/// request) must end by `deadline`, well inside the lease; recording the outcome is fenced by the lease
/// (a result that comes after another node claimed the event again changes nothing).
async fn deliver(
    ctx: Arc<Ctx>,
    hooks: Arc<Webhooks>,
    target: Arc<Target>,
    pending: PendingEvent,
    deadline: tokio::time::Instant,
) {
    match within(deadline, attempt(&ctx, &target, &pending)).await {
        Outcome::Delivered => {
            tracing::debug!(event_id = %pending.event_id, event_type = %pending.kind, attempts = pending.attempts + 1, "webhook delivered");
            metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => "delivered").increment(1);
            // On an error the lease expires and the event goes again: the backend de-duplicates by id.
            remove(&hooks, &pending, "remove a delivered").await;
        }
        Outcome::Undeliverable => {
            metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => "dropped").increment(1);
            remove(&hooks, &pending, "drop a").await;
        }
        Outcome::Failed(reason) => reschedule(&ctx, &hooks, &pending, &reason).await,
    }
}

/// `attempt`'s outcome, or a failure if it has none by `deadline` (the attempt is dropped there: a
/// request cut off may still have reached the backend, which de-duplicates by id).
async fn within(deadline: tokio::time::Instant, attempt: impl std::future::Future<Output = Outcome>) -> Outcome {
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failed(format!("no outcome within {} s of the claim", ATTEMPT_BUDGET.as_secs())),
    }
}

/// One attempt: the user's key, the body opened under it, the signed request.
async fn attempt(ctx: &Ctx, target: &Target, pending: &PendingEvent) -> Outcome {
    // A store that fails to give the user's key (unavailable or failing, a row that cannot be read now)
    // is retried with backoff, up to `webhook_max_age_secs`: the event itself may be fine. A stored key
    // that does not open never will: the event is dropped, not left to hold up the user's later events.
    let key = match ctx.keys.user_key_or_why(ctx.chats.as_ref(), &pending.user_id).await {
        Ok(key) => key,
        Err(crate::keys::UserKeyError::Unwrap(e)) => {
            tracing::error!(
                event_id = %pending.event_id,
                event_type = %pending.kind,
                detail = e.internal_detail().unwrap_or_default(),
                "webhook event's user key does not open; dropped"
            );
            return Outcome::Undeliverable;
        }
        Err(crate::keys::UserKeyError::Store(e)) => {
            tracing::warn!(
                event_id = %pending.event_id,
                code = %e.code(),
                detail = e.internal_detail().unwrap_or_default(),
                "webhook event cannot be opened now (its user's key); retrying later"
            );
            return Outcome::Failed("key unavailable".to_owned());
        }
    };
    // A body that does not open under its key never will: dropped at once.
    let event: Event = match super::open(&key, &pending.user_id, &pending.event_id, &pending.body) {
        Ok(event) => event,
        Err(e) => {
            tracing::error!(
                event_id = %pending.event_id,
                event_type = %pending.kind,
                detail = e.internal_detail().unwrap_or_default(),
                "webhook event cannot be opened; dropped"
            );
            return Outcome::Undeliverable;
        }
    };
    let body = event.body(pending.seq);
    let sent = target
        .client
        .post(&target.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Chatsync-Event", &pending.kind)
        .header("X-Chatsync-Delivery", &pending.event_id)
        .header("X-Chatsync-Signature", signature(&target.secret, &body))
        .body(body.to_vec())
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => Outcome::Delivered,
        Ok(response) => Outcome::Failed(format!("HTTP {}", response.status().as_u16())),
        Err(e) => Outcome::Failed(transport_error(&e)),
    }
}

/// Removes a claimed event (delivered, or given up) if it still holds its lease; `what` completes the
/// warning ("cannot {what} webhook event").
async fn remove(hooks: &Webhooks, pending: &PendingEvent, what: &str) {
    match hooks.events.event_done(pending).await {
        Ok(true) => {}
        Ok(false) => lease_lost(pending),
        Err(e) => tracing::warn!(error = %e, event_id = %pending.event_id, "cannot {what} webhook event"),
    }
}

/// The outcome of an attempt came after its lease was taken over (it expired and another claim took the
/// event): nothing was recorded, and the event is delivered again (at least once).
fn lease_lost(pending: &PendingEvent) {
    tracing::warn!(
        event_id = %pending.event_id,
        event_type = %pending.kind,
        "webhook event's lease was lost before its outcome was recorded; left to its new claim"
    );
}

/// Records a failed attempt: reschedules the event with backoff, or drops it once it is too old.
async fn reschedule(ctx: &Ctx, hooks: &Webhooks, pending: &PendingEvent, reason: &str) {
    let now = now_millis();
    let attempts = pending.attempts.saturating_add(1);
    let max_age = i64::try_from(ctx.config.webhook_max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    if now.saturating_sub(pending.created_at_ms) >= max_age {
        tracing::error!(
            event_id = %pending.event_id,
            event_type = %pending.kind,
            user_id = %pending.user_id,
            attempts,
            reason,
            "webhook event not delivered within webhook_max_age_secs; dropped"
        );
        metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => "dropped").increment(1);
        remove(hooks, pending, "drop a").await;
        return;
    }
    let delay = backoff(Duration::from_millis(ctx.config.webhook_backoff_base_ms.max(1)), attempts);
    // The schedule ends at the max age: a retry that the backoff puts later comes at the max age instead
    // (its failure drops the event), or an event would be retried, and kept, up to a whole backoff (5 min;
    // most of the max age when it is short) past it.
    let next = now.saturating_add(delay.as_millis() as i64).min(pending.created_at_ms.saturating_add(max_age));
    tracing::warn!(
        event_id = %pending.event_id,
        event_type = %pending.kind,
        attempts,
        reason,
        retry_in_ms = next.saturating_sub(now),
        "webhook delivery failed; retrying"
    );
    metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => "failed").increment(1);
    match hooks.events.event_failed(pending, attempts, next).await {
        Ok(true) => {}
        Ok(false) => lease_lost(pending),
        // The lease expires and the event goes again.
        Err(e) => tracing::warn!(error = %e, event_id = %pending.event_id, "cannot reschedule a webhook event"),
    }
}

/// A short description of a transport error (without the URL's query, which may hold a token).
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_request() {
        "request failed"
    } else {
        "transport error"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let base = Duration::from_secs(1);
        assert_eq!(backoff(base, 1), Duration::from_secs(1));
        assert_eq!(backoff(base, 2), Duration::from_secs(2));
        assert_eq!(backoff(base, 5), Duration::from_secs(16));
        assert_eq!(backoff(base, 9), Duration::from_secs(256));
        assert_eq!(backoff(base, 10), MAX_BACKOFF);
        assert_eq!(backoff(base, u32::MAX), MAX_BACKOFF);
    }

    /// An attempt that hangs (a key lookup on a stalled store, a request) ends at its deadline as a
    /// failure; one that ends in time keeps its outcome. (The deadline the dispatcher gives is
    /// [`ATTEMPT_BUDGET`] after the claim, checked against [`LEASE`] at compile time.)
    #[tokio::test]
    async fn an_attempt_is_cut_off_at_its_deadline() {
        let start = tokio::time::Instant::now();
        let outcome = within(start + Duration::from_millis(50), std::future::pending()).await;
        assert!(matches!(outcome, Outcome::Failed(ref why) if why.contains("of the claim")));
        assert!(start.elapsed() >= Duration::from_millis(50));
        let quick = within(tokio::time::Instant::now() + ATTEMPT_BUDGET, async { Outcome::Delivered }).await;
        assert!(matches!(quick, Outcome::Delivered));
    }

    #[test]
    fn signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
