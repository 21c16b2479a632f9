"""The worker's tasks that are not the outbox's: housekeeping on a schedule (procrastinate periodic
tasks; the worker defers each once per tick however many workers run). Importing this module
registers every task the worker runs (outbox delivery and the billing emails included)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import procrastinate
from sqlalchemy import select, update

from app.extensions import db
from app.models import PendingSignup, SignupStatus, StripeEvent, StripeEventStatus, WhopEvent
from app.models.types import utcnow
from app.services import (  # noqa: F401  (registers the consumers)
    customer_sync,
    domain_events,
    notifications,
    outbox,
    queue,
    receipts,
    staff_actions,
)
from app.services.billing_service import WEBHOOK_QUEUE, BillingService

logger = logging.getLogger(__name__)

webhooks = procrastinate.Blueprint()
maintenance = procrastinate.Blueprint()


@webhooks.task(name="apply", queue=WEBHOOK_QUEUE, retry=queue.RETRY, pass_context=True)
@queue.in_app_context
def apply_webhook_events(
    context: procrastinate.JobContext, provider: str, object_key: str, resync: bool = False
) -> str:
    """Apply the stored webhook events about one object (one job per object at a time, coalesced);
    resync: reconcile asks for the object to be re-read and applied with no event pending."""
    attempts = context.job.attempts if context.job else 0
    final = attempts + 1 >= int(queue.flask_app().config["JOB_MAX_ATTEMPTS"])
    return BillingService.apply_queued_events(provider, object_key, final_attempt=final, resync=resync)


@webhooks.task(name="sync_customer", queue=WEBHOOK_QUEUE, retry=queue.RETRY)
@queue.in_app_context
def sync_customer(organization_id: int, request: str) -> str:
    """Reconcile's repair of a customer lacking the account's email or name (customer_sync.queue_sync):
    read afresh, sent only what it lacks; the key is the request's and what is sent."""
    return customer_sync.push_details(organization_id, BillingService, key=f"customer-sync-{request}")


QUEUE = "maintenance"
# A pending signup is closed this long after its expiry, when its Checkout Session (which expires at
# the same moment at Stripe) can no longer be paid.
SIGNUP_EXPIRY_MARGIN = timedelta(hours=1)


@maintenance.periodic(cron="* * * * *")
@maintenance.task(name="recover_stalled_jobs", queue=QUEUE, queueing_lock="recover_stalled_jobs", pass_context=True)
async def recover_stalled_jobs(context: procrastinate.JobContext, timestamp: int) -> int:
    """Jobs left "doing" by a worker that died (SIGKILL, lost host) run again. Every worker also does
    this every WORKER_RECOVERY_SECONDS (queue.run_worker); this schedule is the backstop."""
    return await requeue_stalled_jobs(context.app, float(queue.flask_app().config["WORKER_STALLED_SECONDS"]))


async def requeue_stalled_jobs(jobs: procrastinate.App, seconds_since_heartbeat: float = 30) -> int:
    return await queue.requeue_stalled_jobs(jobs, seconds_since_heartbeat)


def requeue_stalled_jobs_now(jobs: procrastinate.App, seconds_since_heartbeat: float = 30) -> int:
    async def run() -> int:
        async with jobs.open_async():
            return await requeue_stalled_jobs(jobs, seconds_since_heartbeat)

    # In a thread of its own: the calling thread may already run an event loop (asyncio.run refuses then).
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, run()).result()


@maintenance.periodic(cron="* * * * *")
@maintenance.task(name="apply_unclaimed_events", queue=QUEUE, queueing_lock="apply_unclaimed_events")
@queue.in_app_context
def apply_unclaimed_events(timestamp: int) -> int:
    """Acknowledged means applied: a stored pending event nobody is applying gets a job again."""
    seconds = float(queue.flask_app().config["WEBHOOK_SWEEP_AFTER_SECONDS"])
    return len(BillingService.queue_unclaimed_events(older_than_seconds=seconds))


@maintenance.periodic(cron="*/10 * * * *")
@maintenance.task(name="expire_pending_signups", queue=QUEUE, queueing_lock="expire_pending_signups")
@queue.in_app_context
def expire_pending_signups(timestamp: int) -> int:
    return close_expired_signups()


def close_expired_signups() -> int:
    """Pending signups past their expiry become expired and lose their password hash."""
    rows = (
        db.session.execute(
            select(PendingSignup)
            .where(
                PendingSignup.status == SignupStatus.PENDING, PendingSignup.expires_at < utcnow() - SIGNUP_EXPIRY_MARGIN
            )
            .with_for_update(skip_locked=True)
            .limit(500)
        )
        .scalars()
        .all()
    )
    for pending in rows:
        pending.status = SignupStatus.EXPIRED
        pending.failure_reason = "the checkout was not completed before it expired"
        pending.password_hash = None
        domain_events.record(
            "signup.expired", source="schedule", pending_signup_id=str(pending.id), reason=pending.failure_reason
        )
    db.session.commit()
    return len(rows)


@maintenance.periodic(cron="17 3 * * *")
@maintenance.task(name="drop_old_event_payloads", queue=QUEUE, queueing_lock="drop_old_event_payloads")
@queue.in_app_context
def drop_old_event_payloads(timestamp: int) -> int:
    return drop_event_payloads()


