//! chatsync: a real-time sync gateway for multi-device chat applications.
//!
//! [`build`] turns a [`Config`] into the handler context (store, hub, limits); [`run`] serves it on a
//! listener until a shutdown future resolves, then closes every connection with 1001 and waits for
//! them to drain. Tests call both on port 0; `main.rs` calls them from the CLI.

pub mod api;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod datadir;
pub mod drafts;
pub mod error;
pub mod gateway;
pub mod handlers;
pub mod hub;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod pause;
pub mod store;
pub mod streams;
pub mod webhooks;

pub use config::Config;
pub use handlers::Ctx;

use crate::hub::{local::LocalHub, CloseReason};
use anyhow::Context as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Locks the data directory, and the embedded database's directory when it lies elsewhere (refusing to
/// start if another `serve` or `keys rotate` holds either), opens the
/// backends named by `config`, loads the master key (refusing to start if it cannot unwrap the stored
/// keys), and builds the handler context. The lock is held until [`run`] ends or the context is dropped.
pub async fn build(config: Config) -> anyhow::Result<Ctx> {
    config.validate().map_err(anyhow::Error::msg)?;
    let lock =
        datadir::DataDirLock::acquire(&config.data_dir, "serve")?.with_store_file(&config.store_url(), "serve")?;
    let store_timeout = Duration::from_secs(config.store_timeout_secs);
    let backend = store::open_server_backend(&config.store_url(), config.durability, store_timeout).await?;
    backend.chats.set_commit_window(config.commit_window());
    let env_key = std::env::var("CHATSYNC_MASTER_KEY").ok().filter(|k| !k.is_empty());
    let master = keys::load_master_key(&config.data_dir, env_key.as_deref(), backend.chats.as_ref()).await?;
    assemble(config, backend, master, Some(lock))
}

/// Puts a node together from its store and master key: the one place where the configuration chooses
/// the hub and the cache. Embedded default: in-process hub and memory cache. With `redis_url`: the
/// Redis bus, the cluster hub and the coherent cache, and this node's handler of bus messages.
pub fn assemble(
    config: Config,
    backend: store::Backend,
    master: crypto::MasterKey,
    lock: Option<datadir::DataDirLock>,
) -> anyhow::Result<Ctx> {
    let jwt = gateway::jwt::JwtVerifier::from_config(&config)?.map(Arc::new);
    let local = Arc::new(LocalHub::new(config.max_connections, config.max_connections_per_user));
    // A write whose outcome is unknown has surely landed, or not, once the store's timeout and the
    // writer's grace for an answer have passed; a margin on top.
    let settle = std::time::Duration::from_secs(config.store_timeout_secs.saturating_add(10));
    let memory = Arc::new(cache::memory::MemoryCache::new(config.max_page_messages as usize).with_settle(settle));
    let bus = match config.bus() {
        Some(bus) => Some(cluster::Bus::start(bus, master.derive("bus"))?),
        None => None,
    };
    // Open streams: Redis with the bus (shared by the nodes), else this node's memory.
    let streams = streams::from_config(&config, &master)?;
    let keys = Arc::new(keys::Keyring::new(master).with_settle(settle));
    let pauses = Arc::<pause::PausePoints>::default();
    let (hub, cache): (Arc<dyn hub::Hub>, Arc<dyn cache::Cache>) = match &bus {
        Some(bus) => {
            bus.set_handler(Arc::new(cluster::node::NodeHandler {
                hub: local.clone(),
                cache: memory.clone(),
                keys: keys.clone(),
                pauses: pauses.clone(),
            }));
            (
                Arc::new(hub::redis::RedisHub::new(local, bus.clone(), keys.clone())),
                Arc::new(cache::coherent::CoherentCache::new(memory, bus.clone())),
            )
        }
        None => (local, memory),
    };
    let webhooks = config.webhook_url.as_ref().map(|_| {
        // One process owns a SQLite database (the data directory lock): a fixed lease owner lets a
        // restart release the leases of a process that was killed. Nodes sharing PostgreSQL are distinct.
        let node = match config.database_url.as_deref() {
            Some(url) if !url.starts_with("sqlite://") => format!("node-{}", uuid::Uuid::new_v4().simple()),
            _ => "local".to_owned(),
        };
        Arc::new(webhooks::Webhooks::new(backend.events.clone(), node))
    });
    Ok(Ctx {
        store: backend.identity,
        chats: Arc::new(store::metered::MeteredChatStore(backend.chats)),
        events: backend.events,
        webhooks,
        cache,
        keys,
        data_dir_lock: Arc::new(lock.unwrap_or_else(datadir::DataDirLock::none)),
        hub,
        bus,
        limits: config.limits(),
        jwt,
        pauses,
        streams,
        config: Arc::new(config),
    })
}

