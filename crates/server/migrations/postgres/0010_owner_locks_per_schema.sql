-- The owner locks of migration 0008 are advisory locks, which PostgreSQL keeps per database, not per
-- schema: two deployments (or test runs) in two schemas of one database took the same lock for the same
-- owner id, so one's batch waited for the other's commit though they share no row. The lock's key now
-- hashes the schema with the owner (a collision of the 32-bit hashes still only shares a lock). Every
-- node of one deployment runs with the same search_path, so they still agree on every owner's lock, and
-- the function is replaced for all of them at once, so no two nodes ever lock by different rules.
CREATE OR REPLACE FUNCTION chatsync_write_batch_locked(
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
    s TEXT := coalesce(current_schema(), '') || chr(31);
BEGIN
    FOR h IN SELECT DISTINCT hashtext(s || o) FROM unnest(owners) AS o ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1668481025, h);
    END LOOP;
    RETURN QUERY SELECT * FROM chatsync_write_batch(kinds, owners, chat_ids, payloads, create_keys, kek_ids,
        max_chats, conds, nows, message_ids, client_timestamps, senders, created_ats);
END $$;
