/**
 * Types of the chatsync client SDK (`index.js`) and of the chatsync WebSocket protocol v1
 * (PROTOCOL.md). Payload shapes are those the server sends; see the protocol for the rules.
 */

export declare const PROTOCOL: 'chatsync.v1';

// ---------------------------------------------------------------------------------------------------
// Protocol values

/** A Tiptap document (or any JSON object) used as a draft. */
export type DraftJson = { [key: string]: unknown };

export type ErrorCode =
  | 'invalid_json'
  | 'invalid_message'
  | 'unknown_type'
  | 'invalid_payload'
  | 'limit_exceeded'
  | 'not_found'
  | 'rate_limited'
  | 'unavailable'
  | 'internal';

export interface Limits {
  max_frame_bytes: number;
  max_title_chars: number;
  max_draft_chars: number;
  max_draft_words: number;
  max_offline_changes: number;
  max_batch_chats: number;
  max_page_messages: number;
  rate_per_sec: number;
  rate_burst: number;
  max_reply_bytes: number;
}

export interface Connected {
  connection_id: string;
  user_id: string;
  device_hash: string;
  protocol: string;
  server_time: string;
  limits: Limits;
}

export interface Versions {
  /**
   * In a chat's model: the messages this client has accounted for, without a gap (the server's count
   * after a sync; one past a message it missed, e.g. broadcast while it reconnected, waits for the next
   * sync, whose entry brings that message's unread count).
   */
  messages_v: number;
  title_v: number;
  draft_v: number;
}

export interface Message {
  message_id: string;
  /** 1-based position in the chat; `null` while a message of this client is not yet confirmed. */
  seq: number | null;
  /** `"user"` for the user's own devices; the backend's sender otherwise (e.g. `"assistant"`). */
  sender_name: string;
  content: string | { [key: string]: unknown };
  /** RFC 3339, server time. */
  created_at: string;
  client_timestamp: string | number | null;
  /** Local only: sent (or queued) and not yet confirmed. */
  pending?: boolean;
}

export interface ErrorPayload {
  code: ErrorCode;
  message: string;
  field?: string;
  chat_id?: string;
  message_id?: string;
  change_id?: string;
}

export interface ChatUpdate {
  chat_id: string;
  type: 'new_chat' | 'updated_chat';
  versions: Versions;
  last_edited_overall_timestamp: number;
  unread_count: number;
  title?: string;
  draft_json?: DraftJson | null;
  messages?: Message[];
}

export interface ActiveStream {
  chat_id: string;
  stream_id: string;
  message_id: string;
  sender_name: string;
  meta: { [key: string]: unknown };
  seq: number;
  content_so_far: string;
}

export interface InitialSyncResponse {
  chat_ids_to_delete: string[];
  chats_to_add_or_update: ChatUpdate[];
  server_chat_order: string[];
  sync_completed_at: string;
  active_streams?: ActiveStream[];
  more?: boolean;
}

export interface StreamStarted {
  chat_id: string;
  stream_id: string;
  message_id: string;
  sender_name: string;
  meta: { [key: string]: unknown };
}

export interface StreamChunk {
  chat_id: string;
  stream_id: string;
  seq: number;
  delta: string;
}

export interface StreamCompleted {
  chat_id: string;
  stream_id: string;
  message_id: string;
  seq: number;
  messages_v: number;
}

export interface StreamCancelled {
  chat_id: string;
  stream_id: string;
  reason: 'cancelled_by_user' | 'aborted' | 'timeout' | string;
}

export interface OfflineResult {
  change_id: string | null;
  chat_id: string | null;
  type: 'title' | 'draft' | 'delete_draft' | null;
  status: 'applied' | 'conflict' | 'error';
  code?: ErrorCode;
  versions?: Versions;
}

