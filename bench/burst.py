"""The queue benchmarks (issue 12): a burst of deliveries applied by the worker against the offline
Stripe sandbox, and the worker's memory.

A burst: SUBSCRIPTIONS real subscriptions at the sandbox (each paid on its Checkout page), each held by
an organization; half of them then change at Stripe (past_due); then DELIVERIES_PER_SUBSCRIPTION
customer.subscription.updated deliveries for each, interleaved, as fast as the generator sends them.
Measured: from the first delivery sent to the last event's state written (its processed_at), how many
Stripe reads the worker made (the sandbox's request log), and whether every organization ended with
Stripe's state."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from bench import events
from bench.loads import PROXY_HEADERS, _KeepAliveConnections
from bench.services import Services, _kilobytes, children

SUBSCRIPTIONS = 200
DELIVERIES_PER_SUBSCRIPTION = 10
WORKER_CONCURRENCY = 8
WEBHOOK_PATH = "/billing/webhooks/stripe"
TIMEOUT_SECONDS = 180
KILL_SUBSCRIPTIONS = 40
KILL_STRIPE_SECONDS = 0.3  # Stripe answers slowly, so the killed worker has jobs in flight
KILL_TIMEOUT_SECONDS = 180


@dataclass(frozen=True)
class Burst:
    deliveries: int
    subscriptions: int
    send_seconds: float  # the generator, first delivery to last answer
    applied_seconds: float  # first delivery sent to the last event's state written
    stripe_reads: int
    settled: int  # events processed or ignored
    matching: int  # organizations whose status is Stripe's
    errors: int  # non-2xx answers to deliveries
    worker_rss_mb: float
    kill_claimed: int  # objects the SIGKILLed worker held jobs for
    kill_recovered_seconds: float | None  # SIGKILL to their events applied by another worker (None: not within)


class Sandbox:
    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.auth = (api_key, "")

    def api(self, method: str, path: str, data: dict[str, str] | None = None) -> dict[str, Any]:
        response = self.http.request(method, f"{self.url}{path}", data=data, timeout=30)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def paid_subscription(self, price_id: str, n: int) -> dict[str, Any]:
        session = self.api(
            "POST",
            "/v1/checkout/sessions",
            {
                "mode": "subscription",
                "line_items[0][price]": price_id,
                "line_items[0][quantity]": "1",
                "customer_email": f"burst{n}@bench.example",
                "success_url": "https://billing.bench.example/done",
                "cancel_url": "https://billing.bench.example/",
            },
        )
        paid = self.http.post(
            f"{self.url}/checkout/{session['id']}",
            data={
                "email": f"burst{n}@bench.example",
                "cardNumber": "4242 4242 4242 4242",
                "cardExpiry": "12 / 34",
                "cardCvc": "123",
                "billingName": "Bench Customer",
            },
            allow_redirects=False,
            timeout=30,
        )
        if paid.status_code != 303:
            raise RuntimeError(f"paying {session['id']} at the sandbox: {paid.status_code} {paid.text[-500:]}")
        subscription_id = self.api("GET", f"/v1/checkout/sessions/{session['id']}")["subscription"]
        return self.api("GET", f"/v1/subscriptions/{subscription_id}")

    def force(self, object_id: str, **fields: Any) -> None:
        self.http.post(f"{self.url}/_sandbox/objects/{object_id}", json=fields, timeout=10).raise_for_status()

    def last_seq(self) -> int:
        return int(self.http.get(f"{self.url}/_sandbox/requests/last_seq", timeout=10).json()["last_seq"])

    def subscription_reads(self, after: int) -> int:
        reads = 0
        while True:
            page = self.http.get(
                f"{self.url}/_sandbox/requests", params={"after": after, "limit": 1000}, timeout=30
            ).json()
            for made in page["requests"]:
                reads += made["method"] == "GET" and made["path"].startswith("/v1/subscriptions/")
            if not page["requests"]:
                return reads
            after = page["last_seq"]


def run_burst(services: Services, step: Any) -> Burst:
    sandbox = Sandbox(services.sandbox_url, services.env["STRIPE_SECRET_KEY"])
    [price] = sandbox.api("GET", "/v1/prices?lookup_keys[]=starter_monthly")["data"]
    step(f"burst: {SUBSCRIPTIONS} subscriptions paid at the sandbox")
    subscriptions = [sandbox.paid_subscription(price["id"], n) for n in range(SUBSCRIPTIONS)]
    with services.sql() as cursor:
        # What the earlier runs stored and queued for the bench's made-up subscriptions (sub_bench_*) is
        # not this measurement's: left pending, the sweep would queue them again, and their reads
        # (each a 404 at the sandbox) would spend the Stripe read budget the burst is measured against.
        cursor.execute("DELETE FROM procrastinate_jobs WHERE status = 'todo'")
        cursor.execute("DELETE FROM stripe_event WHERE status = 'pending'")
        for n, subscription in enumerate(subscriptions):
            cursor.execute(
                "INSERT INTO organization (name, tier, billing_status, billing_customer_id, billing_subscription_id, "
                "cancel_at_period_end, created_at, updated_at) VALUES (%s, 'starter', 'active', %s, %s, false, "
                "now(), now())",
                (f"Burst organization {n}", subscription["customer"], subscription["id"]),
            )
    expected = {}
    for n, subscription in enumerate(subscriptions):
        status = "past_due" if n % 2 else "active"
        if status != "active":
            sandbox.force(subscription["id"], status=status)
        expected[subscription["id"]] = status
    services.maintain()
    worker = services.start_worker(WORKER_CONCURRENCY)
    time.sleep(3)  # the worker is up and listening
    mark = sandbox.last_seq()
    bodies = []
    for round_number in range(DELIVERIES_PER_SUBSCRIPTION):
        for subscription in subscriptions:
            event = {
                "id": f"evt_burst_{uuid.uuid4().hex}",
                "object": "event",
                "api_version": events.STRIPE_API_VERSION,
                "created": int(time.time()) + round_number,
                "livemode": False,
                "pending_webhooks": 1,
                "request": {"id": None, "idempotency_key": None},
                "type": "customer.subscription.updated",
                "data": {"object": subscription},
            }
            bodies.append(json.dumps(event))
    connections = _KeepAliveConnections(services.app.port)
    secret = services.webhook_secret

    def deliver(body: str) -> bool:
        headers = {**PROXY_HEADERS, "Content-Type": "application/json", "Stripe-Signature": events.sign(body, secret)}
        try:
            return 200 <= connections.post(WEBHOOK_PATH, body.encode(), headers) < 300
        except OSError:
            return False

    step(f"burst: {len(bodies):,} deliveries across {SUBSCRIPTIONS} subscriptions, the worker applying them")
    started_wall = time.time()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as executor:
        answers = list(executor.map(deliver, bodies))
    send_seconds = time.perf_counter() - started
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        with services.sql() as cursor:
            cursor.execute(
                "SELECT count(*) FROM stripe_event "
                "WHERE event_id LIKE 'evt_burst_%%' AND status IN ('processed', 'ignored')"
            )
            settled = cursor.fetchone()[0]
        if settled >= sum(answers):
            break
        time.sleep(0.2)
    with services.sql() as cursor:
        cursor.execute(
            "SELECT extract(epoch FROM max(processed_at)) FROM stripe_event WHERE event_id LIKE 'evt_burst_%%'"
        )
        last_written = float(cursor.fetchone()[0] or started_wall)
        cursor.execute(
            "SELECT count(*) FROM organization WHERE billing_subscription_id = ANY(%s) AND billing_status = "
            "(%s::jsonb ->> billing_subscription_id)",
            (list(expected), json.dumps(expected)),
        )
        matching = cursor.fetchone()[0]
    reads = sandbox.subscription_reads(mark)
    rss = sum(_kilobytes(f"/proc/{pid}/status", "VmRSS") for pid in [worker.process.pid, *children(worker.process.pid)])
    step("a worker SIGKILLed with jobs in flight (Stripe answering in 300 ms): until another applies them")
    claimed, recovered = kill_and_recover(services, subscriptions[:KILL_SUBSCRIPTIONS], deliver)
    services.stop_worker()
    return Burst(
        deliveries=len(bodies),
        subscriptions=SUBSCRIPTIONS,
        send_seconds=send_seconds,
        applied_seconds=last_written - started_wall,
        stripe_reads=reads,
        settled=settled,
        matching=matching,
        errors=len(answers) - sum(answers),
        worker_rss_mb=rss / 1024,
        kill_claimed=claimed,
        kill_recovered_seconds=recovered,
    )


def kill_and_recover(services: Services, subscriptions: list[dict[str, Any]], deliver: Any) -> tuple[int, float | None]:
    """One event for each subscription, the worker SIGKILLed once it holds jobs, a new worker started:
    the seconds from the kill until every event about the objects it held is applied (the dead
    worker's heartbeat going WORKER_STALLED_SECONDS stale, the new worker's recovery, which looks
    every WORKER_RECOVERY_SECONDS, and the application itself)."""
    services.set_stripe_latency(KILL_STRIPE_SECONDS)
    try:
        bodies = []
        for subscription in subscriptions:
            event = {
                "id": f"evt_kill_{uuid.uuid4().hex}",
                "object": "event",
                "api_version": events.STRIPE_API_VERSION,
                "created": int(time.time()),
                "livemode": False,
                "pending_webhooks": 1,
                "request": {"id": None, "idempotency_key": None},
                "type": "customer.subscription.updated",
                "data": {"object": subscription},
            }
            bodies.append(json.dumps(event))
        with ThreadPoolExecutor(max_workers=8) as executor:
            list(executor.map(deliver, bodies))
        deadline = time.monotonic() + 30
        claimed: list[str] = []
        while time.monotonic() < deadline and not claimed:
            with services.sql() as cursor:
                cursor.execute(
                    "SELECT lock FROM procrastinate_jobs WHERE status = 'doing' AND task_name = 'webhooks:apply'"
                )
                claimed = [row[0].partition(":")[2] for row in cursor.fetchall()]
            time.sleep(0.05)
        if not claimed or services.worker is None:
            return 0, None
        os.killpg(services.worker.process.pid, signal.SIGKILL)  # the worker runs in a session of its own
        killed = time.monotonic()
        services.worker.process.wait()
        services.stop_worker()
        services.start_worker(WORKER_CONCURRENCY)
        while time.monotonic() < killed + KILL_TIMEOUT_SECONDS:
            with services.sql() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM stripe_event WHERE event_id LIKE 'evt_kill_%%' AND object_key = ANY(%s) "
                    "AND status = 'pending'",
                    (claimed,),
                )
                if cursor.fetchone()[0] == 0:
                    return len(claimed), time.monotonic() - killed
            time.sleep(0.2)
        return len(claimed), None
    finally:
        services.set_stripe_latency(0)
