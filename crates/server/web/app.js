// @ts-check
/**
 * @file The chatsync web demo: signs in with a session token, shows the user's chats in recency order
 * with unread counts, edits titles and drafts, sends messages, shows streamed replies, and the
 * connection status. Everything goes through the SDK (`/sdk/chatsync.js`, the file shipped in
 * `clients/typescript`); this file is only the page.
 */
import { ChatSyncClient, draftFromText, draftText } from '/sdk/chatsync.js';

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const input = (/** @type {string} */ id) => /** @type {HTMLInputElement} */ (document.getElementById(id));

const STATUS_TEXT = {
  idle: 'Signed out',
  connecting: 'Connecting…',
  reconnecting: 'Reconnecting…',
  syncing: 'Syncing…',
  online: 'Online',
  offline: 'Offline',
  closed: 'Disconnected',
};

/** @type {ChatSyncClient | null} */
let client = null;
/** @type {string | null} */
let activeChat = null;
let simulatedOffline = false;
let markReadSupported = true;
/** The chat whose `mark_read` is in flight (one at a time). */
let markingRead = /** @type {string | null} */ (null);
/** @type {ReturnType<typeof setTimeout> | undefined} */
let draftTimer;
/** @type {ReturnType<typeof setTimeout> | undefined} */
let titleTimer;
let renderQueued = false;

// ---------------------------------------------------------------------------------------------------
// Sign in and out

function deviceId() {
  let id = localStorage.getItem('chatsync.demo.device');
  if (!id) {
    id = `web-${randomHex(4)}`;
    localStorage.setItem('chatsync.demo.device', id);
  }
  return id;
}

/** @param {number} bytes */
function randomHex(bytes) {
  const b = new Uint8Array(bytes);
  crypto.getRandomValues(b);
  return [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
}

/**
 * The key of the offline queue in `localStorage`: per device id, as the SDK's default, and per token. The
 * SDK stores each queue with its user and adopts only its own user's, but the user is known only once
 * connected: what one user queued and left unsent in a tab that never connected (offline from the start)
 * names no user, and with the device id alone would be adopted by the next user signing in on this
 * browser with that device id (the page prefills the same one every time), and sent as theirs. A token
 * belongs to one user; what was queued with it waits for it (a new token of the same user does not find
 * it). A hash of the token, not the token itself: the token is kept in this tab only.
 * @param {string} token
 * @param {string} device
 */
function queueKey(token, device) {
  // FNV-1a, twice with different offsets (64 bits): a storage key, not a secret.
  let h1 = 0x811c9dc5;
  let h2 = 0x050c5d1f;
  for (let i = 0; i < token.length; i++) {
    const c = token.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 0x01000193) >>> 0;
    h2 = Math.imul(h2 ^ c, 0x01000193) >>> 0;
  }
  const hex = (/** @type {number} */ n) => n.toString(16).padStart(8, '0');
  return `chatsync.offline.${device}.${hex(h1)}${hex(h2)}`;
}

/**
 * Leaves the chat in view when the server no longer has it: deleted (here, on another device, or while
 * this window was away), or, after a sync, not among the user's chats (a chat id kept by a reload, of a
 * chat deleted since or of another user signed in before). Kept in view, it came back as an empty
 * "Untitled chat" (`client.chat` creates what it does not hold) whose every write is `not_found`. Its
 * pending title and draft edits go with it.
 * @param {boolean} [synced] the model has just been synced: a chat it does not hold is gone
 */
function leaveChatIfGone(synced = false) {
  if (!client || !activeChat) return;
  const gone = client.deleted.has(activeChat) || (synced && !client.chats.has(activeChat));
  if (!gone) return;
  clearTimeout(titleTimer);
  titleTimer = undefined;
  clearTimeout(draftTimer);
  draftTimer = undefined;
  activeChat = null;
  client.activeChatId = null;
  sessionStorage.removeItem('chatsync.demo.chat');
  scheduleRender();
}

/** A WebSocket that refuses to open while "offline" is ticked (to try the offline queue). */
class DemoSocket extends WebSocket {
  /** @param {string | URL} url */
  constructor(url) {
    if (simulatedOffline) throw new Error('offline (simulated)');
    super(url);
  }
}

