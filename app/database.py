"""Riding out a PostgreSQL restart: no request fails because the database restarted under it.

A restart drops every pooled connection, and requests can meet it in three ways:

1. **A dead pooled connection** (the restart happened while it sat in the pool): its first statement
   fails with a disconnect error.
2. **A statement in flight** when the server shuts down: it fails with a disconnect error too.
3. **A new connection while the server is down or starting**: the connect is refused.

(3) is handled in the engine: connecting retries with backoff for up to
``DATABASE_CONNECT_RETRY_SECONDS`` while the server refuses, is starting or stopping, or has no
connection slot free (any other connect error, such as a wrong password, fails at once).

(1) and (2) are handled once per request: ``ResilientFlask`` runs the request's handlers again, once,
when a disconnect error reaches it and the request has committed nothing yet. Nothing of the failed
attempt survived (its transaction died with the connection), every connection opened before the
restart is dropped from every engine's pool, the request globals and the session are put back as the
request brought them, and Stripe calls made before the failure carry idempotency keys, so running the
request again is running it for the first time. A request that already committed something is not
repeated: its error reaches the error pages (503) as before.

Why not ``pool_pre_ping``: it costs every connection checkout a round trip (two per webhook delivery),
forever, to guard against an event that happens a few times a year, and it does not cover (2) or (3),
so the retry is needed anyway. ``DATABASE_POOL_PRE_PING=1`` turns it on for deployments where idle
connections are cut by something in between (a firewall, a pooler); ``make bench`` measures its cost.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import g, has_request_context, request_started, session
from flask.sessions import NullSession
from flask.typing import ResponseReturnValue
from flask.wrappers import Response
from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.extensions import db
from app.machine_routes import MachineRoutes

logger = logging.getLogger(__name__)

# Connect errors that mean "the server is not there yet": retried. Anything else fails at once.
_SERVER_NOT_READY = (
    "connection refused",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "server closed the connection unexpectedly",
    "no such file or directory",  # a Unix socket not yet created
    # Every client reconnecting at once after a restart can fill max_connections for a moment.
    "too many clients already",
    "remaining connection slots are reserved",
)
_COMMITTED_KEY = "_database_committed"


def install_connect_retry(engine: Engine, seconds: float) -> None:
    """Connecting to ``engine`` waits (with backoff) up to ``seconds`` for a server that is restarting."""
    if seconds <= 0:
        return

    @event.listens_for(engine, "do_connect")
    def connect_when_ready(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        deadline = time.monotonic() + seconds
        delay = 0.05
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                message = str(exc).lower()
                if not any(sign in message for sign in _SERVER_NOT_READY) or time.monotonic() + delay > deadline:
                    raise
                logger.warning("database not accepting connections yet; retrying in %.2fs", delay)
                time.sleep(delay)
                delay = min(delay * 2, 0.5)


@event.listens_for(Session, "after_commit")
def _remember_commit(session: Session) -> None:
    if has_request_context():
        setattr(g, _COMMITTED_KEY, True)


def close_session_despite_a_dead_connection(_: BaseException | None) -> None:
    """Teardown: a connection that died after the response was made (a read-only page whose
    transaction is still open) must not turn that response into an error; nothing was left to commit."""
    try:
        db.session.remove()
    except DBAPIError as exc:
        if not is_disconnect(exc):
            raise
        db.session.registry.clear()


def is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class ResilientFlask(MachineRoutes):
    """Flask, running a request's handlers once more when the database connection died under them
    before the request committed anything (see the module docstring)."""

    def full_dispatch_request(self) -> Response:
        self._got_first_request = True
        try:
            request_started.send(self, _async_wrapper=self.ensure_sync)
            rv = self._dispatch_with_one_retry()
        except Exception as e:
            rv = self.handle_user_exception(e)
        return self.finalize_request(rv)

    def _dispatch_once(self) -> ResponseReturnValue:
        rv = self.preprocess_request()
        return self.dispatch_request() if rv is None else rv

    def _dispatch_with_one_retry(self) -> ResponseReturnValue:
        # What the handlers may change besides the database: the request globals (the signed-in user
        # Flask-Login caches there) and the session. The second attempt starts from them as they were.
        saved_globals = dict(vars(g))
        saved_session = dict(session)
        try:
            return self._dispatch_once()
        except DBAPIError as exc:
            if not is_disconnect(exc) or g.get(_COMMITTED_KEY, False):
                raise
            vars(g).clear()
            vars(g).update(saved_globals)
            if not isinstance(session._get_current_object(), NullSession):  # type: ignore[attr-defined]
                session.clear()
                session.update(saved_session)
            db.session.rollback()
            # Every connection opened before the restart is dead, in every engine (the main one and the
            # autocommit one): drop them all, so the second attempt only meets new connections.
            for engine in db.engines.values():
                engine.dispose(close=False)
            logger.warning("database connection lost mid-request (%s); running the request again", type(exc.orig))
            return self._dispatch_once()
