/*
 * ssehub.js: a dependency-free browser client for ssehub (an ES module; served by the hub
 * at /ssehub.js).
 *
 *   import { SSEHubClient } from "/ssehub.js";
 *   const client = new SSEHubClient("/", { topics: ["orders", "prices"] });
 *   client.on("message", (msg) => console.log(msg.id, msg.event, msg.json()));
 *   client.on("reset", (reset) => reloadSnapshot(reset.reason));
 *   client.close();
 *
 * The contract it follows (docs/browser.md has the details):
 * - Event ids are decimal integer strings, increasing across the whole hub. The client keeps
 *   the last one it saw (an `id:` line without data moves it too) and resumes with it: the
 *   `Last-Event-ID` header on a stream, `last_event_id` on a poll. An event whose id is not
 *   greater than the last one is dropped, so nothing is delivered twice.
 * - `event: reset` (the hub cannot replay from the resume point: trimmed, unknown, malformed)
 *   goes to the "reset" handlers, never to "message": reload your state; the stream goes on
 *   live from the reset's id.
 * - Answers: 200 stream = live; 401, 403 and other 4xx = stop for good ("error" with
 *   fatal: true, then "close"); 204 = stop ("close"); 429/503 = retry after Retry-After;
 *   `event: disconnect` / `event: overloaded` / a stream the server ends = reconnect after
 *   the `retry:` hint; network errors = retry after the `retry:` hint with a capped
 *   exponential back-off, jittered.
 * - Transports: "sse" (fetch + a ReadableStream reader, so it can send headers such as
 *   Authorization), "poll" (GET /poll long-polling), "auto" (the default: "sse" where the
 *   browser can stream a fetch body, else "poll").
 */

const LIFECYCLE = new Set(["open", "error", "close", "reconnect", "reset"]);
const CONTROL = new Set(["disconnect", "overloaded"]);
const DEFAULT_RETRY_MS = 3000;
const MIN_DELAY_MS = 50;
const MAX_BACKOFF_MS = 30000;
const MAX_RETRY_AFTER_MS = 300000;
const DECIMAL = /^[0-9]+$/;

/** True when `id` comes after `last` (decimal ids compared as BigInt; anything else passes). */
export function isNewer(id, last) {
  if (!DECIMAL.test(id) || !DECIMAL.test(last)) return true;
  return BigInt(id) > BigInt(last);
}

/** A delivered event: `data` is the raw string; `json()` parses it. */
export class HubEvent {
  constructor(id, event, data, topic) {
    this.id = id;
    this.event = event;
    this.data = data;
    this.topic = topic;
  }

  json() {
    return JSON.parse(this.data);
  }
}

/**
 * A `text/event-stream` parser per the WHATWG rules. `feed()` takes bytes (or strings) in
 * chunks split anywhere; `onBlock({id, event, data})` runs for each block that had data or
 * an id (`id` is null when the block had no `id:` field, `data` null for an id-only block);
 * `onRetry(ms)` for each valid `retry:` field. Call `begin()` for each new connection.
 */
export class SSEParser {
  constructor(onBlock, onRetry = () => {}) {
    this.onBlock = onBlock;
    this.onRetry = onRetry;
    this.begin();
  }

  begin() {
    this._decoder = new TextDecoder("utf-8", { ignoreBOM: true });
    this._line = "";
    this._atStart = true;
    this._afterCR = false;
    this._data = "";
    this._type = "";
    this._id = null;
  }

