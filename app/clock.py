"""The one clock billing reads. Tests move time by patching `timestamp` (never `time.time` in a
module): every "now" the billing modules use comes from here, so a skewed clock is skewed everywhere."""

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
