// MQTT.js 5 against lorabroker, as an application written for The Things Stack (or a
// Node-RED flow) uses it.
//
//     node mqttjs_client.mjs SCENARIO
//
// tests/client_libraries runs this with the same environment and scenarios as
// tests/clients/python/paho_client.py (see its header): LB_HOST, LB_PORT, LB_PUB_PORT,
// LB_USERNAME, LB_KEY, LB_APP, LB_DEVICE, LB_CORRELATION_ID, LB_WILL_TOPIC, LB_WILL_PAYLOAD,
// LB_FORBIDDEN_TOPICS, LB_TIMEOUT; scenarios will, forbidden, flow, v5, qos2, homeassistant.
// Exit status 0 when everything expected happened, 1 with a message saying what did not,
// 3 when the whole run overran its deadline.

import { createRequire } from 'node:module';
import mqtt from 'mqtt';
import mqttPacket from 'mqtt-packet';

const require = createRequire(import.meta.url);
const VERSION = require('mqtt/package.json').version;

// The whole run, whatever happens: a test program must never hang.
const DEADLINE_MS = 60_000;

class Failed extends Error {}

function env(name, fallback) {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Failed(`the environment variable ${name} is not set`);
  return value;
}

const TIMEOUT_MS = Number(env('LB_TIMEOUT', '10')) * 1000;

// What one client saw.
class Recorder {
  constructor(name, client) {
    this.name = name;
    this.client = client;
    this.connacks = 0;
    this.closes = 0;
    this.errors = [];
    this.messages = [];
    this.waiters = new Set();
    client.on('connect', () => this.update(() => {
      this.connacks += 1;
      console.log(`${name}: CONNACK 0`);
    }));
    client.on('close', () => this.update(() => {
      this.closes += 1;
      console.log(`${name}: connection closed`);
    }));
    client.on('error', (e) => this.update(() => {
      this.errors.push(e);
      console.log(`${name}: error ${e.code ?? ''} ${e.message}`);
    }));
    client.on('message', (topic, payload) => this.update(() => {
      this.messages.push([topic, payload.toString()]);
    }));
  }

  update(change) {
    change();
    for (const w of this.waiters) w();
  }

  // Resolves once predicate() holds; rejects saying `what` did not happen.
  wait(what, predicate) {
    return new Promise((resolve, reject) => {
      if (predicate()) return resolve();
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Failed(`${this.name}: ${what} within ${TIMEOUT_MS / 1000} s`));
      }, TIMEOUT_MS);
      const check = () => {
        if (predicate()) {
          clearTimeout(timer);
          this.waiters.delete(check);
          resolve();
        }
      };
      this.waiters.add(check);
    });
  }

  // Index of the first message after `after` on a topic ending in `suffix` (whose payload
  // holds `contains`).
  async messageOn(suffix, after = 0, contains = undefined) {
    const find = () => this.messages.findIndex(
      ([topic, payload], i) => i >= after && topic.endsWith(suffix)
        && (contains === undefined || payload.includes(contains)),
    );
    await this.wait(`no message on ...${suffix}`, () => find() >= 0);
    const i = find();
    console.log(`${this.name}: ${this.messages[i][0]}`);
    return i;
  }

  stayedConnected() {
    if (this.connacks !== 1 || this.closes !== 0) {
      throw new Failed(`${this.name}: the connection did not stay up: ${this.connacks} CONNACKs, `
        + `${this.closes} closes, errors ${this.errors.map((e) => e.message)}`);
    }
  }
}

function options(name, extra = {}) {
  return {
    host: env('LB_HOST'),
    port: Number(env('LB_PORT')),
    username: env('LB_USERNAME'),
    password: env('LB_KEY'),
    clientId: `mqttjs-${name}-${process.pid}`,
    protocolVersion: 4,
    clean: true,
    keepalive: 30,
    // MQTT.js reconnects by itself (every second here, sooner than its default), so that a
    // reconnect loop would show within the test.
    reconnectPeriod: 1000,
    connectTimeout: TIMEOUT_MS,
    ...extra,
  };
}

async function connect(name, extra = {}) {
  const client = mqtt.connect(options(name, extra));
  const rec = new Recorder(name, client);
  await rec.wait('no CONNACK', () => rec.connacks > 0 || rec.errors.length > 0);
  if (rec.connacks === 0) {
    throw new Failed(`${name}: CONNECT refused: ${rec.errors.map((e) => e.message)}`);
  }
  return rec;
}

async function subscribe(rec, filter) {
  const granted = await withTimeout(`${rec.name}: no SUBACK for ${filter}`, rec.client.subscribeAsync(filter, { qos: 0 }));
  console.log(`${rec.name}: SUBACK ${JSON.stringify(granted)}`);
  if (granted.length !== 1 || granted[0].qos !== 0) {
    throw new Failed(`${rec.name}: ${filter} not granted: ${JSON.stringify(granted)}`);
  }
}

async function publish(rec, topic, payload, qos, retain = false) {
  await withTimeout(
    `${rec.name}: no ${qos === 2 ? 'PUBCOMP' : 'PUBACK'} for ${topic}`,
    rec.client.publishAsync(topic, payload, { qos, retain }),
  );
  if (qos > 0) console.log(`${rec.name}: ${qos === 2 ? 'PUBCOMP' : 'PUBACK'} for ${topic}`);
}

function withTimeout(what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Failed(`${what} within ${TIMEOUT_MS / 1000} s`)), TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function downlink(correlationId) {
  return JSON.stringify({
    downlinks: [{
      f_port: 15,
      frm_payload: 'vu8=',
      priority: 'NORMAL',
      confirmed: true,
      correlation_ids: [correlationId],
    }],
  });
}

