"""Words shared by pages, emails and services."""

from __future__ import annotations


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """A number with its noun in the right form: 1 -> "1 extra seat", 3 -> "3 extra seats"."""
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"
