// Collaborative documents through the real `yjs` and `y-websocket` packages: concurrent editors
// converge with the store, offline edits merge, viewers cannot write, strangers are refused for
// good, a closed client's cursor goes away, a restored version reaches every client, and
// deletes, REST writes and role changes reach open connections. Restarts and kill -9 are in
// docs_crash.test.js.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const {
  Y, client, until, next, sleep, startProxy, rest, account, newDocument, serverText, serverDoc,
  docClient, converged, prng, randomEdits, HTTP_URL,
} = require('./lib');

const stateVector = (doc) => Y.decodeStateVector(Y.encodeStateVector(doc));

/** Waits until the server's `content` text is `text`. */
async function serverHas(docId, token, text, timeout = 5000) {
  const deadline = Date.now() + timeout;
  let last;
  while ((last = await serverText(docId, token)) !== text) {
    if (Date.now() > deadline) assert.fail(`the server's text is ${JSON.stringify(last)}, not ${JSON.stringify(text)}, after ${timeout} ms`);
    await sleep(20);
  }
}

/** `n` users (the first owns the document, the others edit it) each make `edits` random edits at once. */
async function concurrentEdits(t, n, edits) {
  const users = await Promise.all(Array.from({ length: n }, (_, i) => account(`cv${i}`)));
  const doc = await newDocument(users[0], users.slice(1).map((user) => ({ user, role: 'editor' })));
  const clients = users.map((u) => docClient(t, u, doc.id));
  await Promise.all(clients.map((c) => c.synced()));
  const seed = Number(process.env.SB_SEED ?? Date.now() % 1e9);
  t.diagnostic(`seed ${seed} (replay with SB_SEED=${seed})`);
  await Promise.all(clients.map((c, k) => randomEdits(c.text, prng(seed + k), edits, `c${k}`)));

  const text = await converged(clients, `${n} clients to converge`, 20000);
  assert.ok(text.length > 0, 'something is left after the edits');
  assert.equal(await serverText(doc.id, users[0].token), text, 'GET .../content?format=text');
  // Not only the same text: the server holds every edit of every client.
  const stored = stateVector(await serverDoc(doc.id, users[0].token));
  for (const [k, c] of clients.entries()) {
    assert.deepEqual(stored, stateVector(c.doc), `state vector of client ${k}`);
    assert.ok(stored.get(c.doc.clientID) > 0, `client ${k}'s edits are in the store`);
  }
}

test('2 clients: concurrent random inserts and deletes converge, and the server has the same text', async (t) => {
  await concurrentEdits(t, 2, 200);
});

test('20 clients: concurrent random inserts and deletes converge, and the server has the same text', async (t) => {
  await concurrentEdits(t, 20, 30);
});

test('an offline edit merges with the edits others made meanwhile', async (t) => {
  const [alice, bob] = await Promise.all([account('offa'), account('offb')]);
  const doc = await newDocument(alice, [{ user: bob, role: 'editor' }]);
  const a = docClient(t, alice, doc.id);
  const b = docClient(t, bob, doc.id);
  await Promise.all([a.synced(), b.synced()]);
  a.text.insert(0, 'one shared line');
  await until(() => b.text.toString() === 'one shared line', 'the first line at b');

  a.provider.disconnect();
  a.text.insert(0, '[a offline] ');
  a.text.delete(a.text.length - 4, 4); // "line"
  b.text.insert(4, 'fine ');
  b.text.insert(b.text.length, ' [b online]');
  await sleep(300);
  assert.equal(a.text.toString(), '[a offline] one shared ', 'a is offline: it sees only its own edits');
  assert.equal(b.text.toString(), 'one fine shared line [b online]', "b does not see a's offline edits");
  assert.equal(await serverText(doc.id, alice.token), 'one fine shared line [b online]');

  a.provider.connect();
  const text = await converged([a, b], 'a and b to converge after a reconnects');
  assert.equal(text, '[a offline] one fine shared  [b online]');
  assert.equal(await serverText(doc.id, alice.token), text);
});

