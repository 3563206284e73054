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
    concurrent_sightings_all_land_and_a_bad_one_fails_alone,
    provisioning_creates_missing_users_and_all_sessions,
    devices_keep_the_label_they_were_given,
    users_and_sessions_are_listed,
    revoking_a_device_revokes_its_active_sessions_only,
    a_closed_store_is_unavailable,
    sessions_are_revoked_by_id_once_and_idempotently,
    api_keys_are_found_by_hash_listed_touched_and_revoked,
    user_summaries_count_devices,
);

/// SQLite's transient failures reach the identity half through sqlx (every call but the chat writer's):
/// the database held by another connection past the busy timeout (a `keys rotate`, a CLI command, another
/// process) is `Unavailable` there too, as it is for the chat writer, not a backend error, which a client
/// sees as `internal` (500) instead of `unavailable` (503, retry later).
#[tokio::test]
async fn sqlite_a_database_held_past_the_busy_timeout_is_unavailable() {
    let b = backends::sqlite().await.unwrap();
    let backends::Place::Sqlite(dir) = &b.place else { unreachable!() };
    let s = b.backend.identity.as_ref();
    let holder = rusqlite::Connection::open(dir.path().join("chatsync.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    // Waits the store's busy timeout (10 s) for the lock, then fails.
    let refused = s.create_user("alice", false, 1).await;
    holder.execute_batch("ROLLBACK").unwrap();
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    s.create_user("alice", false, 1).await.unwrap();
}

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
    s.record_device("alice", "d1", None, 10).await.unwrap();
    s.record_device("alice", "d2", None, 20).await.unwrap();
    s.record_device("alice", "d1", None, 30).await.unwrap();
    s.record_device("alice", "d1", None, 25).await.unwrap();
    s.record_device("bob", "d9", None, 5).await.unwrap();
    let devices = s.devices("alice").await.unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!((devices[0].device_hash.as_str(), devices[0].first_seen, devices[0].last_seen), ("d1", 10, 30));
    assert_eq!((devices[1].device_hash.as_str(), devices[1].first_seen), ("d2", 20));
    assert_eq!(s.devices("bob").await.unwrap().len(), 1);
    assert!(s.devices("nobody").await.unwrap().is_empty());
}

/// A reconnect storm: many authentications record their device at once (SQLite records them in shared
/// transactions); every one lands, and one that cannot (its user is gone) fails alone.
async fn concurrent_sightings_all_land_and_a_bad_one_fails_alone(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    let ids: Vec<String> = (0..300).map(|i| format!("d{i}")).collect();
    let sightings = ids.iter().enumerate().map(|(i, d)| {
        let user = if i == 100 { "ghost" } else { "alice" };
        s.record_device(user, d, Some("phone"), 10 + i as i64)
    });
    let results = futures_util::future::join_all(sightings).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_ok(), i != 100, "sighting {i}: {r:?}");
    }
    let devices = s.devices("alice").await.unwrap();
    assert_eq!(devices.len(), 299);
    assert!(devices.iter().all(|d| d.label.as_deref() == Some("phone")));
    assert!(s.devices("ghost").await.unwrap().is_empty());
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

async fn devices_keep_the_label_they_were_given(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    let (_, mut session) = auth::new_session("alice", Some("h-laptop".into()), Duration::from_secs(60));
    session.device_label = Some("laptop".into());
    s.create_session(&session).await.unwrap();
    s.record_device("alice", "h-ua", None, 10).await.unwrap();
    s.record_device("alice", "h-laptop", None, 20).await.unwrap();
    let label = |devices: Vec<chatsync::store::Device>, hash: &str| {
        devices.into_iter().find(|d| d.device_hash == hash).unwrap().label
    };
    assert_eq!(label(s.devices("alice").await.unwrap(), "h-laptop").as_deref(), Some("laptop"), "None keeps it");
    assert_eq!(label(s.devices("alice").await.unwrap(), "h-ua"), None);
    s.record_device("alice", "h-ua", Some("tab"), 30).await.unwrap();
    assert_eq!(label(s.devices("alice").await.unwrap(), "h-ua").as_deref(), Some("tab"));
}

async fn users_and_sessions_are_listed(s: &dyn Store) {
    assert!(s.users().await.unwrap().is_empty());
    s.create_user("bob", true, 2).await.unwrap();
    s.create_user("alice", false, 1).await.unwrap();
    let users = s.users().await.unwrap();
    assert_eq!(users.iter().map(|u| u.user_id.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    assert!(users[1].tfa_enabled);
    let (_, mut bound) = auth::new_session("alice", Some("h-phone".into()), Duration::from_secs(60));
    bound.device_label = Some("phone".into());
    bound.created_at = 100;
    let (_, mut unbound) = auth::new_session("alice", None, Duration::from_secs(60));
    unbound.created_at = 200;
    s.create_session(&bound).await.unwrap();
    s.create_session(&unbound).await.unwrap();
    let listed = s.sessions_of("alice").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].session_id, unbound.session_id, "newest first");
    assert_eq!((listed[0].device_hash.as_deref(), listed[0].device_label.as_deref()), (None, None));
    assert_eq!(listed[1].device_hash.as_deref(), Some("h-phone"));
    assert_eq!(listed[1].device_label.as_deref(), Some("phone"));
    assert_eq!(listed[1].revoked_at, None);
    assert!(s.sessions_of("bob").await.unwrap().is_empty());
}

