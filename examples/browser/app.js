// Sluice WebSocket example: connect, send typed events, show acks and nacks, with the
// repository's JavaScript client (clients/js: reconnects, retries retryable nacks, stable ids).
// Protocol: docs/websocket.md. URL parameters prefill the form (gateway, stream, token) and
// `connect=1` connects on load, which the repository's browser test uses. Serve the repository
// root (e.g. `python3 -m http.server` in it) and open /examples/browser/index.html, so the
// import below resolves; in your own page, import "@sluice/client" instead.
import { SluiceWebSocket } from "../../clients/js/src/index.js";

const $ = (id) => document.getElementById(id);
let socket = null;
let nextId = 1;

function show(line, cls) {
  const div = document.createElement("div");
  div.textContent = line;
  if (cls) div.className = cls;
  $("log").appendChild(div);
}

async function connect() {
  if (socket) socket.close();
  // Browsers cannot set an Authorization header on a WebSocket: the client sends the token
  // as a subprotocol next to `sluice.v1`, and the server answers with `sluice.v1` only.
  socket = new SluiceWebSocket({
    url: $("gateway").value,
    stream: $("stream").value,
    token: $("token").value.trim() || undefined,
  });
  socket.onstatechange = (state, detail) => {
    $("state").textContent = detail ? `${state} (${detail})` : state;
    $("send").disabled = state !== "connected";
  };
  try {
    await socket.connect();
  } catch (e) {
    show(`could not connect: ${e.message}`, "nack");
  }
}

async function send() {
  const text = $("event").value;
  let value;
  try { value = JSON.parse(text); } catch { value = text; }   // any text is a JSON string then
  const event = { id: `browser-${nextId++}`, value };
  const key = $("key").value.trim();
  if (key) event.key = key;
  const a = await socket.send(event);
  if (a.error) {
    show(`nack ${event.id}: ${a.error.code}: ${a.error.message}`, "nack");
  } else {
    show(`ack ${a.id}: partition ${a.partition} offset ${a.offset}`, "ack");
  }
}

$("connect").onclick = connect;
$("send").onclick = send;

const params = new URLSearchParams(location.search);
for (const name of ["gateway", "stream", "token"]) {
  if (params.has(name)) $(name).value = params.get(name);
}
if (params.get("connect") === "1") connect();
