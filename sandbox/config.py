"""Settings for the sandbox, read once from environment variables at start-up."""

from __future__ import annotations

import math
import os
import random
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .objects import API_VERSION


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    public_url: str
    state_dir: Path
    webhook_url: str
    catalogue_file: Path
    async_delay: float
    retry_base: float
    max_attempts: int
    # How events are delivered; changeable at run time through POST /_sandbox/delivery.
    delivery: DeliveryConfig = field(default_factory=lambda: DeliveryConfig.from_env({}))
    request_log_limit: int = 10_000
    # The tax_behavior the seeded prices carry: SANDBOX_PRICE_TAX_BEHAVIOR, else the app's
    # PRICES_SHOWN_WITH_TAX, else exclusive (Stripe Tax refuses `unspecified`; see sandbox/tax.py).
    price_tax_behavior: str = "exclusive"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        port = int(env.get("SANDBOX_PORT", "12111"))
        delivery = DeliveryConfig.from_env(env)
        return cls(
            host=env.get("SANDBOX_HOST", "127.0.0.1"),
            port=port,
            public_url=env.get("SANDBOX_PUBLIC_URL", f"http://127.0.0.1:{port}").rstrip("/"),
            state_dir=Path(env.get("SANDBOX_STATE_DIR", "instance/sandbox")),
            # The start-up values; the worker reads the live ones (POST /_sandbox/delivery).
            webhook_url=delivery.webhook_url,
            catalogue_file=Path(env.get("PLAN_CATALOGUE_FILE", "plans.toml")),
            price_tax_behavior=_tax_behavior(env),
            async_delay=float(env.get("SANDBOX_ASYNC_DELAY_SECONDS", "3")),
            retry_base=float(env.get("SANDBOX_WEBHOOK_RETRY_BASE_SECONDS", "1")),
            max_attempts=int(env.get("SANDBOX_WEBHOOK_MAX_ATTEMPTS", "10")),
            delivery=delivery,
            request_log_limit=int(env.get("SANDBOX_REQUEST_LOG_LIMIT", "10000")),
        )

    def describe(self) -> list[str]:
        """One line per setting for the start-up banner; the secret keeps only its ends."""
        return [
            f"SANDBOX_HOST={self.host}",
            f"SANDBOX_PORT={self.port}",
            f"SANDBOX_PUBLIC_URL={self.public_url}",
            f"SANDBOX_STATE_DIR={self.state_dir}",
            f"SANDBOX_WEBHOOK_URL={self.webhook_url}",
            f"SANDBOX_WEBHOOK_SECRET={','.join(mask(s) for s in self.delivery.secrets)}",
            f"SANDBOX_ASYNC_DELAY_SECONDS={self.async_delay:g}",
            f"SANDBOX_WEBHOOK_RETRY_BASE_SECONDS={self.retry_base:g}",
            f"SANDBOX_WEBHOOK_MAX_ATTEMPTS={self.max_attempts}",
            f"SANDBOX_DELIVERY_MODE={self.delivery.mode}",
            f"SANDBOX_API_VERSION={self.delivery.api_version}",
            f"SANDBOX_DELIVERY_CONCURRENCY={self.delivery.concurrency}",
            f"SANDBOX_DUPLICATE_RATE={self.delivery.duplicate_rate:g}",
            f"SANDBOX_REORDER={int(self.delivery.reorder)}",
            f"SANDBOX_DELIVERY_DELAY_SECONDS={self.delivery.delay_seconds:g}",
            f"SANDBOX_REQUEST_LOG_LIMIT={self.request_log_limit}",
            f"PLAN_CATALOGUE_FILE={self.catalogue_file}",
            f"SANDBOX_PRICE_TAX_BEHAVIOR={self.price_tax_behavior}",
        ]


def _tax_behavior(env: Mapping[str, str]) -> str:
    given = (env.get("SANDBOX_PRICE_TAX_BEHAVIOR") or env.get("PRICES_SHOWN_WITH_TAX") or "exclusive").strip().lower()
    if given not in ("exclusive", "inclusive", "unspecified"):
        raise ValueError(f"SANDBOX_PRICE_TAX_BEHAVIOR is exclusive, inclusive or unspecified, not {given!r}")
    return given


def mask(secret: str) -> str:
    """Hide the middle of a secret so start-up logs can be pasted safely."""
    if len(secret) <= 12:
        return "…" if secret else ""
    return f"{secret[:10]}…{secret[-4:]}"


DEFAULT_WEBHOOK_URL = "http://127.0.0.1:5000/billing/webhooks/stripe"
DEFAULT_WEBHOOK_SECRET = "whsec_sandbox_development_only"  # noqa: S105 - a published dev-only value
MAX_CONCURRENCY = 32
MAX_DELAY_SECONDS = 3600.0
_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(\.[a-z_]+)?")


