-- API keys of application backends (SERVER_API.md section 1). Only SHA-256(key) is stored.
CREATE TABLE api_keys (
    key_id       TEXT PRIMARY KEY NOT NULL,
    key_hash     BYTEA NOT NULL UNIQUE,
    name         TEXT,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
