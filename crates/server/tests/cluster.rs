//! Cluster mode (issue 8): nodes sharing one store and a Redis bus. One user with a device on each node:
//! every broadcast arrives exactly once on every other node and never echoes; a write on one node is what
//! initial sync returns on another (caches stay true); a deletion is gone everywhere; a write whose outcome
//! is unknown empties every node's cache of its user; the bus going down never stops a node from confirming
//! writes, and delivery resumes when Redis returns; a revocation on the CLI closes the socket on another
//! node at once; a node's cached API keys never outlive a revocation (nor a Redis outage or a lost epoch);
//! nothing crosses Redis in plaintext; a node whose subscriber lags drops past its bound and declares a gap; a
//! subscription Redis drops without closing the connection (a Redis Cluster slot leaving the server) is a gap.

#[macro_use]
mod sync_util;
mod common;

use chatsync_client::Client;
use chatsync_protocol::*;
use common::cluster::{redis_url, OwnRedis, TestCluster};
use common::TestServer;
use serde_json::json;
use std::time::Duration;
use sync_util::*;

/// alice's phone on node 0, laptop on node 1, tablet on node 2.
async fn devices(cluster: &TestCluster) -> (Client, Client, Client) {
    let phone = new_user(&cluster.nodes[0], "alice", "phone").await;
    let laptop = another_device(&cluster.nodes[1], "alice", "laptop").await;
    let tablet = another_device(&cluster.nodes[2], "alice", "tablet").await;
    (phone, laptop, tablet)
}

/// The next message on `c`: a broadcast (no `request_id`).
async fn next_broadcast(c: &mut Client) -> Incoming {
    let m = tokio::time::timeout(Duration::from_secs(10), c.recv()).await.expect("a broadcast").unwrap();
    assert_eq!(m.request_id, None, "{m:?}");
    m
}

/// Proves that nothing else is on its way to `others` from the phone's node: the phone writes a marker
/// title, and the next thing each other device gets must be that marker (the bus keeps order).
async fn barrier(phone: &mut Client, others: [&mut Client; 2], n: usize) {
    let chat = format!("barrier{n}");
    set_title(phone, &chat, "b").await;
    for c in others {
        let m = next_broadcast(c).await;
        assert_eq!(expect_msg!(m, ChatTitleUpdated).chat_id.as_str(), chat, "a duplicate or stray broadcast");
    }
    assert_quiet(phone).await;
}

#[tokio::test]
async fn every_broadcast_reaches_each_other_node_exactly_once_and_never_echoes() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(3, &url, |_| {}).await;
    let (mut phone, mut laptop, mut tablet) = devices(&cluster).await;
    let mut round = 0;

    // update_title: ALL (SELF's copy with the request_id).
    let reply = phone.request(&title("c1", "Trip")).await.unwrap();
    assert!(reply.request_id.is_some());
    expect_msg!(reply, ChatTitleUpdated);
    for c in [&mut laptop, &mut tablet] {
        assert_eq!(expect_msg!(next_broadcast(c).await, ChatTitleUpdated).data.title, "Trip");
    }
    barrier(&mut phone, [&mut laptop, &mut tablet], round).await;
    round += 1;

    // update_draft: OTHERS.
    expect_msg!(phone.request(&draft("c1", doc("hi"))).await.unwrap(), DraftUpdateConfirmed);
    for c in [&mut laptop, &mut tablet] {
        let event = expect_msg!(next_broadcast(c).await, ChatDraftUpdated);
        assert_eq!(event.data.draft_json, doc("hi").as_object().cloned());
    }
    barrier(&mut phone, [&mut laptop, &mut tablet], round).await;
    round += 1;

    // chat_message_added: OTHERS.
    expect_msg!(phone.request(&message("c1", "m1", json!("hello"))).await.unwrap(), ChatMessageConfirmed);
    for c in [&mut laptop, &mut tablet] {
        let event = expect_msg!(next_broadcast(c).await, ChatMessageAdded);
        assert_eq!((event.message.message_id.as_str(), event.message.seq), ("m1", 1));
    }
    barrier(&mut phone, [&mut laptop, &mut tablet], round).await;
    round += 1;

    // delete_draft: OTHERS.
    expect_msg!(phone.request(&delete_draft("c1")).await.unwrap(), DraftDeleteReceipt);
    for c in [&mut laptop, &mut tablet] {
        expect_msg!(next_broadcast(c).await, DraftDeleted);
    }
    barrier(&mut phone, [&mut laptop, &mut tablet], round).await;
    round += 1;

    // sync_offline_changes: each applied change to ALL.
    let (before, done) = offline_round(&mut phone, json!([off_title("o1", "c1", "Offline", 1)])).await;
    assert_eq!(done.results[0].status, OfflineStatus::Applied);
    assert_eq!(before.len(), 1);
    for c in [&mut laptop, &mut tablet] {
        assert_eq!(expect_msg!(next_broadcast(c).await, ChatTitleUpdated).data.title, "Offline");
    }
    barrier(&mut phone, [&mut laptop, &mut tablet], round).await;
    round += 1;

    // delete_chat: ALL.
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    for c in [&mut laptop, &mut tablet] {
        expect_msg!(next_broadcast(c).await, ChatDeleted);
    }
    barrier(&mut phone, [&mut laptop, &mut tablet], round).await;

    // Bob, on every node, heard nothing.
    let mut bob = new_user(&cluster.nodes[1], "bob", "phone").await;
    assert_quiet(&mut bob).await;
}

#[tokio::test]
async fn warm_up_events_reach_every_node() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    let token = cluster.nodes[0].user_token("alice").await;
    let (mut laptop, _) = cluster.nodes[1].connect_raw(&token, "laptop").await;
    // The laptop's own warm-up (node 1) ends with cache_primed; a phone connecting on node 0 warms node 0's
    // cache, and its cache_primed reaches the laptop through the bus too.
    loop {
        if let ServerMessage::CachePrimed(_) = laptop.recv().await.unwrap().message {
            break;
        }
    }
    let token2 = cluster.nodes[0].token("alice").await;
    let (_phone, _) = cluster.nodes[0].connect_raw(&token2, "phone").await;
    loop {
        if let ServerMessage::CachePrimed(_) = laptop.recv().await.unwrap().message {
            break;
        }
    }
}

