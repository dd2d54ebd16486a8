// Node loss behind nginx, with the real centrifuge SDK. Run by crates/server/tests/cluster.rs
// (not by the single-server suite: the file name does not match *.test.js). The cluster test
// starts 3 nodes and nginx in front of them, and tells us the chat channel, its members and
// the pid of the node to kill.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { mint, client } = require('./lib.js');

const CHANNEL = process.env.SB_CHANNEL;
const USERS = JSON.parse(process.env.SB_USERS || '[]');
const VICTIM_PID = Number(process.env.SB_VICTIM_PID);
const VICTIM_HTTP = process.env.SB_VICTIM_HTTP;
const API_KEY = process.env.SB_API_KEY;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, check, ms) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** Connections open on the node that is going to be killed. */
async function victimClients() {
  const resp = await fetch(`${VICTIM_HTTP}/api/info`, {
    method: 'POST',
    headers: { 'X-API-Key': API_KEY, 'Content-Type': 'application/json' },
    body: '{}',
  });
  const json = await resp.json();
  return json.result.nodes[0].num_clients;
}

const FAST = { minReconnectDelay: 100, maxReconnectDelay: 1000 };

test('clients of a killed node move through nginx, recover, and miss no chat message', async (t) => {
  assert.ok(CHANNEL && USERS.length >= 4 && VICTIM_PID, 'cluster environment is set');

  const subs = [];
  // Pass or fail, no client may keep the process alive by reconnecting.
  t.after(() => {
    for (const r of subs) r.c.disconnect();
  });
  for (const user of USERS.slice(1)) {
    const c = client({ token: mint(String(user)), ...FAST });
    const s = c.newSubscription(CHANNEL);
    const rec = { user, offsets: [], ids: [], subscribed: [], c };
    s.on('publication', (ctx) => {
      rec.offsets.push(Number(ctx.offset));
      rec.ids.push(ctx.data && ctx.data.message ? ctx.data.message.client_msg_id : null);
    });
    s.on('subscribed', (ctx) =>
      rec.subscribed.push({ wasRecovering: ctx.wasRecovering, recovered: ctx.recovered }),
    );
    s.subscribe();
    c.connect();
    subs.push(rec);
  }
  await until('every subscriber subscribed', () => subs.every((r) => r.subscribed.length === 1), 10000);
  const onVictim = await victimClients();
  assert.ok(onVictim >= 1, `nginx spread the clients: ${onVictim} on the node to kill`);

  // The sender retries each message with the same client_msg_id until it is acknowledged.
  const sender = client({ token: mint(String(USERS[0])), ...FAST });
  t.after(() => sender.disconnect());
  sender.connect();
  await sender.ready(5000);
  const acked = [];
  let stop = false;
  const sending = (async () => {
    for (let n = 0; !stop; n++) {
      const id = `m${n}`;
      for (;;) {
        try {
          await sender.ready(10000);
          await sender.publish(CHANNEL, { text: `message ${n}`, client_msg_id: id });
          acked.push(id);
          break;
        } catch (e) {
          await sleep(50);
        }
      }
      await sleep(10);
    }
  })();

  await sleep(1500);
  process.kill(VICTIM_PID, 'SIGKILL');
  const moved = () => subs.filter((r) => r.subscribed.length > 1);
  await until('the killed node\'s subscribers to come back', () => moved().length >= 1, 15000);
  await sleep(2000);
  stop = true;
  await sending;

  const last = acked.length;
  assert.ok(last > 50, `messages were acknowledged throughout (${last})`);
  await until(
    'every subscriber to receive every acknowledged message',
    () => subs.every((r) => acked.every((id) => r.ids.includes(id))),
    15000,
  ).catch((e) => {
    for (const r of subs) {
      const missing = acked.filter((id) => !r.ids.includes(id));
      console.log(`user ${r.user}: ${r.ids.length} received, missing ${missing.length}: ${missing.slice(0, 10)}`);
    }
    throw e;
  });

  for (const r of subs) {
    assert.equal(r.offsets[0], 1, `user ${r.user} starts at the first message`);
    r.offsets.forEach((o, i) => assert.equal(o, i + 1, `user ${r.user}: offsets consecutive, no gap, no duplicate`));
    assert.equal(new Set(r.ids).size, r.ids.length, `user ${r.user}: no message twice`);
  }
  assert.ok(moved().length >= 1, 'a subscriber was on the killed node');
  for (const r of moved()) {
    for (const s of r.subscribed.slice(1)) {
      assert.equal(s.wasRecovering, true, `user ${r.user} resubscribed recovering`);
      assert.equal(s.recovered, true, `user ${r.user}: the SDK reports recovered`);
    }
  }
  console.log(`acknowledged ${last}; ${moved().length} subscriber(s) moved off the killed node and recovered`);
});
