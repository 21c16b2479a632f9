"""Stripe's rate limits, kept by every process together: one token bucket in Redis that all workers
and web processes take from before each request to Stripe (STRIPE_REQUESTS_PER_SECOND), and a pause
that a 429 from Stripe (or its Retry-After) sets for all of them at once.

A request waits for its turn up to a bound (STRIPE_RATE_WAIT_SECONDS; a billing page read less); a
request that would wait longer is not sent and is answered here the way Stripe answers a throttled
one (HTTP 429, code rate_limit, Retry-After), so callers have one kind of "throttled" to handle:
BillingService turns it into ProviderThrottled, and the worker puts the object's events back to
wait without spending an attempt (webhook_intake.apply_queued). Nothing here imports Stripe's SDK:
BillingService wraps its HTTP client with `paced_client`.

The bucket is a reservation: a taker is granted a slot (possibly in the future, up to the wait bound)
and sleeps until it, so takers are served in order without polling. Without Redis (development) or
while Redis fails, each process keeps the same bucket in memory (the cap then holds per process)."""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar

from redis import Redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

# Stripe's documented limits: 100 operations per second in live mode, 25 in test mode. The defaults
# leave a fifth for the dashboard, Stripe's own apps and anything else using the same account.
LIVE_DEFAULT_PER_SECOND = 80.0
TEST_DEFAULT_PER_SECOND = 20.0
# How long to pause after a 429 that names no Retry-After.
DEFAULT_PAUSE_SECONDS = 1.0
MAX_PAUSE_SECONDS = 300.0
# After Redis fails, the process keeps its own bucket this long before asking Redis again, so an
# outage does not add a connection timeout to every request to Stripe.
REDIS_RETRY_SECONDS = 10.0
THROTTLED_MESSAGE = "Request not sent: the shared Stripe request budget (STRIPE_REQUESTS_PER_SECOND) is used up."
KEY = "stripe-pace"

# KEYS: bucket, pause. ARGV: rate/s, burst, max wait (s). Returns {granted 0/1, seconds}: granted with
# the seconds to sleep before sending, or refused with the seconds until a slot would be free.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now + max_wait then
  return {0, tostring(paused - now)}
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate) - 1
local wait = math.max(0, -tokens / rate, paused - now)
if wait > max_wait then
  return {0, tostring(wait)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return {1, tostring(wait)}
"""
# KEYS: pause. ARGV: seconds. The pause only ever grows.
_PAUSE = """
local t = redis.call('TIME')
local until_at = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_at > current then
  redis.call('SET', KEYS[1], tostring(until_at), 'EX', math.ceil(tonumber(ARGV[1])) + 1)
end
return 1
"""


def default_rate(secret_key: str) -> float:
    return LIVE_DEFAULT_PER_SECOND if secret_key.startswith(("sk_live_", "rk_live_")) else TEST_DEFAULT_PER_SECOND


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds from now, or None."""
    value = None
    for name, item in (headers or {}).items():
        if name.lower() == "retry-after":
            value = str(item).strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_PAUSE_SECONDS) if math.isfinite(seconds) else None


