// echo-backend: the smallest application backend for chatsync (SERVER_API.md), Node 18+ standard library
// only. It receives chatsync's webhooks, verifies their signature, and answers every message a user's
// device sends with an "assistant" message through the server API (section 3), which chatsync stores and
// delivers to all of the user's devices.
//
//   CHATSYNC_WEBHOOK_SECRET=…  CHATSYNC_API_KEY=…  node echo-backend.mjs
//   chatsync serve --webhook-url http://127.0.0.1:8787/webhook   (with the same CHATSYNC_WEBHOOK_SECRET)
//
// Environment: PORT (default 8787), CHATSYNC_WEBHOOK_SECRET (required), CHATSYNC_API_KEY (required to
// reply), CHATSYNC_API_URL (default http://127.0.0.1:8080).
//
// Delivery is at least once: the reply's message_id is derived from the user's message_id, so a redelivered
// event posts the same reply again and chatsync reports it as a duplicate instead of storing it twice. The
// webhook is answered 2xx only once the reply is stored; otherwise chatsync retries it later.

import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";

const PORT = Number(process.env.PORT ?? 8787);
const SECRET = process.env.CHATSYNC_WEBHOOK_SECRET;
const API_URL = (process.env.CHATSYNC_API_URL ?? "http://127.0.0.1:8080").replace(/\/$/, "");
const API_KEY = process.env.CHATSYNC_API_KEY;
const MAX_BODY = 1 << 20;

if (!SECRET) {
  console.error("echo-backend: set CHATSYNC_WEBHOOK_SECRET (the value chatsync signs with)");
  process.exit(2);
}

/** True when `header` is `sha256=<hex HMAC-SHA256(SECRET, raw)>`, compared in constant time. */
export function validSignature(raw, header, secret = SECRET) {
  if (typeof header !== "string" || !header.startsWith("sha256=")) return false;
  const given = Buffer.from(header.slice("sha256=".length), "hex");
  const expected = createHmac("sha256", secret).update(raw).digest();
  return given.length === expected.length && timingSafeEqual(given, expected);
}

/** The text of a message's content: a string, or an object's `text` field, or its JSON. */
function textOf(content) {
  if (typeof content === "string") return content;
  if (content && typeof content.text === "string") return content.text;
  return JSON.stringify(content);
}

/** Posts the reply to `event` (a `message.created`) through the server API; returns the HTTP status. */
async function reply(event) {
  if (!API_KEY) throw new Error("CHATSYNC_API_KEY is not set: cannot reply");
  const path = `/v1/api/users/${encodeURIComponent(event.user_id)}/chats/${encodeURIComponent(event.chat_id)}/messages`;
  const response = await fetch(API_URL + path, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify({
      // Ids are at most 128 characters (PROTOCOL.md): keep the derived one within that.
      message_id: `echo-${event.message_id}`.slice(0, 128),
      sender_name: "assistant",
      content: `echo: ${textOf(event.content)}`,
    }),
  });
  return response.status;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on("data", (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(new Error("body too large"));
        req.destroy();
      } else {
        chunks.push(chunk);
      }
    });
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

const server = createServer(async (req, res) => {
  const answer = (status, text) => {
    res.writeHead(status, { "content-type": "text/plain" });
    res.end(text + "\n");
  };
  if (req.method !== "POST") return answer(405, "POST only");
  let raw;
  try {
    raw = await readBody(req);
  } catch {
    return answer(413, "too large");
  }
  // Verify the raw bytes before parsing anything.
  if (!validSignature(raw, req.headers["x-chatsync-signature"])) return answer(401, "bad signature");
  let event;
  try {
    event = JSON.parse(raw.toString("utf8"));
  } catch {
    return answer(400, "not JSON");
  }
  const id = req.headers["x-chatsync-delivery"];
  // Log the event's type and ids, not its content.
  console.log(`event ${event.type} id=${id} user=${event.user_id} chat=${event.chat_id}`);
  if (event.type !== "message.created") return answer(200, "ignored");
  try {
    const status = await reply(event);
    if (status === 200 || status === 201) return answer(200, "replied");
    console.error(`reply to ${id} failed: HTTP ${status}; chatsync will redeliver`);
    return answer(502, "reply failed");
  } catch (e) {
    console.error(`reply to ${id} failed: ${e.message}; chatsync will redeliver`);
    return answer(502, "reply failed");
  }
});

server.listen(PORT, "127.0.0.1", () => console.log(`echo-backend listening on http://127.0.0.1:${PORT}/webhook`));
