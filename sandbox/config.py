"""Settings for the sandbox, read once from environment variables at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    public_url: str
    state_dir: Path
    webhook_url: str
    webhook_secret: str
    catalogue_file: Path
    async_delay: float
    retry_base: float
    max_attempts: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        port = int(env.get("SANDBOX_PORT", "12111"))
        return cls(
            host=env.get("SANDBOX_HOST", "127.0.0.1"),
            port=port,
            public_url=env.get("SANDBOX_PUBLIC_URL", f"http://127.0.0.1:{port}").rstrip("/"),
            state_dir=Path(env.get("SANDBOX_STATE_DIR", "instance/sandbox")),
            webhook_url=env.get("SANDBOX_WEBHOOK_URL", "http://127.0.0.1:5000/billing/webhooks/stripe"),
            webhook_secret=env.get("SANDBOX_WEBHOOK_SECRET", "whsec_sandbox_development_only"),
            catalogue_file=Path(env.get("PLAN_CATALOGUE_FILE", "plans.toml")),
            async_delay=float(env.get("SANDBOX_ASYNC_DELAY_SECONDS", "3")),
            retry_base=float(env.get("SANDBOX_WEBHOOK_RETRY_BASE_SECONDS", "1")),
            max_attempts=int(env.get("SANDBOX_WEBHOOK_MAX_ATTEMPTS", "10")),
        )

    def describe(self) -> list[str]:
        """One line per setting for the start-up banner; the secret keeps only its ends."""
        return [
            f"SANDBOX_HOST={self.host}",
            f"SANDBOX_PORT={self.port}",
            f"SANDBOX_PUBLIC_URL={self.public_url}",
            f"SANDBOX_STATE_DIR={self.state_dir}",
            f"SANDBOX_WEBHOOK_URL={self.webhook_url}",
            f"SANDBOX_WEBHOOK_SECRET={mask(self.webhook_secret)}",
            f"SANDBOX_ASYNC_DELAY_SECONDS={self.async_delay:g}",
            f"SANDBOX_WEBHOOK_RETRY_BASE_SECONDS={self.retry_base:g}",
            f"SANDBOX_WEBHOOK_MAX_ATTEMPTS={self.max_attempts}",
            f"PLAN_CATALOGUE_FILE={self.catalogue_file}",
        ]


def mask(secret: str) -> str:
    """Hide the middle of a secret so start-up logs can be pasted safely."""
    if len(secret) <= 12:
        return "…" if secret else ""
    return f"{secret[:10]}…{secret[-4:]}"
