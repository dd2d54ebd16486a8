// Shared helpers for the compatibility tests: the server under test comes from the environment
// (set by crates/server/tests/sdk_compat.rs), tokens come from `switchboard token`.
'use strict';

const { execFileSync, spawn } = require('node:child_process');
const assert = require('node:assert/strict');
const net = require('node:net');
const { Centrifuge } = require('centrifuge');
const WebSocket = require('ws');
const Y = require('yjs');
const { WebsocketProvider } = require('y-websocket');
const authProtocol = require('y-protocols/auth');

function env(name) {
  const v = process.env[name];
  if (!v) {
    throw new Error(`${name} is not set: run these tests through \`cargo test -p switchboard --test sdk_compat\``);
  }
  return v;
}

const WS_URL = env('SB_WS_URL');
const HTTP_URL = env('SB_HTTP_URL');
const API_KEY = env('SB_API_KEY');
const SECRET = env('SB_SECRET');
const BIN = env('SB_BIN');

/** Mints a connection JWT with `switchboard token`. `extra` is a list of extra CLI args. */
function mint(user, ttl = '1h', extra = []) {
  const out = execFileSync(BIN, ['token', '--user', user, '--ttl', ttl, ...extra], {
    env: { ...process.env, SWITCHBOARD_TOKEN_HMAC_SECRET: SECRET },
    encoding: 'utf8',
    timeout: 10000,
  }).trim();
  assert.match(out, /^[\w-]+\.[\w-]+\.[\w-]+$/, `switchboard token printed something other than a JWT: ${out}`);
  return out;
}

/** The claims of a JWT, unverified. */
function claims(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
}

/** A Centrifuge client on the server (or on `url`), not yet connected. */
function client(opts = {}, url = WS_URL) {
  return new Centrifuge(url, { websocket: WebSocket, name: 'compat-js', timeout: 5000, ...opts });
}

/** `POST /api/{method}`; returns the `result`, and fails on an HTTP or API error. */
async function api(method, body) {
  const resp = await fetch(`${HTTP_URL}/api/${method}`, {
    method: 'POST',
    headers: { 'X-API-Key': API_KEY, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await resp.text();
  assert.equal(resp.status, 200, `/api/${method} answered ${resp.status}: ${text}`);
  const json = JSON.parse(text);
  assert.equal(json.error, undefined, `/api/${method} failed: ${text}`);
  return json.result;
}

let counter = 0;
/** A channel name no other test uses. */
function uniq(prefix) {
  counter += 1;
  return `${prefix}_${process.pid}_${Date.now().toString(36)}_${counter}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` until it holds; fails with `what` after `timeout` ms. */
async function until(cond, what, timeout = 5000) {
  const deadline = Date.now() + timeout;
  while (!cond()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    }
    await sleep(10);
  }
}

/** Resolves with the first `event` emitted by `emitter`; fails after `timeout` ms. */
function next(emitter, event, timeout = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      emitter.removeListener(event, on);
      reject(new Error(`no '${event}' event within ${timeout} ms`));
    }, timeout);
    function on(ctx) {
      clearTimeout(t);
      resolve(ctx);
    }
    emitter.once(event, on);
  });
}

/**
 * A TCP proxy in front of the server, so a test can cut a client's connection the way a network
 * does (no Close frame) and keep it from reconnecting for a while.
 */
