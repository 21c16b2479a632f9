"""The background worker: runs timed jobs and delivers queued webhook events.

Deliveries are attempted oldest first (or shuffled, N at once, delayed and duplicated when the
delivery settings say so). A failed one is retried on its own backoff schedule without holding
back later events, as Stripe does, so handlers must not rely on ordering.
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from . import billing
from .config import MAX_CONCURRENCY, DeliveryConfig, LiveDelivery, Settings
from .store import Store

log = logging.getLogger("sandbox.webhooks")

MAX_BACKOFF_SECONDS = 60.0
TIMEOUT_SECONDS = 10.0


def signature_header(payload: str, secret: str, timestamp: int) -> str:
    """Stripe-Signature with one secret."""
    return signature_header_for(payload, (secret,), timestamp)


def _describe(exc: requests.RequestException) -> str:
    """A short reason for a failed attempt; requests' own messages run to several lines."""
    if isinstance(exc, requests.Timeout):
        return f"timed out after {TIMEOUT_SECONDS:g}s"
    if isinstance(exc, requests.ConnectionError):
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
        return f"connection failed: {errno.group(0) if errno else type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"[:200]


def signature_header_for(payload: str, secrets: tuple[str, ...] | list[str], timestamp: int) -> str:
    """Stripe-Signature: t=<timestamp>, then one v1 signature per secret (as Stripe signs while an
    endpoint's secret is being rolled), each the HMAC-SHA256 of "<t>.<body>" keyed with the
    whole secret string."""
    signed = f"{timestamp}.{payload}".encode()
    signatures = [f"v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}" for secret in secrets]
    return ",".join([f"t={timestamp}", *signatures])


def render_payload(event: dict[str, Any], api_version: str) -> str:
    """The exact body delivered for an event, rendered for the configured API version. A v2 event is
    delivered thin (unversioned, without its data: the receiver reads it back from /v2/core/events)."""
    if event.get("object") == "v2.core.event":
        return json.dumps({k: v for k, v in event.items() if k not in ("data", "pending_webhooks")}, indent=2)
    return json.dumps({**event, "api_version": api_version}, indent=2)


class Worker:
    """Runs timed jobs and, in push mode, hands due deliveries to a small thread pool: up to
    `concurrency` at once, oldest first (or shuffled), each first attempt `delay_seconds` after
    the event, with an occasional duplicate. The settings are read afresh for every delivery."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        poll_seconds: float = 0.2,
        delivery: LiveDelivery | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._delivery = delivery or LiveDelivery(settings.delivery)
        self._poll = poll_seconds
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENCY, thread_name_prefix="sandbox-webhook")
        self._thread = threading.Thread(target=self._run, name="sandbox-worker", daemon=True)

    def start(self) -> None:
        self._store.release_claimed_deliveries()
        self._thread.start()

    def stop(self, *, wait_for_deliveries: bool = True) -> None:
        """Stop claiming work. With wait_for_deliveries=False a delivery still in flight is abandoned:
        its row stays claimed and the next start releases it (release_claimed_deliveries), so it is
        sent again rather than lost."""
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        self._pool.shutdown(wait=wait_for_deliveries, cancel_futures=not wait_for_deliveries)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._run_due_jobs()
                self._dispatch()
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

    def _dispatch(self) -> None:
        """Claim due deliveries until `concurrency` are in flight or none is due."""
        while not self._stopping.is_set():
            config = self._delivery.get()
            if config.mode != "push":
                return
            with self._lock:
                if self._in_flight >= config.concurrency:
                    return
            delivery = self._store.claim_due_delivery(time.time(), config.delay_seconds, config.reorder)
            if delivery is None:
                return
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._deliver, delivery, config)

    def _deliver(self, delivery: sqlite3.Row, config: DeliveryConfig) -> None:
        try:
            event = self._store.get(delivery["event_id"])
            assert event is not None
            delivered = self._attempt(delivery, event, config)
            if delivered and config.duplicates_now():
                self._send(event, config, duplicate=True)
        except Exception:
            log.exception("delivery of %s failed unexpectedly; requeued", delivery["event_id"])
            self._store.release_claimed_deliveries(delivery["seq"])
        finally:
            with self._lock:
                self._in_flight -= 1
            self._wake.set()

    def _send(self, event: dict[str, Any], config: DeliveryConfig, *, duplicate: bool) -> tuple[int | None, str | None]:
        """POST the event once; returns (status, error) with error None for a 2xx."""
        payload = render_payload(event, config.api_version)
        started = time.time()
        status: int | None = None
        error: str | None = None
        try:
            response = requests.post(
                config.webhook_url,
                data=payload.encode("utf-8"),
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "Stripe-Signature": signature_header_for(payload, config.secrets, int(time.time())),
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
        finished = time.time()
        self._store.record_send(
            event["id"],
            via="push",
            duplicate=duplicate,
            started_at=started,
            finished_at=finished,
            status=status,
            error=error,
        )
        if duplicate:
            log.info(
                "webhook %s %s duplicate -> %s in %.0f ms",
                event["id"],
                event["type"],
                status if error is None else error,
                (finished - started) * 1000,
            )
        return status, error

    def _attempt(self, delivery: sqlite3.Row, event: dict[str, Any], config: DeliveryConfig) -> bool:
        settings = self._settings
        attempt = delivery["attempts"] + 1
        started = time.monotonic()
        status, error = self._send(event, config, duplicate=False)
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
        return error is None
