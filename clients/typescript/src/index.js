// @ts-check
/**
 * @file chatsync client SDK for browsers and Node (plain ES module, no build step; types in
 * `index.d.ts`). It speaks the chatsync WebSocket protocol (PROTOCOL.md): it connects with a token,
 * reconnects with exponential backoff and jitter, queues edits made while offline and sends them as
 * `sync_offline_changes` on reconnect followed by `initial_sync_request`, matches replies to requests by
 * `request_id` (joining multi-part replies), keeps a local model of the user's chats (titles, drafts,
 * versions, unread counts, messages) and assembles streamed replies (`stream_*`) into text.
 *
 * The server at `/sdk/chatsync.js` serves this very file (the web demo imports it from there).
 */

/** The protocol this SDK speaks (the `protocol` of the `connected` greeting). */
export const PROTOCOL = 'chatsync.v1';

/** Close reasons after which reconnecting with the same credentials cannot succeed. */
const FATAL_REASONS = new Set([
  'Authentication required',
  'Invalid session',
  'Device mismatch',
  'Device mismatch, 2FA required',
  'Session revoked',
  'Invalid device id',
]);

/**
 * For each request type, the reply types that end the request. Other frames carrying the same
 * `request_id` (SELF's copies of broadcasts caused by a `sync_offline_changes`) are events only.
 * @type {Record<string, string[]>}
 */
const FINAL_REPLIES = {
  ping: ['pong'],
  initial_sync_request: ['initial_sync_response', 'initial_sync_error'],
  update_draft: ['draft_update_confirmed'],
  delete_draft: ['draft_delete_receipt'],
  update_title: ['chat_title_updated'],
  chat_message_added: ['chat_message_confirmed'],
  get_chat_messages: ['chat_messages_response'],
  request_chat_content_batch: ['chat_content_batch_response'],
  delete_chat: ['chat_deleted'],
  sync_offline_changes: ['offline_sync_complete'],
  request_cache_status: ['cache_status_response'],
  mark_read: ['chat_read_updated'],
  cancel_stream: ['stream_cancelled'],
};

/** Failures that a later attempt may not meet: the request is kept (queued edits, messages) and retried. */
const TRANSIENT = new Set(['disconnected', 'timeout', 'closed', 'unavailable', 'rate_limited']);

/** The most chats an `initial_sync_request` may name (PROTOCOL.md). */
const MAX_SYNC_CHATS = 10_000;

/** A `request_id` at least as long as any this client sends, to bound the size of a frame before it is numbered. */
const LONGEST_REQUEST_ID = `r${'9'.repeat(16)}`;

/** The size of a frame on the wire: the UTF-8 bytes of its JSON text. @param {string} text */
function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

/** @param {unknown} e */
function isNotFound(e) {
  return e instanceof ChatSyncError && e.code === 'not_found';
}

/** @param {unknown} e */
function isTransient(e) {
  return e instanceof ChatSyncError && TRANSIENT.has(e.code);
}

/** An error reply of the server (`error`, `initial_sync_error`), or a local failure of a request. */
export class ChatSyncError extends Error {
  /**
   * @param {string} code stable code: a PROTOCOL.md §4 code, or `disconnected`, `timeout`, `closed`
   * @param {string} message
   * @param {Record<string, unknown>} [details] the rest of the error payload (`field`, `chat_id`, …)
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'ChatSyncError';
    this.code = code;
    this.details = details;
  }
}

/**
 * The delay before reconnect attempt `attempt` (0-based): exponential (`initialMs * factor^attempt`,
 * capped at `maxMs`), minus a random part of up to `jitter` of it, so that clients cut off together do
 * not come back together.
 * @param {number} attempt
 * @param {{initialMs?: number, maxMs?: number, factor?: number, jitter?: number}} [options]
 * @param {() => number} [random] returns a number in [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const { initialMs = 500, maxMs = 30_000, factor = 2, jitter = 0.5 } = options;
  const base = Math.min(maxMs, initialMs * Math.pow(factor, Math.max(0, attempt)));
  return Math.max(0, Math.round(base - base * Math.min(1, Math.max(0, jitter)) * random()));
}

/** A minimal typed event emitter (works the same in browsers and Node). */
export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
  }

  /**
   * Calls `handler` for every event `type`; returns a function that removes it.
   * @param {string} type
   * @param {Function} handler
   * @returns {() => void}
   */
  on(type, handler) {
    let set = this._handlers.get(type);
    if (!set) this._handlers.set(type, (set = new Set()));
    set.add(handler);
    return () => this.off(type, handler);
  }

  /**
   * Calls `handler` for the next event `type` only.
   * @param {string} type
   * @param {Function} handler
   * @returns {() => void}
   */
  once(type, handler) {
    const off = this.on(type, (/** @type {unknown[]} */ ...args) => {
      off();
      handler(...args);
    });
    return off;
  }

  /**
   * Resolves with the first event `type` whose arguments satisfy `predicate`.
   * @param {string} type
   * @param {(...args: any[]) => boolean} [predicate]
   * @returns {Promise<any>}
   */
  waitFor(type, predicate = () => true) {
    return new Promise((resolve) => {
      const off = this.on(type, (/** @type {any[]} */ ...args) => {
        if (predicate(...args)) {
          off();
          resolve(args[0]);
        }
      });
    });
  }

  /**
   * @param {string} type
   * @param {Function} handler
   */
  off(type, handler) {
    this._handlers.get(type)?.delete(handler);
  }

  /**
   * @param {string} type
   * @param {...unknown} args
   */
  emit(type, ...args) {
    for (const handler of [...(this._handlers.get(type) ?? [])]) {
      try {
        handler(...args);
      } catch (e) {
        // A failing listener must not break the connection loop.
        if (type !== 'listener_error') this.emit('listener_error', e);
      }
    }
  }
}

/**
 * Assembles streamed replies (SERVER_API.md §4) into text: `stream_started` opens a stream (for one open
 * here already, whose first chunk overtook it, it only fills in who writes),
 * `stream_chunk`s append their `delta` in `seq` order (a repeated `seq` is ignored; a jump is a merged
 * chunk from a slow connection and is appended), `stream_completed` and `stream_cancelled` end it.
 * `active_streams` of an initial sync seeds streams that were open before this device joined. A chunk
 * of a stream that has ended is ignored (one accepted just before a cancel may arrive after it), and so
 * is a repeated end event; a stream that a sync ended as unseen takes its own end event when it comes.
 */
export class StreamAssembler {
  constructor() {
    /** @type {Map<string, import('./index.js').StreamState>} */
    this.streams = new Map();
    /** Keys of the streams that ended here, newest last (at most {@link StreamAssembler.ENDED_KEPT}). */
    this.ended = new Set();
    /** @type {Map<string, Map<number, string>>} chunks received while a sync request is out, by stream and `seq` (see {@link buffer}) */
    this._recent = new Map();
    this._buffering = 0;
    /**
     * Streams ended by a sync that no longer listed them (see {@link endUnseen}), by key: their end event
     * may still come (the server takes a stream out of its open ones before it broadcasts the end).
     * @type {Map<string, import('./index.js').StreamState>}
     */
    this._unseen = new Map();
  }

  /** How many ended streams are remembered, to ignore their late chunks. */
  static ENDED_KEPT = 1024;

  /** @param {string} chatId @param {string} streamId */
  static key(chatId, streamId) {
    return `${chatId}\u0000${streamId}`;
  }

  /**
   * @param {string} chatId
   * @param {string} streamId
   * @returns {import('./index.js').StreamState | undefined}
   */
  get(chatId, streamId) {
    return this.streams.get(StreamAssembler.key(chatId, streamId));
  }

  /**
   * The open streams of a chat (all chats when `chatId` is omitted).
   * @param {string} [chatId]
   * @returns {import('./index.js').StreamState[]}
   */
  open(chatId) {
    return [...this.streams.values()].filter((s) => chatId === undefined || s.chat_id === chatId);
  }

  /**
   * @param {import('./index.js').StreamStarted} p
   * @returns {import('./index.js').StreamState}
   */
  start(p) {
    const key = StreamAssembler.key(p.chat_id, p.stream_id);
    const open = this.streams.get(key);
    if (open) {
      // Open here already: a chunk overtook this announcement (a retried start answered before its
      // original announced the stream), or it is repeated. The text so far stays; who writes is filled in.
      Object.assign(open, { message_id: p.message_id, sender_name: p.sender_name, meta: p.meta ?? {} });
      return open;
    }
    const stream = {
      chat_id: p.chat_id,
      stream_id: p.stream_id,
      message_id: p.message_id,
      sender_name: p.sender_name,
      meta: p.meta ?? {},
      seq: 0,
      text: '',
      state: /** @type {const} */ ('open'),
      complete: true,
    };
    this.ended.delete(key);
    this._unseen.delete(key);
    this.streams.set(key, stream);
    return stream;
  }

  /**
   * Seeds the streams of `active_streams` (joining mid-stream): the text is the stream's `content_so_far`
   * (up to its `seq`) followed by the chunks received while the sync request was out (see
   * {@link buffer}) with a later `seq`; what the stream held here before is replaced (it may have
   * missed chunks while disconnected). A stream that ended here is not reopened (the reply was built
   * before it ended).
   * @param {import('./index.js').ActiveStream[]} active
   * @returns {import('./index.js').StreamState[]}
   */
  seed(active) {
    /** @type {import('./index.js').StreamState[]} */
    const seeded = [];
    for (const a of active) {
      const key = StreamAssembler.key(a.chat_id, a.stream_id);
      if (this.ended.has(key)) continue;
      const later = [...(this._recent.get(key) ?? new Map())].filter(([seq]) => seq > a.seq).sort(([x], [y]) => x - y);
      const stream = this.start(a);
      stream.complete = true;
      stream.text = (a.content_so_far ?? '') + later.map(([, delta]) => delta).join('');
      stream.seq = later.length > 0 ? later[later.length - 1][0] : a.seq;
      seeded.push(stream);
    }
    return seeded;
  }

  /**
   * While a sync request is out (`on`: one more; off: one fewer), chunks are also kept by `seq`, to be
   * replayed over the `content_so_far` of its reply (see {@link seed}); forgotten when none is out.
   * @param {boolean} on
   */
  buffer(on) {
    this._buffering = Math.max(0, this._buffering + (on ? 1 : -1));
    if (this._buffering === 0) this._recent.clear();
  }

  /**
   * Appends a chunk. Returns the stream, or `null` when the chunk was ignored (a repeated or older
   * `seq`, or a stream that ended). A chunk of a stream never seen starts it with `complete: false` (its earlier text is
   * unknown; the stored message will have all of it).
   * @param {import('./index.js').StreamChunk} p
   * @returns {import('./index.js').StreamState | null}
   */
  chunk(p) {
    if (!Number.isSafeInteger(p.seq) || typeof p.delta !== 'string') throw new TypeError('stream_chunk: seq or delta malformed');
    if (this._buffering > 0 && !this.ended.has(StreamAssembler.key(p.chat_id, p.stream_id))) {
      const key = StreamAssembler.key(p.chat_id, p.stream_id);
      const chunks = this._recent.get(key) ?? new Map();
      if (!chunks.has(p.seq)) chunks.set(p.seq, p.delta);
      this._recent.set(key, chunks);
    }
    let stream = this.get(p.chat_id, p.stream_id);
    if (!stream && this.ended.has(StreamAssembler.key(p.chat_id, p.stream_id))) return null;
    if (!stream) {
      stream = this.start({ chat_id: p.chat_id, stream_id: p.stream_id, message_id: '', sender_name: '', meta: {} });
      stream.complete = p.seq === 1;
    }
    if (p.seq <= stream.seq) return null;
    stream.text += p.delta;
    stream.seq = p.seq;
    return stream;
  }

  /**
   * Whether the stream's end came here already (`stream_completed`, `stream_cancelled`, or its chat
   * deleted): a later end event of it is a repeat. One ended by a sync only ({@link endUnseen}) has not.
   * @param {string} chatId
   * @param {string} streamId
   */
  hasEnded(chatId, streamId) {
    const key = StreamAssembler.key(chatId, streamId);
    return this.ended.has(key) && !this._unseen.has(key);
  }

  /**
   * Ends an open stream that a sync no longer lists (`cancelled`, reason `ended_unseen`): it ended unseen.
   * Its own end event, should it still come, ends it for real, text kept (see {@link finish}).
   * @param {string} chatId
   * @param {string} streamId
   * @returns {import('./index.js').StreamState}
   */
  endUnseen(chatId, streamId) {
    const stream = this.finish(chatId, streamId, 'cancelled');
    stream.reason = 'ended_unseen';
    this._unseen.set(StreamAssembler.key(chatId, streamId), stream);
    return stream;
  }

  /**
   * Ends a stream; returns it (one that ended unseen, see {@link endUnseen}, with its text; a stub when
   * it was never seen).
   * @param {string} chatId
   * @param {string} streamId
   * @param {'completed' | 'cancelled'} state
   * @returns {import('./index.js').StreamState}
   */
  finish(chatId, streamId, state) {
    const key = StreamAssembler.key(chatId, streamId);
    const unseen = this._unseen.get(key);
    if (unseen) {
      this._unseen.delete(key);
      delete unseen.reason;
    }
    const stream = this.streams.get(key) ?? unseen ?? {
      chat_id: chatId,
      stream_id: streamId,
      message_id: '',
      sender_name: '',
      meta: {},
      seq: 0,
      text: '',
      state: 'open',
      complete: false,
    };
    this.streams.delete(key);
    this.ended.add(key);
    if (this.ended.size > StreamAssembler.ENDED_KEPT) {
      const oldest = this.ended.values().next().value;
      this.ended.delete(oldest);
      this._unseen.delete(oldest);
    }
    stream.state = state;
    return stream;
  }

  /**
   * Forgets every stream and which ones ended (another user's model starts: a new initial sync brings
   * the open ones back, also those of a user switched away from and back to, which ended here only for
   * the switch).
   */
  clear() {
    this.streams.clear();
    this.ended.clear();
    this._unseen.clear();
    this._recent.clear();
  }
}

/** The version a change is checked against: `title` for titles, `draft` for drafts and deletions. @param {string} type */
function componentOf(type) {
  return type === 'title' ? 'title' : 'draft';
}

/**
 * JSON text with object keys sorted at every depth, to compare two values.
 * @param {unknown} value
 * @returns {string}
 */
function canonicalJson(value) {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value && typeof value === 'object') {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value) ?? 'null';
}

/**
 * An offline change as sent: without the local-only `written` and `base_unknown`.
 * @param {import('./index.js').OfflineChange} change
 */