test("a viewer receives edits, but its own reach neither the other clients nor the store", async (t) => {
  const [owner, editor, viewer] = await Promise.all([account('vwo'), account('vwe'), account('vwv')]);
  const doc = await newDocument(owner, [{ user: editor, role: 'editor' }, { user: viewer, role: 'viewer' }]);
  const o = docClient(t, owner, doc.id);
  const e = docClient(t, editor, doc.id);
  const v = docClient(t, viewer, doc.id);
  await Promise.all([o.synced(), e.synced(), v.synced()]);
  o.text.insert(0, 'read me');
  await until(() => v.text.toString() === 'read me', 'the owner edit at the viewer');
  assert.deepEqual(v.denied, [], 'reading is allowed');
  // Viewers still share awareness: the others see where they are.
  v.provider.awareness.setLocalStateField('user', { name: 'viewer' });
  await until(() => o.provider.awareness.getStates().get(v.doc.clientID)?.user?.name === 'viewer', "the viewer's awareness at the owner");

  v.text.insert(0, 'VIEWER ');
  await until(() => v.denied.length > 0, 'the permission-denied message at the viewer');
  // Still connected and still receiving: the owner's next edit gets there, the viewer's never
  // gets anywhere.
  o.text.insert(o.text.length, ', please');
  await until(() => v.text.toString().endsWith(', please'), 'the next owner edit at the viewer');
  await until(() => e.text.toString() === 'read me, please', 'the next owner edit at the editor');
  await sleep(200);
  assert.equal(o.text.toString(), 'read me, please');
  assert.equal(e.text.toString(), 'read me, please');
  assert.equal(await serverText(doc.id, owner.token), 'read me, please');
  assert.deepEqual(v.closes, [], 'a refused write does not close the connection');

  // On reconnect the viewer's sync step 2 carries its refused edit again: refused again.
  const deniedBefore = v.denied.length;
  v.provider.disconnect();
  v.provider.connect();
  await v.synced();
  await until(() => v.denied.length > deniedBefore, 'the permission-denied message after the re-sync');
  o.text.insert(0, '> ');
  await until(() => e.text.toString() === '> read me, please', 'one more owner edit at the editor');
  await until(() => v.text.toString().includes('> '), 'one more owner edit at the viewer');
  await sleep(200);
  assert.equal(e.text.toString(), '> read me, please');
  assert.equal(await serverText(doc.id, owner.token), '> read me, please');
  assert.ok(!stateVector(await serverDoc(doc.id, owner.token)).has(v.doc.clientID), "no trace of the viewer's client in the store");
});

test('a stranger is closed with 4403 after the permission-denied message, and does not reconnect', async (t) => {
  const [owner, stranger] = await Promise.all([account('sto'), account('sts')]);
  const doc = await newDocument(owner);
  const s = docClient(t, stranger, doc.id);
  const closed = await next(s.provider, 'closed');
  assert.equal(closed.code, 4403);
  assert.equal(s.denied.length, 1, 'the auth permission-denied message came first');
  await sleep(2000);
  assert.equal(s.attempts, 1, 'no reconnect after 4403');
  assert.deepEqual(s.closes, [4403]);
  assert.equal(s.provider.synced, false);
});

for (const [what, code, user, ref] of [
  ['a bad token', 4401, async () => ({ username: 'nobody', token: 'not.a.jwt' }), async (u) => (await newDocument(u)).id],
  ['an unknown document', 4404, null, async () => 999999999],
  ['a document id that is not a number', 4404, null, async () => 'not-a-number'],
]) {
  test(`${what} is closed with ${code}, for good`, async (t) => {
    const owner = await account('ref');
    const c = docClient(t, user ? await user() : owner, await ref(owner));
    const closed = await next(c.provider, 'closed');
    assert.equal(closed.code, code);
    await sleep(1000);
    assert.equal(c.attempts, 1, `no reconnect after ${code}`);
  });
}

/** a and b on one document, b watching; a shows a cursor at index 3 of "hello world". */
async function cursorAtB(t, aOpts = {}) {
  const [alice, bob] = await Promise.all([account('awa'), account('awb')]);
  const doc = await newDocument(alice, [{ user: bob, role: 'editor' }]);
  const a = docClient(t, alice, doc.id, aOpts);
  const b = docClient(t, bob, doc.id);
  await Promise.all([a.synced(), b.synced()]);
  a.text.insert(0, 'hello world');
  await until(() => b.text.toString() === 'hello world', 'the text at b');
  const pos = Y.relativePositionToJSON(Y.createRelativePositionFromTypeIndex(a.text, 3));
  a.provider.awareness.setLocalStateField('user', { name: 'alice' });
  a.provider.awareness.setLocalStateField('cursor', { anchor: pos, head: pos });
  await until(() => b.provider.awareness.getStates().get(a.doc.clientID)?.cursor, "a's cursor at b");
  const state = b.provider.awareness.getStates().get(a.doc.clientID);
  assert.equal(state.user.name, 'alice');
  const abs = Y.createAbsolutePositionFromRelativePosition(Y.createRelativePositionFromJSON(state.cursor.anchor), b.doc);
  assert.equal(abs.index, 3, "a's cursor resolves to the same place in b's copy");
  return { a, b, bob, doc };
}

