// The console page end to end in headless Firefox (Debian's /usr/bin/firefox-esr), with
// real MQTT clients (MQTT.js in Node).
//
//     node console_firefox.mjs
//
// playwright-core cannot drive Firefox ESR: its `browser.newPage()` sends the WebDriver
// BiDi command emulation.setMediaFeaturesOverride, which that Firefox does not know. So
// this script speaks Marionette, Firefox's own automation protocol, over TCP: each
// message is `<byte length>:<JSON>`, commands `[0, id, name, params]`, replies
// `[1, id, error, result]`, after a handshake object from the server.
//
// tests/console.rs starts Firefox (`--headless --marionette`, a temporary profile whose
// user.js sets marionette.port) and runs this with LB_MARIONETTE (that port), LB_CONSOLE
// (http://host:port/console), LB_TOKEN (the admin token), LB_APP (the application as in
// usernames), LB_MQTT (mqtt://host:port), LB_SCREENSHOT (where the PNG goes) and
// LB_TIMEOUT (seconds per expected thing); it kills Firefox afterwards.
//
// Signs in with the admin token, opens LB_APP and waits for the live events, generates a
// key and reads it from the page, connects a client with it and waits for its
// as.mqtt.connect in the page, connects with an unknown key and waits for
// as.mqtt.connect.fail with "api key with id … not found", takes a screenshot. Prints
// what it saw; exit 0 when everything happened.

import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import net from 'node:net';
import { base32, connect as mqttConnect, env } from './console_common.mjs';

const MARIONETTE_PORT = Number(env('LB_MARIONETTE'));
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

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A Marionette connection: `command(name, params)` resolves to the result or throws. */
class Marionette {
  /** Connects to 127.0.0.1:`port`, retrying while Firefox starts, and reads the handshake. */
  static async open(port, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const m = new Marionette(await openSocket(port));
        const hello = await m.next();
        if (hello?.applicationType !== 'gecko') throw new Error(`not Marionette: ${JSON.stringify(hello)}`);
        return m;
      } catch (e) {
        if (Date.now() > deadline) throw new Error(`no Marionette on port ${port}: ${e.message}`);
        await sleep(200);
      }
    }
  }

  constructor(socket) {
    this.socket = socket;
    this.buffer = Buffer.alloc(0);
    this.queue = [];
    this.waiting = null;
    this.lastId = 0;
    socket.on('data', (chunk) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      this.parse();
    });
    socket.on('close', () => this.deliver(new Error('Marionette closed the connection')));
    socket.on('error', (e) => this.deliver(e));
  }

  /** Splits complete `<length>:<json>` messages off the buffer. */
  parse() {
    for (;;) {
      const colon = this.buffer.indexOf(0x3a);
      if (colon < 0) return;
      const length = Number(this.buffer.subarray(0, colon).toString());
      if (this.buffer.length < colon + 1 + length) return;
      const json = this.buffer.subarray(colon + 1, colon + 1 + length).toString();
      this.buffer = this.buffer.subarray(colon + 1 + length);
      this.deliver(JSON.parse(json));
    }
  }

  deliver(message) {
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w(message);
    } else {
      this.queue.push(message);
    }
  }

  /** The next message from the server. */
  async next() {
    const message = this.queue.length ? this.queue.shift() : await new Promise((resolve) => (this.waiting = resolve));
    if (message instanceof Error) throw message;
    return message;
  }

  /** Sends command `name` and waits for its reply. */
  async command(name, params = {}) {
    const id = ++this.lastId;
    const json = JSON.stringify([0, id, name, params]);
    this.socket.write(`${Buffer.byteLength(json)}:${json}`);
    for (;;) {
      const [type, replyId, error, result] = await this.next();
      if (type !== 1 || replyId !== id) continue;
      if (error) throw new Error(`${name}: ${error.error}: ${error.message}`);
      return result;
    }
  }

  /** Runs `script` (a function body using `arguments`) in the page; its return value. */
  async run(script, ...args) {
    return (await this.command('WebDriver:ExecuteScript', { script, args })).value;
  }

  /** Polls `script` until it returns something truthy; that value. */
  async waitFor(what, script, ...args) {
    const deadline = Date.now() + TIMEOUT_MS;
    for (;;) {
      const value = await this.run(script, ...args);
      if (value) return value;
      if (Date.now() > deadline) throw new Error(`timed out after ${TIMEOUT_MS} ms waiting for ${what}`);
      await sleep(100);
    }
  }

  close() {
    this.socket.destroy();
  }
}

function openSocket(port) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => resolve(socket));
    socket.once('error', reject);
  });
}

function connect(clientId, password) {
  return mqttConnect(MQTT_URL, APP, clientId, password, TIMEOUT_MS);
}

