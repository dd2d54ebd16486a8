// A short-lived connection token is refreshed through getToken, and the connection stays up
// past the first token's expiry.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { mint, claims, client, api, uniq, until, sleep } = require('./lib');

test('a short-lived token is refreshed via getToken and the connection outlives it', async () => {
  const first = mint('js-refresh', '3s');
  const { exp } = claims(first);
  const nowSecs = Date.now() / 1000;
  assert.ok(exp > nowSecs && exp <= nowSecs + 4, `--ttl 3s gave exp ${exp} at ${nowSecs}`);

  let getTokenCalls = 0;
  const c = client({
    token: first,
    getToken: async () => {
      getTokenCalls += 1;
      return mint('js-refresh', '1h');
    },
  });
  const transitions = [];
  c.on('connecting', (ctx) => transitions.push(`connecting ${ctx.code} ${ctx.reason}`));
  c.on('disconnected', (ctx) => transitions.push(`disconnected ${ctx.code} ${ctx.reason}`));
  const errors = [];
  c.on('error', (ctx) => errors.push(ctx));
  const channel = uniq('refresh');
  const sub = c.newSubscription(channel);
  const pubs = [];
  sub.on('publication', (ctx) => pubs.push(ctx.data));

  try {
    c.connect();
    sub.subscribe();
    await sub.ready(5000);
    transitions.length = 0; // the initial 'connecting' is expected

    // Stay connected until well past the first token's expiry.
    const untilMs = (exp + 2.5) * 1000 - Date.now();
    await sleep(Math.max(untilMs, 0));

    assert.ok(getTokenCalls >= 1, 'the SDK never called getToken: the connect reply did not say the token expires');
    assert.deepEqual(transitions, [], 'the connection must not drop');
    assert.deepEqual(errors.map((e) => `${e.type}: ${JSON.stringify(e.error)}`), []);
    assert.equal(c.state, 'connected');

    // And it is live, not just believed to be: commands and pushes still flow.
    await api('publish', { channel, data: { after: 'expiry' } });
    await until(() => pubs.length === 1, 'a publication after the first token expired');
    assert.deepEqual(pubs, [{ after: 'expiry' }]);
    await c.presenceStats(channel);
  } finally {
    c.disconnect();
  }
});
