-- Group-commit batches from several nodes (and several writers) must not deadlock each other. A batch
-- locks rows of many owners (a `users` row when it creates a chat, `chats` rows when it writes one) in the
-- order of its ops, so two batches holding what the other wants wait until PostgreSQL's deadlock check
-- (deadlock_timeout, 1 s by default) aborts one: at a cluster's cold start, when every user's first writes
-- create chats on three nodes at once, that was a stall of 1-3 s (found in the three-node benchmark).
--
-- chatsync_write_batch_locked takes a transaction-scoped advisory lock per distinct owner of the batch,
-- in one global order (by hash) and before any row lock; the rows a batch locks belong to its owners, so
-- batches that share an owner run one after the other. (Two owners whose 32-bit hashes collide only share
-- a lock. Two owners creating the same chat id at once still meet on the unique index, which PostgreSQL's
-- deadlock check resolves as before.) The first key, 0x63730001, keeps these
-- locks apart from any other advisory locks of the database.
CREATE FUNCTION chatsync_write_batch_locked(
    kinds TEXT[], owners TEXT[], chat_ids TEXT[], payloads BYTEA[], create_keys BYTEA[], kek_ids TEXT[],
    max_chats BIGINT[], conds BIGINT[], nows BIGINT[], message_ids TEXT[], client_timestamps TEXT[],
    senders TEXT[], created_ats BIGINT[])
RETURNS TABLE (
    r_idx INT, r_outcome TEXT,
    r_chat_id TEXT, r_title BYTEA, r_draft BYTEA, r_title_v BIGINT, r_messages_v BIGINT, r_draft_v BIGINT,
    r_last_edited_ms BIGINT, r_unread_count BIGINT, r_chat_key BYTEA, r_kek_id TEXT,
    r_seq BIGINT, r_message_id TEXT, r_content BYTEA, r_client_timestamp TEXT, r_created_at BIGINT,
    r_read_seq BIGINT, r_sender TEXT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    h INT;
BEGIN
    FOR h IN SELECT DISTINCT hashtext(o) FROM unnest(owners) AS o ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1668481025, h);
    END LOOP;
    RETURN QUERY SELECT * FROM chatsync_write_batch(kinds, owners, chat_ids, payloads, create_keys, kek_ids,
        max_chats, conds, nows, message_ids, client_timestamps, senders, created_ats);
END $$;