async fn revoking_a_device_revokes_its_active_sessions_only(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    s.create_user("bob", false, 1).await.unwrap();
    let mut ids = Vec::new();
    for (user, device) in [("alice", "h1"), ("alice", "h1"), ("alice", "h2"), ("bob", "h1")] {
        let (_, session) = auth::new_session(user, Some(device.into()), Duration::from_secs(60));
        s.create_session(&session).await.unwrap();
        ids.push(session.session_id);
    }
    let mut expected = vec![ids[0].clone(), ids[1].clone()];
    expected.sort();
    assert_eq!(s.revoke_device("alice", "h1", 1_000).await.unwrap(), expected);
    assert!(s.revoke_device("alice", "h1", 2_000).await.unwrap().is_empty(), "already revoked");
    let revoked: Vec<_> = s.sessions_revoked_since(0).await.unwrap();
    assert_eq!(revoked.len(), 2, "alice's h2 and bob's h1 are untouched: {revoked:?}");
    let alice = s.sessions_of("alice").await.unwrap();
    assert_eq!(alice.iter().filter(|x| x.revoked_at == Some(1_000)).count(), 2);
}

async fn a_closed_store_is_unavailable(s: &dyn Store) {
    s.close().await;
    assert!(matches!(s.user("alice").await, Err(StoreError::Unavailable(_))));
}

async fn sessions_are_revoked_by_id_once_and_idempotently(s: &dyn Store) {
    s.create_user("alice", false, 1).await.unwrap();
    let token = auth::issue_session(s, "alice", None, Duration::from_secs(60)).await.unwrap();
    let hash = auth::token_hash(&token);
    let id = s.session_by_token_hash(&hash).await.unwrap().unwrap().session_id;
    assert_eq!(s.revoke_session_by_id(&id, 1_000).await.unwrap().as_deref(), Some("alice"));
    assert_eq!(s.revoke_session_by_id(&id, 2_000).await.unwrap().as_deref(), Some("alice"));
    assert_eq!(s.session_by_token_hash(&hash).await.unwrap().unwrap().revoked_at, Some(1_000), "the first time stays");
    assert_eq!(s.sessions_revoked_since(1_000).await.unwrap(), vec![id]);
    assert_eq!(s.revoke_session_by_id("no-such-session", 3_000).await.unwrap(), None);
}

async fn api_keys_are_found_by_hash_listed_touched_and_revoked(s: &dyn Store) {
    let (a, b) = (auth::token_hash("ck_a"), auth::token_hash("ck_b"));
    s.create_api_key("ak_1", &a, Some("bot"), 10).await.unwrap();
    s.create_api_key("ak_2", &b, None, 20).await.unwrap();
    assert!(s.create_api_key("ak_3", &a, None, 30).await.is_err(), "a key hash is unique");
    let found = s.api_key_by_hash(&a).await.unwrap().unwrap();
    assert_eq!((found.key_id.as_str(), found.name.as_deref(), found.created_at), ("ak_1", Some("bot"), 10));
    assert_eq!((found.last_used_at, found.revoked_at), (None, None));
    assert!(s.api_key_by_hash(&auth::token_hash("ck_c")).await.unwrap().is_none());
    s.touch_api_key("ak_1", 50).await.unwrap();
    assert_eq!(s.api_key_by_hash(&a).await.unwrap().unwrap().last_used_at, Some(50));
    assert!(s.revoke_api_key("ak_1", 60).await.unwrap());
    assert!(!s.revoke_api_key("ak_1", 70).await.unwrap(), "already revoked");
    assert!(!s.revoke_api_key("ak_9", 70).await.unwrap(), "unknown");
    let listed: Vec<_> = s.api_keys().await.unwrap().into_iter().map(|k| (k.key_id, k.revoked_at)).collect();
    assert_eq!(listed, vec![("ak_1".to_owned(), Some(60)), ("ak_2".to_owned(), None)]);
}

async fn user_summaries_count_devices(s: &dyn Store) {
    s.create_user("alice", true, 5).await.unwrap();
    s.create_user("bob", false, 6).await.unwrap();
    s.record_device("alice", "aaaa", None, 10).await.unwrap();
    s.record_device("alice", "bbbb", None, 11).await.unwrap();
    s.record_device("bob", "aaaa", None, 12).await.unwrap();
    let alice = s.user_summary("alice").await.unwrap().unwrap();
    assert_eq!((alice.user.tfa_enabled, alice.user.created_at, alice.chat_count, alice.device_count), (true, 5, 0, 2));
    assert!(s.user_summary("nobody").await.unwrap().is_none());
}
