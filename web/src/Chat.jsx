// The chat page: my rooms (unread badges, direct messages with presence) and the open room
// (history paging on scroll-up, composer, typing, "seen by", edit and delete).
import { useEffect, useLayoutEffect, useRef, useState } from 'preact/hooks';
import { me } from './api.js';
import * as chat from './chat.js';
import { findUser, nameOf, people, watchPresence } from './people.js';
import { useStore } from './store.js';
import { colorOf, Link, navigate, timeOf } from './util.jsx';

export function ChatPage({ roomId }) {
  const state = useStore(chat.chat);
  useStore(people);
  useEffect(() => {
    chat.openRoom(roomId);
    return () => chat.openRoom(null);
  }, [roomId]);
  return (
    <div class={`chat ${roomId ? 'has-room' : 'no-room'}`}>
      <RoomList state={state} current={roomId} />
      {roomId ? (
        <RoomView key={roomId} id={roomId} state={state} />
      ) : (
        <section class="room empty-room" aria-label="No room open">
          <p class="muted">Pick a room, start a direct message, or create a room.</p>
        </section>
      )}
    </div>
  );
}

function Dot({ userId }) {
  const p = people.get().presence[userId];
  const online = p?.online;
  return (
    <span class={`dot ${online ? 'online' : 'offline'}`} role="img" aria-label={online ? 'online' : 'offline'}
      title={online ? 'online' : 'offline'} data-testid={`presence-${userId}`} data-online={online ? 'true' : 'false'} />
  );
}

function byRecent(a, b) {
  const at = (s) => s.last_message?.created_at ?? s.room.created_at;
  return at(b) - at(a);
}

function RoomList({ state, current }) {
  const [panel, setPanel] = useState(null);
  const rooms = Object.values(state.rooms).sort(byRecent);
  const groups = rooms.filter((s) => s.room.kind !== 'direct');
  const directs = rooms.filter((s) => s.room.kind === 'direct');
  const peers = directs.map((s) => chat.peerOf(s.room.id)).filter(Boolean);
  const peerKey = peers.join(',');
  useEffect(() => (peers.length ? watchPresence(peers) : undefined), [peerKey]);
  const toggle = (p) => setPanel(panel === p ? null : p);
  const item = (s) => {
    const id = s.room.id;
    const name = chat.roomName(id);
    const peer = s.room.kind === 'direct' ? chat.peerOf(id) : null;
    const last = s.last_message;
    return (
      <li key={id}>
        <Link href={`/chat/${id}`} class="room-link" aria-current={current === id ? 'page' : undefined}
          data-testid="room-link" data-room={id}>
          <span class="room-icon" aria-hidden="true">
            {s.room.kind === 'direct' ? peer ? <Dot userId={peer} /> : '•' : s.room.kind === 'private' ? '🔒' : '#'}
          </span>
          <span class="room-text">
            <span class="room-name">{name}</span>
            {last && (
              <span class="room-last">
                {last.user_id === me()?.id ? 'You' : nameOf(last.user_id)}: {last.text ?? ''}
              </span>
            )}
          </span>
          {s.unread > 0 && (
            <span class="badge" data-testid="unread" aria-label={`${s.unread} unread`}>
              {s.unread > 99 ? '99+' : s.unread}
            </span>
          )}
        </Link>
      </li>
    );
  };
  return (
    <aside class="rooms" aria-label="Rooms">
      <div class="rooms-actions">
        <button type="button" aria-expanded={panel === 'new'} onClick={() => toggle('new')}>New room</button>
        <button type="button" aria-expanded={panel === 'dm'} onClick={() => toggle('dm')}>Direct message</button>
        <button type="button" aria-expanded={panel === 'browse'} onClick={() => toggle('browse')}>Browse</button>
      </div>
      {panel === 'new' && <NewRoom done={() => setPanel(null)} />}
      {panel === 'dm' && <NewDirect done={() => setPanel(null)} />}
      {panel === 'browse' && <Browse state={state} done={() => setPanel(null)} />}
      {!state.loaded && !state.error && <p class="muted pad">Loading rooms…</p>}
      {state.error && <p class="error pad" role="alert">{state.error}</p>}
      <h2 class="list-title">Rooms</h2>
      {groups.length ? <ul class="room-list">{groups.map(item)}</ul> : state.loaded && <p class="muted pad">No rooms yet.</p>}
      <h2 class="list-title">Direct messages</h2>
      {directs.length ? <ul class="room-list">{directs.map(item)}</ul> : state.loaded && <p class="muted pad">None yet.</p>}
    </aside>
  );
}

