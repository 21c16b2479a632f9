"""Machine routes: endpoints called by machines with a signature of their own (payment providers'
webhooks), served without the page machinery. Their requests open no session (no cookie is read,
Redis is not asked), and run none of the app's before/after-request hooks (rate limits, CSRF, the
sign-in guard, the limiter's headers): only the hooks
registered with `machine_before`/`machine_after` (the request log and the security headers).
Error handlers, teardown (the database session is removed) and the restart retry still apply.
`python -m bench.overhead` measures what this saves per request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, request
from flask.ctx import RequestContext
from flask.wrappers import Response


class MachineRoutes(Flask):
    # Set by the factory: which endpoints are machine routes, and the paths they live under (the
    # session is opened before the URL is matched, so it is decided by path).
    machine_endpoints: frozenset[str] = frozenset()
    machine_path_prefixes: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.machine_before: list[Callable[[], None]] = []
        self.machine_after: list[Callable[[Response], Response]] = []

    def request_context(self, environ: dict[str, Any]) -> RequestContext:
        context = super().request_context(environ)
        if self.machine_path_prefixes and str(environ.get("PATH_INFO", "")).startswith(self.machine_path_prefixes):
            context._session = self.session_interface.make_null_session(self)  # never opened
        return context

    def preprocess_request(self) -> Any:
        if request.endpoint not in self.machine_endpoints:
            return super().preprocess_request()
        for hook in self.machine_before:
            hook()
        return None

    def process_response(self, response: Response) -> Response:
        if request.endpoint not in self.machine_endpoints:
            return super().process_response(response)
        for hook in self.machine_after:
            response = hook(response)
        return response