async function startProxy(target = WS_URL) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  let blocked = false;
  let accepted = 0;
  const server = net.createServer((down) => {
    if (blocked) {
      down.destroy();
      return;
    }
    accepted += 1;
    const up = net.connect(Number(port), hostname);
    sockets.add(down);
    sockets.add(up);
    const drop = () => {
      down.destroy();
      up.destroy();
      sockets.delete(down);
      sockets.delete(up);
    };
    down.on('error', drop).on('close', drop);
    up.on('error', drop).on('close', drop);
    down.pipe(up);
    up.pipe(down);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const addr = server.address();
  return {
    url: `ws://127.0.0.1:${addr.port}${new URL(target).pathname}`,
    get accepted() {
      return accepted;
    },
    /** Refuse new connections (accept and reset them at once). */
    block() {
      blocked = true;
    },
    unblock() {
      blocked = false;
    },
    /** Cut every proxied connection, in both directions, without a WebSocket Close. */
    cut() {
      for (const s of sockets) {
        s.destroy();
      }
      sockets.clear();
    },
    close() {
      this.cut();
      return new Promise((r) => server.close(r));
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Accounts, REST and collaborative documents (the docs*.test.js suites).

/**
 * `METHOD path` on the server (or on `base`), with a bearer token. A Uint8Array body goes as
 * application/octet-stream, anything else as JSON. `as` picks how the answer is read: 'json'
 * (the default; a non-JSON body stays text), 'text' or 'bytes'. Gives up after `timeout` ms.
 * Returns {status, headers, body}.
 */
async function rest(method, path, token, body, { base = HTTP_URL, as = 'json', timeout = 10000 } = {}) {
  const bytes = body instanceof Uint8Array;
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  if (body !== undefined) headers['Content-Type'] = bytes ? 'application/octet-stream' : 'application/json';
  const resp = await fetch(`${base}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : bytes ? body : JSON.stringify(body),
    signal: AbortSignal.timeout(timeout),
  });
  const { status, headers: h } = resp;
  if (as === 'bytes') return { status, headers: h, body: new Uint8Array(await resp.arrayBuffer()) };
  const text = await resp.text();
  if (as === 'text') return { status, headers: h, body: text };
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch (_) {
    parsed = text;
  }
  return { status, headers: h, body: parsed };
}

/** Registers a new account and logs in: returns {id, username, password, token}. */
async function account(prefix, base = HTTP_URL) {
  const username = uniq(prefix).slice(0, 32).replace(/[^a-zA-Z0-9_.-]/g, '_').toLowerCase();
  const password = 'correct horse battery';
  const reg = await rest('POST', '/v1/auth/register', null, { username, password, display_name: prefix }, { base });
  assert.equal(reg.status, 201, `register: ${JSON.stringify(reg.body)}`);
  return login({ username, password }, base);
}

/**
 * Logs `user` ({username, password}) in. Every suite logs in from 127.0.0.1, and the server
 * admits only so many password checks in flight per address (429 with Retry-After while at
 * the limit), so this waits and retries as an app would, for up to 20 s.
 */
async function login(user, base = HTTP_URL) {
  const deadline = Date.now() + 20000;
  for (;;) {
    const r = await rest('POST', '/v1/auth/login', null, { username: user.username, password: user.password }, { base });
    if (r.status === 429 && Date.now() < deadline) {
      const wait = Number(r.headers.get('retry-after')) || 1;
      await sleep(Math.min(wait, 2) * 1000 * (0.5 + Math.random()));
      continue;
    }
    assert.equal(r.status, 200, `login: ${JSON.stringify(r.body)}`);
    return { id: r.body.user.id, username: user.username, password: user.password, token: r.body.access_token };
  }
}

/** A new document owned by `owner`, shared with each of `members` ({user, role}). */
async function newDocument(owner, members = [], base = HTTP_URL) {
  const r = await rest('POST', '/v1/documents', owner.token, { title: uniq('doc') }, { base });
  assert.equal(r.status, 201, `create document: ${JSON.stringify(r.body)}`);
  const doc = r.body.document;
  for (const { user, role } of members) {
    const m = await rest('PUT', `/v1/documents/${doc.id}/members/${user.id}`, owner.token, { role }, { base });
    assert.equal(m.status, 200, `share with ${user.username}: ${JSON.stringify(m.body)}`);
  }
  return doc;
}

/** The document's `content` text as the server has it (`GET .../content?format=text`). */
async function serverText(docId, token, base = HTTP_URL) {
  const r = await rest('GET', `/v1/documents/${docId}/content?format=text`, token, undefined, { base, as: 'text' });
  assert.equal(r.status, 200, `content: ${r.body}`);
  return r.body;
}

/** The server's whole document (`format=update`), loaded into a fresh Y.Doc. */
async function serverDoc(docId, token, base = HTTP_URL) {
  const r = await rest('GET', `/v1/documents/${docId}/content?format=update`, token, undefined, { base, as: 'bytes' });
  assert.equal(r.status, 200, 'content?format=update');
  const doc = new Y.Doc();
  Y.applyUpdate(doc, r.body);
  return doc;
}

// Each provider adds a process 'exit' listener (removed by destroy()); a test with 20 clients
// is not a leak.
process.setMaxListeners(100);

/**
 * A Y.Doc synced with document `docId` through the stock y-websocket provider, the way an app
 * does it. Returns {doc, text, provider, attempts, closes, denied, close()}:
 * - `attempts`: WebSocket connections the provider opened (one per connect or reconnect),
 * - `closes`: the close codes of its connections, in order,
 * - `denied`: the reasons of the y-protocols auth permission-denied messages it received.
 * With `t` (a node:test context) it is destroyed when the test ends, pass or fail.
 * `opts.base` is the server's http URL; `opts.url` overrides the WebSocket base (a proxy's).
 */
function docClient(t, user, docId, opts = {}) {
  const { base = HTTP_URL, url, connect = true, maxBackoffTime = 300 } = opts;
  const doc = new Y.Doc();
  const state = { attempts: 0 };
  class CountingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      state.attempts += 1;
    }
  }
  const provider = new WebsocketProvider(url ?? `${base.replace(/^http/, 'ws')}/docs`, String(docId), doc, {
    params: { token: user.token },
    WebSocketPolyfill: CountingWebSocket,
    disableBc: true,
    connect: false,
    maxBackoffTime,
  });
  const closes = [];
  const denied = [];
  provider.on('connection-close', (event) => closes.push(event ? event.code : 'local'));
  // The stock handler only console.warns "Permission denied to access ..."; read the message
  // with the same y-protocols decoder and keep the reason.
  provider.messageHandlers[2] = (_encoder, decoder, p) => {
    authProtocol.readAuthMessage(decoder, p.doc, (_doc, reason) => denied.push(reason));
  };
  const c = {
    doc,
    text: doc.getText('content'),
    provider,
    closes,
    denied,
    get attempts() {
      return state.attempts;
    },
    /** Resolves once the provider is synced (sync step 2 received). */
    synced(timeout = 5000) {
      return until(() => provider.synced, `${user.username} synced with document ${docId}`, timeout);
    },
    close() {
      provider.destroy();
      doc.destroy();
    },
  };
  if (t) t.after(() => c.close());
  if (connect) provider.connect();
  return c;
}

/** Waits until every client's `content` text is the same; returns it. */
async function converged(clients, what = 'the clients to converge', timeout = 10000) {
  const texts = () => clients.map((c) => c.text.toString());
  try {
    await until(() => new Set(texts()).size === 1, what, timeout);
  } catch (e) {
    e.message += `\n${texts().map((s, i) => `  client ${i}: ${JSON.stringify(s.slice(0, 200))}`).join('\n')}`;
    throw e;
  }
  return clients[0].text.toString();
}

/** A seeded PRNG (mulberry32), so that a failing random run can be replayed with its seed. */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * `n` random edits of `text`, about two inserts (tagged `tag`) to one delete, yielding to the
 * event loop after each so that remote updates arrive in between: real concurrency, not a
 * batch.
 */
async function randomEdits(text, rand, n, tag) {
  for (let i = 0; i < n; i++) {
    const len = text.length;
    if (len > 0 && rand() < 0.35) {
      const at = Math.floor(rand() * len);
      text.delete(at, Math.min(1 + Math.floor(rand() * 4), len - at));
    } else {
      text.insert(Math.floor(rand() * (len + 1)), `${tag}.${i} `);
    }
    await (rand() < 0.3 ? sleep(Math.floor(rand() * 5)) : new Promise(setImmediate));
  }
}

async function freePort() {
  const srv = net.createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

/**
 * Runs `SB_BIN serve` as its own process on `port` (default: a free one) and `dataDir`, for
 * tests that stop or kill the server. `env` adds settings (`SWITCHBOARD_DOCS__...`). Uses
 * SB_DATABASE_URL when set. Returns {proc, port, http, stop(signal)}; stop resolves when the
 * process has exited.
 */
async function spawnServer(dataDir, { port, env: extra = {}, secret = 'js-spawned-secret' } = {}) {
  port = port ?? (await freePort());
  const env = {
    ...process.env,
    SWITCHBOARD_LISTEN: `127.0.0.1:${port}`,
    SWITCHBOARD_DATA_DIR: dataDir,
    SWITCHBOARD_TOKEN_HMAC_SECRET: secret,
    SWITCHBOARD_API_KEY: 'k',
    SWITCHBOARD_LOG: 'warn',
    SWITCHBOARD_ACCOUNTS__PASSWORD_HASH_COST: 'test',
    ...extra,
  };
  if (process.env.SB_DATABASE_URL) env.SWITCHBOARD_DATABASE_URL = process.env.SB_DATABASE_URL;
  const proc = spawn(BIN, ['serve'], { env, stdio: 'ignore' });
  const exited = new Promise((r) => proc.once('exit', (code, signal) => r({ code, signal })));
  const http = `http://127.0.0.1:${port}`;
  const server = {
    proc,
    port,
    http,
    exited,
    /** Sends `signal` and waits (at most 15 s) for the process to exit. */
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), 15000);
      const how = await exited;
      clearTimeout(timer);
      return how;
    },
  };
  for (let i = 0; i < 200; i++) {
    if (proc.exitCode !== null) break;
    try {
      if ((await fetch(`${http}/healthz`)).ok) return server;
    } catch (_) {}
    await sleep(50);
  }
  await server.stop('SIGKILL');
  throw new Error(`server on port ${port} did not start`);
}

module.exports = {
  WS_URL,
  HTTP_URL,
  API_KEY,
  Centrifuge,
  WebSocket,
  mint,
  claims,
  client,
  api,
  uniq,
  sleep,
  until,
  next,
  startProxy,
  Y,
  WebsocketProvider,
  rest,
  account,
  login,
  newDocument,
  serverText,
  serverDoc,
  docClient,
  converged,
  prng,
  randomEdits,
  freePort,
  spawnServer,
};
