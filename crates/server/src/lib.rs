//! chatsync: a real-time sync gateway for multi-device chat applications.
//!
//! [`build`] turns a [`Config`] into the handler context (store, hub, limits); [`run`] serves it on a
//! listener until a shutdown future resolves, then closes every connection with 1001 and waits for
//! them to drain. Tests call both on port 0; `main.rs` calls them from the CLI.

pub mod cache;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod drafts;
pub mod error;
pub mod gateway;
pub mod handlers;
pub mod hub;
pub mod keys;
pub mod logging;
pub mod store;

pub use config::Config;
pub use handlers::Ctx;

use crate::hub::{local::LocalHub, CloseReason};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Opens the backends named by `config`, loads the master key (refusing to start if it cannot unwrap
/// the stored keys), and builds the handler context.
pub async fn build(config: Config) -> anyhow::Result<Ctx> {
    let backend = store::open_backend(&config.store_url(), config.durability).await?;
    let env_key = std::env::var("CHATSYNC_MASTER_KEY").ok().filter(|k| !k.is_empty());
    let master = keys::load_master_key(&config.data_dir, env_key.as_deref(), backend.chats.as_ref()).await?;
    let hub = Arc::new(LocalHub::new(config.max_connections));
    let cache = Arc::new(cache::memory::MemoryCache::new(config.max_page_messages as usize));
    Ok(Ctx {
        store: backend.identity,
        chats: backend.chats,
        cache,
        keys: Arc::new(keys::Keyring::new(master)),
        hub,
        limits: config.limits(),
        config: Arc::new(config),
    })
}

/// Serves `ctx` on `listener` until `shutdown` resolves; then stops accepting, closes every
/// connection with 1001 `Server shutting down` after its in-flight request, waits for them (at most
/// `shutdown_timeout_secs`), and closes the store.
pub async fn run(
    listener: TcpListener,
    ctx: Ctx,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ctx = Arc::new(ctx);
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let gateway = gateway::Gateway { ctx: ctx.clone(), shutdown: token.clone(), tracker: tracker.clone() };
    let watcher = tokio::spawn(watch_revocations(ctx.clone(), token.clone()));

    let trigger = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let app = gateway::router(gateway);
    // Small frames must leave at once: no Nagle delay on replies and broadcasts.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app).with_graceful_shutdown(token.clone().cancelled_owned()).await?;

    tracing::info!(connections = ctx.hub.connection_count(), "shutting down");
    tracker.close();
    let grace = Duration::from_secs(ctx.config.shutdown_timeout_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(left = ctx.hub.connection_count(), "shutdown timeout: closing the remaining connections");
        ctx.hub.close_all(CloseReason::SHUTDOWN);
    }
    watcher.abort();
    ctx.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Closes connections whose session was revoked elsewhere (the CLI, another node): polls the store.
async fn watch_revocations(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let period = Duration::from_secs(ctx.config.session_check_interval_secs);
    // Look back over a generous window so clock skew between writers and a slow poll lose nothing;
    // closing an already-closed session is a no-op.
    let overlap = (period.as_millis() as i64 * 2).max(60_000);
    let mut since = store::now_millis() - overlap;
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = store::now_millis();
        match ctx.store.sessions_revoked_since(since).await {
            Ok(ids) if !ids.is_empty() => ctx.hub.close_sessions(&ids, CloseReason::SESSION_REVOKED).await,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "revocation check failed");
                continue;
            }
        }
        since = now - overlap;
    }
}
