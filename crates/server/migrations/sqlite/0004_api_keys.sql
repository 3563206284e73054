-- API keys of application backends (SERVER_API.md section 1). Only SHA-256(key) is stored.
CREATE TABLE api_keys (
    key_id       TEXT PRIMARY KEY NOT NULL,
    key_hash     BLOB NOT NULL UNIQUE,
    name         TEXT,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
) STRICT;
