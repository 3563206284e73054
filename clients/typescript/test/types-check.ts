// Compiled (never run) by the type check of scripts/sdk-test.sh: the declarations of src/index.d.ts, used
// the way an application would, under `strict`.
import { ChatSyncClient, draftFromText, ChatSyncError } from '../src/index.js';
const c = new ChatSyncClient({ token: 't', deviceId: 'd', url: 'ws://x/v1/ws' });
c.on('chat_message_added', (p, env) => { const s: number | null = p.message.seq; const t: string = env.type; void s; void t; });
c.on('status', (s) => { const x: string = s; void x; });
c.on('stream', (s) => { const t: string = s.text; void t; });
async function f() {
  const r = await c.request('get_chat_messages', { chat_id: 'a' });
  const hm: boolean = r.payload.has_more;
  await c.updateDraft('a', draftFromText('x'));
  const w = await c.sendMessage('a', 'hi');
  if (!w.queued) console.log(w.reply.type);
  try { await c.ping(); } catch (e) { if (e instanceof ChatSyncError) console.log(e.code); }
  return hm;
}
void f;
