"""Webhook intake and application, the same for every provider: a verified event is stored once
(deduplicated by the provider's event id), a worker's dispatch pass gives its object a job, and the
worker applies all the pending events about one object together through the provider's apply_batch. Providers are
registered with BillingService; nothing here calls a provider's API."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.extensions import db
from app.models import StripeEvent, StripeEventStatus, WhopEvent
from app.models.stripe_event import SETTLED_STATUSES
from app.models.types import utcnow
from app.services import queue, stripe_pace, webhook_store
from app.services.billing_common import (
    ProviderThrottled,
    WebhookProvider,
    WebhookResult,
    committed,
    describe_failure,
)
from app.services.stripe_objects import MalformedObject
from app.services.webhook_store import VerifiedEvent

logger = logging.getLogger(__name__)

WEBHOOK_TASK = "webhooks:apply"
WEBHOOK_QUEUE = "webhooks"
RESYNC_SOURCE = "reconcile"  # the source of changes a resync job (no event) applies


def queue_resync(provider: WebhookProvider, object_key: str, *, delay: float = 0) -> None:
    """Reconcile's repair of a drifted object goes through the worker like an event: a job, under the
    object's lock (so it never runs beside another writer of it), that re-reads and applies it."""
    queue.defer(
        WEBHOOK_TASK,
        queue=WEBHOOK_QUEUE,
        lock=f"{provider.name}:{object_key}",
        scheduled_at=utcnow() + timedelta(seconds=delay) if delay > 0 else None,
        provider=provider.name,
        object_key=object_key,
        resync=True,
    )


def replay(providers: Iterable[WebhookProvider], event_id: str) -> WebhookResult:
    """Queue a stored event again (ops: `flask billing replay`): a failed one goes back to pending,
    read afresh (so a fix to the reading code applies), and the worker applies it."""
    for provider in providers:
        model = provider.event_model
        row = webhook_store.row_for(model, event_id)
        if row is None:
            continue
        try:
            if row.status in (StripeEventStatus.PROCESSED, StripeEventStatus.IGNORED):
                return WebhookResult(200, {"received": True, "duplicate": True})
            try:
                object_key = provider.object_key(stored_event(provider, row))
            except (MalformedObject, ValueError) as exc:
                return WebhookResult(422, {"received": True, "failed": str(exc)})
            if row.status == StripeEventStatus.FAILED:
                webhook_store.requeue(model, row.id, object_key)
            queue_application(provider, object_key)
            db.session.commit()
            return WebhookResult(202, {"received": True, "queued": object_key})
        finally:
            db.session.rollback()
    raise LookupError(f"no stored event {event_id}")


def stored_event(provider: WebhookProvider, row: StripeEvent | WhopEvent) -> VerifiedEvent:
    if not row.payload:
        raise ValueError(f"the payload of {row.event_id} is no longer stored")
    return VerifiedEvent(
        provider=provider.name,
        event_id=row.event_id,
        type=row.type,
        created=getattr(row, provider.event_model.created_column),
        livemode=row.livemode,
        api_version=row.api_version,
        raw=row.payload,
        body=json.loads(row.payload),
    )


def queue_application(provider: WebhookProvider, object_key: str, *, delay: float | None = None) -> None:
    """Make sure a job will apply the object's pending events, in the caller's transaction: a job that
    waits for the object (at least WEBHOOK_COALESCE_SECONDS, so a burst joins it) is share-locked until
    the caller commits, so it cannot start before it can see what the caller stored; with none waiting,
    a new job is queued. The job's lock runs one object's jobs one at a time.

    No queueing lock (procrastinate's unique index on waiting jobs): a retried job re-enters the
    waiting state beside a newer one, which that index refuses, leaving events with no job (upstream
    procrastinate #1446, #1543). A second job for an object finds nothing pending and costs one read."""
    lock = f"{provider.name}:{object_key}"
    if db.session.get_bind().dialect.name == "postgresql":
        waiting = db.session.execute(_WAITING_JOB, {"lock": lock, "task": WEBHOOK_TASK}).first()
        if waiting is not None:
            return
    wait = float(current_app.config["WEBHOOK_COALESCE_SECONDS"]) if delay is None else delay
    queue.defer(
        WEBHOOK_TASK,
        queue=WEBHOOK_QUEUE,
        lock=lock,
        # The job waits this long before it runs, so a burst about one object joins it.
        scheduled_at=utcnow() + timedelta(seconds=wait) if wait > 0 else None,
        provider=provider.name,
        object_key=object_key,
    )


