"""Support for the tests that run the product for real: the app on a real HTTP server, a headless
Chromium driving it, and the offline Stripe sandbox (sandbox/) in a subprocess playing Stripe.

Registered as a plugin by tests/conftest.py (`pytest_plugins`). Stripe is not imported or patched here:
the app talks to whatever STRIPE_API_BASE names with the real SDK over HTTP, and the sandbox answers.

Fixtures:
- live_server(port=0, **overrides) -> LiveServer: the app (conftest's make_app: clean test database
  and Redis) served by a threaded werkzeug server on 127.0.0.1, with APP_BASE_URL naming its port.
- sandbox(webhook_url, port=None) -> Sandbox: `python -m sandbox` on a free port with a temporary
  state directory; its log is attached to the report of a failed test.
- sandbox_app -> SandboxedApp: both of the above wired together (app -> sandbox API, sandbox -> app
  webhooks), for browser tests of the default run.
- chromium -> BrowserPage: a fresh headless Chromium page and `step(name)`, which saves a screenshot
  to artifacts/browser/<test-name>/NN-<name>.png.
Helpers: wait_until(predicate, timeout, message), a bounded poll; submit_signup(...), the app's signup
form filled and submitted in the browser.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from flask import Flask
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
from werkzeug.serving import BaseWSGIServer, make_server

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SANDBOX_SECRET_KEY = "sk_test_sandbox_browser_suite"
SANDBOX_WEBHOOK_SECRET = "whsec_sandbox_browser_suite_0123456789"
WEBHOOK_PATH = "/billing/webhooks/stripe"

T = TypeVar("T")
SANDBOXES = pytest.StashKey[list["Sandbox"]]()
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


# --- Waiting ------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T], timeout: float, message: str | Callable[[], str], interval: float = 0.1
) -> T:
    """Poll predicate until it returns something truthy (returned), for at most timeout seconds; then
    fail with message (a callable is asked only then, so it can describe the state it gave up in)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (gave up after {timeout:g} s)")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- The app on a real HTTP server ----------------------------------------------------------------


def _not_ready(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"the app is not mounted yet"]


class LiveServer:
    """A threaded werkzeug server on 127.0.0.1. The socket is bound before the app is built, so the
    app's APP_BASE_URL (and a sandbox's webhook URL) can name the real port, even when it is 0."""

    def __init__(self, port: int = 0) -> None:
        try:
            self.server: BaseWSGIServer = make_server("127.0.0.1", port, _not_ready, threaded=True)
        except (OSError, SystemExit) as exc:  # werkzeug prints why and exits when the port is taken
            raise AssertionError(
                f"cannot listen on 127.0.0.1:{port} (in use? LIVE_APP_PORT chooses the live-mode port)"
            ) from exc
        self.port: int = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.app: Flask | None = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._stop_worker = threading.Event()

    def serve(self, app: Flask, *, worker: bool = True) -> None:
        """Serve ``app``; with a worker beside it, as in production, that applies the webhooks the app
        stores (not on the SQLite stand-in, where jobs run inside the app)."""
        self.app = app
        self.server.app = app
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"live-app-{self.port}", daemon=True)
        self._thread.start()
        if worker:
            self._worker = threading.Thread(
                target=self._work, args=(app,), name=f"live-worker-{self.port}", daemon=True
            )
            self._worker.start()

    def _work(self, app: Flask) -> None:
        from app.services import queue

        while not self._stop_worker.is_set():
            queue.run_pending_jobs(app)
            self._stop_worker.wait(0.2)

    def stop(self) -> None:
        self._stop_worker.set()
        if self._worker is not None:
            self._worker.join(30)
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(10)
        self.server.server_close()


@pytest.fixture
def live_server(make_app: Callable[..., Flask]) -> Iterator[Callable[..., LiveServer]]:
    """live_server(port=0, **overrides): the app on the clean test database and Redis, served over
    HTTP; stopped at teardown (before make_app disposes of its database engine)."""
    servers: list[LiveServer] = []

    def start(port: int = 0, **overrides: Any) -> LiveServer:
        server = LiveServer(port)
        servers.append(server)
        server.serve(make_app(**{"APP_BASE_URL": server.url, **overrides}))
        return server

    yield start
    for server in reversed(servers):
        server.stop()


# --- The offline Stripe sandbox -----------------------------------------------------------------


