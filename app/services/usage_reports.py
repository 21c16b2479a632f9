"""Reporting billed usage to Stripe's meter events, exactly once.

The worker's `usage:report` task (every minute, one at a time across workers) calls
BillingService.report_usage, which runs the two halves here with Stripe's call handed in:

1. `gather`: in one short transaction, the billable usage no report holds yet (the part of each event
   past what the tier includes, `usage_event.billable_quantity`) of Stripe-billed organizations is
   summed per organization, meter and billing period into a `usage_report` row (`pending`), and each
   event is marked with its report. Rows are taken FOR UPDATE SKIP LOCKED, so two gatherers never
   put one event in two reports. The report's `identifier` is derived from its first event's id:
   fixed before anything is sent, the same on every retry.
2. `send_pending`: each pending report is sent as one meter event (`identifier`, the customer, the
   quantity, the latest event's timestamp, inside the period) with no transaction open, then marked
   `sent`. Stripe answering that it already has the identifier means an earlier attempt was accepted
   and its answer lost (a timeout): `sent` too. Stripe refusing it otherwise marks it `failed` with
   Stripe's words (ops see it in `flask billing usage`). A connection error, a 5xx or a 429 leaves it
   `pending` for the next run; the run stops there (Stripe is unwell or asks us to slow down).
   A run with more than USAGE_STREAM_THRESHOLD reports goes through the v2 meter event stream
   instead, 100 a request with the same identifiers (usage_stream.py).

A worker killed between the two halves, or between sending and marking, leaves `pending` reports
that the next run sends again: Stripe counts an identifier once (within 24 hours; reports are sent
within minutes), so our total and Stripe's agree to the unit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from app import clock
from app.extensions import db
from app.models import Organization, StripeEvent, UsageEvent, UsagePeriodTotal, UsageReport, UsageReportStatus
from app.models.organization import BillingProvider
from app.services import usage_stream
from app.services.billing_common import committed
from app.services.plans import PlanCatalogue

ERROR_REPORT_EVENT = "v1.billing.meter.error_report_triggered"
NO_METER_EVENT = "v1.billing.meter.no_meter_found"  # streamed events whose event_name no meter has
METER_ERROR_EVENTS = (ERROR_REPORT_EVENT, NO_METER_EVENT)
# Stripe deduplicates an identifier for 24 hours: a report not settled well inside that window is not
# sent again blindly (it could be counted twice); it is failed for ops to compare with Stripe's summary.
RESEND_WINDOW = timedelta(hours=20)
GATHER_LIMIT = 50_000  # events per gathering transaction
SEND_LIMIT = 1_000  # reports per run: within Stripe's 1,000 meter events/s, one reporter at a time
STREAM_SEND_LIMIT = 20_000  # reports per run through the v2 stream: 200 requests of 100 (usage_stream.py)


MeterEventToSend = usage_stream.MeterEventToSend  # defined beside the stream, which sends them too


class MeterEventRefused(Exception):
    """Stripe refused the meter event for good (a 4xx other than a duplicate identifier)."""


class MeterEventAlreadyRecorded(Exception):
    """Stripe already holds an event with this identifier: an earlier attempt was accepted."""


stream_refusal = usage_stream.refusal  # a stream request's 4xx as the stream's own error


def v1_params(event: MeterEventToSend) -> Any:  # stripe-python's MeterEventCreateParams
    """The report as v1's POST /v1/billing/meter_events takes it."""
    return {
        "event_name": event.event_name,
        "payload": {"stripe_customer_id": event.customer_id, "value": str(event.quantity)},
        "identifier": event.identifier,
        "timestamp": event.timestamp,
    }


def refusal(words: str) -> Exception:
    """What v1's 4xx (other than 429) means: the identifier already counted, or a refusal for good."""
    if "already exists with identifier" in words:
        return MeterEventAlreadyRecorded(words)
    return MeterEventRefused(words)


@dataclass
class ReportRun:
    gathered: int = 0  # reports made this run
    sent: int = 0
    failed: int = 0
    still_pending: int = 0
    errors: list[str] = field(default_factory=list)


def last_whole_minute(period_end: datetime) -> datetime:
    """The last second of a period that Stripe's minute-aligned summaries of it include: a report's
    timestamp is kept at or before it, so a summary of [start, end) rounded down to minutes sees it."""
    return period_end.replace(second=0, microsecond=0) - timedelta(seconds=1)


def identifier_for(organization_id: int, meter: str, first_event_id: int) -> str:
    """Each event is in one report, so a report's first event names it: unique and stable."""
    return f"ledgerline-usage-{organization_id}-{meter}-{first_event_id}"


