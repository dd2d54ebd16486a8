// Documents across nodes with the real yjs and y-websocket packages. Run by
// crates/server/tests/cluster.rs (the file name does not match *.test.js): editors on three
// different nodes edit one document at once and converge; every node serves the same content.
// The test writes {doc, text} to SB_RESULT, and the Rust side then kills every node and checks
// that the store holds that text.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { account, newDocument, docClient, converged, serverText, prng, randomEdits } = require('./lib');

const NODES = JSON.parse(process.env.SB_NODES || '[]');

test('editors on different nodes converge, and every node serves the result', async (t) => {
  assert.equal(NODES.length, 3, 'three node URLs');
  const users = [];
  for (let i = 0; i < 6; i++) users.push(await account(`cl${i}`, NODES[0]));
  const doc = await newDocument(users[0], users.slice(1).map((user) => ({ user, role: 'editor' })), NODES[0]);
  const clients = users.map((u, k) => docClient(t, u, doc.id, { base: NODES[k % 3] }));
  await Promise.all(clients.map((c) => c.synced()));
  const seed = Number(process.env.SB_SEED ?? Date.now() % 1e9);
  t.diagnostic(`seed ${seed} (replay with SB_SEED=${seed})`);
  await Promise.all(clients.map((c, k) => randomEdits(c.text, prng(seed + k), 40, `n${k % 3}c${k}`)));
  const text = await converged(clients, '6 editors on 3 nodes to converge', 20000);
  assert.ok(text.length > 0, 'something is left after the edits');
  for (const [i, base] of NODES.entries()) {
    assert.equal(await serverText(doc.id, users[0].token, base), text, `node ${i} serves the converged text`);
  }
  fs.writeFileSync(process.env.SB_RESULT, JSON.stringify({ doc: doc.id, text }));
  for (const c of clients) c.close();
});
