"""What surviving a PostgreSQL restart costs on the webhook hot path (docs/system/BILLING.md, section 11).

The app as shipped rides out a restart with no per-request work: new connections wait for the server,
and a request whose connection died runs again once. The alternative, `pool_pre_ping`, pings every
pooled connection at each checkout — two round trips per webhook delivery. This measures both on the
same database in the same run: the app as shipped, and a second gunicorn with DATABASE_POOL_PRE_PING=1,
new events and duplicates, rounds interleaved. It adds a section to docs/PERFORMANCE.md."""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from bench.loads import Run, measured
from bench.report import DUPLICATE, NEW
from bench.services import VENV_BIN, Server, Services, free_port

if TYPE_CHECKING:
    from bench.__main__ import Bench

ROUNDS = 3
SECONDS = 10
WEBHOOK_PATH = "/billing/webhooks/stripe"
SCENARIOS = {"new events": False, "duplicates": True}  # name: redeliver stored duplicates
SECTION = "## Surviving a PostgreSQL restart: what it costs"


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
                    run = measured(server, bench.postmaster, partial(load, seconds=SECONDS))
                    runs.setdefault((scenario, label), []).append(run)
    finally:
        preping.stop()
        bench.services.servers.remove(preping)
    return [Comparison(s, runs[(s, "shipped")], runs[(s, "preping")]) for s in SCENARIOS]


def markdown(comparisons: list[Comparison]) -> str:
    lines = [
        SECTION,
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
    lines += [
        "",
        "A restart itself is measured by `tests/test_database_restart.py` (the real server restarted under "
        "traffic: zero failed requests), not here: restarting the shared server would disturb everything else "
        "on this machine.",
        "",
    ]
    return "\n".join(lines)


def with_section(document: str, comparisons: list[Comparison]) -> str:
    """The document with this section replaced (or appended)."""
    start = document.find(SECTION)
    if start >= 0:
        following = document.find("\n## ", start + len(SECTION))
        document = document[:start] + (document[following + 1 :] if following >= 0 else "")
    return document.rstrip("\n") + "\n\n" + markdown(comparisons)


def main() -> None:
    """`python -m bench.preping`: this comparison alone (about 3 minutes), printed, not written."""
    from bench.__main__ import WARM_UP_SECONDS, Bench, step  # noqa: PLC0415 (bench.__main__ imports this module)

    workdir = Path(__file__).resolve().parent.parent / "instance" / "bench-preping"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with Services(workdir) as services:
        bench = Bench(services, workdir)
        step("warming up")
        for scenario in (NEW, DUPLICATE):
            bench.webhook_run(scenario, WARM_UP_SECONDS)
        comparisons = measure(bench, step)
    print(markdown(comparisons))


if __name__ == "__main__":
    main()
