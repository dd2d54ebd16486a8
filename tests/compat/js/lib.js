// Shared helpers for the compatibility tests: the server under test comes from the environment
// (set by crates/server/tests/sdk_compat.rs), tokens come from `switchboard token`.
'use strict';

const { execFileSync } = require('node:child_process');
const assert = require('node:assert/strict');
const net = require('node:net');
const { Centrifuge } = require('centrifuge');
const WebSocket = require('ws');

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
};
