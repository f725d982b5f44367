// The console page: sign-in, the MQTT page of one application (connection information,
// API keys, live events, charts). Everything it shows comes from the documented API.

import { Api, ApiError } from './api.js';
import { EventList, readEvents } from './events.js';
import { LineChart } from './charts.js';

const $ = (id) => document.getElementById(id);

/** The signed-in state; null when signed out. The credential lives in `api` only. */
let session = null;

function show(id, text) {
  const el = $(id);
  el.textContent = text ?? '';
  el.hidden = !text;
}

function describe(error) {
  if (error instanceof ApiError) return `${error.message} (${error.code})`;
  return String(error?.message ?? error);
}

async function copy(id) {
  const el = $(id);
  const text = 'value' in el && el.tagName === 'INPUT' ? el.value : el.textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Not a secure context (plain http from another host): select it for Ctrl+C.
    if (el.tagName === 'INPUT') el.select();
    else window.getSelection().selectAllChildren(el);
  }
}

// ---- sign-in -------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const token = $('token').value.trim();
  $('token').value = '';
  show('signin-error', '');
  const api = new Api(token);
  let who;
  try {
    who = await api.whoami();
  } catch (e) {
    api.forget();
    show('signin-error', `Sign-in failed: ${describe(e)}`);
    return;
  }
  let info = { public_address: '', public_tls_address: '', public_ws_url: '', tenancy: 'multi' };
  try {
    info = await api.info();
  } catch (e) {
    console.warn('console info', e);
  }
  session = { api, who, info, app: null, stop: null };
  $('signin').hidden = true;
  $('whoami').hidden = false;
  $('who-label').textContent = who.operator
    ? 'operator'
    : `API key ${who.key_id} of ${who.application}`;
  if (who.operator) {
    $('picker').hidden = false;
    $('app-uid').focus();
  } else {
    openApplication(who.application);
  }
}

function signOut() {
  if (session) {
    closeApplication();
    session.api.forget();
  }
  session = null;
  $('whoami').hidden = true;
  $('picker').hidden = true;
  $('signin').hidden = false;
  $('token').focus();
}

// ---- one application -----------------------------------------------------------------

function pickApplication(event) {
  event.preventDefault();
  const app = $('app-uid').value.trim();
  if (!/^[a-z0-9](?:-?[a-z0-9]){2,}(?:@[a-z0-9](?:-?[a-z0-9]){2,})?$/.test(app)) {
    show('picker-error', 'An application is written as in MQTT usernames: app1@tenant1 (or app1 in single-tenant mode).');
    return;
  }
  show('picker-error', '');
  openApplication(app);
}

function closeApplication() {
  if (!session?.app) return;
  session.stop.abort();
  clearInterval(session.poll);
  session.app = null;
  forgetNewKey();
  $('keys-body').replaceChildren();
  events.clear();
  connectionsChart.clear();
  messagesChart.clear();
  $('application').hidden = true;
}

function openApplication(app) {
  closeApplication();
  session.app = app;
  session.stop = new AbortController();
  $('picker').hidden = true;
  $('application').hidden = false;
  $('change-app').hidden = !session.who.operator;
  $('app-title').textContent = app;
  const { info } = session;
  const shown = [
    ['public-address', info.public_address],
    ['public-tls-address', info.public_tls_address],
    ['public-ws-url', info.public_ws_url],
    // The username is the application as written in topics: {app}@{tenant}, or {app}.
    ['username', app],
  ];
  for (const [id, value] of shown) {
    $(id).textContent = value || 'none';
    document.querySelector(`button.copy[data-copy="${id}"]`).hidden = !value;
  }
  show('app-error', '');
  loadKeys();
  followEvents(app, session.stop.signal);
  session.last = null;
  pollStats(app);
  session.poll = setInterval(() => pollStats(app), 2000);
}

// ---- keys ----------------------------------------------------------------------------

function forgetNewKey() {
  $('new-key-value').value = '';
  $('new-key').hidden = true;
  $('key-form').hidden = true;
  $('generate').hidden = false;
}

function cell(tr, text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  tr.append(td);
  return td;
}

async function loadKeys() {
  const app = session.app;
  let keys;
  try {
    keys = await session.api.keys(app);
  } catch (e) {
    show('app-error', `Cannot list the API keys: ${describe(e)}`);
    return;
  }
  if (session?.app !== app) return;
  const rows = keys.map((k) => {
    const tr = document.createElement('tr');
    tr.dataset.keyId = k.id;
    cell(tr, k.id, 'id');
    cell(tr, k.name || '–');
    cell(tr, (k.rights ?? []).join(' '), 'rights');
    cell(tr, k.created_at ?? '');
    cell(tr, k.expires_at ?? 'never');
    const td = cell(tr, '');
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'danger revoke';
    button.textContent = 'Revoke';
    button.addEventListener('click', () => revoke(k.id, k.name));
    td.append(button);
    return tr;
  });
  $('keys-body').replaceChildren(...rows);
  $('keys-empty').hidden = rows.length > 0;
}

