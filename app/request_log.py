"""Logging: one line per request (request id, method, path, status, duration), JSON in production,
and a filter that keeps secrets and card numbers out of every log line."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import Flask, Response, g, request
from werkzeug.routing import Map, UnicodeConverter

from app.machine_routes import MachineRoutes

logger = logging.getLogger("app.request")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
# Stripe secret, restricted and webhook keys, Whop's, our usage API keys, and what could be a card
# number: 13-19 digits in a row, or written in groups (4-4-4-4, 4-6-5), so a status code next to a number is left alone.
SECRET_PATTERNS = re.compile(
    r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]+|\bwhsec_[A-Za-z0-9_]+|\bapik_[A-Za-z0-9_]+|\bws_[A-Za-z0-9_]{8,}"
    r"|\bllk_[A-Za-z0-9_\-]{8,}"  # our usage API keys
    # A bearer token in a header, and the password in a URL's user part (redis://:pw@host, postgresql://u:pw@h).
    r"|(?<=Bearer )[A-Za-z0-9._~+/=-]{8,}|(?<=://)[^\s/@:]*:[^\s/@]+(?=@)"
    r"|\b(?:\d{13,19}|\d{4}(?:[ -]\d{4}){3}(?:\d{1,3})?|\d{4}[ -]\d{6}[ -]\d{4,5})\b"
)
# Text every match of SECRET_PATTERNS contains (each alternative has "sk_"/"rk_"/"apik_"/"llk_",
# "whsec_", "ws_", "Bearer ", "://", thirteen digits in a row, or four digits, a space or dash and four
# more: every card-number form starts so): text without it is not scanned by the full pattern, whose
# look-behinds make it the most expensive part of a request's log line. Not "four digits" alone: most
# of our hex request ids have a run of four, and were scanned in full on every request.
MAYBE_SECRET_TEXT = r"k_|c_|s_|Bearer |://|\d{13}|\d{4}[ -]\d{4}"  # noqa: S105 (a pattern, not a password)
MAYBE_SECRET = re.compile(MAYBE_SECRET_TEXT)
# A path segment as a client may write it: anything up to the next slash, query, quote or space.
SEGMENT = r"[^\s/?#\"']+"
RULE_ARGUMENT = re.compile(r"<(?:(?P<converter>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")
CONTEXT_FIELDS = (
    "request_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "remote_addr",
    "event_name",
    "organization_id",
)
HANDLER_NAME = "app"


class SecretConverter(UnicodeConverter):
    """``<secret:token>``: a path segment that is a credential (a signed link's token). Matches what
    ``<token>`` matches; the request log masks it (credential_paths)."""


def credential_paths(url_map: Map) -> re.Pattern[str] | None:
    """The one rule for links that carry a credential: every route argument declared with the
    ``secret`` converter. One pattern per such route; its secret segments are captured for masking."""
    patterns = []
    for rule in url_map.iter_rules():
        if not any(isinstance(converter, SecretConverter) for converter in rule._converters.values()):
            continue
        pattern, position = "", 0
        for match in RULE_ARGUMENT.finditer(rule.rule):
            pattern += re.escape(rule.rule[position : match.start()])
            secret = isinstance(rule._converters.get(match["name"]), SecretConverter)
            pattern += f"({SEGMENT})" if secret else f"(?:{SEGMENT})"
            position = match.end()
        patterns.append(pattern + re.escape(rule.rule[position:]))
    return re.compile("|".join(f"(?:{p})" for p in sorted(patterns))) if patterns else None


def credential_path_prefixes(url_map: Map) -> tuple[str, ...] | None:
    """The literal text before the first argument of every route credential_paths masks: a path it
    matches contains one of them. None when some such route starts with an argument."""
    prefixes = []
    for rule in url_map.iter_rules():
        if any(isinstance(converter, SecretConverter) for converter in rule._converters.values()):
            first = RULE_ARGUMENT.search(rule.rule)
            prefix = rule.rule[: first.start()] if first else rule.rule
            if not prefix:
                return None
            prefixes.append(prefix)
    return tuple(prefixes)


def _mask_groups(match: re.Match[str]) -> str:
    text, start = "", match.start()
    for index in range(1, (match.re.groups or 0) + 1):
        if match.start(index) < 0:
            continue
        text += match.string[start : match.start(index)] + "[redacted]"
        start = match.end(index)
    return text + match.string[start : match.end()]


class RedactingFilter(logging.Filter):
    """Masks configured secret values, anything shaped like a key or a card number, and the credential
    segments of the app's links (set once the routes are known: init_request_logging)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)
        self.credential_paths: re.Pattern[str] | None = None
        self._credential_prefixes: tuple[str, ...] | None = None
        self._suspect = self._suspect_pattern()

    @property
    def credential_prefixes(self) -> tuple[str, ...] | None:
        """The credential routes' prefixes; None: every text is scanned for credential paths."""
        return self._credential_prefixes

    @credential_prefixes.setter
    def credential_prefixes(self, prefixes: tuple[str, ...] | None) -> None:
        self._credential_prefixes = prefixes
        self._suspect = self._suspect_pattern()

    def _suspect_pattern(self) -> re.Pattern[str]:
        """One search that finds anything redact's steps could change: what every secret-shaped match
        contains (MAYBE_SECRET), a credential route's prefix, a configured secret."""
        literals = [*(self._credential_prefixes or ()), *self.secrets]
        return re.compile("|".join([MAYBE_SECRET_TEXT, *(re.escape(literal) for literal in literals)]))

    def redact(self, text: str) -> str:
        # Text none of the steps below could change (a request's log line: five short texts, usually
        # all clean) costs this one search. Not with credential paths whose prefixes are unknown:
        # then every text is scanned for them.
        if (self.credential_paths is None or self._credential_prefixes is not None) and not self._suspect.search(text):
            return text
        # Each scan is skipped for text that cannot match it (MAYBE_SECRET, the routes' prefixes).
        redacted = SECRET_PATTERNS.sub("[redacted]", text) if MAYBE_SECRET.search(text) else text
        if self.credential_paths is not None and (
            self.credential_prefixes is None or any(prefix in redacted for prefix in self.credential_prefixes)
        ):
            redacted = self.credential_paths.sub(_mask_groups, redacted)
        for secret in self.secrets:
            if secret in redacted:
                redacted = redacted.replace(secret, "[redacted]")
        return redacted

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        # The JSON lines carry these fields too: the request path is the client's to choose.
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if isinstance(value, str):
                setattr(record, field, self.redact(value))
        return True


# json.dumps(entry, default=str) built a new encoder for every line; this one is built once (the
# same settings, so the same text).
_JSON_LINE = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        attributes = record.__dict__  # the context fields are the record's own attributes (extra=)
        entry.update({field: attributes[field] for field in CONTEXT_FIELDS if field in attributes})
        if record.exc_info:
            entry["exception"] = SECRET_PATTERNS.sub("[redacted]", self.formatException(record.exc_info))
        return _JSON_LINE.encode(entry)


# Settings that hold a credential, by name: keys, secrets, tokens, passwords (a comma-separated value
# lists several, while one is rotated). Any setting named so is masked wherever its value appears.
CREDENTIAL_SETTING = re.compile(r"(?:^|_)(?:KEY|SECRET|TOKEN|PASSWORD)$")


def configured_secrets(config: Mapping[str, Any]) -> list[str]:
    """Every credential the configuration holds: the values of credential-named settings, and the
    passwords inside its URLs (DATABASE_URL, REDIS_URL, ...)."""
    found: list[str] = []
    for name, value in config.items():
        if not isinstance(value, str) or not value:
            continue
        if CREDENTIAL_SETTING.search(name):
            found.extend(part.strip() for part in value.split(","))
        if "://" in value:
            password = urlsplit(value).password if "@" in value else None
            if password:
                found.append(unquote(password))
    return found


def configure_logging(app: Flask) -> None:
    """One handler on the root logger, replaced when another app is created in this process."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    if app.config.get("LOG_FORMAT") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(configured_secrets(app.config)))
    root.addHandler(handler)
    root.setLevel(app.config.get("LOG_LEVEL", "INFO"))


def request_id_from(incoming: str) -> str:
    """The client's X-Request-ID when it is a sane one, else a new id."""
    return incoming if REQUEST_ID.match(incoming) else os.urandom(16).hex()


def log_line(request_id: str, method: str, path: str, status: int, started: float, remote_addr: str | None) -> None:
    """The request's line (pages, and the machine entry's webhooks alike). The path only: query
    strings can carry checkout ids and are not needed to follow a request."""
    if not logger.isEnabledFor(logging.INFO):
        return
    duration_ms = round((time.perf_counter() - started) * 1000, 2)
    # The record made and handled as logger.info would, but without looking up the calling frame
    # (logging's findCaller walks the stack on every line; no format here prints where it was called).
    record = logger.makeRecord(
        logger.name,
        logging.INFO,
        __file__,
        0,
        "%s %s %s %.2fms",
        (method, path, status, duration_ms),
        None,
        extra={
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "remote_addr": remote_addr,
        },
    )
    logger.handle(record)


def init_request_logging(app: Flask) -> None:
    """Called once the blueprints are registered: the log filter learns which links carry credentials."""
    pattern = credential_paths(app.url_map)
    prefixes = credential_path_prefixes(app.url_map)
    for handler in logging.getLogger().handlers:
        if handler.get_name() == HANDLER_NAME:
            for log_filter in handler.filters:
                if isinstance(log_filter, RedactingFilter):
                    log_filter.credential_paths = pattern
                    log_filter.credential_prefixes = prefixes

    @app.before_request
    def start_request() -> None:
        g.request_id = request_id_from(request.headers.get("X-Request-ID", ""))
        g.request_started = time.perf_counter()

    @app.after_request
    def log_request(response: Response) -> Response:
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        started = g.get("request_started", time.perf_counter())
        log_line(request_id, request.method, request.path, response.status_code, started, request.remote_addr)
        return response

    if isinstance(app, MachineRoutes):  # machine routes are logged the same way
        app.machine_before.append(start_request)
        app.machine_after.append(log_request)
