// @sluice/client: publish events to a Sluice gateway (docs/http.md, docs/websocket.md).
// Plain ES module, no dependencies: the same file runs in browsers and in Node.js 20+.
//
// The retry contract (the same as clients/python): every event gets an id when it has none
// (`crypto.randomUUID()`), fixed before the first attempt, so a retry of an event whose answer
// was lost is recognised on streams with `dedup = true` and answered `duplicate` instead of
// stored twice. Only retryable failures are retried (network errors, 429, 503, and per-event
// errors that carry `retry_after_ms`), after the time the gateway asked for (Retry-After /
// retry_after_ms) or else an exponential backoff with jitter, up to `maxRetries` times.

/** A failure the gateway (or the network) reported. */
export class SluiceError extends Error {
  constructor(code, message, { status = 0, retryAfterMs = null } = {}) {
    super(message);
    this.name = "SluiceError";
    /** Sluice's stable code: malformed, unauthenticated, over_quota, unavailable, network, … */
    this.code = code;
    /** The HTTP status, 0 for network errors and WebSocket nacks. */
    this.status = status;
    /** How long the gateway asked to wait before a retry, if it did. */
    this.retryAfterMs = retryAfterMs;
  }

  /** Whether a retry can succeed. */
  get retryable() {
    return (
      this.code === "network" ||
      this.code === "unavailable" ||
      this.code === "over_quota" ||
      this.status === 429 ||
      this.status === 503 ||
      this.retryAfterMs != null
    );
  }
}

/** A new event id (a random UUID). */
export function newEventId() {
  return globalThis.crypto.randomUUID();
}

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      reject(signal.reason);
    }, { once: true });
  });

/** The wait before retry `attempt` (1, 2, …): what the gateway asked for, else backoff. */
function delayFor(attempt, retryAfterMs, { baseDelayMs, maxDelayMs }) {
  if (retryAfterMs != null) return Math.min(retryAfterMs, maxDelayMs);
  const exp = Math.min(maxDelayMs, baseDelayMs * 2 ** (attempt - 1));
  return exp / 2 + Math.random() * (exp / 2);
}

/** An event as the envelope the gateway reads, with its id fixed. */
function envelope(e) {
  if (e === null || typeof e !== "object" || !("value" in e)) {
    throw new TypeError("an event is an object with `value` (and optionally key, id, headers, timestamp, partition)");
  }
  const out = { value: e.value, id: e.id ?? newEventId() };
  for (const k of ["key", "headers", "timestamp", "partition"]) {
    if (e[k] !== undefined) out[k] = e[k] instanceof Date ? e[k].toISOString() : e[k];
  }
  return out;
}

function parseRetryAfter(h) {
  if (!h) return null;
  const secs = Number(h);
  return Number.isFinite(secs) ? secs * 1000 : null;
}

/** A client of the HTTP API. */
export class SluiceClient {
  /**
   * @param {object} options
   * @param {string} options.url the gateway, e.g. `http://127.0.0.1:8080`
   * @param {string} [options.apiKey] sent as `X-API-Key`
   * @param {string} [options.token] an API key or JWT, sent as `Authorization: Bearer`
   */
  constructor({
    url,
    apiKey,
    token,
    maxRetries = 5,
    baseDelayMs = 100,
    maxDelayMs = 10_000,
    timeoutMs = 30_000,
    fetch: fetchImpl = globalThis.fetch,
    queue = null,
  }) {
    if (!url) throw new TypeError("url is required");
    this.url = url.replace(/\/$/, "");
    this.apiKey = apiKey;
    this.token = token;
    this.retry = { maxRetries, baseDelayMs, maxDelayMs };
    this.timeoutMs = timeoutMs;
    // Called unbound: a browser's fetch refuses any `this` but the window's.
    this.fetch = (...args) => fetchImpl(...args);
    /** The offline queue (IndexedDbQueue, MemoryQueue), if any. */
    this.queue = queue;
  }

  headers() {
    const h = { "content-type": "application/json" };
    if (this.apiKey) h["x-api-key"] = this.apiKey;
    if (this.token) h.authorization = `Bearer ${this.token}`;
    return h;
  }

