// @ts-check
/**
 * @file End-to-end test of the web demo in headless Chromium (run by `scripts/web-e2e.sh`, which
 * installs Debian's chromium and playwright-core and builds the server): two browser contexts are two
 * devices of one user; a title, a draft and a message made in one appear in the other (and a message
 * back), and a title edited while "offline" reaches the other once back online; a message posted by
 * the backend (`/v1/api`) shows an unread badge in both windows until one opens the chat; a reply the
 * backend streams through `/v1/api` renders word by word, and its stop button cancels the stream on the
 * server; a message queued offline and left unsent by one user is not sent by the next user signing in
 * on the same browser and device id, but by the first once back; a chat deleted on another device while
 * open in a window does not come back there after a reconnection or a reload. Screenshots go to `target/web-demo-{laptop,phone,unread,stream}.png`.
 *
 * Environment: PLAYWRIGHT_CORE_DIR (where `node_modules/playwright-core` is), CHROMIUM (default
 * /usr/bin/chromium), CHATSYNC_BIN (see server.js), SCREENSHOT_DIR (default `<repo>/target`).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from './server.js';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const playwrightDir = process.env.PLAYWRIGHT_CORE_DIR;
if (!playwrightDir) throw new Error('PLAYWRIGHT_CORE_DIR is not set: run scripts/web-e2e.sh');
const { chromium } = createRequire(join(resolve(playwrightDir), 'noop.js'))('playwright-core');
const screenshots = process.env.SCREENSHOT_DIR ?? join(repo, 'target');

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
/** @type {import('playwright-core').Browser} */
let browser;

before(async () => {
  server = await startServer();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
    ],
  });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

/**
 * A browser window signed in as `user` on `device` (a context of its own: separate storage, like a
 * second device).
 * @param {string} user
 * @param {string} device
 */
