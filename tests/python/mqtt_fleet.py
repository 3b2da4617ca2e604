"""Sluice's MQTT listener driven by paho-mqtt (the MQTT library of most Python devices and
bridges; installed by scripts/install-deps.sh), as tests/tests/e2e/mqtt_fleet.rs runs it:

  mqtt_fleet.py fleet PORT       retained publishes and a retained will (3.1.1), a subscribe
                                 right after CONNECT, MQTT 5 session expiry; prints a JSON
                                 report of what the device saw
  mqtt_fleet.py crash PORT N     one MQTT 5 device with a persistent session publishing N
                                 messages (QoS 1 and 2 alternating) through the gateway's
                                 SIGKILL and restart on the same port; prints the payloads
                                 whose PUBACK/PUBCOMP arrived, as JSON
"""

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST = "127.0.0.1"
V2 = mqtt.CallbackAPIVersion.VERSION2


def wait(cond, seconds, what):
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def connect(client, port, **kw):
    """Connects and waits for CONNACK; returns (reason code, session present)."""
    got = {}
    done = threading.Event()

    def on_connect(c, u, flags, rc, props=None):
        got["rc"] = rc.value if hasattr(rc, "value") else rc
        got["present"] = bool(flags.session_present)
        done.set()

    client.on_connect = on_connect
    client.connect(HOST, port, keepalive=30, **kw)
    client.loop_start()
    if not done.wait(10):
        raise SystemExit("no CONNACK")
    return got["rc"], got["present"]


def session5(port, client_id, expiry):
    c = mqtt.Client(V2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    rc, present = connect(c, port, clean_start=False, properties=props)
    c.disconnect()
    c.loop_stop()
    return rc, present


def fleet(port):
    report = {}
    # 3.1.1: a retained will and a retained "online", as firmware does at boot; then the
    # connection drops without DISCONNECT and the will is published.
    dev = mqtt.Client(V2, client_id="py-dev", protocol=mqtt.MQTTv311)
    dev.will_set("status/py-dev", "offline", qos=1, retain=True)
    rc, _ = connect(dev, port)
    report["connack"] = rc
    # A subscribe to a command topic right after CONNECT (what many devices do) is refused
    # (Sluice is publish-only) and must not stop the device from publishing.
    sub = {}
    dev.on_subscribe = lambda c, u, mid, codes, props=None: sub.setdefault(
        "codes", [x.value if hasattr(x, "value") else x for x in codes]
    )
    dev.subscribe("cmd/py-dev", qos=1)
    info = dev.publish("status/py-dev", "online", qos=1, retain=True)
    info.wait_for_publish(10)
    report["online_acked"] = info.is_published()
    wait(lambda: "codes" in sub, 10, "SUBACK")
    report["suback"] = sub["codes"]
    info = dev.publish("telemetry/py-dev", "after-subscribe", qos=1)
    info.wait_for_publish(10)
    report["after_subscribe_acked"] = info.is_published()
    dev.loop_stop()
    dev.socket().close()  # the device loses power: no DISCONNECT

    # MQTT 5 session expiry: a session of 1 s is gone after 2.5 s; one of 300 s is kept.
    report["first"] = session5(port, "py-exp", 1)
    report["kept_first"] = session5(port, "py-kept", 300)
    time.sleep(2.5)  # the session's second passes: that is what is tested
    report["after_expiry"] = session5(port, "py-exp", 300)
    report["kept_after"] = session5(port, "py-kept", 300)
    print(json.dumps(report))


def crash(port, n):
    acked = set()  # message ids whose PUBACK / PUBCOMP arrived
    lock = threading.Lock()
    c = mqtt.Client(V2, client_id="py-meter", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(20)
    c.reconnect_delay_set(min_delay=0.05, max_delay=0.5)

    def on_publish(client, userdata, mid, rc, props=None):
        # For QoS 2, PUBREC already meant durable: a PUBCOMP "packet identifier not found"
        # (0x92) after the gateway's crash is still a stored publish.
        if rc.value in (0, 0x92):
            with lock:
                acked.add(mid)

    c.on_publish = on_publish
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    rc, _ = connect(c, port, clean_start=False, properties=props)
    assert rc == 0, rc
    payloads = {}
    for i in range(n):
        payload = f"m{i}"
        # Queued while disconnected: paho sends it with the session once connected again.
        info = c.publish("meters/py-meter", payload, qos=1 + i % 2)
        payloads[info.mid] = payload
        time.sleep(0.002)

    def done():
        with lock:
            return len(acked) >= n

    wait(done, 90, f"{n} acks (have {len(acked)})")
    c.disconnect()
    c.loop_stop()
    print(json.dumps(sorted(payloads[m] for m in acked)))


if __name__ == "__main__":
    if sys.argv[1] == "fleet":
        fleet(int(sys.argv[2]))
    else:
        crash(int(sys.argv[2]), int(sys.argv[3]))
