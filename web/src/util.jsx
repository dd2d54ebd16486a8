// Small helpers: ids, colours, times, routing.
import { useEffect, useState } from 'preact/hooks';

/** A v4 UUID; crypto.randomUUID exists only in secure contexts (not plain http on a LAN). */
export function uuid() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A stable, readable colour per user id. */
export function colorOf(id) {
  const hue = Math.round((Number(id) * 137.508) % 360);
  return { color: `hsl(${hue} 70% 38%)`, light: `hsl(${hue} 80% 38% / 0.18)` };
}

export function timeOf(ms) {
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return today
    ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}

export function ago(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return 'just now';
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

/** Client-side routes are paths (the server answers unknown paths with the app). */
export function navigate(path, { replace = false } = {}) {
  if (location.pathname === path) return;
  history[replace ? 'replaceState' : 'pushState'](null, '', path);
  dispatchEvent(new Event('switchboard:navigate'));
}

export function useRoute() {
  const [path, setPath] = useState(location.pathname);
  useEffect(() => {
    const f = () => setPath(location.pathname);
    addEventListener('popstate', f);
    addEventListener('switchboard:navigate', f);
    return () => {
      removeEventListener('popstate', f);
      removeEventListener('switchboard:navigate', f);
    };
  }, []);
  return path.split('/').filter(Boolean);
}

/** An <a> that navigates without reloading (and still opens in a new tab with a modifier). */
export function Link({ href, children, ...rest }) {
  const onClick = (e) => {
    if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    e.preventDefault();
    navigate(href);
    rest.onNavigate?.();
  };
  const { onNavigate, ...attrs } = rest;
  return (
    <a href={href} onClick={onClick} {...attrs}>
      {children}
    </a>
  );
}
