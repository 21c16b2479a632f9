"""How load is applied and measured.

- Webhooks.wrk(): closed loop. CONNECTIONS keep-alive connections each send the next delivery as soon as
  the last is answered, for a fixed time: the most the server sustains, and its latencies at that load.
- Webhooks.paced(): open loop at a constant offered rate. Deliveries leave on schedule whether or not the
  earlier ones were answered, and latency counts from the scheduled moment, so a stall is not hidden by
  the generator waiting for it (no coordinated omission).
- signups(): one browser at a time: GET the form (session and CSRF token), then the timed POST.
- measured(): the CPU the server under test, PostgreSQL, the generator and the rest of the machine used
  during a run, from /proc.
"""

from __future__ import annotations

import http.client
import json
import math
import queue
import re
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from werkzeug.security import generate_password_hash

from app.services.auth_service import SCRYPT_P, SCRYPT_R
from bench import events
from bench.services import Server, machine_busy_seconds, own_cpu_seconds, tree_cpu_seconds
from config import BaseConfig

WRK_THREADS = 2
CONNECTIONS = 16  # gunicorn.conf.py on 2 cores: 4 workers x 4 threads
LUA_SCRIPT = Path(__file__).with_name("webhook.lua")
# As the TLS-terminating proxy in front of the app forwards a request (TRUSTED_PROXY_COUNT=1).
PROXY_HEADERS = {"X-Forwarded-For": "3.18.12.63", "X-Forwarded-Proto": "https"}
CSRF_TOKEN = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')
CHECKOUT_URL = "https://checkout.stripe.test/"
FORGED_SECRET = "whsec_not_the_endpoint_secret"  # noqa: S105 (deliberately wrong, signs refused deliveries)


