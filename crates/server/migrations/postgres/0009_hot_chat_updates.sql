-- Most writes change a chat row in place: a draft, a title, a message's counters, and with them
-- `last_edited_ms`. Because `chats_by_owner` indexed `last_edited_ms`, none of those updates could be HOT
-- (heap-only: the new row version on the same page, no new index entries): each one added an entry to
-- both indexes, and the table and its indexes bloated until vacuum caught up (in the three-node
-- benchmark, 10% of chat updates were HOT; in a micro benchmark the indexes grew 120-fold).
--
-- The owner's index now holds the owner only: a user's chat list is read whole (`chats(owner)`) and
-- sorted by `last_edited_ms` after the lookup, which is cheap at the per-user chat limit, and the count
-- of a user's chats (the limit's check on a creation) uses it as before. `fillfactor` leaves a fifth of
-- each page free so that the new version of a row fits beside the old one (for pages written from now
-- on: an existing table gets it as its rows are rewritten).
--
-- On an existing deployment: the new index is built first, under a lock that lets reads of `chats` go on
-- while writes wait (seconds per million chats); the old index is dropped only then, for a moment.
-- (Not CONCURRENTLY: sqlx runs migrations under an advisory lock that other starting nodes wait for
-- inside a statement, and a concurrent index build waits for those statements: a deadlock.)
CREATE INDEX chats_owner ON chats(owner);
DROP INDEX chats_by_owner;
ALTER TABLE chats SET (fillfactor = 80);