  /** One POST of `events`: the per-event results, or a SluiceError for the whole request. */
  async post(stream, events, idempotencyKey, signal) {
    const headers = this.headers();
    if (idempotencyKey) headers["idempotency-key"] = idempotencyKey;
    const timeout = AbortSignal.timeout(this.timeoutMs);
    const both = signal ? AbortSignal.any([signal, timeout]) : timeout;
    let resp;
    try {
      resp = await this.fetch(`${this.url}/v1/streams/${encodeURIComponent(stream)}/events`, {
        method: "POST",
        headers,
        body: JSON.stringify(events),
        signal: both,
      });
    } catch (e) {
      if (signal?.aborted) throw e;
      throw new SluiceError("network", `the gateway could not be reached: ${e.message ?? e}`);
    }
    let body = null;
    try {
      body = await resp.json();
    } catch {
      // not JSON: a proxy's answer, say
    }
    if (resp.ok && Array.isArray(body?.results)) return body.results;
    const err = body?.error ?? {};
    throw new SluiceError(err.code ?? `http_${resp.status}`, err.message ?? `HTTP ${resp.status}`, {
      status: resp.status,
      retryAfterMs: err.retry_after_ms ?? parseRetryAfter(resp.headers.get("retry-after")),
    });
  }

  /**
   * Publishes `events` to `stream` and answers per event, in order: `{partition, offset}`
   * (`status: "received" | "spooled"` where the stream acks before the offset is known,
   * `duplicate: true` for a retry the gateway recognised), or `{error: SluiceError}` for an
   * event that failed for good. Retryable failures are retried (see the top of this file);
   * a failure of the whole request that is not retryable (401, 403, 413, …) is thrown.
   */
  async publish(stream, events, { idempotencyKey, signal } = {}) {
    const all = events.map(envelope);
    const results = new Array(all.length).fill(null);
    let pending = all.map((_, i) => i);
    for (let attempt = 0; ; attempt++) {
      let answers;
      let wait = null;
      try {
        answers = await this.post(stream, pending.map((i) => all[i]), idempotencyKey, signal);
      } catch (e) {
        if (!(e instanceof SluiceError) || !e.retryable || attempt >= this.retry.maxRetries) throw e;
        await sleep(delayFor(attempt + 1, e.retryAfterMs, this.retry), signal);
        continue;
      }
      const again = [];
      answers.forEach((a, j) => {
        const i = pending[j];
        if (!a.error) {
          results[i] = a;
          return;
        }
        const err = new SluiceError(a.error.code, a.error.message, {
          retryAfterMs: a.error.retry_after_ms ?? null,
        });
        if (err.retryable && attempt < this.retry.maxRetries) {
          again.push(i);
          wait = Math.max(wait ?? 0, err.retryAfterMs ?? 0);
        } else {
          results[i] = { error: err };
        }
      });
      if (again.length === 0) return results;
      pending = again;
      await sleep(delayFor(attempt + 1, wait || null, this.retry), signal);
    }
  }

  /** A batcher for `stream`: see {@link Batcher}. */
  batcher(stream, options) {
    return new Batcher(this, stream, options);
  }

  /**
   * Keeps `event` in the offline queue first (IndexedDB in browsers), then tries to send what
   * the queue holds; events stay queued until the gateway answered them. Needs `queue`.
   */
  async enqueue(stream, event) {
    if (!this.queue) throw new TypeError("no offline queue: pass `queue` to the client");
    await this.queue.push({ stream, event: envelope(event) });
    return this.flushQueue().catch(() => 0);
  }

  /**
   * Sends what the offline queue holds, stream by stream, in order; removes what the gateway
   * answered (stored, duplicate, or failed for good). Answers how many were sent; throws (and
   * keeps them) when the gateway cannot be reached.
   */
  async flushQueue() {
    if (!this.queue) return 0;
    const items = await this.queue.peek(1000);
    const byStream = new Map();
    for (const it of items) {
      if (!byStream.has(it.item.stream)) byStream.set(it.item.stream, []);
      byStream.get(it.item.stream).push(it);
    }
    let sent = 0;
    for (const [stream, its] of byStream) {
      const results = await this.publish(stream, its.map((it) => it.item.event));
      await this.queue.remove(its.map((it) => it.key));
      sent += results.length;
    }
    return sent;
  }
}

/**
 * Collects events and sends them in batches: when `maxEvents` are waiting or `lingerMs` after
 * the first, whichever comes first. `send` answers with the event's own result.
 */
