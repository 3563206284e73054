// @ts-check
/**
 * @file The SDK against the real server (`chatsync serve` on port 0, tokens from `chatsync sessions
 * issue`): request/reply, two devices seeing each other's titles, drafts and messages, server error
 * codes, refused and revoked credentials, and the offline queue across a lost connection (flushed as
 * `sync_offline_changes`, then `initial_sync_request`, then the queued messages; a conflicting edit
 * gives way to the other device's), and a user with more chats than one sync request can name. Needs a WebSocket in Node: run with `--experimental-websocket`
 * on Node 20 (Node 22 has it built in).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { ChatSyncClient, ChatSyncError, draftFromText, draftText } from '../src/index.js';
import { startServer, binary } from './server.js';
import { until } from './fake-socket.js';

if (typeof globalThis.WebSocket !== 'function') {
  throw new Error('no global WebSocket: run node with --experimental-websocket (Node 20) or use Node 22+');
}

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;

before(async () => {
  server = await startServer();
});

after(async () => {
  await server?.stop();
});

/** @type {ChatSyncClient[]} */
const clients = [];

/**
 * A client of `user` on `device` (a token bound to that device).
 * @param {string} user
 * @param {string} device
 * @param {Record<string, unknown>} [extra]
 */
function device(user, device, extra = {}) {
  const c = new ChatSyncClient({
    url: server.url,
    token: server.token(user, device),
    deviceId: device,
    backoff: { initialMs: 5, maxMs: 50 },
    keepaliveMs: 0,
    ...extra,
  });
  clients.push(c);
  return c;
}

after(() => {
  for (const c of clients) c.close();
});

test('connects, greets, and answers requests by request_id', { timeout: 30_000 }, async () => {
  const c = device('ada', 'laptop');
  const hello = await c.connect();
  assert.equal(hello.user_id, 'ada');
  assert.equal(hello.protocol, 'chatsync.v1');
  assert.equal(typeof hello.limits.max_frame_bytes, 'number');
  assert.equal(c.status, 'online');
  const replies = await Promise.all([c.ping(), c.request('request_cache_status'), c.ping()]);
  assert.deepEqual(replies.map((r) => r.type), ['pong', 'cache_status_response', 'pong']);
  c.close();
  assert.equal(c.status, 'closed');
});

test('two devices see each other\'s titles, drafts and messages', { timeout: 30_000 }, async () => {
  const laptop = device('bob', 'laptop');
  const phone = device('bob', 'phone');
  await laptop.connect();
  await phone.connect();

  const t = await laptop.updateTitle('trip', 'Trip to Lisbon');
  assert.equal(t.queued, false);
  await until(() => phone.chat('trip').title === 'Trip to Lisbon');
  assert.equal(phone.chat('trip').versions.title_v, 1);

  await laptop.updateDraft('trip', draftFromText('pack sunscreen'));
  await until(() => draftText(phone.chat('trip').draft_json) === 'pack sunscreen');
  assert.equal(laptop.chat('trip').versions.draft_v, 1, 'the sender learns its draft_v');

  const added = phone.waitFor('chat_message_added', (p) => p.chat_id === 'trip');
  const sent = await laptop.sendMessage('trip', 'Booked the flights', { messageId: 'm-1' });
  assert.equal(sent.queued, false);
  assert.equal((await added).message.content, 'Booked the flights');
  assert.equal((await added).message.sender_name, 'user');
  assert.deepEqual(phone.chat('trip').messages.map((m) => [m.message_id, m.seq]), [['m-1', 1]]);
  assert.deepEqual(laptop.chat('trip').messages.map((m) => [m.message_id, m.seq, m.pending]), [['m-1', 1, false]]);

  // The same message id again is stored once.
  const again = await laptop.sendMessage('trip', 'Booked the flights', { messageId: 'm-1' });
  assert.equal(/** @type {any} */ (again).reply.payload.duplicate, true);
  assert.equal(laptop.chat('trip').messages.length, 1);

  await laptop.deleteDraft('trip');
  await until(() => phone.chat('trip').draft_json === null);

  // A third device syncs everything, most recent chat first, and loads the messages.
  await laptop.updateTitle('older', 'Older chat');
  await laptop.sendMessage('trip', 'newest');
  const tablet = device('bob', 'tablet');
  await tablet.connect();
  assert.deepEqual(tablet.chatList().map((c) => c.chat_id), ['trip', 'older']);
  assert.equal(tablet.chat('older').title, 'Older chat');
  const messages = await tablet.loadMessages('trip');
  assert.deepEqual(messages.map((m) => m.content), ['Booked the flights', 'newest']);

  await laptop.deleteChat('older');
  await until(() => !phone.chats.has('older'));
  for (const c of [laptop, phone, tablet]) c.close();
});

