// Names and presence of other users. Profiles are fetched in batches (GET /v1/users?ids=)
// and cached; presence (GET /v1/users/{id}/presence) is polled for the users on screen,
// since the server does not push presence changes.
import { api } from './api.js';
import { createStore } from './store.js';

/** `profiles`: id -> {id, username, display_name}; `presence`: id -> {online, last_seen}. */
export const people = createStore({ profiles: {}, presence: {} });

const wanted = new Set();
let batch = null;

/** The profile of `id`, fetching it in the background when unknown. */
export function profile(id) {
  id = Number(id);
  const p = people.get().profiles[id];
  if (p) return p;
  if (!wanted.has(id)) {
    wanted.add(id);
    batch ??= setTimeout(fetchWanted, 10);
  }
  return null;
}

export function nameOf(id) {
  const p = profile(id);
  return p ? p.display_name : `user ${id}`;
}

async function fetchWanted() {
  batch = null;
  const ids = [...wanted].slice(0, 100);
  ids.forEach((id) => wanted.delete(id));
  if (wanted.size) batch = setTimeout(fetchWanted, 10);
  try {
    const { users } = await api('GET', `/v1/users?ids=${ids.join(',')}`);
    remember(users);
  } catch (e) {
    console.warn('profiles:', e.message);
  }
}

export function remember(users) {
  const profiles = { ...people.get().profiles };
  for (const u of users) profiles[u.id] = { id: u.id, username: u.username, display_name: u.display_name };
  people.set({ profiles });
}

/** Finds a user by username (any case); null when there is none. */
export async function findUser(username) {
  const name = username.trim().replace(/^@/, '');
  if (!name) return null;
  const { users } = await api('GET', `/v1/users?username=${encodeURIComponent(name)}`);
  remember(users);
  return users[0] ?? null;
}

const watched = new Map(); // id -> number of watchers
let poll = null;

async function refreshPresence() {
  const ids = [...watched.keys()];
  const results = await Promise.allSettled(ids.map((id) => api('GET', `/v1/users/${id}/presence`)));
  const presence = { ...people.get().presence };
  results.forEach((r, i) => {
    if (r.status === 'fulfilled') presence[ids[i]] = r.value;
  });
  people.set({ presence });
}

/** Keeps the presence of `ids` fresh until the returned function is called. */
export function watchPresence(ids) {
  const list = [...new Set(ids.map(Number))];
  for (const id of list) watched.set(id, (watched.get(id) ?? 0) + 1);
  refreshPresence();
  poll ??= setInterval(refreshPresence, 15_000);
  return () => {
    for (const id of list) {
      const n = (watched.get(id) ?? 1) - 1;
      if (n <= 0) watched.delete(id);
      else watched.set(id, n);
    }
    if (watched.size === 0 && poll) {
      clearInterval(poll);
      poll = null;
    }
  };
}