# A waiting job of the object, share-locked: procrastinate's fetch (FOR UPDATE SKIP LOCKED) passes it
# over until this transaction ends, and a job already fetched no longer matches.
_WAITING_JOB = text(
    "SELECT id FROM procrastinate_jobs WHERE lock = :lock AND task_name = :task AND status = 'todo' LIMIT 1 FOR SHARE"
)
# Pending events with no job waiting or running for their object, their oldest stored before :before,
# turned into one job per object in the same statement through procrastinate's own function (whose
# trigger wakes the listening workers once, at this commit). Intake queues nothing
# (webhook_store._INTAKE): this is how every stored event gets its job, run by each worker every
# WORKER_DISPATCH_SECONDS for events older than WEBHOOK_COALESCE_SECONDS (so a burst about one object
# waits for one job), and every minute as the backstop. A job running for the object counts: what it
# did not collect is found on the first pass after it ends.
# A pass reads at most UNCLAIMED_CHUNK pending rows, in object order from :after (the pending-object
# index), so its cost does not grow with a backlog. The workers' periodic pass reads one chunk a pass,
# on from where this process's last one stopped (a backlog larger than that is covered over several
# passes); a pass that must find everything (the minute's sweep, a drain: `worker --once`, reconcile)
# reads chunk after chunk to the end, each chunk a transaction of its own.
UNCLAIMED_CHUNK = 2000
_UNCLAIMED_OBJECTS = """
WITH chunk AS (
    SELECT e.object_key, e.received_at FROM {table} AS e
    WHERE e.status = 'pending' AND e.object_key IS NOT NULL AND e.object_key > :after
    ORDER BY e.object_key
    LIMIT :chunk
), due AS (
    SELECT c.object_key FROM chunk AS c
    WHERE (:provider || ':' || c.object_key) NOT IN (
        SELECT j.lock FROM procrastinate_jobs AS j WHERE j.status IN ('todo', 'doing') AND j.lock IS NOT NULL)
    GROUP BY c.object_key
    HAVING min(c.received_at) < :before
), queued AS (
    SELECT array_agg(object_key) AS keys, procrastinate_defer_jobs_v1(array_agg(
        ROW(:queue, :task, 0, :provider || ':' || object_key, NULL,
            jsonb_build_object('provider', :provider, 'object_key', object_key), NULL)::procrastinate_job_to_defer_v1))
    FROM due HAVING count(*) > 0
)
SELECT (SELECT keys FROM queued) AS keys, (SELECT count(*) FROM chunk) AS read,
       (SELECT max(object_key) FROM chunk) AS last
"""
# One pass at a time across workers (a second would find the same objects): a transaction-level
# advisory lock, let go at its commit, held for one chunk (of each provider, by the periodic pass). A
# periodic pass that does not get it leaves its turn to the holder; a pass reading everything waits
# for it, chunk by chunk, with no transaction open while it waits.
_ONE_PASS = text("SELECT pg_try_advisory_xact_lock(hashtext('ledgerline:webhook-dispatch'))")
# A holder keeps the lock for one chunk (milliseconds): waiting longer than this for it means a pass is
# stuck, and a pass that must read everything says so rather than wait on.
ONE_PASS_WAIT_SECONDS = 30.0
# Where this process's dispatch pass stopped in each provider's pending events ("" : the start).
_dispatch_cursor: dict[str, str] = {}


