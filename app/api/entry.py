"""The usage entry: a small WSGI dispatcher in front of Flask for `POST /api/v1/usage`, the route an
organization's own services call at high rate. As the machine entry does for webhooks
(app/machine_entry.py), such a request gets no request context, no URL matching and none of the
pages' machinery: its JSON body and two headers go to the usage API's `answer` (app/api/routes.py)
in an application context (the database session is removed when it ends), and the answer carries
the request log line, the X-Request-ID and the security headers every response has.

Anything unusual (another method, no Content-Length, a body over MAX_CONTENT_LENGTH, an error such as
the database going away) goes to Flask with the body handed back, so the Flask route, with its
database-restart retry and error pages, answers the request as it came. Recording again there is
safe: each event carries its idempotency key. `python -m bench usage` measures the route."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header

from app.api import routes
from app.request_log import log_line, request_id_from
from app.security import security_headers

logger = logging.getLogger(__name__)

USAGE_PATH = "/api/v1/usage"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class UsageEntry:
    """WSGI: usage requests straight to the usage API's answer, everything else to `inner`."""

    def __init__(self, app: Flask, inner: WSGIApp) -> None:
        self.app = app
        self.inner = inner
        self.headers = [("Cache-Control", "no-store"), *security_headers(app.config["APP_ENV"] == "production")]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != USAGE_PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.inner(environ, start_response)
        length = environ.get("CONTENT_LENGTH") or ""
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        if not length.isdigit() or (limit is not None and int(length) > limit):
            return self.inner(environ, start_response)
        started = time.perf_counter()
        raw = environ["wsgi.input"].read(int(length))
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        try:
            body = _json_body(environ.get("CONTENT_TYPE", ""), raw)
            with self.app.app_context():
                result = routes.answer(environ.get("HTTP_AUTHORIZATION", ""), body, environ.get("HTTP_IDEMPOTENCY_KEY"))
        except Exception:
            # The Flask route answers it (the restart retry, the error pages), from the same body.
            logger.warning("usage request handed to the full app after an error", exc_info=True)
            environ["wsgi.input"] = io.BytesIO(raw)
            return self.inner(environ, start_response)
        content = (json.dumps(result.body, separators=(",", ":")) + "\n").encode()  # strings and numbers only
        start_response(
            f"{result.status} {HTTP_STATUS_CODES.get(result.status, 'UNKNOWN').upper()}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(content))),
                ("X-Request-ID", request_id),
                *result.headers.items(),
                *self.headers,
            ],
        )
        log_line(request_id, "POST", USAGE_PATH, result.status, started, environ.get("REMOTE_ADDR"))
        return [content]


def _json_body(content_type: str, raw: bytes) -> Any:
    """The body as Flask's `request.get_json(silent=True)` reads it: None unless it is JSON."""
    mimetype = parse_options_header(content_type)[0].lower() if content_type else ""
    if not (mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))):
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def install(app: Flask) -> None:
    """Put the usage entry in front of the app's wsgi_app (inside any proxy middleware added later)."""
    app.wsgi_app = UsageEntry(app, app.wsgi_app)  # type: ignore[method-assign]
