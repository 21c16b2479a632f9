"""Assembling and running the sandbox: the Flask app, the worker and the HTTP server."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tomllib
from typing import NoReturn

from flask import Flask
from werkzeug.serving import make_server

from . import api, billing, checkout, clock, control, discounts, endpoints, meter_stream, meters, pages, schedules, v1
from .config import Dunning, LiveDelivery, Settings
from .store import Store
from .worker import Worker

# Importing these registers what they offer: /v1 endpoints on v1.bp (api, endpoints, meters, discounts) and the
# timed jobs billing.run_job() dispatches (checkout, clock, schedules). Named here so that no
# registration depends on which module happens to import which.
REGISTRARS = (api, endpoints, meters, discounts, checkout, clock, schedules)


def create_app(settings: Settings, store: Store, delivery: LiveDelivery | None = None) -> Flask:
    """The sandbox's Flask app. `delivery` is the live delivery settings shared with the worker."""
    app = Flask(__name__)
    app.config.update(SANDBOX_SETTINGS=settings, SANDBOX_STORE=store)
    # Test controls first: their /v1 hooks (request log, faults, latency) run before the API's.
    control.init_app(app, delivery or LiveDelivery(settings.delivery))
    v1.init_app(app)
    app.register_blueprint(meters.v2_bp)
    app.register_blueprint(meter_stream.bp)
    app.register_blueprint(pages.bp)
    return app


def _stop(*_: object) -> NoReturn:
    raise SystemExit(0)  # unwinds serve_forever() so the worker and database close cleanly


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) ends the server as SIGTERM does, quietly: no KeyboardInterrupt traceback from
    wherever the main thread happened to be."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def shutting_down() -> None:
    """Once stopping, another Ctrl-C or SIGTERM (an impatient second press; `make run` signals its
    children again on exit) must not interrupt the cleanup with a traceback."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main() -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = Settings.from_env()
        dunning = Dunning.from_env()
    except ValueError as exc:
        sys.exit(f"sandbox: bad setting: {exc}")
    store = Store(settings.state_dir / "sandbox.sqlite3")
    try:
        with store.transaction():
            prices = billing.seed_catalogue(store, settings.catalogue_file, settings.price_tax_behavior)
            prices += meters.seed(store, settings.catalogue_file, settings.price_tax_behavior)
            discounts.seed_promotion_codes(store, settings.catalogue_file)
    except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
        sys.exit(f"sandbox: cannot load the plan catalogue {settings.catalogue_file}: {exc}")

    delivery = LiveDelivery(settings.delivery)
    server = make_server(settings.host, settings.port, create_app(settings, store, delivery), threaded=True)
    worker = Worker(store, settings, delivery=delivery)
    print(f"Stripe sandbox (offline, test mode) on http://{settings.host}:{settings.port}")
    for line in settings.describe():
        print(f"  {line}")
    print(f"  SANDBOX_DUNNING_RETRY_DAYS={','.join(map(str, dunning.retry_days))}")
    print(f"  SANDBOX_DUNNING_FINAL_ACTION={dunning.final_action}")
    for price in prices:
        interval = price["recurring"]["interval"]
        print(f"  price {price['id']} {price['lookup_key']}: {price['unit_amount']} {price['currency']}/{interval}")
    print(
        f'Point the SDK at it: StripeClient("sk_test_…", base_addresses={{"api": "{settings.public_url}"}})',
        flush=True,
    )

    stop_on_signals()
    worker.start()
    try:
        server.serve_forever()
    finally:
        shutting_down()
        # A webhook delivery still in flight (a slow or hung receiver) is not waited for: the next
        # start sends it again.
        worker.stop(wait_for_deliveries=False)
        server.server_close()
        store.close()
        print(f"Stripe sandbox stopped; its state is kept in {settings.state_dir} for the next start.", flush=True)
        # Abandoned delivery threads would otherwise be joined at interpreter exit (up to their timeout).
        os._exit(0)
