"""What the background work looks like now: the job queue by state, the oldest waiting job's age,
failed jobs, and webhook events not yet applied. `flask billing status` prints it; `/metrics` serves
the same figures to Prometheus."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from sqlalchemy import func, select, text

from app.extensions import db
from app.models import StripeEvent
from app.models.types import utcnow

JOB_STATES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted")
EVENT_STATES = ("pending", "processed", "ignored", "failed")


@dataclass(frozen=True)
class QueueFigures:
    jobs: dict[str, int] = field(default_factory=dict)
    oldest_waiting_seconds: float = 0.0
    failed_jobs_by_task: dict[str, int] = field(default_factory=dict)
    webhook_events: dict[str, int] = field(default_factory=dict)
    oldest_pending_event_seconds: float = 0.0

    @property
    def waiting(self) -> int:
        return self.jobs.get("todo", 0)


def queue_figures() -> QueueFigures:
    """Read in one short transaction; cheap enough for a scrape every 15 s (indexed or small)."""
    if db.session.get_bind().dialect.name != "postgresql":
        return _standin_figures()
    try:
        jobs = dict.fromkeys(JOB_STATES, 0)
        for status, count in db.session.execute(
            text("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY status")
        ).all():
            jobs[status] = int(count)
        oldest = db.session.execute(
            text(
                "SELECT coalesce(extract(epoch FROM now() - min(coalesce(j.scheduled_at, e.at))), 0) "
                "FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id AND e.type = 'deferred' "
                "WHERE j.status = 'todo' AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())"
            )
        ).scalar()
        failed = {
            str(task): int(count)
            for task, count in db.session.execute(
                text("SELECT task_name, count(*) FROM procrastinate_jobs WHERE status = 'failed' GROUP BY task_name")
            ).all()
        }
        events = dict.fromkeys(EVENT_STATES, 0)
        for status, count in db.session.execute(
            text("SELECT status, count(*) FROM stripe_event GROUP BY status")
        ).all():
            events[str(status)] = int(count)
        oldest_event = db.session.execute(
            text(
                "SELECT coalesce(extract(epoch FROM now() - min(received_at)), 0) FROM stripe_event "
                "WHERE status = 'pending'"
            )
        ).scalar()
    finally:
        db.session.rollback()
    return QueueFigures(
        jobs=jobs,
        oldest_waiting_seconds=max(0.0, float(oldest or 0)),
        failed_jobs_by_task=failed,
        webhook_events=events,
        oldest_pending_event_seconds=max(0.0, float(oldest_event or 0)),
    )


def _standin_figures() -> QueueFigures:
    """The development stand-in (SQLite) has no queue: jobs run inside the app as they are made, so
    there are no job figures; stored webhook events are counted as on PostgreSQL."""
    try:
        events = dict.fromkeys(EVENT_STATES, 0)
        for status, count in db.session.execute(
            select(StripeEvent.status, func.count()).group_by(StripeEvent.status)
        ).all():
            events[str(status)] = int(count)
        oldest = db.session.execute(
            select(func.min(StripeEvent.received_at)).where(StripeEvent.status == "pending")
        ).scalar()
    finally:
        db.session.rollback()
    oldest_seconds = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
    return QueueFigures(webhook_events=events, oldest_pending_event_seconds=max(0.0, oldest_seconds))


def prometheus_text(figures: QueueFigures) -> bytes:
    """The figures in Prometheus' text format."""
    registry = CollectorRegistry()
    jobs = Gauge("billing_jobs", "Jobs in the queue by state.", ["state"], registry=registry)
    for state, count in figures.jobs.items():
        jobs.labels(state=state).set(count)
    Gauge(
        "billing_oldest_waiting_job_age_seconds",
        "Age of the oldest job that is due and not started.",
        registry=registry,
    ).set(figures.oldest_waiting_seconds)
    failed = Gauge("billing_failed_jobs", "Jobs that failed for good, by task.", ["task"], registry=registry)
    for task, count in figures.failed_jobs_by_task.items():
        failed.labels(task=task).set(count)
    events = Gauge("billing_webhook_events", "Stored webhook events by status.", ["status"], registry=registry)
    for status, count in figures.webhook_events.items():
        events.labels(status=status).set(count)
    Gauge(
        "billing_oldest_pending_webhook_event_age_seconds",
        "Age of the oldest webhook event stored and not yet applied.",
        registry=registry,
    ).set(figures.oldest_pending_event_seconds)
    return generate_latest(registry)
