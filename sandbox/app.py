"""Assembling and running the sandbox: the Flask app, the worker and the HTTP server."""

from __future__ import annotations

import logging
import signal
import sys
import tomllib
from typing import NoReturn

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.serving import make_server

from . import api, billing, clock, pages
from .config import Settings
from .store import Store
from .worker import Worker


def create_app(settings: Settings, store: Store) -> Flask:
    app = Flask(__name__)
    app.config.update(SANDBOX_SETTINGS=settings, SANDBOX_STORE=store)
    api.init_app(app)
    app.register_blueprint(pages.bp)
    app.add_url_rule("/_sandbox/deliveries", view_func=deliveries)
    return app


def deliveries() -> Response:
    """Not a Stripe endpoint: what was sent to the webhook URL, newest first (?limit=, 100)."""
    store: Store = current_app.config["SANDBOX_STORE"]
    settings: Settings = current_app.config["SANDBOX_SETTINGS"]
    rows = store.deliveries(request.args.get("limit", 100, type=int))
    listed = []
    for row in rows:
        event = store.get(row["event_id"]) or {}
        listed.append(
            {
                "event": row["event_id"],
                "type": event.get("type"),
                "created": event.get("created"),
                "state": row["state"],
                "attempts": row["attempts"],
                "last_status": row["last_status"],
                "last_error": row["last_error"],
                "next_attempt_at": row["next_attempt_at"] if row["state"] == "pending" else None,
                "delivered_at": row["delivered_at"],
            }
        )
    return jsonify(webhook_url=settings.webhook_url, deliveries=listed)


def _stop(*_: object) -> NoReturn:
    raise SystemExit(0)  # unwinds serve_forever() so the worker and database close cleanly


def main() -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings.from_env()
    try:
        dunning = clock.Dunning.from_env()
    except ValueError as exc:
        sys.exit(f"sandbox: {exc}")
    store = Store(settings.state_dir / "sandbox.sqlite3")
    try:
        with store.transaction():
            prices = billing.seed_catalogue(store, settings.catalogue_file)
    except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
        sys.exit(f"sandbox: cannot load the plan catalogue {settings.catalogue_file}: {exc}")

    server = make_server(settings.host, settings.port, create_app(settings, store), threaded=True)
    worker = Worker(store, settings)
    print(f"Stripe sandbox (offline, test mode) on http://{settings.host}:{settings.port}")
    for line in settings.describe():
        print(f"  {line}")
    print(f"  SANDBOX_DUNNING_RETRY_DAYS={','.join(map(str, dunning.retry_days))}")
    print(f"  SANDBOX_DUNNING_FINAL_ACTION={dunning.final_action}")
    for price in prices:
        print(f"  price {price['id']} {price['lookup_key']}: {price['unit_amount']} {price['currency']}/month")
    print(
        f'Point the SDK at it: StripeClient("sk_test_…", base_addresses={{"api": "{settings.public_url}"}})',
        flush=True,
    )

    signal.signal(signal.SIGTERM, _stop)
    worker.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()
        server.server_close()
        store.close()
