"""Ctrl-C stops the sandboxes quietly and at once: no traceback, even when a webhook delivery is in
flight to a receiver that never answers and Ctrl-C is pressed a second time; the delivery is sent
again at the next start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import CATALOGUE, ROOT, SECRET, _free_port


@pytest.fixture
def hung_receiver() -> Iterator[str]:
    """A webhook URL whose server accepts connections and never answers them."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"


def _start(module: str, env: dict[str, str], log: Path, ready_url: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # SIGINT handled as in a terminal (KeyboardInterrupt), even when this run inherited it ignored.
        launch = (
            "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
        )
        process = subprocess.Popen([sys.executable, "-c", launch], cwd=ROOT, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            requests.get(ready_url, timeout=1)
            return process
        except requests.ConnectionError:
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
    raise AssertionError(f"{module} did not start:\n{log.read_text()}")


def _press_ctrl_c_twice(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    return process.wait(20), time.monotonic() - started


def test_ctrl_c_stops_the_stripe_sandbox_quietly_with_a_delivery_in_flight(tmp_path: Path, hung_receiver: str) -> None:
    port = _free_port()
    catalogue = tmp_path / "plans.toml"
    catalogue.write_text(CATALOGUE)
    env = {
        **os.environ,
        "SANDBOX_PORT": str(port),
        "SANDBOX_STATE_DIR": str(tmp_path / "state"),
        "SANDBOX_WEBHOOK_URL": hung_receiver,
        "SANDBOX_WEBHOOK_SECRET": SECRET,
        "PLAN_CATALOGUE_FILE": str(catalogue),
    }
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "sandbox.log"
    process = _start("sandbox", env, log, f"{url}/_sandbox/deliveries")
    created = requests.post(f"{url}/v1/customers", data={"email": "a@example.com"}, auth=("sk_test_x", ""), timeout=5)
    assert created.status_code == 200
    deadline = time.monotonic() + 10
    while not any(
        d["state"] == "sending" for d in requests.get(f"{url}/_sandbox/deliveries", timeout=5).json()["deliveries"]
    ):
        assert time.monotonic() < deadline, "no delivery in flight"
        time.sleep(0.05)

    code, took = _press_ctrl_c_twice(process)
    output = log.read_text()
    assert code == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert took < 5, f"stopping waited {took:.1f} s for the hung delivery"
    assert output.rstrip().endswith(
        f"Stripe sandbox stopped; its state is kept in {tmp_path / 'state'} for the next start."
    )

    # The abandoned delivery is still owed: the next start sends it again.
    process = _start("sandbox", env, log, f"{url}/_sandbox/deliveries")
    try:
        deliveries = requests.get(f"{url}/_sandbox/deliveries", timeout=5).json()["deliveries"]
        assert deliveries and all(d["state"] in ("pending", "sending") for d in deliveries), deliveries
    finally:
        process.terminate()
        assert process.wait(20) == 0


def test_ctrl_c_stops_the_whop_double_quietly(tmp_path: Path, hung_receiver: str) -> None:
    port = _free_port()
    catalogue = tmp_path / "plans.toml"
    catalogue.write_text(CATALOGUE)
    env = {
        **os.environ,
        "WHOP_SANDBOX_PORT": str(port),
        "WHOP_SANDBOX_WEBHOOK_URL": hung_receiver,
        "WHOP_SANDBOX_WEBHOOK_SECRET": "ws_shutdown_tests",
        "PLAN_CATALOGUE_FILE": str(catalogue),
    }
    log = tmp_path / "whop.log"
    process = _start("sandbox.whop", env, log, f"http://127.0.0.1:{port}/whop/_sandbox/deliveries")
    code, took = _press_ctrl_c_twice(process)
    output = log.read_text()
    assert code == 0 and "Traceback" not in output and took < 5, output
    assert output.rstrip().endswith("Whop sandbox stopped.")
