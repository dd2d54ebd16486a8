// Chat state: my rooms (with unread counts), each room's loaded messages, typing and read
// positions, and the outbox.
//
// Every room of mine is subscribed (`chat:{id}`), so unread badges move live. A room's
// messages are loaded when it is opened (the newest page, then older pages on scroll-up) and
// kept current from its publications: `message`, `edit`, `delete`, `removed`, `restored`
// events carry the message; `typing` and `read` are ephemeral pushes.
//
// The outbox: a message is first stored in localStorage with a fresh `client_msg_id`, then
// sent with `rpc chat.send`. It leaves the outbox when the server answers or when its own
// publication comes back. A send that fails for want of a connection stays and is retried on
// reconnect with the same `client_msg_id`, which the server deduplicates: a message typed
// offline, or whose answer was lost, is delivered exactly once.
import { api, me } from './api.js';
import { nameOf } from './people.js';
import * as rt from './rt.js';
import { createStore } from './store.js';
import { uuid } from './util.jsx';

export const PAGE = 30;
export const TYPING_MS = 5000;
/** Protocol errors a retry cannot fix: unknown channel, permission denied, method, bad request. */
const PERMANENT = new Set([102, 103, 104, 107]);

export const chat = createStore({
  loaded: false,
  error: null,
  /** id -> {room, role, unread, last_read_offset, last_message} */
  rooms: {},
  /** id -> members [{user_id, role, last_read_offset, ...}] */
  members: {},
  /** id -> {list (by offset), hasMore, loading, error} */
  messages: {},
  /** id -> {user_id: showUntilMs} */
  typing: {},
  /** id -> {user_id: offset read} */
  reads: {},
  /** [{key, room, text, client_msg_id, at, error?}] */
  outbox: [],
  current: null,
});

const stops = new Map(); // room id -> stop listening
const offsets = {}; // room id -> newest stream offset known
const readSent = {}; // room id -> offset last sent with chat.read
let stopConnected = null;

function setIn(key, id, value) {
  chat.set((s) => ({ [key]: { ...s[key], [id]: typeof value === 'function' ? value(s[key][id]) : value } }));
}

/** Updates a room's summary, if it is one of mine. */
function patchRoom(id, f) {
  const s = chat.get().rooms[id];
  if (s) setIn('rooms', id, f(s));
}

function bumpOffset(id, offset) {
  if (offset > (offsets[id] ?? 0)) offsets[id] = offset;
}

// ----- session -----

export function start() {
  chat.set({ outbox: loadOutbox() });
  stopConnected = rt.whenConnected(() => {
    flush();
    loadRooms().catch(() => {});
  });
  loadRooms().catch((e) => chat.set({ error: e.message }));
  addEventListener('visibilitychange', onVisible);
}

export function stop() {
  stopConnected?.();
  for (const s of stops.values()) s();
  stops.clear();
  removeEventListener('visibilitychange', onVisible);
  chat.set({ loaded: false, rooms: {}, members: {}, messages: {}, typing: {}, reads: {}, outbox: [], current: null });
}

function onVisible() {
  const id = chat.get().current;
  if (id && !document.hidden) markRead(id);
}

// ----- rooms -----

export async function loadRooms() {
  const { rooms } = await api('GET', '/v1/rooms');
  const map = {};
  const current = chat.get().current;
  for (const s of rooms) {
    map[s.room.id] = s.room.id === current ? { ...s, unread: 0 } : s;
    bumpOffset(s.room.id, s.room.last_offset);
  }
  chat.set({ rooms: map, loaded: true, error: null });
  for (const s of rooms) {
    listenRoom(s.room.id);
    if (s.room.kind === 'direct' && !chat.get().members[s.room.id]) loadMembers(s.room.id).catch(() => {});
  }
  for (const id of [...stops.keys()]) if (!map[id]) unlistenRoom(id);
}

export async function loadMembers(id) {
  const { members } = await api('GET', `/v1/rooms/${id}`);
  const reads = { ...(chat.get().reads[id] ?? {}) };
  for (const m of members) reads[m.user_id] = Math.max(reads[m.user_id] ?? 0, m.last_read_offset);
  setIn('members', id, members);
  setIn('reads', id, reads);
  return members;
}

function listenRoom(id) {
  if (stops.has(id)) return;
  const stop = rt.listen(`chat:${id}`, {
    publication: (data, ctx) => onEvent(id, data, ctx.offset),
    subscribed: (ctx) => {
      // Missed more than the server could replay: page the newest messages again.
      if (ctx.wasRecovering && !ctx.recovered && chat.get().messages[id]) loadLatest(id);
    },
    unsubscribed: () => {
      // The server ended it (left, kicked, room deleted).
      if (stops.get(id) === stop) {
        stops.delete(id);
        loadRooms().catch(() => {});
      }
    },
  });
  stops.set(id, stop);
}

