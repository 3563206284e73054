// @ts-check
/**
 * @file A seeded, randomized convergence test of the SDK against the real server (`chatsync serve` on
 * port 0, test/server.js). User A has three clients (three devices), each behind a TCP proxy of its own
 * that the test can cut abruptly (the sockets destroyed: no close frame either way) and hold down (new
 * connections refused, its WebSocket not even tried) while the client keeps writing into its offline queue; the SDK's own
 * `dropConnection()` is used too. A few hundred random operations run over A's clients, several in
 * flight at once: titles, drafts and their deletion, messages, chat deletions, read markers, cuts and
 * reconnections, and, as the application backend (SERVER_API.md), messages of another sender and short
 * streams (completed, aborted, or cancelled from a device) into A's chats. User B has one client, writes
 * its own chats and tries A's (which must be refused). At quiescence (every client online, queues empty),
 * every client of A must hold the model of a fresh client of A that connected after everything: the same
 * chats, titles, drafts, versions, `last_edited_overall_timestamp`, unread counts and, once each client
 * has loaded them (`loadMessages`: the sync brings messages for the chat in view only, README), the same
 * messages; the messages a client held before loading must be the server's. B's model holds nothing of A's.
 *
 * The seed (`CHATSYNC_CONVERGE_SEED`, else a fixed default) fixes the operations and their targets, not
 * the interleaving with the network, so a failing seed is a strong hint, not an exact replay; it is
 * printed with the diff on failure. `CHATSYNC_CONVERGE_RUNS` runs that many seeds from it (each on new
 * users), `CHATSYNC_CONVERGE_OPS` sets the number of operations per run (default 300);
 * `CHATSYNC_CONVERGE_TRACE=1` adds to a failure the operations and frames of each chat that diverged,
 * `CHATSYNC_CONVERGE_DUMP=1` every client's frames (with times) and the server's log.
 *
 * Not asserted, as the protocol leaves it behind on a device that learned a chat from events (see
 * `lagging` and the read markers below): the `last_edited_overall_timestamp` of a chat created by a
 * title or moved by a completed stream, an empty chat created by an offline draft deletion (no
 * broadcast), the unread count of a device that missed a marker's `chat_read_updated`, and a count too
 * high by messages that a marker's event counted before they reached the device (both PROTOCOL.md).
 * Run: `node --experimental-websocket --test clients/typescript/test/convergence.test.js` (CHATSYNC_BIN set).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { ChatSyncClient, ChatSyncError, draftFromText } from '../src/index.js';
import { startServer } from './server.js';

if (typeof globalThis.WebSocket !== 'function') {
  throw new Error('no global WebSocket: run node with --experimental-websocket (Node 20) or use Node 22+');
}

const SEED = Number(process.env.CHATSYNC_CONVERGE_SEED ?? 20261203) >>> 0;
const RUNS = Math.max(1, Number(process.env.CHATSYNC_CONVERGE_RUNS ?? 1));
const OPS = Math.max(1, Number(process.env.CHATSYNC_CONVERGE_OPS ?? 300));
/** Operations in flight at once. */
const WINDOW = 6;
/** The bound on every wait for a condition (quiescence, convergence). */
const DEADLINE_MS = 20_000;

/**
 * mulberry32: a tiny seeded PRNG, uniform in [0, 1).
 * @param {number} seed
 */
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
/** @type {{close(): void}[]} */
const toClose = [];

before(async () => {
  server = await startServer();
});

after(async () => {
  for (const c of toClose) c.close();
  await server?.stop();
});

/**
 * A TCP proxy in front of the server for one client: `cut()` destroys its connections (no close frame,
 * as a dead network), `down` refuses new ones.
 * @param {string} target `ws://host:port/v1/ws` of the server
 */