class Sandbox:
    """`python -m sandbox` in a subprocess, with its own state directory and log file."""

    def __init__(self, workdir: Path, *, webhook_url: str, port: int | None = None, secret: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = secret
        self.log = workdir / "sandbox.log"
        self.env = {
            **os.environ,
            "SANDBOX_PORT": str(self.port),
            "SANDBOX_STATE_DIR": str(workdir / "state"),
            "SANDBOX_WEBHOOK_URL": webhook_url,
            "SANDBOX_WEBHOOK_SECRET": secret,
            "SANDBOX_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
            "PLAN_CATALOGUE_FILE": str(ROOT / "plans.toml"),
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox"], cwd=ROOT, env=self.env, stdout=log, stderr=log
            )

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the sandbox exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                return requests.get(f"{self.url}/_sandbox/deliveries", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout, lambda: f"the sandbox did not answer on {self.url}:\n{self.log_text()}", 0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: the sandbox unwinds and closes its store
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def deliveries(self) -> list[dict[str, Any]]:
        """What the sandbox has sent to the webhook URL, newest first (its /_sandbox/deliveries)."""
        response = requests.get(f"{self.url}/_sandbox/deliveries", timeout=5)
        response.raise_for_status()
        listed: list[dict[str, Any]] = response.json()["deliveries"]
        return listed

    def wait_for_deliveries(self, timeout: float = 20) -> list[dict[str, Any]]:
        """Wait until every event the sandbox has queued was delivered (2xx) to the app."""
        return wait_until(
            lambda: (found := self.deliveries()) and all(d["state"] == "delivered" for d in found) and found,
            timeout,
            lambda: (
                f"the sandbox's webhooks were not all delivered to {self.env['SANDBOX_WEBHOOK_URL']}: "
                + "; ".join(
                    f"{d['type']} {d['state']} after {d['attempts']} attempt(s) ({d['last_status'] or d['last_error']})"
                    for d in self.deliveries()
                )
            ),
        )


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    """sandbox(webhook_url, port=None, secret=...): a running sandbox; stopped at teardown. If the test
    fails, the sandbox's log is added to its report."""
    started: list[Sandbox] = []

    def start(webhook_url: str, port: int | None = None, secret: str = SANDBOX_WEBHOOK_SECRET) -> Sandbox:
        workdir = tmp_path / f"sandbox-{len(started)}"
        workdir.mkdir()
        process = Sandbox(workdir, webhook_url=webhook_url, port=port, secret=secret)
        started.append(process)
        request.node.stash.setdefault(SANDBOXES, []).append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.stop()


@dataclass
class SandboxedApp:
    """The app on a live server whose Stripe is a sandbox that sends its webhooks back to that app."""

    server: LiveServer
    sandbox: Sandbox

    @property
    def app(self) -> Flask:
        assert self.server.app is not None
        return self.server.app


@pytest.fixture
def sandbox_app(live_server: Callable[..., LiveServer], sandbox: Callable[..., Sandbox]) -> SandboxedApp:
    """The default run's stand-in for Stripe test mode: no keys needed, nothing leaves the machine."""
    sandbox_port = free_port()
    server = live_server(
        STRIPE_SECRET_KEY=SANDBOX_SECRET_KEY,
        STRIPE_WEBHOOK_SECRET=SANDBOX_WEBHOOK_SECRET,
        STRIPE_API_BASE=f"http://127.0.0.1:{sandbox_port}",
    )
    process = sandbox(f"{server.url}{WEBHOOK_PATH}", port=sandbox_port, secret=SANDBOX_WEBHOOK_SECRET)
    return SandboxedApp(server, process)


# --- Headless Chromium --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright_chromium() -> Iterator[Browser]:
    """Debian's Chromium, launched once per module that uses it (Playwright's own browser download is not
    used). Not once per session: Playwright's sync API keeps an event loop running in the main thread
    until it stops, and the job queue's inline runs (run_jobs) call asyncio.run there."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: run scripts/ensure-chromium")
    playwright: Playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()
    finally:
        playwright.stop()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-").lower() or "step"


@dataclass
class BrowserPage:
    """One test's page, and its numbered screenshots."""

    page: Page
    folder: Path
    shots: list[Path] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def step(self, name: str) -> Path:
        """Save a full-page screenshot as NN-<name>.png; returns its path."""
        path = self.folder / f"{len(self.shots) + 1:02d}-{_slug(name)}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.shots.append(path)
        return path


@pytest.fixture
def chromium(request: pytest.FixtureRequest, playwright_chromium: Browser) -> Iterator[BrowserPage]:
    """A fresh browser context (no cookies) and page; screenshots go to artifacts/browser/<test-name>/,
    emptied first. A failed test gets a last screenshot and the page's URL in its report."""
    folder = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    context = playwright_chromium.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(15_000)
    context.set_default_navigation_timeout(30_000)
    page = context.new_page()
    browser_page = BrowserPage(page, folder)
    page.on("console", lambda m: m.type == "error" and browser_page.console_errors.append(m.text))
    yield browser_page
    report = request.node.stash.get(REPORTS, {}).get("call")
    if report is not None and report.failed:
        try:
            shot = browser_page.step("failure")
            print(f"browser was at {page.url}; last screenshot {shot}")
        except Exception as exc:  # the page may be gone; the failure itself is what matters
            print(f"browser was at {page.url}; no failure screenshot: {exc}")
        if browser_page.console_errors:
            print("browser console errors:\n" + "\n".join(browser_page.console_errors))
    context.close()


def submit_signup(
    browser: BrowserPage,
    app_url: str,
    *,
    email: str,
    password: str,
    organization: str,
    owner: str,
    tier: str = "tier-0",
    extra_seats: int = 2,
) -> None:
    """Fill in the app's signup form and submit it; returns once the browser has left the app (for
    Checkout), or fails with what the app said instead."""
    page = browser.page
    page.goto(f"{app_url}/auth/signup")
    expect(page.locator("#signup-form"), "the signup form").to_be_visible()
    browser.step("signup form")
    page.check(f"#{tier}")
    page.fill("#addon_extra_seats", str(extra_seats))
    page.fill("#organization_name", organization)
    page.fill("#owner_name", owner)
    page.fill("#email", email)
    page.fill("#password", password)
    browser.step("signup form filled")
    with page.expect_navigation(timeout=30_000):
        page.click("#signup-submit")
    if page.url.startswith(app_url):
        said = page.locator(".field-error, .form-error, main h1, main p").all_inner_texts()
        raise AssertionError(f"the app kept the browser at {page.url} instead of sending it to Checkout: {said}")


# --- Reports ------------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report for fixtures' teardown, and put the sandbox log in a failure's report."""
    report: pytest.TestReport = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    if report.failed and report.when in ("setup", "call"):
        for process in item.stash.get(SANDBOXES, []):
            report.sections.append((f"sandbox log ({process.url})", process.log_text()))
    return report
