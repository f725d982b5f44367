// Live events: a Server-Sent Events reader on fetch() (EventSource cannot send an
// Authorization header), and the bounded, filterable list that shows them newest first.

/** Most events kept in the list; older ones are dropped. */
export const MAX_EVENTS = 500;

/**
 * Reads an SSE `response` body, calling `onEvent(name, data)` for every event
 * (`event:`/`data:` lines, a blank line ends one; `:` comments are keep-alives).
 * Resolves when the stream ends.
 */
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let name = 'message';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf('\n')) >= 0) {
      let line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line === '') {
        if (data.length) onEvent(name, data.join('\n'));
        name = 'message';
        data = [];
      } else if (line.startsWith(':')) {
        // keep-alive comment
      } else {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') name = val;
        else if (field === 'data') data.push(val);
      }
    }
  }
}

/** `{k: v}` as `k=v` pairs, nested values as JSON. */
function summary(data) {
  if (!data || typeof data !== 'object') return '';
  return Object.entries(data)
    .map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : v}`)
    .join('  ');
}

function timeOf(event) {
  const t = new Date(event.time ?? Date.now());
  return Number.isNaN(t.getTime()) ? String(event.time) : t.toLocaleTimeString();
}

/** The list element `ol` showing events, newest first, at most MAX_EVENTS. */
export class EventList {
  constructor(ol, filterInput) {
    this.ol = ol;
    this.filter = '';
    this.paused = false;
    filterInput.addEventListener('input', () => {
      this.filter = filterInput.value.trim().toLowerCase();
      for (const li of this.ol.children) this.#apply(li);
    });
  }

  #apply(li) {
    li.hidden = this.filter !== '' && !li.dataset.text.includes(this.filter);
  }

  clear() {
    this.ol.replaceChildren();
  }

  /** Adds one event (`name`, the JSON text of its data line). */
  add(name, json) {
    if (this.paused) return;
    let event;
    try {
      event = JSON.parse(json);
    } catch {
      event = { name, data: { raw: json } };
    }
    const li = document.createElement('li');
    li.className = 'event';
    if (name.endsWith('.fail') || name.endsWith('.failed')) li.classList.add('fail');
    li.dataset.name = name;
    const cells = [
      ['time', timeOf(event)],
      ['name', name],
      ['origin', event.origin ?? ''],
      ['data', summary(event.data)],
    ];
    for (const [cls, text] of cells) {
      const span = document.createElement('span');
      span.className = cls;
      span.textContent = text;
      li.append(span);
    }
    li.dataset.text = `${name} ${event.origin ?? ''} ${JSON.stringify(event.data ?? {})}`.toLowerCase();
    this.#apply(li);
    this.ol.prepend(li);
    while (this.ol.childElementCount > MAX_EVENTS) this.ol.lastElementChild.remove();
  }
}
