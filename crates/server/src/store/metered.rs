//! [`MeteredChatStore`]: any [`ChatStore`], with the latency of every call recorded as
//! `chatsync_store_seconds{op}` (see `metrics.rs`). Backend-independent, so every backend is measured
//! the same way.

use super::chats::{ChatLookup, ChatRecord, ChatStore, MessageRecord, WrappedKey, WriteOp, WriteResult};
use super::{StoreError, WriterFaults};
use async_trait::async_trait;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// A [`ChatStore`] that records call latencies.
pub struct MeteredChatStore(pub Arc<dyn ChatStore>);

async fn timed<T>(op: &'static str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = call.await;
    metrics::histogram!(crate::metrics::STORE_SECONDS, "op" => op).record(started.elapsed().as_secs_f64());
    out
}

fn write_name(op: &WriteOp) -> &'static str {
    match op {
        WriteOp::Title { .. } => "write_title",
        WriteOp::Draft { .. } => "write_draft",
        WriteOp::DeleteDraft { .. } => "write_delete_draft",
        WriteOp::Message { .. } => "write_message",
        WriteOp::MarkRead { .. } => "write_mark_read",
        WriteOp::DeleteChat { .. } => "write_delete_chat",
        WriteOp::UserKey { .. } => "write_user_key",
    }
}

#[async_trait]
impl ChatStore for MeteredChatStore {
    async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        timed(write_name(&op), self.0.write(op)).await
    }

    async fn chat_lookup(&self, chat_id: &str) -> Result<ChatLookup, StoreError> {
        timed("chat_lookup", self.0.chat_lookup(chat_id)).await
    }

    async fn user_key(&self, user_id: &str) -> Result<Option<WrappedKey>, StoreError> {
        timed("user_key", self.0.user_key(user_id)).await
    }

    async fn chats(&self, owner: &str) -> Result<Vec<ChatRecord>, StoreError> {
        timed("chats", self.0.chats(owner)).await
    }

    async fn chat(&self, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
        timed("chat", self.0.chat(owner, chat_id)).await
    }

    async fn messages_after(
        &self,
        owner: &str,
        chat_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>, bool)>, StoreError> {
        timed("messages_after", self.0.messages_after(owner, chat_id, after_seq, limit)).await
    }

    async fn latest_messages(
        &self,
        owner: &str,
        chat_id: &str,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError> {
        timed("latest_messages", self.0.latest_messages(owner, chat_id, limit)).await
    }

    async fn wrapped_keys(&self) -> Result<Vec<(String, WrappedKey)>, StoreError> {
        self.0.wrapped_keys().await
    }

    async fn rewrap_keys(
        &self,
        keys: &[(String, WrappedKey)],
        from_check: &[u8],
        kek_id: &str,
        check: &[u8],
    ) -> Result<(), StoreError> {
        self.0.rewrap_keys(keys, from_check, kek_id, check).await
    }

    async fn create_user_keys(&self, keys: &[(String, WrappedKey)], check: &[u8]) -> Result<bool, StoreError> {
        self.0.create_user_keys(keys, check).await
    }

    async fn key_check(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.key_check().await
    }

    async fn init_key_check(&self, check: &[u8]) -> Result<(), StoreError> {
        self.0.init_key_check(check).await
    }

    async fn failed(&self) -> String {
        self.0.failed().await
    }

    fn batches_begun(&self) -> Option<u64> {
        self.0.batches_begun()
    }

    fn writer_faults(&self) -> Option<Arc<WriterFaults>> {
        self.0.writer_faults()
    }

    fn set_write_timeout(&self, timeout: std::time::Duration) {
        self.0.set_write_timeout(timeout)
    }

    fn set_commit_window(&self, window: std::time::Duration) {
        self.0.set_commit_window(window)
    }
}