/** A small form whose submit runs `action` and shows its error. */
function useAction() {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const run = (action) => async (e) => {
    e?.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await action(e);
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  return { error, busy, run, setError };
}

async function usersByName(text) {
  const names = text.split(/[\s,]+/).filter(Boolean);
  const ids = [];
  for (const n of names) {
    const u = await findUser(n);
    if (!u) throw new Error(`No user named ${n}`);
    if (u.id !== me()?.id) ids.push(u.id);
  }
  return ids;
}

function NewRoom({ done }) {
  const { error, busy, run } = useAction();
  const submit = run(async (e) => {
    const f = new FormData(e.currentTarget);
    const members = await usersByName(String(f.get('invite') ?? ''));
    const room = await chat.createRoom({ kind: f.get('kind'), name: String(f.get('name')).trim(), members });
    done();
    navigate(`/chat/${room.id}`);
  });
  return (
    <form class="panel" onSubmit={submit} aria-label="New room">
      <label>
        Room name
        <input name="name" required maxLength={100} autoFocus />
      </label>
      <fieldset class="inline">
        <legend>Who can join</legend>
        <label><input type="radio" name="kind" value="public" checked /> Anyone (public)</label>
        <label><input type="radio" name="kind" value="private" /> Invited only</label>
      </fieldset>
      <label>
        Invite (usernames, optional)
        <input name="invite" placeholder="alice, bob" />
      </label>
      {error && <p class="error" role="alert">{error}</p>}
      <button class="primary" type="submit" disabled={busy}>Create room</button>
    </form>
  );
}

function NewDirect({ done }) {
  const { error, busy, run } = useAction();
  const submit = run(async (e) => {
    const name = String(new FormData(e.currentTarget).get('username'));
    const u = await findUser(name);
    if (!u) throw new Error(`No user named ${name}`);
    if (u.id === me()?.id) throw new Error('That is you');
    const room = await chat.directRoom(u.id);
    done();
    navigate(`/chat/${room.id}`);
  });
  return (
    <form class="panel" onSubmit={submit} aria-label="Direct message">
      <label>
        Username
        <input name="username" required autoFocus />
      </label>
      {error && <p class="error" role="alert">{error}</p>}
      <button class="primary" type="submit" disabled={busy}>Open conversation</button>
    </form>
  );
}

function Browse({ state, done }) {
  const [rooms, setRooms] = useState(null);
  const { error, run } = useAction();
  useEffect(() => {
    run(async () => setRooms(await chat.publicRooms()))();
  }, []);
  const join = (id) =>
    run(async () => {
      await chat.joinRoom(id);
      done();
      navigate(`/chat/${id}`);
    })();
  return (
    <div class="panel" role="region" aria-label="Public rooms">
      {error && <p class="error" role="alert">{error}</p>}
      {!rooms && !error && <p class="muted">Loading…</p>}
      {rooms && rooms.length === 0 && <p class="muted">No public rooms yet.</p>}
      {rooms && (
        <ul class="plain">
          {rooms.map((r) => (
            <li key={r.id} class="row">
              <span># {r.name}</span>
              {state.rooms[r.id] ? (
                <Link href={`/chat/${r.id}`} onNavigate={done}>Open</Link>
              ) : (
                <button type="button" onClick={() => join(r.id)} aria-label={`Join ${r.name}`}>Join</button>
              )}
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}

function RoomView({ id, state }) {
  const summary = state.rooms[id];
  const members = state.members[id] ?? [];
  const [showMembers, setShowMembers] = useState(false);
  const [inviting, setInviting] = useState(false);
  const memberKey = members.map((m) => m.user_id).join(',');
  useEffect(() => (members.length ? watchPresence(members.map((m) => m.user_id)) : undefined), [memberKey]);
  if (!summary) {
    return (
      <section class="room" aria-label="Room">
        <Link href="/chat" class="back">← Rooms</Link>
        <p class="muted pad">{state.loaded ? 'This room does not exist, or you are not a member.' : 'Loading…'}</p>
      </section>
    );
  }
  const name = chat.roomName(id);
  const direct = summary.room.kind === 'direct';
  const canInvite = !direct && (summary.role === 'owner' || summary.role === 'moderator');
  const peer = direct ? chat.peerOf(id) : null;
  return (
    <section class="room" aria-label={`Room ${name}`}>
      <header class="room-head">
        <Link href="/chat" class="back" aria-label="Back to rooms">←</Link>
        <h2 class="room-title">
          {direct ? peer && <Dot userId={peer} /> : summary.room.kind === 'private' ? '🔒 ' : '# '}
          <span data-testid="room-title">{name}</span>
        </h2>
        <div class="room-tools">
          {!direct && (
            <button type="button" aria-expanded={showMembers} onClick={() => setShowMembers(!showMembers)}>
              Members ({members.length})
            </button>
          )}
          {canInvite && (
            <button type="button" aria-expanded={inviting} onClick={() => setInviting(!inviting)}>Invite</button>
          )}
          {!direct && (
            <button type="button" class="ghost" onClick={() => chat.leaveRoom(id).then(() => navigate('/chat'))}>
              Leave
            </button>
          )}
        </div>
      </header>
      {inviting && <Invite id={id} done={() => setInviting(false)} />}
      {showMembers && (
        <ul class="members" aria-label="Members">
          {members.map((m) => (
            <li key={m.user_id}>
              <Dot userId={m.user_id} /> {nameOf(m.user_id)}
              {m.role !== 'member' && <span class="role">{m.role}</span>}
            </li>
          ))}
        </ul>
      )}
      <Messages key={id} id={id} state={state} members={members} />
      <Typing id={id} state={state} />
      <Composer id={id} name={name} state={state} />
    </section>
  );
}

function Invite({ id, done }) {
  const { error, busy, run } = useAction();
  const [ok, setOk] = useState(null);
  const submit = run(async (e) => {
    const form = e.currentTarget;
    const name = String(new FormData(form).get('username'));
    const u = await findUser(name);
    if (!u) throw new Error(`No user named ${name}`);
    await chat.invite(id, u.id);
    setOk(`${u.display_name} was added.`);
    form.reset();
  });
  return (
    <form class="panel inline-form" onSubmit={submit} aria-label="Invite to room">
      <label>
        Username
        <input name="username" required autoFocus />
      </label>
      <button class="primary" type="submit" disabled={busy}>Add</button>
      <button type="button" class="ghost" onClick={done}>Close</button>
      {error && <p class="error" role="alert">{error}</p>}
      {ok && <p class="ok" role="status">{ok}</p>}
    </form>
  );
}

const MENTION = /(@[A-Za-z0-9_.-]{3,32})/g;

function Text({ text }) {
  const mine = `@${me()?.username}`.toLowerCase();
  return text.split(MENTION).map((part, i) =>
    i % 2 ? (
      <mark key={i} class={part.toLowerCase() === mine ? 'mention me' : 'mention'}>{part}</mark>
    ) : (
      part
    ),
  );
}

function Messages({ id, state, members }) {
  const box = state.messages[id] ?? { list: [], loading: true };
  const pending = state.outbox.filter((x) => x.room === id);
  const mine = me()?.id;
  const scroller = useRef(null);
  const view = useRef({ first: null, height: 0, stick: true });
  const [editing, setEditing] = useState(null);
  const [confirming, setConfirming] = useState(null);
  const [error, setError] = useState(null);

  const onScroll = () => {
    const el = scroller.current;
    view.current.stick = el.scrollHeight - el.scrollTop - el.clientHeight < 80;
    if (el.scrollTop < 120) chat.loadOlder(id);
  };
  useLayoutEffect(() => {
    const el = scroller.current;
    if (!el) return;
    const first = box.list[0]?.id ?? null;
    const v = view.current;
    if (v.first !== null && first !== v.first && v.height) {
      // Older messages were put on top: keep what was on screen where it was.
      el.scrollTop += el.scrollHeight - v.height;
    } else if (v.stick) {
      el.scrollTop = el.scrollHeight;
    }
    v.first = first;
    v.height = el.scrollHeight;
  });
  // Edit the last message of mine from the composer (ArrowUp in an empty composer).
  useEffect(() => {
    const f = () => {
      const last = [...box.list].reverse().find((m) => m.user_id === mine && !m.deleted && !m.removed);
      if (last) setEditing(last.id);
    };
    addEventListener(`switchboard:edit-last:${id}`, f);
    return () => removeEventListener(`switchboard:edit-last:${id}`, f);
  }, [box.list]);

  const act = (p) => p.catch((e) => setError(e.message));
  const lastMine = [...box.list].reverse().find((m) => m.user_id === mine && !m.deleted && !m.removed);
  const reads = state.reads[id] ?? {};
  const seenBy = lastMine
    ? members.filter((m) => m.user_id !== mine && (reads[m.user_id] ?? 0) >= lastMine.offset).map((m) => nameOf(m.user_id))
    : [];

  return (
    <div class="messages" ref={scroller} onScroll={onScroll} role="log" aria-label="Messages" tabIndex={0}
      data-testid="messages">
      <div class="history-edge">
        {box.loading && <span class="muted">Loading…</span>}
        {!box.loading && box.hasMore && (
          <button type="button" class="link" onClick={() => chat.loadOlder(id)}>Load older messages</button>
        )}
        {!box.loading && !box.hasMore && <span class="muted">The beginning of this conversation.</span>}
        {box.error && <span class="error" role="alert">{box.error}</span>}
      </div>
      {error && <p class="error" role="alert">{error}</p>}
      {box.list.map((m) => {
        const own = m.user_id === mine;
        const hidden = m.deleted || m.removed;
        const c = colorOf(m.user_id);
        return (
          <article key={m.id} class={`msg ${own ? 'own' : ''} ${hidden ? 'hidden-msg' : ''}`} data-testid="message"
            data-offset={m.offset} aria-label={`${own ? 'You' : nameOf(m.user_id)}, ${timeOf(m.created_at)}`}>
            <header>
              <span class="author" style={{ color: c.color }}>{own ? 'You' : nameOf(m.user_id)}</span>
              <time dateTime={new Date(m.created_at).toISOString()}>{timeOf(m.created_at)}</time>
              {m.edited_at && !hidden && <span class="muted small">(edited)</span>}
            </header>
            {m.removed ? (
              <p class="placeholder" data-testid="removed">This message was removed by a moderator.</p>
            ) : m.deleted ? (
              <p class="placeholder">This message was deleted.</p>
            ) : editing === m.id ? (
              <EditBox m={m} done={() => setEditing(null)} onError={setError} />
            ) : (
              <p class="text" data-testid="message-text"><Text text={m.text ?? ''} /></p>
            )}
            {own && !hidden && editing !== m.id && (
              <div class="msg-actions">
                {confirming === m.id ? (
                  <>
                    <span>Delete this message?</span>
                    <button type="button" class="danger" onClick={() => act(chat.remove(m.id)).finally(() => setConfirming(null))}>
                      Delete
                    </button>
                    <button type="button" class="ghost" onClick={() => setConfirming(null)}>Cancel</button>
                  </>
                ) : (
                  <>
                    <button type="button" class="link" onClick={() => setEditing(m.id)} aria-label="Edit message">Edit</button>
                    <button type="button" class="link" onClick={() => setConfirming(m.id)} aria-label="Delete message">
                      Delete
                    </button>
                  </>
                )}
              </div>
            )}
          </article>
        );
      })}
      {pending.map((x) => (
        <article key={x.key} class={`msg own pending ${x.error ? 'failed' : ''}`} data-testid="pending-message">
          <header>
            <span class="author">You</span>
            <span class="muted small">{x.error ? `Not sent: ${x.error}` : 'Waiting to send…'}</span>
          </header>
          <p class="text">{x.text}</p>
          {x.error && (
            <div class="msg-actions visible">
              <button type="button" class="link" onClick={() => chat.retrySend(x.key)}>Retry</button>
              <button type="button" class="link" onClick={() => chat.discard(x.key)}>Discard</button>
            </div>
          )}
        </article>
      ))}
      {seenBy.length > 0 && (
        <p class="seen" data-testid="seen-by">Seen by {seenBy.join(', ')}</p>
      )}
    </div>
  );
}

function EditBox({ m, done, onError }) {
  const [text, setText] = useState(m.text ?? '');
  const save = async (e) => {
    e?.preventDefault();
    const t = text.trim();
    if (!t || t === m.text) return done();
    try {
      await chat.edit(m.id, t);
      done();
    } catch (err) {
      onError(err.message);
    }
  };
  return (
    <form class="edit" onSubmit={save}>
      <label class="sr-only" for={`edit-${m.id}`}>Edited text</label>
      <textarea id={`edit-${m.id}`} value={text} rows={2} maxLength={4000} autoFocus
        onInput={(e) => setText(e.currentTarget.value)}
        onKeyDown={(e) => {
          if (e.key === 'Escape') done();
          if (e.key === 'Enter' && !e.shiftKey) save(e);
        }} />
      <div class="row-buttons">
        <button type="submit" class="primary">Save</button>
        <button type="button" class="ghost" onClick={done}>Cancel</button>
      </div>
    </form>
  );
}

function Typing({ id, state }) {
  const now = Date.now();
  const who = Object.entries(state.typing[id] ?? {})
    .filter(([, until]) => until > now)
    .map(([u]) => nameOf(u));
  let text = '';
  if (who.length === 1) text = `${who[0]} is typing…`;
  else if (who.length === 2) text = `${who[0]} and ${who[1]} are typing…`;
  else if (who.length > 2) text = 'Several people are typing…';
  return (
    <div class="typing" aria-live="polite" data-testid="typing">
      {text}
    </div>
  );
}

function Composer({ id, name }) {
  const [text, setText] = useState('');
  const ref = useRef(null);
  useEffect(() => {
    ref.current?.focus();
  }, [id]);
  const submit = (e) => {
    e.preventDefault();
    const t = text.trim();
    if (!t) return;
    chat.send(id, t);
    setText('');
  };
  return (
    <form class="composer" onSubmit={submit}>
      <label for="composer" class="sr-only">Message {name}</label>
      <textarea id="composer" ref={ref} rows={1} value={text} maxLength={4000} placeholder={`Message ${name}`}
        onInput={(e) => {
          setText(e.currentTarget.value);
          if (e.currentTarget.value) chat.typing(id);
        }}
        onKeyDown={(e) => {
          if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) submit(e);
          if (e.key === 'ArrowUp' && !text) dispatchEvent(new Event(`switchboard:edit-last:${id}`));
        }} />
      <button type="submit" class="primary" disabled={!text.trim()}>Send</button>
    </form>
  );
}