/** Every server message type and its payload. */
export interface ServerMessages {
  connected: Connected;
  pong: Record<string, never>;
  error: ErrorPayload;
  initial_sync_response: InitialSyncResponse;
  initial_sync_error: { code: ErrorCode; message: string };
  draft_update_confirmed: { chat_id: string; draft_v: number; last_edited_overall_timestamp: number };
  chat_draft_updated: {
    chat_id: string;
    data: { draft_json: DraftJson | null };
    versions: { draft_v: number };
    last_edited_overall_timestamp: number;
  };
  draft_delete_receipt: { chat_id: string; success: boolean; draft_v?: number; message?: string };
  draft_deleted: { chat_id: string; draft_v: number };
  chat_title_updated: { chat_id: string; data: { title: string }; versions: { title_v: number } };
  chat_message_confirmed: {
    chat_id: string;
    message_id: string;
    temp_id: string | null;
    new_messages_v: number;
    new_last_edited_overall_timestamp: number;
    duplicate?: boolean;
  };
  chat_message_added: {
    chat_id: string;
    message: Message;
    versions: { messages_v: number };
    last_edited_overall_timestamp: number;
  };
  chat_messages_response: { chat_id: string; messages: Message[]; messages_v: number; has_more: boolean };
  chat_content_batch_response: {
    messages_by_chat_id: { [chatId: string]: Message[] };
    versions_by_chat_id: { [chatId: string]: { messages_v: number } };
    not_found: string[];
    more?: boolean;
  };
  chat_deleted: { chat_id: string; tombstone: true };
  offline_sync_complete: { processed: number; conflicts: number; errors: number; results: OfflineResult[] };
  cache_status_response: { is_primed: boolean };
  priority_chat_ready: { chat_id: string };
  cache_primed: { status: 'full_sync_ready' };
  chat_read_updated: { chat_id: string; read_seq: number; unread_count: number };
  stream_started: StreamStarted;
  stream_chunk: StreamChunk;
  stream_completed: StreamCompleted;
  stream_cancelled: StreamCancelled;
}

export type ServerMessageType = keyof ServerMessages;

/** A server frame. */
export interface Envelope<K extends ServerMessageType = ServerMessageType> {
  type: K;
  payload: ServerMessages[K];
  request_id?: string;
}

/** Every client request type, its payload and the reply that ends it. */
export interface ClientRequests {
  ping: { payload: Record<string, never>; reply: 'pong' };
  initial_sync_request: {
    payload: {
      chat_versions: { [chatId: string]: Partial<Versions> };
      immediate_view_chat_id?: string;
    };
    reply: 'initial_sync_response';
  };
  update_draft: { payload: { chat_id: string; draft_json: DraftJson | null }; reply: 'draft_update_confirmed' };
  delete_draft: { payload: { chat_id: string }; reply: 'draft_delete_receipt' };
  update_title: { payload: { chat_id: string; new_title: string }; reply: 'chat_title_updated' };
  chat_message_added: {
    payload: {
      chat_id: string;
      message: {
        message_id: string;
        content: string | { [key: string]: unknown };
        timestamp?: string | number;
        temp_id?: string;
      };
    };
    reply: 'chat_message_confirmed';
  };
  get_chat_messages: {
    payload: { chat_id: string; after_seq?: number; limit?: number };
    reply: 'chat_messages_response';
  };
  request_chat_content_batch: { payload: { chat_ids: string[] }; reply: 'chat_content_batch_response' };
  delete_chat: { payload: { chat_id: string }; reply: 'chat_deleted' };
  sync_offline_changes: { payload: { changes: OfflineChange[] }; reply: 'offline_sync_complete' };
  request_cache_status: { payload: Record<string, never>; reply: 'cache_status_response' };
  mark_read: { payload: { chat_id: string; seq: number }; reply: 'chat_read_updated' };
  cancel_stream: { payload: { chat_id: string; stream_id: string }; reply: 'stream_cancelled' };
}

export type ClientRequestType = keyof ClientRequests;

// ---------------------------------------------------------------------------------------------------
// SDK

export type Status = 'idle' | 'connecting' | 'reconnecting' | 'syncing' | 'online' | 'offline' | 'closed';

export interface BackoffOptions {
  /** First delay, ms (default 500). */
  initialMs?: number;
  /** Largest delay, ms (default 30000). */
  maxMs?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** Up to this fraction of each delay is taken off at random (default 0.5). */
  jitter?: number;
}

/** What `localStorage` offers; enough to keep the offline queue across reloads. */
export interface QueueStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  /** Optional, as `localStorage` has them: the tab keys are listed from the storage (else from an index under `<storageKey>.tabs`). */
  removeItem?(key: string): void;
  key?(index: number): string | null;
  readonly length?: number;
}