@dataclass(frozen=True)
class Latencies:
    requests: int
    seconds: float
    errors: int  # non-2xx/3xx answers and socket errors
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @classmethod
    def of(cls, samples: list[float], seconds: float, errors: int) -> Latencies:
        ordered = sorted(samples)

        def percentile(p: float) -> float:
            return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)] * 1000

        return cls(len(ordered), seconds, errors, percentile(50), percentile(95), percentile(99))

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def run_wrk(script: Path, url: str, arguments: list[str], seconds: int) -> tuple[Latencies, int]:
    """wrk with one of bench/'s scripts for `seconds`; returns its latencies and the most requests one
    thread sent (where the scripts' request numbering continues), from the "BENCH {json}" line the
    scripts print (bench/wrk_report.lua)."""
    command = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{seconds}s",
        "--timeout=10s",
        f"--script={script}",
        url,
        "--",
        *arguments,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout  # noqa: S603
    result = json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("BENCH "))[6:])
    latencies = Latencies(
        requests=result["requests"],
        seconds=result["duration_us"] / 1e6,
        errors=result["non_2xx"] + result["socket_errors"],
        p50_ms=result["p50_us"] / 1000,
        p95_ms=result["p95_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
    )
    return latencies, int(result["most_sent_by_a_thread"])


@dataclass(frozen=True)
class Run(Latencies):
    server_cpu_ms: float  # per request: gunicorn's master and workers
    database_cpu_ms: float  # per request: every PostgreSQL process
    generator_cores: float  # wrk, or this process when it generates the load
    other_cores: float  # the rest of the machine: the kernel's network work, Redis, and anyone else's jobs


def measured(server: Server, postmaster_pid: int, load: Callable[[], Latencies]) -> Run:
    def cpu() -> tuple[float, float, float, float]:
        return server.cpu_seconds(), tree_cpu_seconds(postmaster_pid), own_cpu_seconds(), machine_busy_seconds()

    before = cpu()
    latencies = load()
    server_cpu, database_cpu, generator_cpu, machine_cpu = (
        end - start for start, end in zip(before, cpu(), strict=True)
    )
    per_request_ms = 1000 / max(latencies.requests, 1)
    return Run(
        **vars(latencies),
        server_cpu_ms=server_cpu * per_request_ms,
        database_cpu_ms=database_cpu * per_request_ms,
        generator_cores=generator_cpu / latencies.seconds,
        other_cores=(machine_cpu - server_cpu - database_cpu - generator_cpu) / latencies.seconds,
    )


class Webhooks:
    """Signed deliveries, numbered across all runs: no two fresh deliveries share an event id."""

    def __init__(self, secret: str, workdir: Path) -> None:
        self.secret = secret
        self.next_event = events.DUPLICATES
        self.templates = {
            "subscription": events.subscription_updated_template(),
            "unknown": events.charge_refunded_template(),
        }
        self.template_files = {}
        for name, template in self.templates.items():
            self.template_files[name] = workdir / f"{name}.template.json"
            self.template_files[name].write_text(template)

    def wrk(
        self, port: int, path: str, template: str, *, duplicate: bool = False, forged: bool = False, seconds: int
    ) -> Latencies:
        """forged: signed with another secret, so every delivery is refused (400) after the HMAC check."""
        first = self.next_event
        arguments = [
            "duplicate" if duplicate else "fresh",
            FORGED_SECRET if forged else self.secret,
            str(self.template_files[template]),
            str(first),
            str(WRK_THREADS),
            str(events.ORGANIZATIONS),
            str(events.DUPLICATES),
        ]
        latencies, most_sent = run_wrk(LUA_SCRIPT, f"http://127.0.0.1:{port}{path}", arguments, seconds)
        if not duplicate:
            self.next_event = first + WRK_THREADS * most_sent
        return latencies

    def paced(self, port: int, path: str, *, rate: float, seconds: float) -> Latencies:
        """New subscription events at a constant offered rate."""
        template = self.templates["subscription"]
        first, total = self.next_event, round(rate * seconds)
        self.next_event += total
        connections = _KeepAliveConnections(port)

        def deliver(k: int, scheduled: float) -> tuple[float, bool]:
            body = events.fill(template, k)
            signature = events.sign(body, self.secret)
            headers = {**PROXY_HEADERS, "Content-Type": "application/json", "Stripe-Signature": signature}
            try:
                status = connections.post(path, body.encode(), headers)
            except (OSError, http.client.HTTPException):
                status = 0
            return time.perf_counter() - scheduled, 200 <= status < 400

        start = time.perf_counter() + 0.1
        with ThreadPoolExecutor(max_workers=64) as executor:
            futures = []
            for i in range(total):
                scheduled = start + i / rate
                time.sleep(max(scheduled - time.perf_counter(), 0))
                futures.append(executor.submit(deliver, first + i, scheduled))
            outcomes = [future.result() for future in futures]
        elapsed = time.perf_counter() - start
        return Latencies.of([latency for latency, _ in outcomes], elapsed, sum(not ok for _, ok in outcomes))


class _KeepAliveConnections:
    """Keep-alive connections to one server, most recently used first. One idle for longer than the
    server keeps it (gunicorn.conf.py: keepalive = 5 s) is replaced instead of reused; one a recycled
    worker closed (max_requests) is replaced and the request sent again."""

    IDLE_SECONDS = 4

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: queue.LifoQueue[tuple[float, http.client.HTTPConnection]] = queue.LifoQueue()

    def _take(self) -> http.client.HTTPConnection:
        try:
            last_used, connection = self.idle.get_nowait()
        except queue.Empty:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        if time.monotonic() - last_used > self.IDLE_SECONDS:
            connection.close()
        return connection  # a closed HTTPConnection reconnects on its next request

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        for attempt in (1, 2):
            connection = self._take()
            try:
                connection.request("POST", path, body, headers)
                response = connection.getresponse()
                response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
                if attempt == 2:
                    raise
                continue
            self.idle.put((time.monotonic(), connection))
            return response.status
        raise AssertionError("unreachable")


def signups(port: int, count: int) -> Latencies:
    """count signups, each from its own browser and address, each timed from POST to the 303 to Stripe."""
    samples, errors = [], 0
    started = time.perf_counter()
    for i in range(count):
        headers = {**PROXY_HEADERS, "X-Forwarded-For": f"198.18.{i // 250}.{i % 250 + 1}"}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/auth/signup", headers=headers)
        page = connection.getresponse()
        html = page.read().decode()
        cookie = next(value.split(";")[0] for value in page.headers.get_all("Set-Cookie", []) if "session=" in value)
        form = {
            "csrf_token": CSRF_TOKEN.search(html)[1],  # type: ignore[index]
            "email": f"owner{i}@bench.example",
            "password": f"correct horse battery staple {i}",
            "organization_name": f"Bench signup {i}",
            "owner_name": "Bench Owner",
            "tier": "pro",
            "addon_extra_seats": "2",
        }
        post_headers = {
            **headers,
            "Cookie": cookie,
            "Content-Type": "application/x-www-form-urlencoded",
            "Referer": f"https://127.0.0.1:{port}/auth/signup",
        }
        sent = time.perf_counter()
        connection.request("POST", "/auth/signup", urlencode(form), post_headers)
        response = connection.getresponse()
        response.read()
        samples.append(time.perf_counter() - sent)
        errors += not (response.status == 303 and response.getheader("Location", "").startswith(CHECKOUT_URL))
        connection.close()
    return Latencies.of(samples, time.perf_counter() - started, errors)


def password_hash_seconds(count: int) -> list[float]:
    """werkzeug's generate_password_hash with the app's default method (scrypt, N=2**17), alone, count times."""
    method = f"scrypt:{BaseConfig({}).PASSWORD_SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}"
    samples = []
    for i in range(count):
        started = time.perf_counter()
        generate_password_hash(f"correct horse battery staple {i}", method=method)
        samples.append(time.perf_counter() - started)
    return samples
