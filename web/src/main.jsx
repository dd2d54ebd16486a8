// The app's shell: sign-in, the header (navigation, bell, account), the connection banner,
// and the three pages: chat, documents, dashboard. Routes are paths (/chat/12,
// /documents/3, /dashboard); the server answers any of them with this app.
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { auth, login, logout, register } from './api.js';
import { Bell } from './Bell.jsx';
import * as chat from './chat.js';
import { ChatPage } from './Chat.jsx';
import { Dashboard } from './Dashboard.jsx';
import { DocumentsPage } from './Documents.jsx';
import * as notes from './notes.js';
import * as rt from './rt.js';
import { useStore } from './store.js';
import { Link, navigate, useRoute } from './util.jsx';

function AuthPage() {
  const [mode, setMode] = useState('login');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    const f = new FormData(e.currentTarget);
    setBusy(true);
    setError(null);
    try {
      if (mode === 'login') await login(f.get('username'), f.get('password'));
      else await register(f.get('username'), f.get('password'), f.get('display_name'));
      if (location.pathname === '/' || location.pathname === '/login') navigate('/chat', { replace: true });
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  const signup = mode === 'signup';
  return (
    <main class="auth" id="main">
      <div class="auth-card">
        <h1 class="brand-title">
          <img src="/favicon.svg" alt="" width="32" height="32" /> Switchboard
        </h1>
        <p class="muted">Chat, documents and a live view of the server, in real time.</p>
        <div class="tabs" role="tablist" aria-label="Account">
          <button role="tab" aria-selected={!signup} onClick={() => setMode('login')} type="button">
            Log in
          </button>
          <button role="tab" aria-selected={signup} onClick={() => setMode('signup')} type="button">
            Sign up
          </button>
        </div>
        <form onSubmit={submit} aria-label={signup ? 'Sign up' : 'Log in'}>
          <label>
            Username
            <input name="username" autocomplete="username" required minLength={3} maxLength={32}
              pattern="[A-Za-z0-9_.\-]+" title="3 to 32 letters, digits, _ . -" />
          </label>
          {signup && (
            <label>
              Display name
              <input name="display_name" autocomplete="name" required maxLength={64} />
            </label>
          )}
          <label>
            Password
            <input name="password" type="password" required minLength={8}
              autocomplete={signup ? 'new-password' : 'current-password'} />
          </label>
          {error && <p class="error" role="alert">{error}</p>}
          <button class="primary" type="submit" disabled={busy}>
            {signup ? 'Create account' : 'Log in'}
          </button>
        </form>
      </div>
    </main>
  );
}

/** Connecting, reconnecting or offline; nothing while connected. */
function Banner() {
  const c = useStore(rt.conn);
  const { outbox } = useStore(chat.chat);
  const waiting = outbox.filter((x) => !x.error).length;
  let state = null;
  let text = '';
  if (!c.online) {
    state = 'offline';
    text = 'You are offline.';
  } else if (c.state !== 'connected') {
    state = c.everConnected ? 'reconnecting' : 'connecting';
    text = c.everConnected ? 'Reconnecting…' : 'Connecting…';
  }
  return (
    <div class={`banner ${state ?? 'hidden'}`} role="status" aria-live="polite" data-testid="conn-banner"
      data-state={state ?? 'connected'}>
      {state && (
        <>
          <span class="banner-dot" aria-hidden="true" />
          {text}
          {waiting > 0 && ` ${waiting} message${waiting === 1 ? '' : 's'} will be sent when the connection is back.`}
        </>
      )}
    </div>
  );
}

function Shell({ user }) {
  const route = useRoute();
  const page = route[0] ?? 'chat';
  useEffect(() => {
    rt.start();
    chat.start();
    notes.start();
    return () => {
      notes.stop();
      chat.stop();
      rt.stop();
    };
  }, [user.id]);
  useEffect(() => {
    if (!['chat', 'documents', 'dashboard'].includes(page)) navigate('/chat', { replace: true });
  }, [page]);
  const nav = [
    ['chat', 'Chat'],
    ['documents', 'Documents'],
    ['dashboard', 'Dashboard'],
  ];
  return (
    <div class="shell">
      <a class="skip" href="#main">Skip to content</a>
      <header class="top">
        <Link href="/chat" class="brand" aria-label="Switchboard home">
          <img src="/favicon.svg" alt="" width="24" height="24" />
          <span>Switchboard</span>
        </Link>
        <nav aria-label="Main" class="main-nav">
          {nav.map(([key, label]) => (
            <Link key={key} href={`/${key}`} aria-current={page === key ? 'page' : undefined}>
              {label}
            </Link>
          ))}
        </nav>
        <div class="account">
          <Bell />
          <span class="whoami" title={`@${user.username}`} data-testid="whoami">
            {user.display_name}
          </span>
          <button type="button" class="ghost" onClick={() => logout()}>
            Log out
          </button>
        </div>
      </header>
      <Banner />
      <main id="main" class={`page page-${page}`} tabIndex={-1}>
        {page === 'chat' && <ChatPage roomId={route[1] ? Number(route[1]) : null} />}
        {page === 'documents' && <DocumentsPage docId={route[1] ? Number(route[1]) : null} />}
        {page === 'dashboard' && <Dashboard />}
      </main>
    </div>
  );
}

function App() {
  const { user } = useStore(auth);
  return user ? <Shell user={user} /> : <AuthPage />;
}

render(<App />, document.getElementById('app'));