def drop_event_payloads() -> int:
    """Empty the stored payload of settled webhook events (processed or ignored) older than
    EVENT_PAYLOAD_RETENTION_DAYS, in every provider's table; the row, its type, status and outcome stay.
    A pending or failed event keeps its payload: it is still to be applied, or replayed."""
    days = int(queue.flask_app().config["EVENT_PAYLOAD_RETENTION_DAYS"])
    emptied = 0
    for model in (StripeEvent, WhopEvent):
        result = db.session.execute(
            update(model)
            .where(
                model.received_at < utcnow() - timedelta(days=days),
                model.status.in_((StripeEventStatus.PROCESSED, StripeEventStatus.IGNORED)),
                model.payload != "",
            )
            .values(payload="")
        )
        emptied += int(getattr(result, "rowcount", 0) or 0)
    db.session.commit()
    return emptied


@maintenance.periodic(cron="41 4 * * *")
@maintenance.task(name="reconcile_daily", queue=QUEUE, queueing_lock="reconcile_daily")
@queue.in_app_context
def reconcile_daily(timestamp: int) -> str:
    """Once a day: `flask billing reconcile --apply` (compare Stripe with the database and repair the
    drift). BillingService.reconcile comes with the reconcile command; until it is there this says so."""
    reconcile = getattr(BillingService, "reconcile", None)
    if reconcile is None:
        logger.warning("daily reconcile: BillingService.reconcile is not available in this version")
        return "reconcile not available"
    report = reconcile(apply=True, drain=False)  # this worker's peers apply what it queues
    for line in report.lines():
        logger.info("daily reconcile: %s", line)
    if not report.clean:
        logger.error("daily reconcile: drift remains after repair; run `flask billing reconcile` to see it")
    return "clean" if report.clean else "drift remains"


staff_tasks = procrastinate.Blueprint()


@staff_tasks.task(name="resync", queue=WEBHOOK_QUEUE, retry=queue.RETRY, pass_context=True)
@queue.in_app_context
def staff_resync(
    context: procrastinate.JobContext, organization_id: int, staff_user_id: int, reason: str, request_key: str
) -> str:
    """A console re-sync (app/services/staff_actions.py): reconcile of one organization, applied here,
    its staff audit row written when done; retried like the other jobs while the provider does not answer."""
    attempts = context.job.attempts if context.job else 0
    final = attempts + 1 >= int(queue.flask_app().config["JOB_MAX_ATTEMPTS"])
    job = staff_actions.ResyncJob(organization_id, staff_user_id, reason, request_key, final_attempt=final)
    return BillingService.staff_action(job).message


usage_tasks = procrastinate.Blueprint()


@usage_tasks.periodic(cron="* * * * *")
@usage_tasks.task(name="report", queue=QUEUE, queueing_lock="report_usage", lock="report_usage")
@queue.in_app_context
def report_usage(timestamp: int) -> str:
    """Every minute, one run at a time across workers: billed usage to Stripe's meter events
    (app/services/usage_reports.py). A report Stripe could not take now stays pending for the next run."""
    run = BillingService.report_usage()
    for error in run.errors:
        logger.warning("usage report: %s", error)
    return f"gathered {run.gathered}, sent {run.sent}, failed {run.failed}, pending {run.still_pending}"


def dispatch_webhook_events(coalesce: bool = True) -> list[str]:
    """The workers' dispatch pass (queue.run_worker, every WORKER_DISPATCH_SECONDS): intake stores an
    event and queues nothing, so this is how a stored event gets its job. Every object with events
    stored pending at least WEBHOOK_COALESCE_SECONDS ago (a burst about one object joins one job; with
    coalesce=False, any) and no job waiting or running gets one. The periodic pass reads one chunk of
    the pending events (webhook_intake.UNCLAIMED_CHUNK) a time; coalesce=False is a drain (`--once`,
    reconcile), which reads them all."""
    seconds = float(queue.flask_app().config["WEBHOOK_COALESCE_SECONDS"]) if coalesce else -1.0
    return BillingService.queue_unclaimed_events(older_than_seconds=seconds, lost=False, drain=not coalesce)


def tally_usage(coalesce: bool = True) -> int:
    """The workers' dispatch pass tallies stored usage too (usage_tally.py): totals, billable parts and
    soft-limit warnings follow recording within WORKER_DISPATCH_SECONDS. One transaction a pass: a
    backlog is worked off over several passes, and usage:report tallies all of it before it gathers."""
    return BillingService.tally_usage(once=coalesce)


queue.register_dispatcher(dispatch_webhook_events)
queue.register_dispatcher(tally_usage)
queue.register_blueprint("webhooks", webhooks)
queue.register_blueprint("usage", usage_tasks)
queue.register_blueprint("staff", staff_tasks)
queue.register_blueprint("maintenance", maintenance)


@outbox.consumer("billing.payment_succeeded", name="receipt_email")
def receipt_email(event: outbox.OutboxEvent) -> None:
    """The receipt for a paid invoice (receipts.py), read from Stripe through the authority."""
    receipts.send_receipt(event, BillingService)


@outbox.consumer("organization.billing_email_changed", name="sync_customer_email")
def sync_customer_email(event: outbox.OutboxEvent) -> None:
    """Stripe's customer follows the billing email address (or the owner's, when it is cleared)."""
    customer_sync.push_email(event.organization_id, BillingService, key=f"customer-email-{event.id}")


@outbox.consumer("user.email_changed", name="sync_customer_email_of_owner")
def sync_customer_email_of_owner(event: outbox.OutboxEvent) -> None:
    """The owner's new address reaches Stripe's customer (unless a billing email address is set)."""
    customer_sync.push_email(
        event.organization_id, BillingService, key=f"customer-email-{event.id}", owner_id=event.user_id
    )


@outbox.consumer(customer_sync.RENAMED, name="sync_customer_name")
def sync_customer_name(event: outbox.OutboxEvent) -> None:
    """Stripe's customer carries the organization's new name (customer_sync.name_fields says where)."""
    customer_sync.push_name(event.organization_id, BillingService, key=f"customer-name-{event.id}")