def queue_unclaimed(
    providers: Iterable[WebhookProvider], older_than_seconds: float, *, lost: bool = True, drain: bool = False
) -> list[str]:
    """A job for every object whose pending events (the oldest older_than_seconds) nobody will apply;
    returns the objects queued. lost: this is the minute's backstop, which reads every pending event
    and where finding any is worth a warning; the workers' dispatch pass (lost=False) finds every new
    event this way, reading one chunk of UNCLAIMED_CHUNK pending rows on from where it last stopped.
    drain (with lost=False): everything stored gets its job in this call (`flask billing worker
    --once`, reconcile's drain), read chunk after chunk like the backstop."""
    if db.session.get_bind().dialect.name != "postgresql":
        return []  # the embedded development run applies events inside the request
    before = utcnow() - timedelta(seconds=older_than_seconds)
    if lost or drain:
        queued = [key for provider in providers for key in _queue_every_chunk(provider, before)]
    else:
        queued = _queue_next_chunks(list(providers), before)
    if queued and lost:
        logger.warning("webhook sweep: %d object(s) had pending events and no job: queued %s", len(queued), queued)
    elif queued:
        logger.debug("webhook dispatch: queued %d object(s)", len(queued))
    _job_statistics["queued"] += len(queued)
    if _job_statistics["queued"] >= max(JOB_STATISTICS_AFTER, _job_statistics["rows"]):
        refresh_job_statistics()
    return queued


# procrastinate's fetch (procrastinate_fetch_job_v2) is planned from procrastinate_jobs' statistics.
# Planned while the table held a few rows, it anti-joins every waiting job against the others before
# taking one: 141 ms a fetch with 2,800 webhook jobs waiting (each worker fetches whenever a job ends or
# one is queued), against 0.08 ms once the table is analyzed (measured with EXPLAIN ANALYZE; upstream:
# procrastinate #1242). A backlog grows fastest when Stripe is slow, and autovacuum analyzes a minute
# or more later; so once this process's passes have queued as many jobs as the table held at its last
# analysis (and at least JOB_STATISTICS_AFTER), they analyze it themselves: the statistics are never
# more than about half the jobs behind, and a growing backlog costs a logarithmic number of ANALYZEs.
JOB_STATISTICS_AFTER = 200
_ANALYZE_JOBS = text("ANALYZE procrastinate_jobs")
_ANALYZE_WAIT = text("SET LOCAL lock_timeout = '1s'")
_ANALYZED_ROWS = text("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'procrastinate_jobs'::regclass")
# This process's count of jobs queued since its last ANALYZE, and the rows that ANALYZE found.
_job_statistics = {"queued": 0, "rows": 0}


def refresh_job_statistics() -> None:
    """ANALYZE procrastinate_jobs (a few milliseconds for thousands of jobs), in a transaction of its
    own. Another worker's ANALYZE or an autovacuum holding the table's maintenance lock for more than
    a second: left to them."""
    try:
        with committed():
            db.session.execute(_ANALYZE_WAIT)
            db.session.execute(_ANALYZE_JOBS)
            rows = int(db.session.execute(_ANALYZED_ROWS).scalar() or 0)
    except DBAPIError as exc:
        if getattr(exc.orig, "pgcode", None) != "55P03":  # lock_not_available
            raise
        logger.info("procrastinate_jobs is being analyzed or vacuumed already: its statistics are left to that")
        return
    _job_statistics.update(queued=0, rows=rows)


def _queue_next_chunks(providers: list[WebhookProvider], before: datetime) -> list[str]:
    """The periodic pass: one chunk of each provider's pending rows, on from this process's cursor, in
    one transaction; skipped when another pass holds the lock."""
    queued: list[str] = []
    cursors: dict[str, str] = {}
    with committed():
        if not db.session.execute(_ONE_PASS).scalar():
            return []
        for provider in providers:
            keys, cursors[provider.name] = _queue_chunk(provider, before, _dispatch_cursor.get(provider.name, ""))
            queued += keys
    _dispatch_cursor.update(cursors)  # committed: the next pass goes on from there
    return queued


