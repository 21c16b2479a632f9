"""A job's outcome is recorded, whatever the database connection does meanwhile (issue 20).

procrastinate's worker writes a finished job's status (succeeded, failed, or queued again for a retry)
once: when that write meets a connection PostgreSQL has just cut, it raises inside the job's task
("Task exception was never retrieved"), and the job stays ``doing`` under a worker that is alive and
beats its heartbeat, so the stalled-job recovery (queue.requeue_stalled_jobs), which only takes the
jobs of silent workers, never frees it. Its lock (``usage:report``) and its object (a webhook
application: webhook_intake.queue_unclaimed gives no job to an object with one running) stay blocked.

`OutcomeKeepingWorker` writes the outcome again, with a capped backoff, until it is recorded. Each
retry is one transaction that locks the job row and writes only when the job is still ``doing`` under
this worker: if the first write had committed before the cut (only its answer lost), or the job was
taken over meanwhile (this worker was declared dead and the job ran elsewhere), nothing is written.
The job keeps its place among the worker's running jobs until then, so the worker does not take more
work than its concurrency, and no recovery runs it a second time while it is being recorded.

A worker asked to stop keeps trying for WORKER_STALLED_SECONDS more, then gives up loudly: it exits,
its row goes, and the stalled-job recovery of the other workers runs the job again (its effects are
committed or not at all, and a second run of a finished job changes nothing).

The backstop, whatever else loses an outcome: every WORKER_RECOVERY_SECONDS the worker looks for jobs
``doing`` under its own id that it is not running, and queues them again (`requeue_orphans`); a job is
taken for orphaned only when two passes in a row find it so, since one the worker has just claimed
joins its running jobs at once, so that no job ever runs twice at the same time."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import procrastinate
from procrastinate import job_context, jobs, retry
from procrastinate.worker import Worker
from psycopg.errors import UniqueViolation
from psycopg.rows import tuple_row

logger = logging.getLogger(__name__)

FIRST_DELAY_SECONDS = 0.1

_STILL_OURS = "SELECT status, worker_id FROM procrastinate_jobs WHERE id = %s FOR UPDATE"
_FINISH = "SELECT procrastinate_finish_job_v1(%s, %s, %s)"
_RETRY = "SELECT procrastinate_retry_job_v2(%s, %s, %s, %s, %s)"
_MINE_DOING = "SELECT id FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = %(worker_id)s"
_WAKE = "SELECT pg_notify('procrastinate_any_queue_v1', %s)"


class OutcomeKeepingWorker(Worker):
    """procrastinate's Worker, whose record of a job's outcome survives lost connections."""

    def __init__(self, *args: Any, max_delay_seconds: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_delay_seconds = max_delay_seconds
        self._orphans_seen: set[int] = set()

    def _running_job_ids(self) -> set[int]:
        return {context.job.id for context in self._running_jobs.values() if context.job.id is not None}

    async def requeue_orphans(self) -> int:
        """The backstop: jobs ``doing`` under this worker's id that it is not running (however their
        outcome was lost) are queued again. A job counts as orphaned when two passes in a row find it
        so: a job this worker has just claimed is among its running jobs by the next pass, and one being
        recorded stays among them until it is. Returns how many were queued again (or failed)."""
        if self.worker_id is None:
            return 0
        rows = await self.app.connector.execute_query_all_async(_MINE_DOING, worker_id=self.worker_id)
        orphans = {int(row["id"]) for row in rows} - self._running_job_ids()
        confirmed, self._orphans_seen = orphans & self._orphans_seen, orphans
        settled = 0
        for job_id in sorted(confirmed):
            try:  # any other error (the database away) ends the pass: the next one looks again
                written = await self._requeue_orphan(job_id, fail=False)
            except UniqueViolation:
                # Its queueing lock is taken by a waiting job (a schedule's next run): that one does the work.
                logger.exception("job %s was left running by this worker and could not be queued again: failed", job_id)
                written = await self._requeue_orphan(job_id, fail=True)
            if written:
                settled += 1
                self._orphans_seen.discard(job_id)
        return settled

    async def _requeue_orphan(self, job_id: int, *, fail: bool) -> bool:
        connector = self.app.connector
        assert isinstance(connector, procrastinate.PsycopgConnector)
        async with connector.pool.connection() as connection, connection.transaction():
            cursor = connection.cursor(row_factory=tuple_row)
            await cursor.execute(_STILL_OURS, (job_id,))
            row = await cursor.fetchone()
            if row is None or row[0] != "doing" or row[1] != self.worker_id or job_id in self._running_job_ids():
                return False
            if fail:
                await cursor.execute(_FINISH, (job_id, jobs.Status.FAILED.value, False))
                return True
            await cursor.execute(_RETRY, (job_id, procrastinate.utils.utcnow(), None, None, None))
            # A job queued again is an update, which wakes no worker (only an insert NOTIFYs): say it.
            await cursor.execute(_WAKE, (json.dumps({"type": "job_inserted", "job_id": job_id}),))
        logger.warning("job %s was left running by this worker, which no longer runs it: queued again", job_id)
        return True

    async def _persist_job_status(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: retry.RetryDecision | None,
        context: job_context.JobContext,
        job_result: job_context.JobResult | None,
    ) -> None:
        try:
            await super()._persist_job_status(
                job=job, status=status, retry_decision=retry_decision, context=context, job_result=job_result
            )
            return
        except Exception:
            logger.warning(
                "job %s (%s): recording its outcome (%s) failed; retrying",
                job.id,
                job.task_name,
                status.value,
                exc_info=True,
            )
        if retry_decision is not None and retry_decision.retry_at is None:
            # procrastinate dates a retry "now" when it writes it: the first attempt's now, not a later one.
            retry_decision.retry_at = procrastinate.utils.utcnow()
        delay = FIRST_DELAY_SECONDS
        give_up_at: float | None = None
        while True:
            if self._stop_event.is_set():
                now = time.monotonic()
                if give_up_at is None:
                    give_up_at = now + self.stalled_worker_timeout
                elif now >= give_up_at:
                    logger.error(
                        "job %s (%s): its outcome (%s) could not be recorded before the worker stopped; the "
                        "stalled-job recovery runs it again",
                        job.id,
                        job.task_name,
                        status.value,
                    )
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_delay_seconds)
            try:
                written = await self._record_if_still_ours(job, status, retry_decision)
            except Exception:
                logger.warning("job %s (%s): recording its outcome failed again", job.id, job.task_name, exc_info=True)
                continue
            assert job.id is not None
            self._job_ids_to_abort.pop(job.id, None)
            if written:
                logger.warning(
                    "job %s (%s): outcome %s recorded after a lost connection", job.id, job.task_name, status.value
                )
            else:
                logger.warning(
                    "job %s (%s): no longer running here (its outcome was recorded before the connection was "
                    "lost, or the job was taken over): left as it is",
                    job.id,
                    job.task_name,
                )
            return

    async def _record_if_still_ours(
        self, job: jobs.Job, status: jobs.Status, retry_decision: retry.RetryDecision | None
    ) -> bool:
        """Write the outcome in one transaction, when the job is still ``doing`` under this worker."""
        connector = self.app.connector
        assert isinstance(connector, procrastinate.PsycopgConnector)
        async with connector.pool.connection() as connection, connection.transaction():
            cursor = connection.cursor(row_factory=tuple_row)
            await cursor.execute(_STILL_OURS, (job.id,))
            row = await cursor.fetchone()
            if row is None or row[0] != "doing" or row[1] != self.worker_id:
                return False
            if retry_decision is not None:
                await cursor.execute(
                    _RETRY,
                    (
                        job.id,
                        retry_decision.retry_at,
                        retry_decision.priority,
                        retry_decision.queue,
                        retry_decision.lock,
                    ),
                )
            else:
                delete = {
                    jobs.DeleteJobCondition.ALWAYS: True,
                    jobs.DeleteJobCondition.NEVER: False,
                    jobs.DeleteJobCondition.SUCCESSFUL: status == jobs.Status.SUCCEEDED,
                }[self.delete_jobs]
                await cursor.execute(_FINISH, (job.id, status.value, delete))
            return True


def make_worker(app: procrastinate.App, **options: Any) -> OutcomeKeepingWorker:
    """What App.run_worker_async runs, as an OutcomeKeepingWorker (run it with ``await worker.run()``)."""
    app.perform_import_paths()  # type: ignore[no-untyped-call]
    return OutcomeKeepingWorker(app=app, **{**app.worker_defaults, **options})