class Pace:
    """The bucket shared by every process (Redis), or this process's own (no Redis, or Redis failing)."""

    def __init__(self, per_second: float, redis: Redis | None, key: str = KEY) -> None:
        self.per_second = per_second
        self.burst = max(1.0, per_second / 4)
        self.redis = redis
        self.key = key
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._at = time.monotonic()
        self._paused_until = 0.0
        self._reserve = redis.register_script(_RESERVE) if redis is not None else None
        self._pause = redis.register_script(_PAUSE) if redis is not None else None
        self._redis_failed_at = -REDIS_RETRY_SECONDS  # after a failure, this process's bucket for a while

    def reserve(self, max_wait: float) -> tuple[bool, float]:
        """(True, seconds to sleep before sending) or (False, seconds until a turn would come)."""
        if self.per_second <= 0:
            return True, 0.0
        if self._reserve is not None and time.monotonic() - self._redis_failed_at >= REDIS_RETRY_SECONDS:
            try:
                granted, seconds = self._reserve(
                    keys=[f"{self.key}:bucket", f"{self.key}:pause"], args=[self.per_second, self.burst, max_wait]
                )
                return bool(int(granted)), float(seconds)
            except RedisError as exc:
                self._redis_failed_at = time.monotonic()
                logger.warning("Stripe request pacing falls back to this process for a while (Redis: %s)", exc)
        return self._reserve_here(max_wait)

    def _reserve_here(self, max_wait: float) -> tuple[bool, float]:
        with self._lock:
            now = time.monotonic()
            tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second) - 1
            wait = max(0.0, -tokens / self.per_second, self._paused_until - now)
            if wait > max_wait:
                return False, wait
            self._tokens, self._at = tokens, now
            return True, wait

    def pause(self, seconds: float) -> None:
        """Stripe said "too many": every process holds its requests for this long."""
        seconds = min(max(seconds, 0.0), MAX_PAUSE_SECONDS)
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        if self._pause is not None and time.monotonic() - self._redis_failed_at >= REDIS_RETRY_SECONDS:
            try:
                self._pause(keys=[f"{self.key}:pause"], args=[seconds])
            except RedisError as exc:
                self._redis_failed_at = time.monotonic()
                logger.warning("could not share Stripe's throttling through Redis: %s", exc)

    def take(self, max_wait: float) -> float | None:
        """Wait for a turn to send (at most max_wait): None when sent on, else the seconds to come back."""
        granted, seconds = self.reserve(max_wait)
        if not granted:
            return max(seconds, 0.001)
        if seconds > 0:
            time.sleep(seconds)
        return None


# A turn taken ahead by this thread (turn_ahead): its next request to Stripe spends it instead of
# taking another.
_ahead = threading.local()


@contextmanager
def turn_ahead(pace: Pace, max_wait: float) -> Iterator[float | None]:
    """Wait for a turn before the request is even prepared (the worker takes it before it collects an
    object's pending events, so events that arrive while it waits join the same read). Yields None
    with the turn held for this thread's next request, or the seconds to come back (no turn taken).
    A turn not spent by the end of the block is dropped."""
    come_back = pace.take(max_wait)
    _ahead.held = come_back is None
    try:
        yield come_back
    finally:
        _ahead.held = False


def _spend_turn_ahead() -> bool:
    held = bool(getattr(_ahead, "held", False))
    _ahead.held = False
    return held


def throttled_answer(seconds: float) -> tuple[str, int, dict[str, str]]:
    """A request not sent, answered as Stripe answers a throttled one (stripe-python: RateLimitError)."""
    body = {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": THROTTLED_MESSAGE}}
    return json.dumps(body), 429, {"Retry-After": str(math.ceil(seconds)), "Stripe-Should-Retry": "false"}


class _HttpClient(Protocol):
    def request(self, method: str, url: str, headers: Any, post_data: Any = None) -> Any: ...


Client = TypeVar("Client", bound=_HttpClient)


def paced_client(base: type[Client], pace: Pace, *, max_wait: float, **kwargs: Any) -> Client:
    """An instance of Stripe's HTTP client class `base` whose every request (the SDK's own retries
    included) takes a turn from `pace` first, and whose 429s pause every process."""

    class Paced(base):  # type: ignore[valid-type,misc]
        def request(self, method: str, url: str, headers: Any, post_data: Any = None) -> Any:
            come_back = None if _spend_turn_ahead() else pace.take(max_wait)
            if come_back is not None:
                return throttled_answer(come_back)
            response = super().request(method, url, headers, post_data)
            if response[1] == 429:
                seconds = retry_after(response[2])
                pace.pause(seconds if seconds is not None else DEFAULT_PAUSE_SECONDS * (1 + random.random()))  # noqa: S311  (jitter)
            return response

    client: Client = Paced(**kwargs)
    return client


def for_app(app: Any) -> Pace:
    """The app's pace (one per process): STRIPE_REQUESTS_PER_SECOND, shared through the app's Redis."""
    pace: Pace | None = app.extensions.get("stripe_pace")
    if pace is None:
        config = app.config
        setting = str(config.get("STRIPE_REQUESTS_PER_SECOND") or "").strip()
        per_second = float(setting) if setting else default_rate(str(config.get("STRIPE_SECRET_KEY") or ""))
        pace = Pace(per_second, app.extensions.get("redis"))
        app.extensions["stripe_pace"] = pace
    return pace