test('the server\'s error codes reject the request; the connection stays', { timeout: 30_000 }, async () => {
  const c = device('cyd', 'laptop');
  await c.connect();
  await assert.rejects(c.updateTitle('c1', 'x'.repeat(300)), (/** @type {any} */ e) => e instanceof ChatSyncError && e.code === 'limit_exceeded');
  assert.equal(c.chat('c1').title, '', 'reverted');
  await assert.rejects(c.updateTitle('bad id!', 't'), (/** @type {any} */ e) => e.code === 'invalid_payload');
  await assert.rejects(c.request('no_such_type'), (/** @type {any} */ e) => e.code === 'unknown_type');
  // Another user's chat is not_found.
  const other = device('dee', 'laptop');
  await other.connect();
  await other.updateTitle('dees-chat', 'mine');
  await assert.rejects(c.updateTitle('dees-chat', 'taken'), (/** @type {any} */ e) => e.code === 'not_found');
  assert.equal((await c.ping()).type, 'pong');
  c.close();
  other.close();
});

test('a refused token closes for good; a revoked session too', { timeout: 30_000 }, async () => {
  const bad = new ChatSyncClient({ url: server.url, token: 'cs_not_a_token', deviceId: 'x', keepaliveMs: 0 });
  await assert.rejects(bad.connect(), (/** @type {any} */ e) => e.code === 'closed' && e.details.reason === 'Invalid session');
  assert.equal(bad.status, 'closed');

  const invalidDevice = new ChatSyncClient({ url: server.url, token: server.token('eve', 'laptop'), deviceId: 'x'.repeat(129), keepaliveMs: 0 });
  await assert.rejects(invalidDevice.connect(), (/** @type {any} */ e) => e.details.reason === 'Invalid device id');

  const token = server.token('eve', 'laptop');
  const c = new ChatSyncClient({ url: server.url, token, deviceId: 'laptop', keepaliveMs: 0, backoff: { initialMs: 5, maxMs: 50 } });
  clients.push(c);
  await c.connect();
  const closed = c.waitFor('closed');
  execFileSync(binary(), ['--data-dir', server.dir, 'sessions', 'revoke', token], { stdio: 'ignore' });
  assert.deepEqual(await closed, { code: 1008, reason: 'Session revoked' });
  assert.equal(c.status, 'closed');
});

test('messages from the backend count as unread until a device marks them read, on every device', { timeout: 30_000 }, async () => {
  const laptop = device('gil', 'laptop');
  const phone = device('gil', 'phone');
  await laptop.connect();
  await phone.connect();
  const posted = await server.postMessage('gil', 'news', { message_id: 'n1', sender_name: 'assistant', content: 'Your report is ready' });
  assert.equal(posted.status, 201, JSON.stringify(posted.body));
  await server.postMessage('gil', 'news', { message_id: 'n2', sender_name: 'assistant', content: { text: 'and a summary' } });
  for (const c of [laptop, phone]) {
    await until(() => c.chat('news').messages.length === 2);
    assert.deepEqual(c.chat('news').messages.map((m) => [m.seq, m.sender_name]), [[1, 'assistant'], [2, 'assistant']]);
    assert.equal(c.chat('news').unread_count, 2);
  }
  // A device that connects now gets the server's count.
  const tablet = device('gil', 'tablet');
  await tablet.connect();
  assert.equal(tablet.chat('news').unread_count, 2);
  assert.equal(tablet.chatList()[0].chat_id, 'news');

  const read = await laptop.markRead('news', 1);
  assert.deepEqual(read.payload, { chat_id: 'news', read_seq: 1, unread_count: 1 });
  await until(() => phone.chat('news').unread_count === 1 && tablet.chat('news').unread_count === 1);
  await phone.markRead('news');
  await until(() => laptop.chat('news').unread_count === 0 && tablet.chat('news').unread_count === 0);
  assert.equal(laptop.chat('news').read_seq, 2);
  // The user's own messages never count as unread.
  await laptop.sendMessage('news', 'thanks');
  await until(() => phone.chat('news').messages.length === 3);
  assert.equal(phone.chat('news').unread_count, 0);
  for (const c of [laptop, phone, tablet]) c.close();
});