async function createKey(event) {
  event.preventDefault();
  const form = $('key-form');
  const rights = [...form.querySelectorAll('input[name=rights]:checked')].map((c) => c.value);
  const spec = { name: $('key-name').value.trim(), rights };
  const expiry = $('key-expiry').value;
  if (expiry) spec.expires_in = expiry;
  let created;
  try {
    created = await session.api.createKey(session.app, spec);
  } catch (e) {
    show('app-error', `Cannot create the API key: ${describe(e)}`);
    return;
  }
  show('app-error', '');
  form.hidden = true;
  $('new-key-value').value = created.key;
  $('new-key').hidden = false;
  loadKeys();
}

async function revoke(id, name) {
  if (!window.confirm(`Revoke the API key ${name || id}? Clients using it are disconnected.`)) return;
  try {
    await session.api.revokeKey(session.app, id);
  } catch (e) {
    show('app-error', `Cannot revoke ${id}: ${describe(e)}`);
    return;
  }
  // The key shown once is of no use any more.
  if ($('new-key-value').value.split('.')[1] === id) forgetNewKey();
  loadKeys();
}

// ---- live events ---------------------------------------------------------------------

const events = new EventList($('events'), $('events-filter'));

async function followEvents(app, signal) {
  let delay = 1000;
  while (!signal.aborted) {
    try {
      const response = await session.api.events(app, signal);
      $('events-status').textContent = 'live';
      delay = 1000;
      await readEvents(response, (name, data) => events.add(name, data));
      if (!signal.aborted) $('events-status').textContent = 'stream ended, reconnecting…';
    } catch (e) {
      if (signal.aborted) return;
      $('events-status').textContent = `not connected: ${describe(e)}; retrying`;
      if (e instanceof ApiError && (e.status === 401 || e.status === 403)) delay = 10000;
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

// ---- charts --------------------------------------------------------------------------

const connectionsChart = new LineChart($('chart-connections'), ['#0d83d0']);
const messagesChart = new LineChart($('chart-messages'), ['#0d83d0', '#2e7d32', '#c62828']);

async function pollStats(app) {
  let stats;
  try {
    stats = await session.api.stats(app);
  } catch (e) {
    if (session?.app === app) $('stats-status').textContent = describe(e);
    return;
  }
  if (session?.app !== app) return;
  $('stats-status').textContent = '';
  const now = performance.now();
  $('stat-connections').textContent = stats.connections;
  connectionsChart.push([stats.connections]);
  const last = session.last;
  session.last = { now, stats };
  if (!last) return;
  const seconds = Math.max(0.001, (now - last.now) / 1000);
  // Counters only grow; a restarted node starts over (a negative step counts as 0).
  const rate = (k) => Math.max(0, (stats[k] - last.stats[k]) / seconds);
  const rates = ['messages_in', 'messages_out', 'dropped'].map(rate);
  $('stat-in').textContent = rates[0].toFixed(1);
  $('stat-out').textContent = rates[1].toFixed(1);
  $('stat-dropped').textContent = rates[2].toFixed(1);
  messagesChart.push(rates);
}

// ---- wiring --------------------------------------------------------------------------

$('signin-form').addEventListener('submit', signIn);
$('signout').addEventListener('click', signOut);
$('picker-form').addEventListener('submit', pickApplication);
$('change-app').addEventListener('click', () => {
  closeApplication();
  $('picker').hidden = false;
});
$('generate').addEventListener('click', () => {
  forgetNewKey();
  $('generate').hidden = true;
  $('key-form').hidden = false;
  $('key-name').focus();
});
$('cancel-key').addEventListener('click', forgetNewKey);
$('key-form').addEventListener('submit', createKey);
$('refresh-keys').addEventListener('click', loadKeys);
$('events-pause').addEventListener('click', () => {
  events.paused = !events.paused;
  $('events-pause').textContent = events.paused ? 'Resume' : 'Pause';
});
$('events-clear').addEventListener('click', () => events.clear());
for (const button of document.querySelectorAll('button.copy')) {
  button.addEventListener('click', () => copy(button.dataset.copy));
}
$('token').focus();
