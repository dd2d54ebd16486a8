// The one Centrifuge connection of the app, its state for the banner, and channel
// subscriptions shared by whoever listens (one SDK Subscription per channel).
//
// The SDK does the hard parts: it reconnects with backoff, drops the transport at once when
// the browser goes offline and reconnects when it is back, fetches a new token through
// getToken when the old one expires, and recovers missed publications on resubscribe.
import { Centrifuge, UnauthorizedError } from 'centrifuge';
import { accessToken, ApiError } from './api.js';
import { createStore } from './store.js';

/**
 * `state`: disconnected | connecting | connected; `everConnected` tells "reconnecting" from
 * "connecting"; `online` mirrors navigator.onLine.
 */
export const conn = createStore({
  state: 'disconnected',
  everConnected: false,
  online: navigator.onLine,
});

let client = null;
const channels = new Map(); // name -> { sub, listeners: Set }
const onConnected = new Set();

addEventListener('online', () => conn.set({ online: true }));
addEventListener('offline', () => conn.set({ online: false }));

export function wsBase() {
  return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}`;
}

export function start() {
  if (client) return;
  client = new Centrifuge(`${wsBase()}/connection/websocket`, {
    getToken: async () => {
      try {
        return await accessToken();
      } catch (e) {
        // Signed out: stop for good. Anything else (offline): the SDK retries.
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) throw new UnauthorizedError('');
        throw e;
      }
    },
    minReconnectDelay: 300,
    maxReconnectDelay: 5000,
  });
  client.on('connecting', () => conn.set({ state: 'connecting' }));
  client.on('disconnected', () => conn.set({ state: 'disconnected' }));
  client.on('connected', () => {
    conn.set({ state: 'connected', everConnected: true });
    for (const f of onConnected) f();
  });
  client.connect();
}

export function stop() {
  if (!client) return;
  client.disconnect();
  for (const { sub } of channels.values()) client.removeSubscription(sub);
  channels.clear();
  client = null;
  conn.set({ state: 'disconnected', everConnected: false });
}

export function connected() {
  return conn.get().state === 'connected';
}

/** Calls `f` on every (re)connect; returns the function that stops it. */
export function whenConnected(f) {
  onConnected.add(f);
  return () => onConnected.delete(f);
}

export function rpc(method, data) {
  if (!client) return Promise.reject(new Error('not connected'));
  return client.rpc(method, data).then((r) => r.data);
}

/**
 * Listens on `channel`: `handlers.publication(data, ctx)`, `handlers.subscribed(ctx)`,
 * `handlers.unsubscribed(ctx)`. Returns the function that stops listening; the last one to
 * stop unsubscribes.
 */
export function listen(channel, handlers) {
  if (!client) return () => {};
  let entry = channels.get(channel);
  if (!entry) {
    const sub = client.getSubscription(channel) || client.newSubscription(channel);
    entry = { sub, listeners: new Set() };
    const each = (kind) => (ctx) => {
      for (const h of entry.listeners) h[kind]?.(kind === 'publication' ? ctx.data : ctx, ctx);
    };
    sub.on('publication', each('publication'));
    sub.on('subscribed', each('subscribed'));
    sub.on('unsubscribed', each('unsubscribed'));
    sub.on('error', (ctx) => console.warn(`subscription ${channel}:`, ctx.error));
    channels.set(channel, entry);
    sub.subscribe();
  } else if (entry.sub.state === 'subscribed') {
    // A late listener learns it is live already.
    queueMicrotask(() => handlers.subscribed?.({ channel, late: true }));
  }
  entry.listeners.add(handlers);
  return () => {
    entry.listeners.delete(handlers);
    if (entry.listeners.size === 0 && channels.get(channel) === entry) {
      channels.delete(channel);
      entry.sub.unsubscribe();
      client?.removeSubscription(entry.sub);
    }
  };
}

/** The SDK subscription of a channel someone listens on (for history). */
export function subscription(channel) {
  return channels.get(channel)?.sub ?? null;
}
