// The live dashboard: every node publishes a sample of its figures each second to
// `system:dashboard` (see crates/server/src/dashboard.rs). On subscribe we read the channel's
// short history (the last minute) so the charts start full, then append live samples.
import { useEffect, useState } from 'preact/hooks';
import * as rt from './rt.js';

const CHANNEL = 'system:dashboard';
const KEEP = 120; // samples per node: two minutes

export function Dashboard() {
  const [nodes, setNodes] = useState({}); // uid -> samples (oldest first)
  const [live, setLive] = useState(false);
  useEffect(() => {
    const add = (samples) =>
      setNodes((prev) => {
        const next = { ...prev };
        for (const s of samples) {
          if (s?.type !== 'sample') continue;
          const list = (next[s.node.uid] ?? []).filter((x) => x.at !== s.at);
          list.push(s);
          list.sort((a, b) => a.at - b.at);
          next[s.node.uid] = list.slice(-KEEP);
        }
        return next;
      });
    const stop = rt.listen(CHANNEL, {
      publication: (data) => add([data]),
      subscribed: async () => {
        setLive(true);
        try {
          const h = await rt.subscription(CHANNEL)?.history({ limit: 60 });
          if (h) add(h.publications.map((p) => p.data));
        } catch {
          // History is a nicety; live samples keep coming.
        }
      },
      unsubscribed: () => setLive(false),
    });
    return stop;
  }, []);
  const list = Object.values(nodes).sort((a, b) => a[0].node.name.localeCompare(b[0].node.name));
  return (
    <section class="dashboard" aria-labelledby="dash-title">
      <div class="dash-head">
        <h1 id="dash-title">Live dashboard</h1>
        <span class={`live ${live ? 'on' : ''}`}>{live ? 'Live' : 'Waiting for samples…'}</span>
      </div>
      <p class="muted">
        Each node publishes its own figures every second to <code>{CHANNEL}</code>. Numbers leave out the
        dashboard's own samples.
      </p>
      {list.length === 0 && <p class="muted">No samples yet.</p>}
      {list.map((samples) => (
        <NodePanel key={samples[0].node.uid} samples={samples} />
      ))}
    </section>
  );
}

function fmt(n, digits = 1) {
  if (n === null || n === undefined) return '–';
  return Number.isInteger(n) ? String(n) : n.toFixed(digits);
}

function NodePanel({ samples }) {
  const s = samples[samples.length - 1];
  const stats = [
    ['connections', 'Connections', s.connections],
    ['doc_connections', 'Document connections', s.doc_connections],
    ['messages_in', 'Messages in /s', s.messages_in],
    ['messages_out', 'Messages out /s', s.messages_out],
    ['p50', 'Latency p50 (ms)', s.latency_ms.p50, 2],
    ['p99', 'Latency p99 (ms)', s.latency_ms.p99, 2],
    ['docs_loaded', 'Loaded documents', s.docs_loaded],
    ['users', 'Users online', s.users],
  ];
  return (
    <article class="node" aria-label={`Node ${s.node.name}`} data-testid="node">
      <h2>
        {s.node.name} <span class="muted small">uid {s.node.uid.slice(0, 8)} · up {uptime(s.uptime_s)}</span>
      </h2>
      <dl class="stats">
        {stats.map(([key, label, value, digits]) => (
          <div class="stat" key={key}>
            <dt>{label}</dt>
            <dd data-testid={`stat-${key}`}>{fmt(value, digits)}</dd>
          </div>
        ))}
      </dl>
      <div class="charts">
        <Chart title="Messages per second" samples={samples}
          series={[
            ['in', (x) => x.messages_in, 'var(--c1)'],
            ['out', (x) => x.messages_out, 'var(--c2)'],
          ]} />
        <Chart title="Command latency (ms)" samples={samples}
          series={[
            ['p50', (x) => x.latency_ms.p50, 'var(--c3)'],
            ['p99', (x) => x.latency_ms.p99, 'var(--c4)'],
          ]} />
        <Chart title="Connections" samples={samples}
          series={[
            ['all', (x) => x.connections, 'var(--c1)'],
            ['documents', (x) => x.doc_connections, 'var(--c5)'],
          ]} />
      </div>
      <p class="muted small">
        {s.rates.commands} commands/s · {s.rates.publications} publications/s · {s.rates.deliveries} deliveries/s ·{' '}
        {s.rates.doc_updates} document updates/s · {s.subscriptions} subscriptions
      </p>
    </article>
  );
}

function uptime(secs) {
  if (secs < 60) return `${secs}s`;
  if (secs < 3600) return `${Math.floor(secs / 60)}m`;
  return `${Math.floor(secs / 3600)}h ${Math.floor((secs % 3600) / 60)}m`;
}

const W = 320;
const H = 120;
const PAD = { l: 34, r: 6, t: 8, b: 18 };

/** A small SVG line chart of the last two minutes. */
function Chart({ title, samples, series }) {
  // The window is what we have, from 30 s up to the two minutes kept.
  const end = samples[samples.length - 1].at;
  const span = Math.min(KEEP * 1000, Math.max(30_000, end - samples[0].at));
  const start = end - span;
  const values = series.flatMap(([, f]) => samples.map(f)).filter((v) => v !== null && v !== undefined);
  const max = Math.max(1, ...values) * 1.1;
  const x = (at) => PAD.l + ((at - start) / (end - start)) * (W - PAD.l - PAD.r);
  const y = (v) => H - PAD.b - (v / max) * (H - PAD.t - PAD.b);
  const last = series.map(([name, f]) => `${name} ${fmt(f(samples[samples.length - 1]), 2)}`).join(', ');
  return (
    <figure class="chart">
      <figcaption>
        {title}
        <span class="legend">
          {series.map(([name, , color]) => (
            <span key={name}><i style={{ background: color }} aria-hidden="true" /> {name}</span>
          ))}
        </span>
      </figcaption>
      <svg viewBox={`0 0 ${W} ${H}`} role="img" aria-label={`${title}: now ${last}`} preserveAspectRatio="none">
        {[0, 0.5, 1].map((t) => (
          <g key={t}>
            <line x1={PAD.l} x2={W - PAD.r} y1={y(max * t)} y2={y(max * t)} class="grid" />
            <text x={PAD.l - 4} y={y(max * t) + 3} class="axis" text-anchor="end">{fmt(max * t, max < 10 ? 1 : 0)}</text>
          </g>
        ))}
        <text x={PAD.l} y={H - 4} class="axis">−{Math.round(span / 1000)} s</text>
        <text x={W - PAD.r} y={H - 4} class="axis" text-anchor="end">now</text>
        {series.map(([name, f, color]) => {
          const pts = samples
            .filter((s) => f(s) !== null && f(s) !== undefined)
            .map((s) => `${x(s.at).toFixed(1)},${y(f(s)).toFixed(1)}`)
            .join(' ');
          return <polyline key={name} points={pts} fill="none" stroke={color} stroke-width="2" vector-effect="non-scaling-stroke" />;
        })}
      </svg>
    </figure>
  );
}