def _queue_every_chunk(provider: WebhookProvider, before: datetime) -> list[str]:
    """Every pending row of the provider, chunk after chunk, each chunk in a short transaction of its own
    under the one-pass lock (so a backlog of any size neither holds one long transaction nor keeps the
    periodic passes waiting for more than a chunk)."""
    queued: list[str] = []
    after = ""
    while True:
        with _one_pass_turn():
            keys, after = _queue_chunk(provider, before, after)
        queued += keys
        if not after:
            return queued


def _queue_chunk(provider: WebhookProvider, before: datetime, after: str) -> tuple[list[str], str]:
    """One chunk from after, in the caller's transaction: the objects queued, and where the next chunk
    starts ("" when this one reached the end)."""
    statement = text(_UNCLAIMED_OBJECTS.format(table=provider.event_model.__tablename__))
    keys, read, last = db.session.execute(
        statement,
        {
            "before": before,
            "provider": provider.name,
            "queue": WEBHOOK_QUEUE,
            "task": WEBHOOK_TASK,
            "after": after,
            "chunk": UNCLAIMED_CHUNK,
        },
    ).one()
    # A short chunk reached the end.
    return [f"{provider.name}:{object_key}" for object_key in keys or []], last if read == UNCLAIMED_CHUNK else ""


@contextmanager
def _one_pass_turn() -> Iterator[None]:
    """The block runs in a transaction holding the one-pass lock, committed when it ends. While another
    pass holds the lock this waits with no transaction open, trying again, for ONE_PASS_WAIT_SECONDS."""
    deadline = time.monotonic() + ONE_PASS_WAIT_SECONDS
    pause = 0.005
    while True:
        with committed():
            if db.session.execute(_ONE_PASS).scalar():
                yield
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"another webhook dispatch pass held its lock for {ONE_PASS_WAIT_SECONDS:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


# A throttled object is tried again after the provider's Retry-After (or this), plus up to as much again
# at random, so objects throttled together do not all come back in the same second.
THROTTLED_RETRY_SECONDS = 2.0


def _throttled(
    provider: WebhookProvider, object_key: str, row_ids: list[int], exc: ProviderThrottled, *, resync: bool
) -> str:
    """The provider asked us to slow down: nothing failed. The events stay pending (no attempt is
    spent, the reason is shown in `flask billing events`), and a job applies the object after the
    pause; every process is already holding its requests (stripe_pace.py)."""
    db.session.rollback()
    delay = max(exc.retry_after or 0.0, THROTTLED_RETRY_SECONDS)
    delay += random.uniform(0, delay)  # noqa: S311  (jitter)
    logger.warning("applying %s was throttled by the provider: again in %.0f s", object_key, delay)
    with committed():
        note = f"throttled by the provider; retrying in {delay:.0f} s"
        webhook_store.note_throttled(provider.event_model, row_ids, note)
        if resync:
            queue_resync(provider, object_key, delay=delay)
        else:
            queue_application(provider, object_key, delay=delay)
    return f"throttled: again in {delay:.0f} s"


def receive(provider: WebhookProvider, payload: bytes, headers: Mapping[str, str]) -> WebhookResult:
    """A delivery: its signature verified, then, when its event id is one this process saw settled, a
    duplicate at once (its body is not read beyond the id, no round trip); otherwise read as an
    event and stored (store)."""
    text = provider.authenticate(payload, headers)
    seen = _settled_events()
    if seen is not None:
        event_id = provider.event_id(text, headers)
        if event_id is not None and seen.holds(provider.event_model.__tablename__, event_id):
            return WebhookResult(200, {"received": True, "duplicate": True})  # no round trip
    return store(provider, provider.parse(text, headers))


