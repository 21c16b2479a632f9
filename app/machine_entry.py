"""The machine entry: a small WSGI dispatcher in front of Flask for the one route machines call most,
`POST /billing/webhooks/<provider>`. Such a request gets no request context, no URL matching and none
of the pages' machinery (session, CSRF, rate limits, sign-in, templates): its body goes, with its
headers, to BillingService.handle_webhook_event in an application context (the database session is
removed when it ends), and the answer is the route's own (app/billing/routes.py: 2xx for a stored or
duplicate event, 400 for a delivery refused by its provider's signature check, 404 for an unknown
provider), with the request log line, the X-Request-ID and the security headers every response has.

Anything else, and anything unusual about a webhook request (no Content-Length, a body over
MAX_CONTENT_LENGTH, an unexpected error such as the database going away), goes to Flask: the body
read here is handed back, so the Flask route (with its database-restart retry and its error
answers) sees the request as it came. Running the delivery again is safe: storing is idempotent on
the event id. `python -m bench.overhead` measures what this saves per request."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from flask import Flask
from werkzeug.datastructures import EnvironHeaders
from werkzeug.http import HTTP_STATUS_CODES

from app.request_log import log_line, request_id_from
from app.security import security_headers
from app.services.billing_common import UnknownWebhookProvider, WebhookRejected
from app.services.billing_service import BillingService

logger = logging.getLogger(__name__)

WEBHOOK_PREFIX = "/billing/webhooks/"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MachineEntry:
    """WSGI: webhooks straight to the billing authority, everything else to `flask` (the app's own
    wsgi_app)."""

    def __init__(self, app: Flask, flask: WSGIApp) -> None:
        self.app = app
        self.flask = flask
        self.headers = [("Cache-Control", "no-store"), *security_headers(app.config["APP_ENV"] == "production")]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "POST" or not path.startswith(WEBHOOK_PREFIX):
            return self.flask(environ, start_response)
        provider = path[len(WEBHOOK_PREFIX) :]
        length = environ.get("CONTENT_LENGTH") or ""
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        if not provider or "/" in provider or not length.isdigit() or (limit is not None and int(length) > limit):
            return self.flask(environ, start_response)
        started = time.perf_counter()
        body = environ["wsgi.input"].read(int(length))
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        try:
            with self.app.app_context():
                result = BillingService.handle_webhook_event(provider, body, _Headers(environ))
            status, answer = result.status_code, result.body
        except WebhookRejected as exc:
            status, answer = 400, {"error": str(exc)}
        except UnknownWebhookProvider:
            status, answer = 404, {"error": "unknown webhook provider"}
        except Exception:
            # The Flask route answers it (the restart retry, the error pages), from the same body.
            logger.warning("webhook delivery handed to the full app after an error", exc_info=True)
            environ["wsgi.input"] = io.BytesIO(body)
            return self.flask(environ, start_response)
        content = (self.app.json.dumps(answer, separators=(",", ":")) + "\n").encode()
        start_response(
            f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(content))),
                ("X-Request-ID", request_id),
                *self.headers,
            ],
        )
        log_line(request_id, "POST", path, status, started, environ.get("REMOTE_ADDR"))
        return [content]


class _Headers(Mapping[str, str]):
    """The request's headers read from the WSGI environ when asked (a provider reads two or three),
    not copied into a dict on every delivery."""

    __slots__ = ("environ",)

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ

    def __getitem__(self, name: str) -> str:
        key = name.upper().replace("-", "_")
        value = self.environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"]
        return str(value)

    def __iter__(self) -> Iterator[str]:
        return iter(EnvironHeaders(self.environ).keys())

    def __len__(self) -> int:
        return len(EnvironHeaders(self.environ))


def install(app: Flask) -> None:
    """Put the machine entry in front of the app's own wsgi_app (inside any proxy middleware added
    later, which then fixes the client's address for both)."""
    app.wsgi_app = MachineEntry(app, app.wsgi_app)  # type: ignore[method-assign]