  feed(chunk) {
    let text = typeof chunk === "string" ? chunk : this._decoder.decode(chunk, { stream: true });
    if (this._atStart && text) {
      this._atStart = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    let start = 0;
    if (this._afterCR && text) {
      this._afterCR = false;
      if (text.charCodeAt(0) === 10) start = 1; // the LF of a CRLF split across chunks
    }
    for (let i = start; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this._field(this._line + text.slice(start, i));
      this._line = "";
      if (c === 13) {
        if (i + 1 === text.length) this._afterCR = true;
        else if (text.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this._line += text.slice(start);
  }

  _field(line) {
    if (line === "") return this._dispatch();
    const colon = line.indexOf(":");
    if (colon === 0) return; // a comment
    let name = line;
    let value = "";
    if (colon > 0) {
      name = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
    }
    if (name === "data") this._data += value + "\n";
    else if (name === "event") this._type = value;
    else if (name === "id") {
      if (!value.includes("\0")) this._id = value;
    } else if (name === "retry" && DECIMAL.test(value)) this.onRetry(Number(value));
  }

  _dispatch() {
    const { _id: id, _data: data, _type: type } = this;
    this._id = null;
    this._data = "";
    this._type = "";
    if (data === "" && id === null) return;
    this.onBlock({ id, event: type || "message", data: data === "" ? null : data.slice(0, -1) });
  }
}

class Stop extends Error {
  constructor(info) {
    super("stopped");
    this.info = info;
  }
}

function streamingSupported() {
  return (
    typeof fetch === "function" &&
    typeof ReadableStream === "function" &&
    typeof TextDecoder === "function" &&
    typeof Response === "function" &&
    "body" in Response.prototype
  );
}

function jitter(ms) {
  return ms * (0.8 + 0.2 * Math.random());
}

/** Milliseconds to wait from a Retry-After header (delta-seconds or an HTTP date), or null. */
function retryAfterMs(header) {
  const value = (header ?? "").trim();
  if (!value) return null;
  const ms = DECIMAL.test(value) ? Number(value) * 1000 : Date.parse(value) - Date.now();
  return Number.isNaN(ms) ? null : Math.min(MAX_RETRY_AFTER_MS, Math.max(0, ms));
}

function parseJSON(text) {
  try {
    const value = JSON.parse(text);
    return value && typeof value === "object" ? value : {};
  } catch {
    return {};
  }
}

export class SSEHubClient {
  /**
   * @param {string} base the hub's root URL ("/", "https://hub.example/sse"; relative URLs
   *   resolve against the page)
   * @param {object} options topics (required), lastEventId, headers, credentials
   *   ("same-origin"), transport ("auto" | "sse" | "poll"), retry (ms before the server
   *   sends one, 3000), pollTimeout (seconds, 25), idleTimeout (ms without a byte after
   *   which a stream counts as dead; 0 = never; set it above the hub's heartbeat)
   */
  constructor(base, options = {}) {
    const given = options.topics ?? [];
    const topics = typeof given === "string" ? [given] : [...given];
    if (!topics.length) throw new TypeError("SSEHubClient: give at least one topic");
    const transport = options.transport ?? "auto";
    if (!["auto", "sse", "poll"].includes(transport)) {
      throw new TypeError(`SSEHubClient: transport must be auto, sse or poll, not ${transport}`);
    }
    if (transport === "sse" && !streamingSupported()) {
      throw new TypeError("SSEHubClient: this browser cannot stream a fetch body; use poll");
    }
    const root = String(base || ".");
    this.base = new URL(root.endsWith("/") ? root : root + "/", globalThis.location?.href).href;
    this.topics = topics;
    this.lastEventId = options.lastEventId == null ? "" : String(options.lastEventId);
    this.headers = { ...options.headers };
    this.credentials = options.credentials ?? "same-origin";
    this.transport = transport === "auto" ? (streamingSupported() ? "sse" : "poll") : transport;
    this.retryMs = options.retry ?? DEFAULT_RETRY_MS;
    this.pollTimeout = options.pollTimeout ?? 25;
    this.idleTimeout = options.idleTimeout ?? 0;
    this.readyState = "connecting"; // then "open", "connecting" again while away, "closed"
    this.connects = 0; // successful connections (a 200 stream, or the first poll of a run)
    this.dropped = 0; // events ignored because their id was not newer than the last one
    this._handlers = new Map();
    this._failures = 0;
    this._abort = null;
    this._wake = null;
    this._control = null; // the disconnect/overloaded event that ended the stream
    this._heard = false; // whether this connection carried any event or id
    this._parser = new SSEParser(
      (block) => this._block(block),
      (ms) => (this.retryMs = ms),
    );
    queueMicrotask(() => this._run());
  }

  /** Listen to "message" (or any event name), "*" (every event), "reset", "open", "error",
   * "reconnect" or "close". A server event named like a lifecycle event goes to "*" only. */
  on(name, handler) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(handler);
    return this;
  }

  off(name, handler) {
    this._handlers.get(name)?.delete(handler);
    return this;
  }

  /** Stop for good: abort the request in flight and any pending reconnect. */
  close() {
    if (this.readyState === "closed") return;
    this.readyState = "closed";
    this._abort?.abort();
    this._wake?.();
  }

  _emit(name, value) {
    const handlers = [...(this._handlers.get(name) ?? [])];
    const property = this["on" + name];
    if (typeof property === "function") handlers.push(property);
    for (const handler of handlers) {
      try {
        handler.call(this, value);
      } catch (error) {
        queueMicrotask(() => {
          throw error; // report it (window.onerror) without breaking the stream
        });
      }
    }
  }

  _deliver(event) {
    if (!LIFECYCLE.has(event.event)) this._emit(event.event, event);
    this._emit("*", event);
  }

  _reset(id, data) {
    const info = parseJSON(data);
    this.lastEventId = id;
    this._emit("reset", {
      id,
      event: "reset",
      data,
      reason: info.reason ?? "unknown",
      detail: info.detail ?? "",
      currentId: info.current_id ?? id,
      topic: info.topic ?? null,
    });
  }

  _url(path, params) {
    const url = new URL(path, this.base);
    for (const [name, value] of params) url.searchParams.append(name, value);
    return url.href;
  }

  async _run() {
    while (this.readyState !== "closed") {
      let step; // {delay, reason, more}: more = the poll goes on (no reconnect)
      try {
        step = this.transport === "poll" ? await this._poll() : await this._stream();
      } catch (error) {
        if (this.readyState === "closed") return;
        if (error instanceof Stop) return this._stop(error.info);
        this._failures += 1;
        step = { delay: this._backoff(), reason: "network" };
        const detail = String(error?.message ?? error);
        this._emit("error", { fatal: false, status: null, error, detail });
      }
      if (this.readyState === "closed") return;
      if (!step.more) {
        this.readyState = "connecting";
        const { reason, delay } = step;
        const lastEventId = this.lastEventId;
        this._emit("reconnect", { reason, delay: Math.round(delay), lastEventId });
      } else if (step.delay <= 0) continue;
      await new Promise((resolve) => {
        const wait = step.more ? step.delay : Math.max(MIN_DELAY_MS, step.delay);
        const timer = setTimeout(resolve, wait);
        this._wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this._wake = null;
    }
  }

  _stop(info) {
    this.readyState = "closed";
    this._emit("close", { ...info, lastEventId: this.lastEventId });
  }

  _backoff() {
    const factor = 2 ** Math.max(0, this._failures - 1);
    return jitter(Math.min(MAX_BACKOFF_MS, this.retryMs * factor));
  }

  async _fetch(url, headers) {
    this._abort = new AbortController();
    return fetch(url, {
      headers: { ...this.headers, ...headers },
      credentials: this.credentials,
      cache: "no-store",
      signal: this._abort.signal,
    });
  }

  /** Null for a 200; else throws Stop (204, 4xx) or returns the step to retry. */
  async _refusal(response) {
    const status = response.status;
    if (status === 200) return null;
    const text = await response.text().catch(() => "");
    if (this.readyState === "closed") throw new Stop({});
    const body = parseJSON(text);
    const detail = typeof body.detail === "string" ? body.detail : text.slice(0, 500);
    if (status === 204) throw new Stop({ status });
    if (status >= 400 && status < 500 && status !== 429) {
      this._emit("error", { fatal: true, status, error: body.error ?? null, detail });
      throw new Stop({ status });
    }
    this._failures += 1;
    const delay = retryAfterMs(response.headers.get("Retry-After")) ?? this._backoff();
    this._emit("error", { fatal: false, status, error: body.error ?? null, detail });
    return { delay, reason: `status ${status}` };
  }

  _opened() {
    this.connects += 1;
    this.readyState = "open";
    this._emit("open", {
      transport: this.transport,
      reconnect: this.connects > 1,
      lastEventId: this.lastEventId,
    });
  }

  async _stream() {
    const headers = { Accept: "text/event-stream" };
    if (this.lastEventId) headers["Last-Event-ID"] = this.lastEventId;
    const url = this._url("events", this.topics.map((t) => ["topic", t]));
    const response = await this._fetch(url, headers);
    const refused = await this._refusal(response);
    if (refused) return refused;
    if (!response.body) {
      this.transport = "poll"; // a browser that cannot stream this body
      return { delay: 0, reason: "no streaming body" };
    }
    const type = response.headers.get("Content-Type") ?? "";
    if (!type.toLowerCase().startsWith("text/event-stream")) {
      await response.body.cancel();
      throw new TypeError(`expected text/event-stream, got ${type || "no Content-Type"}`);
    }
    this._opened();
    this._control = null;
    this._heard = false;
    this._parser.begin();
    const reader = response.body.getReader();
    const abort = this._abort;
    let idle = 0;
    try {
      for (;;) {
        // A connection that went silent (a dead proxy or NAT entry) is dropped after
        // idleTimeout ms without a byte; the hub's heartbeats keep a live one talking.
        if (this.idleTimeout > 0) idle = setTimeout(() => abort.abort("idle"), this.idleTimeout);
        const { done, value } = await reader.read();
        clearTimeout(idle);
        if (done) break;
        this._parser.feed(value);
        if (this.readyState === "closed") return { delay: 0, reason: "closed" };
      }
    } catch (error) {
      clearTimeout(idle);
      if (this._heard) this._failures = 0; // it worked for a while, then dropped
      if (abort.signal.reason === "idle" && this.readyState !== "closed") {
        throw new Error(`no data for ${this.idleTimeout} ms`);
      }
      throw error;
    }
    // The server ended the stream: come back after its retry: hint (jittered).
    if (this._heard) this._failures = 0;
    else this._failures += 1;
    const control = this._control;
    const reason = control ? [control.event, control.reason].filter(Boolean).join(": ") : "ended";
    return { delay: this._failures ? this._backoff() : jitter(this.retryMs), reason };
  }

  _block({ id, event, data }) {
    if (this.readyState === "closed") return;
    this._heard = true;
    if (data !== null && CONTROL.has(event)) {
      this._control = { event, ...parseJSON(data) };
      return;
    }
    if (data !== null && event === "reset") return this._reset(id ?? this.lastEventId, data);
    if (id !== null) {
      if (id !== "" && !isNewer(id, this.lastEventId)) {
        if (data !== null) this.dropped += 1;
        return;
      }
      this.lastEventId = id;
    }
    if (data === null) return; // an id-only block just moves the resume point
    // The wire carries no topic; with one topic subscribed it can only be that one.
    const topic = this.topics.length === 1 ? this.topics[0] : undefined;
    this._deliver(new HubEvent(this.lastEventId, event, data, topic));
  }

  async _poll() {
    // The first poll of a connection answers at once (timeout 0): it tells "open" and the
    // position; then each poll holds until something arrives or pollTimeout.
    const timeout = this.readyState === "open" ? this.pollTimeout : 0;
    const params = this.topics.map((t) => ["topic", t]);
    params.push(["timeout", String(timeout)]);
    if (this.lastEventId) params.push(["last_event_id", this.lastEventId]);
    const started = Date.now();
    const response = await this._fetch(this._url("poll", params), { Accept: "application/json" });
    const refused = await this._refusal(response);
    if (refused) return refused;
    const body = await response.json();
    this._failures = 0;
    if (this.readyState !== "open") this._opened();
    for (const item of body.events) {
      if (this.readyState === "closed") break;
      if (item.event === "reset" && item.topic == null) {
        this._reset(String(item.id), item.data);
      } else if (isNewer(String(item.id), this.lastEventId)) {
        this.lastEventId = String(item.id);
        const type = item.event || "message";
        this._deliver(new HubEvent(this.lastEventId, type, item.data, item.topic));
      } else {
        this.dropped += 1;
      }
    }
    const position = String(body.last_event_id ?? "");
    if (position && isNewer(position, this.lastEventId)) this.lastEventId = position;
    // Poll again at once; an empty answer that came back early waits a little (no hot loop).
    const early = timeout > 0 && !body.events.length ? 1000 - (Date.now() - started) : 0;
    return { delay: early, reason: "poll", more: true };
  }
}

export default SSEHubClient;
