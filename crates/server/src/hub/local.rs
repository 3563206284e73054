//! The in-process hub: user id → that user's connections on this node.

use super::{Audience, CloseReason, ConnHandle, Hub, Refused, Utf8Bytes};
use async_trait::async_trait;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Delivers to connections of this process only (the embedded default).
pub struct LocalHub {
    users: DashMap<String, Vec<Arc<ConnHandle>>>,
    count: AtomicUsize,
    max_connections: usize,
    max_per_user: usize,
    /// Session closes begun (see [`Hub::revocations`]).
    revocations: AtomicU64,
}

impl LocalHub {
    /// A hub that accepts at most `max_connections` connections, and `max_per_user` of one user.
    pub fn new(max_connections: usize, max_per_user: usize) -> LocalHub {
        LocalHub {
            users: DashMap::new(),
            count: AtomicUsize::new(0),
            max_connections,
            max_per_user,
            revocations: AtomicU64::new(0),
        }
    }

    fn each(&self, mut f: impl FnMut(&ConnHandle)) {
        for entry in self.users.iter() {
            for conn in entry.value() {
                f(conn);
            }
        }
    }
}

#[async_trait]
impl Hub for LocalHub {
    async fn register(&self, conn: Arc<ConnHandle>) -> Result<(), Refused> {
        self.add(conn).map(|_| ())
    }

    fn unregister(&self, conn: &ConnHandle) -> bool {
        self.remove(conn)
    }

    async fn deliver(&self, user_id: &str, audience: Audience<'_>, frame: Utf8Bytes) {
        self.deliver_now(user_id, audience, frame);
    }

    async fn close_sessions(&self, session_ids: &[String], reason: CloseReason) {
        self.close_sessions_now(session_ids, reason);
    }

    fn close_all(&self, reason: CloseReason) {
        self.each(|c| c.outbox.close(reason));
    }

    fn connection_count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::SeqCst)
    }
}

impl LocalHub {
    /// Registers a connection; returns whether it is the user's first on this node.
    pub fn add(&self, conn: Arc<ConnHandle>) -> Result<bool, Refused> {
        // The per-user check, the node's count and the insert happen under the user's shard lock: two
        // connects of one user cannot both pass the check, and a connect refused for its user never holds
        // one of the node's slots, even for a moment (a user over its cap cannot crowd out others).
        let entry = self.users.entry(conn.user_id.clone());
        if matches!(&entry, Entry::Occupied(e) if e.get().len() >= self.max_per_user) {
            return Err(Refused::TooManyForUser);
        }
        if self.count.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Overloaded);
        }
        match entry {
            Entry::Occupied(mut e) => {
                e.get_mut().push(conn);
                Ok(false)
            }
            Entry::Vacant(e) => {
                e.insert(vec![conn]);
                Ok(true)
            }
        }
    }

    /// Removes a connection; returns whether it was the user's last on this node.
    pub fn remove(&self, conn: &ConnHandle) -> bool {
        let mut found = false;
        let last = self
            .users
            .remove_if_mut(&conn.user_id, |_, conns| {
                let before = conns.len();
                conns.retain(|c| c.id != conn.id);
                found = conns.len() != before;
                conns.is_empty()
            })
            .is_some();
        if found {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        last
    }

    /// Queues `frame` on the user's connections here (never waits).
    pub fn deliver_now(&self, user_id: &str, audience: Audience<'_>, frame: Utf8Bytes) {
        let Some(conns) = self.users.get(user_id) else {
            return;
        };
        for conn in conns.iter() {
            if let Audience::Others { except } = audience {
                if conn.id == except {
                    continue;
                }
            }
            conn.outbox.push(frame.clone());
        }
    }

    /// Closes the connections here that authenticated with one of these sessions.
    pub fn close_sessions_now(&self, session_ids: &[String], reason: CloseReason) {
        // Counted before the connections are looked at: one registered too late to be seen here reads the
        // new count after its registration, and checks its session again (see `Hub::revocations`).
        self.revocations.fetch_add(1, Ordering::SeqCst);
        let ids: HashSet<&str> = session_ids.iter().map(String::as_str).collect();
        self.each(|c| {
            if ids.contains(c.session_id.as_str()) {
                c.outbox.close(reason);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::outbox::Outbox;

    fn conn(id: &str, user_id: &str) -> Arc<ConnHandle> {
        Arc::new(ConnHandle {
            id: id.into(),
            user_id: user_id.into(),
            session_id: "s".into(),
            device_hash: "d".into(),
            expires_at: None,
            outbox: Outbox::new(1024, 16),
        })
    }

    #[test]
    fn a_connect_over_its_users_cap_never_takes_a_node_slot() {
        let hub = LocalHub::new(2, 1);
        assert_eq!(hub.add(conn("a1", "a")), Ok(true));
        assert_eq!(hub.add(conn("a2", "a")), Err(Refused::TooManyForUser));
        assert_eq!(hub.connection_count(), 1);
        assert_eq!(hub.add(conn("b1", "b")), Ok(true), "the last slot is still free");
        assert_eq!(hub.add(conn("a3", "a")), Err(Refused::TooManyForUser), "told why, even on a full node");
        assert_eq!(hub.add(conn("c1", "c")), Err(Refused::Overloaded));
        assert_eq!(hub.connection_count(), 2);
        assert!(hub.remove(&conn("b1", "b")));
        assert_eq!(hub.add(conn("c1", "c")), Ok(true));
    }
}
