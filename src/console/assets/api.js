// The HTTP API the console uses (documented in /api/v1/openapi.json). The credential is
// held by this object only, in memory, and sent in the Authorization header; never in a
// URL, a cookie or browser storage.

/** An API answer other than 2xx: its status and the `{code,message}` of its body. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The error of a non-2xx response. */
async function errorOf(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && typeof body === 'object') {
      code = body.code ?? code;
      message = body.message ?? body.error ?? message;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

/** The API as one signed-in user sees it. */
export class Api {
  #token;

  constructor(token) {
    this.#token = token;
  }

  /** Forgets the credential. */
  forget() {
    this.#token = '';
  }

  #headers(extra = {}) {
    return { Authorization: `Bearer ${this.#token}`, ...extra };
  }

  /** `method path` with an optional JSON body; the parsed JSON answer (null for 204). */
  async request(method, path, body) {
    const init = { method, headers: this.#headers(), cache: 'no-store', credentials: 'omit' };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (!response.ok) throw await errorOf(response);
    if (response.status === 204) return null;
    return response.json();
  }

  /** A streaming GET (Server-Sent Events): the Response, after checking its status. */
  async stream(path, signal) {
    const response = await fetch(path, {
      headers: this.#headers({ Accept: 'text/event-stream' }),
      cache: 'no-store',
      credentials: 'omit',
      signal,
    });
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  whoami() {
    return this.request('GET', '/api/v1/whoami');
  }

  info() {
    return this.request('GET', '/api/v1/console/info');
  }

  keys(app) {
    return this.request('GET', `/api/v1/applications/${encodeURIComponent(app)}/keys`);
  }

  createKey(app, spec) {
    return this.request('POST', `/api/v1/applications/${encodeURIComponent(app)}/keys`, spec);
  }

  revokeKey(app, id) {
    return this.request(
      'DELETE',
      `/api/v1/applications/${encodeURIComponent(app)}/keys/${encodeURIComponent(id)}`,
    );
  }

  stats(app) {
    return this.request('GET', `/api/v1/applications/${encodeURIComponent(app)}/stats`);
  }

  events(app, signal) {
    return this.stream(`/api/v1/applications/${encodeURIComponent(app)}/events`, signal);
  }
}
