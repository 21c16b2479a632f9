"""Error pages: a clear page (or JSON for machine endpoints) for every failure, never a stack trace."""

from __future__ import annotations

import logging
import math
import time

from flask import Flask, Response, current_app, jsonify, render_template, request
from flask.globals import request_ctx
from flask_wtf.csrf import CSRFError
from redis.exceptions import RedisError
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, InternalServerError

from app.extensions import limiter
from app.services.billing_service import BillingConfigurationError

logger = logging.getLogger(__name__)

TITLES = {
    400: "That request did not make sense",
    403: "You can't do that",
    404: "Page not found",
    405: "Not allowed here",
    409: "That conflicts with what we have",
    413: "That request is too large",
    429: "Too many attempts",
    500: "Something went wrong on our side",
    503: "Temporarily unavailable",
}


def wants_json() -> bool:
    return request.path.startswith(("/billing/webhooks/", "/healthz", "/readyz")) or (
        request.accept_mimetypes.best == "application/json"
    )


def error_response(status: int, message: str) -> tuple[Response | str, int]:
    if wants_json():
        return jsonify(error=message), status
    return render_template(
        "errors/error.html", status=status, title=TITLES.get(status, "Error"), message=message
    ), status


def wait_words(seconds: float) -> str:
    """'42 seconds', '1 minute', '3 minutes', 'about 2 hours': how long until a limit lets a person in."""
    seconds = max(1, math.ceil(seconds))
    if seconds < 120:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours = round(minutes / 60)
    return f"about {hours} hour{'s' if hours != 1 else ''}"


def rate_limit_message(error: HTTPException | None = None) -> str:
    """What a person who hit a rate limit reads: that it is a limit, and how long until it lifts (the
    sign-in throttle's own Retry-After, or the breached limit's window, which Flask-Limiter keeps for
    the request)."""
    retry_after = getattr(error, "retry_after", None)
    limit = limiter.current_limit
    if retry_after:
        wait = f" Try again in {wait_words(retry_after)}."
    elif limit is not None and limit.breached:
        wait = f" Try again in {wait_words(limit.reset_at - time.time())}."
    else:
        wait = " Wait a minute and try again."
    return f"Too many attempts from you in a short time.{wait}"


def retry_after_header(error: HTTPException) -> dict[str, str]:
    retry_after = getattr(error, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after else {}


def _without_session() -> None:
    """Redis, which holds the sessions, just failed: the error page is rendered and the response
    finished on a null session. A session that could not be opened (the request had a cookie) is not
    read by Flask-Login, and one the view changed is not saved again (which would fail again)."""
    request_ctx._session = current_app.session_interface.make_null_session(current_app)


def init_error_handlers(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def csrf_failed(error: CSRFError) -> tuple[Response | str, int]:
        return error_response(
            400, "This form has expired or was not sent from our site. Go back, reload the page and try again."
        )

    @app.errorhandler(429)
    def rate_limited(error: HTTPException) -> tuple[Response | str, int, dict[str, str]]:
        body, status = error_response(429, rate_limit_message(error))
        return body, status, retry_after_header(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response | str, int]:
        status = error.code or 500
        return error_response(status, error.description or TITLES.get(status, "Error"))

    @app.errorhandler(RedisError)
    def redis_unavailable(error: RedisError) -> tuple[Response | str, int]:
        logger.error("Redis unavailable: %s", type(error).__name__)
        _without_session()
        return error_response(503, "Signing in and forms are briefly unavailable. Please try again in a minute.")

    @app.errorhandler(OperationalError)
    def database_unavailable(error: OperationalError) -> tuple[Response | str, int]:
        logger.error("database unavailable: %s", type(error.orig).__name__ if error.orig else "OperationalError")
        return error_response(503, "We are briefly unavailable. Please try again in a minute.")

    @app.errorhandler(BillingConfigurationError)
    def billing_misconfigured(error: BillingConfigurationError) -> tuple[Response | str, int]:
        logger.error("billing is not configured: %s", error)
        return error_response(503, "Billing is temporarily unavailable. Nothing was charged; please try again later.")

    @app.errorhandler(InternalServerError)
    def internal_error(error: InternalServerError) -> tuple[Response | str, int]:
        # Flask has logged the original exception. A Redis failure while saving the session after
        # the view surfaces here rather than in the RedisError handler.
        original = getattr(error, "original_exception", None)
        if isinstance(original, RedisError):
            return redis_unavailable(original)
        return error_response(500, "Something went wrong on our side. It has been logged; please try again.")
