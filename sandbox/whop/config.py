"""Settings for the Whop double, read once from environment variables at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sandbox.config import mask

DEFAULT_WEBHOOK_URL = "http://127.0.0.1:5000/billing/webhooks/whop"
DEFAULT_WEBHOOK_SECRET = "ws_sandbox_development_only"  # noqa: S105 (a public development value)
DEFAULT_ACCOUNT_ID = "biz_sandbox"
DELIVERY_MODES = ("push", "hold")


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    public_url: str
    webhook_url: str
    webhook_secrets: tuple[str, ...]
    account_id: str
    catalogue_file: Path
    delivery_mode: str
    retry_seconds: tuple[float, ...]
    timeout_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """The start-up settings; raises ValueError naming the variable for a bad value."""
        port = int(env.get("WHOP_SANDBOX_PORT", "12113"))
        secrets = tuple(s.strip() for s in env.get("WHOP_SANDBOX_WEBHOOK_SECRET", DEFAULT_WEBHOOK_SECRET).split(","))
        if not all(secrets):
            raise ValueError("WHOP_SANDBOX_WEBHOOK_SECRET: empty secret in the list")
        mode = env.get("WHOP_SANDBOX_DELIVERY", "push")
        if mode not in DELIVERY_MODES:
            raise ValueError(f"WHOP_SANDBOX_DELIVERY must be push or hold, not {mode!r}")
        try:
            retries = tuple(float(s) for s in env.get("WHOP_SANDBOX_RETRY_SECONDS", "10,20,40").split(",") if s.strip())
        except ValueError:
            raise ValueError("WHOP_SANDBOX_RETRY_SECONDS must be a comma-separated list of seconds") from None
        if any(delay < 0 for delay in retries):
            raise ValueError("WHOP_SANDBOX_RETRY_SECONDS: delays cannot be negative")
        return cls(
            host=env.get("WHOP_SANDBOX_HOST", "127.0.0.1"),
            port=port,
            public_url=env.get("WHOP_SANDBOX_PUBLIC_URL", f"http://127.0.0.1:{port}").rstrip("/"),
            webhook_url=env.get("WHOP_SANDBOX_WEBHOOK_URL", DEFAULT_WEBHOOK_URL),
            webhook_secrets=secrets,
            account_id=env.get("WHOP_SANDBOX_COMPANY_ID", DEFAULT_ACCOUNT_ID),
            catalogue_file=Path(env.get("PLAN_CATALOGUE_FILE", "plans.toml")),
            delivery_mode=mode,
            retry_seconds=retries,
            timeout_seconds=float(env.get("WHOP_SANDBOX_TIMEOUT_SECONDS", "10")),
        )

    def describe(self) -> list[str]:
        """One line per setting for the start-up banner; secrets keep only their ends."""
        return [
            f"WHOP_SANDBOX_HOST={self.host}",
            f"WHOP_SANDBOX_PORT={self.port}",
            f"WHOP_SANDBOX_PUBLIC_URL={self.public_url}",
            f"WHOP_SANDBOX_WEBHOOK_URL={self.webhook_url}",
            f"WHOP_SANDBOX_WEBHOOK_SECRET={','.join(mask(s) for s in self.webhook_secrets)}",
            f"WHOP_SANDBOX_COMPANY_ID={self.account_id}",
            f"WHOP_SANDBOX_DELIVERY={self.delivery_mode}",
            f"WHOP_SANDBOX_RETRY_SECONDS={','.join(f'{d:g}' for d in self.retry_seconds)}",
            f"PLAN_CATALOGUE_FILE={self.catalogue_file}",
        ]
