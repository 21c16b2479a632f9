"""The usage API and its reporting to Stripe (issue 26), against a store-only anchor:

1. Acknowledging usage: POST /api/v1/usage (an API key, one event, or a batch of 100) against the anchor's
   POST /usage-store-only (bench/anchor.py: one INSERT ... ON CONFLICT into a table shaped like usage_event,
   and a commit), both under the same gunicorn.conf.py, wrk with bench/usage.lua, closed loop, rounds
   interleaved. Counted in events per second.
2. Reporting: the events the app stored are then reported to the offline Stripe sandbox by one worker
   process running BillingService.report_usage (the worker's usage:report task) until nothing is left,
   timed: stored events reported per second, and the Stripe requests it made, per 1M usage events.

`python -m bench usage` runs these alone (about 3 minutes) and replaces their section of
docs/PERFORMANCE.md; `make bench` runs them too."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.burst import Sandbox
from bench.loads import CONNECTIONS, WRK_THREADS, Latencies, Run, measured, run_wrk
from bench.services import Server, Services, in_turn

ORGANIZATIONS = 20  # each with its own API key and Stripe customer, on the starter tier (overage billed)
TIER = "starter"
INCLUDED = 1_000  # plans.toml: api_calls on starter
QUANTITY = 10  # per event (bench/usage.lua)
BATCH = 100
ROUNDS = 3
SECONDS = 10
USAGE_TABLES = ("usage_event", "anchor_usage")  # what the runs insert into
WARM_UP_SECONDS = 3
GOAL = 0.8
STRIPE_REQUESTS_GOAL = 1_000
SECTION = "## Usage events (issue 26)"
LUA_SCRIPT = Path(__file__).with_name("usage.lua")
API_PATH = "/api/v1/usage"
ANCHOR_PATH = "/usage-store-only"
SINGLE_ANCHOR = "Usage: store-only anchor, one event per request"
SINGLE = "Usage API: one event per request"
BATCH_ANCHOR = f"Usage: store-only anchor, batches of {BATCH}"
BATCHED = f"Usage API: batches of {BATCH}"
SCENARIOS: dict[str, tuple[str, str, int]] = {  # name: (server, path, events per request)
    SINGLE_ANCHOR: ("anchor", ANCHOR_PATH, 1),
    SINGLE: ("app", API_PATH, 1),
    BATCH_ANCHOR: ("anchor", ANCHOR_PATH, BATCH),
    BATCHED: ("app", API_PATH, BATCH),
}
# One worker process: the worker's usage:report task, run again until nothing is left to report.
REPORTER = """
import json, time
from wsgi import app
from app.services.billing_service import BillingService
with app.app_context():
    started, passes, sent, failed, gathered = time.perf_counter(), 0, 0, 0, 0
    while True:
        run = BillingService.report_usage()
        passes += 1
        sent, failed, gathered = sent + run.sent, failed + run.failed, gathered + run.gathered
        if run.errors and not run.sent:
            break
        if not (run.gathered or run.sent or run.still_pending):
            break
    print("REPORT " + json.dumps({"seconds": time.perf_counter() - started, "passes": passes, "sent": sent,
                                  "failed": failed, "gathered": gathered, "errors": run.errors[:5]}))
