// The REST client and the session: access and refresh tokens kept in localStorage, so a
// reload stays signed in. Access tokens live 15 minutes; a request that finds one about to
// expire (or gets 401) first rotates the refresh token through POST /v1/auth/refresh.
// Refresh tokens are single use and a reused one signs the user out everywhere, so a
// rotation is done once at a time: one promise per tab and a Web Lock across tabs, and a
// tab that waited re-reads the token another tab may already have rotated.
import { createStore } from './store.js';

const KEY = 'switchboard.session';

function load() {
  try {
    return JSON.parse(localStorage.getItem(KEY));
  } catch {
    return null;
  }
}

let session = load();

/** `user`: the signed-in account, or null. */
export const auth = createStore({ user: session?.user ?? null });

function save(s) {
  session = s;
  if (s) localStorage.setItem(KEY, JSON.stringify(s));
  else localStorage.removeItem(KEY);
  auth.set({ user: s?.user ?? null });
}

// Another tab signed in, out, or rotated the tokens.
addEventListener('storage', (e) => {
  if (e.key !== KEY) return;
  const s = load();
  session = s;
  if ((auth.get().user?.id ?? null) !== (s?.user?.id ?? null)) auth.set({ user: s?.user ?? null });
});

function expiryOf(jwt) {
  try {
    const part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part)).exp * 1000;
  } catch {
    return 0;
  }
}

function adopt(pair) {
  save({
    user: pair.user,
    access_token: pair.access_token,
    refresh_token: pair.refresh_token,
    access_exp: expiryOf(pair.access_token) || Date.now() + pair.expires_in * 1000,
  });
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function request(method, path, body, token) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 204) return null;
  const type = r.headers.get('content-type') || '';
  const data = type.includes('json') ? await r.json() : await r.text();
  if (!r.ok) {
    const msg = data?.error?.message || (typeof data === 'string' && data) || r.statusText;
    throw new ApiError(r.status, data?.error?.code, msg);
  }
  return data;
}

let refreshing = null;

/** Rotates the refresh token; resolves to a fresh access token. */
export function refresh() {
  refreshing ??= rotate().finally(() => {
    refreshing = null;
  });
  return refreshing;
}

async function rotate() {
  const run = async () => {
    const stored = load();
    if (!stored?.refresh_token) {
      save(null);
      throw new ApiError(401, 'unauthorized', 'signed out');
    }
    // Another tab rotated while we waited for the lock: use its tokens.
    if (stored.refresh_token !== session?.refresh_token && stored.access_exp - Date.now() > 30_000) {
      session = stored;
      return stored.access_token;
    }
    try {
      adopt(await request('POST', '/v1/auth/refresh', { refresh_token: stored.refresh_token }));
      return session.access_token;
    } catch (e) {
      // Only a refusal signs out; a network error (offline) keeps the session for later.
      if (e instanceof ApiError && (e.status === 401 || e.status === 403)) save(null);
      throw e;
    }
  };
  return navigator.locks ? navigator.locks.request('switchboard-refresh', run) : run();
}

/** A valid access token (refreshed when it expires within 30 s). */
export async function accessToken() {
  if (!session) throw new ApiError(401, 'unauthorized', 'signed out');
  if (session.access_exp - Date.now() > 30_000) return session.access_token;
  return refresh();
}

/** An authenticated request; a 401 refreshes the token and retries once. */
export async function api(method, path, body) {
  const token = await accessToken();
  try {
    return await request(method, path, body, token);
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 401) throw e;
    return request(method, path, body, await refresh());
  }
}

export async function login(username, password) {
  adopt(await request('POST', '/v1/auth/login', { username, password }));
}

export async function register(username, password, displayName) {
  await request('POST', '/v1/auth/register', {
    username,
    password,
    display_name: displayName,
  });
  await login(username, password);
}

export async function logout() {
  const s = session;
  if (s) {
    try {
      await request('POST', '/v1/auth/logout', { refresh_token: s.refresh_token }, s.access_token);
    } catch {
      // Signing out locally is what matters; the token expires on its own.
    }
  }
  save(null);
}

export function me() {
  return session?.user ?? null;
}