async function proxy(target) {
  const { hostname, port } = new URL(target);
  /** @type {Set<net.Socket>} */
  const sockets = new Set();
  const state = { down: false };
  const srv = net.createServer((inbound) => {
    if (state.down) {
      inbound.destroy();
      return;
    }
    const outbound = net.connect(Number(port), hostname);
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        sockets.delete(s);
        inbound.destroy();
        outbound.destroy();
      });
    }
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', () => r(undefined)));
  const address = /** @type {net.AddressInfo} */ (srv.address());
  return {
    url: `ws://127.0.0.1:${address.port}/v1/ws`,
    state,
    cut() {
      for (const s of sockets) s.destroy();
    },
    close() {
      state.down = true;
      for (const s of sockets) s.destroy();
      srv.close();
    },
  };
}

/** JSON with object keys sorted (drafts and contents compared as values). @param {unknown} v */
function canonical(v) {
  return JSON.stringify(v, (_k, x) => (x && typeof x === 'object' && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort(([a], [b]) => (a < b ? -1 : 1))) : x));
}

/**
 * What the SDK promises to keep in sync, of one client's model (messages apart, see `messagesOf`).
 * @param {ChatSyncClient} c
 */
function modelOf(c) {
  /** @type {Record<string, unknown>} */
  const out = {};
  for (const chat of [...c.chats.values()].sort((a, b) => (a.chat_id < b.chat_id ? -1 : 1))) {
    out[chat.chat_id] = {
      known: chat.known,
      title: chat.title,
      draft: canonical(chat.draft_json),
      versions: { ...chat.versions },
      last_edited_overall_timestamp: chat.last_edited_overall_timestamp,
      unread_count: chat.unread_count,
    };
  }
  return out;
}

/**
 * A chat's messages as compared (not `created_at`/`client_timestamp`: the sender shows its own with its
 * clock's time, README).
 * @param {import('../src/index.js').Message[]} messages
 */
function messagesOf(messages) {
  return messages.map((m) => canonical({ message_id: m.message_id, seq: m.seq, sender_name: m.sender_name, content: m.content, pending: m.pending ?? false }));
}

/**
 * The differences between two models, one readable line each.
 * @param {string} name
 * @param {Record<string, any>} got
 * @param {Record<string, any>} want
 */
function diffModels(name, got, want) {
  /** @type {string[]} */
  const lines = [];
  for (const id of new Set([...Object.keys(got), ...Object.keys(want)])) {
    if (!(id in got)) lines.push(`${name}: chat ${id} missing (fresh client: ${JSON.stringify(want[id])})`);
    else if (!(id in want)) lines.push(`${name}: chat ${id} held but not the server's (${JSON.stringify(got[id])})`);
    else {
      for (const k of Object.keys(want[id])) {
        const g = JSON.stringify(got[id][k]);
        const w = JSON.stringify(want[id][k]);
        if (g !== w) lines.push(`${name}: chat ${id} ${k}: ${g} (fresh client: ${w})`);
      }
    }
  }
  return lines;
}

/** @param {number} ms */
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Waits until `cond()` holds, at most `DEADLINE_MS`; returns whether it held.
 * @param {() => boolean | Promise<boolean>} cond
 */
async function within(cond) {
  const end = Date.now() + DEADLINE_MS;
  while (Date.now() < end) {
    if (await cond()) return true;
    await sleep(100);
  }
  return !!(await cond());
}

/**
 * One run: the operations of `seed`, then the convergence check.
 * @param {number} seed
 * @param {number} run
 */