function wireChange({ written, base_unknown, ...change }) {
  return change;
}

/** How many values of lost-reply writes a queued edit remembers (`written`): the newest ones. */
const WRITTEN_KEPT = 4;

/**
 * The `written` of a queued edit: the values of `lists` (each oldest first, the lists in the order they
 * were written), a value written again counted once at its newest place, the newest
 * {@link WRITTEN_KEPT} kept.
 * @param {...unknown[]} lists
 * @returns {unknown[]}
 */
function mergeWritten(...lists) {
  /** @type {Map<string, unknown>} canonical JSON to value, in insertion order */
  const seen = new Map();
  for (const value of lists.flat()) {
    const key = canonicalJson(value);
    seen.delete(key);
    seen.set(key, value);
  }
  return [...seen.values()].slice(-WRITTEN_KEPT);
}

/**
 * The values of a queued edit's lost-reply writes (`written`) other than its own value: a conflict
 * that these writes alone explain is not a loss (see `ChatSyncClient#_recheckConflict`). A conflict with its own
 * value is the edit itself, already applied: nothing to send again.
 * @param {import('./index.js').OfflineChange} change
 * @returns {unknown[]}
 */
function otherWrites(change) {
  const own = canonicalJson(change.value);
  return (change.written ?? []).filter((w) => canonicalJson(w) !== own);
}

/**
 * The version of its component that a live write's reply says the write produced; `null` when it
 * changed nothing (a draft deletion with no draft) or the reply does not say.
 * @param {string} type the change type
 * @param {any} payload the reply's payload (`chat_title_updated`, `draft_update_confirmed`, `draft_delete_receipt`)
 * @returns {number | null}
 */
function appliedVersion(type, payload) {
  const version = type === 'title' ? payload?.versions?.title_v : type === 'delete_draft' && payload?.success !== true ? undefined : payload?.draft_v;
  return typeof version === 'number' && Number.isSafeInteger(version) ? version : null;
}

/** Whether `value` can be the value of a change of `type` (what the server takes: a title is a string, a draft an object or `null`). @param {string} type @param {unknown} value */
function fitsType(type, value) {
  if (type === 'title') return typeof value === 'string';
  if (type === 'draft') return value === null || (typeof value === 'object' && !Array.isArray(value));
  return value === null;
}

/**
 * A queued change read back from storage, whose content is not trusted: its fields checked, `written`
 * made a list (an older SDK kept one value) of values of the change's kind, at most
 * {@link WRITTEN_KEPT}. `null` when malformed (it is dropped).
 * @param {unknown} raw
 * @returns {import('./index.js').OfflineChange | null}
 */
function readChange(raw) {
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) return null;
  const c = /** @type {Record<string, unknown>} */ (raw);
  const { change_id, chat_id, type, version_before_edit } = c;
  if (typeof change_id !== 'string' || typeof chat_id !== 'string' || chat_id === '') return null;
  if (type !== 'title' && type !== 'draft' && type !== 'delete_draft') return null;
  if (typeof version_before_edit !== 'number' || !Number.isSafeInteger(version_before_edit) || version_before_edit < 0) return null;
  const value = type === 'delete_draft' ? null : c.value;
  if (!fitsType(type, value)) return null;
  try {
    /** @type {import('./index.js').OfflineChange} */
    const change = { change_id, chat_id, type, value, version_before_edit };
    // Values of a draft deletion's lost-reply writes are drafts (or null): checked as drafts.
    const kind = type === 'title' ? 'title' : 'draft';
    const written = (Array.isArray(c.written) ? c.written : 'written' in c ? [c.written] : []).filter((w) => fitsType(kind, w));
    if (written.length > 0) change.written = mergeWritten(written);
    if (c.base_unknown === true) change.base_unknown = true;
    canonicalJson(value); // a value nested too deep to compare throws here, not later
    return change;
  } catch {
    return null;
  }
}

/**
 * The well-formed changes of a list read back from storage (see {@link readChange}).
 * @param {unknown[]} list
 * @returns {import('./index.js').OfflineChange[]}
 */
function readChanges(list) {
  return /** @type {import('./index.js').OfflineChange[]} */ (list.map(readChange).filter((c) => c !== null));
}

/** The largest stored counter of change ids read back (far more than a queue ever counts; counting up from it stays exact). */
const MAX_STORED_SEQ = 2 ** 52;

/**
 * A queued message read back from storage, whose content is not trusted: the fields the server takes
 * (PROTOCOL.md `chat_message_added`), of the types this SDK writes, and nothing else (`temp_id` when
 * present). `null` when malformed (it is dropped).
 * @param {unknown} raw
 * @returns {import('./index.js').PendingMessage | null}
 */
function readMessage(raw) {
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) return null;
  const { chat_id, message } = /** @type {Record<string, unknown>} */ (raw);
  if (typeof chat_id !== 'string' || chat_id === '') return null;
  if (!message || typeof message !== 'object' || Array.isArray(message)) return null;
  const { message_id, content, timestamp, temp_id } = /** @type {Record<string, unknown>} */ (message);
  if (typeof message_id !== 'string' || message_id === '' || typeof timestamp !== 'string') return null;
  if (typeof content !== 'string' && !(content && typeof content === 'object' && !Array.isArray(content))) return null;
  if (temp_id !== undefined && typeof temp_id !== 'string') return null;
  try {
    JSON.stringify(content); // content nested too deep to send (or to store again) throws here, not later
  } catch {
    return null;
  }
  return {
    chat_id,
    message: {
      message_id,
      content: /** @type {string | {[key: string]: unknown}} */ (content),
      timestamp,
      ...(temp_id !== undefined ? { temp_id } : {}),
    },
  };
}

/**
 * The well-formed messages of a list read back from storage (see {@link readMessage}), each (chat and
 * `message_id`) once.
 * @param {unknown[]} list
 * @returns {import('./index.js').PendingMessage[]}
 */
function readMessages(list) {
  /** @type {import('./index.js').PendingMessage[]} */
  const messages = [];
  for (const m of list.map(readMessage)) {
    if (m && !messages.some((x) => x.chat_id === m.chat_id && x.message.message_id === m.message.message_id)) messages.push(m);
  }
  return messages;
}

/** What follows the base key in a tab's key (see `OfflineQueue#adopt`). */
const TAB_SUFFIX = /^\.tab\.[0-9a-f]{12}$/;

/** Keys of stored queues that a live {@link OfflineQueue} of this JavaScript realm holds (see `OfflineQueue#adopt`). */
const LIVE_KEYS = new Set();

/**
 * Whether a storage can list its keys and remove one (as `localStorage` can): needed for a queue per tab.
 * @param {unknown} storage
 * @returns {storage is import('./index.js').EnumerableStorage}
 */
function isEnumerable(storage) {
  const s = /** @type {any} */ (storage);
  return !!s && typeof s.key === 'function' && typeof s.length === 'number' && typeof s.removeItem === 'function';
}

