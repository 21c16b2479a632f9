"""The results: one table (printed, and in docs/PERFORMANCE.md), the targets, and the facts around them.

docs/PERFORMANCE.md is written whole on every run, except the part between ANALYSIS_START and
ANALYSIS_END: that is people's reading of the numbers (profiles, causes, proposed changes), kept as is.
"""

from __future__ import annotations

import os
import platform
import runpy
import statistics
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import events, loads
from bench.burst import WORKER_CONCURRENCY as BURST_CONCURRENCY
from bench.burst import Burst
from bench.loads import Run
from bench.services import WorkerMemory

VERIFY_ONLY = "Webhook: verify-only anchor"
STORE_ONLY = "Webhook: store-only anchor"
NEW = "Webhook: new event (subscription updated)"
DUPLICATE = "Webhook: duplicate event"
UNKNOWN = "Webhook: unknown event type"
FORGED = "Webhook: bad signature (refused, no database)"
ANALYSIS_START = "<!-- analysis: kept by make bench -->"
ANALYSIS_END = "<!-- /analysis -->"
SLOW_WORKER = "concurrency 4"
EXPECTED_OUTCOMES = {
    # Stored and queued; no worker runs during the throughput rounds.
    ("customer.subscription.updated", "pending", ""),
    # Applied by the worker during the 300 ms run: the bench's subscriptions exist only in our database.
    ("customer.subscription.updated", "ignored", "not ours: this Stripe account has no subscription"),
    ("charge.refunded", "ignored", "unhandled event type charge.refunded"),
    # The duplicates, stored as applied before the runs (and redelivered by them).
    ("customer.subscription.updated", "processed", "applied: organization.billing_dates_changed"),
}


@dataclass(frozen=True)
class Summary:
    """The median of each figure over a scenario's runs, and the range of its rate."""

    rate: float
    rate_low: float
    rate_high: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    server_cpu_ms: float
    database_cpu_ms: float
    generator_cores: float
    other_cores: float  # the most any run saw

    @classmethod
    def of(cls, runs: list[Run]) -> Summary:
        def median(name: str) -> Any:
            return statistics.median(getattr(run, name) for run in runs)

        rates = [run.rate for run in runs]
        return cls(
            rate=statistics.median(rates),
            rate_low=min(rates),
            rate_high=max(rates),
            p50_ms=median("p50_ms"),
            p95_ms=median("p95_ms"),
            p99_ms=median("p99_ms"),
            errors=sum(run.errors for run in runs),
            server_cpu_ms=median("server_cpu_ms"),
            database_cpu_ms=median("database_cpu_ms"),
            generator_cores=median("generator_cores"),
            other_cores=max(run.other_cores for run in runs),
        )


@dataclass(frozen=True)
class Lookup:
    buffers: int
    execution_ms: float
    index_mb: float


@dataclass(frozen=True)
class Results:
    rounds: dict[str, list[Run]]
    paced: dict[int, Run]  # offered req/s -> run
    paced_rate: int  # the one the p99 target is for (measured while Stripe answers in 300 ms)
    burst: Burst
    outcomes: list[tuple[str, str, str, int, int]]
    signup: Run
    hashes: list[float]
    dedupe: dict[int, list[Run]]  # stripe_event rows -> duplicate runs
    lookups: dict[int, Lookup]
    workers: list[WorkerMemory]
    recycled: dict[str, int]  # server -> workers gunicorn replaced (max_requests)
    seconds_per_run: int
    versions: str
    busy_before: float  # cores in use on the machine before the benchmark started anything
    minutes: float


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    met: bool
    shortfall: str  # by how much it is missed ("" when met)


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _rate(summary: Summary) -> str:
    return f"{summary.rate:,.0f} ({summary.rate_low:,.0f}–{summary.rate_high:,.0f})"


