// The official centrifuge JS SDK against Switchboard: connect, subscribe, publish (client and
// server API), server-side subscriptions, join/leave, presence, history and RPC.
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { mint, client, api, uniq, until, next } = require('./lib');

const clients = [];
/** A connected client for `user`; disconnected when the file's tests end. */
async function connected(user, opts = {}) {
  const c = client({ token: mint(user), ...opts });
  clients.push(c);
  const ctx = next(c, 'connected');
  c.connect();
  await c.ready(5000);
  return { c, ctx: await ctx };
}
after(() => {
  for (const c of clients) {
    c.disconnect();
  }
});

/** A subscription that records its publications, join and leave events. */
async function subscribed(c, channel, opts = {}) {
  const sub = c.newSubscription(channel, opts);
  const log = { pubs: [], joins: [], leaves: [], subscribed: [] };
  sub.on('publication', (ctx) => log.pubs.push(ctx));
  sub.on('join', (ctx) => log.joins.push(ctx));
  sub.on('leave', (ctx) => log.leaves.push(ctx));
  sub.on('subscribed', (ctx) => log.subscribed.push(ctx));
  sub.subscribe();
  await sub.ready(5000);
  return { sub, log };
}

test('connects with a token from `switchboard token`', async () => {
  const { c, ctx } = await connected('js-u1');
  assert.equal(c.state, 'connected');
  assert.equal(typeof ctx.client, 'string');
  assert.ok(ctx.client.length > 0, 'connect reply carries a client id');
  assert.equal(ctx.transport, 'websocket');
});

test('subscribes and receives publications from client publish and /api/publish', async () => {
  const channel = uniq('news');
  const { c: reader } = await connected('js-reader');
  const { c: writer } = await connected('js-writer');
  const { log } = await subscribed(reader, channel);
  assert.equal(log.subscribed.length, 1);

  await writer.publish(channel, { from: 'client', n: 1 });
  await until(() => log.pubs.length >= 1, 'the client publication');
  const apiResult = await api('publish', { channel, data: { from: 'api', n: 2 } });
  await until(() => log.pubs.length >= 2, 'the API publication');

  assert.deepEqual(
    log.pubs.map((p) => p.data),
    [{ from: 'client', n: 1 }, { from: 'api', n: 2 }],
  );
  // History is on by default, so publications carry offsets, strictly increasing.
  assert.equal(typeof log.pubs[0].offset, 'number', 'publication offset');
  assert.equal(log.pubs[1].offset, log.pubs[0].offset + 1);
  assert.equal(Number(apiResult.offset), log.pubs[1].offset, '/api/publish returns the offset');
  assert.equal(typeof apiResult.epoch, 'string');
  // A client publication says who published it.
  assert.equal(log.pubs[0].info && log.pubs[0].info.user, 'js-writer');
});

test('subscription.publish() reaches the publisher itself and others', async () => {
  const channel = uniq('echo');
  const { c: a } = await connected('js-a');
  const { c: b } = await connected('js-b');
  const { sub: subA, log: logA } = await subscribed(a, channel);
  const { log: logB } = await subscribed(b, channel);
  await subA.publish({ hello: 'world' });
  await until(() => logA.pubs.length === 1 && logB.pubs.length === 1, 'the publication on both');
  assert.deepEqual(logA.pubs[0].data, { hello: 'world' });
  assert.deepEqual(logB.pubs[0].data, { hello: 'world' });
});

test('server-side subscriptions from the token `channels` claim', async () => {
  const channel = uniq('personal');
  const c = client({ token: mint('js-server-sub', '1h', ['--channel', channel]) });
  clients.push(c);
  const subs = [];
  const pubs = [];
  c.on('subscribed', (ctx) => subs.push(ctx.channel));
  c.on('publication', (ctx) => pubs.push(ctx));
  c.connect();
  await c.ready(5000);
  await until(() => subs.includes(channel), `server-side subscription to ${channel}`);
  await api('publish', { channel, data: { server: 'side' } });
  await until(() => pubs.length === 1, 'a publication on the server-side subscription');
  assert.equal(pubs[0].channel, channel);
  assert.deepEqual(pubs[0].data, { server: 'side' });
});