async function goneWithin(b, clientID, ms) {
  const from = Date.now();
  await until(() => !b.provider.awareness.getStates().has(clientID), "a's awareness state to disappear at b", ms);
  return Date.now() - from;
}

test("a closed client's cursor disappears for the others within 2 s (provider destroyed)", async (t) => {
  const { a, b, bob, doc } = await cursorAtB(t);
  const id = a.doc.clientID;
  // A late joiner (bob's second tab) is told the cursors that are already there.
  const late = docClient(t, bob, doc.id);
  await late.synced();
  await until(() => late.provider.awareness.getStates().get(id)?.cursor, "a's cursor at the late joiner");
  a.close();
  const took = await goneWithin(b, id, 2000);
  await goneWithin(late, id, 2000);
  t.diagnostic(`gone after ${took} ms`);
});

test("a vanished client's cursor disappears for the others within 2 s (connection cut, no Close frame)", async (t) => {
  // The provider says nothing before it goes: only the server can tell b.
  const proxy = await startProxy(`${HTTP_URL.replace(/^http/, 'ws')}/docs`);
  t.after(() => proxy.close());
  const { a, b } = await cursorAtB(t, { url: proxy.url });
  const id = a.doc.clientID;
  proxy.block();
  proxy.cut();
  const took = await goneWithin(b, id, 2000);
  t.diagnostic(`gone after ${took} ms`);
  assert.ok(b.provider.awareness.getStates().has(b.doc.clientID), 'b keeps its own state');
});

test("restoring a version changes every connected client's text to it", async (t) => {
  const [alice, bob] = await Promise.all([account('vra'), account('vrb')]);
  const doc = await newDocument(alice, [{ user: bob, role: 'editor' }]);
  const a = docClient(t, alice, doc.id);
  const b = docClient(t, bob, doc.id);
  await Promise.all([a.synced(), b.synced()]);
  a.text.insert(0, 'version one');
  await until(() => b.text.toString() === 'version one', 'the first text at b');
  const v = await rest('POST', `/v1/documents/${doc.id}/versions`, alice.token, { label: 'v1' });
  assert.equal(v.status, 201, JSON.stringify(v.body));
  assert.equal(v.body.version.label, 'v1');
  assert.equal(v.body.version.auto, false);

  a.text.delete(0, a.text.length);
  a.text.insert(0, 'version two, by a');
  b.text.insert(0, 'and by b: ');
  const two = await converged([a, b]);
  assert.notEqual(two, 'version one');
  const list = await rest('GET', `/v1/documents/${doc.id}/versions`, bob.token);
  assert.equal(list.status, 200);
  assert.deepEqual(list.body.versions.map((x) => x.id), [v.body.version.id]);
  const old = await rest('GET', `/v1/documents/${doc.id}/versions/${v.body.version.id}?format=text`, bob.token, undefined, { as: 'text' });
  assert.equal(old.body, 'version one');

  const r = await rest('POST', `/v1/documents/${doc.id}/versions/${v.body.version.id}/restore`, alice.token);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.ok(r.body.restored, JSON.stringify(r.body));
  await until(() => a.text.toString() === 'version one' && b.text.toString() === 'version one', 'the restored text at a and b');
  assert.equal(await serverText(doc.id, alice.token), 'version one');
  // The restore is an ordinary change: editing goes on from it.
  b.text.insert(b.text.length, ', again');
  await until(() => a.text.toString() === 'version one, again', "b's edit after the restore at a");
  assert.deepEqual([a.closes, b.closes], [[], []], 'nobody was disconnected');
});

test('deleting the document closes every client with 4410, for good', async (t) => {
  const [alice, bob] = await Promise.all([account('dla'), account('dlb')]);
  const doc = await newDocument(alice, [{ user: bob, role: 'viewer' }]);
  const clients = [docClient(t, alice, doc.id), docClient(t, bob, doc.id)];
  await Promise.all(clients.map((c) => c.synced()));
  const closed = clients.map((c) => next(c.provider, 'closed'));
  const r = await rest('DELETE', `/v1/documents/${doc.id}`, alice.token);
  assert.equal(r.status, 204);
  assert.deepEqual((await Promise.all(closed)).map((e) => e.code), [4410, 4410]);
  await sleep(1000);
  assert.deepEqual(clients.map((c) => c.attempts), [1, 1], 'no reconnect after 4410');
  assert.equal((await rest('GET', `/v1/documents/${doc.id}`, alice.token)).status, 404);
});