/**
 * @param {string} token
 * @param {string} device
 */
async function signIn(token, device) {
  $('signin-error').hidden = true;
  client?.close();
  activeChat = sessionStorage.getItem('chatsync.demo.chat');
  const c = new ChatSyncClient({
    token,
    deviceId: device,
    WebSocket: DemoSocket,
    storage: localStorage,
    storageKey: queueKey(token, device),
    activeChatId: activeChat,
  });
  client = c;
  c.on('status', () => renderStatus());
  c.on('change', (/** @type {string | null} */ chatId) => {
    if (chatId !== null && chatId === activeChat) leaveChatIfGone();
    scheduleRender();
  });
  c.on('stream', () => scheduleRender());
  c.on('message_rejected', (/** @type {any} */ r) => toast(`A queued message was refused: ${r.error.message}`));
  c.on('change_rejected', (/** @type {any} */ r) => toast(`A queued ${r.type === 'title' ? 'title' : 'draft'} change was refused: ${r.error.message}`));
  c.on('closed', (/** @type {{code: number, reason: string}} */ e) => {
    if (client !== c || e.reason === 'signed out') return;
    showSignIn(`The server closed the connection: ${e.code} ${e.reason}`);
  });
  c.on('synced', () => {
    leaveChatIfGone(true);
    if (activeChat) openChat(activeChat);
  });
  $('signin').hidden = true;
  $('app').hidden = false;
  for (const id of ['sign-out', 'offline-toggle']) $(id).hidden = false;
  renderStatus();
  try {
    const hello = await c.connect();
    sessionStorage.setItem('chatsync.demo.token', token);
    localStorage.setItem('chatsync.demo.device', device);
    $('user').textContent = `${hello.user_id} · ${device}`;
    $('user').hidden = false;
  } catch (e) {
    if (client === c) showSignIn(/** @type {Error} */ (e).message);
  }
}

/** @param {string} [error] */
function showSignIn(error) {
  client?.close(1000, 'signed out');
  client = null;
  sessionStorage.removeItem('chatsync.demo.token');
  // The chat in view is this user's: the next one to sign in here starts with none (else it would open
  // that chat id in the next user's account, as an empty chat).
  sessionStorage.removeItem('chatsync.demo.chat');
  $('app').hidden = true;
  $('signin').hidden = false;
  for (const id of ['sign-out', 'offline-toggle', 'user']) $(id).hidden = true;
  const err = $('signin-error');
  err.textContent = error ?? '';
  err.hidden = !error;
  renderStatus();
}

// ---------------------------------------------------------------------------------------------------
// Rendering

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render();
  });
}

function renderStatus() {
  const el = $('status');
  const status = client?.status ?? 'idle';
  let text = STATUS_TEXT[status] ?? status;
  const queued = client?.queue.size ?? 0;
  if (status === 'offline') text = simulatedOffline ? 'Offline (simulated)' : 'Offline, retrying…';
  if (queued > 0 && status !== 'online') text += ` · ${queued} queued`;
  el.textContent = text;
  el.className = `status status-${status === 'reconnecting' ? 'connecting' : status}`;
  el.dataset.status = status;
}

function render() {
  if (!client) return;
  renderStatus();
  renderChatList();
  renderChat();
}

/** @param {number} secs */
function when(secs) {
  if (!secs) return '';
  const d = new Date(secs * 1000);
  const ago = (Date.now() - d.getTime()) / 1000;
  if (ago < 60) return 'now';
  if (ago < 3600) return `${Math.floor(ago / 60)} min`;
  if (d.toDateString() === new Date().toDateString()) return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  return d.toLocaleDateString();
}

/** @param {unknown} content */
function contentText(content) {
  if (typeof content === 'string') return content;
  if (content && typeof content === 'object' && typeof (/** @type {any} */ (content).text) === 'string') return /** @type {any} */ (content).text;
  return JSON.stringify(content);
}