export class Batcher {
  constructor(client, stream, { maxEvents = 100, lingerMs = 20 } = {}) {
    this.client = client;
    this.stream = stream;
    this.maxEvents = maxEvents;
    this.lingerMs = lingerMs;
    this.waiting = [];
    this.timer = null;
  }

  send(event) {
    return new Promise((resolve, reject) => {
      this.waiting.push({ event: envelope(event), resolve, reject });
      if (this.waiting.length >= this.maxEvents) this.flush();
      else if (!this.timer) this.timer = setTimeout(() => this.flush(), this.lingerMs);
    });
  }

  /** Sends what is waiting now. */
  async flush() {
    clearTimeout(this.timer);
    this.timer = null;
    const batch = this.waiting.splice(0, this.waiting.length);
    if (batch.length === 0) return;
    try {
      const results = await this.client.publish(this.stream, batch.map((b) => b.event));
      batch.forEach((b, i) => b.resolve(results[i]));
    } catch (e) {
      batch.forEach((b) => b.reject(e));
    }
  }
}

/**
 * Publishing over one WebSocket (`/v1/streams/{stream}/ws`): each `send` is one frame, answered
 * per event by the gateway's acks. The socket reconnects after it drops (backoff); frames not
 * yet fully answered are sent again on the new socket with the same event ids. Retryable nacks
 * are sent again after their `retry_after_ms`.
 */
export class SluiceWebSocket {
  /**
   * @param {object} options
   * @param {string} options.url the gateway, `ws://` or `wss://` (an `http(s)://` URL is turned into one)
   * @param {string} options.stream
   * @param {string} [options.token] an API key or JWT, sent as the subprotocol `bearer.<token>`
   *   (browsers cannot set headers on a WebSocket)
   */
  constructor({
    url,
    stream,
    token,
    format,
    reconnect = true,
    maxRetries = 5,
    baseDelayMs = 100,
    maxDelayMs = 10_000,
    WebSocket: Impl = globalThis.WebSocket,
  }) {
    if (!Impl) throw new TypeError("no WebSocket implementation (Node.js: --experimental-websocket, or pass one)");
    const base = url.replace(/^http/, "ws").replace(/\/$/, "");
    this.endpoint = `${base}/v1/streams/${encodeURIComponent(stream)}/ws${format ? `?format=${format}` : ""}`;
    this.protocols = token ? ["sluice.v1", `bearer.${token}`] : ["sluice.v1"];
    this.Impl = Impl;
    this.reconnect = reconnect;
    this.retry = { maxRetries, baseDelayMs, maxDelayMs };
    this.socket = null;
    this.state = "closed";
    this.onstatechange = null;
    /** Frames written to the current socket, by their seq on it. */
    this.sent = [];
    /** Frames waiting for a socket. */
    this.backlog = [];
    this.closing = false;
    this.attempt = 0;
  }

  setState(s, detail) {
    this.state = s;
    this.onstatechange?.(s, detail);
  }

