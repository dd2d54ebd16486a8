// Chat through the official SDK, with tokens from /v1/auth/login: concurrent senders see one
// gap-free order, retries create nothing, an offline member recovers 500 messages, and typing
// and read receipts reach the other member.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { client, until, next, sleep, uniq, startProxy, account } = require('./lib');

const HTTP_URL = process.env.SB_HTTP_URL;

async function rest(method, path, token, body) {
  const resp = await fetch(`${HTTP_URL}${path}`, {
    method,
    headers: {
      'Content-Type': 'application/json',
      ...(token ? { Authorization: `Bearer ${token}` } : {}),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  return { status: resp.status, body: text ? JSON.parse(text) : null };
}

/** A room owned by `owner` with `members` invited; returns its id and channel. */
async function room(owner, members, kind = 'private') {
  const r = await rest('POST', '/v1/rooms', owner.token, { kind, name: uniq('room'), members: members.map((m) => m.id) });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return { id: r.body.id, channel: r.body.channel };
}

async function connected(user, opts = {}, url) {
  const c = client({ token: user.token, ...opts }, url);
  c.connect();
  await c.ready(5000);
  return c;
}

test('20 concurrent senders: every member sees the same gap-free order', async () => {
  const senders = await Promise.all(Array.from({ length: 20 }, (_, i) => account(`s${i}`)));
  const observers = await Promise.all([account('o1'), account('o2')]);
  const { channel } = await room(observers[0], [...senders, observers[1]]);
  const seen = [[], []];
  const clients = [];
  try {
    for (const [i, o] of observers.entries()) {
      const c = await connected(o);
      clients.push(c);
      const sub = c.newSubscription(channel);
      sub.on('publication', (ctx) => {
        if (ctx.data.type === 'message') seen[i].push(ctx);
      });
      sub.subscribe();
      await sub.ready(5000);
    }
    await Promise.all(
      senders.map(async (s, k) => {
        const c = await connected(s);
        clients.push(c);
        for (let n = 0; n < 50; n++) {
          await c.publish(channel, { text: `${k}:${n}`, client_msg_id: `${k}-${n}` });
        }
      }),
    );
    await until(() => seen[0].length === 1000 && seen[1].length === 1000, '1000 messages at both observers', 20000);
    const order = (list) => list.map((p) => `${p.offset}=${p.data.message.text}`);
    assert.deepEqual(order(seen[0]), order(seen[1]), 'both observers see one order');
    assert.deepEqual(seen[0].map((p) => p.offset), Array.from({ length: 1000 }, (_, i) => i + 1));
    // Each sender's own messages keep the order it sent them in.
    for (let k = 0; k < 20; k++) {
      const mine = seen[0].map((p) => p.data.message.text).filter((t) => t.startsWith(`${k}:`));
      assert.deepEqual(mine, Array.from({ length: 50 }, (_, n) => `${k}:${n}`));
    }
  } finally {
    clients.forEach((c) => c.disconnect());
  }
});

test('a retry with the same client_msg_id creates no duplicate', async () => {
  const a = await account('retry');
  const { id, channel } = await room(a, []);
  const c = await connected(a);
  try {
    await c.publish(channel, { text: 'once', client_msg_id: 'same' });
    await c.publish(channel, { text: 'once', client_msg_id: 'same' });
    const sent = await c.rpc('chat.send', { room: id, text: 'once', client_msg_id: 'same' });
    assert.equal(sent.data.duplicate, true);
    const page = await rest('GET', `/v1/rooms/${id}/messages`, a.token);
    assert.equal(page.body.messages.length, 1, JSON.stringify(page.body));
  } finally {
    c.disconnect();
  }
});

test('an offline member recovers 500 missed messages in order', async () => {
  const writer = await account('w');
  const reader = await account('r');
  const { id, channel } = await room(writer, [reader]);
  const proxy = await startProxy();
  const c = client({ token: reader.token, minReconnectDelay: 50, maxReconnectDelay: 300 }, proxy.url);
  const got = [];
  const subscribed = [];
  const sub = c.newSubscription(channel);
  sub.on('publication', (ctx) => got.push(ctx));
  sub.on('subscribed', (ctx) => subscribed.push(ctx));
  try {
    c.connect();
    sub.subscribe();
    await sub.ready(5000);
    const first = await rest('POST', `/v1/rooms/${id}/messages`, writer.token, { text: 'before', client_msg_id: 'b' });
    assert.equal(first.status, 201);
    await until(() => got.length === 1, 'the live message');

    proxy.block();
    const reconnecting = next(c, 'connecting');
    proxy.cut();
    await reconnecting;
    for (let n = 0; n < 500; n++) {
      const r = await rest('POST', `/v1/rooms/${id}/messages`, writer.token, { text: `m${n}`, client_msg_id: `m${n}` });
      assert.equal(r.status, 201, JSON.stringify(r.body));
    }
    proxy.unblock();
    await until(() => subscribed.length === 2, 'the resubscribe', 10000);
    assert.equal(subscribed[1].recovered, true, 'recovered from the store');
    await until(() => got.length >= 501, '500 recovered messages', 10000);
    await sleep(200);
    assert.equal(got.length, 501);
    assert.deepEqual(got.slice(1).map((p) => p.data.message.text), Array.from({ length: 500 }, (_, n) => `m${n}`));
    assert.deepEqual(got.map((p) => p.offset), Array.from({ length: 501 }, (_, i) => i + 1));
  } finally {
    c.disconnect();
    await proxy.close();
  }
});

test('typing and read receipts reach the other member', async () => {
  const a = await account('ta');
  const b = await account('tb');
  const r = await rest('POST', '/v1/rooms', a.token, { kind: 'direct', members: [b.id] });
  const { id, channel } = r.body;
  const ca = await connected(a);
  const cb = await connected(b);
  const atA = [];
  try {
    const sa = ca.newSubscription(channel);
    sa.on('publication', (ctx) => atA.push(ctx.data));
    sa.subscribe();
    await sa.ready(5000);
    const sb = cb.newSubscription(channel);
    sb.subscribe();
    await sb.ready(5000);
    await cb.rpc('chat.typing', { room: id });
    await until(() => atA.some((d) => d.type === 'typing' && d.user_id === b.id), "b's typing at a");
    await ca.publish(channel, { text: 'seen?', client_msg_id: 'q' });
    await until(() => atA.some((d) => d.type === 'message'), 'the message');
    await cb.rpc('chat.read', { room: id, offset: 1 });
    await until(() => atA.some((d) => d.type === 'read' && d.user_id === b.id && d.offset === 1), "b's receipt at a");
  } finally {
    ca.disconnect();
    cb.disconnect();
  }
});

test('a profane message is removed within 500 ms and members receive the removal', async () => {
  const a = await account('ma');
  const b = await account('mb');
  const { id, channel } = await room(a, [b]);
  const ca = await connected(a);
  const cb = await connected(b);
  const atB = [];
  try {
    const sb = cb.newSubscription(channel);
    sb.on('publication', (ctx) => atB.push({ at: Date.now(), data: ctx.data, offset: ctx.offset }));
    sb.subscribe();
    await sb.ready(5000);
    await ca.publish(channel, { text: 'this is shit', client_msg_id: 'bad-1' });
    const acked = Date.now();
    await until(() => atB.some((p) => p.data.type === 'removed'), 'the removal event', 5000);
    const removed = atB.find((p) => p.data.type === 'removed');
    const original = atB.find((p) => p.data.type === 'message');
    assert.ok(removed.at - acked < 500, `removed after ${removed.at - acked} ms`);
    assert.equal(removed.data.message_id, original.data.message.id);
    assert.equal(removed.offset, original.offset + 1, 'the removal is the next event in the stream');
    assert.equal(removed.data.message.text, null, 'the removed text is withheld');
    const page = await rest('GET', `/v1/rooms/${id}/messages`, a.token);
    assert.equal(page.body.messages[0].removed, true);
  } finally {
    ca.disconnect();
    cb.disconnect();
  }
});
