// @sluice/client under Node.js against a real gateway (started by the repository's e2e test
// `clients::js_client_under_node`, which passes its address and checks the log afterwards).
//   SLUICE_HTTP=127.0.0.1:PORT SLUICE_KEY=id.secret node --experimental-websocket --test test/
// Streams the gateway must have: `js` (dedup on), `limited` (2 events/s, burst 2).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  Batcher,
  MemoryQueue,
  SluiceClient,
  SluiceError,
  SluiceWebSocket,
} from "../src/index.js";

const addr = process.env.SLUICE_HTTP;
const key = process.env.SLUICE_KEY;
if (!addr || !key) throw new Error("SLUICE_HTTP and SLUICE_KEY must be set");
const url = `http://${addr}`;

/** A fetch that records every request body and fails the first `fail` calls. */
function recording(fail = 0) {
  const bodies = [];
  let calls = 0;
  const f = async (u, init) => {
    calls++;
    bodies.push(JSON.parse(init.body));
    if (calls <= fail) throw new TypeError("fetch failed (simulated)");
    return fetch(u, init);
  };
  return { fetch: f, bodies, calls: () => calls };
}

test("publish answers per event, in order, with ids fixed before the first attempt", async () => {
  const c = new SluiceClient({ url, apiKey: key });
  const results = await c.publish("js", [
    { value: { n: 1 }, key: "a" },
    { value: "two", id: "js-fixed-2", timestamp: new Date("2026-01-02T03:04:05.678Z") },
    { value: [3], partition: 0 },
  ]);
  assert.equal(results.length, 3);
  for (const r of results) {
    assert.equal(typeof r.offset, "number", JSON.stringify(r));
    assert.equal(r.error, undefined);
  }
});

test("a request whose answer was lost is retried with the same ids and deduplicated", async () => {
  const r = recording(0);
  const c = new SluiceClient({ url, apiKey: key, fetch: r.fetch });
  const first = await c.publish("js", [{ value: "lost-1" }, { value: "lost-2" }]);
  // The same events sent again (the ids are in the bodies): the gateway recognises them.
  const again = await c.publish("js", r.bodies[0]);
  assert.deepEqual(
    again.map((a) => [a.partition, a.offset, a.duplicate]),
    first.map((a) => [a.partition, a.offset, true]),
  );
});

test("network failures are retried with backoff and the same ids", async () => {
  const r = recording(2);
  const c = new SluiceClient({ url, apiKey: key, fetch: r.fetch, baseDelayMs: 10 });
  const results = await c.publish("js", [{ value: "after-network-trouble" }]);
  assert.equal(r.calls(), 3);
  assert.equal(typeof results[0].offset, "number");
  const ids = r.bodies.map((b) => b[0].id);
  assert.equal(new Set(ids).size, 1, `one id across attempts: ${ids}`);
});

test("over-quota events wait for what Retry-After / retry_after_ms say, then go through", async () => {
  const c = new SluiceClient({ url, apiKey: key, maxRetries: 20 });
  const started = Date.now();
  const results = await c.publish(
    "limited",
    Array.from({ length: 6 }, (_, i) => ({ value: i })),
  );
  const took = Date.now() - started;
  assert.ok(results.every((r) => typeof r.offset === "number"), JSON.stringify(results));
  // 2 events/s after a burst of 2: the last of 6 cannot be in before ~2 s.
  assert.ok(took >= 1500, `took ${took} ms`);
  assert.ok(took < 15000, `took ${took} ms`);
});

test("failures that a retry cannot fix are answered, not retried", async () => {
  const r = recording(0);
  const c = new SluiceClient({ url, apiKey: key, fetch: r.fetch });
  const results = await c.publish("js", [
    { value: 1, partition: 99 },
    { value: 2 },
  ]);
  assert.ok(results[0].error instanceof SluiceError);
  assert.equal(results[0].error.code, "malformed");
  assert.equal(results[0].error.retryable, false);
  assert.equal(typeof results[1].offset, "number");
  assert.equal(r.calls(), 1);
  const bad = new SluiceClient({ url, apiKey: "nobody.wrong" });
  await assert.rejects(bad.publish("js", [{ value: 1 }]), (e) => e.status === 401 && !e.retryable);
});

test("the batcher sends in batches and answers each event", async () => {
  const r = recording(0);
  const c = new SluiceClient({ url, apiKey: key, fetch: r.fetch });
  const b = c.batcher("js", { maxEvents: 100, lingerMs: 50 });
  assert.ok(b instanceof Batcher);
  const all = await Promise.all(Array.from({ length: 250 }, (_, i) => b.send({ value: { batched: i } })));
  assert.equal(all.length, 250);
  assert.ok(all.every((x) => typeof x.offset === "number"));
  assert.equal(r.calls(), 3, "100 + 100 + 50");
});

test("the offline queue keeps events until the gateway answered them", async () => {
  const queue = new MemoryQueue();
  const down = new SluiceClient({ url: "http://127.0.0.1:9", apiKey: key, queue, maxRetries: 1, baseDelayMs: 5 });
  await down.enqueue("js", { value: "queued-1" });
  await down.enqueue("js", { value: "queued-2" });
  assert.equal(await queue.size(), 2);
  const up = new SluiceClient({ url, apiKey: key, queue });
  assert.equal(await up.flushQueue(), 2);
  assert.equal(await queue.size(), 0);
});

test("WebSocket: acks per event, reconnects, resends what was not answered", async () => {
  const ws = new SluiceWebSocket({ url, stream: "js", token: key, baseDelayMs: 20 });
  const states = [];
  ws.onstatechange = (s) => states.push(s);
  await ws.connect();
  const one = await ws.send({ value: "ws-1", id: "js-ws-1" });
  assert.equal(typeof one.offset, "number");
  assert.equal(one.id, "js-ws-1");
  const many = await ws.send([{ value: "ws-2" }, { value: "ws-3", partition: 42 }]);
  assert.equal(typeof many[0].offset, "number");
  assert.equal(many[1].error.code, "malformed");
  // The socket drops; what is sent meanwhile goes once it is back.
  ws.socket.close();
  const later = ws.send({ value: "ws-after-reconnect" });
  const r = await later;
  assert.equal(typeof r.offset, "number");
  assert.ok(states.filter((s) => s === "connected").length >= 2, states.join(","));
  ws.close();
});