/** A storage that lists its keys (`localStorage`). */
export interface EnumerableStorage extends QueueStorage {
  removeItem(key: string): void;
  key(index: number): string | null;
  readonly length: number;
}

/** The part of `navigator.locks` (Web Locks API) the offline queue uses. */
export interface LockManagerLike {
  request<T>(name: string, callback: (lock: unknown) => T | Promise<T>): Promise<T>;
  request<T>(name: string, options: { ifAvailable?: boolean }, callback: (lock: unknown) => T | Promise<T>): Promise<T>;
}

export interface ClientOptions {
  /** A session token or JWT, or a function returning one (called before every connection attempt). */
  token: string | (() => string | Promise<string>);
  /** The device id (1-128 printable ASCII), sent as `device_id`. */
  deviceId: string;
  /** `ws(s)://host/v1/ws` (absolute: the constructor throws a `TypeError` otherwise); in a browser, defaults to the page's own host. */
  url?: string;
  /** A WebSocket constructor (default: `globalThis.WebSocket`). */
  WebSocket?: unknown;
  backoff?: BackoffOptions;
  /** Reply timeout per request, ms (default 30000; 0: none); for a multi-part reply, the longest wait for its next part. */
  requestTimeoutMs?: number;
  /**
   * How long a connection attempt waits for the server's `connected` greeting, ms (default 20000; 0: no
   * bound); past it the attempt is dropped and retried with backoff (a handshake stuck on a dead network).
   */
  connectTimeoutMs?: number;
  /** Application-level ping interval that detects half-open connections, ms (default 25000; 0: off). */
  keepaliveMs?: number;
  /**
   * How long a keepalive ping waits for its pong, ms (default the larger of `keepaliveMs` and 10000); the
   * connection is dropped only when no frame at all arrived meanwhile (the server answers no ping while it
   * sends the parts of a big reply).
   */
  keepaliveTimeoutMs?: number;
  /** Send `initial_sync_request` after every (re)connection (default true). */
  autoSync?: boolean;
  /** Keeps the offline queue (e.g. `localStorage`). */
  storage?: QueueStorage | null;
  /**
   * Storage key of the queue (default `chatsync.offline.<deviceId>`; the queues of the users of that device
   * id are told apart by the user stored with each, see `userId`). Each client writes
   * `<storageKey>.tab.<12 hex digits>` and adopts the keys of clients (tabs) that are gone, and
   * `storageKey` itself (an older SDK's queue); a storage that cannot list its keys also holds the index
   * `<storageKey>.tabs`.
   */
  storageKey?: string;
  /**
   * The id of the user the token belongs to, when the app knows it before connecting (the `user_id` of the
   * `connected` greeting). The offline queue is stored with its user, and a queue of another user is never
   * adopted, so a user signing in after another on one browser with one device id never sends the
   * other's queued edits. Without it the user is learned from the first `connected` greeting: edits queued
   * by a client that never connected have no user, and are adopted by the next client of any user.
   */
  userId?: string;
  /** Tells live tabs (default `navigator.locks`; `null`: none, only clients of this realm are known alive). */
  locks?: LockManagerLike | null;
  /** The chat in view at start (its messages come with the initial sync). */
  activeChatId?: string | null;
  /** Random source for the jitter (tests). */
  random?: () => number;
}

export interface ChatState {
  chat_id: string;
  title: string;
  draft_json: DraftJson | null;
  versions: Versions;
  last_edited_overall_timestamp: number;
  unread_count: number;
  read_seq: number;
  /** Messages held locally, by `seq` (unconfirmed ones last). */
  messages: Message[];
  /** Position in the server's order of the last sync. */
  order: number | undefined;
  /** The server has this chat (false for a chat created locally and not yet confirmed). */
  known: boolean;
}