function unlistenRoom(id) {
  const stop = stops.get(id);
  stops.delete(id);
  stop?.();
}

/** The other member of a direct room. */
export function peerOf(id) {
  const mine = me()?.id;
  return (chat.get().members[id] ?? []).find((m) => m.user_id !== mine)?.user_id ?? null;
}

export function roomName(id) {
  const s = chat.get().rooms[id];
  if (!s) return `room ${id}`;
  if (s.room.kind === 'direct') {
    const peer = peerOf(id);
    return peer ? nameOf(peer) : 'Direct message';
  }
  return s.room.name;
}

export async function createRoom({ kind, name, members = [] }) {
  const room = await api('POST', '/v1/rooms', { kind, name, members });
  await loadRooms();
  return room;
}

export const directRoom = (userId) => createRoom({ kind: 'direct', name: '', members: [userId] });

export async function publicRooms() {
  return (await api('GET', '/v1/rooms/public?limit=200')).rooms;
}

export async function joinRoom(id) {
  await api('POST', `/v1/rooms/${id}/join`);
  await loadRooms();
}

export async function leaveRoom(id) {
  await api('POST', `/v1/rooms/${id}/leave`);
  unlistenRoom(id);
  if (chat.get().current === id) chat.set({ current: null });
  await loadRooms();
}

export async function invite(id, userId) {
  await api('POST', `/v1/rooms/${id}/invite`, { user_id: userId });
  await loadMembers(id);
}

// ----- one room -----

export function openRoom(id) {
  chat.set({ current: id });
  if (id == null) return;
  if (!chat.get().messages[id]) loadLatest(id);
  else markRead(id);
  loadMembers(id).catch(() => {});
}

function merge(list, more) {
  const byId = new Map(list.map((m) => [m.id, m]));
  for (const m of more) byId.set(m.id, m);
  return [...byId.values()].sort((a, b) => a.offset - b.offset);
}

export async function loadLatest(id) {
  setIn('messages', id, (box) => ({ list: [], hasMore: false, ...box, loading: true, error: null }));
  try {
    const { messages } = await api('GET', `/v1/rooms/${id}/messages?limit=${PAGE}`);
    messages.forEach((m) => bumpOffset(id, m.offset));
    setIn('messages', id, (box) => ({
      list: merge(box?.list ?? [], messages),
      hasMore: messages.length === PAGE && messages[0].offset > 1,
      loading: false,
      error: null,
    }));
    markRead(id);
  } catch (e) {
    setIn('messages', id, (box) => ({ ...box, loading: false, error: e.message }));
  }
}

/** The page before the oldest loaded message. */
export async function loadOlder(id) {
  const box = chat.get().messages[id];
  if (!box || box.loading || !box.hasMore || !box.list.length) return;
  setIn('messages', id, { ...box, loading: true });
  try {
    const before = box.list[0].offset;
    const { messages } = await api('GET', `/v1/rooms/${id}/messages?before=${before}&limit=${PAGE}`);
    setIn('messages', id, (b) => ({
      ...b,
      list: merge(b.list, messages),
      hasMore: messages.length === PAGE && messages[0].offset > 1,
      loading: false,
    }));
  } catch (e) {
    setIn('messages', id, (b) => ({ ...b, loading: false, error: e.message }));
  }
}

function upsert(id, m) {
  if (!chat.get().messages[id]) return;
  setIn('messages', id, (box) => ({ ...box, list: merge(box.list, [m]) }));
}

function viewing(id) {
  return chat.get().current === id && !document.hidden;
}

function onEvent(id, data, offset) {
  const mine = me()?.id;
  switch (data?.type) {
    case 'message':
    case 'edit':
    case 'delete':
    case 'removed':
    case 'restored': {
      if (offset) bumpOffset(id, offset);
      const m = data.message;
      if (!m) break;
      upsert(id, m);
      if (data.type === 'message') {
        settle(m);
        clearTyping(id, m.user_id);
        const own = m.user_id === mine;
        patchRoom(id, (s) => ({ ...s, last_message: m, unread: own || viewing(id) ? s.unread : s.unread + 1 }));
      }
      if (viewing(id)) markRead(id);
      break;
    }
    case 'typing':
      if (Number(data.user_id) !== mine) setTyping(id, Number(data.user_id), data.ttl_ms ?? TYPING_MS);
      break;
    case 'read':
      setIn('reads', id, (r) => ({ ...r, [data.user_id]: Math.max(r?.[data.user_id] ?? 0, data.offset) }));
      break;
    default:
  }
}