/**
 * @param {string} tag
 * @param {string} [className]
 * @param {string} [text]
 */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderChatList() {
  if (!client) return;
  const list = $('chat-list');
  const chats = client.chatList();
  list.replaceChildren(
    ...chats.map((chat) => {
      const li = el('li', `chat-item${chat.chat_id === activeChat ? ' active' : ''}${chat.unread_count > 0 ? ' has-unread' : ''}`);
      li.dataset.chatId = chat.chat_id;
      li.tabIndex = 0;
      li.append(el('span', `name${chat.title ? '' : ' untitled'}`, chat.title || 'Untitled chat'));
      li.append(el('span', 'when', when(chat.last_edited_overall_timestamp)));
      const draft = draftText(chat.draft_json);
      const last = [...chat.messages].reverse().find((m) => m.seq !== null) ?? chat.messages.at(-1);
      const preview = draft
        ? el('span', 'preview draft', `Draft: ${draft}`)
        : el('span', 'preview', last ? `${last.sender_name === 'user' ? '' : `${last.sender_name}: `}${contentText(last.content)}` : '');
      li.append(preview);
      if (chat.unread_count > 0) li.append(el('span', 'badge unread', String(chat.unread_count)));
      li.addEventListener('click', () => openChat(chat.chat_id));
      li.addEventListener('keydown', (e) => {
        if (e.key === 'Enter') openChat(chat.chat_id);
      });
      return li;
    }),
  );
  $('no-chats').hidden = chats.length > 0;
}

function renderChat() {
  if (!client) return;
  const chat = activeChat ? client.chats.get(activeChat) : undefined;
  $('chat').hidden = !chat;
  $('placeholder').hidden = !!chat;
  if (!chat) return;
  const title = input('title');
  if (document.activeElement !== title && titleTimer === undefined) title.value = chat.title;
  const composer = /** @type {HTMLTextAreaElement} */ ($('composer'));
  if (draftTimer === undefined) {
    const text = draftText(chat.draft_json);
    if (composer.value !== text) composer.value = text;
  }
  $('draft-state').textContent = draftTimer !== undefined ? 'Saving draft…' : chat.draft_json ? 'Draft saved' : '';

  const box = $('messages');
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const items = chat.messages.map((m) => {
    const li = el('li', `message${m.sender_name === 'user' ? ' mine' : ''}${m.pending ? ' pending' : ''}`);
    li.dataset.messageId = m.message_id;
    const meta = m.sender_name === 'user' ? (m.pending ? 'sending…' : '') : m.sender_name;
    if (meta) li.append(el('span', 'meta', meta));
    li.append(el('span', 'text', contentText(m.content)));
    return li;
  });
  for (const s of client.streams.open(chat.chat_id)) {
    const li = el('li', 'message streaming');
    li.dataset.streamId = s.stream_id;
    const meta = el('span', 'meta', `${s.sender_name || 'reply'} · writing… `);
    const stop = el('button', 'link danger', 'stop');
    stop.addEventListener('click', () => client?.cancelStream(chat.chat_id, s.stream_id).catch((e) => toast(e.message)));
    meta.append(stop);
    li.append(meta, el('span', 'text', (s.complete ? '' : '… ') + s.text));
    items.push(li);
  }
  box.replaceChildren(...items);
  if (atBottom) box.scrollTop = box.scrollHeight;
  maybeMarkRead();
}

function maybeMarkRead() {
  if (!client || !activeChat || !markReadSupported || document.visibilityState !== 'visible') return;
  const chat = client.chats.get(activeChat);
  if (!chat || chat.unread_count === 0 || chat.read_seq >= chat.versions.messages_v) return;
  if (client.status !== 'online' || markingRead === chat.chat_id) return;
  markingRead = chat.chat_id;
  client
    .markRead(chat.chat_id)
    .catch((/** @type {any} */ e) => {
      if (e.code === 'unknown_type') markReadSupported = false; // a server without read markers
    })
    .finally(() => {
      markingRead = null;
    });
}

// ---------------------------------------------------------------------------------------------------
// Actions

/** @param {string} chatId */
async function openChat(chatId) {
  if (!client) return;
  flushTitle();
  flushDraft();
  activeChat = chatId;
  client.activeChatId = chatId;
  sessionStorage.setItem('chatsync.demo.chat', chatId);
  input('title').value = client.chat(chatId).title;
  scheduleRender();
  if (client.status === 'online' && client.chat(chatId).known) {
    try {
      await client.loadMessages(chatId);
    } catch (e) {
      if (/** @type {any} */ (e).code !== 'disconnected') toast(/** @type {Error} */ (e).message);
    }
  }
}

