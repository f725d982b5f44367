// What the console end-to-end scripts share (console_e2e.mjs drives Chromium through
// playwright-core, console_firefox.mjs drives Firefox through Marionette): reading the
// environment tests/console.rs sets, unpadded base32 for made-up API key IDs, and an
// MQTT.js client that connects once.

import mqtt from 'mqtt';

/** The environment variable `name`, or `fallback`; throws when neither is there. */
export function env(name, fallback) {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`the environment variable ${name} is not set`);
  return value;
}

/** Unpadded base32 (RFC 4648) of `bytes`, as in API key IDs. */
export function base32(bytes) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0;
  let value = 0;
  let out = '';
  for (const b of bytes) {
    value = (value << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out;
}

/**
 * Connects an MQTT 3.1.1 client to `url` as `username`/`password` without reconnecting;
 * `outcome` resolves to 'connected' or 'error: …'.
 */
export function connect(url, username, clientId, password, timeoutMs) {
  const client = mqtt.connect(url, {
    clientId,
    username,
    password,
    protocolVersion: 4,
    reconnectPeriod: 0,
    connectTimeout: timeoutMs,
  });
  const outcome = new Promise((resolve) => {
    client.once('connect', () => resolve('connected'));
    client.once('error', (e) => resolve(`error: ${e.message}`));
  });
  return { client, outcome };
}
