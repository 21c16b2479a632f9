"""The background worker: runs timed jobs and delivers queued webhook events.

Deliveries are attempted oldest first. A failed one is retried on its own backoff schedule
without holding back later events, as Stripe does, so handlers must not rely on ordering.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import sqlite3
import threading
import time

import requests

from . import billing
from .config import Settings
from .store import Store

log = logging.getLogger("sandbox.webhooks")

MAX_BACKOFF_SECONDS = 60.0
TIMEOUT_SECONDS = 10.0


def signature_header(payload: str, secret: str, timestamp: int) -> str:
    """Stripe-Signature: HMAC-SHA256 of "<t>.<body>", keyed with the whole secret string."""
    digest = hmac.new(secret.encode(), f"{timestamp}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _describe(exc: requests.RequestException) -> str:
    """A short reason for a failed attempt; requests' own messages run to several lines."""
    if isinstance(exc, requests.Timeout):
        return f"timed out after {TIMEOUT_SECONDS:g}s"
    if isinstance(exc, requests.ConnectionError):
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
        return f"connection failed: {errno.group(0) if errno else type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"[:200]


class Worker:
    def __init__(self, store: Store, settings: Settings, poll_seconds: float = 0.2) -> None:
        self._store = store
        self._settings = settings
        self._poll = poll_seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandbox-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._poll):
            try:
                self._run_due_jobs()
                while not self._stopping.is_set() and self._deliver_next():
                    pass
            except Exception:  # keep the worker alive whatever one iteration hit
                log.exception("worker iteration failed")

    def _run_due_jobs(self) -> None:
        for job in self._store.due_jobs(time.time()):
            try:
                with self._store.transaction():
                    billing.run_job(self._store, job["kind"], job["ref"], int(time.time()))
                    self._store.delete_job(job["id"])
            except Exception:
                # A job that fails would fail again: report it once and drop it.
                log.exception("job %s %s failed; dropped", job["kind"], job["ref"])
                with self._store.transaction():
                    self._store.delete_job(job["id"])

    def _deliver_next(self) -> bool:
        delivery = self._store.next_due_delivery(time.time())
        if delivery is None:
            return False
        event = self._store.get(delivery["event_id"])
        assert event is not None
        self._attempt(delivery, event)
        return True

    def _attempt(self, delivery: sqlite3.Row, event: dict[str, object]) -> None:
        settings = self._settings
        payload = json.dumps(event, indent=2)
        attempt = delivery["attempts"] + 1
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            response = requests.post(
                settings.webhook_url,
                data=payload.encode("utf-8"),
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "Stripe-Signature": signature_header(payload, settings.webhook_secret, int(time.time())),
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                },
                timeout=TIMEOUT_SECONDS,
                allow_redirects=False,
            )
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except requests.RequestException as exc:
            error = _describe(exc)
        elapsed_ms = (time.monotonic() - started) * 1000

        now = time.time()
        backoff = min(settings.retry_base * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
        if error is None:
            state, outcome = "delivered", "delivered"
        elif attempt >= settings.max_attempts:
            state, outcome = "failed", "giving up"
        else:
            state, outcome = "pending", f"retrying in {backoff:g}s"
        with self._store.transaction():
            self._store.record_attempt(
                delivery["seq"],
                state=state,
                next_attempt_at=now + backoff,
                status=status,
                error=error,
                delivered_at=now if state == "delivered" else None,
            )
            if state != "pending":
                self._store.put({**event, "pending_webhooks": 0})
        log.info(
            "webhook %s %s attempt %d/%d -> %s in %.0f ms, %s",
            event["id"],
            event["type"],
            attempt,
            settings.max_attempts,
            status if error is None else error,
            elapsed_ms,
            outcome,
        )
