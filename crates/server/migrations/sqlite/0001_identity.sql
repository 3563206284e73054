-- Users, sessions and devices (PROTOCOL.md section 2). Only SHA-256(token) is stored.
CREATE TABLE users (
    user_id     TEXT PRIMARY KEY NOT NULL,
    tfa_enabled INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE sessions (
    session_id  TEXT PRIMARY KEY NOT NULL,
    token_hash  BLOB NOT NULL UNIQUE,
    user_id     TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    device_hash TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
) STRICT;
CREATE INDEX sessions_revoked_at ON sessions(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX sessions_user ON sessions(user_id);

CREATE TABLE devices (
    user_id     TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    device_hash TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_hash)
) STRICT;
