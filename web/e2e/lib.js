// Helpers for the end-to-end tests: one headless Chromium (Debian's, driven by
// playwright-core), a browser context per user, and waits that fail with a clear message.
//
// Environment: SB_HTTP_URL (the server under test), SB_CHROMIUM (default /usr/bin/chromium),
// SB_SCREENSHOTS (directory for the screenshots; default: none are written).
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

export const BASE = process.env.SB_HTTP_URL || 'http://127.0.0.1:8000';
const SHOTS = process.env.SB_SCREENSHOTS || '';
/** How long one expectation may take. */
export const STEP = 10_000;

export const DESKTOP = { width: 1440, height: 900 };
export const PHONE = { width: 375, height: 740 };

export async function launch() {
  return chromium.launch({
    executablePath: process.env.SB_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      // Two pages side by side must both count as visible (read receipts depend on it).
      '--disable-backgrounding-occluded-windows',
      '--disable-renderer-backgrounding',
      '--disable-background-timer-throttling',
    ],
  });
}

let counter = 0;
/** A username unique to this run. */
export function unique(prefix) {
  counter += 1;
  return `${prefix}${Date.now().toString(36).slice(-5)}${counter}`;
}

/**
 * A new user in its own browser context: signs up through the UI and lands on the chat.
 * Returns {context, page, username, display, id}.
 */
export async function signUp(browser, display, { viewport = DESKTOP } = {}) {
  const context = await browser.newContext({ viewport, baseURL: BASE });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[${display}] page error:`, e.message));
  page.on('console', (m) => {
    if (m.type() === 'error') console.error(`[${display}] console:`, m.text());
  });
  const username = unique(display.toLowerCase());
  await page.goto('/');
  await page.getByRole('tab', { name: 'Sign up' }).click();
  await page.getByLabel('Username').fill(username);
  await page.getByLabel('Display name').fill(display);
  await page.getByLabel('Password').fill('correct horse battery');
  await page.getByRole('button', { name: 'Create account' }).click();
  await page.getByTestId('whoami').filter({ hasText: display }).waitFor({ timeout: STEP });
  const id = await page.evaluate(() => JSON.parse(localStorage.getItem('switchboard.session')).user.id);
  return { context, page, username, display, id };
}

export async function token(page) {
  return page.evaluate(() => JSON.parse(localStorage.getItem('switchboard.session')).access_token);
}

/** A REST call with the access token of `page`'s user. */
export async function rest(page, method, url, body) {
  const r = await fetch(BASE + url, {
    method,
    headers: { Authorization: `Bearer ${await token(page)}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) throw new Error(`${method} ${url}: ${r.status} ${await r.text()}`);
  const type = r.headers.get('content-type') || '';
  return type.includes('json') ? r.json() : r.text();
}

/** Polls `f` until it returns a truthy value; fails with `what` after `ms`. */
export async function until(what, f, ms = STEP) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await f();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function screenshot(page, name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`) });
}

/** The text of the collaborative editor on `page`. */
export function editorText(page) {
  return page.locator('.cm-content').evaluate((el) => el.cmView?.view?.state.doc.toString() ?? el.innerText);
}
