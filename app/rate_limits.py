"""Who a client is for rate limits, and limits on failed attempts that a parallel burst cannot outrun.

Flask-Limiter's ``deduct_when`` checks a limit before the request and counts it after the response,
so every request of a burst passes the check before the first one is counted. Attempts here take their
place first (an atomic increment in the limiter's storage, Redis INCR in production), are refused
once over the limit, and give it back when the response shows the attempt did not count (a successful
sign-in): at most the limit's number of attempts are ever in flight or done in one window."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import current_app, make_response, request
from limits import RateLimitItem, parse_many
from limits.strategies import FixedWindowRateLimiter
from werkzeug.exceptions import TooManyRequests
from werkzeug.wrappers import Response

from app.extensions import limiter


@dataclass(frozen=True)
class AttemptLimit:
    """A limit named by a setting (Flask-Limiter notation, e.g. "10/hour;5/minute") on a key; a key of
    None means the limit does not apply to this request."""

    setting: str
    key: Callable[[], str | None]


class AttemptsExceeded(TooManyRequests):
    pass


def _strategy() -> FixedWindowRateLimiter:
    return FixedWindowRateLimiter(limiter.storage)


def limit_attempts(*limits: AttemptLimit, counts: Callable[[Response], bool]) -> Callable[[Any], Any]:
    """Limit the POSTs of a view: each takes its place in every limit before it runs, and gives it back
    when ``counts(response)`` says it was not an attempt that counts (e.g. a sign-in that succeeded)."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def limited(*args: Any, **kwargs: Any) -> Any:
            if request.method != "POST":
                return view(*args, **kwargs)
            strategy = _strategy()
            prefix = current_app.config.get("RATELIMIT_KEY_PREFIX", "ratelimit")
            taken: list[tuple[RateLimitItem, str]] = []

            def give_back() -> None:
                for item, key in taken:
                    strategy.hit(item, prefix, key, cost=-1)

            for limit in limits:
                key = limit.key()
                if key is None:
                    continue
                for item in parse_many(current_app.config[limit.setting]):
                    taken.append((item, key))
                    if not strategy.hit(item, prefix, key):
                        give_back()
                        reset = strategy.get_window_stats(item, prefix, key).reset_time
                        raise AttemptsExceeded(retry_after=max(1, math.ceil(reset - time.time())))
            try:
                response = make_response(view(*args, **kwargs))
            except BaseException:
                give_back()  # nothing was decided: an error is not a guess
                raise
            if not counts(response):
                give_back()
            return response

        return limited

    return decorate