test('a Yjs update posted to REST reaches connected clients, once', async (t) => {
  const alice = await account('rwb');
  const doc = await newDocument(alice);
  const a = docClient(t, alice, doc.id);
  await a.synced();
  a.text.insert(0, 'hello');
  await serverHas(doc.id, alice.token, 'hello');
  // A backend edits with its own Y.Doc: load format=update, change it, post the difference.
  const mine = await serverDoc(doc.id, alice.token);
  assert.equal(mine.getText('content').toString(), 'hello', 'format=update has the client edit');
  const before = Y.encodeStateVector(mine);
  mine.getText('content').insert(0, 'binary says ');
  mine.getMap('meta').set('reviewed', true);
  const update = Y.encodeStateAsUpdate(mine, before);
  let r = await rest('POST', `/v1/documents/${doc.id}/updates`, alice.token, update);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.changed, true);
  await until(() => a.text.toString() === 'binary says hello', 'the posted update at the client');
  assert.equal(a.doc.getMap('meta').get('reviewed'), true);
  r = await rest('POST', `/v1/documents/${doc.id}/updates`, alice.token, update);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.changed, false, 'the same update again changes nothing');
  // (A root type the server never named, like `meta`, has no type in the encoding: Yjs's own
  // toJSON() leaves it out too, so only `content` is checked here.)
  const json = await rest('GET', `/v1/documents/${doc.id}/content?format=json`, alice.token);
  assert.equal(json.status, 200);
  assert.equal(json.body.content, 'binary says hello', JSON.stringify(json.body));
});

test('text posted to REST is appended, and reaches connected clients', async (t) => {
  const alice = await account('rwt');
  const doc = await newDocument(alice);
  const a = docClient(t, alice, doc.id);
  await a.synced();
  a.text.insert(0, 'hello');
  await serverHas(doc.id, alice.token, 'hello');
  const r = await rest('POST', `/v1/documents/${doc.id}/updates`, alice.token, { text: ', world' });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.changed, true);
  await until(() => a.text.toString() === 'hello, world', 'the appended text at the client');
  assert.equal(await serverText(doc.id, alice.token), 'hello, world');
});

test('sharing notifies the user; a downgrade reconnects its client (4000) as a viewer; unsharing closes it (4403)', async (t) => {
  const [owner, bob] = await Promise.all([account('sho'), account('shb')]);
  const doc = await newDocument(owner);
  const centrifuge = client({ token: bob.token });
  t.after(() => centrifuge.disconnect());
  const notes = [];
  const sub = centrifuge.newSubscription(`notifications:#${bob.id}`);
  sub.on('publication', (ctx) => notes.push(ctx.data));
  centrifuge.connect();
  sub.subscribe();
  await sub.ready(5000);
  const share = async (role) => {
    const r = await rest('PUT', `/v1/documents/${doc.id}/members/${bob.id}`, owner.token, { role });
    assert.equal(r.status, 200, JSON.stringify(r.body));
  };
  await share('editor');
  await until(() => notes.length === 1, 'the share notification');
  assert.equal(notes[0].notification.kind, 'share');
  assert.equal(notes[0].notification.data.document_id, doc.id);
  assert.equal(notes[0].notification.data.role, 'editor');

  const o = docClient(t, owner, doc.id);
  const b = docClient(t, bob, doc.id);
  await Promise.all([o.synced(), b.synced()]);
  b.text.insert(0, 'bob can write');
  await until(() => o.text.toString() === 'bob can write', "bob's edit at the owner");

  await share('viewer');
  await until(() => b.closes.length === 1 && b.provider.synced, 'bob to reconnect with the new role');
  assert.deepEqual(b.closes, [4000]);
  assert.equal(b.attempts, 2);
  b.text.insert(0, 'not any more: ');
  await until(() => b.denied.length > 0, 'the permission-denied message');
  await sleep(200);
  assert.equal(o.text.toString(), 'bob can write');

  const closed = next(b.provider, 'closed');
  const r = await rest('DELETE', `/v1/documents/${doc.id}/members/${bob.id}`, owner.token);
  assert.equal(r.status, 204);
  assert.equal((await closed).code, 4403);
  await sleep(1000);
  assert.equal(b.attempts, 2, 'no reconnect after 4403');
});
