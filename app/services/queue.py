"""The job queue: procrastinate on the application's PostgreSQL database, so that background work is
as durable as the billing data it changes (a Redis flush or restart loses no job).

Tasks are declared on procrastinate Blueprints in the services that own them (outbox.py for domain
event delivery, jobs.py for webhook application and the schedules) and gathered into one procrastinate
App by `job_app()`. A task body runs inside a Flask application context of the app that started the
worker (`bind`), with its own database session, removed when the task returns.

Jobs are deferred with `defer()` inside the caller's SQLAlchemy transaction: the job row is inserted
through procrastinate's own `procrastinate_defer_jobs_v1` function on the session's connection, so a
job exists exactly when the work that asked for it committed (the transactional outbox; procrastinate's
Django integration does the same on Django's connection). A `queueing_lock` that is already taken by a
waiting job means that job will do this work too: the defer is dropped (coalesced) under a savepoint.

On the SQLite development stand-in there is no queue: committed jobs run in a thread of the process
that deferred them (development only; production requires PostgreSQL)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any, ParamSpec, TypeVar

import procrastinate
from flask import Flask, current_app, has_app_context
from procrastinate.retry import BaseRetryStrategy, RetryDecision
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.extensions import db
from app.services import job_outcomes

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

QUEUEING_LOCK_INDEX = "procrastinate_jobs_queueing_lock_idx_v1"
_EAGER_KEY = "queue_eager_jobs"
_DEFER = text(
    "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(:queue, :task, :priority, :lock, :queueing_lock, "
    "CAST(:args AS jsonb), :scheduled_at)::procrastinate_job_to_defer_v1])"
)

_bound: dict[str, Flask] = {}
# Passes a worker runs beside its jobs, every WORKER_DISPATCH_SECONDS and before `--once` runs what is
# due: each turns stored work that has no job yet into jobs (webhook events: jobs.py). Its argument,
# coalesce: leave work younger than its coalescing window for a later pass (False: everything, now).
_dispatchers: list[Callable[[bool], object]] = []
_blueprints: list[tuple[str, procrastinate.Blueprint]] = []
_job_app: procrastinate.App | None = None
_connectors: dict[str, procrastinate.PsycopgConnector] = {}
_building = threading.Lock()


class CappedExponentialRetry(BaseRetryStrategy):
    """Retry after JOB_RETRY_BASE_SECONDS ** attempt seconds, at most JOB_RETRY_MAX_WAIT_SECONDS, until
    the setting named ``max_attempts_setting`` have failed. Read from the Flask app when a job fails."""

    def __init__(self, max_attempts_setting: str = "JOB_MAX_ATTEMPTS") -> None:
        self.max_attempts_setting = max_attempts_setting

    def get_retry_decision(self, *, exception: BaseException, job: procrastinate.jobs.Job) -> RetryDecision | None:
        config = flask_app().config
        if job.attempts + 1 >= int(config[self.max_attempts_setting]):
            return None
        wait = min(
            int(config["JOB_RETRY_BASE_SECONDS"]) ** (job.attempts + 1), int(config["JOB_RETRY_MAX_WAIT_SECONDS"])
        )
        return RetryDecision(retry_in={"seconds": wait})


RETRY = CappedExponentialRetry()
# Emails outlast an SMTP outage of a day (OUTBOX_MAX_ATTEMPTS), then fail where ops see them.
OUTBOX_RETRY = CappedExponentialRetry("OUTBOX_MAX_ATTEMPTS")


def register_blueprint(namespace: str, blueprint: procrastinate.Blueprint) -> None:
    """Add a service's tasks to the job app (task names become ``namespace:name``)."""
    if all(existing is not blueprint for _, existing in _blueprints):
        _blueprints.append((namespace, blueprint))


def register_dispatcher(dispatch: Callable[[bool], object]) -> None:
    """Run ``dispatch`` (in an application context) in every worker every WORKER_DISPATCH_SECONDS."""
    if dispatch not in _dispatchers:
        _dispatchers.append(dispatch)


def dispatch_now(app: Flask, *, coalesce: bool = True) -> None:
    """One pass of every dispatcher, each in an application context of its own (session removed).
    coalesce=False: whatever is stored gets its job now (running what is due: `--once`, a drain)."""
    for dispatch in _dispatchers:
        with app.app_context():
            try:
                dispatch(coalesce)
            finally:
                db.session.remove()


