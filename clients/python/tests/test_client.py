"""sluice_client against a real gateway (started by the repository's e2e test
`clients::python_client_against_the_binary`, which passes its address and checks the log).

    SLUICE_HTTP=127.0.0.1:PORT SLUICE_KEY=id.secret python3 -m unittest discover -s tests

Streams the gateway must have: `py` (dedup on), `limited` (2 events/s, burst 2).
"""

import datetime as dt
import json
import os
import sys
import time
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sluice_client import Client, SluiceError  # noqa: E402

ADDR = os.environ["SLUICE_HTTP"]
KEY = os.environ["SLUICE_KEY"]
URL = f"http://{ADDR}"


class Recording:
    """An opener that records request bodies and fails the first `fail` calls."""

    def __init__(self, fail=0):
        self.fail = fail
        self.bodies = []

    def __call__(self, req, timeout):
        self.bodies.append(json.loads(req.data))
        if len(self.bodies) <= self.fail:
            raise urllib.error.URLError("connection refused (simulated)")
        return urllib.request.urlopen(req, timeout=timeout)


class ClientTest(unittest.TestCase):
    def test_publish_answers_per_event_in_order(self):
        c = Client(URL, api_key=KEY)
        r = c.publish("py", [
            {"value": {"n": 1}, "key": "a"},
            {"value": "two", "id": "py-fixed-2",
             "timestamp": dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)},
            {"value": [3], "partition": 0},
        ])
        self.assertEqual(len(r), 3)
        for a in r:
            self.assertIsInstance(a["offset"], int, a)

    def test_a_lost_answer_is_retried_with_the_same_ids_and_deduplicated(self):
        rec = Recording()
        c = Client(URL, api_key=KEY, opener=rec)
        first = c.publish("py", [{"value": "lost-1"}, {"value": "lost-2"}])
        again = c.publish("py", rec.bodies[0])
        self.assertEqual([(a["partition"], a["offset"], a.get("duplicate")) for a in again],
                         [(a["partition"], a["offset"], True) for a in first])

    def test_network_failures_are_retried_with_the_same_ids(self):
        rec = Recording(fail=2)
        c = Client(URL, api_key=KEY, opener=rec, base_delay=0.01)
        r = c.publish("py", [{"value": "after-network-trouble"}])
        self.assertEqual(len(rec.bodies), 3)
        self.assertEqual(len({b[0]["id"] for b in rec.bodies}), 1)
        self.assertIsInstance(r[0]["offset"], int)

    def test_over_quota_waits_for_what_the_gateway_asks(self):
        waits = []

        def sleep(s):
            waits.append(s)
            time.sleep(s)

        c = Client(URL, api_key=KEY, max_retries=20, sleep=sleep)
        started = time.monotonic()
        r = c.publish("limited", [{"value": i} for i in range(6)])
        took = time.monotonic() - started
        self.assertTrue(all("offset" in a for a in r), r)
        self.assertGreaterEqual(took, 1.5)
        self.assertTrue(waits, "it waited")

    def test_what_a_retry_cannot_fix_is_answered_or_raised(self):
        rec = Recording()
        c = Client(URL, api_key=KEY, opener=rec)
        r = c.publish("py", [{"value": 1, "partition": 99}, {"value": 2}])
        self.assertIsInstance(r[0]["error"], SluiceError)
        self.assertEqual(r[0]["error"].code, "malformed")
        self.assertFalse(r[0]["error"].retryable)
        self.assertIsInstance(r[1]["offset"], int)
        self.assertEqual(len(rec.bodies), 1)
        with self.assertRaises(SluiceError) as cm:
            Client(URL, api_key="nobody.wrong").publish("py", [{"value": 1}])
        self.assertEqual(cm.exception.status, 401)
        self.assertFalse(cm.exception.retryable)
        with self.assertRaises(SluiceError) as cm:
            Client("http://127.0.0.1:9", max_retries=1, base_delay=0.01).publish("py", [{"value": 1}])
        self.assertEqual(cm.exception.code, "network")


if __name__ == "__main__":
    unittest.main()
