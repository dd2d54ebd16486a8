// A client whose connection is cut while 100 publications are made reconnects, its subscription
// reports recovered: true, and it receives exactly those 100, in order, once each.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { mint, client, api, uniq, until, next, sleep, startProxy } = require('./lib');

test('recovers exactly the 100 publications missed while disconnected', async () => {
  const channel = uniq('recover');
  const proxy = await startProxy();
  const c = client({ token: mint('js-recover'), minReconnectDelay: 50, maxReconnectDelay: 300 }, proxy.url);
  const sub = c.newSubscription(channel, { recoverable: true, positioned: true });
  const received = [];
  const subscribed = [];
  sub.on('publication', (ctx) => received.push(ctx));
  sub.on('subscribed', (ctx) => subscribed.push(ctx));

  try {
    c.connect();
    sub.subscribe();
    await sub.ready(5000);
    assert.equal(subscribed.length, 1);
    assert.equal(subscribed[0].recoverable, true, 'the server must mark the channel recoverable');

    // Some traffic before the drop, delivered live.
    for (let seq = 0; seq < 3; seq++) {
      await api('publish', { channel, data: { phase: 'before', seq } });
    }
    await until(() => received.length === 3, 'the live publications');

    // Cut the connection like a network would, and keep the client out.
    proxy.block();
    const reconnecting = next(c, 'connecting');
    proxy.cut();
    await reconnecting;
    assert.notEqual(c.state, 'connected');

    for (let seq = 0; seq < 100; seq++) {
      await api('publish', { channel, data: { phase: 'gap', seq } });
    }
    assert.equal(received.length, 3, 'nothing may arrive while cut off');

    proxy.unblock();
    await until(() => subscribed.length === 2, 'the resubscribe after reconnecting', 10000);
    const ctx = subscribed[1];
    assert.equal(ctx.wasRecovering, true, 'the SDK asked to recover');
    assert.equal(ctx.recovered, true, 'the server recovered the stream');

    await until(() => received.length >= 103, 'the 100 recovered publications');
    // Anything duplicated would arrive right behind them.
    await sleep(300);
    const gap = received.slice(3);
    assert.deepEqual(received.slice(0, 3).map((p) => p.data.phase), ['before', 'before', 'before']);
    assert.equal(gap.length, 100, `expected exactly 100 recovered, got ${gap.length}`);
    assert.deepEqual(
      gap.map((p) => `${p.data.phase}:${p.data.seq}`),
      Array.from({ length: 100 }, (_, i) => `gap:${i}`),
    );
    // Offsets continue the stream without holes or repeats.
    const offsets = received.map((p) => p.offset);
    for (let i = 1; i < offsets.length; i++) {
      assert.equal(offsets[i], offsets[i - 1] + 1, `offsets ${offsets[i - 1]} -> ${offsets[i]}`);
    }

    // Live delivery resumes after the recovery, once.
    await api('publish', { channel, data: { phase: 'after', seq: 0 } });
    await until(() => received.length === 104, 'a live publication after the recovery');
    await sleep(100);
    assert.equal(received.length, 104);
    assert.equal(received[103].offset, offsets[offsets.length - 1] + 1);
  } finally {
    c.disconnect();
    await proxy.close();
  }
});