def bind(app: Flask) -> None:
    """Run task bodies in ``app``'s context from now on (the app that runs the worker)."""
    _bound["app"] = app


def flask_app() -> Flask:
    if has_app_context():
        return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
    try:
        return _bound["app"]
    except KeyError:
        raise RuntimeError("no Flask app is bound to the job queue (queue.bind(app))") from None


def in_app_context(func: Callable[P, R]) -> Callable[P, R]:
    """Run a task body in the bound Flask app's context with a fresh session, removed afterwards."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with _bound_app().app_context():
            try:
                return func(*args, **kwargs)
            finally:
                db.session.remove()

    return wrapper


def _bound_app() -> Flask:
    try:
        return _bound["app"]
    except KeyError:
        raise RuntimeError("no Flask app is bound to the job queue (queue.bind(app))") from None


def conninfo(app: Flask) -> str:
    """libpq's form of the app's database URL (procrastinate's connector is psycopg 3)."""
    url = str(app.config["SQLALCHEMY_DATABASE_URI"])
    for prefix in ("postgresql+psycopg2://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def job_app(app: Flask) -> procrastinate.App:
    """The process's procrastinate App, with every registered task, connected to ``app``'s database.
    (Blueprint tasks can join one App only, so there is one per process; its connector follows the
    Flask app that asks.)"""
    global _job_app  # noqa: PLW0603  (built once, on first use)
    with _building:  # two first jobs at once (the stand-in's threads) must not each build one
        if _job_app is None:
            if not _blueprints:
                # Tasks register themselves when their modules are imported, which the app factory does
                # (create_app -> register_services): a process that never made the app has no tasks.
                raise RuntimeError("no tasks are registered: build the Flask app (create_app) before the job queue")
            jobs = procrastinate.App(connector=procrastinate.PsycopgConnector())
            for namespace, blueprint in _blueprints:
                jobs.add_tasks_from(blueprint, namespace=namespace)
            _job_app = jobs
        target = conninfo(app)
        if target not in _connectors:
            _connectors[target] = procrastinate.PsycopgConnector(
                conninfo=target,
                min_size=1,
                max_size=max(2, int(app.config["WORKER_CONCURRENCY"]) + 2),
                kwargs={"application_name": "billing-worker"},
            )
    _job_app.connector = _connectors[target]
    _job_app.job_manager.connector = _connectors[target]
    return _job_app


@dataclass(frozen=True)
class DeferredJob:
    task: str
    args: dict[str, Any]
    queue: str
    lock: str | None
    queueing_lock: str | None
    scheduled_at: datetime | None
    priority: int


def defer(
    task: str,
    /,
    *,
    queue: str,
    lock: str | None = None,
    queueing_lock: str | None = None,
    scheduled_at: datetime | None = None,
    priority: int = 0,
    **args: Any,
) -> bool:
    """Insert a job into the current transaction of ``db.session``; it exists once that commits.
    Returns False when a waiting job holds ``queueing_lock`` (it will do this work: coalesced)."""
    job = DeferredJob(task, args, queue, lock, queueing_lock, scheduled_at, priority)
    session = db.session()
    if session.get_bind().dialect.name != "postgresql":
        session.info.setdefault(_EAGER_KEY, []).append(job)
        return True
    params = {
        "queue": queue,
        "task": task,
        "priority": priority,
        "lock": lock,
        "queueing_lock": queueing_lock,
        "args": json.dumps(args),
        "scheduled_at": scheduled_at,
    }
    if queueing_lock is None:
        session.execute(_DEFER, params)
        return True
    try:
        with session.begin_nested():
            session.execute(_DEFER, params)
    except IntegrityError as exc:
        if QUEUEING_LOCK_INDEX not in str(exc.orig):
            raise
        return False
    return True


def run_pending_jobs(app: Flask, *, queues: list[str] | None = None, concurrency: int = 1) -> None:
    """Run every job that is due now, the way `flask billing worker` does, and return when none is
    left (tests, and `flask billing worker --once`)."""
    bind(app)
    jobs = job_app(app)
    dispatch_now(app, coalesce=False)
    with _one_burst_at_a_time:
        waiting = _due_jobs(app, queues)
        # procrastinate's worker (wait=False) fetches until a fetch finds nothing; with concurrency above
        # one that can be while its running jobs still defer more (an applied event's outbox deliveries),
        # which it then leaves. So again, while the jobs due changed and some are left.
        while True:
            _run_due_jobs(jobs, queues, concurrency)
            left = _due_jobs(app, queues)
            if left[0] == 0 or left == waiting:  # none left, or none of them could run here
                return
            waiting = left


# The process's job app has one connector pool, bound to the event loop of the burst that opened it:
# two threads running bursts at once (a command draining the queue beside an in-process worker) would
# share it across loops, so bursts take turns.
_one_burst_at_a_time = threading.Lock()


# Jobs a worker could fetch now: waiting, due, in the queues, and first under their lock (no job of
# the lock running, none waiting ahead of it: procrastinate_fetch_job_v2's own condition).
_DUE_JOBS = text(
    """
    SELECT count(*), max(j.id) FROM procrastinate_jobs AS j
    WHERE j.status = 'todo' AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
      AND (:every_queue OR j.queue_name = ANY(:queues))
      AND NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs AS o
        WHERE j.lock IS NOT NULL AND o.lock = j.lock AND (o.status = 'doing' OR (o.status = 'todo'
          AND (o.priority > j.priority OR (o.priority = j.priority AND o.id < j.id)))))
    """
)


def _due_jobs(app: Flask, queues: list[str] | None) -> tuple[int, int | None]:
    """How many jobs a worker could fetch now, and the newest of them (so a round that ran none of
    them and deferred none is told from one that made progress)."""
    with app.app_context():
        try:
            count, newest = db.session.execute(_DUE_JOBS, {"every_queue": queues is None, "queues": queues or []}).one()
            return int(count), newest
        finally:
            db.session.remove()


def _run_due_jobs(jobs: procrastinate.App, queues: list[str] | None, concurrency: int) -> None:
    # No schedules here: running what is due must not defer the periodic work as well.
    schedules = dict(jobs.periodic_registry.periodic_tasks)
    jobs.periodic_registry.periodic_tasks.clear()
    try:
        jobs.run_worker(
            queues=queues,
            wait=False,
            concurrency=concurrency,
            install_signal_handlers=False,
            listen_notify=False,
            delete_jobs="never",
        )
    finally:
        jobs.periodic_registry.periodic_tasks.update(schedules)


def run_pending_jobs_now(app: Flask, *, queues: list[str] | None = None) -> None:
    """run_pending_jobs from code that may already run an event loop (a request, a command under a
    test runner): in a thread of its own, where asyncio may start one."""
    target = app._get_current_object() if hasattr(app, "_get_current_object") else app
    with ThreadPoolExecutor(max_workers=1) as executor:
        executor.submit(run_pending_jobs, target, queues=queues).result()


def run_worker(app: Flask, *, queues: list[str] | None = None, concurrency: int | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT: it stops fetching, lets running jobs finish (their effects
    are committed, or not at all) and exits. Beside its jobs it beats its heartbeat every
    WORKER_HEARTBEAT_SECONDS and, every WORKER_RECOVERY_SECONDS, queues again the jobs of workers whose
    heartbeat is WORKER_STALLED_SECONDS old (dead: SIGKILL, a lost host), so their claims are leases.
    A job's outcome whose write meets a lost connection is written again until it is recorded, and a
    job left "doing" under this live worker that it no longer runs is queued again every
    WORKER_RECOVERY_SECONDS (job_outcomes.OutcomeKeepingWorker: issue 20)."""
    bind(app)
    jobs = job_app(app)
    config = app.config
    stalled = float(config["WORKER_STALLED_SECONDS"])

    # procrastinate's worker, whose record of a finished job survives a lost connection, and which
    # queues again a job "doing" under its own id that it no longer runs (job_outcomes, issue 20).
    worker = job_outcomes.make_worker(
        jobs,
        queues=queues,  # None: every queue (as App.run_worker passes it)
        concurrency=concurrency or int(config["WORKER_CONCURRENCY"]),
        wait=True,
        install_signal_handlers=True,
        listen_notify=True,
        delete_jobs="never",
        fetch_job_polling_interval=float(config["WORKER_POLL_SECONDS"]),
        update_heartbeat_interval=float(config["WORKER_HEARTBEAT_SECONDS"]),
        stalled_worker_timeout=stalled,
    )

    async def run() -> None:
        async with jobs.open_async():
            recovery = asyncio.create_task(
                _recover_stalled_jobs_forever(jobs, float(config["WORKER_RECOVERY_SECONDS"]), stalled, worker)
            )
            dispatching = asyncio.create_task(_dispatch_forever(app, float(config["WORKER_DISPATCH_SECONDS"])))
            try:
                await worker.run()  # type: ignore[no-untyped-call]
            finally:
                recovery.cancel()
                dispatching.cancel()

    asyncio.run(run())


async def _dispatch_forever(app: Flask, every: float) -> None:
    """The dispatch passes, in a thread (they use the app's synchronous engine), every ``every`` seconds
    (a pass that finds another worker's under way skips: see webhook_intake.queue_unclaimed)."""
    while True:
        try:
            await asyncio.to_thread(dispatch_now, app)
        except Exception:  # the database is away: the next pass tries again
            logger.warning("dispatching stored work to jobs failed", exc_info=True)
        await asyncio.sleep(every * random.uniform(0.9, 1.1))  # noqa: S311  (workers do not all look at once)


async def _recover_stalled_jobs_forever(
    jobs: procrastinate.App, every: float, stalled: float, worker: job_outcomes.OutcomeKeepingWorker | None = None
) -> None:
    while True:
        await asyncio.sleep(every * random.uniform(0.8, 1.2))  # noqa: S311  (workers do not all look at once)
        try:
            await requeue_stalled_jobs(jobs, stalled)
        except Exception:  # the database is away: the next round tries again
            logger.warning("looking for jobs left by dead workers failed", exc_info=True)
        if worker is None:
            continue
        try:  # and the jobs this (live) worker left "doing" without running them any more
            await worker.requeue_orphans()
        except Exception:
            logger.warning("looking for jobs this worker left running failed", exc_info=True)


async def requeue_stalled_jobs(jobs: procrastinate.App, seconds_since_heartbeat: float) -> int:
    """Jobs left "doing" by workers whose heartbeat is seconds_since_heartbeat old run again (now),
    and the workers listening are woken for them. Returns how many were queued again."""
    stalled = list(await jobs.job_manager.get_stalled_jobs(seconds_since_heartbeat=seconds_since_heartbeat))
    requeued = 0
    for job in stalled:
        # One job that cannot be queued again must not stop the others from being recovered.
        try:
            await jobs.job_manager.retry_job(job)
        except Exception:
            assert job.id is not None  # a job read from the table has its id
            if await jobs.job_manager.get_job_status_async(job.id) != procrastinate.jobs.Status.DOING:
                continue  # another worker's recovery queued it first (or it finished): nothing to do
            # A scheduled task whose next run is already waiting (its queueing lock taken): this run
            # is over; the waiting one does the work.
            logger.exception("stalled job %s (%s) could not be queued again: marked failed", job.id, job.task_name)
            await jobs.job_manager.finish_job(job, status=procrastinate.jobs.Status.FAILED, delete_job=False)
            continue
        logger.warning("job %s (%s) was left running by a dead worker: queued again", job.id, job.task_name)
        requeued += 1
        # A job queued again is an update, which wakes no worker (only an insert NOTIFYs): say it.
        await jobs.connector.execute_query_async(
            "SELECT pg_notify('procrastinate_any_queue_v1', %(payload)s)",
            payload=json.dumps({"type": "job_inserted", "job_id": job.id}),
        )
    return requeued


# --- the development stand-in: no PostgreSQL, no queue -------------------------------------------


@event.listens_for(Session, "after_commit")
def _run_eager_jobs(session: Session) -> None:
    jobs: list[DeferredJob] = session.info.pop(_EAGER_KEY, [])
    if not jobs:
        return
    app = flask_app()
    thread = threading.Thread(target=_run_in_thread, args=(app, jobs), name="eager-jobs", daemon=True)
    thread.start()


@event.listens_for(Session, "after_soft_rollback")
def _forget_eager_jobs(session: Session, previous_transaction: Any) -> None:
    if not previous_transaction.nested:
        session.info.pop(_EAGER_KEY, None)


def _run_in_thread(app: Flask, jobs: list[DeferredJob]) -> None:
    bind(app)
    tasks = job_app(app).tasks
    for job in jobs:
        task = tasks[job.task]
        try:
            if task.pass_context:  # no job row here: the task sees a first (and only) attempt
                task(SimpleNamespace(job=None), **job.args)
            else:
                task(**job.args)
        except Exception:
            logger.exception("job %s failed (development stand-in: not retried)", job.task)
