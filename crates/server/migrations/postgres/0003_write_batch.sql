-- chatsync_write_batch: applies a batch of chat writes (`WriteOp`s, see store/pg_chats.rs) in order, in
-- one statement, so a group commit costs one round trip. Op i is described by element i of every array:
--   kinds[i]       'title' | 'draft' | 'delete_draft' | 'message' | 'delete_chat' | 'user_key'
--   owners[i]      the writer (the user, for 'user_key')
--   chat_ids[i]    the chat (NULL for 'user_key')
--   payloads[i]    title / draft (NULL: clear) / message content / candidate user key
--   create_keys[i] Target::Create: the new chat's wrapped key (NULL: Target::Existing)
--   kek_ids[i]     the master key id of create_keys[i] (or of the candidate user key)
--   max_chats[i], conds[i] (if_version_at_most), nows[i], message_ids[i], client_timestamps[i]
-- One row per op comes back (r_idx = i): the outcome and, where it has one, the chat after the op
-- (r_chat_*) and the message (r_seq …). Semantics are those of SQLite's writer (store/sqlite_chats.rs),
-- made safe against concurrent transactions from other nodes (each statement of a VOLATILE function
-- takes a fresh snapshot under READ COMMITTED):
-- - versions are incremented, and ownership and offline conditions checked, in the writing UPDATE
--   (re-evaluated on the newest row version when it waited for a lock);
-- - a message locks its chat row before looking for its id, so it sees every message committed before;
-- - a creation locks the owner's users row before counting the owner's chats in the INSERT, and looks
--   at the tombstones again after inserting (a deletion that committed while the INSERT waited).
-- Any error aborts the whole statement (nothing of the batch is kept); the caller retries op by op.
CREATE FUNCTION chatsync_write_batch(
    kinds TEXT[], owners TEXT[], chat_ids TEXT[], payloads BYTEA[], create_keys BYTEA[], kek_ids TEXT[],
    max_chats BIGINT[], conds BIGINT[], nows BIGINT[], message_ids TEXT[], client_timestamps TEXT[])
