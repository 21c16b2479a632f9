"""Simulated time: the "now" of customers attached to a test clock.

Objects of a customer on a test clock live at the clock's frozen time, not the wall clock.
Code that creates or changes them runs inside frozen_at(t), and everything that asks for the
current time (billing.now() and so every timestamp and event `created`) sees t. Outside such a
block, now() is the wall clock, so customers without a clock behave as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .store import Store

DAY = 86400  # seconds; test clocks, trials and smart retries count in days

_frozen: ContextVar[int | None] = ContextVar("sandbox_frozen_time", default=None)


def now() -> int:
    frozen = _frozen.get()
    return frozen if frozen is not None else int(time.time())


@contextmanager
def frozen_at(timestamp: int | None) -> Iterator[None]:
    """Run a block at a simulated time (or at the wall clock if timestamp is None)."""
    if timestamp is None:
        yield
        return
    token = _frozen.set(timestamp)
    try:
        yield
    finally:
        _frozen.reset(token)


def clock_time_of(store: Store, object_id: str | None) -> int | None:
    """The frozen time of the test clock an object (customer, subscription, invoice, …) lives
    on, following its customer; None when it has no clock."""
    obj = store.get(object_id) if object_id else None
    if obj is None:
        return None
    clock_id = obj.get("test_clock")
    if clock_id is None and isinstance(obj.get("customer"), str):
        customer = store.get(obj["customer"])
        clock_id = customer.get("test_clock") if customer else None
    clock = store.get(clock_id) if isinstance(clock_id, str) else None
    return int(clock["frozen_time"]) if clock else None


@contextmanager
def time_of(store: Store, object_id: str | None) -> Iterator[None]:
    """Run a block at the time the object lives in: its clock's frozen time, or now."""
    with frozen_at(clock_time_of(store, object_id)):
        yield