/** `n` random bytes in hex. @param {number} n */
function randomHex(n) {
  const bytes = new Uint8Array(n);
  globalThis.crypto.getRandomValues(bytes);
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/** When a queued change was made (ms), from its id (`oc-<time base 36>-…`); 0 when unknown. @param {{change_id: string}} change */
function changeTime(change) {
  const t = parseInt(change.change_id.split('-')[1] ?? '', 36);
  return Number.isFinite(t) ? t : 0;
}

/** The most conflicts an {@link OfflineQueue} keeps to look at again (`recheck`); past it, the oldest are dropped. */
const RECHECK_KEPT = 100;

/**
 * Edits made while offline, waiting for the next connection. Title and draft edits of one chat are
 * coalesced (the newest value with the version seen before the first edit, so that the server can
 * tell a conflict); messages are kept in order and re-sent with their `message_id` (idempotent).
 * Changes sent in a batch stay `inFlight` until its results arrive; conflicts that the next sync may
 * show to be with this device's own writes wait in `recheck`. With a `storage` (e.g. `localStorage`)
 * the queue, in-flight changes and conflicts to recheck included, survives a reload.
 */
export class OfflineQueue {
  /**
   * @param {{getItem(key: string): string | null, setItem(key: string, value: string): void} | null} [storage]
   * @param {string} [key]
   * @param {{perTab?: boolean, locks?: import('./index.js').LockManagerLike | null, owner?: string | null}} [options] `perTab`: a key of
   *   its own beside other tabs' on the same storage (see {@link adopt}); `locks`: default `navigator.locks`;
   *   `owner`: the user whose queue this is, when known before a connection says (see {@link own})
   */
  constructor(storage = null, key = 'chatsync.offline', options = {}) {
    this.storage = storage;
    /** The key given; with `perTab`, the prefix of every tab's key (and a queue stored there by an older SDK). */
    this.baseKey = key;
    /** Whether this queue has a key of its own, beside other tabs' (see {@link adopt}). */
    this.perTab = !!options.perTab && !!storage;
    const tab = this.perTab ? randomHex(6) : '';
    /** The key this queue writes. */
    this.key = this.perTab ? `${key}.tab.${tab}` : key;
    /** @type {import('./index.js').LockManagerLike | null} */
    this.locks = options.locks !== undefined ? options.locks : /** @type {any} */ (globalThis).navigator?.locks ?? null;
    /** @type {(() => void) | null} releases the lock held on {@link key} */
    this._unlock = null;
    /** Tells the change ids of tabs apart. */
    this._idTag = tab ? `${tab}-` : '';
    /** @type {import('./index.js').OfflineChange[]} */
    this.changes = [];
    /** @type {import('./index.js').OfflineChange[]} taken by {@link takeChanges}, not yet {@link settle}d */
    this.inFlight = [];
    /** @type {import('./index.js').PendingMessage[]} */
    this.messages = [];
    /** @type {import('./index.js').OfflineChange[]} conflicts to look at again after the next sync (see {@link addRechecks}) */
    this.recheck = [];
    this._seq = 0;
    /**
     * The user whose edits this queue holds (the `user_id` of the `connected` greeting, see {@link own}),
     * stored with it: a stored queue of another user is never read back nor adopted, so that one user's
     * edits are never sent with another's credentials (two users signing in on one browser with one
     * device id share the default key). `null` until known.
     * @type {string | null}
     */
    this.owner = options.owner ?? null;
    const saved = this._read(this.key);
    if (saved && this._mayTake(saved.owner)) {
      this.owner = saved.owner ?? this.owner;
      this.changes = saved.changes;
      this.messages = saved.messages;
      this._seq = saved.seq;
      // Conflicts whose recheck the reload came before: checked, bounded, as when added.
      this.addRechecks(saved.recheck);
      // A batch whose results never arrived (reloaded during the round trip) is sent again.
      this.restore(saved.inFlight);
    }
    /** The adoption of the queues of tabs that are gone, started by the constructor (see {@link adopt}). */
    this.adopted = Promise.resolve();
    if (this.perTab) {
      this.hold();
      this.adopted = this.adopt();
    }
  }

  /**
   * The queue stored under `key`, read back checked: changes and messages one by one (a malformed one is
   * dropped; `written` of an older SDK, one value, becomes a list); `null` when there is none or it is
   * corrupt (the server stays the truth).
   * @param {string} key
   */
  _read(key) {
    if (!this.storage) return null;
    try {
      const saved = JSON.parse(this.storage.getItem(key) ?? 'null');
      if (!saved || !Array.isArray(saved.changes) || !Array.isArray(saved.messages)) return null;
      return {
        changes: readChanges(saved.changes),
        messages: readMessages(saved.messages),
        // The counter of change ids: a whole number that counting up keeps exact, else it restarts (the
        // ids also carry the time, so they stay distinct from the stored ones).
        seq: Number.isSafeInteger(saved.seq) && saved.seq >= 0 && saved.seq <= MAX_STORED_SEQ ? saved.seq : 0,
        recheck: Array.isArray(saved.recheck) ? readChanges(saved.recheck) : [],
        inFlight: Array.isArray(saved.in_flight) ? readChanges(saved.in_flight) : [],
        // Whose queue it is (none: stored before its client learned its user, or by an older SDK).
        owner: typeof saved.user_id === 'string' ? saved.user_id : null,
      };
    } catch {
      return null;
    }
  }

  /**
   * Marks {@link key} as held by a live queue: in this JavaScript realm, and with a lock of that name
   * (`navigator.locks`) for other tabs, until {@link release}. The constructor calls it.
   */
  hold() {
    if (!this.perTab) return;
    LIVE_KEYS.add(this.key);
    if (!this.locks || this._unlock) return;
    /** @type {Promise<void>} */
    const held = new Promise((resolve) => (this._unlock = resolve));
    this.locks.request(this.key, () => held).catch(() => {});
  }

  /** Lets another queue adopt this one's stored entries (see {@link adopt}); the client's `close()` calls it. */
  release() {
    LIVE_KEYS.delete(this.key);
    this._unlock?.();
    this._unlock = null;
  }

  /**
   * With `perTab`: takes over the queues stored by tabs that are gone (their keys start with
   * {@link baseKey}, the key itself being an older SDK's), so that nothing queued in a closed or
   * reloaded tab is lost: each is merged into this queue, stored under {@link key}, then removed. A key
   * is gone when no live queue of this realm holds it and, with `navigator.locks`, its lock is free (it
   * is taken for the adoption, so two tabs never adopt the same key). Without `navigator.locks`, a key
   * held by another live tab (or process) would be taken as well: both would then send its entries,
   * which is safe (a message is stored once by its `message_id`; the second of two equal changes is a
   * conflict with its own value). Synchronous without `navigator.locks`.
   * @returns {Promise<void>}
   */
  async adopt() {
    if (!this.perTab) return;
    const keys = this._tabKeys().filter((k) => k !== this.key);
    for (const k of keys) {
      if (LIVE_KEYS.has(k)) continue;
      if (!this.locks) {
        this._adoptKey(k);
        continue;
      }
      try {
        await this.locks.request(k, { ifAvailable: true }, (lock) => {
          if (lock && !LIVE_KEYS.has(k)) this._adoptKey(k);
        });
      } catch {
        // No lock manager after all (e.g. an opaque origin): left for a later adoption.
      }
    }
  }

  /**
   * Merges the queue stored under `key` into this one, saves, and removes `key` (in that order: a crash
   * in between leaves it twice, which is safe, never lost). A queued edit of a component queued here
   * too: the one made later is kept (as one tab coalesces its own edits). Changes in flight there are
   * queued again, as a reload does.
   * @param {string} key
   */
  _adoptKey(key) {
    const saved = this._read(key);
    // Another user's queue (or one whose user is known while this one's is not yet): left for that user.
    if (saved && !this._mayTake(saved.owner)) return;
    if (saved) {
      for (const c of saved.changes) {
        const own = this._newer(c);
        if (own && changeTime(own) >= changeTime(c)) continue;
        if (own) this.changes.splice(this.changes.indexOf(own), 1);
        this.changes.push(c);
      }
      this.restore(saved.inFlight);
      for (const m of saved.messages) {
        if (!this.messages.some((x) => x.chat_id === m.chat_id && x.message.message_id === m.message.message_id)) this.messages.push(m);
      }
      this.addRechecks(saved.recheck);
      this.save();
    }
    this._removeKey(key);
  }

  /**
   * Whether a stored queue of `owner` may be taken into this one: a queue of no known user, or of this
   * queue's user (see {@link owner}).
   * @param {string | null} owner
   */
  _mayTake(owner) {
    return owner === null || owner === this.owner;
  }

  /**
   * Sets the user whose queue this is (the `user_id` of a `connected` greeting; the client calls it before
   * it sends anything). Edits queued before the user was known are that user's (they were made with this
   * client's credentials). A queue of another user (the credentials now name someone else) is never sent
   * as this one's: with a key per tab it stays stored, under its own key and user, for that user's next
   * client to adopt, and this queue starts empty under a new key; without, it is dropped.
   * @param {string} userId
   */
  own(userId) {
    const previous = this.owner;
    if (previous === userId) return;
    this.owner = userId;
    if (previous !== null) {
      if (this.perTab) {
        // Stored under its key with its user (every change is saved): let it go, and take a new key.
        this.release();
        const tab = randomHex(6);
        this.key = `${this.baseKey}.tab.${tab}`;
        this._idTag = `${tab}-`;
        this.hold();
      }
      this.changes = [];
      this.inFlight = [];
      this.messages = [];
      this.recheck = [];
    }
    this.save();
  }

  /**
   * The stored queues under {@link baseKey}: the keys of the storage that are that key or a tab's key
   * under it; for a storage that cannot list its keys, that key and those named in the index
   * `<baseKey>.tabs` (kept by {@link save}).
   * @returns {string[]}
   */
  _tabKeys() {
    const storage = this.storage;
    if (!storage) return [];
    if (!isEnumerable(storage)) return [this.baseKey, ...this._index().map((id) => `${this.baseKey}.tab.${id}`)];
    /** @type {string[]} */
    const keys = [];
    for (let i = 0; i < storage.length; i++) {
      const k = storage.key(i);
      if (k !== null && (k === this.baseKey || (k.startsWith(this.baseKey) && TAB_SUFFIX.test(k.slice(this.baseKey.length))))) keys.push(k);
    }
    return keys;
  }

  /** The tab ids of the index of a storage that cannot list its keys. @returns {string[]} */
  _index() {
    try {
      const list = JSON.parse(/** @type {NonNullable<OfflineQueue['storage']>} */ (this.storage).getItem(`${this.baseKey}.tabs`) ?? '[]');
      return Array.isArray(list) ? list.filter((id) => typeof id === 'string' && TAB_SUFFIX.test(`.tab.${id}`)) : [];
    } catch {
      return [];
    }
  }

  /**
   * Adds (or removes) a tab's key to the index of a storage that cannot list its keys.
   * @param {string} key
   * @param {boolean} listed
   */
  _list(key, listed) {
    const storage = this.storage;
    if (!storage || isEnumerable(storage) || key === this.baseKey) return;
    const id = key.slice(`${this.baseKey}.tab.`.length);
    const index = this._index();
    if (index.includes(id) === listed) return;
    storage.setItem(`${this.baseKey}.tabs`, JSON.stringify(listed ? [...index, id] : index.filter((x) => x !== id)));
  }

  /**
   * Removes a stored queue (emptied where the storage has no `removeItem`) and unlists it.
   * @param {string} key
   */
  _removeKey(key) {
    const storage = /** @type {import('./index.js').QueueStorage} */ (this.storage);
    try {
      if (typeof storage.removeItem === 'function') storage.removeItem(key);
      else if (storage.getItem(key) !== null) storage.setItem(key, 'null');
      this._list(key, false);
    } catch {
      // Left in place: adopted again later (its entries are then already here, and kept once).
    }
  }

  /** Number of waiting edits and messages. */
  get size() {
    return this.changes.length + this.messages.length;
  }

  /**
   * Queues a title, draft or draft deletion; replaces a queued edit of the same component of the same
   * chat (keeping its `version_before_edit` and `written`, to which the values `change` brings in its
   * own `written` are added when it was made on that same version).
   * @param {Omit<import('./index.js').OfflineChange, 'change_id'>} change
   * @returns {import('./index.js').OfflineChange}
   */
  addChange(change) {
    const i = this.changes.findIndex(
      (c) => c.chat_id === change.chat_id && componentOf(c.type) === componentOf(change.type),
    );
    const first = i >= 0 ? this.changes[i] : change;
    /** @type {import('./index.js').OfflineChange} */
    const queued = {
      change_id: `oc-${Date.now().toString(36)}-${this._idTag}${++this._seq}`,
      chat_id: change.chat_id,
      type: change.type,
      value: change.type === 'delete_draft' ? null : change.value,
      version_before_edit: first.version_before_edit,
    };
    const sameBase = first !== change && change.version_before_edit === first.version_before_edit;
    const written = mergeWritten(first.written ?? [], sameBase ? change.written ?? [] : []);
    if (written.length > 0) queued.written = written;
    if (first.base_unknown) queued.base_unknown = true;
    if (i >= 0) this.changes.splice(i, 1);
    this.changes.push(queued);
    this.save();
    return queued;
  }

  /**
   * Drops the queued changes `superseded` picks (a later edit of the same component was sent live).
   * @param {(change: import('./index.js').OfflineChange) => boolean} superseded
   */
  dropChanges(superseded) {
    const kept = this.changes.filter((c) => !superseded(c));
    if (kept.length !== this.changes.length) {
      this.changes = kept;
      this.save();
    }
  }

  /**
   * Queues a message (or keeps the one already queued with that id).
   * @param {import('./index.js').PendingMessage} message
   */
  addMessage(message) {
    if (!this.messages.some((m) => m.chat_id === message.chat_id && m.message.message_id === message.message.message_id)) {
      this.messages.push(message);
      this.save();
    }
  }

  /**
   * Drops a message once the server confirmed it.
   * @param {string} chatId
   * @param {string} messageId
   */
  confirmMessage(chatId, messageId) {
    const before = this.messages.length;
    this.messages = this.messages.filter((m) => !(m.chat_id === chatId && m.message.message_id === messageId));
    if (this.messages.length !== before) this.save();
  }

  /**
   * Moves at most `max` changes (oldest first) to {@link inFlight} and returns them.
   * @param {number} max
   */
  takeChanges(max) {
    return this.take(this.changes.slice(0, Math.max(1, max)));
  }

  /**
   * Moves the given queued changes to {@link inFlight} and returns them.
   * @param {import('./index.js').OfflineChange[]} changes
   */
  take(changes) {
    this.changes = this.changes.filter((c) => !changes.includes(c));
    this.inFlight.push(...changes);
    this.save();
    return changes;
  }

  /**
   * Forgets changes the server answered (or that are dropped). An edit queued while an `applied` one
   * was in flight, on the same base version, was made on top of it: it moves to the version the
   * applied change produced, so that it is not taken for a conflict. An edit queued on top of one that
   * met a `conflict` is on the same base and meets the same conflict: when that conflict may be with
   * this device's own lost-reply writes (the answered change has `written`), the edit takes those
   * values over, so that its own conflict is looked at again after the next sync as well (see
   * `ChatSyncClient#_recheckConflict`; the answered change's own value was not applied by it).
   * @param {import('./index.js').OfflineChange[]} changes
   * @param {import('./index.js').OfflineResult[]} [results]
   */
  settle(changes, results = []) {
    for (const r of results) {
      const sent = changes.find((c) => c.change_id === r.change_id);
      if (!sent) continue;
      if (r.status === 'applied' && r.versions) {
        this._rebase(sent, r.versions[componentOf(sent.type) === 'title' ? 'title_v' : 'draft_v']);
      } else if (r.status === 'conflict' && sent.written && sent.written.length > 0) {
        const newer = this._newer(sent);
        if (newer && newer.version_before_edit === sent.version_before_edit) newer.written = mergeWritten(sent.written, newer.written ?? []);
      }
    }
    const ids = new Set(changes.map((c) => c.change_id));
    this.inFlight = this.inFlight.filter((c) => !ids.has(c.change_id));
    this.changes = this.changes.filter((c) => !ids.has(c.change_id));
    this.save();
  }

  /**
   * Queues `change` again on `version`; when a newer edit of its component is queued, that one (if made
   * on the change's base) moves to `version` instead. Returns the queued edit.
   * @param {import('./index.js').OfflineChange} change
   * @param {number} version
   * @returns {import('./index.js').OfflineChange}
   */
  requeue(change, version) {
    const newer = this._rebase(change, version);
    if (!newer) return this.addChange({ chat_id: change.chat_id, type: change.type, value: change.value, version_before_edit: version });
    this.save();
    return newer;
  }

  /**
   * The queued edit of `change`'s component, moved to `version` if it was made on the change's base.
   * @param {import('./index.js').OfflineChange} change
   * @param {number} version
   */
  _rebase(change, version) {
    const newer = this._newer(change);
    if (newer && newer.version_before_edit === change.version_before_edit) newer.version_before_edit = version;
    return newer;
  }

  /**
   * The queued edit of `change`'s component (of its chat), if any.
   * @param {import('./index.js').OfflineChange} change
   */
  _newer(change) {
    return this.changes.find((c) => c.chat_id === change.chat_id && componentOf(c.type) === componentOf(change.type));
  }

  /**
   * Puts changes back at the front (their batch's results never arrived), unless a newer edit of the
   * same component was queued meanwhile. That edit, when made on the same base, was made on top of the
   * dropped change, which the server may have applied (or one of the writes it remembers): it adds the
   * dropped value (and the dropped change's `written`) to its own `written`, so that a conflict with
   * one of them alone is not a loss (see `ChatSyncClient#_recheckConflict`).
   * @param {import('./index.js').OfflineChange[]} changes
   */
  restore(changes) {
    const ids = new Set(changes.map((c) => c.change_id));
    this.inFlight = this.inFlight.filter((c) => !ids.has(c.change_id));
    const back = changes.filter((c) => {
      const newer = this.changes.find((n) => n.chat_id === c.chat_id && componentOf(n.type) === componentOf(c.type));
      // Oldest first: the dropped change's own writes, its value, then the newer edit's (made after).
      if (newer && newer.version_before_edit === c.version_before_edit) newer.written = mergeWritten(c.written ?? [], [c.value], newer.written ?? []);
      return !newer;
    });
    this.changes.unshift(...back);
    this.save();
  }

  /**
   * Keeps conflicting changes (answered, so no longer in the queue) to look at again once the next sync
   * has brought the server's values (see `ChatSyncClient#_recheckConflict`: a conflict that this
   * device's own lost-reply writes explain is not a loss; one with the change's own value is none
   * either; else `change_conflict`); stored with the queue, so that a reload before that sync loses
   * none. One per chat and component, the newest (an edit made after the older one, which it would
   * replace anyway); at most {@link RECHECK_KEPT}, the oldest dropped past it.
   * @param {import('./index.js').OfflineChange[]} changes
   */
  addRechecks(changes) {
    const added = changes;
    if (added.length === 0) return;
    for (const c of added) {
      this.recheck = this.recheck.filter((r) => !(r.chat_id === c.chat_id && componentOf(r.type) === componentOf(c.type)));
      this.recheck.push(c);
    }
    this.recheck = this.recheck.slice(-RECHECK_KEPT);
    this.save();
  }

  /**
   * Forgets conflicts that were looked at again.
   * @param {import('./index.js').OfflineChange[]} changes
   */
  dropRechecks(changes) {
    const before = this.recheck.length;
    this.recheck = this.recheck.filter((c) => !changes.includes(c));
    if (this.recheck.length !== before) this.save();
  }

  /** Forgets everything queued. */
  clear() {
    this.changes = [];
    this.inFlight = [];
    this.messages = [];
    this.recheck = [];
    this.save();
  }

  save() {
    if (!this.storage) return;
    try {
      if (this.perTab && this.size + this.inFlight.length + this.recheck.length === 0) {
        this._removeKey(this.key);
        return;
      }
      const saved = { changes: this.changes, in_flight: this.inFlight, messages: this.messages, recheck: this.recheck, seq: this._seq, ...(this.owner !== null ? { user_id: this.owner } : {}) };
      this.storage.setItem(this.key, JSON.stringify(saved));
      // Listed again on every save (another tab's write of the index may have dropped it).
      if (this.perTab) this._list(this.key, true);
    } catch {
      // Storage full or unavailable: the queue still lives in memory.
    }
  }
}

/**
 * The text of a draft (a Tiptap document): the `text` nodes in order, blocks separated by newlines.
 * @param {unknown} draft
 * @returns {string}
 */
export function draftText(draft) {
  if (!draft || typeof draft !== 'object') return '';
  /** @param {any} node @returns {string} */
  const inline = (node) => {
    if (!node || typeof node !== 'object') return '';
    if (node.type === 'text' && typeof node.text === 'string') return node.text;
    return Array.isArray(node.content) ? node.content.map(inline).join('') : '';
  };
  const doc = /** @type {any} */ (draft);
  // A document's top-level nodes are its blocks (paragraphs, headings…): one line each.
  if (Array.isArray(doc.content) && doc.type !== 'text') return doc.content.map(inline).join('\n');
  return inline(doc);
}

/**
 * A Tiptap document holding `text` (one paragraph per line), or `null` for an empty text.
 * @param {string} text
 * @returns {import('./index.js').DraftJson | null}
 */
export function draftFromText(text) {
  if (text === '') return null;
  return {
    type: 'doc',
    content: text.split('\n').map((line) => ({
      type: 'paragraph',
      ...(line === '' ? {} : { content: [{ type: 'text', text: line }] }),
    })),
  };
}

/** A fresh id for messages: `m-` and 16 random hex digits with a time prefix (PROTOCOL.md id rules). */
export function newMessageId() {
  return `m-${Date.now().toString(36)}-${randomHex(8)}`;
}

/**
 * Merges the parts of a multi-part reply (PROTOCOL.md "Bounded replies"): lists are concatenated,
 * objects merged, other values taken from the later part.
 * @param {any} a
 * @param {any} b
 * @returns {any}
 */
export function mergeParts(a, b) {
  if (Array.isArray(a) && Array.isArray(b)) return [...a, ...b];
  if (a && b && typeof a === 'object' && typeof b === 'object' && !Array.isArray(a) && !Array.isArray(b)) {
    /** @type {Record<string, unknown>} */
    const out = { ...a };
    for (const [k, v] of Object.entries(b)) out[k] = k in a ? mergeParts(a[k], v) : v;
    return out;
  }
  return b;
}

/**
 * A connection to chatsync, with reconnection, an offline queue and a local model of the user's chats.
 * Events (`on(type, handler)`): every server message type (handler gets the payload and the envelope),
 * `status` (the new {@link ChatSyncClient#status}), `change` (the local model changed; argument: the
 * chat id or `null`), `stream` (a stream opened, grew or ended), `closed` (closed for good:
 * `{code, reason}`), `sent` (every frame sent, for debugging and tests).
 */
export class ChatSyncClient extends Emitter {
  /** @param {import('./index.js').ClientOptions} options */
  constructor(options) {
    super();
    if (!options || !options.token) throw new TypeError('ChatSyncClient: a token is required');
    if (!options.deviceId) throw new TypeError('ChatSyncClient: a deviceId is required');
    this.options = {
      requestTimeoutMs: 30_000,
      keepaliveMs: 25_000,
      connectTimeoutMs: 20_000,
      autoSync: true,
      ...options,
      backoff: { initialMs: 500, maxMs: 30_000, factor: 2, jitter: 0.5, ...(options.backoff ?? {}) },
    };
    this.url = options.url ?? defaultUrl();
    // Checked here: in `_open` (async, not awaited) a malformed url would be an unhandled rejection (in
    // Node, the end of the process) and the client would stay `connecting`.
    let scheme = '';
    try {
      scheme = new URL(this.url).protocol;
    } catch {}
    // (http: and https: too: the WebSocket standard takes them for ws: and wss:.)
    if (!['ws:', 'wss:', 'http:', 'https:'].includes(scheme)) {
      throw new TypeError('ChatSyncClient: url must be an absolute ws:// or wss:// URL');
    }
    /** @type {any} */
    this.WebSocketImpl = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    if (!this.WebSocketImpl) throw new TypeError('ChatSyncClient: no WebSocket implementation (pass options.WebSocket)');
    /** @type {import('./index.js').Status} */
    this.status = 'idle';
    /** @type {import('./index.js').Connected | null} the greeting of the current (or last) connection */
    this.connected = null;
    /** @type {Map<string, import('./index.js').ChatState>} */
    this.chats = new Map();
    /** @type {Map<string, Set<'title' | 'draft'>>} components to fetch again at the next sync */
    this._stale = new Map();
    /** Deleted chat ids (never reused; late events for them are ignored). */
    this.deleted = new Set();
    /**
     * Per chat, the `messages_v` of the sync entry whose `unread_count` the model took: that count covers
     * the messages up to it, so a broadcast of one of them arriving later (stored before the sync's
     * snapshot, broadcast after it) is not counted again.
     * @type {Map<string, number>}
     */
    this._unreadCovers = new Map();
    this.streams = new StreamAssembler();
    // A queue per tab (its own key under this one), adopting those of tabs that are gone: two tabs on
    // one `localStorage` never overwrite each other's (see OfflineQueue#adopt).
    // Per device id (an older SDK's key), and per user within it: each stored queue names its user (see
    // OfflineQueue#owner), so that a user signing in after another on this device id never sends the
    // other's queued edits.
    this.queue = new OfflineQueue(options.storage ?? null, options.storageKey ?? `chatsync.offline.${options.deviceId}`, {
      perTab: true,
      locks: options.locks,
      owner: options.userId ?? null,
    });
    /** The chat the user looks at: its messages come with the initial sync (`immediate_view_chat_id`). */
    this.activeChatId = options.activeChatId ?? null;
    /** @type {Map<string, {type: string, finals: string[], resolve: Function, reject: Function, parts: any, timer: any, arm: () => any, sent: Record<string, unknown>}>} */
    this._pending = new Map();
    this._nextRequest = 0;
    /** When the last server frame arrived (ms since the epoch; see `_startKeepalive`). */
    this._lastFrameAt = 0;
    this._attempt = 0;
    /** @type {any} */
    this._socket = null;
    /** @type {any} */
    this._retryTimer = null;
    /** @type {any} */
    this._keepaliveTimer = null;
    /** @type {any} bounds the wait for the greeting of a connection attempt (see `_open`) */
    this._connectTimer = null;
    /** @type {any} */
    this._flushTimer = null;
    this._flushAttempt = 0;
    /**
     * The stored messages of completed streams still to fetch (`stream_completed` comes with no message),
     * by chat and `seq`; `sending`: a `get_chat_messages` for it is out (see `_fetchCompleted`).
     * @type {Map<string, {chat_id: string, seq: number, sending: boolean}>}
     */
    this._toFetch = new Map();
    /** @type {any} the backoff before fetching them again after a transient failure */
    this._fetchTimer = null;
    this._fetchAttempt = 0;
    /** @type {Set<string>} queued messages being sent (chat id and message id, see `_sendQueued`) */
    this._sendingMessages = new Set();
    /** @type {Set<{chat_id: string, type: string, value: unknown, version_before_edit: number}>} live writes sent and not answered, in the order sent (see `_write`) */
    this._liveWrites = new Set();
    /** @type {Promise<void>} The flush of offline changes running or last run (see `_flushChanges`). */
    this._changesFlushed = Promise.resolve();
    this._closedByUser = false;
    /** @type {string | null} the fatal close reason retried once with a fresh token (see `_onClose`) */
    this._fatalRetried = null;
    /** Counts `_open` calls and `close()`s: an `_open` that awaited its token while another began (or a close) gives up. */
    this._generation = 0;
    /** Whether a sync completed on this load (see `_rebaseUnsynced`). */
    this._synced = false;
    this._onOnline = () => this.reconnect();
  }

  /**
   * Opens the connection (and keeps it open: reconnects after every loss until {@link close}).
   * Resolves once connected and synced; rejects if the server refuses the credentials.
   * @returns {Promise<import('./index.js').Connected>}
   */
  connect() {
    if (this.status === 'online') return Promise.resolve(/** @type {import('./index.js').Connected} */ (this.connected));
    this._closedByUser = false;
    this.queue.hold();
    if (typeof globalThis.addEventListener === 'function') globalThis.addEventListener('online', this._onOnline);
    const ready = new Promise((resolve, reject) => {
      const offStatus = this.on('status', (/** @type {string} */ s) => {
        if (s === 'online') {
          offStatus();
          offClosed();
          resolve(this.connected);
        }
      });
      const offClosed = this.on('closed', (/** @type {{code: number, reason: string}} */ c) => {
        offStatus();
        offClosed();
        reject(new ChatSyncError('closed', `connection closed: ${c.code} ${c.reason}`, c));
      });
    });
    if (this.status === 'idle' || this.status === 'closed') this._open();
    return /** @type {Promise<import('./index.js').Connected>} */ (ready);
  }

  /**
   * Closes the connection for good (no reconnect). Pending requests reject with `closed`.
   * @param {number} [code]
   * @param {string} [reason]
   */
  close(code = 1000, reason = 'bye') {
    this._closedByUser = true;
    this._generation += 1;
    clearTimeout(this._retryTimer);
    clearTimeout(this._flushTimer);
    this._flushTimer = null;
    clearTimeout(this._fetchTimer);
    this._fetchTimer = null;
    clearTimeout(this._connectTimer);
    this._stopKeepalive();
    if (typeof globalThis.removeEventListener === 'function') globalThis.removeEventListener('online', this._onOnline);
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      try {
        socket.close(code, reason);
      } catch {
        // Already closing.
      }
    }
    this._failPending('closed', 'the client was closed');
    // What is still queued is in storage, for the next client (a reload) to adopt.
    this.queue.release();
    this._setStatus('closed');
    this.emit('closed', { code, reason });
  }

  /**
   * Drops the current socket as a network loss would (the client then reconnects with backoff). For
   * tests and the demo's "simulate offline" button.
   */
  dropConnection() {
    const socket = this._socket;
    if (!socket) return;
    try {
      socket.close(4000, 'dropped by the client');
    } catch {
      // Already closing.
    }
    // Offline from now on, without waiting for the close handshake (its event is then ignored).
    this._onClose(4000, 'dropped by the client');
  }

  /**
   * Reconnects now (resetting the backoff) when waiting between attempts; for an app's "retry" button or
   * its own network detection. Browsers' `online` event does the same by itself.
   */
  reconnect() {
    if (this.status === 'offline') this._reconnectNow();
  }

  /** Whether requests can be sent now. */
  get isOpen() {
    return !!this._socket && this.connected !== null && (this.status === 'online' || this.status === 'syncing');
  }

  /**
   * Sends a request and resolves with its reply (`{type, payload}`; multi-part replies joined). Rejects
   * with a {@link ChatSyncError}: the server's error code, or `disconnected` / `timeout` / `closed`.
   * @param {string} type
   * @param {Record<string, unknown>} [payload]
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<{type: string, payload: any}>}
   */
  request(type, payload = {}, options = {}) {
    if (!this.isOpen) return Promise.reject(new ChatSyncError('disconnected', 'not connected'));
    const request_id = `r${++this._nextRequest}`;
    const frame = { type, payload, request_id };
    let data;
    try {
      data = this._encode(frame);
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise((resolve, reject) => {
      const timeoutMs = options.timeoutMs ?? this.options.requestTimeoutMs;
      // Armed again by every part of a multi-part reply (see `_onFrame`): the bound is on the silence
      // between parts, not on the whole reply, which may be long and steady.
      const arm = () =>
        timeoutMs > 0
          ? setTimeout(() => {
              this._pending.delete(request_id);
              reject(new ChatSyncError('timeout', `no reply to ${type} within ${timeoutMs} ms`));
            }, timeoutMs)
          : null;
      this._pending.set(request_id, { type, finals: FINAL_REPLIES[type] ?? [], resolve, reject, parts: null, timer: arm(), arm, sent: payload });
      this._sendFrame(frame, data);
    });
  }

  /**
   * Sends a message without waiting for a reply. Returns false when not connected; throws a
   * {@link ChatSyncError} `limit_exceeded` when the frame is larger than `max_frame_bytes`.
   * @param {string} type
   * @param {Record<string, unknown>} [payload]
   */
  send(type, payload = {}) {
    if (!this.isOpen) return false;
    const frame = { type, payload };
    this._sendFrame(frame, this._encode(frame));
    return true;
  }

  /** The chats, most recently edited first (ties: the server's order). */
  chatList() {
    return [...this.chats.values()].sort(
      (a, b) =>
        b.last_edited_overall_timestamp - a.last_edited_overall_timestamp ||
        (a.order ?? Infinity) - (b.order ?? Infinity) ||
        (a.chat_id < b.chat_id ? -1 : 1),
    );
  }

  /**
   * Refuses a write to a chat this client knows deleted, before it touches the model: the server would
   * answer `not_found` (an id is never reused), and `chat()` would meanwhile have brought the chat back
   * into `chats` as an empty one (offline, the edit would also wait in the queue for its refusal).
   * @param {string} chatId
   */
  _refuseDeleted(chatId) {
    if (!this.deleted.has(chatId)) return null;
    return Promise.reject(new ChatSyncError('not_found', 'Chat not found.', { chat_id: chatId }));
  }

  /**
   * The local state of a chat, created (empty, not yet known to the server) when absent.
   * @param {string} chatId
   * @returns {import('./index.js').ChatState}
   */
  chat(chatId) {
    let chat = this.chats.get(chatId);
    if (!chat) {
      chat = {
        chat_id: chatId,
        title: '',
        draft_json: null,
        versions: { messages_v: 0, title_v: 0, draft_v: 0 },
        last_edited_overall_timestamp: 0,
        unread_count: 0,
        read_seq: 0,
        messages: [],
        order: undefined,
        known: false,
      };
      this.chats.set(chatId, chat);
    }
    return chat;
  }

  /**
   * `initial_sync_request` with the versions this client holds; applies the reply to the local model.
   * The versions of a user with many chats may not all fit in one frame (`max_frame_bytes`): then the
   * chat in view, the chats with queued edits and the most recently edited ones are named, up to what
   * fits, and the server sends the others in full (as new).
   * @returns {Promise<import('./index.js').InitialSyncResponse>}
   */
  async sync() {
    /** @type {Record<string, {messages_v: number, title_v: number, draft_v: number}>} */
    const chat_versions = {};
    /** @type {Record<string, unknown>} */
    const payload = { chat_versions };
    if (this.activeChatId) payload.immediate_view_chat_id = this.activeChatId;
    let room = this._maxFrameBytes - utf8Length(JSON.stringify({ type: 'initial_sync_request', payload, request_id: LONGEST_REQUEST_ID }));
    let count = 0;
    /** @type {string[]} known chats left out of the request */
    const omitted = [];
    const queued = new Set([...this.queue.changes, ...this.queue.inFlight].map((c) => c.chat_id));
    const rank = (/** @type {import('./index.js').ChatState} */ chat) => (chat.chat_id === this.activeChatId ? 0 : queued.has(chat.chat_id) ? 1 : 2);
    for (const chat of this.chatList().filter((c) => c.known).sort((a, b) => rank(a) - rank(b))) {
      // For the chat in view, the messages held without a gap, so that the reply brings the rest.
      const messages_v = chat.chat_id === this.activeChatId ? contiguousSeq(chat) : chat.versions.messages_v;
      /** @type {any} */
      const v = { ...chat.versions, messages_v };
      // A component whose local value the server refused: a missing version counts as -1, so the
      // reply brings the server's value.
      for (const component of this._stale.get(chat.chat_id) ?? []) delete v[`${component}_v`];
      const size = utf8Length(`${JSON.stringify(chat.chat_id)}:${JSON.stringify(v)},`);
      if (omitted.length === 0 && count < MAX_SYNC_CHATS && size <= room) {
        chat_versions[chat.chat_id] = v;
        room -= size;
        count += 1;
      } else {
        omitted.push(chat.chat_id);
      }
    }
    const stale = this._stale;
    const rechecks = [...this.queue.recheck];
    const openBefore = this.streams.open();
    this.streams.buffer(true);
    let reply;
    try {
      reply = await this.request('initial_sync_request', payload);
    } finally {
      this.streams.buffer(false);
    }
    if (this._stale === stale) this._stale = new Map();
    this._rebaseUnsynced();
    // `chat_ids_to_delete` names only chats of the request: a chat left out (known to the server before
    // the request) and missing from the server's order was deleted, as a named one would have been
    // (edits or messages of it still queued are then refused with `not_found`).
    if (omitted.length > 0 && Array.isArray(reply.payload.server_chat_order)) {
      const kept = new Set(reply.payload.server_chat_order);
      for (const id of omitted.filter((id) => !kept.has(id))) {
        this._forget(id, true);
        this.emit('change', id);
      }
    }
    // Those still kept: a live write of the component confirmed meanwhile has made one moot (see `_write`).
    const recheck = rechecks.filter((c) => this.queue.recheck.includes(c));
    this.queue.dropRechecks(recheck);
    for (const change of recheck) this._recheckConflict(change);
    // A chat created here (not known: an edit of a chat id new to this client) that the server does not
    // list: its edits were refused or met a chat another device created and deleted before this sync.
    // Nothing of it left (queued, on its way, a message, a stream), it leaves the model, where no sync
    // would ever remove it (a sync names known chats only).
    if (reply.payload.more !== true && Array.isArray(reply.payload.server_chat_order)) {
      const listed = new Set(reply.payload.server_chat_order);
      for (const chat of [...this.chats.values()]) {
        if (chat.known || listed.has(chat.chat_id)) continue;
        this._dropUnknown(chat.chat_id, false);
        if (!this.chats.has(chat.chat_id)) this.emit('change', chat.chat_id);
      }
    }
    // A stream open here before the request and missing from `active_streams` ended unseen (while
    // disconnected): how is unknown, so it ends as cancelled, reason `ended_unseen` (a completed one's
    // message comes with the chat's messages). A stream started after the request is left alone.
    const listed = Array.isArray(reply.payload.active_streams) ? reply.payload.active_streams : [];
    const active = new Set(listed.filter((/** @type {unknown} */ a) => a && typeof a === 'object').map((/** @type {import('./index.js').ActiveStream} */ a) => StreamAssembler.key(a.chat_id, a.stream_id)));
    for (const s of openBefore) {
      if (active.has(StreamAssembler.key(s.chat_id, s.stream_id)) || this.streams.get(s.chat_id, s.stream_id) !== s) continue;
      this.streams.endUnseen(s.chat_id, s.stream_id);
      this.emit('stream', s);
      // The empty chat only this stream brought (a stream in a new chat id: the server creates the chat
      // when its message is stored, and this sync did not bring it) goes with it, as on `stream_cancelled`.
      if (this.streams.open(s.chat_id).length === 0) this._dropUnknown(s.chat_id, false);
      this.emit('change', s.chat_id);
    }
    return reply.payload;
  }

  /**
   * A queued edit that conflicted, and that carries the values of live writes whose replies never arrived
   * (`written`, on the same base, oldest first): if the server's component holds one of those values
   * (other than the edit's own) and is at most as many versions past that base as there are remembered
   * writes up to and including that value, this device's own writes explain the conflict, so the edit
   * made on top of them is queued again on the server's version (else the conflict stands: the server's
   * value stays).
   *
   * Why this is safe (it never takes another device's value for this device's own): the edit is sent
   * again only when the value the server holds now is one this device wrote on that base; sent on the
   * server's version, it overwrites that value only, and any write made after it (by anyone) still makes
   * it a conflict. A write of another device before that value was overwritten by it already: this
   * device's live writes are not version-checked (a retried offline one is, and then could not have
   * been applied after another write at all). The bound on the versions keeps a coincidence (another
   * device writing a common value such as an empty title or a cleared draft, versions later) from
   * passing for one of this device's writes: each of this device's remembered writes moves the version
   * once at most (a live write is sent once; its retry is checked against the base, so it conflicts
   * once anything, that live write included, was applied), and they are applied in the order they were
   * made (one connection's requests in order; a retry after the connection that carried the write is
   * gone), so the value at index `i` of `written` is the last of at most `i + 1` of them. With one
   * version past the base this is the rule of a single lost write: any remembered value. A value written
   * twice is remembered once, at its newest place: such histories are refused (the conflict stands),
   * never wrongly accepted.
   * @param {import('./index.js').OfflineChange} change
   */
  _recheckConflict(change) {
    const chat = this.chats.get(change.chat_id);
    const isTitle = componentOf(change.type) === 'title';
    if (!chat) return;
    const version = isTitle ? chat.versions.title_v : chat.versions.draft_v;
    const past = version - change.version_before_edit;
    const server = canonicalJson(isTitle ? chat.title : chat.draft_json);
    // The server holds the edit's own value (e.g. another tab sent the same edit, adopted): no loss.
    if (server === canonicalJson(change.value)) return;
    // The newest place of the server's value among the remembered writes (each is remembered once).
    const index = (change.written ?? []).map(canonicalJson).lastIndexOf(server);
    if (past < 1 || index < 0 || past > index + 1) {
      // Lost, unless a later edit of the component is queued (it meets its own conflict, or wins).
      const later = [...this.queue.changes, ...this.queue.inFlight].some((c) => c.chat_id === change.chat_id && componentOf(c.type) === componentOf(change.type));
      if (!later) this._conflict(change, { ...chat.versions });
      return;
    }
    const queued = this.queue.requeue(change, version);
    if (isTitle) chat.title = /** @type {string} */ (queued.value);
    else chat.draft_json = /** @type {import('./index.js').DraftJson | null} */ (queued.value);
    this.emit('change', chat.chat_id);
    // Online (an app's own sync()), nothing else would send it before the next reconnect.
    this._retrySoon();
  }

  /**
   * A queued edit that met a conflict and is dropped (the server's value stays): `change_conflict`, so
   * that the app can tell the user or apply it again.
   * @param {import('./index.js').OfflineChange} change
   * @param {import('./index.js').Versions} versions the model's, after the sync that brought the server's value
   */
  _conflict(change, versions) {
    this.emit('change_conflict', { chat_id: change.chat_id, change_id: change.change_id, type: change.type, value: change.value, version_before_edit: change.version_before_edit, versions });
  }

  /**
   * Sets a chat's title (creating the chat when new). Offline, the edit is queued.
   * @param {string} chatId
   * @param {string} title
   * @returns {Promise<import('./index.js').WriteResult>}
   */
  updateTitle(chatId, title) {
    const refused = this._refuseDeleted(chatId);
    if (refused) return refused;
    const chat = this.chat(chatId);
    const before = chat.title;
    chat.title = title;
    this.emit('change', chatId);
    return this._write(
      { chat_id: chatId, type: 'title', value: title, version_before_edit: chat.versions.title_v },
      () => this.request('update_title', { chat_id: chatId, new_title: title }),
      () => {
        chat.title = before;
      },
    );
  }

  /**
   * Sets a chat's draft (a Tiptap document, or `null` to clear). Offline, the edit is queued.
   * @param {string} chatId
   * @param {import('./index.js').DraftJson | null} draftJson
   * @returns {Promise<import('./index.js').WriteResult>}
   */
  updateDraft(chatId, draftJson) {
    const refused = this._refuseDeleted(chatId);
    if (refused) return refused;
    const chat = this.chat(chatId);
    const before = chat.draft_json;
    chat.draft_json = draftJson;
    this.emit('change', chatId);
    return this._write(
      { chat_id: chatId, type: 'draft', value: draftJson, version_before_edit: chat.versions.draft_v },
      () => this.request('update_draft', { chat_id: chatId, draft_json: draftJson }),
      () => {
        chat.draft_json = before;
      },
    );
  }

  /**
   * Deletes a chat's draft. Offline, the deletion is queued.
   * @param {string} chatId
   * @returns {Promise<import('./index.js').WriteResult>}
   */
  deleteDraft(chatId) {
    const refused = this._refuseDeleted(chatId);
    if (refused) return refused;
    const chat = this.chat(chatId);
    const before = chat.draft_json;
    chat.draft_json = null;
    this.emit('change', chatId);
    return this._write(
      { chat_id: chatId, type: 'delete_draft', value: null, version_before_edit: chat.versions.draft_v },
      () => this.request('delete_draft', { chat_id: chatId }),
      () => {
        chat.draft_json = before;
      },
    );
  }

  /**
   * Adds a message to a chat. It shows at once in the local model (`pending: true`); offline it waits in
   * the queue and is sent on reconnect with the same `message_id` (so it is stored once).
   * @param {string} chatId
   * @param {string | Record<string, unknown>} content
   * @param {{messageId?: string, tempId?: string}} [options]
   * @returns {Promise<import('./index.js').WriteResult>}
   */
  async sendMessage(chatId, content, options = {}) {
    const refused = this._refuseDeleted(chatId);
    if (refused) return refused;
    const message_id = options.messageId ?? newMessageId();
    /** @type {import('./index.js').PendingMessage} */
    const pending = {
      chat_id: chatId,
      message: { message_id, content, timestamp: new Date().toISOString(), ...(options.tempId ? { temp_id: options.tempId } : {}) },
    };
    const chat = this.chat(chatId);
    if (!chat.messages.some((m) => m.message_id === message_id)) {
      chat.messages.push({
        message_id,
        seq: null,
        sender_name: 'user',
        content,
        created_at: pending.message.timestamp,
        client_timestamp: pending.message.timestamp,
        pending: true,
      });
    }
    this.queue.addMessage(pending);
    this.emit('change', chatId);
    if (this.status !== 'online') return { queued: true };
    // An earlier message of this chat waiting in the queue for its retry (a transient failure) goes first:
    // this one waits behind it (the retry sends the queue in order), else it would be stored before it.
    const queued = this.queue.messages;
    const earlier = queued.slice(0, queued.findIndex((m) => m.chat_id === chatId && m.message.message_id === message_id));
    if (earlier.some((m) => m.chat_id === chatId && !this._sendingMessages.has(messageKey(m)))) {
      this._retrySoon();
      return { queued: true };
    }
    try {
      const reply = await this._sendQueued(pending);
      // Also when the model took no note of the confirmation (its chat deleted meanwhile: the message
      // committed just before): stored, so never sent again.
      this.queue.confirmMessage(chatId, message_id);
      return { queued: false, reply };
    } catch (e) {
      if (isTransient(e)) {
        this._retrySoon();
        return { queued: true };
      }
      this.queue.confirmMessage(chatId, message_id);
      chat.messages = chat.messages.filter((m) => !(m.pending && m.message_id === message_id));
      this._dropUnknown(chatId, isNotFound(e));
      this.emit('change', chatId);
      throw e;
    }
  }

  /**
   * Loads a chat's messages after the ones held locally (every page, until one does not extend the run of
   * seqs held) into the local model.
   * @param {string} chatId
   * @returns {Promise<import('./index.js').Message[]>}
   */
  async loadMessages(chatId) {
    // Not `chat()`: a chat the server does not have (`not_found`) is not brought into the model.
    let previous = -1;
    for (;;) {
      const held = this.chats.get(chatId);
      const after_seq = held ? contiguousSeq(held) : 0;
      // A page that did not extend the run held (its first message not the next seq, or entries that
      // did not parse) would be asked for again and again: stop with what is held.
      if (after_seq === previous) break;
      previous = after_seq;
      const reply = await this.request('get_chat_messages', { chat_id: chatId, after_seq });
      if (!reply.payload.has_more || reply.payload.messages.length === 0) break;
    }
    return this.chats.get(chatId)?.messages ?? [];
  }

  /**
   * Deletes a chat (for good: its id is never reused).
   * @param {string} chatId
   */
  deleteChat(chatId) {
    return this.request('delete_chat', { chat_id: chatId });
  }

  /**
   * Moves the read marker of a chat to `seq` (default: its last message).
   * @param {string} chatId
   * @param {number} [seq]
   */
  markRead(chatId, seq) {
    const refused = this._refuseDeleted(chatId);
    if (refused) return refused;
    // Not `chat()`: a chat the server does not have (`not_found`) is not brought into the model.
    const chat = this.chats.get(chatId);
    // The last message known: one held past a gap too (`messages_v` stops before the gap).
    const last = chat ? chat.messages.reduce((max, m) => Math.max(max, m.seq ?? 0), chat.versions.messages_v) : 0;
    return this.request('mark_read', { chat_id: chatId, seq: seq ?? last });
  }

  /**
   * Asks the server to stop a streamed reply.
   * @param {string} chatId
   * @param {string} streamId
   */
  cancelStream(chatId, streamId) {
    return this.request('cancel_stream', { chat_id: chatId, stream_id: streamId });
  }

  /** Round trip to the server. */
  ping() {
    return this.request('ping');
  }

  // ---------------------------------------------------------------------------------------------
  // Connection loop

  async _open() {
    const generation = ++this._generation;
    clearTimeout(this._retryTimer);
    this._setStatus(this._attempt === 0 && this.connected === null ? 'connecting' : 'reconnecting');
    let token;
    try {
      token = typeof this.options.token === 'function' ? await this.options.token() : this.options.token;
    } catch (e) {
      if (generation !== this._generation) return;
      this.emit('token_error', e);
      this._scheduleReconnect();
      return;
    }
    // Closed, or closed and connected again, while the token was awaited: this attempt is stale.
    if (this._closedByUser || generation !== this._generation) return;
    const url = new URL(this.url);
    url.searchParams.set('token', token);
    url.searchParams.set('device_id', this.options.deviceId);
    let socket;
    try {
      socket = new this.WebSocketImpl(url.toString());
    } catch (e) {
      this.emit('socket_error', e);
      this._scheduleReconnect();
      return;
    }
    this._socket = socket;
    this.connected = null;
    // An attempt on a network that died mid-handshake may get neither a greeting nor a close for minutes
    // (the keepalive only starts with the greeting): it is dropped, and retried with backoff.
    clearTimeout(this._connectTimer);
    const connectTimeoutMs = this.options.connectTimeoutMs;
    if (connectTimeoutMs && connectTimeoutMs > 0) {
      this._connectTimer = setTimeout(() => {
        if (this._socket === socket && this.connected === null) this.dropConnection();
      }, connectTimeoutMs);
    }
    socket.addEventListener('message', (/** @type {{data: unknown}} */ ev) => {
      if (this._socket === socket) this._onFrame(ev.data);
    });
    socket.addEventListener('close', (/** @type {{code: number, reason: string}} */ ev) => {
      if (this._socket === socket) this._onClose(ev.code, ev.reason);
    });
    socket.addEventListener('error', () => {
      // A 'close' event follows every 'error'.
    });
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  _onClose(code, reason) {
    this._socket = null;
    clearTimeout(this._connectTimer);
    this._stopKeepalive();
    this._failPending('disconnected', `connection closed: ${code} ${reason ?? ''}`.trim());
    if (this._closedByUser) return;
    if (code === 1008 && FATAL_REASONS.has(reason)) {
      // No token fixes a device id the server refuses. With a token function, a refused token may be
      // replaced by the next call: one retry, and the same reason again ends it.
      const always = reason === 'Invalid device id' || reason.startsWith('Device mismatch');
      if (always || typeof this.options.token !== 'function' || this._fatalRetried === reason) {
        this._fatalRetried = null;
        this._closedByUser = true;
        this._stopKeepalive();
        clearTimeout(this._retryTimer);
        // As `close()`: no timer or listener left behind (a process can exit, a page drop the client).
        clearTimeout(this._flushTimer);
        this._flushTimer = null;
        clearTimeout(this._fetchTimer);
        this._fetchTimer = null;
        if (typeof globalThis.removeEventListener === 'function') globalThis.removeEventListener('online', this._onOnline);
        this.queue.release();
        this._setStatus('closed');
        this.emit('closed', { code, reason });
        return;
      }
      this._fatalRetried = reason;
    }
    this.emit('disconnected', { code, reason });
    if (code === 1008 && reason === 'Token expired') this._attempt = 0;
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this._closedByUser) return;
    this._setStatus('offline');
    const delay = backoffDelay(this._attempt, this.options.backoff, this.options.random);
    this._attempt += 1;
    this.emit('reconnect_scheduled', { attempt: this._attempt, delay });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  _reconnectNow() {
    this._attempt = 0;
    clearTimeout(this._retryTimer);
    this._open();
  }

  /** @param {unknown} data */
  _onFrame(data) {
    let envelope;
    try {
      envelope = JSON.parse(typeof data === 'string' ? data : String(data));
    } catch {
      this.emit('protocol_error', data);
      return;
    }
    if (!envelope || typeof envelope.type !== 'string') {
      this.emit('protocol_error', data);
      return;
    }
    const { type, request_id } = envelope;
    const payload = envelope.payload ?? {};
    this._lastFrameAt = Date.now();
    if (type === 'connected') {
      // The backoff is reset only once online (see `_afterConnect`): a server that greets and then fails
      // the sync, or closes, must not be retried at once every time.
      this.connected = payload;
      clearTimeout(this._connectTimer);
      // Before anything is sent: the queue is this user's from now on (another user's, queued under
      // other credentials, is set aside, and so is the model of that user's chats).
      if (typeof payload.user_id === 'string' && payload.user_id !== '') {
        const previous = this.queue.owner;
        this.queue.own(payload.user_id);
        if (previous !== null && previous !== payload.user_id) this._forgetUser();
      }
      this._startKeepalive();
      this.emit('connected', payload, envelope);
      this._afterConnect();
      return;
    }
    try {
      this._apply(type, payload, typeof request_id === 'string' ? request_id : null);
    } catch (e) {
      // A malformed frame (a field missing or of the wrong type) leaves the model as it was and is
      // reported; it must not throw out of the socket's event handler (in Node, a crash of the process).
      this.emit('protocol_error', data, e);
    }
    this.emit(type, payload, envelope);
    this.emit('message', envelope);
    if (request_id === undefined) return;
    const pending = this._pending.get(request_id);
    if (!pending) return;
    if (type === 'error' || type === 'initial_sync_error') {
      this._pending.delete(request_id);
      clearTimeout(pending.timer);
      pending.reject(new ChatSyncError(payload.code ?? 'internal', payload.message ?? 'error', payload));
      return;
    }
    if (pending.finals.length > 0 && !pending.finals.includes(type)) return;
    pending.parts = pending.parts === null ? payload : mergeParts(pending.parts, payload);
    if (payload.more === true) {
      clearTimeout(pending.timer);
      pending.timer = pending.arm();
      return;
    }
    this._pending.delete(request_id);
    clearTimeout(pending.timer);
    const merged = { ...pending.parts };
    delete merged.more;
    pending.resolve({ type, payload: merged });
  }

  /**
   * After `connected`: flush the offline edits, sync, re-send queued messages, then `online`.
   * @param {number} [retry] how many times a `rate_limited` step was retried on this connection
   */
  async _afterConnect(retry = 0) {
    this._setStatus('syncing');
    const socket = this._socket;
    try {
      // The queues of tabs closed since (or still being adopted since the start) are sent too.
      await this.queue.adopted;
      await this.queue.adopt();
      if (this._socket !== socket) return;
      await this._flushChanges();
      if (this.options.autoSync) await this.sync();
      // Then the queued messages, and whatever was queued meanwhile (writes wait for `online`). Edits
      // queued while the sync was out may meet a conflict or a refusal: the server's value of that
      // component is asked for again on this connection (see `_recheckConflict`), not at the next one.
      for (;;) {
        while (this.queue.size > 0) {
          await this._flushChanges();
          await this._flushMessages();
        }
        if (!this.options.autoSync || (this.queue.recheck.length === 0 && this._stale.size === 0)) break;
        await this.sync();
      }
      if (this._socket === socket) {
        this._attempt = 0;
        this._fatalRetried = null;
        this._setStatus('online');
        this.emit('synced');
        // Messages of completed streams whose fetch the last connection lost: the sync brings messages
        // for the chat in view only (and the chat's `messages_v` counts them already).
        this._fetchCompleted();
      }
    } catch (e) {
      if (e instanceof ChatSyncError && (e.code === 'disconnected' || e.code === 'closed')) return;
      if (e instanceof ChatSyncError && e.code === 'rate_limited' && this._socket === socket) {
        // This connection's rate: it refills as time passes, so the steps start over on it after a
        // backoff (a new connection would only cost the server a connect and an authentication more).
        const delay = backoffDelay(retry, this.options.backoff, this.options.random);
        setTimeout(() => {
          if (this._socket === socket) void this._afterConnect(retry + 1);
        }, delay);
        return;
      }
      // A failed sync (e.g. `unavailable`): drop the connection and retry with backoff.
      this.emit('sync_error', e);
      if (this._socket === socket) {
        this._attempt = Math.max(this._attempt, 1);
        this.dropConnection();
      }
    }
  }

  /**
   * Sends the queued offline changes, one flush at a time: a flush started while another runs (a retry
   * timer, the connect loop) waits for it. Two batches of one chat's component in flight at once, lost
   * together, would be put back in the wrong order and the newer edit dropped for the older.
   * @returns {Promise<void>}
   */
  _flushChanges() {
    const run = this._changesFlushed.catch(() => {}).then(() => this._flushChangesNow());
    this._changesFlushed = run;
    return run;
  }

  async _flushChangesNow() {
    const max = this.connected?.limits?.max_offline_changes ?? 500;
    const empty = utf8Length(JSON.stringify({ type: 'sync_offline_changes', payload: { changes: [] }, request_id: LONGEST_REQUEST_ID }));
    // Edits made on a chat not synced yet wait for the next sync (see `_rebaseUnsynced`): this load's
    // before its first one, and those adopted from a tab that was gone before its own.
    const hold = this.options.autoSync;
    for (;;) {
      const sendable = hold ? this.queue.changes.filter((c) => !c.base_unknown) : this.queue.changes;
      if (sendable.length === 0) break;
      // As many changes as fit in one frame (and in max_offline_changes); one that cannot fit even alone
      // is refused here, as the server refuses a change it cannot take.
      let count = 0;
      let bytes = empty;
      while (count < Math.min(max, sendable.length)) {
        bytes += utf8Length(JSON.stringify(wireChange(sendable[count]))) + (count > 0 ? 1 : 0);
        if (bytes > this._maxFrameBytes) break;
        count += 1;
      }
      if (count === 0) {
        const change = sendable[0];
        this.queue.settle([change]);
        const error = new ChatSyncError('limit_exceeded', `The offline ${change.type} change is larger than max_frame_bytes (${this._maxFrameBytes}).`, {
          limit: 'max_frame_bytes',
          chat_id: change.chat_id,
          change_id: change.change_id,
        });
        this._refuseChange({ change_id: change.change_id, chat_id: change.chat_id, type: change.type }, error);
        continue;
      }
      await this._sendBatch(this.queue.take(sendable.slice(0, count)));
    }
  }

  /**
   * After a sync (the first of this load, or one after adopting another tab's queue): the queued edits of chats that were not synced when they were
   * made (`base_unknown`: after a reload, offline, the model is empty and the version seen before the
   * edit unknown) move to the version the sync brought, so that the user's edit wins over the value
   * held before (last writer wins), and show in the model again. A chat the server does not have stays
   * on 0 (it is created).
   */
  _rebaseUnsynced() {
    this._synced = true;
    let moved = false;
    for (const c of this.queue.changes) {
      if (!c.base_unknown) continue;
      delete c.base_unknown;
      moved = true;
      const chat = this.chats.get(c.chat_id);
      if (!chat || !chat.known) continue;
      c.version_before_edit = componentOf(c.type) === 'title' ? chat.versions.title_v : chat.versions.draft_v;
      if (c.type === 'title') chat.title = /** @type {string} */ (c.value);
      else chat.draft_json = /** @type {import('./index.js').DraftJson | null} */ (c.value);
      this.emit('change', c.chat_id);
    }
    if (moved) this.queue.save();
  }

  /**
   * Sends a batch of offline changes (taken from the queue) and settles it with its results. A batch
   * refused as a whole with `limit_exceeded` (larger than the server takes, whatever its `limits` said)
   * is split in halves, the first sent (and split again if refused) before the second, so that a chat's
   * changes keep their order, down to single changes: only a single change still refused is dropped
   * (`change_rejected`). Every refusal leaves smaller parts, so the splitting ends (at most 2n - 1
   * requests for n changes). On a transient failure, what was not answered goes back to the queue.
   * @param {import('./index.js').OfflineChange[]} batch
   */
  async _sendBatch(batch) {
    /** @type {import('./index.js').OfflineChange[][]} the parts of the batch not yet sent, in order */
    const parts = [batch];
    while (parts.length > 0) {
      const part = /** @type {import('./index.js').OfflineChange[]} */ (parts.shift());
      let reply;
      try {
        reply = await this.request('sync_offline_changes', { changes: part.map(wireChange) });
      } catch (e) {
        if (isTransient(e)) {
          this.queue.restore([...part, ...parts.flat()]);
          throw e;
        }
        if (e instanceof ChatSyncError && e.code === 'limit_exceeded' && part.length > 1) {
          const half = Math.ceil(part.length / 2);
          parts.unshift(part.slice(0, half), part.slice(half));
          continue;
        }
        // Refused as a whole: every change of it is refused, as the server refuses one.
        this.queue.settle(part);
        const error = e instanceof ChatSyncError ? e : new ChatSyncError('internal', String(e));
        for (const c of part) this._refuseChange({ change_id: c.change_id, chat_id: c.chat_id, type: c.type }, error);
        continue;
      }
      // A malformed reply (results not a list, a result that is no object) must not throw here: the part
      // would stay in flight, never sent again.
      const raw = reply.payload.results;
      /** @type {import('./index.js').OfflineResult[]} */
      const results = (Array.isArray(raw) ? raw : []).filter((r) => r && typeof r === 'object' && typeof r.change_id === 'string');
      /** @type {import('./index.js').OfflineChange[]} */
      const rechecks = [];
      for (const r of results) {
        const sent = part.find((c) => c.change_id === r.change_id);
        if (r.status !== 'conflict' || !sent) continue;
        // Maybe a conflict with this device's own write whose reply was lost: the next sync brings the
        // server's value of that component, to tell (see _recheckConflict).
        rechecks.push(sent);
        this._markStale(sent.chat_id, sent.type);
      }
      // An applied draft deletion of a chat id new to the server creates the chat, empty, without a
      // broadcast (PROTOCOL.md §8; other applied changes come with theirs, which make the chat known):
      // the server has it, so the next sync names it (and reports it deleted, should it be).
      for (const r of results) {
        const chat = r.status === 'applied' && r.type === 'delete_draft' && r.chat_id ? this.chats.get(r.chat_id) : undefined;
        if (chat) chat.known = true;
      }
      // Kept with the queue (in its storage: a reload before the next sync loses none of them).
      this.queue.addRechecks(rechecks);
      this.queue.settle(part, results);
      this._applyOfflineResults({ ...reply.payload, results });
      // A change the reply gives no result for: what became of it is unknown, so it is refused as
      // `internal` (change_rejected), and the next sync brings the server's value of its component.
      const unanswered = part.filter((c) => !results.some((r) => r.change_id === c.change_id));
      if (unanswered.length > 0) this.emit('protocol_error', reply.payload, new TypeError('offline_sync_complete: a change without a result'));
      for (const c of unanswered) {
        this._refuseChange({ change_id: c.change_id, chat_id: c.chat_id, type: c.type }, new ChatSyncError('internal', `The server sent no result for the offline ${c.type} change.`, { chat_id: c.chat_id, change_id: c.change_id }));
      }
      this.emit('offline_flushed', reply.payload);
    }
  }

  /**
   * What the results of a flush mean for the model: applied changes came back as broadcasts, conflicts
   * are settled by the next sync (the server's version is newer); a refused change (`error`) left a
   * local value the server never took, so the next sync asks for that component again, and a chat the
   * server never created (nothing of it applied, no message queued) is dropped.
   * @param {import('./index.js').ServerMessages['offline_sync_complete']} result
   */
  _applyOfflineResults(result) {
    for (const r of result.results ?? []) {
      if (r.status !== 'error' || !r.chat_id) continue;
      const code = r.code ?? 'internal';
      this._refuseChange({ change_id: r.change_id, chat_id: r.chat_id, type: r.type }, new ChatSyncError(code, `The server refused the offline ${r.type} change (${code}).`, { ...r }));
    }
  }

  /**
   * A queued change refused for good (by the server, or here when too large to send): see
   * {@link _applyOfflineResults}; emits `change_rejected`.
   * @param {{change_id: string | null, chat_id: string, type: import('./index.js').OfflineResult['type']}} r
   * @param {ChatSyncError} error
   */
  _refuseChange(r, error) {
    const chat = this.chats.get(r.chat_id);
    if (chat) {
      const hasMessages = this.queue.messages.some((m) => m.chat_id === r.chat_id);
      // (A chat where a reply streams stays, unless the server does not have it: see `_dropUnknown`.)
      const streaming = error.code !== 'not_found' && this.streams.open(r.chat_id).length > 0;
      if (!chat.known && !hasMessages && !streaming) {
        this._forget(r.chat_id, error.code === 'not_found');
      } else {
        this._markStale(r.chat_id, r.type);
      }
    }
    this.emit('change_rejected', { ...r, error });
    if (chat) this.emit('change', r.chat_id);
  }

  /**
   * The next sync asks for this component again (a missing version counts as -1).
   * @param {string} chatId
   * @param {string | null} type a change type
   */
  _markStale(chatId, type) {
    const stale = this._stale.get(chatId) ?? new Set();
    stale.add(componentOf(type ?? 'draft'));
    this._stale.set(chatId, stale);
  }

  /**
   * Sends a queued message (marked as being sent meanwhile).
   * @param {import('./index.js').PendingMessage} pending
   */
  async _sendQueued(pending) {
    const key = messageKey(pending);
    this._sendingMessages.add(key);
    try {
      return await this.request('chat_message_added', { chat_id: pending.chat_id, message: pending.message });
    } finally {
      this._sendingMessages.delete(key);
    }
  }

  async _flushMessages() {
    for (const pending of [...this.queue.messages]) {
      try {
        await this._sendQueued(pending);
        this.queue.confirmMessage(pending.chat_id, pending.message.message_id);
      } catch (e) {
        if (isTransient(e)) throw e;
        // Refused for good (deleted chat, too large…): drop it from the queue and the model, and with it
        // a chat the server never created when nothing else of it is left (as a live message's refusal
        // does): edits of it refused before kept it only for this message.
        this.queue.confirmMessage(pending.chat_id, pending.message.message_id);
        const chat = this.chats.get(pending.chat_id);
        if (chat) chat.messages = chat.messages.filter((m) => !(m.pending && m.message_id === pending.message.message_id));
        this._dropUnknown(pending.chat_id, isNotFound(e));
        this.emit('message_rejected', { chat_id: pending.chat_id, message_id: pending.message.message_id, error: e });
        this.emit('change', pending.chat_id);
      }
    }
  }

  /**
   * A write: sent now when online, else (or if the connection drops before the reply) queued as an
   * offline change. A refusal by the server reverts the local edit and rejects. A live write sent while
   * an earlier one of its component waits for its reply (on the same base) moves to the version that
   * one produced once its reply says so: it was made on top of it.
   * @param {{chat_id: string, type: 'title' | 'draft' | 'delete_draft', value: unknown, version_before_edit: number}} change
   * @param {() => Promise<{type: string, payload: any}>} send
   * @param {() => void} revert
   * @returns {Promise<import('./index.js').WriteResult>}
   */
  async _write(change, send, revert) {
    if (this.status !== 'online') {
      // Before the first sync of this load, a chat not known here may well exist on the server (after a
      // reload the model is empty): the version this edit was made on is unknown (see `_rebaseUnsynced`).
      const unknown = !this._synced && !this.chats.get(change.chat_id)?.known;
      this.queue.addChange(unknown ? { ...change, base_unknown: true } : change);
      this._retrySoon();
      return { queued: true };
    }
    // An earlier edit of this component waiting in the queue (a transient failure while online, its retry
    // not sent yet) is superseded by this one, which the user made over it: dropped, else, sent after
    // this one, it would undo it or meet it as a conflict (a `change_conflict` for a value the user wrote
    // over). (Joined with it instead, this one would be checked against that edit's older base, and lost
    // to a write another device made since, which this device had seen.) One already in flight was sent
    // before this one, which the server applies after it.
    this.queue.dropChanges((c) => c.chat_id === change.chat_id && componentOf(c.type) === componentOf(change.type));
    this._liveWrites.add(change);
    try {
      const reply = await send();
      // Conflicts of this component waiting for the next sync to tell (see `_recheckConflict`) are of edits
      // sent before this write (their results came before its reply), which the server applied after
      // them: no loss, whatever they met.
      this.queue.dropRechecks(this.queue.recheck.filter((r) => r.chat_id === change.chat_id && componentOf(r.type) === componentOf(change.type)));
      // Live writes of the component sent after this one, on its base, were made on top of it: should
      // one of them fail and be queued, it is checked against the version this one produced (else it
      // would meet this device's own write as a conflict and be dropped).
      const version = appliedVersion(change.type, reply.payload);
      let after = false;
      for (const other of version === null ? [] : this._liveWrites) {
        if (other === change) after = true;
        else if (after && other.chat_id === change.chat_id && componentOf(other.type) === componentOf(change.type) && other.version_before_edit === change.version_before_edit) {
          other.version_before_edit = /** @type {number} */ (version);
        }
      }
      return { queued: false, reply };
    } catch (e) {
      if (isTransient(e)) {
        // Safe to repeat: if it was applied, the version check makes the repeat a conflict. The value
        // is remembered (`written`, with those of earlier such writes on the same version) to tell that
        // conflict from another device's write.
        this.queue.addChange({ ...change, written: [change.value] });
        this._retrySoon();
        return { queued: true };
      }
      revert();
      // (A draft deletion creates no chat: its `not_found` may only mean that the chat does not exist yet.)
      this._dropUnknown(change.chat_id, change.type !== 'delete_draft' && isNotFound(e), change);
      this.emit('change', change.chat_id);
      throw e;
    } finally {
      this._liveWrites.delete(change);
    }
  }

  /**
   * After a live write to a chat the server does not have (not `known`: created here by the write) was
   * refused for good: the server never created it, so when nothing of it is left (no message, nothing
   * queued, no other write of it on its way) it leaves the model, where it would stay an empty chat that
   * no sync ever removes; `deleted`: the write would have created it and met `not_found` (another user's
   * chat, or a deleted one), so it is remembered as deleted, as for a refused offline change (see
   * `_refuseChange`). A chat where a reply streams is kept unless `deleted` (the stream's message creates
   * it; forgotten, the stream would end here while it goes on).
   * @param {string} chatId
   * @param {boolean} deleted
   * @param {object} [self] the refused live write (still counted among those on their way)
   */
  _dropUnknown(chatId, deleted, self) {
    const chat = this.chats.get(chatId);
    if (!chat || chat.known || chat.messages.length > 0) return;
    if (!deleted && this.streams.open(chatId).length > 0) return;
    const queued = [...this.queue.changes, ...this.queue.inFlight, ...this.queue.messages].some((c) => c.chat_id === chatId);
    const writing = [...this._liveWrites].some((w) => w !== self && w.chat_id === chatId);
    if (queued || writing) return;
    this._forget(chatId, deleted);
  }

  /**
   * Fetches the stored messages of completed streams ({@link _toFetch}) that the model does not hold yet:
   * one that it holds meanwhile (a sync, a page, a late reply brought it) or whose chat is gone is
   * dropped. A transient failure (`unavailable`, `rate_limited`, a timeout) fetches again after a
   * backoff; a lost connection leaves it for the next one (see `_afterConnect`); any other refusal
   * (`not_found`: the chat was deleted) drops it. Not while not connected (the next connection calls it).
   */
  _fetchCompleted() {
    for (const [key, f] of this._toFetch) {
      const chat = this.chats.get(f.chat_id);
      if (this.deleted.has(f.chat_id) || chat?.messages.some((m) => m.seq === f.seq)) {
        this._toFetch.delete(key);
        continue;
      }
      if (f.sending || !this.isOpen) continue;
      f.sending = true;
      this.request('get_chat_messages', { chat_id: f.chat_id, after_seq: f.seq - 1, limit: 1 }).then(
        () => {
          this._toFetch.delete(key);
          this._fetchAttempt = 0;
        },
        (e) => {
          f.sending = false;
          if (!isTransient(e)) this._toFetch.delete(key);
          else if (e.code !== 'disconnected' && e.code !== 'closed') this._fetchSoon();
        },
      );
    }
  }

  /** {@link _fetchCompleted} after a backoff delay (one timer for all). */
  _fetchSoon() {
    if (this._fetchTimer || this._closedByUser) return;
    const delay = backoffDelay(this._fetchAttempt++, this.options.backoff, this.options.random);
    this._fetchTimer = setTimeout(() => {
      this._fetchTimer = null;
      this._fetchCompleted();
    }, delay);
  }

  /**
   * While online, sends what a transient failure (`unavailable`, `rate_limited`, a timeout) left in the
   * queue after a backoff delay (a reconnection flushes it anyway).
   */
  _retrySoon() {
    if (this._flushTimer || this.status !== 'online') return;
    const delay = backoffDelay(this._flushAttempt++, this.options.backoff, this.options.random);
    this._flushTimer = setTimeout(async () => {
      this._flushTimer = null;
      // (Also with nothing queued: a sync that failed after the flush still has a conflict or a refused
      // value to ask the server about.)
      if (this.status !== 'online' || (this.queue.size === 0 && this.queue.recheck.length === 0 && this._stale.size === 0)) return;
      try {
        await this._flushChanges();
        // A conflict to recheck, or a change refused for good (its component asked for again): the
        // server's value now, not at the next reconnection.
        if (this.queue.recheck.length > 0 || this._stale.size > 0) {
          await this.sync();
          await this._flushChanges();
        }
        await this._flushMessages();
        this._flushAttempt = 0;
      } catch (e) {
        if (isTransient(e)) this._retrySoon();
      }
    }, delay);
  }

  /** The largest frame the server takes (`limits.max_frame_bytes`; past it, it closes with 1009). */
  get _maxFrameBytes() {
    return this.connected?.limits?.max_frame_bytes ?? 65536;
  }

  /**
   * A frame's JSON text. A frame larger than `max_frame_bytes` is refused here with `limit_exceeded`:
   * sent, it would close the connection (1009 `Message too big`) on every attempt.
   * @param {{type: string, payload: unknown}} frame
   * @returns {string}
   */
  _encode(frame) {
    const data = JSON.stringify(frame);
    const bytes = utf8Length(data);
    if (bytes > this._maxFrameBytes) {
      throw new ChatSyncError('limit_exceeded', `The ${frame.type} frame (${bytes} bytes) is larger than max_frame_bytes (${this._maxFrameBytes}).`, {
        limit: 'max_frame_bytes',
      });
    }
    return data;
  }

  /**
   * @param {{type: string, payload: unknown, request_id?: string}} frame
   * @param {string} data its JSON text, from {@link _encode}
   */
  _sendFrame(frame, data) {
    const socket = this._socket;
    if (!socket) return;
    socket.send(data);
    this.emit('sent', frame);
  }

  /**
   * @param {string} code
   * @param {string} message
   */
  _failPending(code, message) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(new ChatSyncError(code, message));
    }
  }

  /** @param {import('./index.js').Status} status */
  _setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this.emit('status', status);
  }

  _startKeepalive() {
    this._stopKeepalive();
    const every = this.options.keepaliveMs;
    if (!every || every <= 0) return;
    const socket = this._socket;
    const timeoutMs = this.options.keepaliveTimeoutMs ?? Math.max(every, 10_000);
    this._keepaliveTimer = setInterval(() => {
      if (this._socket !== socket) return;
      const sentAt = Date.now();
      this.request('ping', {}, { timeoutMs }).catch((e) => {
        // No pong and nothing else either: the connection is half-open (sleep, network change). Drop it
        // and reconnect. A frame received meanwhile shows it alive: the server answers nothing (not even a
        // ping) while it sends the parts of a big reply.
        if (e instanceof ChatSyncError && e.code === 'timeout' && this._socket === socket && this._lastFrameAt <= sentAt) this.dropConnection();
      });
    }, every);
  }

  _stopKeepalive() {
    clearInterval(this._keepaliveTimer);
    this._keepaliveTimer = null;
  }

  // ---------------------------------------------------------------------------------------------
  // Local model

  /**
   * Applies a server message to the local model.
   * @param {string} type
   * @param {any} p
   * @param {string | null} [requestId] the `request_id` of the frame
   */
  _apply(type, p, requestId = null) {
    const chatId = typeof p.chat_id === 'string' ? p.chat_id : null;
    if (chatId === null && CHAT_EVENTS.has(type)) throw new TypeError(`${type} without a chat_id`);
    if (chatId && this.deleted.has(chatId)) return;
    switch (type) {
      case 'initial_sync_response': {
        // Chats the server had (known here) and no longer has were deleted: remembered as such, so that a
        // late event for one (PROTOCOL.md "Changes racing a deletion") does not bring it back.
        for (const id of p.chat_ids_to_delete ?? []) this._forget(id, this.chats.get(id)?.known === true);
        for (const entry of p.chats_to_add_or_update ?? []) {
          if (typeof entry?.chat_id !== 'string') throw new TypeError('initial_sync_response: an entry without a chat_id');
          // Deleted after the server built this reply: not brought back (ids are never reused).
          if (this.deleted.has(entry.chat_id)) continue;
          const chat = this.chat(entry.chat_id);
          chat.known = true;
          const v = entry.versions ?? {};
          // A broadcast received after the server built this reply may already be newer.
          if ('title' in entry && v.title_v >= chat.versions.title_v) chat.title = entry.title;
          if ('draft_json' in entry && v.draft_v >= chat.versions.draft_v) chat.draft_json = entry.draft_json;
          // Its count covers the messages up to its `messages_v`; those this client knows of after it (held
          // from a newer broadcast, or a `stream_completed` whose message is still to fetch) were counted
          // here as they came, and are added to it (they are not in it).
          if (typeof entry.unread_count === 'number' && typeof v.messages_v === 'number' && Number.isFinite(v.messages_v)) {
            const base = v.messages_v;
            const held = new Set(chat.messages.map((m) => m.seq));
            let later = chat.messages.filter((m) => m.sender_name !== 'user' && (m.seq ?? 0) > base && (m.seq ?? 0) > chat.read_seq).length;
            for (const f of this._toFetch.values()) if (f.chat_id === entry.chat_id && f.seq > base && f.seq > chat.read_seq && !held.has(f.seq)) later += 1;
            chat.unread_count = entry.unread_count + later;
            this._unreadCovers.set(entry.chat_id, base);
          }
          chat.versions = {
            messages_v: newer(chat.versions.messages_v, v.messages_v ?? 0),
            title_v: newer(chat.versions.title_v, v.title_v ?? 0),
            draft_v: newer(chat.versions.draft_v, v.draft_v ?? 0),
          };
          chat.last_edited_overall_timestamp = newer(chat.last_edited_overall_timestamp, entry.last_edited_overall_timestamp ?? 0);
          if (Array.isArray(entry.messages)) this._mergeMessages(chat, entry.messages);
          // Messages held past the entry's `messages_v` (received after the reply was built) carry it on.
          advanceMessagesV(chat);
          // Unread messages come after the read marker: a reply built before the marker moved (its
          // `chat_read_updated` came first) counts no more than the messages known past the marker.
          let last = chat.messages.reduce((max, m) => Math.max(max, m.seq ?? 0), Math.max(chat.versions.messages_v, newer(0, v.messages_v)));
          for (const f of this._toFetch.values()) if (f.chat_id === entry.chat_id) last = Math.max(last, f.seq);
          chat.unread_count = Math.min(chat.unread_count, Math.max(0, last - chat.read_seq));
        }
        // Chats the server no longer has come in `chat_ids_to_delete` when they were in `chat_versions`
        // (sync() drops those it left out); a chat missing from the order but known here was learned from
        // a broadcast newer than this reply.
        if (p.more !== true && Array.isArray(p.server_chat_order)) {
          p.server_chat_order.forEach((/** @type {string} */ id, /** @type {number} */ i) => {
            const chat = this.chats.get(id);
            if (chat) {
              chat.order = i;
              chat.known = true;
            }
          });
        }
        if (Array.isArray(p.active_streams)) {
          // A stream of a chat deleted since the reply was made (its `chat_deleted` came first) stays ended.
          const active = p.active_streams.filter((/** @type {any} */ a) => !(a && this.deleted.has(a.chat_id)));
          for (const s of this.streams.seed(active)) this.emit('stream', s);
        }
        this.emit('change', null);
        return;
      }
      case 'chat_title_updated': {
        const chat = this.chat(p.chat_id);
        chat.known = true;
        if (p.versions.title_v > chat.versions.title_v) {
          chat.title = p.data.title;
          chat.versions.title_v = p.versions.title_v;
        }
        break;
      }
      case 'draft_update_confirmed': {
        const chat = this.chat(p.chat_id);
        chat.known = true;
        // The server holds the draft this device sent at `draft_v`: when that is newer than what is held
        // (another device's write may have come in meanwhile, and shown), it is this device's value again,
        // unless a later write of this draft is on its way (which will set its own).
        const sent = requestId === null ? undefined : this._pending.get(requestId)?.sent;
        if (sent && sent.chat_id === p.chat_id && 'draft_json' in sent && typeof p.draft_v === 'number' && p.draft_v > chat.versions.draft_v && !this._laterDraftWrite(p.chat_id, /** @type {string} */ (requestId))) {
          chat.draft_json = /** @type {import('./index.js').DraftJson | null} */ (sent.draft_json);
        }
        chat.versions.draft_v = newer(chat.versions.draft_v, p.draft_v);
        chat.last_edited_overall_timestamp = newer(chat.last_edited_overall_timestamp, p.last_edited_overall_timestamp);
        break;
      }
      case 'chat_draft_updated': {
        const chat = this.chat(p.chat_id);
        chat.known = true;
        if (p.versions.draft_v > chat.versions.draft_v) {
          chat.draft_json = p.data.draft_json;
          chat.versions.draft_v = p.versions.draft_v;
        }
        chat.last_edited_overall_timestamp = newer(chat.last_edited_overall_timestamp, p.last_edited_overall_timestamp);
        break;
      }
      case 'draft_delete_receipt':
      case 'draft_deleted': {
        if (type === 'draft_delete_receipt' && !p.success) return;
        const chat = this.chat(p.chat_id);
        if (p.draft_v > chat.versions.draft_v) {
          chat.draft_json = null;
          chat.versions.draft_v = p.draft_v;
        }
        break;
      }
      case 'chat_message_confirmed': {
        const chat = this.chat(p.chat_id);
        chat.known = true;
        const queued = this.queue.messages.find((x) => x.chat_id === p.chat_id && x.message.message_id === p.message_id);
        this.queue.confirmMessage(p.chat_id, p.message_id);
        const m = chat.messages.find((x) => x.message_id === p.message_id);
        if (!m && queued && typeof p.new_messages_v === 'number') {
          // Queued by an earlier load of the page (or a tab that is gone): not in this model yet. It is
          // shown as `sendMessage` shows its own (created_at: the client's time).
          const { message_id, content, timestamp } = queued.message;
          chat.messages.push({ message_id, seq: p.new_messages_v, sender_name: 'user', content, created_at: timestamp, client_timestamp: timestamp, pending: false });
        }
        if (m && m.pending) {
          // `new_messages_v` is the message's seq (for a duplicate: the original's).
          m.pending = false;
          m.seq = p.new_messages_v;
        }
        advanceMessagesV(chat);
        chat.last_edited_overall_timestamp = newer(chat.last_edited_overall_timestamp, p.new_last_edited_overall_timestamp);
        sortMessages(chat);
        break;
      }
      case 'chat_message_added': {
        const chat = this.chat(p.chat_id);
        chat.known = true;
        const isNew = !chat.messages.some((m) => m.seq === p.message.seq);
        this._mergeMessages(chat, [p.message]);
        advanceMessagesV(chat);
        chat.last_edited_overall_timestamp = newer(chat.last_edited_overall_timestamp, p.last_edited_overall_timestamp ?? 0);
        const covered = this._unreadCovers.get(p.chat_id) ?? 0;
        if (isNew && p.message.sender_name !== 'user' && p.message.seq > chat.read_seq && p.message.seq > covered) chat.unread_count += 1;
        break;
      }
      case 'chat_messages_response': {
        const chat = this.chat(p.chat_id);
        chat.known = true;
        this._mergeMessages(chat, p.messages);
        // Not the chat's `messages_v` of the reply: a page (the fetch of a completed stream's message is
        // one message) may stop short of it (see `advanceMessagesV`).
        advanceMessagesV(chat);
        break;
      }
      case 'chat_content_batch_response': {
        for (const [id, messages] of Object.entries(p.messages_by_chat_id ?? {})) {
          if (this.deleted.has(id)) continue;
          const chat = this.chat(id);
          chat.known = true;
          this._mergeMessages(chat, /** @type {any[]} */ (messages));
          advanceMessagesV(chat);
        }
        this.emit('change', null);
        return;
      }
      case 'chat_deleted':
        this._forget(p.chat_id, true);
        this.emit('change', p.chat_id);
        return;
      case 'chat_read_updated': {
        const chat = this.chat(p.chat_id);
        // An older marker arriving late changes nothing. The count is the server's when the marker
        // moved; a message from another sender that arrived around it may not be in it, so the messages
        // held above the marker count as well.
        if (p.read_seq < chat.read_seq) break;
        chat.read_seq = p.read_seq;
        const held = chat.messages.filter((m) => m.sender_name !== 'user' && (m.seq ?? 0) > chat.read_seq).length;
        chat.unread_count = newer(held, p.unread_count);
        break;
      }
      case 'stream_started': {
        // Not `known`: a stream started in a new chat id creates the chat only when its message is
        // stored (docs/SERVER_API.md §4); a cancelled one leaves none behind, and a chat taken as known
        // would come back from the next sync in `chat_ids_to_delete` and be remembered deleted for good.
        this.chat(p.chat_id);
        this.emit('stream', this.streams.start(p));
        break;
      }
      case 'stream_chunk': {
        const stream = this.streams.chunk(p);
        if (!stream) break;
        // A chunk of a stream never announced here opens it: its chat shows, not known (as for
        // `stream_started`).
        this.chat(p.chat_id);
        this.emit('stream', stream);
        break;
      }
      case 'stream_completed': {
        // A repeated end changes nothing (nor fetches the message again).
        if (this.streams.hasEnded(p.chat_id, p.stream_id)) return;
        const stream = this.streams.finish(p.chat_id, p.stream_id, 'completed');
        stream.message_id = p.message_id ?? stream.message_id;
        stream.seq_stored = p.seq;
        const chat = this.chat(p.chat_id);
        // Its message is stored: the server has the chat (one the stream started in a new chat id too).
        chat.known = true;
        // The stored message comes with no `chat_message_added`: it counts as unread here, as the server
        // counts it (a reply of another sender past the read marker), once: not when the `unread_count`
        // of a sync covers it (as for `chat_message_added`), nor when it is held already. (Not checked
        // against `messages_v`: a later message, this device's own say, may have been confirmed first.)
        const covered = this._unreadCovers.get(p.chat_id) ?? 0;
        if (typeof p.seq === 'number' && stream.sender_name !== 'user' && p.seq > chat.read_seq && p.seq > covered && !chat.messages.some((m) => m.seq === p.seq)) {
          chat.unread_count += 1;
        }
        // Its `messages_v` is not taken: the message is not held until fetched (see `advanceMessagesV`).
        this.emit('stream', stream);
        // The stored message is the truth (chunks are never stored one by one): fetch it (again after a
        // transient failure, and after the next connection's sync if that one is lost).
        if (typeof p.seq === 'number' && Number.isSafeInteger(p.seq) && p.seq > 0) {
          const key = `${p.chat_id}\u0000${p.seq}`;
          if (!this._toFetch.has(key)) this._toFetch.set(key, { chat_id: p.chat_id, seq: p.seq, sending: false });
          this._fetchCompleted();
        }
        break;
      }
      case 'stream_cancelled': {
        if (this.streams.hasEnded(p.chat_id, p.stream_id)) return;
        const stream = this.streams.finish(p.chat_id, p.stream_id, 'cancelled');
        stream.reason = p.reason;
        this.emit('stream', stream);
        // The empty chat only this stream brought (the server never created it) goes with it.
        if (this.streams.open(p.chat_id).length === 0) this._dropUnknown(p.chat_id, false);
        break;
      }
      default:
        return;
    }
    this.emit('change', chatId);
  }

  /**
   * Drops the local model of another user's chats (the credentials now name someone else): the next sync
   * brings this user's.
   */
  _forgetUser() {
    // The first user's open streams end where a listener can see them go.
    for (const s of this.streams.open()) {
      const stream = this.streams.finish(s.chat_id, s.stream_id, 'cancelled');
      stream.reason = 'user_changed';
      this.emit('stream', stream);
    }
    this.chats.clear();
    this.deleted.clear();
    this._unreadCovers.clear();
    this._stale = new Map();
    this.streams.clear();
    this._toFetch.clear();
    this._synced = false;
    this.emit('change', null);
  }

  /**
   * Whether a draft write of the chat was sent after request `requestId` and waits for its reply.
   * @param {string} chatId
   * @param {string} requestId
   */
  _laterDraftWrite(chatId, requestId) {
    const n = Number(requestId.slice(1));
    for (const [id, q] of this._pending) {
      if ((q.type === 'update_draft' || q.type === 'delete_draft') && q.sent.chat_id === chatId && Number(id.slice(1)) > n) return true;
    }
    return false;
  }

  /**
   * Drops a chat from the model; `deleted`: the server deleted it (its id is never reused), so that later
   * events for it are ignored. Its streams still open here end as `cancelled` (reason `chat_deleted`
   * when deleted), each with a `stream` event: their own `stream_cancelled`, should it come after
   * (`chat_deleted` raced it) or never (a sync's `chat_ids_to_delete`), is an event of a deleted chat.
   * @param {string} chatId
   * @param {boolean} [deleted]
   */
  _forget(chatId, deleted = false) {
    this.chats.delete(chatId);
    this._unreadCovers.delete(chatId);
    if (deleted) this.deleted.add(chatId);
    for (const s of this.streams.open(chatId)) {
      const stream = this.streams.finish(chatId, s.stream_id, 'cancelled');
      if (deleted) stream.reason = 'chat_deleted';
      this.emit('stream', stream);
    }
  }

  /**
   * @param {import('./index.js').ChatState} chat
   * @param {import('./index.js').Message[]} messages
   */
  _mergeMessages(chat, messages) {
    for (const m of messages) {
      const i = chat.messages.findIndex((x) => x.message_id === m.message_id);
      if (i >= 0) chat.messages[i] = { ...m, pending: false };
      else chat.messages.push({ ...m, pending: false });
    }
    sortMessages(chat);
  }
}