#[tokio::test]
async fn a_write_on_one_node_is_what_initial_sync_returns_on_another() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(3, &url, |_| {}).await;
    let (mut phone, mut laptop, mut tablet) = devices(&cluster).await;
    set_title(&mut phone, "c1", "one").await;
    set_title(&mut phone, "c2", "doomed").await;
    add_message(&mut phone, "c1", "m1", json!("x")).await;
    // Warm every node's cache of alice's chat list.
    for c in [&mut laptop, &mut tablet] {
        while c.buffered() > 0 || next_is_pending(c).await {}
        assert_eq!(sync_all(c).await.server_chat_order.len(), 2);
    }
    // Writes on node 0 after the caches were filled.
    set_title(&mut phone, "c1", "two").await;
    set_draft(&mut phone, "c1", doc("draft")).await;
    add_message(&mut phone, "c1", "m2", json!("y")).await;
    expect_msg!(phone.request(&delete_chat("c2")).await.unwrap(), ChatDeleted);
    for c in [&mut laptop, &mut tablet] {
        // The broadcasts travel behind the cache updates on the same channel.
        let mut seen = 0;
        while seen < 4 {
            next_broadcast(c).await;
            seen += 1;
        }
        let sync = sync_with(c, json!({"c1": {"messages_v": 1, "title_v": 1, "draft_v": 0}, "c2": {}}), None).await;
        assert_eq!(ids(&sync.chat_ids_to_delete), ["c2"], "deleted on another node");
        assert_eq!(ids(&sync.server_chat_order), ["c1"]);
        let c1 = entry(&sync, "c1").expect("c1 is newer");
        assert_eq!(c1.title.as_deref(), Some("two"));
        assert_eq!(c1.versions, Versions { messages_v: 2, title_v: 2, draft_v: 1 });
        assert_eq!(c1.draft_json, Some(doc("draft").as_object().cloned()));
        let page = all_messages(c, "c1").await;
        assert_eq!(page.messages.len(), 2);
        assert_not_found(&c.request(&title("c2", "back")).await.unwrap());
    }
}

#[tokio::test]
async fn messages_a_node_could_not_publish_make_every_node_resync() {
    // Node 0 drops what it publishes (as with a full queue) while alice deletes a chat there: node 1,
    // whose bus stayed healthy, never hears of the delete and would go on serving the chat from its cache
    // (and its key from memory). Node 0 queues a resync order behind what it dropped, published even if
    // nothing else is, and node 1 drops its caches on it.
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    let mut phone = new_user(&cluster.nodes[0], "alice", "phone").await;
    let mut laptop = another_device(&cluster.nodes[1], "alice", "laptop").await;
    set_title(&mut phone, "doomed", "soon gone").await;
    expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated);
    assert_eq!(ids(&sync_all(&mut laptop).await.server_chat_order), ["doomed"], "node 1 caches the chat");

    let bus = cluster.nodes[0].ctx.bus.as_ref().expect("a cluster node");
    bus.drop_publishes(true);
    expect_msg!(phone.request(&delete_chat("doomed")).await.unwrap(), ChatDeleted);
    bus.drop_publishes(false);
    // Nothing else is published; node 1 must catch up all the same (a liveness bound, not a timing check).
    for attempt in 0.. {
        if sync_all(&mut laptop).await.server_chat_order.is_empty() {
            break;
        }
        assert!(attempt < 500, "node 1 still serves the chat deleted on node 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads whatever the client has queued without waiting long (warm-up drained by the harness anyway).
async fn next_is_pending(c: &mut Client) -> bool {
    matches!(tokio::time::timeout(Duration::from_millis(20), c.recv()).await, Ok(Ok(_)))
}

/// Two nodes on a redis-server of the test's own (which the test may stop); `None` on a machine without
/// Redis (redis-server comes with it).
async fn two_nodes_on_own_redis() -> Option<(OwnRedis, TestCluster)> {
    redis_url()?;
    let redis = OwnRedis::start();
    let cluster = TestCluster::start(2, &redis.url(), |_| {}).await;
    Some((redis, cluster))
}

#[tokio::test]
async fn with_redis_down_writes_are_confirmed_and_delivery_resumes_when_it_returns() {
    let Some((mut redis, cluster)) = two_nodes_on_own_redis().await else { return };
    let mut phone = new_user(&cluster.nodes[0], "alice", "phone").await;
    let mut tab = another_device(&cluster.nodes[0], "alice", "tab").await;
    let mut laptop = another_device(&cluster.nodes[1], "alice", "laptop").await;
    set_title(&mut phone, "c1", "before").await;
    expect_msg!(next_broadcast(&mut tab).await, ChatTitleUpdated);
    expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated);
    sync_all(&mut laptop).await; // node 1 caches the list

    redis.kill();
    cluster.wait_unhealthy().await;
    // Writes are still confirmed, and the node's own connections still get them.
    set_title(&mut phone, "c1", "during").await;
    assert_eq!(expect_msg!(next_broadcast(&mut tab).await, ChatTitleUpdated).data.title, "during");
    set_title(&mut laptop, "c1", "laptop during").await;
    // A message from another sender (delivered in the bus order when the bus is up) is not held either.
    let api = cluster.nodes[0].api().await;
    let body = json!({"message_id": "b1", "sender_name": "assistant", "content": "during the outage"});
    assert_eq!(api.post("/users/alice/chats/c1/messages", body).await.0, 201);
    for device in [&mut phone, &mut tab] {
        let added = expect_msg!(next_broadcast(device).await, ChatMessageAdded);
        assert_eq!(added.message.content, text("during the outage"));
    }
    // Node 1 does not serve its (possibly stale) cache while the bus is down: it reads the store.
    let sync = sync_all(&mut laptop).await;
    assert_eq!(entry(&sync, "c1").unwrap().versions.title_v, 3);

    redis.restart();
    cluster.wait_healthy().await;
    set_title(&mut phone, "c1", "after").await;
    expect_msg!(next_broadcast(&mut tab).await, ChatTitleUpdated);
    // "during" never crossed (the bus was down); the next broadcast across nodes is "after".
    let m = next_broadcast(&mut laptop).await;
    assert_eq!(expect_msg!(m, ChatTitleUpdated).data.title, "after", "delivery across nodes resumed");
    let sync = sync_all(&mut laptop).await;
    assert_eq!(entry(&sync, "c1").unwrap().title.as_deref(), Some("after"));
    assert_eq!(entry(&sync, "c1").unwrap().versions.title_v, 4);
}

#[tokio::test]
async fn a_stalled_redis_is_noticed_and_delivery_resumes_when_it_answers_again() {
    let Some((mut redis, cluster)) = two_nodes_on_own_redis().await else { return };
    let mut phone = new_user(&cluster.nodes[0], "alice", "phone").await;
    let mut laptop = another_device(&cluster.nodes[1], "alice", "laptop").await;
    set_title(&mut phone, "c1", "before").await;
    expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated);

    // Paused, Redis keeps every connection open and answers nothing: each node must still notice (and
    // stop trusting its cache), with no disconnection to tell it.
    redis.pause();
    cluster.wait_unhealthy().await;
    set_title(&mut phone, "c1", "during").await;

    redis.resume();
    cluster.wait_healthy().await;
    set_title(&mut phone, "c1", "after").await;
    // "during" may or may not have crossed (Redis ran what it had buffered); "after" does.
    loop {
        let m = next_broadcast(&mut laptop).await;
        if expect_msg!(m, ChatTitleUpdated).data.title == "after" {
            break;
        }
    }
    redis.kill();
}

