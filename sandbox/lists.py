"""Stripe's list pagination and the filters its list endpoints share.

Lists are newest first. `starting_after` returns the objects after (older than) the given one,
`ending_before` those before (newer than) it, at most `limit` (1-100, default 10) either way;
`has_more` says whether more lie beyond in the direction of travel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import objects
from .errors import StripeError, exclusive
from .objects import Obj
from .params import Params, integer, mapping, reject_unknown, string
from .store import Store

RANGE_KEYS = ("gt", "gte", "lt", "lte")


@dataclass(frozen=True)
class Page:
    limit: int
    starting_after: str | None
    ending_before: str | None


def page_params(params: Params) -> Page:
    limit = integer(params, "limit", minimum=1)
    if limit is not None and limit > 100:
        raise StripeError("This value must be less than or equal to 100.", param="limit")
    after, before = string(params, "starting_after"), string(params, "ending_before")
    if after and before:
        raise exclusive("starting_after", "ending_before", "ending_before")
    return Page(limit or 10, after, before)


def range_filter(params: Params, key: str) -> Callable[[int], bool] | None:
    """`created=…` (exact) or `created[gt|gte|lt|lte]=…` as a predicate on a timestamp."""
    if key not in params:
        return None
    if isinstance(params[key], str):
        exact = integer(params, key)
        return lambda value: value == exact
    bounds = mapping(params, key) or {}
    reject_unknown(bounds, RANGE_KEYS, key)
    limits = {op: integer(bounds, op, key) for op in RANGE_KEYS if op in bounds}

    def check(value: int) -> bool:
        return all(
            (op == "gt" and value > bound)
            or (op == "gte" and value >= bound)
            or (op == "lt" and value < bound)
            or (op == "lte" and value <= bound)
            for op, bound in limits.items()
            if bound is not None
        )

    return check


def created_filter(params: Params) -> Callable[[Obj], bool]:
    """The `created` parameter as a predicate on an object (every object passes without it)."""
    created = range_filter(params, "created")
    return (lambda obj: True) if created is None else (lambda obj: created(obj["created"]))


def newest_first(items: Iterable[Obj]) -> list[Obj]:
    """Store order is creation order; a stable sort on `created` keeps ties in that order."""
    ordered = list(reversed(list(items)))
    return sorted(ordered, key=lambda obj: -int(obj.get("created") or 0))


def paginate(items: list[Obj], url: str, page: Page, kind: str) -> Obj:
    """A list object of `items` (already filtered and newest first) for the requested page."""
    ids = [obj["id"] for obj in items]
    if page.starting_after is not None:
        if page.starting_after not in ids:
            raise StripeError(
                f"No such {kind}: '{page.starting_after}'", code="resource_missing", param="starting_after"
            )
        rest = items[ids.index(page.starting_after) + 1 :]
        return objects.list_object(rest[: page.limit], url, has_more=len(rest) > page.limit)
    if page.ending_before is not None:
        if page.ending_before not in ids:
            raise StripeError(f"No such {kind}: '{page.ending_before}'", code="resource_missing", param="ending_before")
        rest = items[: ids.index(page.ending_before)]
        return objects.list_object(rest[-page.limit :], url, has_more=len(rest) > page.limit)
    return objects.list_object(items[: page.limit], url, has_more=len(items) > page.limit)


def listing(store: Store, kind: str, url: str, params: Params, wanted: Callable[[Obj], bool]) -> Obj:
    """A list endpoint's answer: the stored objects of `kind` that are `wanted`, newest first,
    paged as `params` ask."""
    found = [obj for obj in newest_first(store.all(kind)) if wanted(obj)]
    return paginate(found, url, page_params(params), kind)


def matches(obj: Mapping[str, Any], **wanted: Any) -> bool:
    return all(value is None or obj.get(key) == value for key, value in wanted.items())
