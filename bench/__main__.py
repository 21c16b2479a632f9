"""`python -m bench` (`make bench`): set everything up, run every measurement, print the table, write
docs/PERFORMANCE.md, and stop what was started. About 9 minutes on 2 cores."""

from __future__ import annotations

import shutil
import sys
import time
from functools import partial
from pathlib import Path

from bench import events, restart, usage
from bench.burst import Burst, run_burst
from bench.loads import Run, Webhooks, measured, password_hash_seconds, signups
from bench.report import DUPLICATE, FORGED, NEW, STORE_ONLY, UNKNOWN, VERIFY_ONLY, Lookup, Report, Results, Summary
from bench.services import Server, Services, in_turn, machine_busy_seconds

ROOT = Path(__file__).resolve().parent.parent
STARTED = time.monotonic()
WEBHOOK_PATH = "/billing/webhooks/stripe"
ROUNDS = 3
SECONDS = 10
WARM_UP_SECONDS = 3
PACED_RATE = 100  # the rate the p99 target is for
PACED_RUNS = {10: 20, PACED_RATE: 30}  # offered req/s: seconds
SLOW_STRIPE_SECONDS = 0.3  # Stripe's answer time while the worker applies and the p99 target is measured
SLOW_STRIPE_WORKER_CONCURRENCY = 4
SIGNUPS = 200
HASHES = 20
LARGE_TABLE = 1_000_000
WEBHOOK_TABLES = ("stripe_event", "anchor_event")  # what the webhook scenarios insert into


