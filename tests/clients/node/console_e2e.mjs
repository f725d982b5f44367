// The console page end to end in headless Chromium (playwright-core drives Debian's
// /usr/bin/chromium; nothing is downloaded), with real MQTT clients (MQTT.js in Node).
//
//     node console_e2e.mjs
//
// tests/console.rs runs this with LB_CONSOLE (http://host:port/console of node A),
// LB_TOKEN (the admin token), LB_APP (the application as in usernames), LB_MQTT
// (mqtt://host:port of node B: events must cross the cluster), LB_SCREENSHOT (where the
// PNG goes) and LB_TIMEOUT (seconds per expected thing); LB_CHROMIUM names the browser.
//
// Signs in with the admin token, opens LB_APP, generates a key and reads it from the
// page, connects a client with it and waits for its as.mqtt.connect in the live events;
// connects with an unknown key and waits for as.mqtt.connect.fail with "api key with id
// … not found"; revokes the key in the page and waits for the client to be disconnected
// and for as.mqtt.disconnect; generates a key with RIGHT_APPLICATION_SETTINGS_API_KEYS and
// signs in with it in a second page (its application only, its keys and live events).
// Prints what it saw; exit 0 when everything happened.

import { randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';
import { base32, connect as mqttConnect, env } from './console_common.mjs';

const CONSOLE = env('LB_CONSOLE');
const TOKEN = env('LB_TOKEN');
const APP = env('LB_APP');
const MQTT_URL = env('LB_MQTT');
const SCREENSHOT = env('LB_SCREENSHOT');
const TIMEOUT_MS = Number(env('LB_TIMEOUT', '15')) * 1000;

setTimeout(() => {
  console.error('the whole run overran 120 s');
  process.exit(3);
}, 120_000).unref();

function connect(clientId, password) {
  return mqttConnect(MQTT_URL, APP, clientId, password, TIMEOUT_MS);
}

/** Waits for a live event `name` whose text contains `needle`; its text. */
async function liveEvent(page, name, needle) {
  const li = page.locator(`#events li[data-name="${name}"]`, { hasText: needle }).first();
  await li.waitFor({ timeout: TIMEOUT_MS });
  return li.innerText();
}

const browser = await chromium.launch({
  executablePath: env('LB_CHROMIUM', '/usr/bin/chromium'),
  headless: true,
  args: ['--no-sandbox'],
});
let failed = false;
const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
try {
  const violations = [];
  page.on('console', (m) => {
    if (m.type() === 'error') {
      console.log(`page console error: ${m.text()}`);
      if (/Content Security Policy/i.test(m.text())) violations.push(m.text());
    }
  });
  page.on('pageerror', (e) => {
    console.log(`page error: ${e.message}`);
    violations.push(e.message);
  });
  page.on('dialog', (d) => d.accept());

  await page.goto(CONSOLE);
  await page.fill('#token', TOKEN);
  await page.click('#signin-button');
  await page.waitForSelector('#picker:not([hidden])', { timeout: TIMEOUT_MS });
  console.log('signed in as operator');
  await page.fill('#app-uid', APP);
  await page.click('#open-app');
  await page.waitForSelector('#application:not([hidden])', { timeout: TIMEOUT_MS });
  await page.locator('#events-status', { hasText: 'live' }).waitFor({ timeout: TIMEOUT_MS });
  console.log(`opened ${APP}: username ${await page.textContent('#username')}, public address ${await page.textContent('#public-address')}`);

  await page.click('#generate');
  await page.fill('#key-name', 'console-e2e');
  await page.click('#create-key');
  await page.waitForSelector('#new-key:not([hidden])', { timeout: TIMEOUT_MS });
  const key = await page.inputValue('#new-key-value');
  const warning = await page.textContent('#new-key-warning');
  if (!/^NNSXS\.[A-Z2-7]{39}\.[A-Z2-7]{52}$/.test(key)) throw new Error(`the page shows no key: ${key}`);
  const keyId = key.split('.')[1];
  console.log(`generated key ${keyId}; warning: ${warning}`);
  await page.locator(`#keys-body tr[data-key-id="${keyId}"]`).waitFor({ timeout: TIMEOUT_MS });
  console.log('key listed');

  const good = connect('console-e2e-good', key);
  const goodOutcome = await good.outcome;
  if (goodOutcome !== 'connected') throw new Error(`the generated key does not connect: ${goodOutcome}`);
  console.log(`connect event: ${await liveEvent(page, 'as.mqtt.connect', 'console-e2e-good')}`);
  // The chart's connection count is the application's across the cluster: the client is
  // on the other node.
  await page.waitForFunction(() => Number(document.querySelector('#stat-connections').textContent) >= 1, null, { timeout: TIMEOUT_MS });
  console.log(`connections shown: ${await page.textContent('#stat-connections')}`);

  const unknownId = base32(randomBytes(24));
  const bad = connect('console-e2e-bad', `NNSXS.${unknownId}.${base32(randomBytes(32))}`);
  console.log(`unknown key: ${await bad.outcome}`);
  bad.client.end(true);
  console.log(`connect.fail event: ${await liveEvent(page, 'as.mqtt.connect.fail', `api key with id ${unknownId} not found`)}`);

  const closed = new Promise((resolve) => good.client.once('close', resolve));
  await page.click(`#keys-body tr[data-key-id="${keyId}"] button.revoke`);
  await Promise.race([
    closed,
    new Promise((_, reject) => setTimeout(() => reject(new Error('the client stayed connected after revocation')), TIMEOUT_MS)),
  ]);
  console.log('client disconnected after revocation');
  console.log(`disconnect event: ${await liveEvent(page, 'as.mqtt.disconnect', 'console-e2e-good')}`);
  await page.locator(`#keys-body tr[data-key-id="${keyId}"]`).waitFor({ state: 'detached', timeout: TIMEOUT_MS });
  console.log('key no longer listed');

  // Self-service: a key with RIGHT_APPLICATION_SETTINGS_API_KEYS signs in to its
  // application only, and sees its keys and live events.
  await page.click('#generate');
  await page.fill('#key-name', 'console-e2e-admin');
  await page.uncheck('input[value=RIGHT_APPLICATION_TRAFFIC_READ]');
  await page.uncheck('input[value=RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE]');
  await page.check('input[value=RIGHT_APPLICATION_SETTINGS_API_KEYS]');
  await page.click('#create-key');
  await page.waitForSelector('#new-key:not([hidden])', { timeout: TIMEOUT_MS });
  const selfService = await page.inputValue('#new-key-value');
  const own = await browser.newPage();
  await own.goto(CONSOLE);
  await own.fill('#token', selfService);
  await own.click('#signin-button');
  await own.waitForSelector('#application:not([hidden])', { timeout: TIMEOUT_MS });
  const title = await own.textContent('#app-title');
  if (title !== APP) throw new Error(`the self-service key opened ${title}, not ${APP}`);
  if (!(await own.isHidden('#change-app'))) throw new Error('a key may change application');
  await own.locator(`#keys-body tr[data-key-id="${selfService.split('.')[1]}"]`).waitFor({ timeout: TIMEOUT_MS });
  await own.locator('#events-status', { hasText: 'live' }).waitFor({ timeout: TIMEOUT_MS });
  console.log(`self-service key signed in to ${title}`);
  await own.close();

  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`screenshot ${SCREENSHOT}`);
  if (violations.length) throw new Error(`the page reported errors: ${violations.join('; ')}`);
  good.client.end(true);
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.message}`);
  // What the page showed when it failed, for the CI artifact.
  await page.screenshot({ path: SCREENSHOT, fullPage: true }).catch(() => {});
  console.error(`screenshot of the failure: ${SCREENSHOT}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