/** Moves my read position to the newest offset of the room. */
export function markRead(id) {
  const target = offsets[id] ?? 0;
  patchRoom(id, (s) => (s.unread ? { ...s, unread: 0 } : s));
  if (!target || target <= (readSent[id] ?? 0) || !rt.connected()) return;
  readSent[id] = target;
  rt.rpc('chat.read', { room: id, offset: target }).catch(() => {
    readSent[id] = 0;
  });
}

// ----- typing -----

const typingSent = {}; // room -> when chat.typing was last sent
const typedAt = {}; // room -> the last keystroke
let sweep = null;

/** Call on every keystroke in the composer: tells the room at most every 1.5 s. */
export function typing(id) {
  typedAt[id] = Date.now();
  signalTyping(id);
}

function signalTyping(id) {
  const now = Date.now();
  if (now - (typingSent[id] ?? 0) < 1500 || !rt.connected()) return;
  typingSent[id] = now;
  rt.rpc('chat.typing', { room: id })
    .then((r) => {
      // The server passes one push per user and room per second; if this one was held
      // back and the user is still typing, say it again once that second is over.
      if (r?.sent === false) {
        typingSent[id] = 0;
        setTimeout(() => Date.now() - typedAt[id] < 3000 && signalTyping(id), 1100);
      }
    })
    .catch(() => {});
}

function setTyping(id, user, ttl) {
  setIn('typing', id, (t) => ({ ...t, [user]: Date.now() + ttl }));
  sweep ??= setInterval(() => {
    const now = Date.now();
    const typingNow = {};
    let any = false;
    for (const [room, users] of Object.entries(chat.get().typing)) {
      const left = Object.fromEntries(Object.entries(users).filter(([, until]) => until > now));
      typingNow[room] = left;
      any ||= Object.keys(left).length > 0;
    }
    chat.set({ typing: typingNow });
    if (!any) {
      clearInterval(sweep);
      sweep = null;
    }
  }, 1000);
}

function clearTyping(id, user) {
  const t = chat.get().typing[id];
  if (t?.[user]) {
    const { [user]: _, ...rest } = t;
    setIn('typing', id, rest);
  }
}

// ----- sending, editing, deleting -----

function outboxKey() {
  return `switchboard.outbox.${me()?.id}`;
}

function loadOutbox() {
  try {
    return JSON.parse(localStorage.getItem(outboxKey())) ?? [];
  } catch {
    return [];
  }
}

function saveOutbox(list) {
  localStorage.setItem(outboxKey(), JSON.stringify(list));
  chat.set({ outbox: list });
}

export function send(room, text) {
  // Receivers stop showing "typing" when the message arrives; the next keystroke says it anew.
  typingSent[room] = 0;
  const item = { key: uuid(), room, text, client_msg_id: uuid(), at: Date.now() };
  saveOutbox([...chat.get().outbox, item]);
  flush();
}

/** A message of mine came back: its outbox entry is done. */
function settle(m) {
  if (m.user_id !== me()?.id || !m.client_msg_id) return;
  const list = chat.get().outbox;
  if (list.some((x) => x.client_msg_id === m.client_msg_id)) {
    saveOutbox(list.filter((x) => x.client_msg_id !== m.client_msg_id));
  }
}

let flushing = false;
let retry = null;

/** Sends the outbox in order while connected. */
export async function flush() {
  if (flushing || !rt.connected()) return;
  flushing = true;
  clearTimeout(retry);
  let again = false;
  try {
    for (;;) {
      const item = chat.get().outbox.find((x) => !x.error);
      if (!item || !rt.connected()) break;
      try {
        const r = await rt.rpc('chat.send', {
          room: item.room,
          text: item.text,
          client_msg_id: item.client_msg_id,
        });
        upsert(item.room, r.message);
        saveOutbox(chat.get().outbox.filter((x) => x.key !== item.key));
      } catch (e) {
        if (PERMANENT.has(e?.code)) {
          saveOutbox(chat.get().outbox.map((x) => (x.key === item.key ? { ...x, error: e.message || 'refused' } : x)));
        } else {
          // Timeout, rate limit, a dropped connection: keep it; try again soon or on reconnect.
          again = true;
          break;
        }
      }
    }
  } finally {
    flushing = false;
  }
  if (again && rt.connected()) retry = setTimeout(flush, 1500);
}

export function retrySend(key) {
  saveOutbox(chat.get().outbox.map((x) => (x.key === key ? { ...x, error: undefined } : x)));
  flush();
}

export function discard(key) {
  saveOutbox(chat.get().outbox.filter((x) => x.key !== key));
}

export async function edit(messageId, text) {
  const r = await rt.rpc('chat.edit', { message_id: messageId, text });
  upsert(r.message.room_id, r.message);
}

export async function remove(messageId) {
  const r = await rt.rpc('chat.delete', { message_id: messageId });
  upsert(r.message.room_id, r.message);
}