"""


@dataclass(frozen=True)
class Reporting:
    events: int  # stored events waiting for the tally (and their billable part for a report) at the start
    billable_units: int  # the units the tally found past what is included, all in reports
    seconds: float
    passes: int
    reports_sent: int
    reports_failed: int
    meter_event_requests: int  # POST /v1/billing/meter_events the sandbox logged
    stripe_requests: int  # every /v1 request the sandbox logged meanwhile
    units_sent: int  # the quantity of the reports marked sent
    left_unreported: int
    errors: list[str]


@dataclass(frozen=True)
class UsageResults:
    rounds: dict[str, list[Run]]
    stored: dict[str, int]  # table: rows after the runs
    acknowledged: dict[str, int]  # table: events the generator saw answered 2xx
    reporting: Reporting

    def events_per_second(self, name: str) -> list[float]:
        return [run.rate * SCENARIOS[name][2] for run in self.rounds[name]]

    def rate(self, name: str) -> float:
        return statistics.median(self.events_per_second(name))

    def ratio(self, name: str, anchor: str) -> float:
        return self.rate(name) / self.rate(anchor)

    def app_events(self) -> int:
        return self.stored["usage_event"]

    def requests_per_million(self) -> float:
        return self.reporting.stripe_requests * 1_000_000 / max(self.app_events(), 1)


class UsageBench:
    def __init__(self, services: Services, workdir: Path) -> None:
        self.services = services
        self.keys_file = workdir / "usage-keys.txt"
        self.next_request = 0
        self.acknowledged = {"usage_event": 0, "anchor_usage": 0}

    def set_up(self) -> None:
        """The organizations (with a Stripe customer at the sandbox each), their API keys, and anchor_usage."""
        sandbox = Sandbox(self.services.sandbox_url, self.services.env["STRIPE_SECRET_KEY"])
        keys = []
        with self.services.sql() as cursor:
            # Shaped like usage_event: its columns, checks and indexes (LIKE ... INCLUDING ALL), and its
            # foreign keys, which LIKE leaves out and which a store into the product's schema pays (a
            # row check against organization per event, about 4 µs of PostgreSQL's time each).
            cursor.execute(
                "CREATE TABLE anchor_usage (LIKE usage_event INCLUDING ALL);"
                "ALTER TABLE anchor_usage ALTER id DROP DEFAULT, ALTER id ADD GENERATED BY DEFAULT AS IDENTITY,"
                " ADD FOREIGN KEY (organization_id) REFERENCES organization (id) ON DELETE RESTRICT,"
                " ADD FOREIGN KEY (report_id) REFERENCES usage_report (id) ON DELETE RESTRICT"
            )
            for n in range(ORGANIZATIONS):
                customer = sandbox.api("POST", "/v1/customers", {"email": f"usage{n}@bench.example"})
                cursor.execute(
                    "INSERT INTO organization (name, tier, billing_status, billing_customer_id, "
                    "billing_subscription_id, cancel_at_period_end, created_at, updated_at) "
                    "VALUES (%s, %s, 'active', %s, %s, false, now(), now()) RETURNING id",
                    (f"Usage organization {n}", TIER, customer["id"], f"sub_usage_{n}"),
                )
                organization_id = cursor.fetchone()[0]
                key = f"llk_bench_{organization_id}_{secrets.token_hex(16)}"
                cursor.execute(
                    "INSERT INTO api_key (organization_id, name, prefix, key_hash, created_at) "
                    "VALUES (%s, 'bench', %s, %s, now())",
                    (organization_id, key[:12], hashlib.sha256(key.encode()).hexdigest()),
                )
                keys.append(key)
        self.keys_file.write_text("\n".join(keys) + "\n")

    def wrk(self, port: int, path: str, batch: int, seconds: int) -> Latencies:
        first = self.next_request
        arguments = [str(batch), str(first), str(WRK_THREADS), str(self.keys_file)]
        latencies, most_sent = run_wrk(LUA_SCRIPT, f"http://127.0.0.1:{port}{path}", arguments, seconds)
        self.next_request = first + WRK_THREADS * most_sent
        table = "anchor_usage" if path == ANCHOR_PATH else "usage_event"
        self.acknowledged[table] += (latencies.requests - latencies.errors) * batch
        return latencies

    def run_one(self, name: str, seconds: int) -> Run:
        server_name, path, batch = SCENARIOS[name]
        server: Server = self.services.app if server_name == "app" else self.services.anchor
        load = partial(self.wrk, server.port, path, batch, seconds)
        measurement = measured(server, self.services.postmaster_pid(), load)
        self.settle()
        return measurement

    def settle(self, timeout: float = 60) -> None:
        """Wait for the requests still in flight when wrk stopped (a batch can take seconds) to be stored,
        so they neither overlap the next run nor arrive after the reporting started: until no other
        connection to the database is running a statement or holding a transaction open, twice in a row."""
        quiet, deadline = 0, time.monotonic() + timeout
        while quiet < 2 and time.monotonic() < deadline:
            with self.services.sql() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND state <> 'idle'"
                )
                busy = cursor.fetchone()[0]
            quiet = quiet + 1 if busy == 0 else 0
            time.sleep(0.5)

    def report(self) -> Reporting:
        with self.services.sql() as cursor:  # the API's events are stored, not tallied: the reporter tallies them
            cursor.execute("SELECT count(*) FROM usage_event WHERE billable_quantity IS NULL AND report_id IS NULL")
            events = cursor.fetchone()[0]
        sandbox = Sandbox(self.services.sandbox_url, self.services.env["STRIPE_SECRET_KEY"])
        mark = sandbox.last_seq()
        command = [sys.executable, "-c", REPORTER]
        done = subprocess.run(command, env=self.services.env, capture_output=True, text=True, check=False)  # noqa: S603
        line = next((line for line in done.stdout.splitlines() if line.startswith("REPORT ")), None)
        if line is None:
            raise RuntimeError(f"the reporting worker failed:\n{done.stderr[-3000:]}")
        result = json.loads(line[7:])
        requests, meter_events, after = 0, 0, mark
        while True:
            page = sandbox.http.get(
                f"{sandbox.url}/_sandbox/requests", params={"after": after, "limit": 1000}, timeout=30
            ).json()
            for made in page["requests"]:
                requests += 1
                meter_events += made["method"] == "POST" and made["path"] == "/v1/billing/meter_events"
            if not page["requests"]:
                break
            after = page["last_seq"]
        with self.services.sql() as cursor:
            cursor.execute("SELECT coalesce(sum(quantity), 0) FROM usage_report WHERE status = 'sent'")
            units_sent = cursor.fetchone()[0]
            cursor.execute("SELECT coalesce(sum(billable_quantity), 0) FROM usage_event WHERE report_id IS NOT NULL")
            units = cursor.fetchone()[0]
            cursor.execute(
                "SELECT count(*) FROM usage_event WHERE billable_quantity IS NULL"
                " OR (billable_quantity > 0 AND report_id IS NULL)"
            )
            left = cursor.fetchone()[0]
        return Reporting(
            events=events,
            billable_units=int(units),
            seconds=result["seconds"],
            passes=result["passes"],
            reports_sent=result["sent"],
            reports_failed=result["failed"],
            meter_event_requests=meter_events,
            stripe_requests=requests,
            units_sent=int(units_sent),
            left_unreported=left,
            errors=result["errors"],
        )

    def stored(self) -> dict[str, int]:
        counts = {}
        with self.services.sql() as cursor:
            for table in ("usage_event", "anchor_usage"):
                cursor.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 (our own table names)
                counts[table] = cursor.fetchone()[0]
        return counts


def run(services: Services, workdir: Path, step: Callable[[str], None]) -> UsageResults:
    bench = UsageBench(services, workdir)
    step(f"usage: {ORGANIZATIONS} organizations with an API key and a Stripe customer each")
    bench.set_up()
    step("usage: warming up")
    for name in SCENARIOS:
        bench.run_one(name, WARM_UP_SECONDS)
    services.maintain()
    rounds: dict[str, list[Run]] = {name: [] for name in SCENARIOS}
    for number in range(1, ROUNDS + 1):
        # Every other round in the reverse order, each run on a quiet database (as the webhook rounds).
        for name in in_turn(list(SCENARIOS), number):
            services.quiesce(USAGE_TABLES)
            step(f"usage round {number}/{ROUNDS}: {name}")
            rounds[name].append(bench.run_one(name, SECONDS))
    stored = bench.stored()
    step(f"usage: one worker reporting the {stored['usage_event']:,} stored events' billable usage to the sandbox")
    reporting = bench.report()
    return UsageResults(rounds=rounds, stored=stored, acknowledged=dict(bench.acknowledged), reporting=reporting)


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def markdown(results: UsageResults) -> str:
    def row(name: str, compared: str) -> str:
        runs = results.rounds[name]
        batch = SCENARIOS[name][2]
        rates = results.events_per_second(name)

        def median(field: str) -> Any:
            return statistics.median(getattr(run, field) for run in runs)

        return (
            f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) | "
            f"{median('rate'):,.0f} | {_ms(median('p50_ms'))} | {_ms(median('p99_ms'))} | "
            f"{sum(run.errors for run in runs)} | {median('server_cpu_ms') / batch:.3f} | "
            f"{median('database_cpu_ms') / batch:.3f} | {compared} |"
        )

    single, batched = (_ratio(results.ratio(SINGLE, SINGLE_ANCHOR)), _ratio(results.ratio(BATCHED, BATCH_ANCHOR)))
    reporting = results.reporting
    per_million = results.requests_per_million()
    app_rate = results.rate(BATCHED)
    every_minute = ORGANIZATIONS * 1_000_000 / (60 * app_rate)
    return "\n".join(
        [
            SECTION,
            "",
            f"Written by `python -m bench usage` (and `make bench`): {ORGANIZATIONS} organizations on the {TIER} tier "
            f"(api_calls: {INCLUDED:,} included, the overage billed), each with an API key and a customer at the "
            f"sandbox; every event is {QUANTITY} api_calls with a new idempotency key, the organizations' keys "
            f"used in turn. wrk (bench/usage.lua), {WRK_THREADS} threads, {CONNECTIONS} keep-alive connections, "
            f"{SECONDS} s per run after a warm-up, {ROUNDS} rounds of the four runs in turn (every other round "
            "reversed, each run on a quiet database, vacuumed and checkpointed, as the webhook rounds); medians "
            "and the range. "
            "The anchor (bench/anchor.py, POST /usage-store-only) runs under the same gunicorn.conf.py and does only "
            "the store: the organization read from the key's text, one INSERT … ON CONFLICT DO NOTHING into "
            "anchor_usage (`LIKE usage_event INCLUDING ALL` and the same foreign keys: the same indexes, checks and "
            "references), from one jsonb_to_recordset for a "
            "batch, and a commit. CPU columns are per event.",
            "",
            "| Measurement | events/s median (range) | req/s | p50 ms | p99 ms | errors | server CPU ms/event "
            "| PostgreSQL CPU ms/event | compared |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            row(SINGLE_ANCHOR, "the anchor"),
            row(SINGLE, f"**{single}× store-only** (goal ≥ {GOAL}×)"),
            row(BATCH_ANCHOR, "the anchor"),
            row(BATCHED, f"**{batched}× store-only** (goal ≥ {GOAL}×)"),
            "",
            f"- Stored: {results.stored['usage_event']:,} usage events ({results.acknowledged['usage_event']:,} "
            f"acknowledged 2xx to the generator; requests in flight when a run ended are stored but not counted), "
            f"{results.stored['anchor_usage']:,} anchor rows ({results.acknowledged['anchor_usage']:,} acknowledged).",
            f"- Reporting, one worker process (BillingService.report_usage, the worker's usage:report task, run "
            f"{reporting.passes} times until nothing was left): {reporting.events:,} stored events tallied "
            f"({reporting.billable_units:,} units past what is included) and gathered into {reporting.reports_sent:,} "
            f"reports, sent in {reporting.seconds:.2f} s: **{reporting.events / reporting.seconds:,.0f} events "
            f"reported per second**; {reporting.reports_failed} reports failed, {reporting.left_unreported} "
            f"events left untallied or unreported; units in sent reports {reporting.units_sent:,} "
            + (
                "(equal to the billable units)."
                if reporting.units_sent == reporting.billable_units
                else "**(not equal to the billable units)**."
            )
            + (f" Errors: {'; '.join(reporting.errors)}." if reporting.errors else ""),
            f"- Stripe requests: {reporting.stripe_requests:,} ({reporting.meter_event_requests:,} meter events) for "
            f"the {results.app_events():,} usage events stored: **{per_million:,.0f} per 1M usage events** (goal under "
            f"{STRIPE_REQUESTS_GOAL:,}), extrapolated linearly from this run, where every organization's backlog was "
            "reported at once. The count follows the reports, one per organization, meter and billing period per "
            f"gathering (at most 50,000 events each), not the events: with the worker reporting every minute, "
            f"{ORGANIZATIONS} organizations sending {app_rate:,.0f} events/s between them (the batched rate) would "
            f"cost at most {every_minute:,.1f} requests per 1M events.",
            "",
        ]
    )


def with_section(document: str, results: UsageResults) -> str:
    """The document with this section replaced (or appended), the rest left as it is."""
    start = document.find(SECTION)
    if start >= 0:
        following = document.find("\n## ", start + len(SECTION))
        document = document[:start] + (document[following + 1 :] if following >= 0 else "")
    return document.rstrip("\n") + "\n\n" + markdown(results)


def main() -> None:
    from bench.__main__ import step  # noqa: PLC0415 (bench.__main__ imports this module)

    root = Path(__file__).resolve().parent.parent
    workdir = root / "instance" / "bench-usage"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    step("setting up: the database, a redis-server, the app, the anchors, the Stripe sandbox, a mail sink")
    started = time.monotonic()
    with Services(workdir) as services:
        results = run(services, workdir, step)
        step("stopping the servers and dropping the database")
    section = markdown(results)
    print(section)
    document = root / "docs" / "PERFORMANCE.md"
    document.write_text(with_section(document.read_text() if document.exists() else "", results))
    step(f"wrote its section of {document.relative_to(root)} ({(time.monotonic() - started) / 60:.1f} minutes)")