class Report:
    def __init__(self, results: Results) -> None:
        self.results = results
        self.summaries = {name: Summary.of(runs) for name, runs in results.rounds.items()}
        self.paced = Summary.of([results.paced[results.paced_rate]])
        self.signup = Summary.of([results.signup])
        self.dedupe = {rows: Summary.of(runs) for rows, runs in results.dedupe.items()}
        self.small, self.large = sorted(results.dedupe)
        self.hash_ms = statistics.median(results.hashes) * 1000

    def ratio(self, name: str, base: str) -> float:
        return self.summaries[name].rate / self.summaries[base].rate

    def dedupe_cost_ratio(self) -> float:
        """Cost per duplicate (CPU-bound, so 1 / throughput) at the large table over the small one."""
        return self.dedupe[self.small].rate / self.dedupe[self.large].rate

    def targets(self) -> list[Target]:
        new_ratio, duplicate_ratio = self.ratio(NEW, STORE_ONLY), self.ratio(DUPLICATE, VERIFY_ONLY)
        store_rate = self.summaries[STORE_ONLY].rate
        verify_rate = self.summaries[VERIFY_ONLY].rate
        dedupe = self.dedupe_cost_ratio()
        p99 = self.paced.p99_ms
        burst = self.results.burst
        return [
            Target(
                "New events ≥ 0.9× store-only (req/s)",
                f"{new_ratio:.2f}×",
                new_ratio >= 0.9,
                f"{0.9 * store_rate - self.summaries[NEW].rate:,.0f} req/s short ({new_ratio / 0.9:.0%} of the target)",
            ),
            Target(
                "Duplicates ≥ 0.9× verify-only (req/s)",
                f"{duplicate_ratio:.2f}×",
                duplicate_ratio >= 0.9,
                f"{0.9 * verify_rate - self.summaries[DUPLICATE].rate:,.0f} req/s short "
                f"({duplicate_ratio / 0.9:.0%} of the target)",
            ),
            Target(
                f"New events p99 < 20 ms at {self.results.paced_rate:.0f} req/s offered, Stripe answering in 300 ms",
                f"{_ms(p99)} ms",
                p99 < 20,
                f"{p99 - 20:.1f} ms over ({p99 / 20:.1f}× the target)",
            ),
            Target(
                f"Burst of {burst.deliveries:,} deliveries across {burst.subscriptions} subscriptions applied ≤ 30 s",
                f"{burst.applied_seconds:.1f} s",
                burst.applied_seconds <= 30 and burst.settled == burst.deliveries,
                f"{burst.applied_seconds - 30:.1f} s over, or {burst.deliveries - burst.settled} events not applied",
            ),
            Target(
                f"Burst costs ≤ 400 Stripe reads ({burst.deliveries:,} deliveries)",
                f"{burst.stripe_reads} reads",
                burst.stripe_reads <= 400,
                f"{burst.stripe_reads - 400} reads over",
            ),
            Target(
                f"A worker SIGKILLed mid-job: its {burst.kill_claimed} claimed object"
                f"{'' if burst.kill_claimed == 1 else 's'} applied by another ≤ 30 s",
                "not within 180 s" if burst.kill_recovered_seconds is None else f"{burst.kill_recovered_seconds:.1f} s",
                burst.kill_recovered_seconds is not None and burst.kill_recovered_seconds <= 30,
                "not recovered"
                if burst.kill_recovered_seconds is None
                else f"{burst.kill_recovered_seconds - 30:.1f} s over",
            ),
            Target(
                f"Dedupe at {self.large:,} rows ≤ 1.2× its cost at {self.small:,}",
                f"{dedupe:.2f}×",
                dedupe <= 1.2,
                f"{dedupe - 1.2:.2f}× over",
            ),
        ]

    # --- the table ------------------------------------------------------------------------------

    def rows(self) -> list[list[str]]:
        def row(name: str, summary: Summary, compared: str, rate: str = "", errors: str = "") -> list[str]:
            return [
                name,
                rate or _rate(summary),
                _ms(summary.p50_ms),
                _ms(summary.p95_ms),
                _ms(summary.p99_ms),
                errors or str(summary.errors),
                _ms(summary.server_cpu_ms),
                _ms(summary.database_cpu_ms),
                f"{summary.generator_cores:.2f}",
                f"{summary.other_cores:.2f}",
                compared,
            ]

        s = self.summaries
        results = self.results
        rows = [
            row(VERIFY_ONLY, s[VERIFY_ONLY], "the ceiling"),
            row(STORE_ONLY, s[STORE_ONLY], f"{self.ratio(STORE_ONLY, VERIFY_ONLY):.2f}× verify-only"),
            row(NEW, s[NEW], f"**{self.ratio(NEW, STORE_ONLY):.2f}× store-only** (target ≥ 0.9×)"),
            row(DUPLICATE, s[DUPLICATE], f"**{self.ratio(DUPLICATE, VERIFY_ONLY):.2f}× verify-only** (target ≥ 0.9×)"),
            row(UNKNOWN, s[UNKNOWN], f"{self.ratio(UNKNOWN, STORE_ONLY):.2f}× store-only"),
            row(
                FORGED,
                s[FORGED],
                f"{self.ratio(FORGED, VERIFY_ONLY):.2f}× verify-only: the app's fixed cost",
                errors="all 400, as meant",
            ),
        ]
        for rate, run in sorted(results.paced.items()):
            compared = f"**p99 {_ms(run.p99_ms)} ms** (target < 20 ms)" if rate == results.paced_rate else ""
            rows.append(
                row(
                    f"Webhook: new event, {rate} req/s offered",
                    Summary.of([run]),
                    compared or "requests seldom overlap",
                    rate=f"{run.rate:,.1f} achieved",
                )
            )
        for size, summary in self.dedupe.items():
            compared = f"**{self.dedupe_cost_ratio():.2f}× the cost** (target ≤ 1.2×)" if size == self.large else ""
            rows.append(row(f"Duplicate, stripe_event holding {size:,} rows", summary, compared))
        rows.append(row("Signup POST, one at a time, Stripe played by the sandbox", self.signup, "", rate="—"))
        hashes = loads.Latencies.of(results.hashes, sum(results.hashes), 0)
        rows.append(
            [
                "scrypt password hash alone (werkzeug)",
                "—",
                _ms(hashes.p50_ms),
                _ms(hashes.p95_ms),
                _ms(hashes.p99_ms),
                "—",
                "—",
                "—",
                "—",
                "—",
                f"{self.hash_ms / self.signup.p50_ms:.0%} of the signup POST (p50)",
            ]
        )
        return rows

    HEADER = (
        "Measurement",
        "req/s median (range)",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "server CPU ms/req",
        "PostgreSQL CPU ms/req",
        "generator cores",
        "other cores (max)",
        "compared",
    )

    def table(self) -> str:
        lines = [self.HEADER, tuple("---" for _ in self.HEADER), *self.rows()]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)

    def memory(self) -> str:
        workers = self.results.workers
        rss = [worker.rss_mb for worker in workers]
        private = [worker.private_mb for worker in workers]
        return (
            f"{len(workers)} app workers after the runs: RSS {min(rss):.0f}–{max(rss):.0f} MB each, of which "
            f"{min(private):.0f}–{max(private):.0f} MB private (the rest is shared with the preloaded master)."
        )

    # --- docs/PERFORMANCE.md --------------------------------------------------------------------

    def markdown(self, previous: str) -> str:
        results = self.results
        gunicorn = runpy.run_path("gunicorn.conf.py")
        targets = self.targets()
        start = previous.find(ANALYSIS_START)
        end = previous.find(ANALYSIS_END)
        analysis = (
            previous[start : end + len(ANALYSIS_END)]
            if 0 <= start < end
            else f"{ANALYSIS_START}\n_No analysis written for these numbers yet._\n{ANALYSIS_END}"
        )
        paced = results.paced
        unexpected = [
            row
            for row in results.outcomes
            if not any(row[:2] == known[:2] and row[2].startswith(known[2]) for known in EXPECTED_OUTCOMES)
        ]
        lines = [
            "# Performance",
            "",
            "Written by `make bench` (scripts/bench, then `python -m bench`); every run replaces the figures. "
            "The machine is small and the load generator shares it, so compare ratios more than absolute numbers.",
            "",
            "## How to run",
            "",
            "```sh",
            "make bench",
            "```",
            "",
            "It needs PostgreSQL on 127.0.0.1 (scripts/ensure-services starts it), `redis-server`, and `wrk` "
            "(scripts/bench installs the Debian package when it is missing). It builds the database `billing_bench` "
            "with the migrations, starts a redis-server of its own, the app and the anchors under gunicorn, and a "
            "offline Stripe sandbox (`python -m sandbox`), an SMTP sink and, for the queue measurements, a "
            "`flask billing worker`, all on free ports, runs everything, prints the table, writes this file, then "
            "stops what it "
            f"started and drops the database. It took {results.minutes:.1f} minutes. Server logs: `instance/bench/`.",
            "",
            "## Machine",
            "",
            *(f"- {fact}" for fact in machine_facts(results.versions)),
            f'- Busy before the benchmark started: {results.busy_before:.2f} cores. The column "other cores" '
            "below is the machine's CPU during a run less the server's, PostgreSQL's and the generator's: the "
            "kernel's network work, Redis, and any other job on the machine. Other work makes the figures lower "
            "and noisier.",
            "",
            "## Method",
            "",
            f"- Servers: `gunicorn -c gunicorn.conf.py wsgi:app` with `APP_ENV=production` (https `APP_BASE_URL`, "
            f"`TRUSTED_PROXY_COUNT=1`, Redis and PostgreSQL as in production): {gunicorn['worker_class']}, "
            f"{gunicorn['workers']} workers × {gunicorn['threads']} threads, preload, keep-alive "
            f"{gunicorn['keepalive']} s, workers recycled after {gunicorn['max_requests']} (+ up to "
            f"{gunicorn['max_requests_jitter']}) requests. The anchors (bench/anchor.py) run under the same "
            "gunicorn.conf.py with the same database settings (Flask-SQLAlchemy, psycopg2, the app's engine "
            "options). Every request carries the proxy's X-Forwarded-For and X-Forwarded-Proto headers.",
            f"- Webhooks: {events.ORGANIZATIONS:,} organizations are created first. Each new event is "
            "`customer.subscription.updated` for one of them, newer by 10 s than the last one it had, moving the "
            "period end, so each is applied (no Stripe call) and changes the organization. The anchors get the same "
            f"payloads. Duplicates are {events.DUPLICATES:,} events stored as processed, redelivered in turn. Unknown "
            "events are `charge.refunded`. Every request is signed when sent, with the current timestamp.",
            f"- Load: wrk (Debian) with bench/webhook.lua, {loads.WRK_THREADS} threads and {loads.CONNECTIONS} "
            f"keep-alive connections (as many as the app has threads), {results.seconds_per_run} s per run, after a "
            f"warm-up. The {len(results.rounds)} webhook scenarios run in turn, "
            f"{len(next(iter(results.rounds.values())))} rounds, every other round in the reverse order; before "
            "each run the database is let go quiet (no statement running, no autovacuum), the tables the runs "
            "insert into are vacuumed and a CHECKPOINT is taken, so no run pays for the one before it. The table "
            "gives medians and the range of req/s. "
            "Latencies there are at saturation (closed loop).",
            "- Constant rate: new events offered at "
            + " and ".join(f"{rate} req/s for {run.requests / rate:.0f} s" for rate, run in sorted(paced.items()))
            + " by a Python open-loop generator (bench/loads.py); latency counts from the moment each request was "
            "due, so stalls are not hidden.",
            "- The generator competes for the same 2 cores: its column gives the cores it used (wrk, or the Python "
            "process). Server and PostgreSQL CPU per request are read from /proc (the gunicorn master, its workers "
            "and the workers it recycled; every PostgreSQL process).",
            f"- Idempotency at scale: two more tables shaped like stripe_event (`LIKE stripe_event INCLUDING "
            f"ALL`): one holding only the {events.DUPLICATES:,} duplicates, one holding them and events bulk-loaded "
            f"(one INSERT … SELECT generate_series) to {self.large:,} rows; VACUUM ANALYZE and a CHECKPOINT after. "
            "Each is renamed to stripe_event in turn (one transaction) and the duplicate run is measured on it, the "
            "two sizes interleaved for the same number of rounds. Cost = 1 / throughput (the runs are CPU-bound).",
            f"- Signup: {results.signup.requests} signups, one at a time, each from its own address and browser "
            "session: GET the form, then the timed POST up to the 303 to Checkout, with Stripe played by "
            "the offline sandbox (prices and Checkout Sessions over HTTP). The hash alone is werkzeug's "
            "`generate_password_hash(..., "
            f'method="scrypt:131072:8:1")`, timed {len(results.hashes)} times in the benchmark process.',
            "",
            "## Results",
            "",
            self.table(),
            "",
            self.memory(),
            "",
            "## Targets",
            "",
            "| Target | Measured | Result |",
            "| --- | --- | --- |",
            *(
                f"| {target.name} | {target.measured} | {'met' if target.met else 'missed: ' + target.shortfall} |"
                for target in targets
            ),
            "",
            *self._queue_section(),
            *self._cost_breakdown(),
            "## Duplicate lookup at both sizes",
            "",
            "The app's duplicate check (`SELECT status FROM stripe_event WHERE event_id = …`), explained by "
            "PostgreSQL after each load:",
            "",
            "| stripe_event rows | event_id index | buffers touched | execution |",
            "| --- | --- | --- | --- |",
            *(
                f"| {rows:,} | {lookup.index_mb:.1f} MB | {lookup.buffers} | {lookup.execution_ms:.3f} ms |"
                for rows, lookup in sorted(results.lookups.items())
            ),
            "",
            "## What the runs did",
            "",
            "Every event in stripe_event after the webhook runs (the duplicates included):",
            "",
            "| type | status | outcome | events | deliveries |",
            "| --- | --- | --- | --- | --- |",
            *(
                f"| {kind} | {status} | {outcome} | {count:,} | {tries:,} |"
                for kind, status, outcome, count, tries in results.outcomes
            ),
            "",
            f"gunicorn replaced workers after max_requests {results.recycled['app']} times in the app and "
            f"{results.recycled['anchor']} times in the anchors during the runs.",
            "",
            "Every outcome is the expected one."
            if not unexpected
            else f"**{len(unexpected)} unexpected outcome(s) above: these runs did not measure what they claim.**",
            "",
            "## Analysis",
            "",
            analysis,
            "",
        ]
        return "\n".join(lines)

    def _queue_section(self) -> list[str]:
        burst = self.results.burst
        slow = self.results.paced[self.results.paced_rate]
        store = self.summaries[STORE_ONLY]
        return [
            "## The queue (issue 12)",
            "",
            "Webhooks are stored by the request (one statement, no job), given a job by a worker's dispatch "
            "pass and applied by `flask billing worker` from Stripe's current object (docs/system/BILLING.md, "
            "section 5). Figures from this run, against its anchors:",
            "",
            "- Acknowledging new events (store the event, one statement on the autocommit connection): "
            f"{self.summaries[NEW].rate:,.0f} req/s, "
            f"**{self.ratio(NEW, STORE_ONLY):.2f}×** the store-only anchor ({store.rate:,.0f} req/s, one INSERT).",
            f"- At {self.results.paced_rate} req/s offered while a worker ({SLOW_WORKER}) applies queued events and "
            f"every Stripe answer takes 300 ms: p50 {_ms(slow.p50_ms)} ms, p99 **{_ms(slow.p99_ms)} ms** "
            f"({slow.p99_ms / 20:.2f}× the 20 ms bound), {slow.errors} errors.",
            f"- A burst of {burst.deliveries:,} deliveries ({burst.deliveries // burst.subscriptions} each for "
            f"{burst.subscriptions} real subscriptions at the sandbox, half of which had changed at Stripe): "
            f"sent in {burst.send_seconds:.1f} s ({burst.errors} errors), **fully applied "
            f"{burst.applied_seconds:.1f} s** after the first was sent ({burst.applied_seconds / 30:.2f}× the 30 s "
            f"bound), with **{burst.stripe_reads} Stripe reads** ({burst.stripe_reads / 400:.2f}× the 400 bound; "
            f"{burst.stripe_reads / burst.subscriptions:.2f} per subscription); {burst.settled:,} events settled, "
            f"{burst.matching} of {burst.subscriptions} organizations hold Stripe's status.",
            f"- Worker memory after the burst: {burst.worker_rss_mb:.0f} MB RSS (one `flask billing worker` process, "
            f"concurrency {BURST_CONCURRENCY}).",
            f"- A worker SIGKILLed while it held {burst.kill_claimed} objects' jobs (Stripe answering in 300 ms): "
            + (
                "their events were not applied within 180 s."
                if burst.kill_recovered_seconds is None
                else f"another worker had applied them {burst.kill_recovered_seconds:.1f} s after the kill "
                "(the dead worker's heartbeat going WORKER_STALLED_SECONDS (10) stale, then the new worker's own "
                "recovery, which looks every WORKER_RECOVERY_SECONDS (5))."
            ),
            "",
        ]

    def _cost_breakdown(self) -> list[str]:
        """For each missed throughput target: CPU per request, app against anchor. The runs keep both cores
        busy, so throughput is cores / CPU per request."""
        lines = []
        for name, anchor, target in ((NEW, STORE_ONLY, 0.9), (DUPLICATE, VERIFY_ONLY, 0.9)):
            if self.ratio(name, anchor) >= target:
                continue
            app, base = self.summaries[name], self.summaries[anchor]
            label = name.removeprefix("Webhook: ")
            lines += [
                f"- {label[:1].upper() + label[1:]}, against the {anchor.removeprefix('Webhook: ')}: CPU per "
                f"request {_cpu(app)} against {_cpu(base)}. At {target}× the anchor's rate the same cores allow "
                f"{_total_cpu_ms(base) / target:.2f} ms per request: the app would have to shed "
                f"{_total_cpu_ms(app) - _total_cpu_ms(base) / target:.2f} ms.",
            ]
        if lines:
            forged, verify = self.summaries[FORGED], self.summaries[VERIFY_ONLY]
            lines += [
                f"- Of that, the app's fixed cost: a delivery it refuses right after the HMAC check costs "
                f"{forged.server_cpu_ms:.2f} ms of gunicorn CPU, against {verify.server_cpu_ms:.2f} ms for the whole "
                "verify-only anchor (the app's extensions, hooks and request log, before any database work).",
            ]
            lines = ["### Where the CPU goes (missed throughput targets)", "", *lines, ""]
        return lines


def _total_cpu_ms(summary: Summary) -> float:
    return summary.server_cpu_ms + summary.database_cpu_ms + summary.generator_cores * 1000 / summary.rate


def _cpu(summary: Summary) -> str:
    generator_ms = summary.generator_cores * 1000 / summary.rate
    return (
        f"{_total_cpu_ms(summary):.2f} ms (gunicorn {summary.server_cpu_ms:.2f}, PostgreSQL "
        f"{summary.database_cpu_ms:.2f}, generator {generator_ms:.2f}; "
        f"{_total_cpu_ms(summary) * summary.rate / 1000:.2f} cores busy)"
    )


def machine_facts(versions: str) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_kb = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal")))
    git = ["git", "describe", "--always", "--dirty"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()  # noqa: S603
    return [
        f"CPU: {model}, {os.cpu_count()} cores",
        f"Memory: {memory_kb / 2**20:.1f} GiB",
        f"{versions}, Python {platform.python_version()}",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"Commit: {commit or 'unknown'} (`-dirty`: with uncommitted changes)",
    ]