def gather() -> int:
    """Put the billable usage no report holds into pending reports; returns how many were made."""
    made = 0
    with committed():
        rows = db.session.execute(
            select(
                UsageEvent.id,
                UsageEvent.organization_id,
                UsageEvent.meter,
                UsageEvent.period_start,
                UsageEvent.billable_quantity,
                UsageEvent.occurred_at,
                Organization.billing_customer_id,
                UsagePeriodTotal.period_end,
            )
            .join(Organization, Organization.id == UsageEvent.organization_id)
            .join(
                UsagePeriodTotal,
                (UsagePeriodTotal.organization_id == UsageEvent.organization_id)
                & (UsagePeriodTotal.meter == UsageEvent.meter)
                & (UsagePeriodTotal.period_start == UsageEvent.period_start),
            )
            .where(
                UsageEvent.report_id.is_(None),
                UsageEvent.billable_quantity > 0,
                Organization.billing_provider == BillingProvider.STRIPE,
                Organization.billing_customer_id.is_not(None),
            )
            .order_by(UsageEvent.id)
            .limit(GATHER_LIMIT)
            .with_for_update(of=UsageEvent, skip_locked=True)
        ).all()
        groups: dict[tuple[int, str, datetime, datetime, str], list[tuple[int, int, datetime]]] = defaultdict(list)
        for row in rows:
            key = (row.organization_id, row.meter, row.period_start, row.period_end, row.billing_customer_id)
            groups[key].append((row.id, row.billable_quantity, row.occurred_at))
        for (organization_id, meter, _start, period_end, customer_id), events in groups.items():
            report = UsageReport(
                organization_id=organization_id,
                meter=meter,
                customer_id=customer_id,
                identifier=identifier_for(organization_id, meter, events[0][0]),
                quantity=sum(quantity for _, quantity, _ in events),
                timestamp=min(max(at for _, _, at in events), last_whole_minute(period_end)),
                status=UsageReportStatus.PENDING,
            )
            db.session.add(report)
            db.session.flush()
            db.session.execute(
                update(UsageEvent).where(UsageEvent.id.in_([e[0] for e in events])).values(report_id=report.id)
            )
            made += 1
    return made


