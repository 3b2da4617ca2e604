// Sluice WebSocket example: connect, send typed events, show acks and nacks.
// Protocol: docs/websocket.md. URL parameters prefill the form (gateway, stream, token) and
// `connect=1` connects on load, which the repository's browser test uses.
"use strict";

const $ = (id) => document.getElementById(id);
let socket = null;
let nextId = 1;

function show(line, cls) {
  const div = document.createElement("div");
  div.textContent = line;
  if (cls) div.className = cls;
  $("log").appendChild(div);
}

function connect() {
  if (socket) socket.close();
  const url = `${$("gateway").value.replace(/\/$/, "")}/v1/streams/${encodeURIComponent($("stream").value)}/ws`;
  // Browsers cannot set an Authorization header on a WebSocket: the token travels as a
  // subprotocol next to `sluice.v1`, and the server answers with `sluice.v1` only.
  const token = $("token").value.trim();
  const protocols = token ? ["sluice.v1", `bearer.${token}`] : ["sluice.v1"];
  socket = new WebSocket(url, protocols);
  $("state").textContent = "connecting";
  socket.onopen = () => {
    $("state").textContent = "connected";
    $("send").disabled = false;
  };
  socket.onmessage = (msg) => {
    const a = JSON.parse(msg.data);
    if (a.error) {
      const retry = a.retry_after_ms ? ` (retry in ${a.retry_after_ms} ms)` : "";
      show(`nack ${a.id}: ${a.error.code}: ${a.error.message}${retry}`, "nack");
    } else {
      show(`ack ${a.id}: partition ${a.partition} offset ${a.offset}`, "ack");
    }
  };
  socket.onclose = (e) => {
    $("state").textContent = `closed (${e.code}${e.reason ? ": " + e.reason : ""})`;
    $("send").disabled = true;
  };
}

function send() {
  const text = $("event").value;
  let value;
  try { value = JSON.parse(text); } catch { value = text; }   // any text is a JSON string then
  const event = { id: `browser-${nextId++}`, value };
  const key = $("key").value.trim();
  if (key) event.key = key;
  socket.send(JSON.stringify(event));
}

$("connect").onclick = connect;
$("send").onclick = send;

const params = new URLSearchParams(location.search);
for (const name of ["gateway", "stream", "token"]) {
  if (params.has(name)) $(name).value = params.get(name);
}
if (params.get("connect") === "1") connect();