const scenarios = {
  async will() {
    await connect('will', {
      will: { topic: env('LB_WILL_TOPIC'), payload: env('LB_WILL_PAYLOAD'), qos: 1, retain: false },
    });
    console.log('connected with the will; cutting the connection without DISCONNECT');
    // The process ends without DISCONNECT: the kernel closes the socket.
    process.exit(0);
  },

  async forbidden() {
    const app = env('LB_APP');
    const device = env('LB_DEVICE');
    const rec = await connect('forbidden');
    await subscribe(rec, `v3/${app}/devices/${device}/up`);
    for (const topic of env('LB_FORBIDDEN_TOPICS').split(',')) {
      await publish(rec, topic, downlink('forbidden'), 1);
    }
    // Still connected and still subscribed: traffic keeps arriving after the refusals.
    await rec.messageOn(`/devices/${device}/up`, rec.messages.length);
    await subscribe(rec, `v3/${app}/devices/${device}/down/#`);
    rec.stayedConnected();
    await rec.client.endAsync();
  },

  async flow() {
    const app = env('LB_APP');
    const device = env('LB_DEVICE');
    const cid = env('LB_CORRELATION_ID');
    const sub = await connect('sub');
    await subscribe(sub, '#');
    const up = await sub.messageOn(`/devices/${device}/up`);
    const uplink = JSON.parse(sub.messages[up][1]);
    if (!uplink.uplink_message || !uplink.uplink_message.frm_payload) {
      throw new Failed(`not an uplink: ${sub.messages[up][1]}`);
    }
    const pub = await connect('pub', { port: Number(env('LB_PUB_PORT', env('LB_PORT'))) });
    await publish(pub, `v3/${app}/devices/${device}/down/push`, downlink(cid), 1);
    let at = up;
    for (const event of ['down/queued', 'down/sent', 'down/ack']) {
      at = await sub.messageOn(`/devices/${device}/${event}`, at, cid);
      const doc = JSON.parse(sub.messages[at][1]);
      if (!(doc.correlation_ids ?? []).includes(cid)) {
        throw new Failed(`${event} without ${cid} in correlation_ids: ${sub.messages[at][1]}`);
      }
    }
    const ack = JSON.parse(sub.messages[at][1]).downlink_ack;
    if (!(ack.correlation_ids ?? []).includes(cid)) {
      throw new Failed(`downlink_ack without ${cid}: ${JSON.stringify(ack)}`);
    }
    sub.stayedConnected();
    pub.stayedConnected();
    await Promise.all([pub.client.endAsync(), sub.client.endAsync()]);
  },

  async v5() {
    // One attempt, no reconnection: what the library reports is the point.
    const client = mqtt.connect(options('v5', { protocolVersion: 5, reconnectPeriod: 0 }));
    const rec = new Recorder('v5', client);
    await rec.wait('neither a CONNACK nor an error', () => rec.connacks > 0 || rec.errors.length > 0);
    if (rec.connacks > 0) throw new Failed('an MQTT 5 CONNECT was accepted');
    const e = rec.errors[0];
    console.log(`refused: code ${e.code}, ${e.message}`);
    if (e.code !== 1 || !/protocol version/i.test(e.message)) {
      throw new Failed(`refused with ${e.code} (${e.message}), not 1 (unacceptable protocol version)`);
    }
    // And the connection ends: the library does not sit on a refused connection.
    await rec.wait('the refused connection still open', () => rec.closes > 0);
    client.end(true);
  },

  async qos2() {
    const app = env('LB_APP');
    const device = env('LB_DEVICE');
    const rec = await connect('qos2');
    const topic = `v3/${app}/devices/${device}/down/push`;
    // What a retransmission is: the same packet ID with DUP set, written right after the
    // original (MQTT.js announces a packet just before writing it), before PUBREC can have
    // arrived and PUBREL been sent.
    let duplicated = false;
    rec.client.on('packetsend', (p) => {
      if (p.cmd === 'publish' && p.qos === 2 && !duplicated) {
        duplicated = true;
        queueMicrotask(() => {
          rec.client.stream.write(mqttPacket.generate({ ...p, dup: true }));
          console.log(`sent PUBLISH and its duplicate (packet ID ${p.messageId}, DUP)`);
        });
      }
    });
    await publish(rec, topic, downlink(env('LB_CORRELATION_ID')), 2);
    if (!duplicated) throw new Failed('the duplicate was not sent');
    rec.stayedConnected();
    await rec.client.endAsync();
  },

  async homeassistant() {
    const app = env('LB_APP');
    const rec = await connect('homeassistant', {
      will: { topic: 'homeassistant/status', payload: 'offline', qos: 0, retain: true },
    });
    // The birth message: retained, on a topic no lorabroker key may write.
    await publish(rec, 'homeassistant/status', 'online', 1, true);
    await subscribe(rec, `v3/${app}/devices/+/up`);
    await rec.messageOn('/up');
    rec.stayedConnected();
    await rec.client.endAsync();
  },
};

async function main() {
  const scenario = process.argv[2];
  if (!Object.hasOwn(scenarios, scenario)) {
    console.error(`usage: node mqttjs_client.mjs ${Object.keys(scenarios).join('|')}`);
    process.exit(2);
  }
  setTimeout(() => {
    console.error(`FAIL: ${scenario} overran its ${DEADLINE_MS / 1000} s deadline`);
    process.exit(3);
  }, DEADLINE_MS).unref();
  console.log(`MQTT.js ${VERSION}: ${scenario}`);
  try {
    await scenarios[scenario]();
  } catch (e) {
    console.error(`FAIL: ${e instanceof Failed ? e.message : e.stack}`);
    process.exit(1);
  }
  console.log(`ok: ${scenario}`);
  process.exit(0);
}

main();