class Bench:
    def __init__(self, services: Services, workdir: Path) -> None:
        self.services = services
        self.webhooks = Webhooks(services.webhook_secret, workdir)
        # name: (server, path, template, redeliver the stored duplicates, sign with the wrong secret); the
        # server by name, as the app may be started again (restart_app) between runs.
        self.scenarios: dict[str, tuple[str, str, str, bool, bool]] = {
            VERIFY_ONLY: ("anchor", "/verify-only", "subscription", False, False),
            STORE_ONLY: ("anchor", "/store-only", "subscription", False, False),
            NEW: ("app", WEBHOOK_PATH, "subscription", False, False),
            DUPLICATE: ("app", WEBHOOK_PATH, "subscription", True, False),
            UNKNOWN: ("app", WEBHOOK_PATH, "unknown", False, False),
            FORGED: ("app", WEBHOOK_PATH, "subscription", False, True),
        }

    def webhook_run(self, scenario: str, seconds: int) -> Run:
        name, path, template, duplicate, forged = self.scenarios[scenario]
        server: Server = self.services.app if name == "app" else self.services.anchor
        load = partial(self.webhooks.wrk, server.port, path, template, duplicate=duplicate, forged=forged)
        return measured(server, self.services.postmaster_pid(), partial(load, seconds=seconds))

    def webhook_rounds(self) -> dict[str, list[Run]]:
        """A warm-up of each scenario, then ROUNDS rounds of them all in turn, every other round in the
        reverse order (a drift over the rounds weighs on every scenario alike), each run started on a
        quiet database (Services.quiesce: no scenario pays for the previous one's inserts)."""
        step(f"warming up (load average {_load()})")
        for scenario in self.scenarios:
            self.webhook_run(scenario, WARM_UP_SECONDS)
        self.services.maintain()
        rounds: dict[str, list[Run]] = {scenario: [] for scenario in self.scenarios}
        for number in range(1, ROUNDS + 1):
            for scenario in in_turn(list(self.scenarios), number):
                self.services.quiesce(WEBHOOK_TABLES)
                step(f"round {number}/{ROUNDS}: {scenario} (load average {_load()})")
                rounds[scenario].append(self.webhook_run(scenario, SECONDS))
        return rounds

    def paced_runs(self) -> dict[int, Run]:
        """New events offered at each of PACED_RUNS' rates; at PACED_RATE while a worker applies what is
        queued, each Stripe read taking 300 ms."""
        app = self.services.app
        # What a quiet production table would have had (the rounds do the same after their warm-up).
        self.services.maintain()
        paced = {}
        for rate, seconds in PACED_RUNS.items():
            slow = rate == PACED_RATE
            if slow:
                self.services.start_worker(SLOW_STRIPE_WORKER_CONCURRENCY)
                self.services.set_stripe_latency(SLOW_STRIPE_SECONDS)
                time.sleep(3)
            step(f"new events at {rate} req/s offered, {seconds} s" + (", Stripe answering in 300 ms" if slow else ""))
            load = partial(self.webhooks.paced, app.port, WEBHOOK_PATH, rate=rate, seconds=seconds)
            try:
                paced[rate] = measured(app, self.services.postmaster_pid(), load)
            finally:
                if slow:
                    self.services.set_stripe_latency(0)
                    self.services.stop_worker()
        return paced

    def run(self, busy_before: float) -> Results:
        app = self.services.app
        # The paced runs first: the rounds store tens of thousands of events with no worker running, and a
        # paced run after them measured intake while its worker drained that backlog (PostgreSQL busy
        # with the drain, about 10 ms of its CPU per request), not intake beside a worker keeping up.
        paced = self.paced_runs()
        rounds = self.webhook_rounds()
        outcomes = self.services.event_outcomes()
        step(f"{SIGNUPS} signups, one at a time")
        signup = measured(app, self.services.postmaster_pid(), lambda: signups(app.port, SIGNUPS))
        hashes = password_hash_seconds(HASHES)
        self.preping = restart.measure(self, step)
        burst: Burst = run_burst(self.services, step)
        dedupe, lookups = self.idempotency_at_scale()
        return Results(
            rounds=rounds,
            paced=paced,
            paced_rate=PACED_RATE,
            burst=burst,
            outcomes=outcomes,
            signup=signup,
            hashes=hashes,
            dedupe=dedupe,
            lookups=lookups,
            workers=self.services.app.workers(),
            recycled={server.name: server.recycled_workers() for server in (self.services.app, self.services.anchor)},
            seconds_per_run=SECONDS,
            versions=self.services.versions(),
            busy_before=busy_before,
            minutes=(time.monotonic() - STARTED) / 60,
        )

    def idempotency_at_scale(self) -> tuple[dict[int, list[Run]], dict[int, Lookup]]:
        """The duplicate path with stripe_event holding only the duplicates, and holding LARGE_TABLE rows:
        two tables renamed into place in turn, so the two sizes are measured interleaved."""
        # The database's lookup is what is measured here: the app runs without its memory of settled
        # events (WEBHOOK_SETTLED_CACHE_SIZE), which would answer these duplicates without asking.
        step("restarting the app without its memory of settled events")
        self.services.restart_app(WEBHOOK_SETTLED_CACHE_SIZE="0")
        step(f"building the {events.DUPLICATES:,}-row and {LARGE_TABLE:,}-row stripe_event tables")
        self.services.build_event_tables(LARGE_TABLE)
        self.services.maintain()
        tables = {events.DUPLICATES: "stripe_event_small", LARGE_TABLE: "stripe_event_large"}
        dedupe: dict[int, list[Run]] = {rows: [] for rows in tables}
        lookups = {}
        for number in range(1, ROUNDS + 1):
            for rows, table in tables.items():
                self.services.use_event_table(table)
                lookups[rows] = Lookup(*self.services.dedupe_lookup())
                step(f"round {number}/{ROUNDS}: duplicates, stripe_event holding {rows:,} rows")
                dedupe[rows].append(self.webhook_run(DUPLICATE, SECONDS))
        return dedupe, lookups


def step(message: str) -> None:
    elapsed = int(time.monotonic() - STARTED)
    print(f"[bench {elapsed // 60}:{elapsed % 60:02}] {message}", flush=True)


def busy_cores_before(seconds: float = 3) -> float:
    """How busy the machine is before the benchmark starts anything: other people's work competes too."""
    start = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - start) / seconds


def main() -> None:
    workdir = ROOT / "instance" / "bench"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    busy = busy_cores_before()
    step(f"the machine was {busy:.2f} cores busy before the benchmark started" + (" (not idle!)" if busy > 0.1 else ""))
    step("setting up: database billing_bench, a redis-server, the app, the anchors, the Stripe sandbox, a mail sink")
    with Services(workdir) as services:
        bench = Bench(services, workdir)
        results = bench.run(busy)
        usage_results = usage.run(services, workdir, step)
        restarted = restart.restart_under_load(bench, step)  # last: it restarts PostgreSQL
        step("stopping the servers and dropping billing_bench")
    summary = Report(results)
    document = ROOT / "docs" / "PERFORMANCE.md"
    document.parent.mkdir(exist_ok=True)
    document.write_text(
        usage.with_section(
            restart.with_section(
                summary.markdown(document.read_text() if document.exists() else ""), bench.preping, restarted
            ),
            usage_results,
        )
    )
    print()
    print(summary.table())
    print()
    print(summary.memory())
    for target in summary.targets():
        print(f"{target.name}: {target.measured}, {'met' if target.met else 'MISSED, ' + target.shortfall}")
    print(restart.markdown(bench.preping, restarted))
    print(usage.markdown(usage_results))
    step(f"wrote {document.relative_to(ROOT)}")  # before the printing above