#[tokio::test]
async fn revocation_on_the_cli_closes_the_socket_on_another_node_at_once() {
    let Some(url) = redis_url() else { return };
    // Polling is slowed to an hour: only the bus can close the socket within the test.
    let cluster = TestCluster::start(2, &url, |c| c.session_check_interval_secs = 3600).await;
    let token = cluster.nodes[0].user_token("alice").await;
    let (mut laptop, _) = cluster.nodes[1].connect(&token, "laptop").await;
    let node0 = &cluster.nodes[0];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["sessions", "revoke", &token])
        .arg("--data-dir")
        .arg(node0.data.path())
        .args(["--redis-url", &url, "--redis-prefix", &node0.ctx.config.redis_prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let close = tokio::time::timeout(Duration::from_secs(10), laptop.recv_close()).await.expect("closed promptly");
    assert_eq!(close.unwrap(), (1008, "Session revoked".into()));
}

#[tokio::test]
async fn device_revocation_on_the_cli_closes_the_device_s_socket_on_another_node_at_once() {
    let Some(url) = redis_url() else { return };
    // Polling is slowed to an hour: only the bus can close the socket within the test.
    let cluster = TestCluster::start(2, &url, |c| c.session_check_interval_secs = 3600).await;
    let token = cluster.nodes[0].user_token("alice").await;
    let (mut laptop, _) = cluster.nodes[1].connect(&token, "laptop").await;
    let node0 = &cluster.nodes[0];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["devices", "revoke", "alice", "laptop"])
        .arg("--data-dir")
        .arg(node0.data.path())
        .args(["--redis-url", &url, "--redis-prefix", &node0.ctx.config.redis_prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let close = tokio::time::timeout(Duration::from_secs(10), laptop.recv_close()).await.expect("closed promptly");
    assert_eq!(close.unwrap(), (1008, "Session revoked".into()));
}

/// A session revoked through the API of one node while its connection on another node is being set up
/// (its session read as valid, the connection not registered yet): the revocation reaches that node
/// through the bus, finds no connection of the session to close, and the connection is refused when it
/// is admitted (1008 `Session revoked`), not left open until the periodic check (an hour here).
#[tokio::test]
async fn a_session_revoked_on_another_node_while_its_connection_is_being_set_up_is_refused() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |c| c.session_check_interval_secs = 3600).await;
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let token = node0.user_token("alice").await;
    let hash = chatsync::gateway::auth::token_hash(&token);
    let session_id = node0.ctx.store.session_by_token_hash(&hash).await.unwrap().unwrap().session_id;
    let mut held = node1.ctx.pauses.arm(chatsync::pause::AUTHENTICATED);
    let mut laptop =
        Client::connect(&node1.url, &chatsync_client::ConnectOptions::new(&token, "laptop")).await.unwrap();
    held.reached().await;
    let closes_before = node1.ctx.hub.revocations();
    assert_eq!(node0.api().await.delete(&format!("/sessions/{session_id}")).await.0, 204);
    // Node 1 has handled the revocation from the bus (and found nothing to close) before the connection
    // goes on.
    while node1.ctx.hub.revocations() == closes_before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held.release();
    match tokio::time::timeout(Duration::from_secs(10), laptop.recv()).await.expect("an answer") {
        Err(chatsync_client::ClientError::Closed(close)) => {
            assert_eq!(close, Some((1008, "Session revoked".into())))
        }
        other => panic!("the connection of a session revoked on another node was set up: {other:?}"),
    }
}

#[tokio::test]
async fn nothing_crosses_or_rests_in_redis_in_plaintext() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    let prefix = cluster.nodes[0].ctx.config.redis_prefix.clone();
    // Listen to everything published under this cluster's prefix.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut spy = client.get_async_pubsub().await.unwrap();
    spy.psubscribe(format!("{prefix}*")).await.unwrap();
    let mut phone = new_user(&cluster.nodes[0], "alice", "phone").await;
    let mut laptop = another_device(&cluster.nodes[1], "alice", "laptop").await;
    set_title(&mut phone, "c1", "SECRET-TITLE").await;
    set_draft(&mut phone, "c1", doc("SECRET-DRAFT")).await;
    add_message(&mut phone, "c1", "m1", json!("SECRET-MESSAGE")).await;
    for _ in 0..3 {
        next_broadcast(&mut laptop).await;
    }
    let mut stream = spy.on_message();
    let mut seen = 0;
    use futures_util::StreamExt;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
        let payload: Vec<u8> = msg.get_payload().unwrap();
        let text = String::from_utf8_lossy(&payload);
        for secret in ["SECRET-TITLE", "SECRET-DRAFT", "SECRET-MESSAGE", "alice"] {
            assert!(!text.contains(secret), "{secret} crossed Redis in plaintext");
        }
        seen += 1;
    }
    assert!(seen >= 6, "the spy saw the traffic ({seen} messages)");
    // Redis keeps nothing of ours.
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn a_single_node_without_redis_has_no_bus() {
    let server = TestServer::start().await;
    assert!(server.ctx.bus.is_none());
}

#[tokio::test]
async fn sharded_pub_sub_carries_broadcasts_and_cache_updates_too() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |c| c.redis_sharded_pubsub = true).await;
    let mut phone = new_user(&cluster.nodes[0], "alice", "phone").await;
    let mut laptop = another_device(&cluster.nodes[1], "alice", "laptop").await;
    sync_all(&mut laptop).await;
    set_title(&mut phone, "c1", "sharded").await;
    assert_eq!(expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated).data.title, "sharded");
    assert_eq!(entry(&sync_all(&mut laptop).await, "c1").unwrap().title.as_deref(), Some("sharded"));
}

#[tokio::test]
async fn sharded_pub_sub_resubscribes_every_user_after_redis_returns() {
    // Redis Cluster refuses an SSUBSCRIBE whose channels hash to different slots; a standalone Redis does
    // not check, so this runs on a one-server cluster of the test's own.
    if redis_url().is_none() {
        return;
    }
    let mut redis = OwnRedis::start_cluster();
    let cluster = TestCluster::start(2, &redis.url(), |c| c.redis_sharded_pubsub = true).await;
    let mut phone = new_user(&cluster.nodes[0], "alice", "phone").await;
    let mut laptop = another_device(&cluster.nodes[1], "alice", "laptop").await;
    let mut bob0 = new_user(&cluster.nodes[0], "bob", "phone").await;
    let mut bob1 = another_device(&cluster.nodes[1], "bob", "laptop").await;
    set_title(&mut phone, "c1", "before").await;
    expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated);

    redis.kill();
    cluster.wait_unhealthy().await;
    redis.restart();
    // Node 1 now subscribes to alice's, bob's and the control channel at once.
    tokio::time::timeout(Duration::from_secs(30), cluster.wait_healthy()).await.expect("every node resubscribed");
    set_title(&mut phone, "c1", "after").await;
    assert_eq!(expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated).data.title, "after");
    set_title(&mut bob0, "b1", "after").await;
    assert_eq!(expect_msg!(next_broadcast(&mut bob1).await, ChatTitleUpdated).data.title, "after");
    redis.kill();
}

