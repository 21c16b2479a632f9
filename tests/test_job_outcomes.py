"""Acknowledged means applied, for the queue itself (issue 20): a job whose outcome the worker fails
to record (its connection cut by PostgreSQL just then) does not stay "doing" under that live worker,
blocking its lock and its object forever; the worker records it once the database answers again."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app.extensions import db
from app.services import queue
from tests.conftest import SandboxAccount, SmtpSink, query, worker_env

ROOT = Path(__file__).resolve().parents[1]
JOBS = "SELECT id, task_name, status, attempts FROM procrastinate_jobs WHERE queue_name = 'cut' ORDER BY id"
# The worker's write of a job's outcome, waiting for the row lock the test holds.
BLOCKED_WRITE = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = 'billing-worker' AND wait_event_type = 'Lock'"
)


def wait_until(condition: Callable[[], Any], seconds: float) -> Any:
    deadline = time.monotonic() + seconds  # a bound on waiting, not a measurement
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    return condition()


def test_an_outcome_whose_write_meets_a_cut_connection_is_recorded_and_the_lock_is_freed(
    app: Flask, smtp_server: SmtpSink, stripe_sandbox: SandboxAccount, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    with app.app_context():
        # Two jobs under one lock, as the usage reports are: the second runs only once the first is over.
        queue.defer("cut:wait_for", queue="cut", lock="one-at-a-time", path=str(release))
        queue.defer("cut:after", queue="cut", lock="one-at-a-time")
        db.session.commit()
    engine = create_engine(str(app.config["SQLALCHEMY_DATABASE_URI"]), poolclass=NullPool)
    log = tmp_path / "worker.log"
    with log.open("wb") as output, engine.connect() as holder, engine.connect() as killer:
        worker = subprocess.Popen(
            [sys.executable, "-m", "tests.cut_worker"],
            cwd=ROOT,
            env=worker_env(app, smtp_server, stripe_sandbox),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        rows: list[Any] = []
        try:
            first = wait_until(lambda: [r for r in query(app, JOBS) if r.status == "doing"], 10)[0]
            # Hold the job's row, let the job return: the worker's write of its outcome waits on the
            # row, in flight, and PostgreSQL ends that connection (a failover, a proxy restart).
            holder.execute(text("SELECT id FROM procrastinate_jobs WHERE id = :id FOR UPDATE"), {"id": first.id})
            release.touch()
            # Bounds on waiting, generous for a machine the rest of the suite keeps busy (a CI run once
            # waited past 5 s here).
            blocked = wait_until(lambda: killer.execute(text(BLOCKED_WRITE)).scalars().all(), 20)
            assert blocked, "the worker never wrote the job's outcome"
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": blocked[0]})
            killer.commit()
            holder.rollback()
            wait_until(lambda: [r.status for r in query(app, JOBS)] == ["succeeded", "succeeded"], 20)
            rows = query(app, JOBS)
            alive = worker.poll() is None
        finally:
            release.touch()
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
    engine.dispose()
    output_text = log.read_text()
    # The cut met the worker's write of the job's outcome (else this test proves nothing)...
    assert "terminating connection due to administrator command" in output_text
    assert "procrastinate_finish_job_v1" in output_text
    # ...the worker lived on, recorded the outcome of the job it ran once, and the lock was freed
    # (before: the job stayed "doing" under the live worker, and "cut:after" never ran).
    assert alive
    # (A finished job counts its one attempt: a job run twice would show two.)
    assert [(row.task_name, row.status, row.attempts) for row in rows] == [
        ("cut:wait_for", "succeeded", 1),
        ("cut:after", "succeeded", 1),
    ], rows


def start_worker_and_orphan(
    app: Flask, env: dict[str, str], log: Path, *, queueing_lock: str | None = None
) -> subprocess.Popen[bytes]:
    """A worker process, and one job "doing" under its id that it does not run (as a lost outcome leaves)."""
    newest_worker = "SELECT coalesce(max(id), 0) AS id FROM procrastinate_workers"
    before = query(app, newest_worker)[0].id
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "tests.cut_worker"], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    worker_id = wait_until(lambda: (row := query(app, newest_worker)[0]).id > before and row.id, 10)
    assert worker_id, "the worker never registered"
    with app.app_context():
        queue.defer("cut:after", queue="cut", lock="one-at-a-time", queueing_lock=queueing_lock)
        db.session.execute(
            text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w WHERE queue_name = 'cut'"),
            {"w": worker_id},
        )
        db.session.commit()
    return worker


def stop(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    try:
        worker.wait(20)
    except subprocess.TimeoutExpired:
        worker.kill()


def test_a_job_left_doing_under_a_live_worker_that_no_longer_runs_it_is_queued_again(
    app: Flask, smtp_server: SmtpSink, stripe_sandbox: SandboxAccount, tmp_path: Path
) -> None:
    """The backstop, whatever lost the outcome: each worker queues again the jobs "doing" under its own
    id that it is not running (found so on two passes in a row); the job runs again, once."""
    env = {**worker_env(app, smtp_server, stripe_sandbox), "WORKER_RECOVERY_SECONDS": "0.3"}
    log = tmp_path / "worker.log"
    worker = start_worker_and_orphan(app, env, log)
    try:
        with app.app_context():
            queue.defer("cut:after", queue="cut", lock="one-at-a-time")
            db.session.commit()
        wait_until(lambda: [r.status for r in query(app, JOBS)] == ["succeeded", "succeeded"], 8)
        rows = query(app, JOBS)
        alive = worker.poll() is None
    finally:
        stop(worker)
    assert alive
    # The orphan was queued again (an attempt counted), ran once (another), and freed the lock.
    assert [(row.task_name, row.status, row.attempts) for row in rows] == [
        ("cut:after", "succeeded", 2),
        ("cut:after", "succeeded", 1),
    ], (rows, log.read_text()[-3000:])
    assert "was left running by this worker, which no longer runs it: queued again" in log.read_text()


def test_an_orphan_whose_queueing_lock_a_waiting_run_holds_is_failed_and_the_waiting_run_kept(
    app: Flask, smtp_server: SmtpSink, stripe_sandbox: SandboxAccount, tmp_path: Path
) -> None:
    """As for dead workers' jobs: queued again it would take a queueing lock a waiting run holds (a
    schedule's next run), so it is failed, visibly, and the waiting run does the work."""
    env = {**worker_env(app, smtp_server, stripe_sandbox), "WORKER_RECOVERY_SECONDS": "0.3"}
    log = tmp_path / "worker.log"
    worker = start_worker_and_orphan(app, env, log, queueing_lock="next-run")
    try:
        with app.app_context():
            later = datetime.now(UTC) + timedelta(hours=1)
            queue.defer("cut:after", queue="cut", queueing_lock="next-run", scheduled_at=later)
            db.session.commit()
        wait_until(lambda: [r.status for r in query(app, JOBS)] == ["failed", "todo"], 8)
        rows = query(app, JOBS)
    finally:
        stop(worker)
    assert [(row.task_name, row.status) for row in rows] == [("cut:after", "failed"), ("cut:after", "todo")], (
        rows,
        log.read_text()[-3000:],
    )
    assert "could not be queued again: failed" in log.read_text()
