// Chat in a real browser: two users (two browser contexts) register, create a room and
// chat both ways; each sees the other typing, "seen by" follows reads, unread badges,
// mentions under the bell, edits, deletes, presence, a moderation removal, history paging
// on scroll-up, a reload that signs in again with the refresh token, the offline outbox
// (delivered exactly once), 375 px layouts and keyboard-only sign-in. A third user watches
// the live dashboard while all this runs, and its numbers must move.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { BASE, launch, PHONE, rest, screenshot, signUp, STEP, until } from './lib.js';

describe('chat', () => {
  let browser;
  let alice;
  let bob;
  let dave;
  let roomId;
  const dash = []; // dashboard readings taken while the chat runs
  let polling = null;

  before(async () => {
    browser = await launch();
    bob = await signUp(browser, 'Bob');
    alice = await signUp(browser, 'Alice');
    dave = await signUp(browser, 'Dave');
  });

  after(async () => {
    clearInterval(polling);
    await browser?.close();
  });

  const messageText = (page, text) => page.getByTestId('message-text').filter({ hasText: text });

  test('the dashboard is live', async () => {
    const p = dave.page;
    await p.getByRole('link', { name: 'Dashboard' }).click();
    await p.getByTestId('stat-connections').waitFor({ timeout: STEP });
    const read = async () => {
      const v = {};
      for (const k of ['connections', 'messages_in', 'messages_out']) {
        v[k] = Number(await p.getByTestId(`stat-${k}`).first().innerText());
      }
      return v;
    };
    dash.push(await read());
    polling = setInterval(() => read().then((v) => dash.push(v), () => {}), 250);
  });

  test('two users chat both ways: typing, seen by, unread, mentions, edit, delete, presence', async () => {
    const a = alice.page;
    const b = bob.page;
    // Alice creates a public room and invites Bob in the same form.
    await a.getByRole('button', { name: 'New room' }).click();
    await a.getByLabel('Room name').fill('general');
    await a.getByLabel('Invite (usernames, optional)').fill(bob.username);
    await a.getByRole('button', { name: 'Create room' }).click();
    await a.getByTestId('room-title').filter({ hasText: 'general' }).waitFor({ timeout: STEP });
    roomId = Number(new URL(a.url()).pathname.split('/').pop());
    assert.ok(roomId > 0);

    // Bob is told about the invite (bell) and the room appears in his list.
    const bobRoom = b.locator(`[data-testid=room-link][data-room="${roomId}"]`);
    await bobRoom.waitFor({ timeout: STEP });
    await b.getByRole('button', { name: /Notifications, 1 unread/ }).waitFor({ timeout: STEP });

    // A message before Bob opens the room: an unread badge.
    await a.getByLabel('Message general').fill('Hello Bob!');
    await a.keyboard.press('Enter');
    await messageText(a, 'Hello Bob!').waitFor({ timeout: STEP });
    await bobRoom.getByTestId('unread').filter({ hasText: '1' }).waitFor({ timeout: STEP });

    // Bob opens it: he sees the message, the badge goes, Alice sees "Seen by Bob".
    await bobRoom.click();
    await messageText(b, 'Hello Bob!').waitFor({ timeout: STEP });
    await until('the unread badge to go', async () => (await bobRoom.getByTestId('unread').count()) === 0);
    await a.getByTestId('seen-by').filter({ hasText: 'Seen by Bob' }).waitFor({ timeout: STEP });

    // Alice types: Bob sees it; then she sends.
    await a.getByLabel('Message general').pressSequentially('I am typ', { delay: 20 });
    await b.getByTestId('typing').filter({ hasText: 'Alice is typing…' }).waitFor({ timeout: STEP });
    await a.getByLabel('Message general').pressSequentially('ing a second message');
    await a.keyboard.press('Enter');
    await messageText(b, 'I am typing a second message').waitFor({ timeout: STEP });

    // Bob types back, mentioning Alice.
    await b.getByLabel('Message general').pressSequentially('Hi @', { delay: 20 });
    await a.getByTestId('typing').filter({ hasText: 'Bob is typing…' }).waitFor({ timeout: STEP });
    await b.getByLabel('Message general').pressSequentially(`${alice.username}, good to see you`);
    await b.keyboard.press('Enter');
    await messageText(a, 'good to see you').waitFor({ timeout: STEP });
    await a.locator('mark.mention.me').first().waitFor({ timeout: STEP });
    await a.getByRole('button', { name: /Notifications, 1 unread/ }).waitFor({ timeout: STEP });
    await b.getByTestId('seen-by').filter({ hasText: 'Seen by Alice' }).waitFor({ timeout: STEP });
    // Alice's own last message was read too once Bob replied.
    await until('typing to clear', async () => (await a.getByTestId('typing').innerText()) === '');

    // The bell lists the mention and leads to the room.
    await a.getByTestId('bell').click();
    await a.getByRole('dialog', { name: 'Notifications' }).getByText(/Bob mentioned you/).waitFor({ timeout: STEP });
    await a.keyboard.press('Escape');

    // Alice edits her first message and deletes her second; Bob sees both.
    const first = a.getByTestId('message').filter({ hasText: 'Hello Bob!' });
    await first.hover();
    await first.getByRole('button', { name: 'Edit message' }).click();
    await a.getByLabel('Edited text').fill('Hello Bob, edited');
    await a.keyboard.press('Enter');
    await messageText(b, 'Hello Bob, edited').waitFor({ timeout: STEP });
    await b.getByTestId('message').filter({ hasText: 'Hello Bob, edited' }).getByText('(edited)').waitFor();
    const second = a.getByTestId('message').filter({ hasText: 'I am typing a second message' });
    await second.hover();
    await second.getByRole('button', { name: 'Delete message' }).click();
    await second.getByRole('button', { name: 'Delete', exact: true }).click();
    await b.getByText('This message was deleted.').waitFor({ timeout: STEP });
    assert.equal(await messageText(b, 'I am typing a second message').count(), 0);

    // Presence: Bob is online in the member list.
    await a.getByRole('button', { name: /Members/ }).click();
    await a
      .getByRole('list', { name: 'Members' })
      .locator(`[data-testid="presence-${bob.id}"][data-online=true]`)
      .waitFor({ timeout: STEP });

    await a.getByLabel('Message general').fill('Shall we write the plan in a document?');
    await a.keyboard.press('Enter');
    await messageText(b, 'Shall we write the plan').waitFor({ timeout: STEP });
    await b.getByLabel('Message general').pressSequentially('Yes, I will start one', { delay: 15 });
    await a.getByTestId('typing').filter({ hasText: 'Bob is typing…' }).waitFor({ timeout: STEP });
    await screenshot(a, 'chat');
    await b.keyboard.press('Enter');
    await messageText(a, 'Yes, I will start one').waitFor({ timeout: STEP });
  });

  test("the dashboard's numbers changed while the chat ran", async () => {
    clearInterval(polling);
    polling = null;
    assert.ok(dash.length > 5, `readings: ${dash.length}`);
    const max = (k) => Math.max(...dash.map((v) => v[k]));
    assert.ok(max('connections') >= 3, `connections seen: ${dash.map((v) => v.connections)}`);
    assert.ok(max('messages_in') > 0, 'messages in/s rose above 0');
    assert.ok(max('messages_out') > 0, 'messages out/s rose above 0');
    const distinct = new Set(dash.map((v) => `${v.messages_in}/${v.messages_out}/${v.connections}`));
    assert.ok(distinct.size >= 3, `dashboard values changed: ${[...distinct]}`);
    await screenshot(dave.page, 'dashboard');
  });

  test('a message typed offline waits in the outbox and is delivered exactly once', async () => {
    const a = alice.page;
    const text = `Written offline ${Date.now()}`;
    await alice.context.setOffline(true);
    await a.locator('[data-testid=conn-banner][data-state=offline]').waitFor({ timeout: STEP });
    await a.getByLabel('Message general').fill(text);
    await a.keyboard.press('Enter');
    await a.getByTestId('pending-message').filter({ hasText: text }).waitFor({ timeout: STEP });
    await a.getByTestId('conn-banner').filter({ hasText: '1 message will be sent' }).waitFor({ timeout: STEP });
    // Nothing reached the server while offline (this request comes from the test, not the page).
    await new Promise((r) => setTimeout(r, 700));
    const during = await rest(bob.page, 'GET', `/v1/rooms/${roomId}/messages?limit=100`);
    assert.equal(during.messages.filter((m) => m.text === text).length, 0);

    await alice.context.setOffline(false);
    await a.locator('[data-testid=conn-banner][data-state=connected]').waitFor({ state: 'attached', timeout: STEP });
    await messageText(bob.page, text).waitFor({ timeout: STEP });
    await until('the outbox to empty', async () => (await a.getByTestId('pending-message').count()) === 0);

    // Another drop and reconnect sends nothing again.
    await alice.context.setOffline(true);
    await a.locator('[data-testid=conn-banner][data-state=offline]').waitFor({ timeout: STEP });
    await alice.context.setOffline(false);
    await a.locator('[data-testid=conn-banner][data-state=connected]').waitFor({ state: 'attached', timeout: STEP });
    await new Promise((r) => setTimeout(r, 1000));
    const { messages } = await rest(bob.page, 'GET', `/v1/rooms/${roomId}/messages?limit=100`);
    assert.equal(messages.filter((m) => m.text === text).length, 1, 'stored exactly once');
    assert.equal(await messageText(bob.page, text).count(), 1, 'shown once to Bob');
    assert.equal(await messageText(a, text).count(), 1, 'shown once to Alice');
  });

  test('a moderation removal leaves a placeholder', async () => {
    await alice.page.getByLabel('Message general').fill('my bananaphone is ringing');
    await alice.page.keyboard.press('Enter');
    await bob.page.getByTestId('removed').first().waitFor({ timeout: STEP });
    await alice.page.getByTestId('removed').first().waitFor({ timeout: STEP });
    assert.equal(await messageText(bob.page, 'bananaphone').count(), 0);
  });

  test('history pages back on scroll-up, after a reload that refreshes the session', async () => {
    for (let i = 1; i <= 45; i += 1) {
      await rest(alice.page, 'POST', `/v1/rooms/${roomId}/messages`, { text: `paged ${i}` });
    }
    const b = bob.page;
    // An expired access token: the reload must sign in again with the refresh token.
    const before = await b.evaluate(() => {
      const s = JSON.parse(localStorage.getItem('switchboard.session'));
      const old = s.refresh_token;
      s.access_token = 'expired';
      s.access_exp = 0;
      localStorage.setItem('switchboard.session', JSON.stringify(s));
      return old;
    });
    await b.reload();
    await b.getByTestId('whoami').filter({ hasText: 'Bob' }).waitFor({ timeout: STEP });
    await messageText(b, 'paged 45').waitFor({ timeout: STEP });
    const rotated = await b.evaluate(() => JSON.parse(localStorage.getItem('switchboard.session')).refresh_token);
    assert.notEqual(rotated, before, 'the refresh token was rotated');
    assert.equal(await messageText(b, /^paged 1$/).count(), 0, 'only the newest page at first');

    const list = b.getByTestId('messages');
    await until('the oldest message after scrolling up', async () => {
      await list.evaluate((el) => {
        el.scrollTop = 0;
        el.dispatchEvent(new Event('scroll'));
      });
      return (await messageText(b, /^paged 1$/).count()) === 1;
    });
    await b.getByText('The beginning of this conversation.').waitFor({ timeout: STEP });
    await messageText(b, 'Hello Bob, edited').waitFor({ timeout: STEP });
  });

  test('works at 375 px, and sign-in works with the keyboard alone', async () => {
    const state = await bob.context.storageState();
    const context = await browser.newContext({ viewport: PHONE, baseURL: BASE, storageState: state });
    try {
      const p = await context.newPage();
      await p.goto('/chat');
      const link = p.locator(`[data-testid=room-link][data-room="${roomId}"]`);
      await link.waitFor({ timeout: STEP });
      const overflow = () => p.evaluate(() => document.documentElement.scrollWidth - innerWidth);
      assert.ok((await overflow()) <= 0, 'no horizontal scrolling in the room list');
      await link.click();
      await messageText(p, 'paged 45').waitFor({ timeout: STEP });
      assert.equal(await p.getByRole('complementary', { name: 'Rooms' }).isVisible(), false, 'one pane at a time');
      await p.getByRole('link', { name: 'Back to rooms' }).waitFor();
      assert.ok((await overflow()) <= 0, 'no horizontal scrolling in a room');
      await screenshot(p, 'chat-mobile');
      await p.getByRole('link', { name: 'Dashboard' }).click();
      await p.getByTestId('stat-connections').waitFor({ timeout: STEP });
      assert.ok((await overflow()) <= 0, 'no horizontal scrolling on the dashboard');
    } finally {
      await context.close();
    }

    const kb = await browser.newContext({ viewport: PHONE, baseURL: BASE });
    try {
      const p = await kb.newPage();
      await p.goto('/');
      await p.getByLabel('Username').waitFor();
      // Tabs: "Log in", "Sign up", then the form.
      for (let i = 0; i < 3; i += 1) await p.keyboard.press('Tab');
      await p.keyboard.type(alice.username);
      await p.keyboard.press('Tab');
      await p.keyboard.type('correct horse battery');
      await p.keyboard.press('Enter');
      await p.getByTestId('whoami').filter({ hasText: 'Alice' }).waitFor({ timeout: STEP });
    } finally {
      await kb.close();
    }
  });
});
