"""The time, for the checks that depend on it (two-factor codes, how recently a user proved who they
are). One function, so a test can move it: ``monkeypatch.setattr(app.clock, "now", lambda: t)``."""

from __future__ import annotations

import time


def now() -> float:
    """Seconds since the epoch."""
    return time.time()