export interface StreamState {
  chat_id: string;
  stream_id: string;
  message_id: string;
  sender_name: string;
  meta: { [key: string]: unknown };
  /** The last chunk's seq. */
  seq: number;
  /** The text so far. */
  text: string;
  /**
   * `cancelled` also for a stream that ended unseen (open here, missing from a later sync's
   * `active_streams`): then `reason` is `ended_unseen`; and for a stream still open here when its chat
   * was deleted (`chat_deleted`, or a sync's `chat_ids_to_delete`): then `reason` is `chat_deleted`;
   * and for a stream open here when the token came to name another user: then `reason` is `user_changed`.
   */
  state: 'open' | 'completed' | 'cancelled';
  /** False when chunks before the first one seen are unknown (the stored message has the whole text). */
  complete: boolean;
  /** The `stream_cancelled` reason, or `ended_unseen`, `chat_deleted` or `user_changed`. */
  reason?: string;
  /** The stored message's seq, once completed. */
  seq_stored?: number;
}

export interface OfflineChange {
  change_id: string;
  chat_id: string;
  type: 'title' | 'draft' | 'delete_draft';
  value: unknown;
  version_before_edit: number;
  /**
   * Local only (never sent): the values of live writes of this component, on `version_before_edit`,
   * whose replies never arrived (or of offline changes of a batch whose results never arrived), oldest
   * first, the newest 4 kept. A conflict that these writes alone explain (the server holding one of
   * them, at most as many versions past `version_before_edit` as there are writes up to it) is not a
   * loss: the edit is sent again on top of it. (A queue stored by an older SDK, with a single value here, still loads.)
   */
  written?: unknown[];
  /**
   * Local only (never sent): made before the first sync of this load on a chat not known here (after a
   * reload, offline), so the version seen before the edit is unknown: held until that sync, then moved to
   * the version it brought (the user's edit wins over the value held before).
   */
  base_unknown?: boolean;
}

export interface PendingMessage {
  chat_id: string;
  message: {
    message_id: string;
    content: string | { [key: string]: unknown };
    timestamp: string;
    temp_id?: string;
  };
}

export type WriteResult = { queued: true } | { queued: false; reply: { type: string; payload: any } };

export declare class ChatSyncError extends Error {
  /** A PROTOCOL.md error code, or `disconnected`, `timeout`, `closed`. */
  code: ErrorCode | 'disconnected' | 'timeout' | 'closed' | string;
  details: Record<string, unknown>;
  constructor(code: string, message: string, details?: Record<string, unknown>);
}

export declare function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number;
export declare function draftText(draft: unknown): string;
export declare function draftFromText(text: string): DraftJson | null;
export declare function newMessageId(): string;
export declare function mergeParts(a: unknown, b: unknown): any;

export declare class Emitter {
  on(type: string, handler: (...args: any[]) => void): () => void;
  once(type: string, handler: (...args: any[]) => void): () => void;
  off(type: string, handler: (...args: any[]) => void): void;
  waitFor(type: string, predicate?: (...args: any[]) => boolean): Promise<any>;
  emit(type: string, ...args: unknown[]): void;
}

export declare class StreamAssembler {
  static ENDED_KEPT: number;
  streams: Map<string, StreamState>;
  ended: Set<string>;
  get(chatId: string, streamId: string): StreamState | undefined;
  open(chatId?: string): StreamState[];
  start(p: StreamStarted): StreamState;
  /**
   * Seeds `active_streams`: `content_so_far`, then the chunks kept while a sync request was out with a later
   * `seq` (replacing what was held); a stream that ended here is not reopened.
   */
  seed(active: ActiveStream[]): StreamState[];
  /** Counts sync requests out (`true` one more, `false` one fewer): meanwhile chunks are kept by `seq` for `seed`. */
  buffer(on: boolean): void;
  chunk(p: StreamChunk): StreamState | null;
  /** Whether the stream's end came here already (a later end event is a repeat); not for one only ended by `endUnseen`. */
  hasEnded(chatId: string, streamId: string): boolean;
  /**
   * Ends an open stream that a sync no longer lists (`cancelled`, reason `ended_unseen`); its own end event,
   * should it still come, ends it for real with its text kept.
   */
  endUnseen(chatId: string, streamId: string): StreamState;
  finish(chatId: string, streamId: string, state: 'completed' | 'cancelled'): StreamState;
  clear(): void;
}

