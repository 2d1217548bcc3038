// Drives a running service's console in headless Chromium for tests/console.rs:
//
//     node console.cjs <chromium> <console url> <token> <screenshot folder> <original subject>
//
// Loads the page, waits until it has rendered the fleet, reads what it shows (instances,
// handlers, leaders, captures, dead letters), tries to replay the dead letter first published
// to <original subject> without the token (the page must show the refusal), enters the token,
// replays it through its row's button and waits for the row to go. Keeps screenshots in the
// folder. Prints one JSON line of what it saw on stdout; exits 1 with the reason on failure.
'use strict';

const puppeteer = require('puppeteer-core');
const path = require('path');

const [chromium, url, token, shots, subject] = process.argv.slice(2);
const WAIT = { timeout: 30000 };

function fail(why) {
  console.error(`console driver: ${why}`);
  process.exit(1);
}

if (!chromium || !url || !token || !shots || !subject) fail('usage: console.cjs <chromium> <url> <token> <screenshots> <subject>');

(async () => {
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const errors = [];
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1400, height: 1000 });
    page.on('pageerror', (e) => errors.push(String(e)));
    // Chromium reports every non-2xx fetch as "Failed to load resource"; the refusal below is one.
    page.on('console', (m) => {
      if (m.type() === 'error' && !/^Failed to load resource/.test(m.text())) errors.push(m.text());
    });
    await page.goto(url, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('body[data-loaded="true"]', WAIT);
    // Both instances, and the dead letter, before reading.
    await page.waitForFunction(() => document.querySelectorAll('#instances [data-instance]').length >= 2, WAIT);
    const row = `#dead-letters tbody tr[data-sequence]`;
    await page.waitForFunction(
      (row, subject) => [...document.querySelectorAll(row)].some((tr) => tr.textContent.includes(subject)),
      WAIT, row, subject);
    const seen = await page.evaluate((row) => {
      const text = (el) => (el ? el.textContent.replace(/\s+/g, ' ').trim() : null);
      return {
        self: text(document.querySelector('#self')),
        instances: [...document.querySelectorAll('#instances [data-instance]')].map((li) => li.dataset.instance),
        handlers: [...document.querySelectorAll('#handlers tbody tr[data-handler]')].map((tr) => ({
          name: tr.dataset.handler, text: text(tr),
        })),
        leaders: [...document.querySelectorAll('#leaders tbody tr[data-leader]')].map((tr) => ({
          name: tr.dataset.leader, holder: tr.dataset.holder || null, text: text(tr),
        })),
        captures: [...document.querySelectorAll('#captures tbody tr[data-capture]')].map((tr) => tr.dataset.capture),
        dead_letters: [...document.querySelectorAll(row)].map((tr) => ({
          sequence: Number(tr.dataset.sequence), text: text(tr),
        })),
      };
    }, row);
    await page.screenshot({ path: path.join(shots, 'console.png'), fullPage: true });

    const letter = seen.dead_letters.find((d) => d.text.includes(subject));
    const target = `#dead-letters tbody tr[data-sequence="${letter.sequence}"]`;
    // Without the token the service refuses, and the page says so.
    await page.click(`${target} button.replay`);
    await page.waitForFunction(() => {
      const toast = document.querySelector('#toast');
      const banner = document.querySelector('#banner');
      const shown = (el) => el && !el.hidden && /token/i.test(el.textContent);
      return shown(toast) || shown(banner);
    }, WAIT);
    const refused = await page.evaluate(() => {
      const visible = [document.querySelector('#toast'), document.querySelector('#banner')].filter((el) => el && !el.hidden);
      return visible.map((el) => el.textContent.replace(/\s+/g, ' ').trim()).join(' | ');
    });
    if (!(await page.$(target))) fail('the dead letter went without the token');
    await page.screenshot({ path: path.join(shots, 'console-refused.png') });

    // With it, the replay goes through and the row goes.
    await page.type('#token', token);
    await page.click(`${target} button.replay`);
    await page.waitForFunction((target) => !document.querySelector(target), WAIT, target);
    const toast = await page.evaluate(() => document.querySelector('#toast').textContent.trim());
    await page.screenshot({ path: path.join(shots, 'console-replayed.png'), fullPage: true });
    if (errors.length) fail(`the page logged errors: ${errors.join('; ')}`);
    console.log(JSON.stringify({ ...seen, refused, replayed: letter.sequence, toast }));
  } finally {
    await browser.close();
  }
})().catch((e) => fail(e && e.stack ? e.stack : String(e)));