def store(provider: WebhookProvider, event: VerifiedEvent) -> WebhookResult:
    """Intake: store a verified delivery once; a worker's dispatch pass gives it a job (queue_unclaimed).
    On PostgreSQL this is one statement on the autocommit connection (webhook_store.intake:
    deduplicate, store, commit, in one round trip); a duplicate is the same statement, which writes
    nothing."""
    model = provider.event_model
    seen = _settled_events()
    if seen is not None and seen.holds(model.__tablename__, event.event_id):
        return WebhookResult(200, {"received": True, "duplicate": True})  # no round trip
    ignored = provider.ignore_reason(event)
    object_key = error = None
    if not ignored:
        try:
            object_key = provider.object_key(event)
        except MalformedObject as exc:
            error = str(exc)
    status = StripeEventStatus.IGNORED if ignored else StripeEventStatus.FAILED if error else StripeEventStatus.PENDING
    if db.engine.dialect.name == "postgresql":
        row_id, existing = webhook_store.intake(
            model, event, status, outcome=ignored, error=error, object_key=object_key
        )
        # Settled (processed or ignored) is final: a later delivery of it can only be a duplicate.
        if seen is not None and (existing in SETTLED_STATUSES or (row_id is not None and ignored)):
            seen.add(model.__tablename__, event.event_id)
    else:  # the development stand-in: no queue of its own to share-lock
        row_id = _store_in_session(provider, event, status, ignored, error, object_key)
    if row_id is None:  # stored already (or by a concurrent delivery we waited for)
        return WebhookResult(200, {"received": True, "duplicate": True})
    if ignored:
        return WebhookResult(200, {"received": True, "ignored": ignored})
    if error:
        logger.warning("webhook event %s (%s) is malformed: %s", event.event_id, event.type, error)
        return WebhookResult(200, {"received": True, "failed": error})
    return WebhookResult(200, {"received": True})


