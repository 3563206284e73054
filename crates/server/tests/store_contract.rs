//! The `Store` contract (identity: users, sessions, devices): every backend must pass these. Each case is
//! a generic async fn run once per backend: the embedded SQLite store always; PostgreSQL in a schema of
//! its own when `CHATSYNC_TEST_POSTGRES_URL` is set (see `backends/mod.rs`).

mod backends;

use chatsync::gateway::auth;
use chatsync::store::{self, Store, StoreError};
use std::time::Duration;

macro_rules! contract_suite {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(b) = super::backends::$backend().await else { return };
                    super::$case(b.backend.identity.as_ref()).await;
                }
            )*
        }
    };
}

macro_rules! contract_suites {
    ($($case:ident),* $(,)?) => {
        contract_suite!(sqlite: $($case),*);
        contract_suite!(postgres: $($case),*);
    };
}

contract_suites!(
    users_are_unique_and_keep_their_2fa_flag,
    sessions_need_an_existing_user,
    sessions_are_found_by_token_hash_only,
    binding_is_first_come_and_atomic,
    revocation_is_once_and_visible_to_watchers,
    devices_are_per_user_and_keep_first_seen,
    provisioning_creates_missing_users_and_all_sessions,
    a_closed_store_is_unavailable,
);

async fn users_are_unique_and_keep_their_2fa_flag(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    s.create_user("carol", true, 2).await.unwrap();
    assert!(matches!(s.create_user("alice", true, 3).await, Err(StoreError::AlreadyExists)));
    let alice = s.user("alice").await.unwrap().unwrap();
    assert!(!alice.tfa_enabled);
    assert_eq!(alice.created_at, 1);
    assert!(s.user("carol").await.unwrap().unwrap().tfa_enabled);
    assert_eq!(s.user("nobody").await.unwrap(), None);
}

async fn sessions_need_an_existing_user(s: &dyn Store) {
    let err = auth::issue_session(s, "ghost", None, Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err}");
}

async fn sessions_are_found_by_token_hash_only(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    let token = auth::issue_session(s, "alice", None, Duration::from_secs(60)).await.unwrap();
    let found = s.session_by_token_hash(&auth::token_hash(&token)).await.unwrap().unwrap();
    assert_eq!(found.user_id, "alice");
    assert_eq!(found.device_hash, None);
    assert_eq!(found.revoked_at, None);
    assert!(found.expires_at.unwrap() > store::now_millis());
    assert!(s.session_by_token_hash(&auth::token_hash("other")).await.unwrap().is_none());
}

async fn binding_is_first_come_and_atomic(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    let token = auth::issue_session(s, "alice", None, Duration::from_secs(60)).await.unwrap();
    let id = s.session_by_token_hash(&auth::token_hash(&token)).await.unwrap().unwrap().session_id;
    let (a, b) = tokio::join!(s.bind_session_device(&id, "aaaa"), s.bind_session_device(&id, "bbbb"));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "both racers see the same winner");
    assert!(a == "aaaa" || a == "bbbb");
    assert_eq!(s.bind_session_device(&id, "cccc").await.unwrap(), a);
    assert!(matches!(s.bind_session_device("no-such-session", "x").await, Err(StoreError::NotFound)));
}

async fn revocation_is_once_and_visible_to_watchers(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    let token = auth::issue_session(s, "alice", None, Duration::from_secs(60)).await.unwrap();
    let hash = auth::token_hash(&token);
    let id = s.session_by_token_hash(&hash).await.unwrap().unwrap().session_id;
    assert!(s.sessions_revoked_since(0).await.unwrap().is_empty());
    assert!(s.revoke_session(&hash, 1_000).await.unwrap());
    assert!(!s.revoke_session(&hash, 2_000).await.unwrap(), "already revoked");
    assert!(!s.revoke_session(&auth::token_hash("nope"), 2_000).await.unwrap());
    assert_eq!(s.sessions_revoked_since(1_000).await.unwrap(), vec![id]);
    assert!(s.sessions_revoked_since(1_001).await.unwrap().is_empty());
    assert_eq!(s.session_by_token_hash(&hash).await.unwrap().unwrap().revoked_at, Some(1_000));
}

async fn devices_are_per_user_and_keep_first_seen(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    s.create_user("bob", false, 1).await.unwrap();
    s.record_device("alice", "d1", 10).await.unwrap();
    s.record_device("alice", "d2", 20).await.unwrap();
    s.record_device("alice", "d1", 30).await.unwrap();
    s.record_device("alice", "d1", 25).await.unwrap();
    s.record_device("bob", "d9", 5).await.unwrap();
    let devices = s.devices("alice").await.unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!((devices[0].device_hash.as_str(), devices[0].first_seen, devices[0].last_seen), ("d1", 10, 30));
    assert_eq!((devices[1].device_hash.as_str(), devices[1].first_seen), ("d2", 20));
    assert_eq!(s.devices("bob").await.unwrap().len(), 1);
    assert!(s.devices("nobody").await.unwrap().is_empty());
}

async fn provisioning_creates_missing_users_and_all_sessions(s: &dyn Store) {
    s.create_user("u0", true, 1).await.unwrap();
    let users = vec!["u0".to_owned(), "u1".to_owned()];
    let mut tokens = Vec::new();
    let mut sessions = Vec::new();
    for u in &users {
        let (token, session) = auth::new_session(u, Some(format!("{u}-dev")), Duration::from_secs(60));
        tokens.push(token);
        sessions.push(session);
    }
    s.provision(&users, &sessions).await.unwrap();
    assert!(s.user("u0").await.unwrap().unwrap().tfa_enabled, "existing users are kept as they are");
    assert!(s.user("u1").await.unwrap().is_some());
    for (token, user) in tokens.iter().zip(&users) {
        let found = s.session_by_token_hash(&auth::token_hash(token)).await.unwrap().unwrap();
        assert_eq!(&found.user_id, user);
        assert_eq!(found.device_hash, Some(format!("{user}-dev")));
    }
    assert_eq!(s.devices("u1").await.unwrap().len(), 1);
}

async fn a_closed_store_is_unavailable(s: &dyn Store) {
    s.close().await;
    assert!(matches!(s.user("alice").await, Err(StoreError::Unavailable(_))));
}
