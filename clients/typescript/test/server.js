// @ts-check
/**
 * @file The real chatsync server for the SDK's integration tests and the browser test: runs
 * `chatsync serve` on port 0 with a fresh data directory, reads its URL from the log, and issues users
 * and tokens with the CLI (`users add`, `sessions issue`). The binary is `$CHATSYNC_BIN`, else
 * `$CARGO_TARGET_DIR/debug/chatsync`, else `target/debug/chatsync` of this repository (build it first:
 * `cargo build -p chatsync --bin chatsync`). It also plays the application backend: an API key from
 * `chatsync api-keys create`, messages posted through `/v1/api` (SERVER_API.md §3).
 */
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** The chatsync binary to run. */
export function binary() {
  const bin =
    process.env.CHATSYNC_BIN ?? join(process.env.CARGO_TARGET_DIR ?? join(repo, 'target'), 'debug', 'chatsync');
  if (!existsSync(bin)) {
    throw new Error(`no chatsync binary at ${bin}: run \`cargo build -p chatsync --bin chatsync\` or set CHATSYNC_BIN`);
  }
  return bin;
}

/** The environment of a child: no CHATSYNC_* or RUST_LOG of the caller leaks in. */
function childEnv() {
  /** @type {Record<string, string>} */
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v !== undefined && !k.startsWith('CHATSYNC_') && k !== 'RUST_LOG') env[k] = v;
  }
  return env;
}

/**
 * Starts a server; `extraArgs` go after `serve`.
 * @param {string[]} [extraArgs]
 */
export async function startServer(extraArgs = []) {
  const bin = binary();
  const dir = mkdtempSync(join(tmpdir(), 'chatsync-sdk-'));
  const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dir, '--durability', 'normal', ...extraArgs], {
    env: childEnv(),
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  /** @type {string[]} */
  const log = [];
  const url = await new Promise((resolvePromise, reject) => {
    const lines = createInterface({ input: /** @type {import('node:stream').Readable} */ (child.stderr) });
    let found = false;
    lines.on('line', (line) => {
      log.push(line);
      const m = /ws:\/\/[^\s"]+/.exec(line);
      if (m && !found) {
        found = true;
        resolvePromise(m[0]);
      }
    });
    child.on('exit', (code) => {
      if (!found) reject(new Error(`chatsync serve exited (${code}) before listening:\n${log.join('\n')}`));
    });
  });
  const users = new Set();
  /** @type {string | undefined} */
  let apiKey;
  const cli = (/** @type {string[]} */ ...args) =>
    execFileSync(bin, ['--data-dir', dir, ...args], { env: childEnv(), encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  return {
    /** `ws://127.0.0.1:PORT/v1/ws` */
    url: /** @type {string} */ (url),
    /** `http://127.0.0.1:PORT` */
    http: /** @type {string} */ (url).replace(/^ws:/, 'http:').replace(/\/v1\/ws$/, ''),
    dir,
    log,
    /**
     * A token for `user` (created on first use), bound to `deviceId` when given.
     * @param {string} user
     * @param {string} [deviceId]
     */
    token(user, deviceId) {
      if (!users.has(user)) {
        cli('users', 'add', user);
        users.add(user);
      }
      return cli('sessions', 'issue', user, ...(deviceId ? ['--device-id', deviceId] : []));
    },
    /**
     * Posts a message from another sender (the application backend) into a user's chat; returns the
     * HTTP status and the JSON body.
     * @param {string} user
     * @param {string} chatId
     * @param {{message_id: string, sender_name: string, content: unknown}} body
     */
    postMessage(user, chatId, body) {
      return this.api('POST', `/users/${encodeURIComponent(user)}/chats/${encodeURIComponent(chatId)}/messages`, body);
    },
    /**
     * A request to the server API (`/v1/api` + `path`) with this server's API key; returns the HTTP
     * status and the JSON body (`null` when there is none).
     * @param {string} method
     * @param {string} path
     * @param {unknown} [body]
     */
    async api(method, path, body) {
      apiKey ??= cli('api-keys', 'create', '--name', 'sdk-tests');
      const base = /** @type {string} */ (url).replace(/^ws:/, 'http:').replace(/\/v1\/ws$/, '');
      const res = await fetch(`${base}/v1/api${path}`, {
        method,
        headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await res.text();
      return { status: res.status, body: text ? JSON.parse(text) : null };
    },
    /** Stops the server and removes its data. */
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