async function converge(seed, run) {
  const rand = mulberry32(seed);
  // The backoff's jitter draws from its own generator: its calls depend on timing, the operations must not.
  const jitter = mulberry32(seed ^ 0x5bd1e995);
  const pick = (/** @type {any[]} */ xs) => xs[Math.floor(rand() * xs.length)];
  const tag = `r${run}s${seed.toString(36)}`;
  const userA = `${tag}ann`;
  const userB = `${tag}bob`;
  /** @type {string[]} what went wrong that is not a divergence (an unexpected error, a protocol_error) */
  const problems = [];
  /** @type {string[]} the operations, for the report */
  const log = [];
  /** @type {Map<ChatSyncClient, string[]>} */
  const frames = new Map();
  /** Device and chat pairs that may count a message twice (see the `chat_read_updated` listener). */
  const twice = new Set();
  const t0 = Date.now();
  /** @type {Map<string, string[]>} per chat: the operations and the frames of every client, in order */
  const traces = new Map();
  const trace = (/** @type {string} */ id, /** @type {string} */ line) => {
    const lines = traces.get(id) ?? [];
    lines.push(line);
    traces.set(id, lines);
  };
  /** An operation, in the log and in the trace of the chats it names. @param {string} line */
  const logOp = (line) => {
    log.push(line);
    for (const m of line.matchAll(new RegExp(`${tag}a\\d+`, 'g'))) trace(m[0], `op ${line}`);
  };

  /**
   * @param {string} user
   * @param {string} deviceId
   * @param {string} url
   */
  const client = (user, deviceId, url, /** @type {{down: boolean}} */ network = { down: false }) => {
    /** A WebSocket that cannot connect while its network is down. */
    class Cuttable extends WebSocket {
      /** @param {string} u */
      constructor(u) {
        if (network.down) throw new Error('network down');
        super(u);
      }
    }
    // connectTimeoutMs: a handshake whose TCP connection the proxy cut may get no close event from Node's
    // WebSocket at all (the SDK drops such an attempt after this long).
    const c = new ChatSyncClient({ url, token: server.token(user, deviceId), deviceId, WebSocket: Cuttable, backoff: { initialMs: 5, maxMs: 50 }, connectTimeoutMs: 1000, keepaliveMs: 0, random: jitter });
    c.on('protocol_error', (/** @type {unknown} */ data, /** @type {unknown} */ e) => problems.push(`${user}/${deviceId}: protocol_error ${String(data).slice(0, 200)} ${e}`));
    c.on('closed', (/** @type {any} */ info) => {
      if (!c._closedByUser || info.code !== 1000) problems.push(`${user}/${deviceId}: closed ${JSON.stringify(info)}`);
    });
    // Every frame about a chat, for the report of a chat that diverged.
    const note = (/** @type {string} */ dir, /** @type {any} */ frame) => {
      const p = frame?.payload ?? {};
      const ids = typeof p.chat_id === 'string' ? [p.chat_id] : frame.type === 'initial_sync_response' ? [...(p.chat_ids_to_delete ?? []), ...(p.chats_to_add_or_update ?? []).map((/** @type {any} */ e) => e.chat_id)] : frame.type === 'sync_offline_changes' ? (p.changes ?? []).map((/** @type {any} */ x) => x.chat_id) : [];
      for (const id of ids) {
        const entry = frame.type === 'initial_sync_response' ? (p.chats_to_add_or_update ?? []).find((/** @type {any} */ e) => e.chat_id === id) ?? 'deleted' : p;
        trace(id, `${deviceId} ${dir} ${frame.type}${frame.request_id ? ` ${frame.request_id}` : ''} ${JSON.stringify(entry).slice(0, 300)}`);
      }
    };
    c.on('message', (/** @type {any} */ f) => note('<-', f));
    // Documented (PROTOCOL.md, read markers): a `chat_read_updated` whose count includes a message of
    // another sender this device has not received yet (it comes after) may count that message twice
    // until the chat's next sync. (Seen after the model took the event: it holds what it held then.)
    c.on('chat_read_updated', (/** @type {any} */ p) => {
      const chat = c.chats.get(p.chat_id);
      const held = chat ? chat.messages.filter((m) => m.sender_name !== 'user' && (m.seq ?? 0) > p.read_seq).length : 0;
      if (p.unread_count > held) twice.add(`${deviceId}\u0000${p.chat_id}`);
    });
    c.on('sent', (/** @type {any} */ f) => note('->', f));
    /** @type {string[]} this client's frames and statuses, for the report of a client that never went quiet */
    const own = [];
    frames.set(c, own);
    const at = () => `${String(Date.now() - t0).padStart(6)}ms`;
    c.on('message', (/** @type {any} */ f) => own.push(`${at()} <- ${f.type}${f.request_id ? ` ${f.request_id}` : ''} ${JSON.stringify(f.payload).slice(0, 200)}`));
    c.on('sent', (/** @type {any} */ f) => own.push(`${at()} -> ${f.type}${f.request_id ? ` ${f.request_id}` : ''} ${JSON.stringify(f.payload).slice(0, 200)}`));
    c.on('status', (/** @type {string} */ s) => own.push(`${at()} status ${s}`));
    toClose.push(c);
    return c;
  };

  const proxies = await Promise.all([0, 1, 2].map(() => proxy(server.url)));
  toClose.push(...proxies);
  const devices = proxies.map((p, i) => ({ name: `d${i}`, proxy: p, client: client(userA, `d${i}`, p.url, p.state) }));
  const bob = client(userB, 'b0', server.url);
  await Promise.all([...devices.map((d) => d.client.connect()), bob.connect()]);

  let next = 0;
  /** A's chat ids in use (never reused once deleted). */
  const chats = [`${tag}a${next++}`];
  /** A's chat ids the server has (a write to them was confirmed): B may try them. */
  const confirmed = new Set();
  /** A's chats where a stream completed (see the comparison of timestamps). */
  const completedIn = new Set();
  const bobChats = [`${tag}b0`];
  const chatOf = () => {
    if (chats.length === 0 || rand() < 0.12) chats.push(`${tag}a${next++}`);
    return pick(chats);
  };
  const text = (/** @type {string} */ prefix) => `${prefix} ${Math.floor(rand() * 1e6).toString(36)}`;
  /** @param {string} what @param {unknown} e @param {string[]} allowed */
  const expectError = (what, e, allowed) => {
    const code = e instanceof ChatSyncError ? e.code : String(e);
    if (!allowed.includes(code)) problems.push(`${what}: unexpected error ${code}: ${/** @type {any} */ (e)?.message}`);
  };
  /** @param {string} what @param {{status: number, body: unknown}} r @param {number[]} allowed */
  const expectStatus = (what, r, allowed) => {
    if (!allowed.includes(r.status)) problems.push(`${what}: unexpected HTTP ${r.status} ${JSON.stringify(r.body)}`);
  };
  // A write may meet a chat deleted meanwhile (`not_found`) or a lost connection.
  const writeErrors = ['not_found', 'disconnected'];

  /** @param {number} i @returns {Promise<void>} */
  const operation = async (i) => {
    const d = pick(devices);
    const c = d.client;
    const r = rand();
    const chat = chatOf();
    const what = `#${i} ${d.name}`;
    /** @param {Promise<any>} p @param {string} desc */
    const write = async (p, desc) => {
      logOp(`${what} ${desc}`);
      try {
        const res = await p;
        if (res && res.queued === false) confirmed.add(chat);
      } catch (e) {
        expectError(`${what} ${desc}`, e, writeErrors);
      }
    };
    if (r < 0.16) return write(c.updateTitle(chat, text('title')), `title ${chat}`);
    if (r < 0.32) return write(c.updateDraft(chat, draftFromText(text('draft'))), `draft ${chat}`);
    if (r < 0.38) return write(c.deleteDraft(chat), `delete_draft ${chat}`);
    if (r < 0.54) return write(c.sendMessage(chat, text('message'), { messageId: `m${i}` }), `message ${chat}`);
    if (r < 0.58) {
      logOp(`${what} delete_chat ${chat}`);
      try {
        await c.deleteChat(chat);
        chats.splice(chats.indexOf(chat), 1);
      } catch (e) {
        // Offline (`disconnected`), or a chat the server does not have (yet, or any more).
        expectError(`${what} delete_chat ${chat}`, e, writeErrors);
        if (e instanceof ChatSyncError && e.code === 'not_found' && confirmed.has(chat)) chats.includes(chat) && chats.splice(chats.indexOf(chat), 1);
      }
      return;
    }
    if (r < 0.64) {
      logOp(`${what} mark_read ${chat}`);
      try {
        await c.markRead(chat);
      } catch (e) {
        expectError(`${what} mark_read ${chat}`, e, writeErrors);
      }
      return;
    }
    if (r < 0.70) {
      // The network of this device dies (abruptly, or as the SDK's dropConnection) and stays down a while.
      if (d.proxy.state.down) return;
      const abrupt = rand() < 0.6;
      logOp(`${what} cut${abrupt ? '' : ' (dropConnection)'}`);
      d.proxy.state.down = true;
      if (abrupt) d.proxy.cut();
      else c.dropConnection();
      return;
    }
    if (r < 0.76) {
      const down = devices.filter((x) => x.proxy.state.down);
      if (down.length === 0) return;
      const back = pick(down);
      logOp(`${what} ${back.name} back online`);
      back.proxy.state.down = false;
      back.client.reconnect();
      return;
    }
    if (r < 0.86) {
      logOp(`${what} backend message ${chat}`);
      const res = await server.postMessage(userA, chat, { message_id: `b${i}`, sender_name: 'assistant', content: text('reply') });
      expectStatus(`${what} backend message ${chat}`, res, [201, 404]);
      if (res.status === 201) confirmed.add(chat);
      return;
    }
    if (r < 0.92) {
      const path = `/users/${userA}/chats/${chat}/streams`;
      const sid = `s${i}`;
      logOp(`${what} stream ${sid} ${chat}`);
      const started = await server.api('POST', path, { stream_id: sid, message_id: `ms${i}`, sender_name: 'assistant' });
      expectStatus(`${what} stream ${sid} start`, started, [201, 404]);
      if (started.status !== 201) return;
      const n = 1 + Math.floor(rand() * 3);
      for (let k = 1; k <= n; k++) {
        const res = await server.api('POST', `${path}/${sid}/chunks`, { seq: k, delta: `${text('chunk')} ` });
        // 409: cancelled meanwhile (its chat deleted); 404: the chat deleted.
        expectStatus(`${what} stream ${sid} chunk ${k}`, res, [202, 404, 409]);
        if (res.status !== 202) return;
        await sleep(Math.floor(rand() * 5));
      }
      const end = rand();
      if (end < 0.6) {
        const res = await server.api('POST', `${path}/${sid}/complete`, {});
        expectStatus(`${what} stream ${sid} complete`, res, [201, 404, 409]);
        if (res.status === 201) {
          confirmed.add(chat);
          completedIn.add(chat);
        }
      } else if (end < 0.8) {
        const res = await server.api('DELETE', `${path}/${sid}`);
        expectStatus(`${what} stream ${sid} abort`, res, [204, 404, 409]);
      } else {
        try {
          await c.cancelStream(chat, sid);
        } catch (e) {
          expectError(`${what} stream ${sid} cancel`, e, writeErrors);
          // Not cancelled from the device (offline): the backend ends it, so that none stays open.
          const res = await server.api('DELETE', `${path}/${sid}`);
          expectStatus(`${what} stream ${sid} abort`, res, [204, 404, 409]);
        }
      }
      return;
    }
    // User B: its own chats, and A's (refused: another user's chat is `not_found`).
    const mine = rand() < 0.7;
    if (mine && rand() < 0.2) bobChats.push(`${tag}b${next++}`);
    const target = mine ? pick(bobChats) : pick([...confirmed]);
    if (!target) return;
    logOp(`${what} bob ${mine ? 'own' : "A's"} ${target}`);
    try {
      if (rand() < 0.5) await bob.updateTitle(target, text('bob title'));
      else await bob.sendMessage(target, text('bob says'), { messageId: `bm${i}` });
      if (!mine) problems.push(`${what} bob wrote A's chat ${target}`);
    } catch (e) {
      expectError(`${what} bob ${target}`, e, mine ? [] : ['not_found']);
    }
  };

  /** @type {Set<Promise<void>>} */
  const inflight = new Set();
  for (let i = 0; i < OPS; i++) {
    const p = operation(i).catch((e) => {
      problems.push(`#${i}: threw ${e?.stack ?? e}`);
    });
    inflight.add(p);
    void p.finally(() => inflight.delete(p));
    if (inflight.size >= WINDOW) await Promise.race(inflight);
    if (rand() < 0.3) await sleep(Math.floor(rand() * 4));
  }
  await Promise.all(inflight);

  // Quiescence: every device online again, nothing queued, in flight or left to ask about.
  for (const d of devices) {
    d.proxy.state.down = false;
    d.client.reconnect();
  }
  const aClients = devices.map((d) => d.client);
  const idle = (/** @type {ChatSyncClient} */ c) =>
    c.status === 'online' &&
    c.queue.size === 0 &&
    c.queue.inFlight.length === 0 &&
    c.queue.recheck.length === 0 &&
    c._stale.size === 0 &&
    c._pending.size === 0 &&
    c._toFetch.size === 0 &&
    c.streams.open().length === 0;
  const quiet = await within(() => [...aClients, bob].every(idle));
  const stuck = [...aClients, bob].filter((c) => !idle(c)).map((c) => `${c.options.deviceId} (last frames):\n  ${(frames.get(c) ?? []).slice(-25).join('\n  ')}`);
  const quietState = JSON.stringify([...aClients, bob].map((c) => ({ status: c.status, queued: c.queue.size, inFlight: c.queue.inFlight.length, recheck: c.queue.recheck.length, stale: c._stale.size, pending: c._pending.size, toFetch: c._toFetch.size, streams: c.streams.open().length })));

  // What each device holds before loading: every message must be the server's.
  const held = aClients.map((c) => new Map([...c.chats.values()].map((chat) => [chat.chat_id, chat.messages.filter((m) => !m.pending)])));

  const fresh = client(userA, `fresh${run}`, server.url);
  await fresh.connect();
  const freshBob = client(userB, `freshb${run}`, server.url);
  await freshBob.connect();
  // The server's read markers (a `seq` at or below the marker changes nothing and answers the current
  // values, PROTOCOL.md `mark_read`).
  /** @type {Map<string, number>} */
  const markers = new Map();
  for (const id of [...fresh.chats.keys()]) {
    const r = await fresh.request('mark_read', { chat_id: id, seq: 0 });
    markers.set(id, r.payload.read_seq);
  }
  /**
   * `got` with what the protocol leaves behind on a device that learned a chat from events, taken from
   * `want` (reported, not asserted):
   * - a chat created by a title has its creation time as `last_edited_overall_timestamp`, which
   *   `chat_title_updated` does not carry, and `stream_completed` does not carry the time its message
   *   moved it to either: such a device's value lags behind (is never ahead of) the fresh device's;
   * - an offline `delete_draft` of a chat that does not exist creates it, empty, without a broadcast
   *   (PROTOCOL.md §8): a device online meanwhile does not show that empty chat until a full sync.
   * @param {Record<string, any>} got
   * @param {Record<string, any>} want
   */
  const lagging = (got, want) => {
    for (const [id, w] of Object.entries(want)) {
      const g = got[id];
      if (!g) {
        if (w.versions.messages_v === 0 && w.versions.title_v === 0 && w.versions.draft_v === 0) got[id] = w;
        continue;
      }
      if ((g.last_edited_overall_timestamp === 0 || completedIn.has(id)) && g.last_edited_overall_timestamp <= w.last_edited_overall_timestamp) {
        g.last_edited_overall_timestamp = w.last_edited_overall_timestamp;
      }
    }
    return got;
  };
  /** @type {string[]} */
  let diff = [];
  const converged = await within(async () => {
    // Every client loads the messages it lacks (the sync brings those of the chat in view only); not
    // more: a connection's rate is bounded.
    for (const c of [...aClients, fresh, bob, freshBob]) {
      for (const chat of [...c.chats.values()]) {
        if (chat.messages.filter((m) => typeof m.seq === 'number').length === chat.versions.messages_v) continue;
        try {
          await c.loadMessages(chat.chat_id);
        } catch (e) {
          // A chat the server no longer has: the model must drop it (compared below).
        }
      }
    }
    diff = [];
    const want = modelOf(fresh);
    const names = ['d0', 'd1', 'd2'];
    aClients.forEach((c, i) => {
      const got = lagging(modelOf(c), want);
      for (const [id, chat] of Object.entries(got)) {
        const w = /** @type {any} */ (want[id]);
        const g = /** @type {any} */ (chat);
        // Documented (PROTOCOL.md, read markers): a marker moved while a device was offline (or while
        // its own `mark_read`'s reply was lost) reaches it only with a sync entry of the chat, i.e. when
        // the chat changed while it was offline: a device that missed the marker's `chat_read_updated`
        // (its `read_seq` behind the server's) may keep the count it had. Its marker is never ahead.
        const readSeq = c.chats.get(id)?.read_seq ?? 0;
        const marker = markers.get(id) ?? 0;
        if (readSeq > marker) diff.push(`${names[i]}: chat ${id} read_seq ${readSeq} is ahead of the server's ${marker}`);
        if (w && readSeq < marker) g.unread_count = w.unread_count;
        if (w && g.unread_count > w.unread_count && twice.has(`${c.options.deviceId}\u0000${id}`)) g.unread_count = w.unread_count;
      }
      diff.push(...diffModels(names[i], got, want));
      for (const chat of c.chats.values()) {
        const expected = fresh.chats.get(chat.chat_id);
        if (!expected) continue;
        const g = messagesOf(chat.messages);
        const w = messagesOf(expected.messages);
        if (g.join('\n') !== w.join('\n')) diff.push(`${names[i]}: chat ${chat.chat_id} messages:\n    ${g.join('\n    ')}\n  fresh client:\n    ${w.join('\n    ')}`);
      }
      if (c.streams.open().length > 0) diff.push(`${names[i]}: open streams ${JSON.stringify(c.streams.open())}`);
    });
    diff.push(...diffModels('bob', lagging(modelOf(bob), modelOf(freshBob)), modelOf(freshBob)));
    for (const id of bob.chats.keys()) if (!id.startsWith(`${tag}b`)) diff.push(`bob: holds A's chat ${id}`);
    return diff.length === 0;
  });
  // The messages held before loading were the server's (seq, id, sender, content).
  held.forEach((chatsHeld, i) => {
    for (const [id, messages] of chatsHeld) {
      const server = new Map((fresh.chats.get(id)?.messages ?? []).map((m) => [m.message_id, messagesOf([m])[0]]));
      if (!fresh.chats.has(id)) continue;
      for (const m of messages) {
        const w = server.get(m.message_id);
        const g = messagesOf([m])[0];
        if (w !== g) diff.push(`d${i}: chat ${id} held before loading ${g}, the server has ${w}`);
      }
    }
  });

  for (const d of devices) d.client.close();
  for (const c of [bob, fresh, freshBob]) c.close();
  for (const p of proxies) p.close();

  const report = [
    ...(quiet ? [] : [`no quiescence within ${DEADLINE_MS} ms: ${quietState}`, ...stuck]),
    ...(process.env.CHATSYNC_CONVERGE_DUMP ? [...frames].map(([c, f]) => `ALL ${c.options.deviceId}:\n  ${f.join('\n  ')}`) : []),
    ...(process.env.CHATSYNC_CONVERGE_DUMP ? [`SERVER LOG:\n${server.log.slice(-200).join('\n')}`] : []),
    ...problems,
    ...diff,
  ];
  if (report.length > 0) {
    const diverged = [...new Set([...report.join(' ').matchAll(new RegExp(`${tag}a\\d+`, 'g'))].map((m) => m[0]))];
    const traced = process.env.CHATSYNC_CONVERGE_TRACE ? diverged.map((id) => `chat ${id}:\n  ${(traces.get(id) ?? []).join('\n  ')}`).join('\n') : '(CHATSYNC_CONVERGE_TRACE=1 prints the frames of the chats that diverged)';
    assert.fail(`convergence failed with CHATSYNC_CONVERGE_SEED=${seed} (run ${run}, users ${userA}, ${userB}):\n${report.join('\n')}\n${traced}`);
  }
}

for (let run = 0; run < RUNS; run++) {
  const seed = (SEED + run) >>> 0;
  test(`three devices and the backend converge to what a fresh device syncs (seed ${seed})`, { timeout: 120_000 }, async () => {
    await converge(seed, run);
  });
}