@dataclass(frozen=True)
class DeliveryConfig:
    """How webhook events reach the app. `push`: the worker POSTs them to `webhook_url`;
    `hold`: they wait until pulled with POST /_sandbox/deliveries/take (as `stripe listen`
    forwards them). Every v1 signature uses one of `secrets` (several while a secret is rolled)."""

    mode: str = "push"
    webhook_url: str = DEFAULT_WEBHOOK_URL
    secrets: tuple[str, ...] = (DEFAULT_WEBHOOK_SECRET,)
    api_version: str = API_VERSION
    concurrency: int = 1
    duplicate_rate: float = 0.0
    reorder: bool = False
    delay_seconds: float = 0.0

    FIELDS = (
        "mode",
        "webhook_url",
        "secrets",
        "api_version",
        "concurrency",
        "duplicate_rate",
        "reorder",
        "delay_seconds",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DeliveryConfig:
        """The start-up settings; raises ValueError naming the variable for a bad value."""
        raw: dict[str, Any] = {}
        names = {
            "mode": "SANDBOX_DELIVERY_MODE",
            "webhook_url": "SANDBOX_WEBHOOK_URL",
            "secrets": "SANDBOX_WEBHOOK_SECRET",
            "api_version": "SANDBOX_API_VERSION",
            "concurrency": "SANDBOX_DELIVERY_CONCURRENCY",
            "duplicate_rate": "SANDBOX_DUPLICATE_RATE",
            "reorder": "SANDBOX_REORDER",
            "delay_seconds": "SANDBOX_DELIVERY_DELAY_SECONDS",
        }
        for name, variable in names.items():
            value = env.get(variable)
            if value is None or value == "":
                continue
            try:
                if name == "secrets":
                    raw[name] = [part.strip() for part in value.split(",") if part.strip()]
                elif name == "concurrency":
                    raw[name] = int(value)
                elif name in ("duplicate_rate", "delay_seconds"):
                    raw[name] = float(value)
                elif name == "reorder":
                    if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                        raise ValueError(f"expected 0 or 1, got {value!r}")
                    raw[name] = value.lower() in ("1", "true", "yes")
                else:
                    raw[name] = value
                cls().updated({name: raw[name]})
            except ValueError as exc:
                raise ValueError(f"{variable}: {exc}") from None
        return cls().updated(raw)

    def updated(self, changes: Mapping[str, Any]) -> DeliveryConfig:
        """A copy with `changes` applied, each checked; ValueError says what is wrong."""
        values = self.as_dict()
        for name, value in changes.items():
            if name not in self.FIELDS:
                raise ValueError(f"unknown setting {name!r}; the settings are {', '.join(self.FIELDS)}")
            values[name] = _check(name, value)
        values["secrets"] = tuple(values["secrets"])
        return DeliveryConfig(**values)

    def duplicates_now(self) -> bool:
        """Whether this delivery of an event also sends a second copy (`duplicate_rate`)."""
        return self.duplicate_rate > 0 and random.random() < self.duplicate_rate  # noqa: S311

    def as_dict(self) -> dict[str, Any]:
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in self.FIELDS}


def _check(name: str, value: Any) -> Any:  # noqa: PLR0912 - one branch per setting reads best
    if name == "mode":
        if value not in ("push", "hold"):
            raise ValueError(f"mode must be 'push' or 'hold', not {value!r}")
    elif name == "webhook_url":
        if not isinstance(value, str) or not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"webhook_url must be an http:// or https:// URL, not {value!r}")
    elif name == "secrets":
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(s, str) and s.strip() == s and s for s in value)
        ):
            raise ValueError("secrets must be a non-empty list of non-empty strings")
        value = list(value)
    elif name == "api_version":
        if not isinstance(value, str) or not _API_VERSION.fullmatch(value):
            raise ValueError(f"api_version must look like '2026-10-28.endive', not {value!r}")
    elif name == "concurrency":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, not {value!r}")
    elif name == "duplicate_rate":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"duplicate_rate must be a number from 0 to 1, not {value!r}")
        value = float(value)
    elif name == "reorder":
        if not isinstance(value, bool):
            raise ValueError(f"reorder must be true or false, not {value!r}")
    elif name == "delay_seconds":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 <= value <= MAX_DELAY_SECONDS
        ):
            raise ValueError(
                f"delay_seconds must be a number of seconds from 0 to {MAX_DELAY_SECONDS:g}, not {value!r}"
            )
        value = float(value)
    return value


class LiveDelivery:
    """The delivery settings in force, shared by the control endpoints and the worker."""

    def __init__(self, initial: DeliveryConfig) -> None:
        self._lock = threading.Lock()
        self._config = initial

    def get(self) -> DeliveryConfig:
        with self._lock:
            return self._config

    def update(self, changes: Mapping[str, Any]) -> DeliveryConfig:
        """Apply a partial update atomically; ValueError (nothing changed) if any value is bad."""
        with self._lock:
            self._config = self._config.updated(changes)
            return self._config


@dataclass(frozen=True)
class Dunning:
    """Smart retries of failed invoice payments (the test clock engine runs them; a failed
    subscription update schedules its first one)."""

    retry_days: tuple[int, ...]  # days after the first failure when payment is retried
    final_action: str  # unpaid | cancel, once the last retry has failed

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Dunning:
        raw = env.get("SANDBOX_DUNNING_RETRY_DAYS", "3,5,7")
        try:
            days = tuple(int(part) for part in raw.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"SANDBOX_DUNNING_RETRY_DAYS must be comma-separated whole days, not {raw!r}") from None
        if any(d <= 0 for d in days) or list(days) != sorted(set(days)):
            raise ValueError(f"SANDBOX_DUNNING_RETRY_DAYS must be increasing positive days, not {raw!r}")
        action = env.get("SANDBOX_DUNNING_FINAL_ACTION", "cancel")
        if action not in ("unpaid", "cancel"):
            raise ValueError(f"SANDBOX_DUNNING_FINAL_ACTION must be unpaid or cancel, not {action!r}")
        return cls(days, action)
