// The bell: my notifications (mentions, direct rooms, invites, shared documents).
import { useLayoutEffect, useRef, useState } from 'preact/hooks';
import * as notes from './notes.js';
import { nameOf, people } from './people.js';
import { useStore } from './store.js';
import { ago, navigate } from './util.jsx';

function describe(n) {
  const who = n.actor_id ? nameOf(n.actor_id) : 'Someone';
  switch (n.kind) {
    case 'mention':
      return { title: `${who} mentioned you`, body: n.data?.excerpt ?? '' };
    case 'direct':
      return { title: `${who} started a direct conversation`, body: '' };
    case 'invite':
      return { title: `${who} added you to ${n.data?.room_name || 'a room'}`, body: '' };
    case 'share':
      return { title: `${who} shared “${n.data?.title ?? 'a document'}” (${n.data?.role})`, body: '' };
    default:
      return { title: n.kind, body: '' };
  }
}

function target(n) {
  if (n.kind === 'share' && n.data?.document_id) return `/documents/${n.data.document_id}`;
  if (n.room_id) return `/chat/${n.room_id}`;
  return null;
}

export function Bell() {
  const { list } = useStore(notes.notes);
  useStore(people);
  const [open, setOpen] = useState(false);
  const box = useRef(null);
  const count = list.filter((n) => !n.read).length;
  // A layout effect: the listeners must be there as soon as the panel is, not after paint.
  useLayoutEffect(() => {
    if (!open) return undefined;
    const close = (e) => {
      if (e.type === 'keydown' ? e.key === 'Escape' : !box.current?.contains(e.target)) setOpen(false);
    };
    addEventListener('keydown', close);
    addEventListener('pointerdown', close);
    return () => {
      removeEventListener('keydown', close);
      removeEventListener('pointerdown', close);
    };
  }, [open]);
  const go = (n) => {
    if (!n.read) notes.markRead([n.id]).catch(() => {});
    const to = target(n);
    setOpen(false);
    if (to) navigate(to);
  };
  return (
    <div class="bell" ref={box}>
      <button type="button" class="icon-button" aria-expanded={open} aria-haspopup="true"
        aria-label={count ? `Notifications, ${count} unread` : 'Notifications'} onClick={() => setOpen(!open)}
        data-testid="bell">
        <svg viewBox="0 0 24 24" width="20" height="20" aria-hidden="true">
          <path d="M12 22a2.5 2.5 0 0 0 2.45-2h-4.9A2.5 2.5 0 0 0 12 22Zm7-6V11a7 7 0 0 0-5.5-6.84V3a1.5 1.5 0 0 0-3 0v1.16A7 7 0 0 0 5 11v5l-2 2v1h18v-1Z" fill="currentColor" />
        </svg>
        {count > 0 && <span class="badge" aria-hidden="true">{count > 99 ? '99+' : count}</span>}
      </button>
      {open && (
        <div class="popover" role="dialog" aria-label="Notifications">
          <div class="popover-head">
            <strong>Notifications</strong>
            <button type="button" class="link" disabled={!count} onClick={() => notes.markAll().catch(() => {})}>
              Mark all read
            </button>
          </div>
          {list.length === 0 ? (
            <p class="muted pad">Nothing yet. Mentions (@you), invites and shared documents show up here.</p>
          ) : (
            <ul class="notes">
              {list.map((n) => {
                const d = describe(n);
                return (
                  <li key={n.id} class={n.read ? 'read' : 'unread'}>
                    <button type="button" onClick={() => go(n)}>
                      <span class="note-title">{d.title}</span>
                      {d.body && <span class="note-body">{d.body}</span>}
                      <span class="note-time">{ago(n.created_at)}</span>
                    </button>
                  </li>
                );
              })}
            </ul>
          )}
        </div>
      )}
    </div>
  );
}
