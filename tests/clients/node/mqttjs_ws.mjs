// MQTT.js 5 over WebSocket against lorabroker, in Node and in a page of headless Chromium.
//
//     node mqttjs_ws.mjs node      # MQTT.js in Node over LB_URL
//     node mqttjs_ws.mjs browser   # MQTT.js's browser bundle in a page, over LB_URL
//
// tests/websocket.rs runs this with LB_URL (ws://host:port/mqtt), LB_USERNAME, LB_KEY,
// LB_APP, LB_DEVICE and LB_TIMEOUT (seconds per expected thing); LB_CHROMIUM names the
// browser (default /usr/bin/chromium: playwright-core drives it, nothing is downloaded).
// For wss:// URLs, LB_CA is the PEM file of the test's CA (Node trusts it) and LB_SPKI the
// base64 SHA-256 of the server certificate's public key (Chromium trusts that key only,
// with --ignore-certificate-errors-spki-list).
//
// node: subscribes to '#', waits for an uplink of LB_DEVICE, pushes a downlink and waits
// for its down/queued. browser: serves a page (and node_modules/mqtt/dist/mqtt.min.js) on a
// free loopback port; the page connects, subscribes to '#' and reports the first uplink.
// Exit status 0 when everything expected happened, 1 with a message saying what did not.

import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import mqtt from 'mqtt';

const require = createRequire(import.meta.url);

function env(name, fallback) {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`the environment variable ${name} is not set`);
  return value;
}

const URL_ = env('LB_URL');
const USERNAME = env('LB_USERNAME');
const KEY = env('LB_KEY');
const APP = env('LB_APP');
const DEVICE = env('LB_DEVICE');
const TIMEOUT_MS = Number(env('LB_TIMEOUT', '10')) * 1000;
const UP = `v3/${APP}/devices/${DEVICE}/up`;

// A test program must never hang.
setTimeout(() => {
  console.error('the whole run overran 60 s');
  process.exit(3);
}, 60_000).unref();

function within(what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${TIMEOUT_MS} ms`)), TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function message(client, test) {
  return new Promise((resolve) => {
    const on = (topic, payload) => {
      if (test(topic)) {
        client.off('message', on);
        resolve([topic, payload.toString()]);
      }
    };
    client.on('message', on);
  });
}

async function inNode() {
  const client = mqtt.connect(URL_, {
    username: USERNAME,
    password: KEY,
    protocolVersion: 4,
    reconnectPeriod: 0,
    ...(process.env.LB_CA ? { ca: readFileSync(process.env.LB_CA) } : {}),
  });
  client.on('error', (e) => console.log(`error: ${e.message}`));
  await within('CONNACK', new Promise((resolve) => client.once('connect', resolve)));
  console.log(`connected over ${URL_}`);
  const granted = await within('SUBACK', client.subscribeAsync('#'));
  if (granted[0].qos !== 0) throw new Error(`'#' not granted: ${JSON.stringify(granted)}`);
  const [topic] = await within('uplink', message(client, (t) => t === UP));
  console.log(`uplink on ${topic}`);
  const queued = message(client, (t) => t === `v3/${APP}/devices/${DEVICE}/down/queued`);
  await client.publishAsync(
    `v3/${APP}/devices/${DEVICE}/down/push`,
    JSON.stringify({ downlinks: [{ f_port: 15, frm_payload: 'vu8=', priority: 'NORMAL' }] }),
  );
  const [, doc] = await within('down/queued', queued);
  if (JSON.parse(doc).downlink_queued?.f_port !== 15) throw new Error(`unexpected down/queued: ${doc}`);
  console.log('down/queued seen');
  await client.endAsync();
}

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>lorabroker over WebSocket</title>
<script src="/mqtt.min.js"></script></head>
<body><pre id="log"></pre><script>
  const [url, username, password, up] = JSON.parse(decodeURIComponent(location.hash.slice(1)));
  const log = (line) => { document.getElementById('log').textContent += line + '\\n'; };
  window.report = { errors: [] };
  const client = mqtt.connect(url, { username, password, protocolVersion: 4, reconnectPeriod: 0 });
  client.on('error', (e) => { window.report.errors.push(String(e.message)); log('error ' + e.message); });
  client.on('connect', () => {
    window.report.connected = true;
    client.subscribe('#', (err, granted) => {
      window.report.granted = err ? String(err) : granted.map((g) => g.qos);
    });
  });
  client.on('message', (topic, payload) => {
    if (topic === up && !window.report.uplink) {
      window.report.uplink = { topic, bytes: payload.length };
      log('uplink on ' + topic);
    }
  });
</script></body></html>`;

async function inBrowser() {
  const { chromium } = await import('playwright-core');
  const bundle = readFileSync(
    join(dirname(require.resolve('mqtt/package.json')), 'dist', 'mqtt.min.js'),
  );
  const server = createServer((req, res) => {
    if (req.url === '/mqtt.min.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' }).end(bundle);
    } else if (req.url === '/' || req.url.startsWith('/?')) {
      res.writeHead(200, { 'content-type': 'text/html' }).end(PAGE);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const origin = `http://127.0.0.1:${server.address().port}`;
  const browser = await chromium.launch({
    executablePath: env('LB_CHROMIUM', '/usr/bin/chromium'),
    // Tests run as root in containers, where Chromium's sandbox cannot start.
    chromiumSandbox: false,
    args: process.env.LB_SPKI ? [`--ignore-certificate-errors-spki-list=${process.env.LB_SPKI}`] : [],
  });
  try {
    const page = await browser.newPage();
    page.on('console', (m) => console.log(`page: ${m.text()}`));
    const args = encodeURIComponent(JSON.stringify([URL_, USERNAME, KEY, UP]));
    await page.goto(`${origin}/#${args}`);
    let report;
    try {
      await page.waitForFunction(() => window.report && window.report.uplink, null, {
        timeout: TIMEOUT_MS,
      });
    } finally {
      report = await page.evaluate(() => window.report);
      console.log(`page report: ${JSON.stringify(report)}`);
    }
    if (!report.connected) throw new Error('the page did not connect');
    if (JSON.stringify(report.granted) !== '[0]') throw new Error(`'#' not granted: ${report.granted}`);
    if (report.uplink.topic !== UP) throw new Error(`uplink on ${report.uplink.topic}`);
    console.log(`the page (origin ${origin}) received an uplink on ${report.uplink.topic}`);
  } finally {
    await browser.close();
    server.close();
  }
}

const mode = process.argv[2];
try {
  if (mode === 'node') await inNode();
  else if (mode === 'browser') await inBrowser();
  else throw new Error(`usage: node mqttjs_ws.mjs node|browser (not ${mode})`);
  process.exit(0);
} catch (e) {
  console.error(`FAILED: ${e.message}`);
  process.exit(1);
}