/**
 * The larger of `current` and `value`, or `current` when `value` is not a finite number (a malformed or
 * missing field of a server frame).
 * @param {number} current
 * @param {unknown} value
 */
function newer(current, value) {
  return typeof value === 'number' && Number.isFinite(value) ? Math.max(current, value) : current;
}

/** Server messages about one chat: their `chat_id` is required (see `ChatSyncClient#_apply`). */
const CHAT_EVENTS = new Set([
  'chat_title_updated',
  'draft_update_confirmed',
  'chat_draft_updated',
  'draft_delete_receipt',
  'draft_deleted',
  'chat_message_confirmed',
  'chat_message_added',
  'chat_messages_response',
  'chat_deleted',
  'chat_read_updated',
  'stream_started',
  'stream_chunk',
  'stream_completed',
  'stream_cancelled',
]);

/** A queued message's key (chat id and message id). @param {import('./index.js').PendingMessage} m */
function messageKey(m) {
  return `${m.chat_id}\u0000${m.message.message_id}`;
}

/**
 * The highest `seq` up to which a chat's messages are held without a gap.
 * @param {import('./index.js').ChatState} chat
 */
function contiguousSeq(chat) {
  let seq = 0;
  const seqs = chat.messages.map((m) => m.seq).filter((s) => typeof s === 'number').sort((a, b) => /** @type {number} */ (a) - /** @type {number} */ (b));
  for (const s of seqs) {
    if (s === seq + 1) seq = /** @type {number} */ (s);
    else if (/** @type {number} */ (s) > seq + 1) break;
  }
  return seq;
}

