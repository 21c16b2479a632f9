"""What the background work looks like now: the job queue by state, the oldest waiting job's age,
failed jobs, and webhook events not yet applied, of every provider (Stripe's and Whop's stored events,
together and each apart). `flask billing status` prints it; `/metrics` serves the same figures to
Prometheus."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from sqlalchemy import func, select, text

from app.extensions import db
from app.models import StripeEvent, WhopEvent
from app.models.types import utcnow

JOB_STATES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted")
EVENT_STATES = ("pending", "processed", "ignored", "failed")
# Every provider's stored webhook events (the tables share one shape; see webhook_store).
EVENT_MODELS: dict[str, type[StripeEvent] | type[WhopEvent]] = {"stripe": StripeEvent, "whop": WhopEvent}


@dataclass(frozen=True)
class QueueFigures:
    jobs: dict[str, int] = field(default_factory=dict)
    oldest_waiting_seconds: float = 0.0
    failed_jobs_by_task: dict[str, int] = field(default_factory=dict)
    webhook_events: dict[str, int] = field(default_factory=dict)  # every provider's together
    oldest_pending_event_seconds: float = 0.0
    webhook_events_by_provider: dict[str, dict[str, int]] = field(default_factory=dict)

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
        by_provider, oldest_event = _event_figures()
    finally:
        db.session.rollback()
    return QueueFigures(
        jobs=jobs,
        oldest_waiting_seconds=max(0.0, float(oldest or 0)),
        failed_jobs_by_task=failed,
        webhook_events=_totals(by_provider),
        oldest_pending_event_seconds=oldest_event,
        webhook_events_by_provider=by_provider,
    )


def _standin_figures() -> QueueFigures:
    """The development stand-in (SQLite) has no queue: jobs run inside the app as they are made, so
    there are no job figures; stored webhook events are counted as on PostgreSQL."""
    try:
        by_provider, oldest = _event_figures()
    finally:
        db.session.rollback()
    return QueueFigures(
        webhook_events=_totals(by_provider), oldest_pending_event_seconds=oldest, webhook_events_by_provider=by_provider
    )


def _event_figures() -> tuple[dict[str, dict[str, int]], float]:
    """Each provider's stored events by status, and the age of the oldest pending one of any."""
    by_provider: dict[str, dict[str, int]] = {}
    oldest = None
    for provider, model in EVENT_MODELS.items():
        counts = dict.fromkeys(EVENT_STATES, 0)
        for status, count in db.session.execute(select(model.status, func.count()).group_by(model.status)).all():
            counts[str(status)] = int(count)
        by_provider[provider] = counts
        first = db.session.execute(select(func.min(model.received_at)).where(model.status == "pending")).scalar()
        if first is not None and (oldest is None or first < oldest):
            oldest = first
    seconds = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
    return by_provider, max(0.0, seconds)


def _totals(by_provider: dict[str, dict[str, int]]) -> dict[str, int]:
    return {state: sum(counts.get(state, 0) for counts in by_provider.values()) for state in EVENT_STATES}


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
    events = Gauge(
        "billing_webhook_events", "Stored webhook events of every provider by status.", ["status"], registry=registry
    )
    for status, count in figures.webhook_events.items():
        events.labels(status=status).set(count)
    by_provider = Gauge(
        "billing_webhook_events_by_provider",
        "Stored webhook events by provider and status.",
        ["provider", "status"],
        registry=registry,
    )
    for provider, counts in figures.webhook_events_by_provider.items():
        for status, count in counts.items():
            by_provider.labels(provider=provider, status=status).set(count)
    Gauge(
        "billing_oldest_pending_webhook_event_age_seconds",
        "Age of the oldest webhook event stored and not yet applied.",
        registry=registry,
    ).set(figures.oldest_pending_event_seconds)
    return generate_latest(registry)
