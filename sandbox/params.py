"""Decoding Stripe's form encoding and reading typed values from it the way Stripe does.

stripe-python sends nested parameters as ``a[b][0][c]=v`` and lists as ``a[0]=v``; curl users
often write ``a[]=v``. decode() turns these into nested dicts (list indexes stay dict keys);
the readers below validate one value each and raise Stripe's error for a bad one.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from .errors import StripeError, missing, unknown

_SEGMENT = re.compile(r"\[([^\[\]]*)\]")

Params = dict[str, Any]


def decode(pairs: Iterable[tuple[str, str]]) -> Params:
    root: Params = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        parts = [head, *_SEGMENT.findall("[" + rest)] if rest else [head]
        node = root
        for i, part in enumerate(parts):
            name = part or str(len(node))  # "a[]" appends
            if i == len(parts) - 1:
                node[name] = value
            else:
                child = node.get(name)
                if not isinstance(child, dict):
                    child = node[name] = {}
                node = child
    return root


def _name(path: str, key: str) -> str:
    return f"{path}[{key}]" if path else key


def reject_unknown(params: Mapping[str, Any], allowed: Collection[str], path: str = "") -> None:
    for key in params:
        if key not in allowed:
            raise unknown(_name(path, key))


def string(params: Mapping[str, Any], key: str, path: str = "", *, required: bool = False) -> str | None:
    name = _name(path, key)
    value = params.get(key)
    if value is None:
        if required:
            raise missing(name)
        return None
    if not isinstance(value, str):
        raise StripeError(f"Invalid string: {name} must be a string, not an object.", param=name)
    if value == "":
        if required:
            raise StripeError(
                f"You passed an empty string for '{name}'. We assume empty values are an attempt"
                f" to unset a parameter; however '{name}' cannot be unset. You should remove"
                f" '{name}' from your request or supply a non-empty value.",
                code="parameter_invalid_empty",
                param=name,
            )
        return None
    return value


def integer(
    params: Mapping[str, Any],
    key: str,
    path: str = "",
    *,
    required: bool = False,
    minimum: int | None = None,
) -> int | None:
    name = _name(path, key)
    raw = string(params, key, path, required=required)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise StripeError(f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name) from None
    if minimum is not None and value < minimum:
        raise StripeError(
            f"This value must be greater than or equal to {minimum}.",
            code="parameter_invalid_integer",
            param=name,
        )
    return value


def required_string(params: Mapping[str, Any], key: str, path: str = "") -> str:
    """string(..., required=True), typed as always present."""
    value = string(params, key, path, required=True)
    assert value is not None  # required=True raises rather than return None
    return value


def required_integer(params: Mapping[str, Any], key: str, path: str = "", *, minimum: int | None = None) -> int:
    """integer(..., required=True), typed as always present."""
    value = integer(params, key, path, required=True, minimum=minimum)
    assert value is not None  # required=True raises rather than return None
    return value


def boolean(params: Mapping[str, Any], key: str, path: str = "") -> bool | None:
    raw = string(params, key, path)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise StripeError(f"Invalid boolean: {raw}", param=_name(path, key))
    return raw == "true"


def mapping(params: Mapping[str, Any], key: str, path: str = "") -> Params | None:
    """A hash parameter. An empty string is Stripe's way of saying "clear it": {}."""
    value = params.get(key)
    if value is None or isinstance(value, dict):
        return value
    if value == "":
        return {}
    raise StripeError("Invalid object", param=_name(path, key))


def array(params: Mapping[str, Any], key: str, path: str = "") -> list[Any] | None:
    """A list parameter, sent as a[0]=…&a[1]=… (decoded to a dict keyed by index)."""
    value = params.get(key)
    if value is None:
        return None
    if value == "":
        return []
    if not isinstance(value, dict) or not all(k.isdigit() for k in value):
        raise StripeError("Invalid array", param=_name(path, key))
    return [value[k] for k in sorted(value, key=int)]


def metadata(params: Mapping[str, Any], key: str = "metadata", path: str = "") -> dict[str, str] | None:
    """Metadata as given, with values that must be strings; "" values mean "remove this key"."""
    value = mapping(params, key, path)
    if value is None:
        return None
    for k, v in value.items():
        if not isinstance(v, str):
            raise StripeError(
                "Invalid string: metadata values must be strings.",
                param=_name(_name(path, key), k),
            )
    return value


def new_metadata(params: Mapping[str, Any], key: str = "metadata", path: str = "") -> dict[str, str]:
    """Metadata for an object being created: keys given "" are simply not set."""
    return {k: v for k, v in (metadata(params, key, path) or {}).items() if v != ""}
