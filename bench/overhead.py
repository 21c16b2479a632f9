"""`python -m bench.overhead`: Flask's fixed per-request cost on the webhook route, in-process (no
server, no network), so the cost of the framework and the app's hooks is seen apart from the work.

Each figure is the median of ROUNDS rounds of REQUESTS calls of the WSGI callable with one prepared
request: a bare WSGI function (the floor), a one-route Flask app, the product's webhook route with an
unknown provider (everything the route carries, none of its work), a forged delivery (refused after
the signature check), duplicates of a settled event (verified, then answered from the process's
memory of settled events) and of a pending one (verified, one statement), and new events. Needs
DATABASE_URL (PostgreSQL) and REDIS_URL, as the app does; it writes event rows. `--profile` prints
where the unknown-provider request spends its time."""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import hmac
import io
import json
import logging
import os
import pstats
import statistics
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, jsonify
from sqlalchemy import event as sqlalchemy_event
from werkzeug.test import EnvironBuilder

from app import create_app
from app.extensions import db
from config import TestConfig

SECRET = "whsec_overhead"  # noqa: S105  (a throwaway signing secret of this measurement)

ROUNDS = 5
REQUESTS = 1000
WSGI = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    return lambda data: None


class Figures:
    """Per request: wall time, this process's CPU time (what the framework costs, whatever the load on
    the machine) and the SQL statements sent (the database round trips)."""

    statements = 0

    def __init__(self, wall: list[float], cpu: list[float], statements: float) -> None:
        self.wall = statistics.median(wall)
        self.cpu = statistics.median(cpu)
        self.statements = statements

    def __str__(self) -> str:
        return f"{self.wall:9.1f} µs wall {self.cpu:9.1f} µs CPU {self.statements:5.1f} statements"


def _count_statements(*args: Any) -> None:
    Figures.statements += 1


def per_request(app: WSGI, environs: Callable[[], list[dict[str, Any]]]) -> Figures:
    wall, cpu = [], []
    counted = 0
    requests = 0
    for _ in range(ROUNDS):
        prepared = environs()
        for environ in prepared:
            environ["wsgi.input"] = io.BytesIO(environ["bench.body"])
        before = Figures.statements
        started, started_cpu = time.perf_counter(), time.process_time()
        for environ in prepared:
            for chunk in app(environ, _start_response):
                del chunk
        wall.append((time.perf_counter() - started) / len(prepared) * 1e6)
        cpu.append((time.process_time() - started_cpu) / len(prepared) * 1e6)
        counted += Figures.statements - before
        requests += len(prepared)
    return Figures(wall, cpu, counted / requests)


def same_request(environ: dict[str, Any], requests: int = REQUESTS) -> Callable[[], list[dict[str, Any]]]:
    return lambda: [dict(environ) for _ in range(requests)]


def bare_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b'{"received": true}']


def minimal_flask() -> Flask:
    app = Flask("minimal")

    @app.post("/billing/webhooks/<provider>")
    def webhook(provider: str) -> Any:
        return jsonify(received=True)

    return app


def new_events(secret: str, requests: int = 300) -> Callable[[], list[dict[str, Any]]]:
    """A new event per request (stored, pending, with what wakes a worker): each body signed beforehand."""

    def prepare() -> list[dict[str, Any]]:
        prepared = []
        for _ in range(requests):
            event = _event("customer.subscription.updated", f"sub_{uuid.uuid4().hex[:24]}")
            body = json.dumps(event).encode()
            prepared.append(environ_for("/billing/webhooks/stripe", body, signed(body, secret)))
        return prepared

    return prepare


def _event(event_type: str, object_id: str) -> dict[str, Any]:
    kind = "subscription" if object_id.startswith("sub_") else "customer"
    return {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(time.time()),
        "livemode": False,
        "type": event_type,
        "data": {"object": {"id": object_id, "object": kind, "status": "active", "customer": "cus_overhead"}},
    }


def environ_for(path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    environ = EnvironBuilder(path=path, method="POST", data=body, headers=headers).get_environ()
    environ["bench.body"] = body
    return environ


def product_app() -> Flask:
    os.environ.setdefault("TEST_DATABASE_URL", os.environ.get("DATABASE_URL", ""))
    os.environ.setdefault("TEST_REDIS_URL", os.environ.get("REDIS_URL", ""))
    app = create_app(TestConfig(), STRIPE_SECRET_KEY="sk_test_" + "overhead", STRIPE_WEBHOOK_SECRET=SECRET)
    logging.getLogger("app.request").setLevel(logging.WARNING)  # as in production at WARNING; see --log
    return app


def signed(body: bytes, secret: str) -> dict[str, str]:
    timestamp = int(time.time())
    signature = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={timestamp},v1={signature}", "Content-Type": "application/json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--log", action="store_true", help="keep the request log at INFO (the default level)")
    options = parser.parse_args()
    app = product_app()
    if options.log:
        logging.getLogger("app.request").setLevel(logging.INFO)
    event = _event("customer.created", "cus_overhead")
    body = json.dumps(event).encode()
    headers = signed(body, SECRET)
    first = app.test_client().post("/billing/webhooks/stripe", data=body, headers=headers)
    assert first.status_code == 200, first.get_data(as_text=True)
    unknown = environ_for("/billing/webhooks/nope", body, headers)
    forged = environ_for("/billing/webhooks/stripe", body, signed(body, "whsec_forged"))
    pending = json.dumps(_event("customer.subscription.updated", f"sub_{uuid.uuid4().hex[:24]}")).encode()
    pending_headers = signed(pending, SECRET)
    assert app.test_client().post("/billing/webhooks/stripe", data=pending, headers=pending_headers).status_code == 200
    with app.app_context():
        for engine in db.engines.values():
            sqlalchemy_event.listen(engine, "before_cursor_execute", _count_statements)
    stripe_path = "/billing/webhooks/stripe"
    figures = {
        "bare WSGI callable": per_request(bare_wsgi, same_request(environ_for(stripe_path, body, headers))),
        "one-route Flask app": per_request(minimal_flask(), same_request(environ_for(stripe_path, body, headers))),
        "webhook route, unknown provider (the route's fixed cost)": per_request(app, same_request(unknown)),
        "webhook route, bad signature (400)": per_request(app, same_request(forged)),
        "webhook route, duplicate of a settled event": per_request(
            app, same_request(environ_for(stripe_path, body, headers), 500)
        ),
        "webhook route, duplicate of a pending event": per_request(
            app, same_request(environ_for(stripe_path, pending, pending_headers), 500)
        ),
        "webhook route, new event": per_request(app, new_events(SECRET)),
    }
    for name, measured in figures.items():
        print(f"{measured}  {name}")
    if options.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        per_request(app, same_request(unknown, 500))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
