//! Cluster mode: several nodes behind a load balancer share PostgreSQL (the truth) and a Redis delivery
//! bus. This module is the bus: one Redis connection per node carries
//! * the frames of every broadcast, on the channel of the user (`<prefix>u:<user_id>`), to the nodes where
//!   that user has connections (each node subscribes to the channels of its connected users only);
//! * what each write did to the cache (the chat record, a deletion, a new message), on the same channel,
//!   so that every node's cache stays true (see `cache/coherent.rs`);
//! * cluster-wide orders (session revocations) on `<prefix>control`.
//!
//! Every payload is encrypted with a key derived from the master key and bound to its channel, so
//! neither titles, drafts nor messages cross Redis in plaintext, and Redis stores nothing (pub/sub only).
//!
//! The bus never makes a device's request wait: publishing queues to one task that pipelines in order
//! (the events of the application backend wait for their place in the bus order before the API answers,
//! see `Bus::publish_user_in_turn`); when Redis is down (disconnected, or not answering a PING within
//! 3 s; or it dropped a subscription of the node by itself, as Redis Cluster does when a shard channel's slot
//! leaves the server), each node keeps serving its own connections, the bus reconnects with backoff, resubscribes,
//! and tells its handler about the gap ([`BusHandler::on_gap`]) so that nothing cached before or during
//! it is served afterwards. A node whose subscriber falls behind what Redis sends it drops messages past a
//! bound and declares a gap the same way, without reconnecting.

pub mod bus;
pub mod node;

pub use bus::{Bus, BusConfig, BusHandler, BusMessage};