def burst_only() -> None:
    """`python -m bench burst`: only the queue measurements (the burst, worker RSS, a SIGKILLed
    worker), printed; docs/PERFORMANCE.md is left alone."""
    workdir = ROOT / "instance" / "bench-burst"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    step("setting up: the database, a redis-server, the app, the anchors, the Stripe sandbox, a mail sink")
    with Services(workdir) as services:
        burst = run_burst(services, step)
        step("stopping the servers and dropping the database")
    for name, value in vars(burst).items():
        print(f"{name}: {value}")


def paced_only() -> None:
    """`python -m bench paced`: only new events at PACED_RATE req/s while a worker applies them and Stripe
    answers in 300 ms (without the backlog the full run's throughput rounds leave), printed."""
    workdir = ROOT / "instance" / "bench-paced"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    step("setting up: the database, a redis-server, the app, the anchors, the Stripe sandbox, a mail sink")
    with Services(workdir) as services:
        webhooks = Webhooks(services.webhook_secret, workdir)
        services.start_worker(SLOW_STRIPE_WORKER_CONCURRENCY)
        services.set_stripe_latency(SLOW_STRIPE_SECONDS)
        time.sleep(3)
        seconds = PACED_RUNS[PACED_RATE]
        step(f"new events at {PACED_RATE} req/s offered, {seconds} s, Stripe answering in 300 ms")
        load = partial(webhooks.paced, services.app.port, WEBHOOK_PATH, rate=PACED_RATE, seconds=seconds)
        run = measured(services.app, services.postmaster_pid(), load)
        services.stop_worker()
        step("stopping the servers and dropping the database")
    print(run)


def webhook_only() -> None:
    """`python -m bench webhook`: the webhook scenarios against their anchors (ROUNDS rounds), new events
    at PACED_RUNS' rates (the worker applying, Stripe answering in 300 ms at PACED_RATE), then the burst
    and the SIGKILLed worker, in one run; printed with the load average (docs/PERFORMANCE.md is left
    alone)."""
    workdir = ROOT / "instance" / "bench-webhook"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    busy = busy_cores_before()
    step(f"the machine was {busy:.2f} cores busy before the benchmark started; load average {_load()}")
    with Services(workdir) as services:
        bench = Bench(services, workdir)
        rounds = bench.webhook_rounds()
        paced = bench.paced_runs()
        burst = run_burst(services, step)
        step(f"stopping the servers and dropping the database (load average {_load()})")
    summaries = {name: Summary.of(runs) for name, runs in rounds.items()}
    print("| Measurement | req/s median (range) | p50 | p99 | server CPU ms | PostgreSQL CPU ms | other cores |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, summary in summaries.items():
        print(
            f"| {name} | {summary.rate:,.0f} ({summary.rate_low:,.0f}–{summary.rate_high:,.0f}) | "
            f"{summary.p50_ms:.2f} | {summary.p99_ms:.2f} | {summary.server_cpu_ms:.2f} | "
            f"{summary.database_cpu_ms:.2f} | {summary.other_cores:.2f} |"
        )
    for rate, run in paced.items():
        summary = Summary.of([run])
        print(
            f"| new event, {rate} req/s offered | {run.rate:,.1f} | {summary.p50_ms:.2f} | {summary.p99_ms:.2f} | "
            f"{summary.server_cpu_ms:.2f} | {summary.database_cpu_ms:.2f} | {summary.other_cores:.2f} |"
        )
    print(f"new / store-only: {summaries[NEW].rate / summaries[STORE_ONLY].rate:.2f}x (target >= 0.9x)")
    print(f"duplicate / verify-only: {summaries[DUPLICATE].rate / summaries[VERIFY_ONLY].rate:.2f}x (target >= 0.9x)")
    for name, value in vars(burst).items():
        print(f"burst {name}: {value}")
    print(f"load average at the end: {_load()}")


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    if sys.argv[1:] == ["burst"]:
        burst_only()
    elif sys.argv[1:] == ["webhook"]:
        webhook_only()
    elif sys.argv[1:] == ["paced"]:
        paced_only()
    elif sys.argv[1:] == ["usage"]:
        usage.main()
    elif sys.argv[1:]:
        raise SystemExit("usage: python -m bench [burst | paced | usage | webhook]")
    else:
        main()