test('join/leave, presence and presence_stats', async () => {
  const channel = uniq('room');
  const { c: a, ctx: ctxA } = await connected('js-alice');
  const { c: b, ctx: ctxB } = await connected('js-bob');
  const { sub: subA, log: logA } = await subscribed(a, channel, { joinLeave: true });
  const { sub: subB } = await subscribed(b, channel);

  await until(() => logA.joins.some((j) => j.info.user === 'js-bob'), "bob's join");
  const join = logA.joins.find((j) => j.info.user === 'js-bob');
  assert.equal(join.info.client, ctxB.client);

  const presence = await subA.presence();
  const clientIds = Object.keys(presence.clients).sort();
  assert.deepEqual(clientIds, [ctxA.client, ctxB.client].sort());
  assert.equal(presence.clients[ctxA.client].user, 'js-alice');
  assert.equal(presence.clients[ctxB.client].user, 'js-bob');
  assert.equal(presence.clients[ctxB.client].client, ctxB.client);

  const stats = await subA.presenceStats();
  assert.deepEqual(stats, { numClients: 2, numUsers: 2 });
  // The same through the client API, without going through the subscription.
  assert.deepEqual(await a.presenceStats(channel), { numClients: 2, numUsers: 2 });

  subB.unsubscribe();
  await until(() => logA.leaves.some((l) => l.info.user === 'js-bob'), "bob's leave");
  const after = await subA.presenceStats();
  assert.deepEqual(after, { numClients: 1, numUsers: 1 });
});

test('history with limit, since and reverse', async () => {
  const channel = uniq('log');
  const { c } = await connected('js-historian');
  const { sub } = await subscribed(c, channel);
  let epoch = '';
  for (let i = 1; i <= 10; i++) {
    const r = await api('publish', { channel, data: { i } });
    epoch = r.epoch;
  }
  const data = (res) => res.publications.map((p) => p.data.i);
  const offsets = (res) => res.publications.map((p) => p.offset);

  // limit 0: only the stream position.
  const top = await sub.history({ limit: 0 });
  assert.deepEqual(top.publications, []);
  assert.equal(top.epoch, epoch);
  const last = top.offset;
  assert.ok(last >= 10, `top offset ${last}`);

  // All of it, oldest first (limit -1 means no limit).
  const all = await sub.history({ limit: -1 });
  assert.deepEqual(data(all), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual(offsets(all), [last - 9, last - 8, last - 7, last - 6, last - 5, last - 4, last - 3, last - 2, last - 1, last]);
  assert.equal(all.offset, last);
  assert.equal(all.epoch, epoch);

  // limit: the oldest N.
  assert.deepEqual(data(await sub.history({ limit: 3 })), [1, 2, 3]);
  // reverse: the newest N, newest first.
  assert.deepEqual(data(await sub.history({ limit: 3, reverse: true })), [10, 9, 8]);
  // since: strictly after the position.
  const since = { offset: offsets(all)[4], epoch }; // after publication 5
  assert.deepEqual(data(await sub.history({ limit: 2, since })), [6, 7]);
  assert.deepEqual(data(await sub.history({ limit: -1, since })), [6, 7, 8, 9, 10]);
  // since + reverse: strictly before the position, newest first.
  assert.deepEqual(data(await sub.history({ limit: 2, since, reverse: true })), [4, 3]);
  // The client-level call works without a subscription.
  assert.deepEqual(data(await c.history(channel, { limit: 2, reverse: true })), [10, 9]);
});

test('an unknown RPC method fails with 104', async () => {
  const { c } = await connected('js-rpc');
  await assert.rejects(c.rpc('no.such.method', { x: 1 }), (err) => {
    assert.equal(err.code, 104, `error ${JSON.stringify(err)}`);
    return true;
  });
  // The connection is still usable afterwards.
  assert.equal(c.state, 'connected');
  await c.history(uniq('after-rpc'), { limit: 1 });
});

test('subscriptions made before connect go out batched with it, and all succeed', async () => {
  const channels = [uniq('batch'), uniq('batch'), uniq('batch')];
  const c = client({ token: mint('js-batch') });
  clients.push(c);
  const subs = channels.map((ch) => c.newSubscription(ch));
  const got = channels.map(() => []);
  subs.forEach((s, i) => s.on('publication', (ctx) => got[i].push(ctx.data)));
  subs.forEach((s) => s.subscribe());
  c.connect();
  await Promise.all(subs.map((s) => s.ready(5000)));
  for (const ch of channels) {
    await api('publish', { channel: ch, data: { ch } });
  }
  await until(() => got.every((g) => g.length === 1), 'one publication per subscription');
  assert.deepEqual(got, channels.map((ch) => [{ ch }]));
});

test('a delta subscription is answered without delta and gets full publications', async () => {
  const channel = uniq('delta');
  const { c } = await connected('js-delta');
  const { log } = await subscribed(c, channel, { delta: 'fossil' });
  await api('publish', { channel, data: { full: 'one' } });
  await api('publish', { channel, data: { full: 'two' } });
  await until(() => log.pubs.length === 2, 'two publications');
  assert.deepEqual(log.pubs.map((p) => p.data), [{ full: 'one' }, { full: 'two' }]);
});