  /** Opens the socket (again); resolves once it is open. */
  connect() {
    this.closing = false;
    return new Promise((resolve, reject) => {
      const ws = new this.Impl(this.endpoint, this.protocols);
      this.socket = ws;
      this.sent = [];
      this.setState("connecting");
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this.attempt = 0;
        this.setState("connected");
        const again = this.backlog.splice(0, this.backlog.length);
        for (const f of again) this.write(f);
        resolve();
      };
      ws.onmessage = (m) => this.answer(JSON.parse(m.data));
      ws.onclose = (e) => {
        if (this.socket !== ws) return;
        this.socket = null;
        // What was written and not fully answered goes again on the next socket.
        const unanswered = this.sent.filter((f) => f && f.open > 0);
        this.backlog.unshift(...unanswered);
        this.sent = [];
        this.setState("closed", `${e.code}${e.reason ? `: ${e.reason}` : ""}`);
        if (!opened) reject(new SluiceError("network", `the WebSocket closed before it opened (${e.code})`));
        if (!this.closing && this.reconnect) {
          this.attempt++;
          setTimeout(() => this.connect().catch(() => {}), delayFor(this.attempt, null, this.retry));
        } else {
          for (const f of this.backlog.splice(0)) f.fail(new SluiceError("network", "the WebSocket closed"));
        }
      };
      ws.onerror = () => {};
    });
  }

  /** Sends one event (answers its result) or an array of them (answers their results). */
  send(events) {
    const many = Array.isArray(events);
    const list = (many ? events : [events]).map(envelope);
    return new Promise((resolve, reject) => {
      const frame = {
        events: list,
        results: new Array(list.length).fill(null),
        open: list.length,
        tries: 0,
        done: () => resolve(many ? frame.results : frame.results[0]),
        fail: reject,
      };
      if (this.socket?.readyState === 1) this.write(frame);
      else this.backlog.push(frame);
    });
  }

  write(frame) {
    // Only the events still unanswered travel again.
    const idx = frame.results.flatMap((r, i) => (r === null ? [i] : []));
    frame.indexes = idx;
    frame.seq = this.sent.length;
    this.sent.push(frame);
    this.socket.send(JSON.stringify(idx.map((i) => frame.events[i])));
  }

  answer(a) {
    const frame = this.sent[a.seq];
    if (!frame || frame.indexes?.[a.index] === undefined) return;
    const i = frame.indexes[a.index];
    if (frame.results[i] !== null) return;
    if (a.error) {
      const err = new SluiceError(a.error.code, a.error.message, { retryAfterMs: a.retry_after_ms ?? null });
      if (err.retryable && frame.tries < this.retry.maxRetries) {
        // Sent again, alone with the frame's other retryable events, after the asked wait.
        frame.retryLater = frame.retryLater ?? [];
        frame.retryLater.push(err.retryAfterMs ?? 0);
        frame.openRetries = (frame.openRetries ?? 0) + 1;
      } else {
        frame.results[i] = { error: err };
      }
    } else {
      const { seq, index, ...result } = a;
      frame.results[i] = result;
    }
    frame.open--;
    if (frame.open === 0) {
      if (frame.openRetries) {
        const wait = Math.max(...frame.retryLater);
        frame.tries++;
        frame.open = frame.openRetries;
        frame.openRetries = 0;
        frame.retryLater = [];
        setTimeout(() => {
          if (this.socket?.readyState === 1) this.write(frame);
          else this.backlog.push(frame);
        }, delayFor(frame.tries, wait || null, this.retry));
      } else {
        frame.done();
      }
    }
  }

  /** Closes the socket; frames not answered fail. */
  close() {
    this.closing = true;
    this.socket?.close(1000);
  }
}

/** An offline queue in memory (Node.js, tests): lost with the process. */
export class MemoryQueue {
  constructor() {
    this.items = new Map();
    this.next = 1;
  }
  async push(item) {
    this.items.set(this.next++, item);
  }
  async peek(n) {
    return [...this.items].slice(0, n).map(([key, item]) => ({ key, item }));
  }
  async remove(keys) {
    for (const k of keys) this.items.delete(k);
  }
  async size() {
    return this.items.size;
  }
}

/**
 * An offline queue in IndexedDB (browsers): events survive reloads and stay until the gateway
 * answered them. Use one with `client.enqueue(...)`, and call `client.flushQueue()` when the
 * page starts and when it comes back `online`.
 */
export class IndexedDbQueue {
  constructor(name = "sluice-queue", indexedDB = globalThis.indexedDB) {
    this.name = name;
    this.idb = indexedDB;
    this.db = null;
  }

  open() {
    if (this.db) return Promise.resolve(this.db);
    return new Promise((resolve, reject) => {
      const req = this.idb.open(this.name, 1);
      req.onupgradeneeded = () => req.result.createObjectStore("events", { autoIncrement: true });
      req.onsuccess = () => resolve((this.db = req.result));
      req.onerror = () => reject(req.error);
    });
  }

  async tx(mode, work) {
    const db = await this.open();
    return new Promise((resolve, reject) => {
      const t = db.transaction("events", mode);
      const out = work(t.objectStore("events"));
      t.oncomplete = () => resolve(out.result ?? out.value);
      t.onerror = () => reject(t.error);
    });
  }

  push(item) {
    return this.tx("readwrite", (s) => s.add(item));
  }

  peek(n) {
    const acc = { value: [] };
    return this.tx("readonly", (s) => {
      s.openCursor().onsuccess = (e) => {
        const c = e.target.result;
        if (c && acc.value.length < n) {
          acc.value.push({ key: c.key, item: c.value });
          c.continue();
        }
      };
      return acc;
    });
  }

  remove(keys) {
    return this.tx("readwrite", (s) => {
      for (const k of keys) s.delete(k);
      return { value: undefined };
    });
  }

  size() {
    return this.tx("readonly", (s) => s.count());
  }
}