#[tokio::test]
async fn a_subscription_redis_drops_without_closing_the_connection_is_a_gap() {
    // On a Redis Cluster, a shard channel's subscribers get `sunsubscribe` when its slot leaves the
    // server (moved, or its primary demoted by a failover) and keep their connection, which still
    // answers PING. A node that took no notice trusted its cache for ever while nothing arrived.
    if redis_url().is_none() {
        return;
    }
    let redis = OwnRedis::start_cluster();
    let cluster = TestCluster::start(2, &redis.url(), |c| c.redis_sharded_pubsub = true).await;
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut phone = new_user(node0, "alice", "phone").await;
    let mut laptop = another_device(node1, "alice", "laptop").await;
    set_title(&mut phone, "c1", "before").await;
    expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated);
    while laptop.buffered() > 0 || next_is_pending(&mut laptop).await {}
    assert_eq!(entry(&sync_all(&mut laptop).await, "c1").unwrap().title.as_deref(), Some("before"));
    assert!(node1.ctx.cache.chats("alice").await.is_some(), "node 1 cached alice's list");

    // Alice's slot leaves the server and comes back: every subscriber of her channel got `sunsubscribe`.
    let channel = chatsync::cluster::bus::user_channel(&node1.ctx.config.redis_prefix, "alice");
    let slot = redis.cli(&["CLUSTER", "KEYSLOT", &channel]).trim().to_owned();
    // (Serving the other slots meanwhile: no publish fails, so no node resyncs for that reason.)
    redis.cli(&["CONFIG", "SET", "cluster-require-full-coverage", "no"]);
    redis.cli(&["CLUSTER", "DELSLOTS", &slot]);
    redis.cli(&["CLUSTER", "ADDSLOTS", &slot]);
    while !redis.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    set_title(&mut phone, "c1", "after").await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while entry(&sync_all(&mut laptop).await, "c1").unwrap().title.as_deref() != Some("after") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("node 1 stopped serving the list it cached before its subscription was dropped");
    // Subscribed again: broadcasts reach node 1.
    for i in 0.. {
        assert!(i < 60, "node 1 never subscribed to alice's channel again");
        set_title(&mut phone, "c2", &format!("again {i}")).await;
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), laptop.recv()).await {
            if let ServerMessage::ChatTitleUpdated(u) = m.unwrap().message {
                if u.chat_id.as_str() == "c2" {
                    break;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_user_subscribed_late_is_not_served_what_the_node_cached_before() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut bob0 = new_user(node0, "bob", "phone").await;
    let _bob1 = another_device(node1, "bob", "laptop").await;
    let mut phone = new_user(node0, "alice", "phone").await;
    set_title(&mut phone, "c1", "doomed").await;
    // Node 1's subscriber is held on one of bob's frames: alice's subscription waits behind it, longer
    // than her connection waits for it.
    let mut held = node1.ctx.pauses.arm(chatsync::pause::BUS_FRAME);
    set_title(&mut bob0, "b1", "x").await;
    held.reached().await;
    let token = node1.token("alice").await;
    let (mut laptop, _) = node1.connect_raw(&token, "laptop").await;
    loop {
        // Node 1 cached alice's list (with c1) while not yet subscribed to her channel.
        if matches!(laptop.recv().await.unwrap().message, ServerMessage::CachePrimed(_)) {
            break;
        }
    }
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    // A device's write is answered before its node has published it; an API call is answered after its
    // turn on the bus, so once it is, Redis has seen the deletion (before node 1 subscribes to alice).
    let body = json!({"message_id": "m1", "sender_name": "assistant", "content": "x"});
    assert_eq!(node0.api().await.post("/users/bob/chats/b1/messages", body).await.0, 201);
    held.release();
    // Node 1 subscribes to alice once its subscriber is free; until then her broadcasts do not reach it.
    for i in 0.. {
        assert!(i < 60, "node 1 never subscribed to alice's channel");
        set_title(&mut phone, "c2", &format!("after {i}")).await;
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), laptop.recv()).await {
            assert_eq!(expect_msg!(m.unwrap(), ChatTitleUpdated).chat_id.as_str(), "c2", "subscribed now");
            break;
        }
    }
    let sync = sync_with(&mut laptop, json!({"c1": {"title_v": 1, "messages_v": 0, "draft_v": 0}}), None).await;
    assert_eq!(ids(&sync.chat_ids_to_delete), ["c1"], "the deletion it missed is not hidden by its cache");
    assert_eq!(ids(&sync.server_chat_order), ["c2"]);
}