export declare class OfflineQueue {
  /**
   * Reads back the queue kept in `storage` under `key`, if any, checked entry by entry: a malformed
   * change, message or conflict to recheck is dropped, as is a stored counter of change ids that is not a
   * whole number from 0 (the counter restarts); a corrupt queue is dropped whole.
   */
  constructor(storage?: QueueStorage | null, key?: string, options?: { perTab?: boolean; locks?: LockManagerLike | null; owner?: string | null });
  /**
   * The user whose edits this queue holds (stored with it; `null` until known). A stored queue of another
   * user is neither read back nor adopted.
   */
  owner: string | null;
  /**
   * Sets the user (the client calls it with the `user_id` of every `connected` greeting, before it sends
   * anything). Another user's entries are set aside: with `perTab`, left stored under their own key for
   * that user, this queue moving to a new key; without, dropped.
   */
  own(userId: string): void;
  /** The key given (with `perTab`, the prefix of every tab's key). */
  readonly baseKey: string;
  /** The key written: `key`, or with `perTab` `<key>.tab.<12 hex digits>`. */
  readonly key: string;
  readonly perTab: boolean;
  /** The adoption started by the constructor. */
  adopted: Promise<void>;
  /**
   * Merges into this queue (and removes) the queues stored under `baseKey` and `baseKey.tab.*` whose
   * owners are gone: held by no live queue of this realm nor (with locks) by a lock of that name.
   */
  adopt(): Promise<void>;
  /** Marks this queue's key as held (this realm, and a lock with `locks`). */
  hold(): void;
  /** Lets another queue adopt this one's key. */
  release(): void;
  /** Waiting to be sent. */
  changes: OfflineChange[];
  /** Sent, results not yet received (kept in storage; a reload queues them again). */
  inFlight: OfflineChange[];
  /** Waiting to be sent, in order (each chat and `message_id` once; a stored one is read back only when well-formed). */
  messages: PendingMessage[];
  /**
   * Conflicting changes to look at again after the next sync: a conflict with one of this device's own
   * lost-reply writes alone is not a loss, and the edit is queued again; one with the change's own value
   * is none; else `change_conflict` (kept in storage; one per chat and component, at most 100).
   */
  recheck: OfflineChange[];
  /** Waiting changes and messages (not the in-flight ones). */
  readonly size: number;
  addChange(change: Omit<OfflineChange, 'change_id'>): OfflineChange;
  addMessage(message: PendingMessage): void;
  confirmMessage(chatId: string, messageId: string): void;
  /** Moves at most `max` changes to `inFlight`. */
  takeChanges(max: number): OfflineChange[];
  /** Moves these queued changes to `inFlight`. */
  take(changes: OfflineChange[]): OfflineChange[];
  /**
   * Forgets answered (or dropped) changes; rebases edits queued on top of an `applied` one; an edit
   * queued on top of one that met a `conflict` takes over that one's `written` (its conflict is then
   * looked at again after the next sync too).
   */
  settle(changes: OfflineChange[], results?: OfflineResult[]): void;
  /** Queues a change again on `version` (or moves the newer queued edit of its component there); returns the queued edit. */
  requeue(change: OfflineChange, version: number): OfflineChange;
  /**
   * Puts in-flight changes back in the queue, unless a newer edit of the component is queued (that one,
   * when on the same base, adds the dropped value to its `written`: the server may have applied it).
   */
  restore(changes: OfflineChange[]): void;
  /** Adds conflicting changes to `recheck`. */
  addRechecks(changes: OfflineChange[]): void;
  /** Removes changes from `recheck` (looked at again). */
  dropRechecks(changes: OfflineChange[]): void;
  clear(): void;
}

