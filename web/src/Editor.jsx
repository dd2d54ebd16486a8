// The collaborative editor: CodeMirror 6 bound to the document's Y.Text `content` with
// y-codemirror.next, synced by the stock y-websocket provider over /docs/{id}?token=.
// Awareness carries my name and colour, which y-codemirror draws as remote cursors. Viewers
// get a read-only editor (the server refuses their updates anyway).
//
// The provider reconnects by itself; before each attempt it gets a fresh access token in its
// URL. Close codes: 4401 (token refused) refreshes the token and connects again; 4000 (my
// access changed) reloads the document's role; 4403/4404/4410 are final.
import { defaultKeymap } from '@codemirror/commands';
import { EditorState } from '@codemirror/state';
import { EditorView, keymap, placeholder } from '@codemirror/view';
import { useEffect, useRef, useState } from 'preact/hooks';
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next';
import { WebsocketProvider } from 'y-websocket';
import * as Y from 'yjs';
import { accessToken, me, refresh } from './api.js';
import { wsBase } from './rt.js';
import { colorOf } from './util.jsx';

const FINAL = {
  4403: 'You no longer have access to this document.',
  4404: 'This document does not exist.',
  4410: 'This document was deleted.',
};

export function Editor({ docId, readOnly, onAccessChanged }) {
  const host = useRef(null);
  const [status, setStatus] = useState('connecting');
  const [synced, setSynced] = useState(false);
  const [closed, setClosed] = useState(null);
  const [peers, setPeers] = useState([]);

  useEffect(() => {
    let provider = null;
    let view = null;
    let gone = false;
    const ydoc = new Y.Doc();
    const ytext = ydoc.getText('content');
    (async () => {
      let token;
      try {
        token = await accessToken();
      } catch {
        setClosed('You are signed out.');
        return;
      }
      if (gone) return;
      provider = new WebsocketProvider(`${wsBase()}/docs`, String(docId), ydoc, { params: { token } });
      const user = me();
      const c = colorOf(user.id);
      provider.awareness.setLocalStateField('user', { name: user.display_name, color: c.color, colorLight: c.light });
      const fresh = async () => {
        try {
          provider.params = { token: await accessToken() };
        } catch {
          // Offline: the provider keeps retrying with the token it has.
        }
      };
      provider.on('status', ({ status: s }) => setStatus(s));
      provider.on('sync', (s) => setSynced(s));
      provider.on('connection-close', (event) => {
        fresh();
        if (event?.code === 4000) onAccessChanged?.();
      });
      provider.on('closed', async ({ code }) => {
        if (code === 4401) {
          try {
            provider.params = { token: await refresh() };
            provider.connect();
            return;
          } catch {
            setClosed('You are signed out.');
            return;
          }
        }
        setClosed(FINAL[code] ?? `The server closed the document (${code}).`);
      });
      const awareness = provider.awareness;
      const onAwareness = () => {
        const list = [];
        awareness.getStates().forEach((state, client) => {
          if (client !== ydoc.clientID && state.user) list.push({ client, ...state.user });
        });
        setPeers(list);
      };
      awareness.on('change', onAwareness);
      const undoManager = new Y.UndoManager(ytext);
      view = new EditorView({
        parent: host.current,
        state: EditorState.create({
          doc: ytext.toString(),
          extensions: [
            readOnly ? [EditorState.readOnly.of(true), EditorView.editable.of(false)] : [],
            // Undo and redo are Yjs's: they undo my own changes only, never a peer's.
            keymap.of([...yUndoManagerKeymap, ...defaultKeymap]),
            EditorView.lineWrapping,
            placeholder(readOnly ? 'This document is empty.' : 'Start typing…'),
            EditorView.contentAttributes.of({
              'aria-label': readOnly ? 'Document text (read only)' : 'Document text',
              'aria-multiline': 'true',
              'data-testid': 'editor',
            }),
            yCollab(ytext, awareness, { undoManager }),
          ],
        }),
      });
    })();
    return () => {
      gone = true;
      view?.destroy();
      provider?.destroy();
      ydoc.destroy();
    };
  }, [docId, readOnly]);

  const label = closed
    ? 'closed'
    : status === 'connected'
      ? synced
        ? 'saved'
        : 'syncing'
      : status === 'connecting'
        ? 'connecting'
        : 'offline';
  return (
    <div class="editor-wrap">
      <div class="editor-bar">
        <span class={`sync sync-${label}`} role="status" data-testid="doc-status" data-status={label}>
          {closed ?? (label === 'saved' ? 'All changes synced' : label === 'syncing' ? 'Syncing…' : label === 'connecting' ? 'Connecting…' : 'Offline: edits will sync when you are back')}
        </span>
        {readOnly && <span class="muted small">Read only: you are a viewer.</span>}
        <span class="peers" aria-label="Also here">
          {peers.map((p) => (
            <span key={p.client} class="peer" style={{ borderColor: p.color, color: p.color }} data-testid="peer">
              {p.name}
            </span>
          ))}
        </span>
      </div>
      <div class={`editor ${readOnly ? 'read-only' : ''}`} ref={host} />
    </div>
  );
}
