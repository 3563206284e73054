-- Users, sessions and devices (PROTOCOL.md section 2). Only SHA-256(token) is stored.
-- Same schema semantics as migrations/sqlite/0001_identity.sql; times are milliseconds (BIGINT).
CREATE TABLE users (
    user_id     TEXT PRIMARY KEY NOT NULL,
    tfa_enabled BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE sessions (
    session_id  TEXT PRIMARY KEY NOT NULL,
    token_hash  BYTEA NOT NULL UNIQUE,
    user_id     TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    device_hash TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);
CREATE INDEX sessions_revoked_at ON sessions(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX sessions_user ON sessions(user_id);

CREATE TABLE devices (
    user_id     TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    device_hash TEXT NOT NULL,
    first_seen  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_hash)
);
