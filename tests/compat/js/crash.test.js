// kill -9 during a burst of SDK sends: every message acknowledged before the kill is there
// after a restart. The test runs its own server process (SB_BIN serve) so it can kill it; it
// uses SQLite in a temp dir, or SB_DATABASE_URL when set (the PostgreSQL run).
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { client, sleep, uniq } = require('./lib');


const BIN = process.env.SB_BIN;
const SECRET = 'js-crash-secret';

async function freePort() {
  const srv = net.createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

async function start(dataDir) {
  const port = await freePort();
  const env = {
    ...process.env,
    SWITCHBOARD_LISTEN: `127.0.0.1:${port}`,
    SWITCHBOARD_DATA_DIR: dataDir,
    SWITCHBOARD_TOKEN_HMAC_SECRET: SECRET,
    SWITCHBOARD_API_KEY: 'k',
    SWITCHBOARD_LOG: 'warn',
    SWITCHBOARD_ACCOUNTS__PASSWORD_HASH_COST: 'test',
  };
  if (process.env.SB_DATABASE_URL) env.SWITCHBOARD_DATABASE_URL = process.env.SB_DATABASE_URL;
  const proc = spawn(BIN, ['serve'], { env, stdio: 'ignore' });
  const http = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 100; i++) {
    try {
      if ((await fetch(`${http}/healthz`)).ok) return { proc, http, ws: `ws://127.0.0.1:${port}/connection/websocket` };
    } catch (_) {}
    await sleep(50);
  }
  proc.kill('SIGKILL');
  throw new Error('server did not start');
}

async function rest(base, method, p, token, body) {
  const resp = await fetch(`${base}${p}`, {
    method,
    headers: { 'Content-Type': 'application/json', ...(token ? { Authorization: `Bearer ${token}` } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  return { status: resp.status, body: text ? JSON.parse(text) : null };
}

async function account(base, prefix) {
  const username = uniq(prefix).slice(0, 32).replace(/[^a-zA-Z0-9_.-]/g, '_');
  const password = 'correct horse battery';
  const reg = await rest(base, 'POST', '/v1/auth/register', null, { username, password, display_name: prefix });
  assert.equal(reg.status, 201, JSON.stringify(reg.body));
  const login = await rest(base, 'POST', '/v1/auth/login', null, { username, password });
  assert.equal(login.status, 200, JSON.stringify(login.body));
  return { id: login.body.user.id, username, password, token: login.body.access_token };
}

test('kill -9 mid-burst loses no acknowledged message', async () => {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-js-crash-'));
  let server = await start(dataDir);
  const users = [];
  for (let i = 0; i < 3; i++) users.push(await account(server.http, `k${i}`));
  const r = await rest(server.http, 'POST', '/v1/rooms', users[0].token, {
    kind: 'private', name: 'crash', members: users.slice(1).map((u) => u.id),
  });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  const { id, channel } = r.body;

  const acked = new Set();
  const clients = users.map((u) => client({ token: u.token, maxReconnectDelay: 60000, minReconnectDelay: 60000 }, server.ws));
  clients.forEach((c) => c.connect());
  await Promise.all(clients.map((c) => c.ready(5000)));
  const bursts = clients.map(async (c, k) => {
    for (let n = 0; ; n++) {
      const cmid = `${k}-${n}`;
      try {
        await c.publish(channel, { text: `burst ${cmid}`, client_msg_id: cmid });
      } catch (_) {
        return; // the server died under this publish: not acknowledged
      }
      acked.add(cmid);
    }
  });
  // Kill once the burst is well under way, however fast this machine is today.
  const deadline = Date.now() + 15000;
  while (acked.size < 100 && Date.now() < deadline) await sleep(10);
  server.proc.kill('SIGKILL');
  await Promise.race([Promise.all(bursts), sleep(6000)]);
  clients.forEach((c) => c.disconnect());
  assert.ok(acked.size > 30, `too few acknowledged sends to mean anything: ${acked.size}`);

  server = await start(dataDir);
  try {
    const login = await rest(server.http, 'POST', '/v1/auth/login', null, { username: users[0].username, password: users[0].password });
    const token = login.body.access_token;
    const stored = new Set();
    let after = 0;
    for (;;) {
      const page = await rest(server.http, 'GET', `/v1/rooms/${id}/messages?after=${after}&limit=500`, token);
      assert.equal(page.status, 200, JSON.stringify(page.body));
      const msgs = page.body.messages;
      if (msgs.length === 0) break;
      msgs.forEach((m) => stored.add(m.client_msg_id));
      after = msgs[msgs.length - 1].offset;
    }
    const lost = [...acked].filter((x) => !stored.has(x));
    assert.deepEqual(lost, [], `acknowledged but lost after kill -9 (acked ${acked.size}, stored ${stored.size})`);
  } finally {
    server.proc.kill('SIGKILL');
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
});
