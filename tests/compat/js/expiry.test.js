// The control for refresh.test.js: a connection whose token expires and is not refreshed is
// closed by the server with 3005 once its grace (`expired_close_delay`, 1 s in this suite) has
// passed. So a connection that outlives its first token in refresh.test.js does so because of the
// refresh. (Without any getToken the SDK gives up on its own at expiry, so here getToken is set
// but never answers: the refresh just doesn't come.)
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { mint, claims, client, until } = require('./lib');

test('an expired token that is not refreshed ends the connection with 3005', async () => {
  const token = mint('js-expiry', '2s');
  const { exp } = claims(token);
  let getTokenCalls = 0;
  const c = client({
    token,
    getToken: () => {
      getTokenCalls += 1;
      return new Promise(() => {}); // the refresh never arrives
    },
    minReconnectDelay: 50,
    maxReconnectDelay: 200,
  });
  const transitions = [];
  c.on('connecting', (ctx) => transitions.push(ctx));
  c.on('disconnected', (ctx) => transitions.push(ctx));
  try {
    c.connect();
    await c.ready(5000);
    transitions.length = 0;
    const waitMs = (exp + 4) * 1000 - Date.now();
    await until(() => transitions.some((t) => t.code === 3005), 'a close with 3005', waitMs).catch((e) => {
      throw new Error(`${e.message}; the client saw ${JSON.stringify(transitions)}`);
    });
    assert.ok(Date.now() / 1000 >= exp, 'closed before the token expired');
    assert.ok(getTokenCalls >= 1, 'the SDK tried to refresh');
  } finally {
    c.disconnect();
  }
});