function newChat() {
  if (!client) return;
  const id = `chat-${randomHex(5)}`;
  client.chat(id).last_edited_overall_timestamp = Math.floor(Date.now() / 1000);
  openChat(id);
  input('title').focus();
}

function flushTitle() {
  if (titleTimer === undefined || !client || !activeChat) return;
  clearTimeout(titleTimer);
  titleTimer = undefined;
  const value = input('title').value;
  if (value !== client.chat(activeChat).title || !client.chat(activeChat).known) {
    client.updateTitle(activeChat, value).catch((e) => toast(e.message));
  }
}

function flushDraft() {
  if (draftTimer === undefined || !client || !activeChat) return;
  clearTimeout(draftTimer);
  draftTimer = undefined;
  const text = /** @type {HTMLTextAreaElement} */ ($('composer')).value;
  const chat = client.chat(activeChat);
  if (text === draftText(chat.draft_json) && chat.known) return;
  const op = text === '' ? client.deleteDraft(activeChat) : client.updateDraft(activeChat, draftFromText(text));
  op.then(() => scheduleRender()).catch((e) => toast(e.message));
}

async function send() {
  if (!client || !activeChat) return;
  const composer = /** @type {HTMLTextAreaElement} */ ($('composer'));
  const text = composer.value.trim();
  if (!text) return;
  const chatId = activeChat;
  const hadDraft = !!client.chat(chatId).draft_json;
  clearTimeout(draftTimer);
  draftTimer = undefined;
  composer.value = '';
  try {
    await client.sendMessage(chatId, text);
    if (hadDraft || client.chat(chatId).draft_json) await client.deleteDraft(chatId);
  } catch (e) {
    composer.value = text;
    toast(/** @type {Error} */ (e).message);
  }
  scheduleRender();
}

/** @param {string} text */
function toast(text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(/** @type {any} */ (t).timer);
  /** @type {any} */ (t).timer = setTimeout(() => (t.hidden = true), 4000);
}

// ---------------------------------------------------------------------------------------------------
// Wiring

input('device-id').value = deviceId();
$('signin-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const token = input('token').value.trim();
  const device = input('device-id').value.trim();
  if (token && device) signIn(token, device);
});
$('sign-out').addEventListener('click', () => showSignIn());
$('new-chat').addEventListener('click', newChat);
$('composer-form').addEventListener('submit', (e) => {
  e.preventDefault();
  send();
});
$('composer').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();
    send();
  }
});
$('composer').addEventListener('input', () => {
  clearTimeout(draftTimer);
  draftTimer = setTimeout(flushDraft, 400);
  $('draft-state').textContent = 'Saving draft…';
});
$('composer').addEventListener('blur', flushDraft);
input('title').addEventListener('input', () => {
  clearTimeout(titleTimer);
  titleTimer = setTimeout(flushTitle, 600);
});
input('title').addEventListener('keydown', (e) => {
  if (e.key === 'Enter') {
    e.preventDefault();
    flushTitle();
    input('title').blur();
  }
});
input('title').addEventListener('blur', flushTitle);
$('delete-chat').addEventListener('click', async () => {
  if (!client || !activeChat) return;
  if (!confirm('Delete this chat on every device?')) return;
  const id = activeChat;
  try {
    if (client.chat(id).known) await client.deleteChat(id);
    else client.chats.delete(id);
    activeChat = null;
    sessionStorage.removeItem('chatsync.demo.chat');
    scheduleRender();
  } catch (e) {
    toast(/** @type {Error} */ (e).message);
  }
});
input('simulate-offline').addEventListener('change', () => {
  simulatedOffline = input('simulate-offline').checked;
  if (!client) return;
  if (simulatedOffline) client.dropConnection();
  else client.reconnect();
  renderStatus();
});
document.addEventListener('visibilitychange', maybeMarkRead);
setInterval(() => client && renderChatList(), 30_000);

const saved = sessionStorage.getItem('chatsync.demo.token');
if (saved) signIn(saved, deviceId());