test('streamed replies are assembled on every device, joined mid-stream, stored on completion, cancelled from a device', { timeout: 30_000 }, async (t) => {
  const stream = (/** @type {string} */ chat, /** @type {string} */ rest = '') => `/users/ivy/chats/${chat}/streams${rest}`;
  const laptop = device('ivy', 'laptop');
  const phone = device('ivy', 'phone');
  await laptop.connect();
  await phone.connect();
  const started = await server.api('POST', stream('ask'), { stream_id: 's1', message_id: 'm-s1', sender_name: 'assistant', meta: { model: 'demo' } });
  if (started.status === 404 && started.body?.error?.message === 'No such endpoint.') {
    // A server without the streams API (SERVER_API.md §4): the fake-socket unit tests cover the SDK side.
    t.skip('this server has no streams API');
    return;
  }
  assert.equal(started.status, 201, JSON.stringify(started.body));
  const chunk = (/** @type {string} */ id, /** @type {number} */ seq, /** @type {string} */ delta) =>
    server.api('POST', stream('ask', `/${id}/chunks`), { seq, delta });
  assert.equal((await chunk('s1', 1, 'Hel')).status, 202);
  assert.equal((await chunk('s1', 2, 'lo')).status, 202);
  for (const c of [laptop, phone]) await until(() => c.streams.get('ask', 's1')?.text === 'Hello');
  assert.deepEqual(phone.streams.get('ask', 's1')?.meta, { model: 'demo' });

  // A device that connects now joins mid-stream (active_streams) and continues with the next chunk.
  const tablet = device('ivy', 'tablet');
  await tablet.connect();
  assert.equal(tablet.streams.get('ask', 's1')?.text, 'Hello');
  assert.equal((await chunk('s1', 3, ', world')).status, 202);
  for (const c of [laptop, phone, tablet]) await until(() => c.streams.get('ask', 's1')?.text === 'Hello, world');

  // A device cancels a stream: every device sees it end, and the backend's next chunk is refused.
  await server.api('POST', stream('ask'), { stream_id: 's2', message_id: 'm-s2', sender_name: 'assistant' });
  await chunk('s2', 1, 'Let me think');
  await until(() => phone.streams.get('ask', 's2')?.text === 'Let me think');
  /** @type {any[]} */
  const ended = [];
  laptop.on('stream', (/** @type {any} */ s) => s.stream_id === 's2' && s.state !== 'open' && ended.push(s));
  const cancelled = await phone.cancelStream('ask', 's2');
  assert.equal(cancelled.payload.reason, 'cancelled_by_user');
  await until(() => ended.length === 1);
  assert.equal(ended[0].state, 'cancelled');
  assert.equal(ended[0].text, 'Let me think');
  assert.equal((await chunk('s2', 2, 'more')).status, 409);
  await assert.rejects(phone.cancelStream('ask', 's2'), (/** @type {any} */ e) => e.code === 'not_found');

  // Completion stores the message; every device fetches it and the stream is gone.
  const done = await server.api('POST', stream('ask', '/s1/complete'), {});
  if (done.status === 404 && done.body?.error?.message === 'No such endpoint.') {
    for (const c of [laptop, phone, tablet]) c.close();
    t.skip('this server has no …/streams/{id}/complete yet');
    return;
  }
  assert.equal(done.status, 201, JSON.stringify(done.body));
  for (const c of [laptop, phone, tablet]) {
    await until(() => c.chat('ask').messages.some((m) => m.message_id === 'm-s1'));
    const m = c.chat('ask').messages.find((x) => x.message_id === 'm-s1');
    assert.deepEqual([m?.content, m?.sender_name, m?.seq], ['Hello, world', 'assistant', 1]);
    // Only stream_completed is broadcast (SERVER_API.md §4); the SDK fetched the message: the stream is gone.
    await until(() => c.streams.open('ask').length === 0);
  }

  for (const c of [laptop, phone, tablet]) c.close();
});

