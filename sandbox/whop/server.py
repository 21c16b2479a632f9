"""`python -m sandbox.whop`: the Whop double as its own server (default http://127.0.0.1:12113), every
path under /whop so the same blueprint could share a server with the Stripe sandbox unchanged."""

from __future__ import annotations

import logging
import signal
import sys
import tomllib
from typing import NoReturn

from flask import Flask
from werkzeug.serving import make_server

from . import api
from .config import Settings
from .delivery import Deliveries
from .state import World


def create_app(settings: Settings) -> tuple[Flask, World, Deliveries]:
    deliveries = Deliveries(settings)
    world = World(account_id=settings.account_id, public_url=settings.public_url, emit=deliveries.emit)
    app = Flask(__name__)
    api.init_app(app, world, deliveries)
    return app, world, deliveries


def _stop(*_: object) -> NoReturn:
    raise SystemExit(0)


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) ends the server as SIGTERM does, quietly: no KeyboardInterrupt traceback."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def shutting_down() -> None:
    """Once stopping, another Ctrl-C or SIGTERM must not interrupt the cleanup with a traceback."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main() -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        sys.exit(f"whop sandbox: {exc}")
    app, world, deliveries = create_app(settings)
    try:
        plans = world.seed_plans(settings.catalogue_file)
    except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
        sys.exit(f"whop sandbox: cannot load the plan catalogue {settings.catalogue_file}: {exc}")
    server = make_server(settings.host, settings.port, app, threaded=True)
    print(f"Whop sandbox (offline, test mode) on http://{settings.host}:{settings.port}")
    for line in settings.describe():
        print(f"  {line}")
    for plan in plans:
        print(f"  plan {plan['id']} {plan['title']}: {plan['formatted_price']}")
    print(
        f'Point the SDK at it: Whop(token="…", environment=WhopEnvironment(api="{settings.public_url}/whop/api/v1", '
        f'vault="{settings.public_url}/whop/api/v1"))',
        flush=True,
    )
    stop_on_signals()
    deliveries.start()
    try:
        server.serve_forever()
    finally:
        shutting_down()
        deliveries.stop()
        server.server_close()
        print("Whop sandbox stopped.", flush=True)
