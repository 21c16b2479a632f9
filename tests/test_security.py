"""Issue 23's hardening: credentials kept out of the logs, abuse limits on mail and money, rate limits
that cannot be walked around, sessions that end when they should, uniform answers, production guards.
Real PostgreSQL, Redis and SMTP; Stripe is the offline sandbox."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask

from app.request_log import HANDLER_NAME, SecretConverter

# Route arguments whose name says they are a credential; each must be declared <secret:...>.
CREDENTIAL_NAME = re.compile(r"(?:^|_)(?:token|secret|signature|key|code)$")
FAKE_TOKEN = "eyJpbnZpdGF0aW9uIjo0Mn0.Zm9yZ2VkLXNpZ25hdHVyZQ-x_y"


@contextmanager
def app_log() -> Iterator[io.StringIO]:
    """What the app's own log handler writes, as it writes it (after masking)."""
    [handler] = [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]
    assert isinstance(handler, logging.StreamHandler)
    written = io.StringIO()
    previous = handler.setStream(written)
    try:
        yield written
    finally:
        handler.setStream(previous)


# --- 1. Credentials in links never reach the logs ------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_route_that_takes_a_token_logs_it_masked(make_app: Callable[..., Flask], log_format: str) -> None:
    app = make_app(LOG_FORMAT=log_format)
    rules = [rule for rule in app.url_map.iter_rules() if rule.arguments]
    # The one rule: a credential argument is declared with the secret converter, whatever its name...
    for rule in rules:
        for name in rule.arguments:
            if CREDENTIAL_NAME.search(name):
                assert isinstance(rule._converters[name], SecretConverter), f"{rule.rule}: declare <secret:{name}>"
    credential_rules = [
        rule for rule in rules if any(isinstance(c, SecretConverter) for c in rule._converters.values())
    ]
    # ...and the invitation, reset and confirmation links are among them.
    assert {rule.endpoint for rule in credential_rules} >= {"team.join", "auth.reset_password", "auth.verify_email"}
    client = app.test_client()
    with app_log() as written:
        for rule in credential_rules:
            path = rule.build({name: FAKE_TOKEN for name in rule.arguments}, append_unknown=False)
            assert path is not None
            _, path = path
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                response = client.open(path, method=method)
                assert response.status_code < 500, (rule.rule, method)
    logged = written.getvalue()
    assert FAKE_TOKEN not in logged and FAKE_TOKEN.split(".")[-1] not in logged
    for rule in credential_rules:
        masked = rule.rule.split("<", 1)[0] + "[redacted]"
        assert masked in logged, (masked, logged)
