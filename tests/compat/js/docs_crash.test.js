// Collaborative documents across server restarts, with the real yjs and y-websocket: a graceful
// restart (SIGTERM) keeps every applied edit in the store; after kill -9 the store has all but
// the last moments, and the clients that held those make the document whole when they
// reconnect; an idle document is unloaded and loads back whole. Each test runs its own server
// process (SB_BIN serve) on its own port and data dir (SQLite in a temp dir, or
// SB_DATABASE_URL when set), and starts it again on the same port, so that the providers
// reconnect by themselves as they would in an app.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const {
  Y, until, sleep, rest, account, newDocument, serverText, serverDoc, docClient, converged, prng,
  randomEdits, spawnServer,
} = require('./lib');

const stateVector = (doc) => Y.decodeStateVector(Y.encodeStateVector(doc));

/** Whether state vector `a` covers `b`: every client's clock in `a` is at least its clock in `b`. */
function covers(a, b) {
  return [...b].every(([client, clock]) => (a.get(client) ?? 0) >= clock);
}

/** A server in a fresh data dir, killed and removed when the test ends. */
async function ownServer(t, env) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-js-docs-crash-'));
  const box = { server: await spawnServer(dataDir, { env }), dataDir };
  t.after(async () => {
    await box.server.stop('SIGKILL');
    fs.rmSync(dataDir, { recursive: true, force: true });
  });
  /** Starts the server again on the same data dir and port. */
  box.restart = async () => {
    box.server = await spawnServer(dataDir, { port: box.server.port, env });
    return box.server;
  };
  return box;
}

/** Two editors on a new document of `base`, both synced. */
async function twoEditors(t, base) {
  const [alice, bob] = await Promise.all([account('rsa', base), account('rsb', base)]);
  const doc = await newDocument(alice, [{ user: bob, role: 'editor' }], base);
  const a = docClient(t, alice, doc.id, { base });
  const b = docClient(t, bob, doc.id, { base });
  await Promise.all([a.synced(), b.synced()]);
  return { alice, doc, a, b };
}

test('a graceful restart (SIGTERM) keeps every applied edit in the store', async (t) => {
  const box = await ownServer(t);
  const base = box.server.http;
  const { alice, doc, a, b } = await twoEditors(t, base);
  const seed = Number(process.env.SB_SEED ?? Date.now() % 1e9);
  t.diagnostic(`seed ${seed} (replay with SB_SEED=${seed})`);
  await Promise.all([randomEdits(a.text, prng(seed), 100, 'a'), randomEdits(b.text, prng(seed + 1), 100, 'b')]);
  await converged([a, b]);
  // The last edit is relayed to b, so applied, and the server is stopped at once: well inside
  // the persistence window, so only the shutdown's own flush can have written it.
  a.text.insert(0, 'last words ');
  await until(() => b.text.toString().startsWith('last words '), 'the last edit at b', 2000);
  const exit = await box.server.stop('SIGTERM');
  assert.deepEqual(exit, { code: 0, signal: null }, 'a clean exit');
  assert.equal(a.closes[0], 1001, 'closed as "going away"');
  assert.equal(b.closes[0], 1001, 'closed as "going away"');
  // No client may help: the store alone must have the document.
  a.provider.disconnect();
  b.provider.disconnect();
  const text = await converged([a, b]);

  await box.restart();
  assert.equal(await serverText(doc.id, alice.token, base), text, 'the content after the restart');
  assert.deepEqual(stateVector(await serverDoc(doc.id, alice.token, base)), stateVector(a.doc), 'every edit, not just the same text');

  a.provider.connect();
  b.provider.connect();
  await Promise.all([a.synced(), b.synced()]);
  b.text.insert(b.text.length, ' and after');
  assert.equal(await converged([a, b]), `${text} and after`);
  assert.equal(await serverText(doc.id, alice.token, base), `${text} and after`);
});

test('after kill -9 the reconnecting clients make the document whole again', async (t) => {
  const box = await ownServer(t);
  const base = box.server.http;
  const { alice, doc, a, b } = await twoEditors(t, base);
  const seed = Number(process.env.SB_SEED ?? Date.now() % 1e9);
  t.diagnostic(`seed ${seed} (replay with SB_SEED=${seed})`);
  await Promise.all([randomEdits(a.text, prng(seed), 100, 'a'), randomEdits(b.text, prng(seed + 1), 100, 'b')]);
  await converged([a, b]);
  // Well past the 50 ms persistence window: this much must be in the store.
  await sleep(500);
  const durable = stateVector(a.doc);

  // A burst from both, and the kill in the middle of it; then both go on editing while the
  // server is down.
  const burst = Promise.all([randomEdits(a.text, prng(seed + 2), 40, 'A'), randomEdits(b.text, prng(seed + 3), 40, 'B')]);
  await sleep(20);
  const killed = box.server.stop('SIGKILL');
  const atKill = [stateVector(a.doc), stateVector(b.doc)];
  await killed;
  await burst;
  await randomEdits(a.text, prng(seed + 4), 10, 'x');
  await randomEdits(b.text, prng(seed + 5), 10, 'y');
  // Hold the providers back for a look at what the store kept.
  a.provider.disconnect();
  b.provider.disconnect();

  await box.restart();
  const kept = stateVector(await serverDoc(doc.id, alice.token, base));
  assert.ok(covers(kept, durable), 'everything older than the persistence window survived kill -9');
  const lost = atKill.some((sv) => !covers(kept, sv));
  t.diagnostic(`the store ${lost ? 'lacked some' : 'had all'} of the edits made before the kill`);

  a.provider.connect();
  b.provider.connect();
  await Promise.all([a.synced(), b.synced()]);
  const text = await converged([a, b], 'a and b to converge after the restart');
  assert.equal(await serverText(doc.id, alice.token, base), text, 'the server content equals the clients\' text');
  const whole = stateVector(await serverDoc(doc.id, alice.token, base));
  assert.ok(covers(whole, stateVector(a.doc)) && covers(whole, stateVector(b.doc)), 'the server has every edit of both clients');

  // And it is durable: with the clients gone and a graceful restart, the store has it all.
  a.provider.disconnect();
  b.provider.disconnect();
  await box.server.stop('SIGTERM');
  await box.restart();
  assert.equal(await serverText(doc.id, alice.token, base), text, 'the re-synced content after another restart');
});

test('an idle document is unloaded, and loads back whole', async (t) => {
  const box = await ownServer(t, { SWITCHBOARD_DOCS__UNLOAD_AFTER: '1s' });
  const base = box.server.http;
  const { alice, doc, a, b } = await twoEditors(t, base);
  a.text.insert(0, 'written, ');
  b.text.insert(0, 'unloaded, ');
  const text = await converged([a, b]);
  a.close();
  b.close();
  const loaded = async () => {
    const r = await rest('GET', '/metrics', null, undefined, { base, as: 'text' });
    const m = /^switchboard_docs_loaded (\d+)$/m.exec(r.body);
    assert.ok(m, 'switchboard_docs_loaded in /metrics');
    return Number(m[1]);
  };
  const deadline = Date.now() + 5000;
  while ((await loaded()) !== 0) {
    assert.ok(Date.now() < deadline, 'the document was not unloaded within 5 s');
    await sleep(100);
  }
  assert.equal(await serverText(doc.id, alice.token, base), text, 'loaded back from the store for REST');
  const c = docClient(t, alice, doc.id, { base });
  await c.synced();
  assert.equal(c.text.toString(), text, 'and for a new client');
});
