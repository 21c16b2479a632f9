"""gunicorn settings (read from ./gunicorn.conf.py by default). Tuned for 2 cores; WEB_CONCURRENCY and
GUNICORN_THREADS override. See docs/PERFORMANCE.md for the measurements behind these numbers."""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
# Requests wait on PostgreSQL commits and Stripe calls, so threads keep a core busy while one waits.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# Load the app once in the master: a configuration production refuses stops gunicorn before any
# worker forks, with the message and a non-zero exit.
preload_app = True
timeout = 30
graceful_timeout = 30
keepalive = 5
# A guard against slow leaks, not a routine: at webhook-burst rates a lower bound recycled workers
# every few seconds (docs/PERFORMANCE.md).
max_requests = 20000
max_requests_jitter = 2000
# The proxy in front of us terminates TLS; ProxyFix (TRUSTED_PROXY_COUNT) reads its headers.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = None  # the app logs one line per request itself, with its request id
errorlog = "-"


def post_fork(server, worker):
    """Connections opened in the master while preloading must not be shared by the workers; the worker
    starts with its memory of recently settled webhook events."""
    from app.extensions import db
    from app.services.webhook_intake import remember_recent_settled_events

    with server.app.wsgi().app_context():
        for engine in db.engines.values():
            engine.dispose(close=False)
        # A worker starts knowing the most recent settled events: redeliveries after a deploy or a
        # recycle cost no round trip either. A database that does not answer only leaves it empty.
        try:
            remember_recent_settled_events()
        except Exception:
            server.log.warning("worker %s starts without its memory of settled events", worker.pid, exc_info=True)


def when_ready(server):
    """Before the first worker forks: the preloaded app's objects (about 160,000) are moved out of the
    garbage collector's generations (gc.freeze), so a worker's full collections no longer walk them
    and the pages they sit on stay shared with the master instead of being copied when a collection
    touches them. Workers recycled later fork from the same frozen master."""
    import gc

    gc.collect()
    gc.freeze()