/** Local events of the client, beside every server message type. */
export interface ClientEvents {
  status: [Status];
  change: [string | null];
  stream: [StreamState];
  closed: [{ code: number; reason: string }];
  disconnected: [{ code: number; reason: string }];
  reconnect_scheduled: [{ attempt: number; delay: number }];
  synced: [];
  sent: [{ type: string; payload: unknown; request_id?: string }];
  offline_flushed: [ServerMessages['offline_sync_complete']];
  /** A queued message refused for good (by the server, or `limit_exceeded` here: larger than `max_frame_bytes`); dropped. */
  message_rejected: [{ chat_id: string; message_id: string; error: ChatSyncError }];
  /**
   * A queued title, draft or draft deletion refused for good (as for messages; of a batch refused as a whole
   * with `limit_exceeded`, only a change still refused alone once the batch is split); the next sync brings
   * the server's value.
   */
  change_rejected: [{ chat_id: string; change_id: string | null; type: OfflineResult['type']; error: ChatSyncError }];
  message: [Envelope];
  /** The initial sync after a connection failed (e.g. `unavailable`): the connection is dropped and retried with backoff. */
  sync_error: [unknown];
  /**
   * A queued title, draft or draft deletion met a conflict (another write came first: the server's
   * version was past `version_before_edit`) and was dropped; the server's value stays (`versions`: the
   * model's after the sync that brought it). Emitted after that sync, and only when the server holds
   * another value and no later edit of the component is queued or was confirmed live since. The app may tell the user, or write `value` again.
   */
  change_conflict: [{ chat_id: string; change_id: string; type: OfflineChange['type']; value: unknown; version_before_edit: number; versions: Versions }];
  /** The `token` function threw or rejected: retried with backoff. */
  token_error: [unknown];
  /** The `WebSocket` constructor threw: retried with backoff. */
  socket_error: [unknown];
  /**
   * A server frame that is not JSON, has no `type`, or lacks a field the local model needs (the raw frame,
   * and the error when the frame parsed). The model is left as it was; the frame is still emitted as its type.
   */
  protocol_error: [unknown, unknown?];
  /** An event handler threw (the error); the other handlers and the connection carry on. */
  listener_error: [unknown];
}

export declare class ChatSyncClient extends Emitter {
  constructor(options: ClientOptions);
  readonly url: string;
  status: Status;
  connected: Connected | null;
  chats: Map<string, ChatState>;
  /** Chats deleted (`chat_deleted`, or named deleted by a sync): later events for them are ignored, and
   * writes to them (titles, drafts, messages, read markers) reject with `not_found` at once. */
  deleted: Set<string>;
  streams: StreamAssembler;
  queue: OfflineQueue;
  activeChatId: string | null;
  readonly isOpen: boolean;

  on<K extends ServerMessageType>(type: K, handler: (payload: ServerMessages[K], envelope: Envelope<K>) => void): () => void;
  on<K extends keyof ClientEvents>(type: K, handler: (...args: ClientEvents[K]) => void): () => void;
  on(type: string, handler: (...args: any[]) => void): () => void;

  connect(): Promise<Connected>;
  close(code?: number, reason?: string): void;
  dropConnection(): void;
  reconnect(): void;
  request<K extends ClientRequestType>(
    type: K,
    payload?: ClientRequests[K]['payload'],
    options?: { timeoutMs?: number },
  ): Promise<{ type: ClientRequests[K]['reply']; payload: ServerMessages[ClientRequests[K]['reply']] }>;
  request(type: string, payload?: Record<string, unknown>, options?: { timeoutMs?: number }): Promise<{ type: string; payload: any }>;
  /** Fire and forget; false when not connected; throws `limit_exceeded` for a frame past `max_frame_bytes`. */
  send(type: string, payload?: Record<string, unknown>): boolean;
  chatList(): ChatState[];
  chat(chatId: string): ChatState;
  /**
   * `initial_sync_request`. When `chat_versions` would not fit in `max_frame_bytes`, names the chat in view,
   * the chats with queued edits, then the most recently edited, up to what fits (the others come in full);
   * a chat left out and missing from `server_chat_order` is dropped (edits or messages of it still queued are refused).
   */
  sync(): Promise<InitialSyncResponse>;
  updateTitle(chatId: string, title: string): Promise<WriteResult>;
  updateDraft(chatId: string, draftJson: DraftJson | null): Promise<WriteResult>;
  deleteDraft(chatId: string): Promise<WriteResult>;
  sendMessage(chatId: string, content: string | { [key: string]: unknown }, options?: { messageId?: string; tempId?: string }): Promise<WriteResult>;
  loadMessages(chatId: string): Promise<Message[]>;
  deleteChat(chatId: string): Promise<{ type: 'chat_deleted'; payload: ServerMessages['chat_deleted'] }>;
  markRead(chatId: string, seq?: number): Promise<{ type: 'chat_read_updated'; payload: ServerMessages['chat_read_updated'] }>;
  cancelStream(chatId: string, streamId: string): Promise<{ type: 'stream_cancelled'; payload: StreamCancelled }>;
  ping(): Promise<{ type: 'pong'; payload: Record<string, never> }>;
}
