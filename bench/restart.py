"""PostgreSQL restarts (docs/system/BILLING.md, section 12): what surviving one costs, and a real one.

1. Cost. The app as shipped rides out a restart with no per-request work: new connections wait for
   the server, and a request whose connection died runs again once. The alternative, `pool_pre_ping`,
   pings every pooled connection at each checkout — two round trips per webhook delivery. Both run on
   the same database in the same run: the app as shipped, and a second gunicorn with
   DATABASE_POOL_PRE_PING=1, new events and duplicates, rounds interleaved.
2. A restart under load: new webhook events offered at a steady rate while the PostgreSQL server is
   restarted (`pg_ctlcluster ... restart`, as root): how many deliveries failed (the goal: none), and
   what the stall did to latency. It restarts the server every database on this machine uses, so it
   runs last; BENCH_SKIP_POSTGRES_RESTART=1 leaves it out on a shared machine.

Both add a section to docs/PERFORMANCE.md."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from bench.loads import Latencies, Run, measured
from bench.report import DUPLICATE, NEW
from bench.services import VENV_BIN, Server, Services, free_port

if TYPE_CHECKING:
    from bench.__main__ import Bench

ROUNDS = 3
SECONDS = 10
WEBHOOK_PATH = "/billing/webhooks/stripe"
SCENARIOS = {"new events": False, "duplicates": True}  # name: redeliver stored duplicates
SECTION = "## Surviving a PostgreSQL restart"
RESTART_RATE = 50  # new events offered per second during the restart
RESTART_SECONDS = 15
RESTART_AFTER_SECONDS = 4


@dataclass(frozen=True)
class Comparison:
    scenario: str
    shipped: list[Run]
    preping: list[Run]

    def ratio(self) -> float:
        return statistics.median(r.rate for r in self.preping) / statistics.median(r.rate for r in self.shipped)


def start_preping_app(bench: Bench) -> Server:
    services = bench.services
    port = free_port()
    control = services.workdir / "app-preping.ctl"
    command = [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", f"--control-socket={control}", "wsgi:app"]
    server = services._start(
        "app-preping", command, port, GUNICORN_BIND=f"127.0.0.1:{port}", DATABASE_POOL_PRE_PING="1"
    )
    server.wait_until_serving()
    return server


def measure(bench: Bench, step: Callable[[str], None] | None = None) -> list[Comparison]:
    preping = start_preping_app(bench)
    shipped = bench.services.app
    runs: dict[tuple[str, str], list[Run]] = {}
    try:
        for number in range(1, ROUNDS + 1):
            for scenario, duplicate in SCENARIOS.items():
                for label, server in (("shipped", shipped), ("preping", preping)):
                    if step:
                        step(f"pre-ping round {number}/{ROUNDS}: {scenario}, {label}")
                    load = partial(bench.webhooks.wrk, server.port, WEBHOOK_PATH, "subscription", duplicate=duplicate)
                    run = measured(server, bench.services.postmaster_pid(), partial(load, seconds=SECONDS))
                    runs.setdefault((scenario, label), []).append(run)
    finally:
        preping.stop()
        bench.services.servers.remove(preping)
    return [Comparison(s, runs[(s, "shipped")], runs[(s, "preping")]) for s in SCENARIOS]


@dataclass(frozen=True)
class RestartRun:
    deliveries: Latencies | None  # None: left out (BENCH_SKIP_POSTGRES_RESTART=1)
    restart_seconds: float = 0.0


def restart_under_load(bench: Bench, step: Callable[[str], None] | None = None) -> RestartRun:
    """New events at RESTART_RATE/s for RESTART_SECONDS; the server restarts RESTART_AFTER_SECONDS in."""
    if os.environ.get("BENCH_SKIP_POSTGRES_RESTART") == "1":
        return RestartRun(None)
    clusters = sorted(Path("/etc/postgresql").iterdir())
    if step:
        step(f"PostgreSQL restart under {RESTART_RATE} new events/s")
    app = bench.services.app
    with ThreadPoolExecutor(max_workers=1) as executor:
        load = executor.submit(bench.webhooks.paced, app.port, WEBHOOK_PATH, rate=RESTART_RATE, seconds=RESTART_SECONDS)
        time.sleep(RESTART_AFTER_SECONDS)
        began = time.monotonic()
        subprocess.run(  # noqa: S603 (fixed arguments)
            ["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1].name, "main", "restart"],  # noqa: S607
            check=True,
            capture_output=True,
            timeout=120,
        )
        restart_seconds = time.monotonic() - began
        deliveries = load.result()
    return RestartRun(deliveries, restart_seconds)


def markdown(comparisons: list[Comparison], restart: RestartRun | None = None) -> str:
    lines = [
        SECTION,
        "",
        "### A restart under load",
        "",
    ]
    if restart is None or restart.deliveries is None:
        lines += ["Left out of this run (BENCH_SKIP_POSTGRES_RESTART=1).", ""]
    else:
        d = restart.deliveries
        lines += [
            f"New webhook events offered at {RESTART_RATE}/s for {RESTART_SECONDS} s to the app as shipped; "
            f"{RESTART_AFTER_SECONDS} s in, `pg_ctlcluster ... restart` (it took {restart.restart_seconds:.1f} s).",
            "",
            "| Deliveries | failed | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|",
            f"| {d.requests:,} | **{d.errors}** | {d.p50_ms:.1f} | {d.p95_ms:.1f} | {d.p99_ms:.1f} |",
            "",
            "Latency counts from when each delivery was due, so the deliveries that waited for the server "
            "to come back show in p95/p99.",
            "",
        ]
    lines += [
        "### What surviving one costs",
        "",
        "The app as shipped (no pre-ping: a request whose connection died with a restart runs again once) "
        "against the same app with `DATABASE_POOL_PRE_PING=1`, webhook deliveries, "
        f"{ROUNDS} interleaved rounds of {SECONDS} s each, medians. Errors must be 0.",
        "",
        "| Deliveries | as shipped req/s | p50 / p99 ms | PostgreSQL CPU ms/req | pre-ping req/s | p50 / p99 ms "
        "| PostgreSQL CPU ms/req | pre-ping ÷ shipped (req/s) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:

        def cell(runs: list[Run]) -> tuple[str, str, str]:
            rate = statistics.median(r.rate for r in runs)
            p50 = statistics.median(r.p50_ms for r in runs)
            p99 = statistics.median(r.p99_ms for r in runs)
            database = statistics.median(r.database_cpu_ms for r in runs)
            return f"{rate:,.0f}", f"{p50:.1f} / {p99:.1f}", f"{database:.2f}"

        shipped, preping = cell(c.shipped), cell(c.preping)
        errors = sum(r.errors for r in c.shipped + c.preping)
        lines.append(f"| {c.scenario} | {' | '.join(shipped)} | {' | '.join(preping)} | {c.ratio():.2f}× | {errors} |")
    lines.append("")
    return "\n".join(lines)


def with_section(document: str, comparisons: list[Comparison], restart: RestartRun | None = None) -> str:
    """The document with this section replaced (or appended)."""
    start = document.find(SECTION)
    if start >= 0:
        following = document.find("\n## ", start + len(SECTION))
        document = document[:start] + (document[following + 1 :] if following >= 0 else "")
    return document.rstrip("\n") + "\n\n" + markdown(comparisons, restart)


def main() -> None:
    """`python -m bench.restart`: these measurements alone (about 3 minutes); replaces their section of
    docs/PERFORMANCE.md and leaves the rest of it alone."""
    from bench.__main__ import WARM_UP_SECONDS, Bench, step  # noqa: PLC0415 (bench.__main__ imports this module)

    workdir = Path(__file__).resolve().parent.parent / "instance" / "bench-restart"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with Services(workdir) as services:
        bench = Bench(services, workdir)
        step("warming up")
        for scenario in (NEW, DUPLICATE):
            bench.webhook_run(scenario, WARM_UP_SECONDS)
        comparisons = measure(bench, step)
        restart = restart_under_load(bench, step)
    print(markdown(comparisons, restart))
    document = workdir.parent.parent / "docs" / "PERFORMANCE.md"
    document.write_text(with_section(document.read_text() if document.exists() else "", comparisons, restart))
    step(f"wrote its section of {document}")


if __name__ == "__main__":
    main()