def pending(catalogue: PlanCatalogue, limit: int = SEND_LIMIT) -> list[MeterEventToSend]:
    """The pending reports, oldest first, as the meter events to send (read, then the transaction ends)."""
    reports = (
        db.session.execute(
            select(UsageReport)
            .where(UsageReport.status == UsageReportStatus.PENDING)
            .order_by(UsageReport.id)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    to_send = []
    for report in reports:
        meter = catalogue.meter(report.meter)
        if meter is None:
            continue  # a meter taken out of the catalogue: left pending and shown to ops
        to_send.append(
            MeterEventToSend(
                report_id=report.id,
                identifier=report.identifier,
                event_name=meter.event_name,
                customer_id=report.customer_id,
                quantity=report.quantity,
                timestamp=int(report.timestamp.timestamp()),
                created_at=report.created_at,
            )
        )
    db.session.rollback()  # no transaction stays open while Stripe answers
    return to_send


def send_pending(
    catalogue: PlanCatalogue,
    send: Callable[[MeterEventToSend], None],
    run: ReportRun | None = None,
    stream: tuple[usage_stream.OpenSession, usage_stream.Stream] | None = None,
) -> ReportRun:
    """Send each pending report; `send` raises MeterEventAlreadyRecorded, MeterEventRefused, or any
    other error for a failure worth retrying (which stops the run). With `stream` (opening a session,
    sending a request), more reports than USAGE_STREAM_THRESHOLD go through the v2 stream instead."""
    run = run or ReportRun()
    to_send = []
    for event in pending(catalogue, STREAM_SEND_LIMIT if stream else SEND_LIMIT):
        if event.created_at < clock.utcnow() - RESEND_WINDOW:
            stale = "not settled within Stripe's 24-hour identifier window: compare the meter event summary first"
            _settle(event.report_id, UsageReportStatus.FAILED, stale)
            run.failed += 1
            run.errors.append(f"{event.identifier}: {stale}")
            continue
        to_send.append(event)
    if stream is not None and usage_stream.wanted(len(to_send)):
        usage_stream.send(to_send, *stream, run)
        return run
    to_send = to_send[:SEND_LIMIT]
    for index, event in enumerate(to_send):
        try:
            send(event)
        except MeterEventAlreadyRecorded:
            pass  # accepted by an earlier attempt
        except MeterEventRefused as exc:
            _settle(event.report_id, UsageReportStatus.FAILED, str(exc))
            run.failed += 1
            run.errors.append(f"{event.identifier}: {exc}")
            continue
        except Exception as exc:  # connection, 5xx, 429: the next run sends it again
            _note_attempt(event.report_id, f"{type(exc).__name__}: {exc}")
            run.still_pending += len(to_send) - index
            run.errors.append(f"{event.identifier}: {exc}")
            return run
        _settle(event.report_id, UsageReportStatus.SENT, None)
        run.sent += 1
    return run


def _settle(report_id: int, status: UsageReportStatus, error: str | None) -> None:
    with committed():
        db.session.execute(
            update(UsageReport)
            .where(UsageReport.id == report_id, UsageReport.status == UsageReportStatus.PENDING)
            .values(
                status=status,
                attempts=UsageReport.attempts + 1,
                last_error=error,
                sent_at=clock.utcnow() if status == UsageReportStatus.SENT else None,
            )
        )


def _note_attempt(report_id: int, error: str) -> None:
    with committed():
        db.session.execute(
            update(UsageReport)
            .where(UsageReport.id == report_id)
            .values(attempts=UsageReport.attempts + 1, last_error=error[:2000])
        )


def related_meter(body: Mapping[str, Any]) -> str | None:
    """The meter (mtr_ id) an error report is about (its thin event's related_object)."""
    related = body.get("related_object")
    meter_id = related.get("id") if isinstance(related, dict) else None
    return meter_id if isinstance(meter_id, str) and 0 < len(meter_id) <= 200 else None


def apply_error_report(event: Mapping[str, Any]) -> str:
    """Stripe's asynchronous error report (v1.billing.meter.error_report_triggered, or
    v1.billing.meter.no_meter_found for streamed events whose event_name no meter has; read back from
    /v2/core/events/:id) names, among its sample errors, meter events it refused after accepting them:
    their reports become `failed` with Stripe's words (in the caller's transaction). Stripe samples:
    refusals it does not name show as the difference `flask billing usage --reconcile` reports.
    Returns the outcome stored on the event, which ops see (`flask billing status`)."""
    no_meter = event.get("type") == NO_METER_EVENT
    data: dict[str, Any] = event.get("data") or {}
    reason: dict[str, Any] = data.get("reason") or {}
    named: dict[str, str] = {}
    codes = []
    for error_type in reason.get("error_types") or []:
        codes.append(f"{error_type.get('code')} x{error_type.get('error_count')}")
        for sample in error_type.get("sample_errors") or []:
            identifier = (sample.get("request") or {}).get("identifier")
            if isinstance(identifier, str):
                why = "no meter found" if no_meter else "refused by Stripe after acceptance"
                named[identifier] = f"{why}: {sample.get('error_message')}"[:2000]
    marked = 0
    for identifier, message in named.items():
        result = db.session.execute(
            update(UsageReport)
            .where(UsageReport.identifier == identifier)
            .values(status=UsageReportStatus.FAILED, last_error=message)
        )
        marked += int(getattr(result, "rowcount", 0) or 0)
    kind = "no meter found" if no_meter else "meter error report"
    words = f"{kind}: {reason.get('error_count', '?')} error(s) ({', '.join(codes) or 'no details'})"
    return f"{words[:150]}; {marked} usage report(s) marked failed"  # the event's outcome: 200 characters


@dataclass(frozen=True)
class ReportCounts:
    pending: int
    sent: int
    failed: int
    unreported_events: int
    untallied_events: int  # stored, not yet counted into their period's total (the worker's tally)
    failures: list[tuple[str, str]]  # (identifier, error) of the latest failed reports
    error_reports: list[str]  # Stripe's meter error reports and no-meter events received (outcomes), newest first


def counts() -> ReportCounts:
    """What ops see (`flask billing usage`)."""
    rows = db.session.execute(select(UsageReport.status, func.count()).group_by(UsageReport.status)).all()
    by_status = {str(status): int(count) for status, count in rows}
    unreported = db.session.execute(
        select(func.count()).where(UsageEvent.report_id.is_(None), UsageEvent.billable_quantity > 0)
    ).scalar_one()
    untallied = db.session.execute(select(func.count()).where(UsageEvent.billable_quantity.is_(None))).scalar_one()
    failures = db.session.execute(
        select(UsageReport.identifier, UsageReport.last_error)
        .where(UsageReport.status == UsageReportStatus.FAILED)
        .order_by(UsageReport.id.desc())
        .limit(20)
    ).all()
    error_reports = db.session.execute(
        select(StripeEvent.outcome)
        .where(StripeEvent.type.in_(METER_ERROR_EVENTS))
        .order_by(StripeEvent.id.desc())
        .limit(20)
    ).scalars()
    db.session.rollback()
    return ReportCounts(
        pending=int(by_status.get(UsageReportStatus.PENDING, 0)),
        sent=int(by_status.get(UsageReportStatus.SENT, 0)),
        failed=int(by_status.get(UsageReportStatus.FAILED, 0)),
        unreported_events=int(unreported),
        untallied_events=int(untallied),
        failures=[(row.identifier, row.last_error or "") for row in failures],
        error_reports=[outcome or "not applied yet" for outcome in error_reports],
    )
