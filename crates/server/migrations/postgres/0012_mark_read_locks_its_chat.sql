-- chatsync_write_batch as in 0006_senders_read.sql, but for one change: 'mark_read' locks its chat row
-- (FOR NO KEY UPDATE, as 'message' does) in a statement before the UPDATE that moves the marker and
-- recounts `unread_count`. Under READ COMMITTED an UPDATE that waits for a row lock re-checks its WHERE on
-- the newest row version, but a subquery in its SET still reads the snapshot the statement took before the
-- wait: a message committed meanwhile counted in `messages_v` (the new marker could pass it) and not in
-- the recount, so it was missing from `unread_count` until the next message or marker. The owner locks of
-- 0008 keep this node's batches of one owner apart; a transaction without them (a node of a version before
-- 0008 during a rolling upgrade, an operator's statement) is what the row lock is for. Same signature and
-- results: every node calls the new body at once.
CREATE OR REPLACE FUNCTION chatsync_write_batch(
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
                            SET messages_v = c.messages_v + 1, last_edited_ms = greatest(c.last_edited_ms, nows[i]),
                                unread_count = c.unread_count + CASE WHEN senders[i] <> 'user' THEN 1 ELSE 0 END
                            WHERE c.chat_id = chat_ids[i]
                            RETURNING c.* INTO ch;
                        INSERT INTO messages AS m
                                (chat_id, seq, message_id, content, client_timestamp, created_at, sender)
                            VALUES (chat_ids[i], ch.messages_v, message_ids[i], payloads[i], client_timestamps[i],
                                    created_ats[i], senders[i])
                            RETURNING m.* INTO msg;
                        r_outcome := 'message';
                    END IF;
                END IF;
            WHEN 'mark_read' THEN
                -- The row lock first: the recount below then runs on a snapshot taken after every message
                -- committed before it (a change the UPDATE waited for is re-checked on the new row, but its
                -- subquery would still read the snapshot taken before the wait).
                PERFORM 1 FROM chats c WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i] FOR NO KEY UPDATE;
                UPDATE chats c
                    SET read_seq = least(cond, c.messages_v),
                        unread_count = (SELECT count(*) FROM messages m
                            WHERE m.chat_id = c.chat_id AND m.seq > least(cond, c.messages_v) AND m.sender <> 'user')
                    WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i] AND least(cond, c.messages_v) > c.read_seq
                    RETURNING c.* INTO ch;
                IF FOUND THEN
                    r_outcome := 'applied';
                ELSE
                    SELECT c.* INTO ch FROM chats c WHERE c.chat_id = chat_ids[i] AND c.owner = owners[i];
                    r_outcome := CASE WHEN FOUND THEN 'unchanged' ELSE 'not_found' END;
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
        r_read_seq := ch.read_seq;
        r_sender := msg.sender;
        RETURN NEXT;
    END LOOP;
END
$$;
