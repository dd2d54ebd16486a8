// Collaborative documents in a real browser: Alice creates a document and shares it (Bob
// as editor, Carol as viewer) through the UI; Alice and Bob type into it together and each
// sees the other's text and cursor; Carol sees it all but cannot type; a named version is
// saved, previewed and restored, and the restore reaches everyone at once.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { editorText, launch, rest, screenshot, signUp, STEP, until } from './lib.js';

describe('documents', () => {
  let browser;
  let alice;
  let bob;
  let carol;
  let docId;

  before(async () => {
    browser = await launch();
    alice = await signUp(browser, 'Alice');
    bob = await signUp(browser, 'Bob');
    carol = await signUp(browser, 'Carol');
  });

  after(async () => {
    await browser?.close();
  });

  const synced = (page) =>
    page.locator('[data-testid=doc-status][data-status=saved]').waitFor({ timeout: STEP });

  async function share(page, username, role) {
    const panel = page.getByRole('complementary', { name: 'Share' });
    await panel.getByLabel('Username').fill(username);
    await panel.getByLabel('Role').selectOption(role);
    await panel.getByRole('button', { name: 'Share', exact: true }).click();
    await panel.getByRole('status').filter({ hasText: `as ${role}` }).waitFor({ timeout: STEP });
  }

  test('create, rename and share with a role', async () => {
    const a = alice.page;
    await a.getByRole('link', { name: 'Documents' }).click();
    await a.getByLabel('Title').fill('Launch pla');
    await a.getByRole('button', { name: 'Create document' }).click();
    await synced(a);
    docId = Number(new URL(a.url()).pathname.split('/').pop());
    // Rename: click the title, edit, Enter.
    await a.getByRole('button', { name: 'Launch pla', exact: true }).click();
    await a.getByLabel('Title').fill('Launch plan');
    await a.keyboard.press('Enter');
    await a.getByRole('button', { name: 'Launch plan', exact: true }).waitFor({ timeout: STEP });
    await a.getByRole('button', { name: 'Share', exact: true }).click();
    await share(a, bob.username, 'editor');
    await share(a, carol.username, 'viewer');
    await a.getByRole('button', { name: 'Share', exact: true }).first().click(); // close the panel
  });

  test('two editors see each other’s text and cursor', async () => {
    const a = alice.page;
    const b = bob.page;
    await a.locator('.cm-content').click();
    await a.keyboard.type('Alice: goals for the launch. ');

    // Bob finds it in his list (shared with him) and opens it.
    await b.getByRole('link', { name: 'Documents' }).click();
    await b.getByTestId('doc-link').filter({ hasText: 'Launch plan' }).click();
    await b.getByTestId('doc-role').filter({ hasText: 'editor' }).waitFor({ timeout: STEP });
    await synced(b);
    await until("Alice's text at Bob's", async () => (await editorText(b)).includes('Alice: goals'));
    await b.locator('.cm-content').click();
    await b.keyboard.press('ControlOrMeta+End');
    await b.keyboard.press('Enter');
    await b.keyboard.type('Bob: the checklist.');
    await until("Bob's text at Alice's", async () => (await editorText(a)).includes('Bob: the checklist.'));
    await a.keyboard.type('Alice again.');
    await until("Alice's new text at Bob's", async () => (await editorText(b)).includes('Alice again.'));

    // Each sees the other's cursor, with the name on it, and in the list of who is here.
    await a.locator('.cm-ySelectionInfo').filter({ hasText: 'Bob' }).waitFor({ state: 'attached', timeout: STEP });
    await b.locator('.cm-ySelectionInfo').filter({ hasText: 'Alice' }).waitFor({ state: 'attached', timeout: STEP });
    await a.getByTestId('peer').filter({ hasText: 'Bob' }).waitFor({ timeout: STEP });
    await b.getByTestId('peer').filter({ hasText: 'Alice' }).waitFor({ timeout: STEP });
    await screenshot(a, 'editor');
  });

  test('a viewer sees the text live but cannot type', async () => {
    const c = carol.page;
    await c.goto(`/documents/${docId}`);
    await c.getByTestId('doc-role').filter({ hasText: 'viewer' }).waitFor({ timeout: STEP });
    await synced(c);
    await until('the text at Carol’s', async () => (await editorText(c)).includes('Bob: the checklist.'));
    assert.equal(await c.locator('.cm-content').getAttribute('contenteditable'), 'false');
    await c.locator('.cm-content').click();
    await c.keyboard.type('HACKED');
    await c.keyboard.press('Enter');
    await alice.page.keyboard.type(' Live for viewers.');
    await until('live text at Carol’s', async () => (await editorText(c)).includes('Live for viewers.'));
    assert.ok(!(await editorText(c)).includes('HACKED'), 'the viewer’s keys changed nothing');
    const content = await rest(alice.page, 'GET', `/v1/documents/${docId}/content`);
    assert.ok(!content.includes('HACKED'), `server text: ${content}`);
    // Nor can a viewer save or restore versions.
    await c.getByRole('button', { name: 'Versions' }).click();
    await c.getByRole('complementary', { name: 'Versions' }).waitFor();
    assert.equal(await c.getByRole('button', { name: 'Save version' }).count(), 0);
  });

  test('versions: save, preview, restore', async () => {
    const a = alice.page;
    await a.getByRole('button', { name: 'Versions' }).click();
    const panel = a.getByRole('complementary', { name: 'Versions' });
    await panel.getByLabel('Label').fill('First draft');
    await panel.getByRole('button', { name: 'Save version' }).click();
    await panel.getByTestId('version').filter({ hasText: 'First draft' }).waitFor({ timeout: STEP });

    await a.locator('.cm-content').click();
    await a.keyboard.press('ControlOrMeta+End');
    await a.keyboard.type(' Scrap this line.');
    await until('the new line at Bob’s', async () => (await editorText(bob.page)).includes('Scrap this line.'));

    await panel.getByRole('button', { name: 'Preview First draft' }).click();
    const preview = a.getByTestId('version-preview');
    await preview.waitFor({ timeout: STEP });
    const text = await preview.innerText();
    assert.ok(text.includes('Bob: the checklist.') && !text.includes('Scrap this line.'), text);
    await a.keyboard.press('Escape');

    await panel.getByRole('button', { name: 'Restore First draft' }).click();
    await panel.getByRole('status').filter({ hasText: 'Restored' }).waitFor({ timeout: STEP });
    for (const p of [a, bob.page, carol.page]) {
      await until('the restored text everywhere', async () => {
        const t = await editorText(p);
        return t.includes('Bob: the checklist.') && !t.includes('Scrap this line.');
      });
    }
  });
});
