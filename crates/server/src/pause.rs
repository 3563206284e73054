//! Pause points: named places in the request path where a test can hold one request, run others, and
//! then let it go, to reproduce a race at its worst interleaving deterministically (no sleeps).
//!
//! In production nothing is ever armed and [`PausePoints::at`] costs one relaxed atomic load. A test
//! arms a point through the server's [`Ctx`](crate::Ctx) (`ctx.pauses.arm(…)`); the next request that
//! reaches it stops there until the test releases it. A point can also be armed to panic
//! ([`PausePoints::arm_panic`]): a stand-in for a bug, to check what a panic leaves behind.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::oneshot;

/// After a chat write is durable, before its result is merged into the cache (`write_chat`).
pub const WRITE_COMMITTED: &str = "write_committed";
/// After warm-up has loaded the chat list from the store, before it is stored in the cache.
pub const WARMUP_LOADED: &str = "warmup_loaded";
/// Once a WebSocket upgrade is done, before its connection starts (axum hands the upgraded socket over in
/// a task of its own, after the HTTP connection has ended).
pub const UPGRADED: &str = "upgraded";
/// After a connection's credentials were checked, before it is registered with the hub.
pub const AUTHENTICATED: &str = "authenticated";
/// After a connection was registered with the hub, before it is admitted (the revocation recheck, the
/// device sighting, the cache entry).
pub const REGISTERED: &str = "registered";
/// After an initial sync listed the user's open streams, before its reply is queued.
pub const SYNC_STREAMS_LISTED: &str = "sync_streams_listed";
/// When a part of an `initial_sync_response` is made (on the blocking pool), before it is checked
/// against the deletions known again and handed to the connection.
pub const SYNC_PART: &str = "sync_part";
/// When a part of a `chat_content_batch_response` is made, before it is checked against the deletions
/// known and handed to the connection.
pub const BATCH_PART: &str = "batch_part";
/// In a cluster, when a frame from another node arrives, before it is queued on this node's connections
/// (holds the node's whole bus subscription, as a lagging subscriber would).
pub const BUS_FRAME: &str = "bus_frame";
/// In a cluster, once Redis confirmed the subscription to a user's channel, before the node takes it as
/// done (holds the node's whole bus subscription; the connections waiting for it wait on).
pub const BUS_SUBSCRIBED: &str = "bus_subscribed";
/// When the webhook dispatcher has taken the stop signal (it starts no more deliveries), before it waits
/// for the deliveries in flight to end.
pub const WEBHOOKS_STOPPING: &str = "webhooks_stopping";

enum Armed {
    Hold { reached: oneshot::Sender<()>, release: oneshot::Receiver<()> },
    Panic,
}

/// The registry of armed points (one per server).
#[derive(Default)]
pub struct PausePoints {
    armed: AtomicUsize,
    points: Mutex<HashMap<&'static str, Vec<Armed>>>,
}

/// A request held at an armed point (or about to be): wait for it with [`Paused::reached`], then let it
/// go with [`Paused::release`] (dropping it releases too).
pub struct Paused {
    reached: Option<oneshot::Receiver<()>>,
    release: Option<oneshot::Sender<()>>,
}

impl PausePoints {
    /// Arms `point` for the next request that reaches it (arming twice holds the next two).
    pub fn arm(&self, point: &'static str) -> Paused {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.push(point, Armed::Hold { reached: reached_tx, release: release_rx });
        Paused { reached: Some(reached_rx), release: Some(release_tx) }
    }

    /// Arms `point` to panic in the next request that reaches it (in the order armed, among holds).
    pub fn arm_panic(&self, point: &'static str) {
        self.push(point, Armed::Panic);
    }

    fn push(&self, point: &'static str, armed: Armed) {
        self.points.lock().entry(point).or_default().push(armed);
        self.armed.fetch_add(1, Ordering::Release);
    }

    /// Holds the caller here if `point` is armed, until the test releases it.
    pub async fn at(&self, point: &'static str) {
        if self.armed.load(Ordering::Relaxed) == 0 {
            return;
        }
        let armed = {
            let mut points = self.points.lock();
            let armed = points.get_mut(point).and_then(|queue| (!queue.is_empty()).then(|| queue.remove(0)));
            if armed.is_some() {
                self.armed.fetch_sub(1, Ordering::Release);
            }
            armed
        };
        match armed {
            Some(Armed::Hold { reached, release }) => {
                let _ = reached.send(());
                let _ = release.await;
            }
            Some(Armed::Panic) => panic!("panic injected at the pause point {point}"),
            None => {}
        }
    }
}

impl Paused {
    /// Waits until a request is held at the point.
    pub async fn reached(&mut self) {
        if let Some(rx) = self.reached.take() {
            rx.await.expect("the pause point was dropped before it was reached");
        }
    }

    /// Resolves if the held request is dropped before its release (its task was cancelled); never
    /// while it is still held.
    pub async fn abandoned(&mut self) {
        match self.release.as_mut() {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
    }

    /// Lets the held request go on.
    pub fn release(mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn an_armed_point_holds_one_caller_until_released() {
        let points = Arc::new(PausePoints::default());
        let mut paused = points.arm(WRITE_COMMITTED);
        let p = points.clone();
        let held = tokio::spawn(async move { p.at(WRITE_COMMITTED).await });
        paused.reached().await;
        assert!(!held.is_finished());
        // Other callers, and other points, pass.
        points.at(WRITE_COMMITTED).await;
        points.at(WARMUP_LOADED).await;
        paused.release();
        held.await.unwrap();
    }
}
