// Builds the web app with esbuild: src/main.jsx and src/style.css into content-hashed files
// under assets/, and index.html pointing at them. The output directory is WEB_OUT_DIR (the
// server's build.rs sets it to a folder in Cargo's OUT_DIR), or dist/ for a build by hand.
//
//   npm run build                       # -> web/dist
//   WEB_OUT_DIR=/tmp/x npm run build    # -> /tmp/x
import { build } from 'esbuild';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.resolve(process.env.WEB_OUT_DIR || path.join(here, 'dist'));

await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });

const result = await build({
  entryPoints: { app: path.join(here, 'src/main.jsx'), style: path.join(here, 'src/style.css') },
  bundle: true,
  minify: true,
  sourcemap: false,
  format: 'esm',
  target: ['es2022'],
  jsx: 'automatic',
  jsxImportSource: 'preact',
  outdir: path.join(out, 'assets'),
  entryNames: '[name]-[hash]',
  // The editor (CodeMirror, Yjs) is imported lazily: a chunk loaded on a document's page.
  splitting: true,
  chunkNames: 'chunk-[hash]',
  metafile: true,
  legalComments: 'none',
  logLevel: 'warning',
});

// Map each entry point to its hashed output file.
const outputs = {};
for (const [file, meta] of Object.entries(result.metafile.outputs)) {
  if (meta.entryPoint) outputs[path.basename(meta.entryPoint)] = '/' + path.relative(out, file);
}
const js = outputs['main.jsx'];
const css = outputs['style.css'];
if (!js || !css) throw new Error('esbuild did not produce app and style bundles');

const html = (await readFile(path.join(here, 'index.html'), 'utf8'))
  .replace('%APP_JS%', js)
  .replace('%APP_CSS%', css);
await writeFile(path.join(out, 'index.html'), html);
await writeFile(path.join(out, 'favicon.svg'), await readFile(path.join(here, 'favicon.svg')));

const sizes = Object.entries(result.metafile.outputs)
  .map(([f, m]) => `${path.relative(out, f)} ${(m.bytes / 1024).toFixed(1)} KiB`)
  .join(', ');
console.log(`web app built into ${out}: index.html, ${sizes}`);
