"""Webhook delivery as Whop does it: Standard Webhooks headers, one `v1,<base64>` signature per secret
(HMAC-SHA256 keyed with the secret's own bytes over "{id}.{timestamp}.{body}"), at least once, and only
three retries (10 s, 20 s, 40 s by default) before the delivery is given up. In `hold` mode nothing is
pushed: events wait until POST /whop/_sandbox/deliveries/take hands them out, signed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests

from .config import Settings
from .state import API_VERSION, iso, new_id

logger = logging.getLogger("sandbox.whop.webhooks")
MAX_CONCURRENT_SENDS = 8


def sign(secrets: tuple[str, ...] | list[str], msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: one `v1,<base64 HMAC-SHA256>` per secret, space-separated."""
    signed = f"{msg_id}.{timestamp}.{body}".encode()
    return " ".join(
        "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
        for secret in secrets
    )


def signed_headers(
    secrets: tuple[str, ...] | list[str], msg_id: str, body: str, timestamp: int | None = None
) -> dict[str, str]:
    moment = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(moment),
        "webhook-signature": sign(secrets, msg_id, moment, body),
    }


@dataclass
class Delivery:
    msg_id: str
    type: str
    body: str
    state: str  # pending | sending | delivered | failed | held | taken
    created: float
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.msg_id,
            "type": self.type,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "next_attempt_at": self.next_attempt_at if self.state == "pending" else None,
            "delivered_at": self.delivered_at,
            "event": json.loads(self.body),
        }


class Deliveries:
    """The outbox and the worker thread that empties it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mode = settings.delivery_mode
        self.secrets: tuple[str, ...] = settings.webhook_secrets
        self.webhook_url = settings.webhook_url
        self.retry_seconds = settings.retry_seconds
        self.items: list[Delivery] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.sends = threading.BoundedSemaphore(MAX_CONCURRENT_SENDS)
        self.thread = threading.Thread(target=self._run, name="whop-webhooks", daemon=True)

    # --- producing ------------------------------------------------------------------------------

    def emit(self, event_type: str, data: dict[str, Any], previous: dict[str, Any] | None) -> None:
        """Queue one event: Whop's envelope (id, api_version, type, timestamp, account_id, data)."""
        msg_id = new_id("msg")
        envelope: dict[str, Any] = {
            "id": msg_id,
            "api_version": API_VERSION,
            "type": event_type,
            "timestamp": iso(datetime.now(UTC)),
            "account_id": self.settings.account_id,
            "data": json.loads(json.dumps(data)),
        }
        if previous is not None:
            envelope["previous_attributes"] = previous
        body = json.dumps(envelope, separators=(",", ":"))
        with self.lock:
            state = "held" if self.mode == "hold" else "pending"
            self.items.append(Delivery(msg_id, event_type, body, state, time.time(), next_attempt_at=time.time()))
        self.wake.set()

    # --- control --------------------------------------------------------------------------------

    def configure(self, body: dict[str, Any]) -> dict[str, Any]:
        """Switch mode (push | hold), webhook URL, secrets or retry delays while running."""
        with self.lock:
            if "mode" in body:
                if body["mode"] not in ("push", "hold"):
                    raise ValueError("mode must be push or hold")
                self.mode = body["mode"]
                for item in self.items:
                    if self.mode == "push" and item.state == "held":
                        item.state, item.next_attempt_at = "pending", time.time()
            if "webhook_url" in body:
                self.webhook_url = str(body["webhook_url"])
            if "secrets" in body:
                secrets = body["secrets"]
                if not (isinstance(secrets, list) and secrets and all(isinstance(s, str) and s for s in secrets)):
                    raise ValueError("secrets must be a non-empty list of strings")
                self.secrets = tuple(secrets)
            if "retry_seconds" in body:
                delays = body["retry_seconds"]
                if not (isinstance(delays, list) and all(isinstance(d, int | float) and d >= 0 for d in delays)):
                    raise ValueError("retry_seconds must be a list of non-negative numbers")
                self.retry_seconds = tuple(float(d) for d in delays)
        self.wake.set()
        return self.describe_settings()

    def describe_settings(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "webhook_url": self.webhook_url,
            "secrets": len(self.secrets),
            "retry_seconds": list(self.retry_seconds),
        }

    def take(self, limit: int) -> list[dict[str, Any]]:
        """Hand out waiting events oldest first, each signed now with every secret, as a CLI forwarder
        would receive them: held ones, and pending ones waiting for a retry. Taken counts as delivered."""
        with self.lock:
            waiting = [item for item in self.items if item.state in ("held", "pending")][:limit]
            taken = []
            for item in waiting:
                item.state, item.attempts, item.delivered_at = "taken", item.attempts + 1, time.time()
                taken.append(
                    {
                        "id": item.msg_id,
                        "type": item.type,
                        "payload": item.body,
                        "headers": signed_headers(self.secrets, item.msg_id, item.body),
                    }
                )
            return taken

    def listing(self, limit: int) -> list[dict[str, Any]]:
        with self.lock:
            return [item.describe() for item in reversed(self.items[-limit:])]

    # --- the worker -----------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stopping.is_set():
            now = time.time()
            with self.lock:
                due = [i for i in self.items if i.state == "pending" and i.next_attempt_at <= now]
                for item in due:
                    item.state = "sending"
                upcoming = [i.next_attempt_at for i in self.items if i.state == "pending"]
            for item in due:
                self.sends.acquire()
                threading.Thread(target=self._send, args=(item,), daemon=True).start()
            wait = max(0.01, min(upcoming) - time.time()) if upcoming else 1.0
            self.wake.wait(min(wait, 1.0))
            self.wake.clear()

    def _send(self, item: Delivery) -> None:
        try:
            with self.lock:
                url, secrets, delays = self.webhook_url, self.secrets, self.retry_seconds
            started = time.monotonic()
            status: int | None = None
            error: str | None = None
            try:
                response = requests.post(
                    url,
                    data=item.body.encode(),
                    headers=signed_headers(secrets, item.msg_id, item.body),
                    timeout=self.settings.timeout_seconds,
                )
                status = response.status_code
            except requests.RequestException as exc:
                error = type(exc).__name__
            elapsed = (time.monotonic() - started) * 1000
            with self.lock:
                item.attempts += 1
                item.last_status, item.last_error = status, error
                item.log.append({"at": time.time(), "status": status, "error": error})
                if status is not None and 200 <= status < 300:
                    item.state, item.delivered_at = "delivered", time.time()
                elif item.attempts <= len(delays):
                    item.state, item.next_attempt_at = "pending", time.time() + delays[item.attempts - 1]
                else:
                    item.state = "failed"
                outcome, attempts = item.state, item.attempts
            logger.info(
                "webhook %s %s attempt %d/%d -> %s in %.0f ms, %s",
                item.msg_id,
                item.type,
                attempts,
                len(delays) + 1,
                status or error,
                elapsed,
                outcome,
            )
        finally:
            self.sends.release()
            self.wake.set()
