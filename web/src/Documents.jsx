// Documents: my list (create, open), and one document: title (rename), sharing with a
// role, versions (save, list, preview, restore) and the collaborative editor.
import { useEffect, useLayoutEffect, useState } from 'preact/hooks';
import { api, me } from './api.js';
import { findUser, nameOf, people } from './people.js';
import { useStore } from './store.js';
import { ago, Link, navigate } from './util.jsx';

/** The editor module, loaded on the first document opened (it is most of the bundle). */
let editorModule = null;

function LazyEditor(props) {
  const [mod, setMod] = useState(editorModule);
  const [error, setError] = useState(null);
  useEffect(() => {
    if (mod) return;
    import('./Editor.jsx')
      .then((m) => {
        editorModule = m;
        setMod(m);
      })
      .catch((e) => setError(`Could not load the editor: ${e.message}`));
  }, []);
  if (error) return <p class="error" role="alert">{error}</p>;
  return mod ? <mod.Editor {...props} /> : <p class="muted pad">Loading the editor…</p>;
}

export function DocumentsPage({ docId }) {
  return docId ? <DocumentView key={docId} id={docId} /> : <DocumentList />;
}

function DocumentList() {
  const [docs, setDocs] = useState(null);
  const [error, setError] = useState(null);
  const load = () =>
    api('GET', '/v1/documents')
      .then((r) => setDocs(r.documents))
      .catch((e) => setError(e.message));
  useEffect(() => {
    load();
    const f = () => load();
    addEventListener('switchboard:documents', f);
    return () => removeEventListener('switchboard:documents', f);
  }, []);
  const create = async (e) => {
    e.preventDefault();
    const title = String(new FormData(e.currentTarget).get('title')).trim();
    try {
      const { document } = await api('POST', '/v1/documents', { title });
      navigate(`/documents/${document.id}`);
    } catch (err) {
      setError(err.message);
    }
  };
  return (
    <section class="docs" aria-labelledby="docs-title">
      <h1 id="docs-title">Documents</h1>
      <form class="inline-form" onSubmit={create} aria-label="New document">
        <label>
          Title
          <input name="title" required maxLength={200} placeholder="Meeting notes" />
        </label>
        <button class="primary" type="submit">Create document</button>
      </form>
      {error && <p class="error" role="alert">{error}</p>}
      {!docs && !error && <p class="muted">Loading…</p>}
      {docs && docs.length === 0 && <p class="muted">No documents yet. Create one, or ask someone to share theirs.</p>}
      {docs && docs.length > 0 && (
        <ul class="doc-list">
          {docs.map((d) => (
            <li key={d.id}>
              <Link href={`/documents/${d.id}`} data-testid="doc-link">
                <span class="doc-title">{d.title}</span>
                <span class={`role role-${d.role}`}>{d.role}</span>
                <span class="muted small">edited {ago(d.updated_at)}</span>
              </Link>
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}

function DocumentView({ id }) {
  const [doc, setDoc] = useState(null);
  const [members, setMembers] = useState([]);
  const [error, setError] = useState(null);
  const [panel, setPanel] = useState(null);
  const [preview, setPreview] = useState(null);
  const [revision, setRevision] = useState(0);
  useStore(people);
  const load = () =>
    api('GET', `/v1/documents/${id}`)
      .then((r) => {
        setDoc(r.document);
        setMembers(r.members);
      })
      .catch((e) => setError(e.message));
  useEffect(() => {
    load();
  }, [id]);
  if (error && !doc) {
    return (
      <section class="doc">
        <Link href="/documents">← Documents</Link>
        <p class="error" role="alert">{error}</p>
      </section>
    );
  }
  if (!doc) return <p class="muted pad">Loading…</p>;
  const writer = doc.role === 'owner' || doc.role === 'editor';
  const toggle = (p) => setPanel(panel === p ? null : p);
  return (
    <section class="doc" aria-label={`Document ${doc.title}`}>
      <header class="doc-head">
        <Link href="/documents" class="back" aria-label="Back to documents">←</Link>
        <Title doc={doc} writer={writer} onRenamed={setDoc} />
        <span class={`role role-${doc.role}`} data-testid="doc-role">{doc.role}</span>
        <div class="doc-tools">
          {doc.role === 'owner' && (
            <button type="button" aria-expanded={panel === 'share'} onClick={() => toggle('share')}>Share</button>
          )}
          <button type="button" aria-expanded={panel === 'versions'} onClick={() => toggle('versions')}>Versions</button>
        </div>
      </header>
      {error && <p class="error" role="alert">{error}</p>}
      <div class={`doc-body ${panel ? 'with-panel' : ''}`}>
        <LazyEditor key={`${id}:${doc.role}:${revision}`} docId={id} readOnly={!writer}
          onAccessChanged={() => {
            load();
            setRevision((r) => r + 1);
          }} />
        {panel === 'share' && <Share doc={doc} members={members} reload={load} />}
        {panel === 'versions' && <Versions doc={doc} writer={writer} onPreview={setPreview} />}
      </div>
      {preview && <Preview preview={preview} close={() => setPreview(null)} />}
    </section>
  );
}

function Title({ doc, writer, onRenamed }) {
  const [editing, setEditing] = useState(false);
  const [error, setError] = useState(null);
  if (!writer || !editing) {
    return (
      <h1 class="doc-name">
        {writer ? (
          <button type="button" class="title-button" onClick={() => setEditing(true)} title="Rename">
            {doc.title}
          </button>
        ) : (
          doc.title
        )}
      </h1>
    );
  }
  const save = async (e) => {
    e.preventDefault();
    const title = String(new FormData(e.currentTarget).get('title')).trim();
    try {
      const r = await api('PATCH', `/v1/documents/${doc.id}`, { title });
      onRenamed(r.document);
      setEditing(false);
    } catch (err) {
      setError(err.message);
    }
  };
  return (
    <form class="rename" onSubmit={save} aria-label="Rename document">
      <label class="sr-only" for="doc-title-input">Title</label>
      <input id="doc-title-input" name="title" defaultValue={doc.title} required maxLength={200} autoFocus
        onKeyDown={(e) => e.key === 'Escape' && setEditing(false)} />
      <button type="submit" class="primary">Rename</button>
      {error && <span class="error" role="alert">{error}</span>}
    </form>
  );
}

function Share({ doc, members, reload }) {
  const [error, setError] = useState(null);
  const [ok, setOk] = useState(null);
  const share = async (e) => {
    e.preventDefault();
    const form = e.currentTarget;
    const f = new FormData(form);
    setError(null);
    setOk(null);
    try {
      const name = String(f.get('username'));
      const u = await findUser(name);
      if (!u) throw new Error(`No user named ${name}`);
      await api('PUT', `/v1/documents/${doc.id}/members/${u.id}`, { role: f.get('role') });
      setOk(`Shared with ${u.display_name} as ${f.get('role')}.`);
      form.reset();
      reload();
    } catch (err) {
      setError(err.message);
    }
  };
  const unshare = async (userId) => {
    try {
      await api('DELETE', `/v1/documents/${doc.id}/members/${userId}`);
      reload();
    } catch (err) {
      setError(err.message);
    }
  };
  return (
    <aside class="side-panel" aria-label="Share">
      <h2>Share</h2>
      <form onSubmit={share} aria-label="Share document">
        <label>
          Username
          <input name="username" required />
        </label>
        <label>
          Role
          <select name="role">
            <option value="editor">Editor (can edit)</option>
            <option value="viewer">Viewer (read only)</option>
          </select>
        </label>
        <button class="primary" type="submit">Share</button>
      </form>
      {error && <p class="error" role="alert">{error}</p>}
      {ok && <p class="ok" role="status">{ok}</p>}
      <h3>People with access</h3>
      <ul class="plain">
        {members.map((m) => (
          <li key={m.user_id} class="row">
            <span>{m.user_id === me()?.id ? 'You' : nameOf(m.user_id)}</span>
            <span class={`role role-${m.role}`}>{m.role}</span>
            {m.role !== 'owner' && (
              <button type="button" class="link" onClick={() => unshare(m.user_id)}
                aria-label={`Remove ${nameOf(m.user_id)}`}>Remove</button>
            )}
          </li>
        ))}
      </ul>
    </aside>
  );
}

function Versions({ doc, writer, onPreview }) {
  const [list, setList] = useState(null);
  const [error, setError] = useState(null);
  const [status, setStatus] = useState(null);
  const load = () =>
    api('GET', `/v1/documents/${doc.id}/versions`)
      .then((r) => setList(r.versions))
      .catch((e) => setError(e.message));
  useEffect(() => {
    load();
  }, [doc.id]);
  const save = async (e) => {
    e.preventDefault();
    const form = e.currentTarget;
    try {
      await api('POST', `/v1/documents/${doc.id}/versions`, { label: String(new FormData(form).get('label')) });
      form.reset();
      setStatus('Version saved.');
      load();
    } catch (err) {
      setError(err.message);
    }
  };
  const preview = async (v) => {
    try {
      const r = await fetchText(`/v1/documents/${doc.id}/versions/${v.id}?format=text`);
      onPreview({ version: v, text: r });
    } catch (err) {
      setError(err.message);
    }
  };
  const restore = async (v) => {
    try {
      await api('POST', `/v1/documents/${doc.id}/versions/${v.id}/restore`);
      setStatus(`Restored “${v.label}”. The current text was saved as an automatic version first.`);
      load();
    } catch (err) {
      setError(err.message);
    }
  };
  return (
    <aside class="side-panel" aria-label="Versions">
      <h2>Versions</h2>
      {writer && (
        <form class="inline-form" onSubmit={save} aria-label="Save version">
          <label>
            Label
            <input name="label" required maxLength={200} placeholder="Draft 1" />
          </label>
          <button class="primary" type="submit">Save version</button>
        </form>
      )}
      {error && <p class="error" role="alert">{error}</p>}
      {status && <p class="ok" role="status">{status}</p>}
      {!list && !error && <p class="muted">Loading…</p>}
      {list && list.length === 0 && <p class="muted">No versions yet.</p>}
      {list && (
        <ul class="plain versions">
          {list.map((v) => (
            <li key={v.id} class="row" data-testid="version">
              <span>
                <strong>{v.label}</strong>
                <span class="muted small"> {v.auto ? 'automatic · ' : ''}{ago(v.created_at)}</span>
              </span>
              <span class="row-buttons">
                <button type="button" class="link" onClick={() => preview(v)} aria-label={`Preview ${v.label}`}>Preview</button>
                {writer && (
                  <button type="button" class="link" onClick={() => restore(v)} aria-label={`Restore ${v.label}`}>Restore</button>
                )}
              </span>
            </li>
          ))}
        </ul>
      )}
    </aside>
  );
}

async function fetchText(path) {
  // /content and /versions answer text/plain, which api() returns as a string.
  return api('GET', path);
}

function Preview({ preview, close }) {
  useLayoutEffect(() => {
    const f = (e) => e.key === 'Escape' && close();
    addEventListener('keydown', f);
    return () => removeEventListener('keydown', f);
  }, []);
  return (
    <div class="modal-backdrop" onClick={(e) => e.target === e.currentTarget && close()}>
      <div class="modal" role="dialog" aria-modal="true" aria-labelledby="preview-title">
        <h2 id="preview-title">{preview.version.label}</h2>
        <pre class="preview" data-testid="version-preview">{preview.text || '(empty)'}</pre>
        <button type="button" class="primary" onClick={close} autoFocus>Close</button>
      </div>
    </div>
  );
}
