"""The offline Whop double (`python -m sandbox.whop`) in a subprocess, for tests that run the app
against it over HTTP. Not a fixture module: tests build one with `WhopDouble.start(...)` and stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]


class WhopDouble:
    def __init__(self, *, port: int, webhook_url: str, secrets: str, account_id: str, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api = f"{self.url}/whop/api/v1"
        self.log = log
        self.env = {
            **os.environ,
            "WHOP_SANDBOX_PORT": str(port),
            "WHOP_SANDBOX_WEBHOOK_URL": webhook_url,
            "WHOP_SANDBOX_WEBHOOK_SECRET": secrets,
            "WHOP_SANDBOX_COMPANY_ID": account_id,
            "WHOP_SANDBOX_RETRY_SECONDS": "0.2,0.2,0.2",
            "PLAN_CATALOGUE_FILE": str(ROOT / "plans.toml"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WhopDouble:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox.whop"], cwd=ROOT, env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/whop/_sandbox/deliveries", timeout=1)
                return self
            except requests.ConnectionError:
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.05)
        raise AssertionError("whop double did not start:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.post(f"{self.url}/whop/_sandbox/{path}", json=body or {}, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def deliveries(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = requests.get(f"{self.url}/whop/_sandbox/deliveries", timeout=5).json()[
            "deliveries"
        ]
        return listed

    def pay(self, purchase_url: str, email: str = "ada@example.com", card: str = "4242 4242 4242 4242") -> Any:
        form = {"email": email, "name": "Ada Lovelace", "card": card, "expiry": "12/34", "cvc": "123"}
        return requests.post(purchase_url, data=form, allow_redirects=False, timeout=5)