class SettledEvents:
    """The ids of events this process saw settled (processed or ignored: final statuses), the most
    recent WEBHOOK_SETTLED_CACHE_SIZE of them: a redelivery of one is answered as a duplicate after
    its signature is verified, with no database round trip. A pending event is never held (it may
    still fail, and a failed one is taken over by its next delivery)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def holds(self, table: str, event_id: str) -> bool:
        return (table, event_id) in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, table: str, event_id: str) -> None:
        with self._lock:
            self._ids[(table, event_id)] = None
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)

    def add_older(self, table: str, newest_first: list[str]) -> None:
        """Remember ids settled before this process started, behind the ones it saw itself (the first
        forgotten when the memory is full)."""
        with self._lock:
            for event_id in newest_first[: max(self.size - len(self._ids), 0)]:
                self._ids[(table, event_id)] = None
                self._ids.move_to_end((table, event_id), last=False)


def remember_recent_settled_events() -> int:
    """Start this process's memory of settled events with the most recent ones of each provider's table
    (up to WEBHOOK_SETTLED_CACHE_SIZE), so a worker just started or recycled answers redeliveries of
    them with no round trip too (gunicorn's post_fork calls it). Returns how many it remembered."""
    seen = _settled_events()
    if seen is None:
        return 0
    for model in (StripeEvent, WhopEvent):
        seen.add_older(model.__tablename__, webhook_store.recent_settled_ids(model, seen.size))
    return len(seen)


def _settled_events() -> SettledEvents | None:
    seen: SettledEvents | None = current_app.extensions.get("webhook_settled_events")
    if seen is None:
        size = int(current_app.config.get("WEBHOOK_SETTLED_CACHE_SIZE", 0))
        if size <= 0:
            return None
        seen = current_app.extensions.setdefault("webhook_settled_events", SettledEvents(size))
    return seen


def _store_in_session(
    provider: WebhookProvider,
    event: VerifiedEvent,
    status: StripeEventStatus,
    ignored: str | None,
    error: str | None,
    object_key: str | None,
) -> int | None:
    model = provider.event_model
    if webhook_store.is_recorded(model, event.event_id):
        return None
    with committed():  # on an error nothing is stored; the provider redelivers after a 5xx
        row_id = webhook_store.claim(model, event, status, outcome=ignored, error=error, object_key=object_key)
        if row_id is not None and object_key is not None:
            queue_application(provider, object_key)
    return row_id


def apply_queued(
    provider: WebhookProvider, object_key: str, *, final_attempt: bool = True, resync: bool = False
) -> str:
    """The worker's half: apply every pending event about one object, together, from the object's
    current state at the provider (re-read once, with no transaction open), in one transaction
    that also settles the events. A failure keeps the events pending with the error (the job is
    retried with backoff) and, on the last attempt or for a malformed object, marks them failed.
    resync (reconcile's repair): the object is re-read and applied even with no event pending."""
    model = provider.event_model
    events, row_ids = _collect(provider, object_key)  # nothing is held while the provider is read
    if not events and not resync:
        return "nothing pending"
    with _read_turn(provider, object_key) as (come_back, waited):
        if come_back is not None:
            throttled = ProviderThrottled(come_back)
            return _throttled(provider, object_key, list(row_ids.values()), throttled, resync=resync)
        if waited:  # what arrived while this worker waited for its turn joins the same read
            events, row_ids = _collect(provider, object_key)
            if not events and not resync:
                return "nothing pending"
        try:
            outcomes = provider.apply_batch(object_key, events)
            for event in events:
                status, outcome = outcomes[event.event_id]
                webhook_store.settle(model, row_ids[event.event_id], status, outcome)
            db.session.commit()
        except ProviderThrottled as exc:
            return _throttled(provider, object_key, list(row_ids.values()), exc, resync=resync)
        except Exception as exc:
            db.session.rollback()  # the batch's changes and its domain events go; its rows stay pending
            if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                raise
            permanent = isinstance(exc, MalformedObject)
            logger.log(
                logging.WARNING if permanent else logging.ERROR,
                "applying %d webhook event(s) about %s failed",
                len(events),
                object_key,
                exc_info=not permanent,
            )
            with committed():
                webhook_store.record_attempt_failure(
                    model, list(row_ids.values()), describe_failure(exc), final=permanent or final_attempt
                )
            if permanent:
                return f"failed: {exc}"
            raise
        return f"applied {len(events)} event(s) about {object_key}"


def _collect(provider: WebhookProvider, object_key: str) -> tuple[list[VerifiedEvent], dict[str, int]]:
    """The object's pending events, read in a transaction that ends here."""
    rows = webhook_store.pending_rows(provider.event_model, object_key)
    events = [stored_event(provider, row) for row in rows]
    row_ids = {row.event_id: row.id for row in rows}
    db.session.rollback()
    return events, row_ids


# Waiting this long or more for a turn means the pending events are collected again after it.
_TURN_WAITED_SECONDS = 0.05


@contextmanager
def _read_turn(provider: WebhookProvider, object_key: str) -> Iterator[tuple[float | None, bool]]:
    """For an object the provider reads through the paced client (its `paced_reads` kinds; Stripe:
    stripe_pace.py), the worker takes its turn before it collects the object's events, so a throttled
    worker holds no batch while it waits and the events that arrive meanwhile join the read. Yields
    (seconds to come back or None, whether it waited)."""
    if object_key.partition(":")[0] not in getattr(provider, "paced_reads", ()):
        yield None, False
        return
    started = time.monotonic()
    pace = stripe_pace.for_app(current_app)
    with stripe_pace.turn_ahead(pace, float(current_app.config["STRIPE_RATE_WAIT_SECONDS"])) as come_back:
        yield come_back, time.monotonic() - started >= _TURN_WAITED_SECONDS
