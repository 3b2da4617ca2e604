"""Publish events to a Sluice gateway over HTTP (docs/http.md), with the standard library only.

The retry contract is the JavaScript client's (clients/js): every event gets an id when it has
none (a random UUID), fixed before the first attempt, so a retry of an event whose answer was
lost is recognised on streams with ``dedup = true`` and answered ``duplicate`` instead of stored
twice. Only retryable failures are retried (network errors, 429, 503, and per-event errors that
carry ``retry_after_ms``), after the time the gateway asked for (``Retry-After`` /
``retry_after_ms``) or else an exponential backoff with jitter, up to ``max_retries`` times.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional

__all__ = ["Client", "SluiceError", "new_event_id"]
__version__ = "0.1.0"

RETRYABLE_CODES = {"network", "unavailable", "over_quota"}


class SluiceError(Exception):
    """A failure the gateway (or the network) reported."""

    def __init__(self, code: str, message: str, status: int = 0, retry_after_ms: Optional[int] = None):
        super().__init__(f"{code}: {message}")
        #: Sluice's stable code: malformed, unauthenticated, over_quota, unavailable, network, ...
        self.code = code
        self.message = message
        #: The HTTP status; 0 for network errors.
        self.status = status
        #: How long the gateway asked to wait before a retry, if it did.
        self.retry_after_ms = retry_after_ms

    @property
    def retryable(self) -> bool:
        return (
            self.code in RETRYABLE_CODES
            or self.status in (429, 503)
            or self.retry_after_ms is not None
        )


def new_event_id() -> str:
    """A new event id (a random UUID)."""
    return str(uuid.uuid4())


def _envelope(e: Dict[str, Any]) -> Dict[str, Any]:
    if not isinstance(e, dict) or "value" not in e:
        raise TypeError("an event is a dict with 'value' (and optionally key, id, headers, timestamp, partition)")
    out = {"value": e["value"], "id": e.get("id") or new_event_id()}
    for k in ("key", "headers", "timestamp", "partition"):
        if e.get(k) is not None:
            v = e[k]
            if isinstance(v, _dt.datetime):
                if v.tzinfo is None:
                    raise ValueError("timestamp datetimes must be timezone-aware")
                v = v.isoformat()
            out[k] = v
    return out


class Client:
    """A client of Sluice's HTTP API.

    >>> c = Client("http://127.0.0.1:8080", api_key="id.secret")
    >>> c.publish("orders", [{"value": {"order": 17}, "key": "customer-42"}])
    [{'partition': 0, 'offset': 0}]
    """

    def __init__(
        self,
        url: str,
        api_key: Optional[str] = None,
        token: Optional[str] = None,
        max_retries: int = 5,
        base_delay: float = 0.1,
        max_delay: float = 10.0,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        opener: Optional[Callable[..., Any]] = None,
    ):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.token = token
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self._sleep = sleep
        self._open = opener or urllib.request.urlopen

    def _delay(self, attempt: int, retry_after_ms: Optional[int]) -> float:
        if retry_after_ms is not None:
            return min(retry_after_ms / 1000.0, self.max_delay)
        exp = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return exp / 2 + random.random() * exp / 2

    def _post(self, stream: str, events: List[Dict[str, Any]], idempotency_key: Optional[str]) -> List[Dict[str, Any]]:
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if idempotency_key:
            headers["idempotency-key"] = idempotency_key
        req = urllib.request.Request(
            f"{self.url}/v1/streams/{urllib.parse.quote(stream, safe='')}/events",
            data=json.dumps(events).encode(),
            headers=headers,
            method="POST",
        )
        try:
            with self._open(req, timeout=self.timeout) as resp:
                body = json.loads(resp.read() or b"null")
                return body["results"]
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read() or b"null").get("error", {})
            except (ValueError, AttributeError):
                err = {}
            retry_after = err.get("retry_after_ms")
            if retry_after is None and e.headers.get("retry-after", "").isdigit():
                retry_after = int(e.headers["retry-after"]) * 1000
            raise SluiceError(
                err.get("code", f"http_{e.code}"),
                err.get("message", f"HTTP {e.code}"),
                status=e.code,
                retry_after_ms=retry_after,
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise SluiceError("network", f"the gateway could not be reached: {e}") from None

    def publish(
        self,
        stream: str,
        events: Iterable[Dict[str, Any]],
        idempotency_key: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """Publishes ``events`` to ``stream`` and answers per event, in order:
        ``{"partition", "offset"}`` (``"status": "received" | "spooled"`` where the stream acks
        before the offset is known, ``"duplicate": True`` for a retry the gateway recognised), or
        ``{"error": SluiceError}`` for an event that failed for good. Retryable failures are
        retried; a failure of the whole request that is not (401, 403, 413, ...) is raised."""
        all_events = [_envelope(e) for e in events]
        results: List[Optional[Dict[str, Any]]] = [None] * len(all_events)
        pending = list(range(len(all_events)))
        attempt = 0
        while True:
            try:
                answers = self._post(stream, [all_events[i] for i in pending], idempotency_key)
            except SluiceError as e:
                if not e.retryable or attempt >= self.max_retries:
                    raise
                attempt += 1
                self._sleep(self._delay(attempt, e.retry_after_ms))
                continue
            again = []
            wait: Optional[int] = None
            for i, a in zip(pending, answers):
                if "error" not in a:
                    results[i] = a
                    continue
                err = SluiceError(a["error"]["code"], a["error"]["message"],
                                  retry_after_ms=a["error"].get("retry_after_ms"))
                if err.retryable and attempt < self.max_retries:
                    again.append(i)
                    wait = max(wait or 0, err.retry_after_ms or 0)
                else:
                    results[i] = {"error": err}
            if not again:
                return results  # type: ignore[return-value]
            pending = again
            attempt += 1
            self._sleep(self._delay(attempt, wait or None))