#[tokio::test]
async fn a_deleted_chat_s_key_is_forgotten_on_a_node_without_the_user_s_connections() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut phone = new_user(node0, "alice", "phone").await;
    set_title(&mut phone, "c1", "secret").await;
    // The backend writes through node 1, which then holds the chat's key; alice has no connection there.
    let api = node1.api().await;
    let body = json!({"message_id": "b1", "sender_name": "assistant", "content": "hi"});
    assert_eq!(api.post("/users/alice/chats/c1/messages", body).await.0, 201);
    assert!(node1.ctx.keys.holds_key("c1"));
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    tokio::time::timeout(Duration::from_secs(10), async {
        while node1.ctx.keys.holds_key("c1") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("node 1 forgot the deleted chat's key (crypto-shredding holds on every node)");
}

/// An API client of `node` with `api`'s key.
fn api_on(node: &TestServer, api: &common::Api) -> common::Api {
    common::Api { base: node.api_base(), ..api.clone() }
}

/// Waits until `node` serves API keys from its cache again (after a Redis failure it asks the store for a
/// while): a fresh key, seen, then revoked in the store only, still passes there.
async fn wait_until_node_caches_keys(node: &TestServer, owner: &TestServer) {
    for _ in 0..100 {
        let probe = api_on(node, &owner.api().await);
        for _ in 0..2 {
            assert_eq!(probe.get("/users/alice").await.0, 200);
        }
        revoke_in_store_only(owner, &probe).await;
        if probe.get("/users/alice").await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the node never used its API key cache again");
}

/// Revokes `api`'s key in the store only, without the epoch `chatsync api-keys revoke` writes next.
async fn revoke_in_store_only(node: &TestServer, api: &common::Api) {
    let hash = chatsync::gateway::auth::token_hash(&api.key);
    let key = node.ctx.store.api_key_by_hash(&hash).await.unwrap().unwrap();
    assert!(node.ctx.store.revoke_api_key(&key.key_id, chatsync::store::now_millis()).await.unwrap());
}

#[tokio::test]
async fn a_node_caches_api_keys_and_a_revocation_reaches_every_node_before_the_command_returns() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    cluster.nodes[0].user("alice", false).await;
    let api = cluster.nodes[0].api().await;
    let on_1 = api_on(&cluster.nodes[1], &api);
    assert_eq!(on_1.get("/users/alice").await.0, 200);
    // The key is cached on node 1: a revocation written to the store alone (without the epoch that
    // `api-keys revoke` writes next) does not reach it. This is what makes the next step mean something.
    revoke_in_store_only(&cluster.nodes[0], &api).await;
    assert_eq!(on_1.get("/users/alice").await.0, 200, "served from node 1's cache");
    // What `chatsync api-keys revoke` does after its commit: every node refuses the key from now on.
    chatsync::api::key_cache::bump_epoch(&cluster.nodes[0].ctx.config).await.unwrap();
    for client in [&on_1, &api] {
        let (status, body) = client.get("/users/alice").await;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    }
    // Another key is unaffected, and an unknown key is never cached.
    let other = cluster.nodes[0].api().await;
    assert_eq!(api_on(&cluster.nodes[1], &other).get("/users/alice").await.0, 200);
    let unknown = common::Api { key: "ck_unknown".into(), ..other.clone() };
    assert_eq!(api_on(&cluster.nodes[1], &unknown).get("/users/alice").await.0, 401);
}

#[tokio::test]
async fn without_redis_a_node_checks_api_keys_in_the_store_and_a_redis_that_lost_its_data_empties_caches() {
    let Some((mut redis, cluster)) = two_nodes_on_own_redis().await else { return };
    cluster.nodes[0].user("alice", false).await;
    let first = api_on(&cluster.nodes[1], &cluster.nodes[0].api().await);
    assert_eq!(first.get("/users/alice").await.0, 200, "cached on node 1");

    // Redis down: node 1 does not trust its cache; the store says revoked.
    redis.kill();
    cluster.wait_unhealthy().await;
    revoke_in_store_only(&cluster.nodes[0], &first).await;
    assert_eq!(first.get("/users/alice").await.0, 401, "looked up in the store while Redis is down");
    let second = api_on(&cluster.nodes[1], &cluster.nodes[0].api().await);
    assert_eq!(second.get("/users/alice").await.0, 200, "a valid key still passes");

    // Back (empty: the epoch is gone): the node reconnects and, after its pause, caches again.
    redis.restart();
    cluster.wait_healthy().await;
    wait_until_node_caches_keys(&cluster.nodes[1], &cluster.nodes[0]).await;
    for _ in 0..2 {
        assert_eq!(second.get("/users/alice").await.0, 200);
    }
    // The epoch lost again (evicted, flushed) after a revocation wrote it: the lost value is replaced by a
    // fresh one, never by one the key may have been cached under, so the store is asked again.
    let epoch_key = format!("{}api-keys-epoch", cluster.nodes[0].ctx.config.redis_prefix);
    let mut redis_conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    revoke_in_store_only(&cluster.nodes[0], &second).await;
    redis::cmd("DEL").arg(&epoch_key).query_async::<()>(&mut redis_conn).await.unwrap();
    assert_eq!(second.get("/users/alice").await.0, 401);
}

#[tokio::test]
async fn a_write_whose_outcome_is_unknown_empties_every_node_s_cache_of_the_user() {
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut phone = new_user(node0, "alice", "phone").await;
    let mut laptop = another_device(node1, "alice", "laptop").await;
    set_title(&mut phone, "c1", "one").await;
    while laptop.buffered() > 0 || next_is_pending(&mut laptop).await {}
    assert_eq!(sync_all(&mut laptop).await.server_chat_order.len(), 1);
    assert!(node1.ctx.cache.chats("alice").await.is_some(), "node 1 cached alice's list");
    // Node 1 holds c1's key (the backend wrote through it).
    let body = json!({"message_id": "b1", "sender_name": "assistant", "content": "hi"});
    assert_eq!(node1.api().await.post("/users/alice/chats/c1/messages", body).await.0, 201);
    assert!(node1.ctx.keys.holds_key("c1"));

    // A deletion of c1 on node 0 fails with its outcome unknown (it may have committed).
    node0.ctx.cache.write_unknown("alice", Some("c1")).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while node1.ctx.cache.chats("alice").await.is_some() || node1.ctx.keys.holds_key("c1") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("node 1 dropped alice's cached list and forgot c1's key");
    // Reads go to the store, and refill the cache.
    assert_eq!(chat_state(&mut laptop, "c1").await.title.as_deref(), Some("one"));
    let cached = node1.ctx.cache.chats("alice").await.expect("refilled");
    assert!(cached.iter().any(|c| c.chat_id == "c1"), "c1 exists (the deletion did not commit)");

    // A deletion of c9 fails likewise, and did commit: node 1's next load holds no c9 (as this one, put
    // by the test). A late result of a write to c9 merged on node 0 must not bring it back there; node 1
    // drops the list instead (the store knows).
    let mut c9 = cached.iter().find(|c| c.chat_id == "c1").unwrap().clone();
    c9.chat_id = "c9".into();
    node0.ctx.cache.write_unknown("alice", Some("c9")).await;
    let dropped = |what: &'static str| async move {
        tokio::time::timeout(Duration::from_secs(10), async {
            while node1.ctx.cache.chats("alice").await.is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect(what)
    };
    dropped("node 1 dropped alice's list at the second Forget").await;
    let token = node1.ctx.cache.begin_load("alice").await;
    assert!(node1.ctx.cache.put_chats("alice", token, Vec::new()).await);
    node0.ctx.cache.chat_written("alice", &c9, true).await;
    dropped("node 1 dropped the list rather than bring the uncertain chat back into it").await;
}

/// A [`BusHandler`](chatsync::cluster::BusHandler) that records what arrives and holds the first message
/// until released (a subscriber that lags).
struct Lagging {
    received: parking_lot::Mutex<Vec<chatsync::cluster::BusMessage>>,
    gaps: std::sync::atomic::AtomicUsize,
    reached: parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    release: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

#[async_trait::async_trait]
impl chatsync::cluster::BusHandler for Lagging {
    async fn on_message(&self, _user: Option<&str>, message: chatsync::cluster::BusMessage) {
        self.received.lock().push(message);
        let first = self.reached.lock().take();
        if let Some(reached) = first {
            let _ = reached.send(());
            if let Some(release) = self.release.lock().await.take() {
                let _ = release.await;
            }
        }
    }
    async fn on_subscribed(&self, _user: &str) {}
    async fn on_gap(&self) {
        self.gaps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn deleted(chat_id: &str) -> chatsync::cluster::BusMessage {
    chatsync::cluster::BusMessage::ChatDeleted { chat_id: chat_id.into() }
}

/// A bus on `url` with the server's bounds and a channel prefix of its own.
fn default_bus_config(url: String) -> chatsync::cluster::BusConfig {
    chatsync::cluster::BusConfig {
        url,
        prefix: common::cluster::unique_prefix(),
        sharded: false,
        max_incoming: chatsync::cluster::bus::MAX_INCOMING,
        max_incoming_bytes: chatsync::cluster::bus::MAX_INCOMING_BYTES,
    }
}

#[tokio::test]
async fn a_node_whose_subscriber_lags_past_its_bound_drops_what_comes_next_declares_a_gap_and_keeps_listening() {
    use chatsync::cluster::{Bus, BusConfig};
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    let Some(url) = redis_url() else { return };
    let config =
        |max_incoming| BusConfig { max_incoming, max_incoming_bytes: 1 << 20, ..default_bus_config(url.clone()) };
    let lagging_config = config(2);
    let sending_config =
        BusConfig { prefix: lagging_config.prefix.clone(), ..config(chatsync::cluster::bus::MAX_INCOMING) };
    let master = chatsync::crypto::MasterKey::generate();
    let (reached_tx, reached) = tokio::sync::oneshot::channel();
    let (release, release_rx) = tokio::sync::oneshot::channel();
    let handler = Arc::new(Lagging {
        received: Default::default(),
        gaps: Default::default(),
        reached: parking_lot::Mutex::new(Some(reached_tx)),
        release: tokio::sync::Mutex::new(Some(release_rx)),
    });
    let lagging = Bus::start(lagging_config, master.derive("bus")).unwrap();
    lagging.set_handler(handler.clone());
    lagging.subscribe("alice").await;
    let sender = Bus::start(sending_config, master.derive("bus")).unwrap();
    for bus in [&lagging, &sender] {
        while !bus.is_healthy() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let gaps_before = handler.gaps.load(SeqCst);

    // The first message holds the subscriber; two more fit in its inbox; the other eight are dropped.
    sender.publish_user("alice", deleted("c0"));
    reached.await.unwrap();
    for i in 1..10 {
        sender.publish_user("alice", deleted(&format!("c{i}")));
    }
    sender.publish_user_in_turn("alice", deleted("c10"), || {}).await;
    while lagging.dropped_incoming() < 8 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!lagging.is_healthy(), "a node that dropped messages stops trusting its caches at once");
    release.send(()).unwrap();
    while handler.gaps.load(SeqCst) == gaps_before || !lagging.is_healthy() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lagging.dropped_incoming(), 8);

    // Still subscribed on the same connection: what comes next arrives, after what was queued.
    sender.publish_user("alice", deleted("c11"));
    while handler.received.lock().len() < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = handler.received.lock().clone();
    assert_eq!(received, vec![deleted("c0"), deleted("c1"), deleted("c2"), deleted("c11")]);
    assert_eq!(handler.gaps.load(SeqCst), gaps_before + 1, "one gap for the run of drops, no reconnection");
}

#[tokio::test]
async fn a_node_s_own_unsubscribe_is_not_taken_for_redis_dropping_a_subscription() {
    use chatsync::cluster::Bus;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    let Some(url) = redis_url() else { return };
    let config = default_bus_config(url);
    let master = chatsync::crypto::MasterKey::generate();
    let (reached, _) = tokio::sync::oneshot::channel();
    let (release, release_rx) = tokio::sync::oneshot::channel();
    release.send(()).unwrap();
    let handler = Arc::new(Lagging {
        received: Default::default(),
        gaps: Default::default(),
        reached: parking_lot::Mutex::new(Some(reached)),
        release: tokio::sync::Mutex::new(Some(release_rx)),
    });
    let node = Bus::start(config.clone(), master.derive("bus")).unwrap();
    node.set_handler(handler.clone());
    let sender = Bus::start(config, master.derive("bus")).unwrap();
    for bus in [&node, &sender] {
        while !bus.is_healthy() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let gaps = handler.gaps.load(SeqCst);
    // Alice's last connection closes and another opens: the confirmation of the unsubscribe arrives as
    // Redis's own would, and is this node's.
    for _ in 0..3 {
        node.subscribe("alice").await;
        node.unsubscribe("alice");
    }
    node.subscribe("alice").await;
    sender.publish_user_in_turn("alice", deleted("c1"), || {}).await;
    while handler.received.lock().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*handler.received.lock(), vec![deleted("c1")]);
    assert!(node.is_healthy());
    assert_eq!(handler.gaps.load(SeqCst), gaps, "no reconnection");
}

#[tokio::test]
async fn a_connection_arriving_while_the_users_subscription_is_on_its_way_waits_for_it() {
    // Alice's first connection on the node starts the subscription to her channel, held after Redis
    // confirmed it, before the node takes it as done. A second connection arriving meanwhile must not be
    // greeted before that either: a broadcast made after its `connected` could be missed.
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(1, &url, |_| {}).await;
    let node = &cluster.nodes[0];
    node.user("alice", false).await;
    let (first, second) = (node.token("alice").await, node.token("alice").await);
    let mut held = node.ctx.pauses.arm(chatsync::pause::BUS_SUBSCRIBED);
    let mut laptop = Box::pin(node.connect(&first, "laptop"));
    tokio::select! {
        _ = &mut laptop => panic!("greeted while its subscription was held"),
        _ = held.reached() => {}
    }
    let mut tablet = Box::pin(node.connect(&second, "tablet"));
    let greeted = tokio::time::timeout(Duration::from_secs(1), async {
        tokio::select! {
            _ = &mut laptop => "the first",
            _ = &mut tablet => "the second",
        }
    })
    .await;
    assert!(greeted.is_err(), "{} connection was greeted while the subscription was on its way", greeted.unwrap());
    held.release();
    let ((mut laptop, _), (mut tablet, _)) = tokio::join!(laptop, tablet);
    set_title(&mut laptop, "c1", "t").await;
    expect_msg!(next_broadcast(&mut tablet).await, ChatTitleUpdated);
}

/// Alice's phone on node 0 and laptop on node 1 (and, with `tablet`, a tablet on node 2), chat c1 titled
/// from the phone, and a title of c1 from the laptop (request `t`) held on node 1 after its commit, before
/// it is merged, published and broadcast.
async fn a_late_title_on_node1(
    cluster: &TestCluster,
    tablet: bool,
) -> (Client, Client, Option<Client>, chatsync::pause::Paused) {
    let mut phone = new_user(&cluster.nodes[0], "alice", "phone").await;
    let mut laptop = another_device(&cluster.nodes[1], "alice", "laptop").await;
    let mut tablet = match tablet {
        true => Some(another_device(&cluster.nodes[2], "alice", "tablet").await),
        false => None,
    };
    set_title(&mut phone, "c1", "doomed").await;
    for device in std::iter::once(&mut laptop).chain(tablet.as_mut()) {
        expect_msg!(next_broadcast(device).await, ChatTitleUpdated);
    }
    let mut write = cluster.nodes[1].ctx.pauses.arm(chatsync::pause::WRITE_COMMITTED);
    laptop.send(&title("c1", "late"), Some("t")).await.unwrap();
    write.reached().await;
    (phone, laptop, tablet, write)
}

#[tokio::test]
async fn a_late_write_result_from_another_node_does_not_bring_back_a_chat_deleted_before_this_node_cached_the_user() {
    // Node 1 commits a title, then holds before merging and publishing it; the chat is deleted on node 0;
    // node 1 does not hear of it yet (its subscriber is held); a device connects on node 2 after the
    // deletion (a fresh cache entry, loaded without the chat). Node 1's late record must not be taken
    // for a new chat there.
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(3, &url, |_| {}).await;
    let (node1, node2) = (&cluster.nodes[1], &cluster.nodes[2]);
    let (mut phone, mut laptop, _, write) = a_late_title_on_node1(&cluster, false).await;
    // Node 1's subscriber is held on the next frame for alice: it hears nothing of the deletion.
    let mut bus = node1.ctx.pauses.arm(chatsync::pause::BUS_FRAME);
    set_title(&mut phone, "c0", "first").await;
    bus.reached().await;
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    while !node2.ctx.keys.is_deleted("c1") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut tablet = another_device(node2, "alice", "tablet").await;
    assert!(!lists_chat(&mut tablet, "c1").await);
    write.release();
    expect_msg!(laptop.recv_reply("t").await.unwrap(), ChatTitleUpdated);
    // Node 1 publishes in order: once node 2 has passed this title, it has handled the late record.
    set_title(&mut laptop, "c2", "after").await;
    loop {
        if let ServerMessage::ChatTitleUpdated(t) = next_broadcast(&mut tablet).await.message {
            if t.chat_id.as_str() == "c2" {
                break;
            }
        }
    }
    bus.release();
    assert!(!lists_chat(&mut tablet, "c1").await, "node 2 does not list the deleted chat");
}

#[tokio::test]
async fn a_change_published_by_a_node_that_has_not_heard_of_the_deletion_reaches_no_device_that_had_chat_deleted() {
    // Node 1 commits a title of c1 and holds before broadcasting it; c1 is deleted on node 0; node 1 does
    // not hear of it (its subscriber is held), so it publishes the title. The devices on nodes 0 and 2
    // had `chat_deleted`: their nodes, which know of the deletion, must not give them the title.
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(3, &url, |_| {}).await;
    let (node1, node2) = (&cluster.nodes[1], &cluster.nodes[2]);
    let (mut phone, mut laptop, tablet, write) = a_late_title_on_node1(&cluster, true).await;
    let mut tablet = tablet.expect("a tablet");
    let mut bus = node1.ctx.pauses.arm(chatsync::pause::BUS_FRAME);
    set_title(&mut phone, "c0", "first").await;
    expect_msg!(next_broadcast(&mut tablet).await, ChatTitleUpdated);
    bus.reached().await;
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    expect_msg!(next_broadcast(&mut tablet).await, ChatDeleted);
    while !node2.ctx.keys.is_deleted("c1") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    write.release();
    expect_msg!(laptop.recv_reply("t").await.unwrap(), ChatTitleUpdated);
    assert!(!node1.ctx.keys.is_deleted("c1"), "node 1 published without knowing");
    // Node 1 publishes in order: this title comes after the late one on every node.
    set_title(&mut laptop, "c2", "after").await;
    for device in [&mut phone, &mut tablet] {
        let next = expect_msg!(next_broadcast(device).await, ChatTitleUpdated);
        assert_eq!(next.chat_id.as_str(), "c2", "the deleted chat's late title reached a device");
    }
    bus.release();
}

#[tokio::test]
async fn a_stream_completed_by_a_node_that_has_not_heard_of_the_deletion_ends_aborted_where_the_chat_is_known_deleted()
{
    // Node 0 stores a stream's message and holds before announcing it; c1 is deleted from the laptop on
    // node 1 (the deletion finds no open stream to end: the completion took it); node 0 does not hear of it
    // (its subscriber is held), so it announces `stream_completed`. Node 1 knows: as on a single node, its
    // device must get `stream_cancelled` (`aborted`) instead. So must the phone on node 0 itself, whose own
    // delivery runs at the frame's place in the bus order, after the deletion.
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut phone = new_user(node0, "alice", "phone").await;
    let mut laptop = another_device(node1, "alice", "laptop").await;
    set_title(&mut phone, "c1", "doomed").await;
    expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated);
    let api = node0.api().await;
    let start = json!({"stream_id": "s1", "message_id": "m1", "sender_name": "assistant"});
    assert_eq!(api.post("/users/alice/chats/c1/streams", start).await.0, 201);
    for device in [&mut phone, &mut laptop] {
        expect_msg!(next_broadcast(device).await, StreamStarted);
    }
    let mut write = node0.ctx.pauses.arm(chatsync::pause::WRITE_COMMITTED);
    let complete = tokio::spawn(async move { api.post("/users/alice/chats/c1/streams/s1/complete", json!({})).await });
    write.reached().await;
    let mut bus = node0.ctx.pauses.arm(chatsync::pause::BUS_FRAME);
    set_title(&mut laptop, "c0", "first").await;
    bus.reached().await;
    expect_msg!(laptop.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    assert!(node1.ctx.keys.is_deleted("c1"));
    write.release();
    let aborted = |end: StreamCancelled| (end.chat_id.to_string(), end.stream_id.to_string(), end.reason);
    let expected = ("c1".to_owned(), "s1".to_owned(), StreamCancelReason::Aborted);
    let end = next_broadcast(&mut laptop).await;
    assert_eq!(aborted(expect_msg!(end, StreamCancelled)), expected, "node 1's device had chat_deleted");
    assert!(!node0.ctx.keys.is_deleted("c1"), "node 0 announced without knowing");
    bus.release();
    let (status, body) = complete.await.unwrap();
    assert_eq!(status, 201, "{body}");
    expect_msg!(next_broadcast(&mut phone).await, ChatTitleUpdated);
    expect_msg!(next_broadcast(&mut phone).await, ChatDeleted);
    let end = next_broadcast(&mut phone).await;
    assert_eq!(aborted(expect_msg!(end, StreamCancelled)), expected, "node 0's device had chat_deleted");
    assert_quiet(&mut phone).await;
    assert_quiet(&mut laptop).await;
}

#[tokio::test]
async fn a_late_write_result_does_not_bring_back_a_chat_whose_deletion_was_lost_in_a_gap() {
    // Node 1 commits a title of the existing chat c1 and holds before merging and publishing it; c1 is
    // deleted on node 0 while node 0 drops what it publishes (the other nodes have a gap, and no keyring
    // but node 0's hears of the deletion); a device connects on node 2 after that (a fresh entry, loaded
    // without c1). Node 1's late record, of a write that did not create c1, must not be taken there for
    // a new chat.
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(3, &url, |_| {}).await;
    let (node0, node2) = (&cluster.nodes[0], &cluster.nodes[2]);
    let (mut phone, mut laptop, _, write) = a_late_title_on_node1(&cluster, false).await;

    let epoch = node2.ctx.keys.epoch();
    let bus = node0.ctx.bus.as_ref().expect("a cluster node");
    bus.drop_publishes(true);
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    bus.drop_publishes(false);
    set_title(&mut phone, "c2", "after").await; // node 0 publishes again: the resync order first
    while node2.ctx.keys.epoch() == epoch {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!node2.ctx.keys.is_deleted("c1"), "node 2 never heard of the deletion");
    let mut tablet = another_device(node2, "alice", "tablet").await;
    assert!(!lists_chat(&mut tablet, "c1").await);
    write.release();
    expect_msg!(laptop.recv_reply("t").await.unwrap(), ChatTitleUpdated);
    // Node 1 publishes in order: once node 2 has passed this title, it has handled the late record.
    set_title(&mut laptop, "c3", "after").await;
    loop {
        if let ServerMessage::ChatTitleUpdated(t) = next_broadcast(&mut tablet).await.message {
            if t.chat_id.as_str() == "c3" {
                break;
            }
        }
    }
    assert!(!lists_chat(&mut tablet, "c1").await, "node 2 does not list the deleted chat");
}

#[tokio::test]
async fn a_write_that_crossed_a_gap_does_not_memoize_the_key_of_a_chat_deleted_unseen_in_it() {
    // Node 1 writes to a chat it resolved from its cached list (the key not yet in its memory) and holds
    // after the commit; the chat is deleted on node 0 while node 0 drops what it publishes (node 1 hears
    // only the resync order that follows: a gap). The write's key must not be memoized when it ends: the
    // chat is gone, and its key must not stay in node 1's memory (crypto-shredding).
    let Some(url) = redis_url() else { return };
    let cluster = TestCluster::start(2, &url, |_| {}).await;
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut phone = new_user(node0, "alice", "phone").await;
    let mut laptop = another_device(node1, "alice", "laptop").await;
    set_title(&mut phone, "c1", "doomed").await;
    expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated);
    assert_eq!(ids(&sync_all(&mut laptop).await.server_chat_order), ["c1"], "node 1 caches the list");
    node1.ctx.keys.forget_all(); // as after an earlier gap: the list is cached, the key is not
    let mut write = node1.ctx.pauses.arm(chatsync::pause::WRITE_COMMITTED);
    laptop.send(&draft("c1", doc("late")), Some("d")).await.unwrap();
    write.reached().await;

    let epoch = node1.ctx.keys.epoch();
    let bus = node0.ctx.bus.as_ref().expect("a cluster node");
    bus.drop_publishes(true);
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    bus.drop_publishes(false);
    // Node 0 publishes in order: once this title reaches the laptop, node 1 has had every resync order.
    set_title(&mut phone, "c2", "after").await;
    expect_msg!(next_broadcast(&mut laptop).await, ChatTitleUpdated);
    assert_ne!(node1.ctx.keys.epoch(), epoch, "node 1 had a gap");
    write.release();
    expect_msg!(laptop.recv_reply("d").await.unwrap(), DraftUpdateConfirmed);
    assert!(!node1.ctx.keys.holds_key("c1"), "the deleted chat's key is not in node 1's memory");
}

/// Counts the gaps a bus declares and the messages it hands over.
#[derive(Default)]
struct Gaps {
    gaps: std::sync::atomic::AtomicUsize,
    messages: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl chatsync::cluster::BusHandler for Gaps {
    async fn on_message(&self, _user: Option<&str>, _message: chatsync::cluster::BusMessage) {
        self.messages.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    async fn on_subscribed(&self, _user: &str) {}
    async fn on_gap(&self) {
        self.gaps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_redis_loading_its_dataset_is_answering_and_the_bus_stays_connected_to_it() {
    // A Redis restarted with persistence answers while it loads its dataset, pub/sub included, but refuses
    // `PING` with `-LOADING` (for seconds, or minutes with a large dataset). That refusal is an answer: a
    // bus that took it for a Redis that does not answer reconnected at once, resubscribed every user,
    // trusted its caches and dropped them again, in a loop with no backoff, for the whole load.
    use chatsync::cluster::Bus;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    let Some(_) = redis_url() else { return };
    let redis = OwnRedis::start_loading(200_000);
    let config = default_bus_config(redis.url());
    let master = chatsync::crypto::MasterKey::generate();
    let handler = Arc::new(Gaps::default());
    let bus = Bus::start(config.clone(), master.derive("bus")).unwrap();
    bus.set_handler(handler.clone());
    // The bus is the only client that sends PING: three health checks refused.
    while redis.rejected_calls("ping") < 3 {
        assert!(redis.loading(), "the dataset was loaded before three health checks: make it larger");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(redis.loading());
    assert!(bus.is_healthy(), "connected and subscribed to a Redis that answers");
    assert_eq!(handler.gaps.load(SeqCst), 1, "one gap, the first connection's: no reconnection");
    // And it carries messages meanwhile: trusting it is right.
    bus.subscribe("alice").await;
    let sender = Bus::start(config, master.derive("bus")).unwrap();
    while !sender.is_healthy() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sender.publish_user_in_turn("alice", deleted("c1"), || {}).await;
    while handler.messages.load(SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(redis.loading(), "delivered while Redis was loading");
    assert_eq!(handler.gaps.load(SeqCst), 1);
}

#[tokio::test]
async fn a_redis_that_takes_the_subscriptions_but_fails_the_health_check_is_never_trusted() {
    // A replica cut off from its master, with `replica-serve-stale-data no`, takes HELLO and SUBSCRIBE but
    // answers PING with `-MASTERDOWN`. The bus trusted such a connection (a gap, its caches) before its
    // first health check, which failed at once; it then reconnected at once (its backoff reset by the
    // subscription): hundreds of reconnections a second, each dropping every cache.
    use chatsync::cluster::Bus;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    let Some(_) = redis_url() else { return };
    let redis = OwnRedis::start();
    redis.cli(&["CONFIG", "SET", "replica-serve-stale-data", "no"]);
    redis.cli(&["REPLICAOF", "127.0.0.1", "1"]); // nothing listens there
    let config = default_bus_config(redis.url());
    let handler = Arc::new(Gaps::default());
    let bus = Bus::start(config, chatsync::crypto::MasterKey::generate().derive("bus")).unwrap();
    bus.set_handler(handler.clone());
    // The bus is the only client that sends PING: three connections' checks refused.
    while redis.rejected_calls("ping") < 3 {
        assert!(!bus.is_healthy(), "trusted a Redis that fails the health check");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!bus.is_healthy());
    assert_eq!(handler.gaps.load(SeqCst), 0, "never taken as up, so never a gap");
    // Once it answers, the bus comes up (after its backoff).
    redis.cli(&["REPLICAOF", "NO", "ONE"]);
    while !bus.is_healthy() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handler.gaps.load(SeqCst), 1);
}