// Page helpers: each is a function body run in the page.
const FILL = `const el = document.querySelector(arguments[0]);
  el.value = arguments[1];
  el.dispatchEvent(new Event('input', { bubbles: true }));
  return true;`;
const CLICK = 'document.querySelector(arguments[0]).click(); return true;';
const SHOWN = 'const el = document.querySelector(arguments[0]); return !!el && !el.hidden;';
const TEXT = 'const el = document.querySelector(arguments[0]); return el ? el.textContent : null;';
/** The text of the first live event `name` containing `needle`, or null. */
const LIVE_EVENT = `for (const li of document.querySelectorAll('#events li')) {
    if (li.dataset.name === arguments[0] && li.textContent.includes(arguments[1])) return li.innerText;
  }
  return null;`;
/** Collects the page's uncaught errors and CSP violations from now on. */
const WATCH_ERRORS = `window.__lbErrors = [];
  window.addEventListener('error', (e) => window.__lbErrors.push(String(e.message)));
  window.addEventListener('unhandledrejection', (e) => window.__lbErrors.push(String(e.reason)));
  document.addEventListener('securitypolicyviolation', (e) => window.__lbErrors.push('CSP: ' + e.violatedDirective));
  return true;`;

async function screenshot(m) {
  const png = (await m.command('WebDriver:TakeScreenshot', { full: true })).value;
  writeFileSync(SCREENSHOT, Buffer.from(png, 'base64'));
}

const m = await Marionette.open(MARIONETTE_PORT, 30_000);
const session = await m.command('WebDriver:NewSession', {});
console.log(`Marionette session in ${session.capabilities.browserName} ${session.capabilities.browserVersion}`);
let failed = false;
const clients = [];
try {
  await m.command('WebDriver:Navigate', { url: CONSOLE });
  await m.run(WATCH_ERRORS);
  await m.run(FILL, '#token', TOKEN);
  await m.run(CLICK, '#signin-button');
  await m.waitFor('the application picker', SHOWN, '#picker');
  console.log('signed in as operator');
  await m.run(FILL, '#app-uid', APP);
  await m.run(CLICK, '#open-app');
  await m.waitFor('the application view', SHOWN, '#application');
  await m.waitFor('live events', "return document.querySelector('#events-status').textContent.includes('live');");
  console.log(`opened ${APP}: username ${await m.run(TEXT, '#username')}, public address ${await m.run(TEXT, '#public-address')}`);

  await m.run(CLICK, '#generate');
  await m.run(FILL, '#key-name', 'console-firefox');
  await m.run(CLICK, '#create-key');
  await m.waitFor('the new key', SHOWN, '#new-key');
  const key = await m.run("return document.querySelector('#new-key-value').value;");
  const warning = await m.run(TEXT, '#new-key-warning');
  if (!/^NNSXS\.[A-Z2-7]{39}\.[A-Z2-7]{52}$/.test(key)) throw new Error(`the page shows no key: ${key}`);
  const keyId = key.split('.')[1];
  console.log(`generated key ${keyId}; warning: ${warning}`);
  await m.waitFor('the key in the list', 'return !!document.querySelector(`#keys-body tr[data-key-id="${arguments[0]}"]`);', keyId);
  console.log('key listed');

  const good = connect('console-firefox-good', key);
  clients.push(good.client);
  const goodOutcome = await good.outcome;
  if (goodOutcome !== 'connected') throw new Error(`the generated key does not connect: ${goodOutcome}`);
  console.log(`connect event: ${await m.waitFor('as.mqtt.connect', LIVE_EVENT, 'as.mqtt.connect', 'console-firefox-good')}`);

  const unknownId = base32(randomBytes(24));
  const bad = connect('console-firefox-bad', `NNSXS.${unknownId}.${base32(randomBytes(32))}`);
  clients.push(bad.client);
  console.log(`unknown key: ${await bad.outcome}`);
  const needle = `api key with id ${unknownId} not found`;
  console.log(`connect.fail event: ${await m.waitFor('as.mqtt.connect.fail', LIVE_EVENT, 'as.mqtt.connect.fail', needle)}`);

  await screenshot(m);
  console.log(`screenshot ${SCREENSHOT}`);
  const errors = await m.run('return window.__lbErrors;');
  if (errors.length) throw new Error(`the page reported errors: ${errors.join('; ')}`);
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.message}`);
  // What the page showed when it failed, for the CI artifact.
  await screenshot(m).catch(() => {});
  console.error(`screenshot of the failure: ${SCREENSHOT}`);
} finally {
  for (const c of clients) c.end(true);
  await m.command('WebDriver:DeleteSession').catch(() => {});
  m.close();
}
process.exit(failed ? 1 : 0);
