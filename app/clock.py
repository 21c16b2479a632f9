"""The one clock: billing, two-factor codes and how recently a user proved who they are read "now" from
here (and app.models.types.utcnow, the database's column defaults, too). Tests move time by patching
`timestamp` (``monkeypatch.setattr(app.clock, "timestamp", lambda: t)``), never `time.time` in a
module, so a skewed clock is skewed everywhere."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def timestamp() -> float:
    """Seconds since the epoch, as this process believes them."""
    return time.time()


def now() -> int:
    """Whole seconds since the epoch: Stripe's and Whop's unit."""
    return int(timestamp())


def utcnow() -> datetime:
    """The same moment as an aware UTC datetime (what the database stores)."""
    return datetime.fromtimestamp(timestamp(), UTC)