/**
 * Moves a chat's `messages_v` on through the messages held right after it (`seq` `messages_v + 1`, and so
 * on), never to the `messages_v` an event names: that counts messages this device may have missed (one
 * broadcast while it was reconnecting, or past a page it fetched), and the version the next sync names
 * must stay before them, so that the sync's entry for the chat brings them into the unread count and
 * the chat's time. A sync entry sets it to the server's (with the count that covers them).
 * @param {import('./index.js').ChatState} chat
 */
function advanceMessagesV(chat) {
  const held = new Set(chat.messages.map((m) => m.seq));
  let v = chat.versions.messages_v;
  while (held.has(v + 1)) v += 1;
  chat.versions.messages_v = v;
}

/** @param {import('./index.js').ChatState} chat */
function sortMessages(chat) {
  chat.messages.sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity));
}

/** `ws(s)://<this page's host>/v1/ws` in a browser; `ws://127.0.0.1:8080/v1/ws` elsewhere. */
function defaultUrl() {
  const loc = /** @type {any} */ (globalThis).location;
  if (loc && typeof loc.host === 'string' && loc.host) {
    return `${loc.protocol === 'https:' ? 'wss:' : 'ws:'}//${loc.host}/v1/ws`;
  }
  return 'ws://127.0.0.1:8080/v1/ws';
}