RETURNS TABLE (
    r_idx INT, r_outcome TEXT,
    r_chat_id TEXT, r_title BYTEA, r_draft BYTEA, r_title_v BIGINT, r_messages_v BIGINT, r_draft_v BIGINT,
    r_last_edited_ms BIGINT, r_unread_count BIGINT, r_chat_key BYTEA, r_kek_id TEXT,
    r_seq BIGINT, r_message_id TEXT, r_content BYTEA, r_client_timestamp TEXT, r_created_at BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    ch chats%ROWTYPE;
    msg messages%ROWTYPE;
    cond BIGINT;
BEGIN
    FOR i IN 1 .. coalesce(array_length(kinds, 1), 0) LOOP
        ch := NULL;
        msg := NULL;
        r_outcome := NULL;
        cond := conds[i];
        IF create_keys[i] IS NOT NULL THEN
            -- Creations of one owner queue here (on every node): the count below sees them all.
            PERFORM 1 FROM users u WHERE u.user_id = owners[i] FOR NO KEY UPDATE;
            INSERT INTO chats AS c (chat_id, owner, chat_key, kek_id, last_edited_ms, created_at)
                SELECT chat_ids[i], owners[i], create_keys[i], kek_ids[i], nows[i], nows[i]
                WHERE NOT EXISTS (SELECT 1 FROM chat_tombstones t WHERE t.chat_id = chat_ids[i])
                  AND (SELECT count(*) FROM chats o WHERE o.owner = owners[i]) < max_chats[i]
                ON CONFLICT (chat_id) DO NOTHING
                RETURNING c.* INTO ch;
            IF FOUND THEN
                IF EXISTS (SELECT 1 FROM chat_tombstones t WHERE t.chat_id = chat_ids[i]) THEN
                    DELETE FROM chats c WHERE c.chat_id = chat_ids[i];
                    r_outcome := 'not_found';
                END IF;
                -- A chat created just now has no version an offline change could conflict with.
                cond := NULL;
            ELSIF EXISTS (SELECT 1 FROM chats c WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i]) THEN
                r_outcome := 'raced';
            ELSIF EXISTS (SELECT 1 FROM chats c WHERE c.chat_id = chat_ids[i])
               OR EXISTS (SELECT 1 FROM chat_tombstones t WHERE t.chat_id = chat_ids[i]) THEN
                r_outcome := 'not_found';
            ELSE
                r_outcome := 'chat_limit';
            END IF;
            ch := NULL;
        END IF;

        IF r_outcome IS NULL THEN
            CASE kinds[i]
            WHEN 'title' THEN
                UPDATE chats c SET title = payloads[i], title_v = c.title_v + 1
                    WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i] AND (cond IS NULL OR c.title_v <= cond)
                    RETURNING c.* INTO ch;
                IF FOUND THEN r_outcome := 'applied'; END IF;
            WHEN 'draft' THEN
                UPDATE chats c
                    SET draft = payloads[i], draft_v = c.draft_v + 1, last_edited_ms = greatest(c.last_edited_ms, nows[i])
                    WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i] AND (cond IS NULL OR c.draft_v <= cond)
                    RETURNING c.* INTO ch;
                IF FOUND THEN r_outcome := 'applied'; END IF;
            WHEN 'delete_draft' THEN
                UPDATE chats c SET draft = NULL, draft_v = c.draft_v + 1
                    WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i] AND c.draft IS NOT NULL
                      AND (cond IS NULL OR c.draft_v <= cond)
                    RETURNING c.* INTO ch;
                IF FOUND THEN
                    r_outcome := 'applied';
                ELSE
                    SELECT c.* INTO ch FROM chats c WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i];
                    IF FOUND AND ch.draft IS NULL THEN r_outcome := 'no_draft'; END IF;
                END IF;
            WHEN 'message' THEN
                IF create_keys[i] IS NULL THEN
                    -- The row lock makes the look for the id below see every message committed before.
                    PERFORM 1 FROM chats c WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i] FOR NO KEY UPDATE;
                    IF NOT FOUND THEN r_outcome := 'not_found'; END IF;
                END IF;
                IF r_outcome IS NULL THEN
                    SELECT m.* INTO msg FROM messages m WHERE m.chat_id = chat_ids[i] AND m.message_id = message_ids[i];
                    IF FOUND THEN
                        SELECT c.* INTO ch FROM chats c WHERE c.chat_id = chat_ids[i];
                        r_outcome := 'duplicate';
                    ELSE
                        UPDATE chats c
                            SET messages_v = c.messages_v + 1, last_edited_ms = greatest(c.last_edited_ms, nows[i])
                            WHERE c.chat_id = chat_ids[i]
                            RETURNING c.* INTO ch;
                        INSERT INTO messages AS m (chat_id, seq, message_id, content, client_timestamp, created_at)
                            VALUES (chat_ids[i], ch.messages_v, message_ids[i], payloads[i], client_timestamps[i], nows[i])
                            RETURNING m.* INTO msg;
                        r_outcome := 'message';
                    END IF;
                END IF;
            WHEN 'delete_chat' THEN
                -- Messages go with the row (ON DELETE CASCADE), and so does the wrapped key (a column).
                DELETE FROM chats c WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i];
                IF FOUND THEN
                    INSERT INTO chat_tombstones (chat_id, owner, deleted_at) VALUES (chat_ids[i], owners[i], nows[i]);
                    r_outcome := 'deleted';
                ELSE
                    r_outcome := 'not_found';
                END IF;
            WHEN 'user_key' THEN
                INSERT INTO user_keys (user_id, wrapped, kek_id) VALUES (owners[i], payloads[i], kek_ids[i])
                    ON CONFLICT DO NOTHING;
                -- A fresh snapshot: sees a key another transaction stored meanwhile.
                SELECT k.wrapped, k.kek_id INTO ch.chat_key, ch.kek_id FROM user_keys k WHERE k.user_id = owners[i];
                r_outcome := 'user_key';
            END CASE;
            IF r_outcome IS NULL THEN
                -- A conditional change matched no row: a conflict if the chat is the writer's.
                IF ch.chat_id IS NULL THEN
                    SELECT c.* INTO ch FROM chats c WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i];
                END IF;
                r_outcome := CASE WHEN ch.chat_id IS NULL THEN 'not_found' ELSE 'conflict' END;
            END IF;
        END IF;

        r_idx := i;
        r_chat_id := ch.chat_id;
        r_title := ch.title;
        r_draft := ch.draft;
        r_title_v := ch.title_v;
        r_messages_v := ch.messages_v;
        r_draft_v := ch.draft_v;
        r_last_edited_ms := ch.last_edited_ms;
        r_unread_count := ch.unread_count;
        r_chat_key := ch.chat_key;
        r_kek_id := ch.kek_id;
        r_seq := msg.seq;
        r_message_id := msg.message_id;
        r_content := msg.content;
        r_client_timestamp := msg.client_timestamp;
        r_created_at := msg.created_at;
        RETURN NEXT;
    END LOOP;
END
$$;
