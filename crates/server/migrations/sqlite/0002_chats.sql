-- Chats, messages, tombstones and wrapped data keys (PROTOCOL.md section 5). Titles, drafts and message
-- contents are AES-256-GCM ciphertexts; data keys are stored only wrapped by the master key.
CREATE TABLE chats (
    chat_id        TEXT PRIMARY KEY NOT NULL,
    owner          TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    chat_key       BLOB NOT NULL,           -- the chat's data key, wrapped by the master key
    kek_id         TEXT NOT NULL,           -- which master key wrapped it
    title          BLOB,                    -- NULL: never set
    title_v        INTEGER NOT NULL DEFAULT 0,
    messages_v     INTEGER NOT NULL DEFAULT 0,
    draft          BLOB,                    -- NULL: no draft (encrypted with the owner's data key)
    draft_v        INTEGER NOT NULL DEFAULT 0,
    last_edited_ms INTEGER NOT NULL,
    unread_count   INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL
) STRICT;
CREATE INDEX chats_by_owner ON chats(owner, last_edited_ms DESC, chat_id);

CREATE TABLE chat_tombstones (
    chat_id    TEXT PRIMARY KEY NOT NULL,
    owner      TEXT NOT NULL,
    deleted_at INTEGER NOT NULL
) STRICT;

CREATE TABLE messages (
    chat_id          TEXT NOT NULL REFERENCES chats(chat_id) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,
    message_id       TEXT NOT NULL,
    content          BLOB NOT NULL,
    client_timestamp TEXT,                  -- the client's timestamp as sent (JSON), or NULL
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (chat_id, seq)
) STRICT, WITHOUT ROWID;
CREATE UNIQUE INDEX messages_by_id ON messages(chat_id, message_id);

CREATE TABLE user_keys (
    user_id TEXT PRIMARY KEY NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    wrapped BLOB NOT NULL,
    kek_id  TEXT NOT NULL
) STRICT;

CREATE TABLE meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) STRICT;