test('offline edits are queued and sent on reconnect as sync_offline_changes, then initial_sync_request', { timeout: 30_000 }, async () => {
  let down = false;
  /** A WebSocket whose "network" can be cut. */
  class Cuttable extends WebSocket {
    /** @param {string} url */
    constructor(url) {
      if (down) throw new Error('network down');
      super(url);
    }
  }
  const laptop = device('fay', 'laptop', { WebSocket: Cuttable });
  const phone = device('fay', 'phone');
  await laptop.connect();
  await phone.connect();
  await laptop.updateTitle('c1', 'Before');
  await laptop.updateTitle('c2', 'Shared');
  await until(() => phone.chat('c2').title === 'Shared');

  down = true;
  laptop.dropConnection();
  await until(() => laptop.status === 'offline');
  assert.deepEqual(await laptop.updateTitle('c1', 'Edited offline'), { queued: true });
  await laptop.updateDraft('c1', draftFromText('offline draft'));
  await laptop.updateTitle('c2', 'Laptop title (loses)');
  await laptop.sendMessage('c1', 'written on the train', { messageId: 'm-train' });
  assert.equal(laptop.queue.size, 4);
  // Meanwhile the phone changes c2's title: the laptop's offline edit of it must lose.
  await phone.updateTitle('c2', 'Phone title (wins)');

  /** @type {string[]} */
  const sent = [];
  laptop.on('sent', (/** @type {any} */ f) => sent.push(f.type));
  const flushed = laptop.waitFor('offline_flushed');
  down = false;
  laptop.reconnect();
  await laptop.waitFor('status', (s) => s === 'online');
  assert.deepEqual(sent.slice(0, 3), ['sync_offline_changes', 'initial_sync_request', 'chat_message_added']);
  const result = await flushed;
  assert.equal(result.processed, 2);
  assert.equal(result.conflicts, 1);
  assert.deepEqual(result.results.map((/** @type {any} */ r) => [r.chat_id, r.type, r.status]), [
    ['c1', 'title', 'applied'],
    ['c1', 'draft', 'applied'],
    ['c2', 'title', 'conflict'],
  ]);
  assert.equal(laptop.queue.size, 0);
  assert.equal(laptop.chat('c2').title, 'Phone title (wins)', 'the server value replaced the losing edit');
  assert.equal(laptop.chat('c1').title, 'Edited offline');

  await until(() => phone.chat('c1').title === 'Edited offline');
  await until(() => draftText(phone.chat('c1').draft_json) === 'offline draft');
  await until(() => phone.chat('c1').messages.some((m) => m.message_id === 'm-train'));
  assert.equal(laptop.chat('c1').messages.find((m) => m.message_id === 'm-train')?.pending, false);
  laptop.close();
  phone.close();
});

test('a user with more chats than one sync request can name syncs: the chats left out come in full, a deleted one is dropped', { timeout: 30_000 }, async () => {
  const id = (/** @type {number} */ i) => `chat-${String(i).padStart(4, '0')}-${'x'.repeat(50)}`;
  const n = 1000;
  // The writer queues n titles before connecting: they go out as frame-sized sync_offline_changes.
  const writer = device('gus', 'laptop');
  for (let i = 0; i < n; i++) await writer.updateTitle(id(i), `T${i}`);
  await writer.connect();
  assert.equal(writer.chats.size, n);
  await writer.deleteChat(id(0));

  // A fresh device whose local model holds every chat at title_v 0, the deleted one the oldest.
  const phone = device('gus', 'phone');
  for (let i = 0; i < n; i++) Object.assign(phone.chat(id(i)), { known: true, title: 'stale', last_edited_overall_timestamp: i });
  /** @type {any[]} */
  const requests = [];
  phone.on('sent', (/** @type {any} */ f) => f.type === 'initial_sync_request' && requests.push(f));
  let drops = 0;
  phone.on('disconnected', () => drops++);
  await phone.connect();
  assert.equal(requests.length, 1);
  const max = /** @type {any} */ (phone.connected).limits.max_frame_bytes;
  assert.ok(new TextEncoder().encode(JSON.stringify(requests[0])).length <= max, 'the request fits in a frame');
  assert.ok(Object.keys(requests[0].payload.chat_versions).length < n - 1, 'not every chat is named');
  assert.equal(phone.chats.has(id(0)), false, 'the deleted chat is dropped');
  assert.equal(phone.chats.size, n - 1);
  for (let i = 1; i < n; i++) assert.equal(phone.chat(id(i)).title, `T${i}`);
  assert.equal(drops, 0);
  writer.close();
  phone.close();
});
