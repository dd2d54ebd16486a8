// Notifications under the bell: the stored list (GET /v1/notifications), read again on every
// (re)connect, and the live pushes on my personal channel `notifications:#{id}`.
import { api, me } from './api.js';
import * as chat from './chat.js';
import * as rt from './rt.js';
import { createStore } from './store.js';

export const notes = createStore({ list: [], loaded: false });

let stops = [];

export function start() {
  const id = me()?.id;
  stops.push(
    rt.listen(`notifications:#${id}`, {
      publication: (data) => {
        const n = data?.notification;
        if (!n) return;
        notes.set((s) => ({ list: [n, ...s.list.filter((x) => x.id !== n.id)] }));
        // A new direct room or an invite: the room list changed.
        if (n.kind === 'direct' || n.kind === 'invite') chat.loadRooms().catch(() => {});
        if (n.kind === 'share') dispatchEvent(new Event('switchboard:documents'));
      },
    }),
    rt.whenConnected(() => load().catch(() => {})),
  );
  load().catch(() => {});
}

export function stop() {
  stops.forEach((f) => f());
  stops = [];
  notes.set({ list: [], loaded: false });
}

export async function load() {
  const { notifications } = await api('GET', '/v1/notifications?limit=50');
  notes.set({ list: notifications, loaded: true });
}

export function unread() {
  return notes.get().list.filter((n) => !n.read).length;
}

export async function markRead(ids) {
  const set = new Set(ids);
  notes.set((s) => ({ list: s.list.map((n) => (set.has(n.id) ? { ...n, read: true } : n)) }));
  await api('POST', '/v1/notifications/read', { ids });
}

export async function markAll() {
  notes.set((s) => ({ list: s.list.map((n) => ({ ...n, read: true })) }));
  await api('POST', '/v1/notifications/read', { all: true });
}
