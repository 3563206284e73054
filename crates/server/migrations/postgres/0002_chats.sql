-- Chats, messages, tombstones and wrapped data keys (PROTOCOL.md section 5). Titles, drafts and message
-- contents are AES-256-GCM ciphertexts (BYTEA); data keys are stored only wrapped by the master key.
-- Same schema semantics as migrations/sqlite/0002_chats.sql; versions and times are BIGINT.
CREATE TABLE chats (
    chat_id        TEXT PRIMARY KEY NOT NULL,
    owner          TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    chat_key       BYTEA NOT NULL,          -- the chat's data key, wrapped by the master key
    kek_id         TEXT NOT NULL,           -- which master key wrapped it
    title          BYTEA,                   -- NULL: never set
    title_v        BIGINT NOT NULL DEFAULT 0,
    messages_v     BIGINT NOT NULL DEFAULT 0,
    draft          BYTEA,                   -- NULL: no draft (encrypted with the owner's data key)
    draft_v        BIGINT NOT NULL DEFAULT 0,
    last_edited_ms BIGINT NOT NULL,
    unread_count   BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL
);
CREATE INDEX chats_by_owner ON chats(owner, last_edited_ms DESC, chat_id);

CREATE TABLE chat_tombstones (
    chat_id    TEXT PRIMARY KEY NOT NULL,
    owner      TEXT NOT NULL,
    deleted_at BIGINT NOT NULL
);

CREATE TABLE messages (
    chat_id          TEXT NOT NULL REFERENCES chats(chat_id) ON DELETE CASCADE,
    seq              BIGINT NOT NULL,
    message_id       TEXT NOT NULL,
    content          BYTEA NOT NULL,
    client_timestamp TEXT,                  -- the client's timestamp as sent (JSON), or NULL
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (chat_id, seq)
);
CREATE UNIQUE INDEX messages_by_id ON messages(chat_id, message_id);

CREATE TABLE user_keys (
    user_id TEXT PRIMARY KEY NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    wrapped BYTEA NOT NULL,
    kek_id  TEXT NOT NULL
);

CREATE TABLE meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value BYTEA NOT NULL
);
