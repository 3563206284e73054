-- Messages from other senders and unread counts (SERVER_API.md section 3, PROTOCOL.md `mark_read`).
-- `sender` is "user" for the owner's devices, the application backend's `sender_name` otherwise;
-- `read_seq` is the owner's read marker; `unread_count` (already a column) counts the messages of other
-- senders above it and is kept in the writing statements.
ALTER TABLE messages ADD COLUMN sender TEXT NOT NULL DEFAULT 'user';
ALTER TABLE chats ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0;
