// @ts-check
/**
 * @file A fake WebSocket for the SDK's unit tests: records what the client sends and lets a test play
 * the server (greeting, replies, events, closes). Everything is delivered on a later microtask, as a
 * real socket would.
 */

export const LIMITS = {
  max_frame_bytes: 65536,
  max_title_chars: 255,
  max_draft_chars: 7000,
  max_draft_words: 1000,
  max_offline_changes: 500,
  max_batch_chats: 50,
  max_page_messages: 500,
  rate_per_sec: 100,
  rate_burst: 200,
  max_reply_bytes: 1048576,
};

export class FakeSocket {
  /** @type {FakeSocket[]} every socket created, in order */
  static instances = [];
  /** When set, new sockets close at once with 1006 (the network is down). */
  static down = false;
  /** A frame larger than this (UTF-8 bytes) closes the socket with 1009, as the server does. */
  static maxFrameBytes = Infinity;

  /** @param {string} url */
  constructor(url) {
    this.url = new URL(url);
    /** @type {any[]} frames sent by the client, parsed */
    this.sent = [];
    /** @type {Map<string, Function[]>} */
    this.listeners = new Map();
    this.closed = false;
    /** @type {Function[]} */
    this._waiters = [];
    FakeSocket.instances.push(this);
    if (FakeSocket.down) queueMicrotask(() => this.serverClose(1006, ''));
  }

  /** @param {string} type @param {Function} fn */
  addEventListener(type, fn) {
    const list = this.listeners.get(type) ?? [];
    list.push(fn);
    this.listeners.set(type, list);
  }

  /** @param {string} type @param {any} ev */
  _dispatch(type, ev) {
    for (const fn of this.listeners.get(type) ?? []) fn(ev);
  }

  /** @param {string} data */
  send(data) {
    if (this.closed) throw new Error('send on a closed socket');
    this.sent.push(JSON.parse(data));
    if (new TextEncoder().encode(data).length > FakeSocket.maxFrameBytes) {
      queueMicrotask(() => this.serverClose(1009, 'Message too big'));
      return;
    }
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w();
  }

  /** The client closes. @param {number} [code] @param {string} [reason] */
  close(code = 1000, reason = '') {
    if (this.closed) return;
    this.closed = true;
    queueMicrotask(() => this._dispatch('close', { code, reason }));
  }

  // ---- the test plays the server ----

  /** Sends the `connected` greeting. */
  greet(user_id = 'alice') {
    this.push({
      type: 'connected',
      payload: {
        connection_id: `c${FakeSocket.instances.indexOf(this)}`,
        user_id,
        device_hash: 'h',
        protocol: 'chatsync.v1',
        server_time: new Date().toISOString(),
        limits: LIMITS,
      },
    });
  }

  /** Delivers one server frame. @param {any} frame */
  push(frame) {
    queueMicrotask(() => this._dispatch('message', { data: JSON.stringify(frame) }));
  }

  /** The server closes. @param {number} code @param {string} reason */
  serverClose(code, reason) {
    if (this.closed) return;
    this.closed = true;
    this._dispatch('close', { code, reason });
  }

  /**
   * Resolves with the next frame sent whose type is `type` (one already sent and not yet taken counts).
   * @param {string} type
   */
  async next(type) {
    this._taken ??= new Set();
    for (;;) {
      const i = this.sent.findIndex((f, i) => f.type === type && !this._taken.has(i));
      if (i >= 0) {
        this._taken.add(i);
        return this.sent[i];
      }
      await new Promise((resolve) => this._waiters.push(resolve));
    }
  }

  /** Answers the next `initial_sync_request` with `payload` (default: nothing to sync). @param {any} [payload] */
  async answerSync(payload = {}) {
    const req = await this.next('initial_sync_request');
    this.push({
      type: 'initial_sync_response',
      request_id: req.request_id,
      payload: {
        chat_ids_to_delete: [],
        chats_to_add_or_update: [],
        server_chat_order: [],
        sync_completed_at: new Date().toISOString(),
        ...payload,
      },
    });
    return req;
  }
}

/** The newest fake socket. */
export function lastSocket() {
  return FakeSocket.instances[FakeSocket.instances.length - 1];
}

/**
 * Waits until `cond()` holds, checking after every macrotask (no timing assertion: the test runner's
 * timeout is the only bound).
 * @param {() => boolean} cond
 */
export async function until(cond) {
  while (!cond()) await new Promise((r) => setTimeout(r, 1));
}
