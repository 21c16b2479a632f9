"""Reconciling billed usage with Stripe: for each organization, meter and billing period that ended
less than 35 days ago (or is under way), our billed total (`usage_period_total.billable`) minus what
is still on its way (in no report yet, or in a pending one) is what Stripe's meter event summary for
the period should say. BillingService.reconcile_usage reads the summaries (no transaction open) and
hands them here.

A shortfall at Stripe (a report Stripe dropped after accepting it, an error report, a row marked
sent by hand) is re-sent, with `apply`, as one meter event whose identifier is derived from the
period and the total Stripe showed: sent twice before Stripe's summary moves, it is counted once;
once the summary has moved the shortfall is gone. Stripe holding more than we billed cannot be
undone by a meter event: it is reported for ops (Stripe's meter event adjustments cancel events).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select

from app.extensions import db
from app.models import Organization, UsageEvent, UsagePeriodTotal, UsageReport, UsageReportStatus
from app.models.organization import BillingProvider
from app.services.plans import PlanCatalogue
from app.services.usage_reports import MeterEventAlreadyRecorded, MeterEventToSend, last_whole_minute

WINDOW = timedelta(days=35)  # Stripe keeps meter events (and takes them) for 35 days


@dataclass(frozen=True)
class PeriodToCheck:
    organization_id: int
    meter: str
    event_name: str
    customer_id: str
    period_start: datetime
    period_end: datetime
    billed: int  # our billed total for the period
    in_flight: int  # billed units not yet accepted by Stripe (no report, or a pending one)

    @property
    def expected_at_stripe(self) -> int:
        return self.billed - self.in_flight


@dataclass(frozen=True)
class UsageDrift:
    period: PeriodToCheck
    at_stripe: int

    @property
    def missing(self) -> int:
        """Units Stripe lacks (negative: units Stripe has that we did not bill)."""
        return self.period.expected_at_stripe - self.at_stripe

    def correction(self, now: datetime) -> MeterEventToSend:
        """The meter event that sends what is missing, with an identifier fixed by what Stripe showed."""
        p = self.period
        start = int(p.period_start.timestamp())
        # Inside the period (so Stripe bills it there and its summary shows it), and no later than now.
        timestamp = min(int(last_whole_minute(p.period_end).timestamp()), int(now.timestamp()))
        return MeterEventToSend(
            report_id=0,
            identifier=f"ledgerline-usage-fix-{p.organization_id}-{p.meter}-{start}-{self.at_stripe}",
            event_name=p.event_name,
            customer_id=p.customer_id,
            quantity=self.missing,
            timestamp=timestamp,
            created_at=now,
        )

    def describe(self) -> str:
        p = self.period
        where = f"organization {p.organization_id}, {p.meter}, {p.period_start:%Y-%m-%d} to {p.period_end:%Y-%m-%d}"
        if self.missing > 0:
            return (
                f"{where}: Stripe has {self.at_stripe:,}, we billed {p.expected_at_stripe:,}: {self.missing:,} missing"
            )
        return (
            f"{where}: Stripe has {self.at_stripe:,}, {-self.missing:,} more than we billed ({p.expected_at_stripe:,})"
        )


@dataclass
class UsageReconcile:
    checked: int = 0
    drifts: list[UsageDrift] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)  # identifiers of the corrections Stripe accepted
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.drifts and not self.problems

    def lines(self) -> list[str]:
        found = [drift.describe() for drift in self.drifts]
        done = [f"re-sent {identifier}" for identifier in self.resent]
        verdict = ["Stripe's meter event summaries agree with the usage we billed."] if self.clean else []
        return [f"Checked {self.checked} billing periods of metered usage.", *found, *done, *self.problems, *verdict]


def periods_to_check(
    catalogue: PlanCatalogue, now: datetime, organization_id: int | None = None
) -> list[PeriodToCheck]:
    """Every Stripe-billed organization's periods with billed usage that Stripe can still summarise."""
    in_flight = (
        select(
            UsageEvent.organization_id,
            UsageEvent.meter,
            UsageEvent.period_start,
            func.sum(UsageEvent.billable_quantity).label("quantity"),
        )
        .outerjoin(UsageReport, UsageReport.id == UsageEvent.report_id)
        .where(
            UsageEvent.billable_quantity > 0,
            or_(UsageEvent.report_id.is_(None), UsageReport.status == UsageReportStatus.PENDING),
        )
        .group_by(UsageEvent.organization_id, UsageEvent.meter, UsageEvent.period_start)
        .subquery()
    )
    query = (
        select(UsagePeriodTotal, Organization.billing_customer_id, func.coalesce(in_flight.c.quantity, 0))
        .join(Organization, Organization.id == UsagePeriodTotal.organization_id)
        .outerjoin(
            in_flight,
            (in_flight.c.organization_id == UsagePeriodTotal.organization_id)
            & (in_flight.c.meter == UsagePeriodTotal.meter)
            & (in_flight.c.period_start == UsagePeriodTotal.period_start),
        )
        .where(
            UsagePeriodTotal.billable > 0,
            UsagePeriodTotal.period_end > now - WINDOW,
            Organization.billing_provider == BillingProvider.STRIPE,
            Organization.billing_customer_id.is_not(None),
        )
        .order_by(UsagePeriodTotal.organization_id, UsagePeriodTotal.meter, UsagePeriodTotal.period_start)
    )
    if organization_id is not None:
        query = query.where(UsagePeriodTotal.organization_id == organization_id)
    periods = []
    for total, customer_id, flying in db.session.execute(query).all():
        meter = catalogue.meter(total.meter)
        if meter is None:
            continue
        periods.append(
            PeriodToCheck(
                organization_id=total.organization_id,
                meter=total.meter,
                event_name=meter.event_name,
                customer_id=customer_id,
                period_start=total.period_start,
                period_end=total.period_end,
                billed=int(total.billable),
                in_flight=int(flying),
            )
        )
    db.session.rollback()  # read; no transaction stays open while Stripe answers
    return periods


def summary_window(period: PeriodToCheck) -> tuple[int, int]:
    """The period as Stripe's summaries take it: start and end rounded down to whole minutes."""
    start = int(period.period_start.replace(second=0, microsecond=0).timestamp())
    end = int(period.period_end.replace(second=0, microsecond=0).timestamp())
    return start, end


def run(
    catalogue: PlanCatalogue,
    now: datetime,
    read_at_stripe: Callable[[PeriodToCheck], int],
    send: Callable[[MeterEventToSend], None],
    *,
    apply: bool,
    organization_id: int | None = None,
) -> UsageReconcile:
    """Compare each period with what Stripe's summary says (`read_at_stripe`); with apply, send what
    is missing (`send` raises MeterEventAlreadyRecorded for a correction Stripe already holds)."""
    result = UsageReconcile()
    for period in periods_to_check(catalogue, now, organization_id):
        result.checked += 1
        try:
            drift = UsageDrift(period, read_at_stripe(period))
        except Exception as exc:  # one unreadable period must not hide the others
            result.problems.append(f"organization {period.organization_id}, {period.meter}: not read: {exc}")
            continue
        if drift.missing == 0:
            continue
        result.drifts.append(drift)
        if apply and drift.missing > 0:
            correction = drift.correction(now)
            try:
                send(correction)
            except MeterEventAlreadyRecorded:
                pass
            except Exception as exc:
                result.problems.append(f"{correction.identifier}: not re-sent: {exc}")
                continue
            result.resent.append(correction.identifier)
    return result