async function window(user, device) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  const page = await context.newPage();
  /** @type {string[]} */
  const errors = [];
  page.on('pageerror', (e) => errors.push(`${device}: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`${device} console: ${m.text()}`);
  });
  await page.goto(`${server.http}/`);
  await page.fill('#token', server.token(user, device));
  await page.fill('#device-id', device);
  await page.click('#sign-in');
  await page.waitForSelector('#status[data-status="online"]');
  return { page, errors };
}

/**
 * Waits until `fn(arg)` is true in the page.
 * @param {import('playwright-core').Page} page
 * @param {(arg: any) => boolean} fn
 * @param {unknown} [arg]
 */
function until(page, fn, arg) {
  return page.waitForFunction(fn, arg);
}

test('two windows of one user sync titles, drafts and messages', { timeout: 120_000 }, async () => {
  const laptop = await window('alice', 'laptop');
  const phone = await window('alice', 'phone');
  const a = laptop.page;
  const b = phone.page;

  // A title made on the laptop appears in the phone's chat list.
  await a.click('#new-chat');
  await a.fill('#title', 'Trip to Lisbon');
  await a.press('#title', 'Enter');
  const item = b.locator('.chat-item', { hasText: 'Trip to Lisbon' });
  await item.waitFor();
  await item.click();
  await until(b, () => /** @type {HTMLInputElement} */ (document.querySelector('#title')).value === 'Trip to Lisbon');

  // A draft typed on the laptop appears in the phone's composer and chat list.
  await a.fill('#composer', 'Pack sunscreen');
  await until(b, () => /** @type {HTMLTextAreaElement} */ (document.querySelector('#composer')).value === 'Pack sunscreen');
  await b.locator('.chat-item .preview.draft', { hasText: 'Draft: Pack sunscreen' }).waitFor();

  // A message sent on the laptop appears on the phone; the draft is cleared on both.
  await a.fill('#composer', 'Booked the flights');
  await a.click('#send');
  await b.locator('.message .text', { hasText: 'Booked the flights' }).waitFor();
  await until(b, () => /** @type {HTMLTextAreaElement} */ (document.querySelector('#composer')).value === '');
  await a.locator('.message:not(.pending) .text', { hasText: 'Booked the flights' }).waitFor();

  // And back: the phone answers with Enter.
  await b.fill('#composer', 'See you there');
  await b.press('#composer', 'Enter');
  await a.locator('.message .text', { hasText: 'See you there' }).waitFor();

  // Offline on the laptop: the edit is queued, shown at once, and reaches the phone once back online.
  await a.check('#simulate-offline');
  await a.waitForSelector('#status[data-status="offline"]');
  await a.fill('#title', 'Trip to Porto');
  await a.press('#title', 'Enter');
  await a.locator('#status', { hasText: '1 queued' }).waitFor();
  await a.locator('.chat-item .name', { hasText: 'Trip to Porto' }).waitFor();
  assert.equal(await b.locator('.chat-item .name', { hasText: 'Trip to Porto' }).count(), 0, 'not before the laptop is back');
  await a.uncheck('#simulate-offline');
  await a.waitForSelector('#status[data-status="online"]');
  await b.locator('.chat-item .name', { hasText: 'Trip to Porto' }).waitFor();

  // The two windows hold the same chat, in the same state.
  const state = (/** @type {import('playwright-core').Page} */ p) =>
    p.evaluate(() => ({
      chats: [...document.querySelectorAll('.chat-item .name')].map((e) => e.textContent),
      messages: [...document.querySelectorAll('.message .text')].map((e) => e.textContent),
    }));
  assert.deepEqual(await state(a), await state(b));
  assert.deepEqual((await state(a)).messages, ['Booked the flights', 'See you there']);

  mkdirSync(screenshots, { recursive: true });
  await a.screenshot({ path: join(screenshots, 'web-demo-laptop.png') });
  await b.screenshot({ path: join(screenshots, 'web-demo-phone.png') });
  assert.deepEqual([...laptop.errors, ...phone.errors], [], 'no script errors in either window');
});

test('a backend message shows an unread badge in every window until one of them opens the chat', { timeout: 120_000 }, async () => {
  const laptop = await window('hal', 'laptop');
  const phone = await window('hal', 'phone');
  const posted = await server.postMessage('hal', 'news', { message_id: 'n1', sender_name: 'assistant', content: 'Your report is ready' });
  assert.equal(posted.status, 201, JSON.stringify(posted.body));
  for (const { page } of [laptop, phone]) {
    const news = page.locator('.chat-item[data-chat-id="news"]');
    await news.locator('.badge.unread', { hasText: '1' }).waitFor();
    assert.match((await news.locator('.preview').textContent()) ?? '', /assistant: Your report is ready/);
  }
  mkdirSync(screenshots, { recursive: true });
  await phone.page.screenshot({ path: join(screenshots, 'web-demo-unread.png') });
  // Opening it on the laptop marks it read (mark_read): the badge goes on both.
  await laptop.page.click('.chat-item[data-chat-id="news"]');
  await laptop.page.locator('.message .text', { hasText: 'Your report is ready' }).waitFor();
  await laptop.page.locator('.chat-item[data-chat-id="news"] .badge.unread').waitFor({ state: 'detached' });
  await phone.page.locator('.chat-item[data-chat-id="news"] .badge.unread').waitFor({ state: 'detached' });
  assert.deepEqual([...laptop.errors, ...phone.errors], []);
});

test('streamed replies show word by word, and stop cancels the stream', { timeout: 120_000 }, async () => {
  // The backend streams a reply through the server API (SERVER_API.md section 4); the page shows it as it
  // grows, and its stop button sends `cancel_stream`, which ends the stream on the server.
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  const page = await context.newPage();
  /** @type {string[]} */
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${server.http}/`);
  await page.fill('#token', server.token('gus', 'laptop'));
  await page.fill('#device-id', 'laptop');
  await page.click('#sign-in');
  await page.waitForSelector('#status[data-status="online"]');
  await page.click('#new-chat');
  await page.fill('#title', 'Ask the assistant');
  await page.press('#title', 'Enter');
  await page.locator('.chat-item.active', { hasText: 'Ask the assistant' }).waitFor();
  const chatId = /** @type {string} */ (await page.getAttribute('.chat-item.active', 'data-chat-id'));

  // A reply streams in, word by word, into the open chat.
  const streams = `/users/gus/chats/${encodeURIComponent(chatId)}/streams`;
  const chunk = (/** @type {number} */ seq, /** @type {string} */ delta) => server.api('POST', `${streams}/s1/chunks`, { seq, delta });
  assert.equal((await server.api('POST', streams, { stream_id: 's1', message_id: 'm-s1', sender_name: 'assistant' })).status, 201);
  assert.equal((await chunk(1, 'Hello')).status, 202);
  await page.locator('.message.streaming .text', { hasText: 'Hello' }).waitFor();
  assert.equal((await chunk(2, ', wor')).status, 202);
  assert.equal((await chunk(2, 'IGNORED')).status, 200, 'a repeated seq is ignored');
  assert.equal((await chunk(3, 'ld')).status, 202);
  await page.locator('.message.streaming .text', { hasText: 'Hello, world' }).waitFor();
  assert.equal(await page.textContent('.message.streaming .text'), 'Hello, world');
  assert.match(await page.textContent('.message.streaming .meta') ?? '', /assistant/);
  mkdirSync(screenshots, { recursive: true });
  await page.screenshot({ path: join(screenshots, 'web-demo-stream.png') });
  await page.click('.message.streaming button');
  await page.locator('.message.streaming').waitFor({ state: 'detached' });
  assert.equal((await chunk(4, '!')).status, 409, 'the stream was cancelled on the server');

  assert.deepEqual(errors, []);
  await context.close();
});