/// Serves `ctx` on `listener` until `shutdown` resolves; then stops accepting, closes every
/// connection with 1001 `Server shutting down` after its in-flight request, waits for them (at most
/// `shutdown_timeout_secs`), waits for the webhook deliveries in flight (each within its attempt's
/// deadline) and records them, closes the store, and releases the data directory lock. If the store fails for
/// good ([`store::chats::ChatStore::failed`]) it shuts down the same way and returns an error (`serve` then exits
/// non-zero).
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
    let stream_sweeper = tokio::spawn(streams::sweep_idle_streams(ctx.clone(), token.clone()));

    let trigger = token.clone();
    let (store, store_failure) = (ctx.chats.clone(), Arc::new(parking_lot::Mutex::new(None::<String>)));
    let failure = store_failure.clone();
    let hub = ctx.hub.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {}
            reason = store.failed() => {
                tracing::error!(%reason, "the store can no longer write; shutting down");
                *failure.lock() = Some(reason);
            }
        }
        // Counted before the connections hear of it (they close at once).
        tracing::info!(connections = hub.connection_count(), "shutting down");
        trigger.cancel();
    });
    let metrics = crate::metrics::install();
    let dispatcher =
        ctx.webhooks.clone().map(|hooks| tokio::spawn(webhooks::dispatcher::run(ctx.clone(), hooks, token.clone())));
    let mut app = gateway::router(gateway).merge(api::router(ctx.clone(), tracker.clone()));
    let ops = gateway::ops::router(ctx.clone(), metrics);
    // How long a peer may take to send a request head, or leave a keep-alive connection idle (see
    // `gateway::serve`).
    let head_timeout = Duration::from_secs(ctx.config.http_idle_timeout_secs);
    match ctx.config.metrics_listen {
        None => app = app.merge(ops),
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            // The port bound, not the one asked for (`:0` picks a free one).
            let addr = listener.local_addr().unwrap_or(addr);
            tracing::info!(%addr, "operations endpoints (/metrics, /healthz, /readyz) listening");
            let stop = token.clone();
            tokio::spawn(async move {
                gateway::serve(listener, ops, stop, head_timeout).await;
            });
        }
    }
    // Small frames must leave at once: no Nagle delay on replies and broadcasts.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    // The grace period counts from the shutdown signal, for the HTTP requests in flight (an API request
    // waits for its task, which could wait on a store that hangs) and the connections alike.
    let grace = Duration::from_secs(ctx.config.shutdown_timeout_secs);
    let (deadline_tx, deadline_rx) = tokio::sync::oneshot::channel();
    let overdue = async {
        token.cancelled().await;
        let deadline = tokio::time::Instant::now() + grace;
        let _ = deadline_tx.send(deadline);
        tokio::time::sleep_until(deadline).await;
    };
    tokio::select! {
        () = gateway::serve(listener, app, token.clone(), head_timeout) => {}
        () = overdue => tracing::warn!("shutdown timeout: HTTP requests still in flight are not waited for"),
    }
    let deadline = deadline_rx.await.unwrap_or_else(|_| tokio::time::Instant::now() + grace);

    tracker.close();
    if tokio::time::timeout_at(deadline, tracker.wait()).await.is_err() {
        tracing::warn!(left = ctx.hub.connection_count(), "shutdown timeout: closing the remaining connections");
        ctx.hub.close_all(CloseReason::SHUTDOWN);
    }
    watcher.abort();
    if let Some(dispatcher) = dispatcher {
        // The token is cancelled: the dispatcher starts no more deliveries, lets those in flight end (each
        // within its own attempt deadline, not the shutdown timeout: a delivery cut off could have been
        // processed by the backend, and would go again), records their outcomes in the store, still open
        // here, and releases its leases.
        let _ = dispatcher.await;
    }
    stream_sweeper.abort();
    if let Some(bus) = &ctx.bus {
        bus.stop();
    }
    ctx.store.close().await;
    ctx.data_dir_lock.release();
    if let Some(reason) = store_failure.lock().take() {
        anyhow::bail!("stopped because the store can no longer write: {reason}");
    }
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