test('a wrong token shows the server\'s reason on the sign-in form', { timeout: 60_000 }, async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${server.http}/`);
  await page.fill('#token', 'cs_wrong');
  await page.fill('#device-id', 'tablet');
  await page.click('#sign-in');
  await page.locator('#signin-error', { hasText: 'Invalid session' }).waitFor();
  assert.equal(await page.isVisible('#signin'), true);
  await context.close();
});

test('what one user queued and left unsent is never sent as the next user of the browser', { timeout: 120_000 }, async () => {
  // One browser profile, one device id (the page prefills the same one for every sign-in): Ada queues a
  // message offline and signs out; Ben signs in on the same device id. Ada's message must not reach
  // Ben's account (it waits for Ada's token), and it is sent once Ada signs in again.
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  const page = await context.newPage();
  /** @type {string[]} */
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  const ada = server.token('ada', 'shared');
  const signIn = async (/** @type {string} */ token) => {
    await page.fill('#token', token);
    await page.fill('#device-id', 'shared');
    await page.click('#sign-in');
  };
  await page.goto(`${server.http}/`);
  await signIn(ada);
  await page.waitForSelector('#status[data-status="online"]');
  await page.check('#simulate-offline');
  await page.waitForSelector('#status[data-status="offline"]');
  await page.click('#new-chat');
  await page.fill('#composer', 'for Ada only');
  await page.press('#composer', 'Enter');
  await page.locator('#status', { hasText: '1 queued' }).waitFor();
  await page.click('#sign-out');

  await signIn(server.token('ben', 'shared'));
  await page.uncheck('#simulate-offline');
  await page.waitForSelector('#status[data-status="online"]');
  assert.equal((await server.api('GET', '/users/ben')).body.chat_count, 0, "Ada's queued message went into Ben's account");
  assert.equal(await page.locator('.chat-item').count(), 0);

  await page.click('#sign-out');
  await signIn(ada);
  await page.waitForSelector('#status[data-status="online"]');
  await page.locator('.chat-item .preview', { hasText: 'for Ada only' }).waitFor();
  assert.equal((await server.api('GET', '/users/ada')).body.chat_count, 1);
  assert.deepEqual(errors, []);
  await context.close();
});

test('a chat deleted on another device does not come back in the window that had it open', { timeout: 120_000 }, async () => {
  const laptop = await window('dora', 'laptop');
  const phone = await window('dora', 'phone');
  const a = laptop.page;
  const b = phone.page;
  await a.click('#new-chat');
  await a.fill('#title', 'Soon gone');
  await a.press('#title', 'Enter');
  await b.locator('.chat-item', { hasText: 'Soon gone' }).click();
  await until(b, () => /** @type {HTMLInputElement} */ (document.querySelector('#title')).value === 'Soon gone');

  b.once('dialog', (d) => d.accept());
  await b.click('#delete-chat');
  await a.locator('.chat-item').waitFor({ state: 'detached' });
  assert.equal(await a.isVisible('#chat'), false);

  // Reconnected (its chat in view was deleted meanwhile), and reloaded: still gone, not an empty
  // "Untitled chat" that every write would meet as not found.
  await a.check('#simulate-offline');
  await a.waitForSelector('#status[data-status="offline"]');
  await a.uncheck('#simulate-offline');
  await a.waitForSelector('#status[data-status="online"]');
  await a.evaluate(() => new Promise((resolve) => requestAnimationFrame(resolve)));
  assert.equal(await a.locator('.chat-item').count(), 0, 'the deleted chat is back after a reconnection');
  assert.equal(await a.isVisible('#chat'), false);
  await a.reload();
  await a.waitForSelector('#status[data-status="online"]');
  await a.evaluate(() => new Promise((resolve) => requestAnimationFrame(resolve)));
  assert.equal(await a.locator('.chat-item').count(), 0, 'the deleted chat is back after a reload');
  assert.deepEqual([...laptop.errors, ...phone.errors], []);
});
