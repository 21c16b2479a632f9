"""What the operations console shows staff (app/admin/): search across organizations and the provider's
ids, one organization's billing as the database holds it beside the provider's live object with every
difference marked (reconcile's own comparison, reconcile.diff_subscription), its invoices, its timeline,
and the queue. Reads only. The provider is reached through the ConsoleReads BillingService hands in, with
the page-read timeout and no retries; an answer that does not come is named ("Stripe did not answer")
and the rest of the page is shown. No transaction is open while a provider answers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import func, or_, select, text

from app.extensions import db
from app.models import (
    DomainEvent,
    Organization,
    OutboxDelivery,
    StaffAuditEntry,
    StripeEvent,
    User,
    WhopEvent,
)
from app.services import outbox, price_lookup, queue_status, staff_audit, staff_payments, staff_schedule
from app.services import reconcile as reconciliation
from app.services.billing_common import (
    BillingConfigurationError,
    BillingError,
    PaymentProviderUnavailable,
    plan_catalogue,
)
from app.services.billing_page import INVOICE_HISTORY_LENGTH, PageList
from app.services.pricing import PriceInfo
from app.services.reconcile_reads import held_billing
from app.services.staff_actions import RESYNC_TASK
from app.services.whop_state import subscription_state_from_whop

logger = logging.getLogger(__name__)
SEARCH_LIMIT = 50
TIMELINE_LIMIT = 300
COMPARED_FIELDS = ("status", "tier", "addons", "cancel_at_period_end", "current_period_end", "collection_paused")


class ConsoleReads(Protocol):
    """BillingService's page reads (short timeout, no retries)."""

    def read_subscription_for_page(self, subscription_id: str) -> dict[str, Any]: ...

    def read_list_for_page(self, resource: PageList, params: Any) -> list[dict[str, Any]]: ...

    def read_schedule(self, schedule_id: str) -> dict[str, Any]: ...

    def catalogue_prices(self) -> dict[str, PriceInfo]: ...


NOT_ASKED = "an earlier read on this page was not answered, so it was not asked again"


class OnePageReads:
    """One page's provider reads, each within the page-read timeout. Once one is not answered the rest
    are not asked: a provider that is down costs the page about one timeout, not one per read."""

    def __init__(self, reads: ConsoleReads, read_membership: Callable[[str], dict[str, Any]]) -> None:
        self.reads, self.membership = reads, read_membership
        self.silent = False

    def _ask(self, read: Callable[..., Any], *args: Any) -> Any:
        if self.silent:
            raise PaymentProviderUnavailable(NOT_ASKED)
        try:
            return read(*args)
        except PaymentProviderUnavailable:
            self.silent = True
            raise

    def read_subscription_for_page(self, subscription_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._ask(self.reads.read_subscription_for_page, subscription_id))

    def read_list_for_page(self, resource: PageList, params: Any) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._ask(self.reads.read_list_for_page, resource, params))

    def read_schedule(self, schedule_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._ask(self.reads.read_schedule, schedule_id))

    def catalogue_prices(self) -> dict[str, PriceInfo]:
        return self.reads.catalogue_prices()  # cached, and never raises

    def read_membership(self, membership_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._ask(self.membership, membership_id))


# --- Search ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchHit:
    organization_id: int
    name: str
    owner_email: str | None
    matched: str  # what matched, in words


def search(term: str) -> list[SearchHit]:
    """Organizations whose name contains the term, or with a member of that email (or containing it),
    or holding that Stripe customer, subscription or invoice id, Whop member or membership id, or named
    by that webhook event (by the object the event is about)."""
    term = term.strip()
    if not term:
        return []
    found: dict[int, str] = {}
    try:
        lowered = term.lower()
        for org_id in db.session.execute(
            select(Organization.id)
            .where(func.lower(Organization.name).contains(lowered, autoescape=True))
            .limit(SEARCH_LIMIT)
        ).scalars():
            found.setdefault(org_id, "organization name")
        for org_id, email in db.session.execute(
            select(User.organization_id, User.email)
            .where(User.email.contains(lowered, autoescape=True))
            .limit(SEARCH_LIMIT)
        ):
            found.setdefault(org_id, f"member {email}")
        for column, words in (
            (Organization.billing_customer_id, "customer id"),
            (Organization.billing_subscription_id, "subscription or membership id"),
            (Organization.last_invoice_id, "latest invoice id"),
        ):
            for org_id in db.session.execute(select(Organization.id).where(column == term)).scalars():
                found.setdefault(org_id, words)
        for org_id in _organizations_named_by_events(term):
            found.setdefault(org_id, "webhook event or invoice")
        if not found:
            return []
        organizations = db.session.execute(
            select(Organization.id, Organization.name).where(Organization.id.in_(found)).order_by(Organization.id)
        ).all()
        owners = {
            row.organization_id: row.email
            for row in db.session.execute(
                select(User.organization_id, User.email).where(User.organization_id.in_(found), User.role == "owner")
            )
        }
    finally:
        db.session.rollback()
    return [SearchHit(row.id, row.name, owners.get(row.id), found[row.id]) for row in organizations]


def _organizations_named_by_events(term: str) -> set[int]:
    """A webhook event id (evt_..., or Whop's), or an id an event's payload names (an invoice's in_...),
    leads to the object the event is about, and so to its organization."""
    keys: set[str] = set()
    for model in (StripeEvent, WhopEvent):
        condition = model.event_id == term
        if len(term) >= 8 and "_" in term:  # an id, not a word: look inside the payloads too
            condition = or_(condition, model.payload.contains(f'"{term}"', autoescape=True))
        keys.update(
            key for key in db.session.execute(select(model.object_key).where(condition).limit(20)).scalars() if key
        )
    ids = {key.partition(":")[2] for key in keys}
    if not ids:
        return set()
    return set(
        db.session.execute(
            select(Organization.id).where(
                or_(Organization.billing_subscription_id.in_(ids), Organization.billing_customer_id.in_(ids))
            )
        ).scalars()
    )


# --- One organization --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparedField:
    name: str
    ours: Any
    provider: Any
    differs: bool


@dataclass(frozen=True)
class Member:
    id: int
    name: str
    email: str
    role: str
    two_factor: bool
    last_login_at: datetime | None
    removed: bool
    is_staff: bool


@dataclass(frozen=True)
class TimelineItem:
    when: datetime
    kind: str  # webhook, event, email, staff
    what: str
    detail: str = ""
    failed: bool = False


@dataclass
class OrganizationView:
    organization: Organization
    members: list[Member] = field(default_factory=list)
    provider_name: str = "Stripe"
    compared: list[ComparedField] = field(default_factory=list)
    provider_unavailable: str | None = None  # "Stripe did not answer" and why
    invoices: list[dict[str, Any]] = field(default_factory=list)
    invoices_unavailable: str | None = None
    payments: staff_payments.Payments = field(default_factory=staff_payments.Payments)  # with their refunds
    scheduled: list[staff_schedule.ScheduledRow] = field(default_factory=list)  # ours beside the provider's
    schedule_unavailable: str | None = None  # the subscription schedule could not be read
    timeline: list[TimelineItem] = field(default_factory=list)
    failed_events: list[str] = field(default_factory=list)  # stored webhook event ids that failed
    failed_emails: list[int] = field(default_factory=list)  # domain event ids whose delivery gave up

    @property
    def drifted(self) -> bool:
        return any(row.differs for row in self.compared)


def organization_view(
    organization_id: int, provider_reads: ConsoleReads, provider_membership: Callable[[str], dict[str, Any]]
) -> OrganizationView | None:
    reads = OnePageReads(provider_reads, provider_membership)
    read_membership = reads.read_membership
    try:
        organization = db.session.get(Organization, organization_id, populate_existing=True)
        if organization is None:
            return None
        held = held_billing(organization, organization.billing_subscription_id or "")  # loads its add-ons
        db.session.expunge(organization)  # kept for the page after the transaction ends
        view = OrganizationView(organization, provider_name="Whop" if organization.billed_by_whop else "Stripe")
        view.members = [
            Member(
                u.id,
                u.name,
                u.email,
                u.role,
                u.two_factor_enabled,
                u.last_login_at,
                u.removed_at is not None,
                u.is_staff,
            )
            for u in db.session.execute(
                select(User).where(User.organization_id == organization_id).order_by(User.id)
            ).scalars()
        ]
        view.timeline, view.failed_events, view.failed_emails = _timeline(organization)
        held_schedule = staff_schedule.held_schedule(organization)
    finally:
        db.session.rollback()
    view.compared, view.provider_unavailable, provider_object = _compare(organization, held, reads, read_membership)
    theirs = None
    if provider_object is not None:
        theirs = staff_schedule.provider_schedule(
            provider_object,
            whop=organization.billed_by_whop,
            read_schedule=reads.read_schedule,
            prices=reads.catalogue_prices,
        )
        if theirs[1] is None:
            view.schedule_unavailable = "Stripe did not answer for the subscription schedule."
    view.scheduled = staff_schedule.compare(held_schedule, theirs)
    if organization.billing_customer_id and not organization.billed_by_whop:
        customer_id = organization.billing_customer_id
        try:
            params = {"customer": customer_id, "limit": INVOICE_HISTORY_LENGTH, "expand": ["data.payments"]}
            view.invoices = reads.read_list_for_page("invoices", params)
        except (BillingError, BillingConfigurationError) as exc:
            view.invoices_unavailable = f"Stripe did not answer: {exc}"
        view.payments = staff_payments.payments_and_refunds(reads.read_list_for_page, customer_id, view.invoices)
    return view


def _compare(
    organization: Organization,
    held: reconciliation.HeldBilling,
    reads: ConsoleReads,
    read_membership: Callable[[str], dict[str, Any]],
) -> tuple[list[ComparedField], str | None, dict[str, Any] | None]:
    """Each field reconcile compares, ours beside the provider's, with the differences reconcile finds;
    and the provider's object as read (None when it was not)."""
    ours = {name: getattr(held, name) for name in COMPARED_FIELDS}
    subscription_id = organization.billing_subscription_id
    provider = "Whop" if organization.billed_by_whop else "Stripe"
    if not subscription_id:
        return (
            [ComparedField(name, value, None, False) for name, value in ours.items()],
            f"No {provider} subscription is held, so there is nothing to compare.",
            None,
        )
    try:
        if organization.billed_by_whop:
            subscription = read_membership(subscription_id)
            state = subscription_state_from_whop(subscription, plan_catalogue())
        else:
            subscription = reads.read_subscription_for_page(subscription_id)
            try:
                attached = db.session.merge(organization, load=True)
                state = price_lookup.subscription_state(subscription, attached)
                db.session.commit()  # the prices the subscription revealed are remembered
            finally:
                db.session.rollback()
    except (BillingError, BillingConfigurationError) as exc:
        logger.warning("Console: %s did not answer for organization %s: %s", provider, organization.id, exc)
        return (
            [ComparedField(name, value, None, False) for name, value in ours.items()],
            f"{provider} did not answer: {exc}",
            None,
        )
    drift = {change.field: change.stripe for change in reconciliation.diff_subscription(held, state)}
    compared = [ComparedField(name, value, drift.get(name, value), name in drift) for name, value in ours.items()]
    return compared, None, subscription


def _timeline(organization: Organization) -> tuple[list[TimelineItem], list[str], list[int]]:
    """Newest first: webhook deliveries (status, attempts, error), domain events (plan changes, sign-ins
    and the rest), emails sent and given up on, and staff actions."""
    items: list[TimelineItem] = []
    keys = [
        f"{kind}:{value}"
        for kind, value in (
            ("subscription", organization.billing_subscription_id),
            ("customer", organization.billing_customer_id),
            ("membership", organization.billing_subscription_id),
        )
        if value
    ]
    failed_events: list[str] = []
    models: tuple[tuple[type[StripeEvent] | type[WhopEvent], str], ...] = ((StripeEvent, "Stripe"), (WhopEvent, "Whop"))
    for model, provider in models:
        found = db.session.execute(
            select(model).where(model.object_key.in_(keys)).order_by(model.id.desc()).limit(TIMELINE_LIMIT)
        ).scalars()
        for delivery in cast(list[StripeEvent | WhopEvent], list(found)):
            failed = delivery.status == "failed"
            if failed:
                failed_events.append(delivery.event_id)
            detail = f"{delivery.event_id} · {delivery.status} · attempts {delivery.attempts}"
            if delivery.last_error and failed:
                detail += f" · {delivery.last_error[:300]}"
            elif delivery.outcome:
                detail += f" · {delivery.outcome}"
            items.append(TimelineItem(delivery.received_at, "webhook", f"{provider} {delivery.type}", detail, failed))
    events = list(
        db.session.execute(
            select(DomainEvent)
            .where(DomainEvent.organization_id == organization.id)
            .order_by(DomainEvent.id.desc())
            .limit(TIMELINE_LIMIT)
        ).scalars()
    )
    for event in events:
        items.append(TimelineItem(event.occurred_at, "event", event.name, event.source or ""))
    deliveries = db.session.execute(
        select(OutboxDelivery.consumer, OutboxDelivery.delivered_at, DomainEvent.name)
        .join(DomainEvent, DomainEvent.id == OutboxDelivery.domain_event_id)
        .where(DomainEvent.organization_id == organization.id)
        .order_by(OutboxDelivery.id.desc())
        .limit(TIMELINE_LIMIT)
    ).all()
    for sent in deliveries:
        items.append(TimelineItem(sent.delivered_at, "email", f"sent: {sent.consumer}", sent.name))
    failed_emails = _failed_email_events(organization.id)
    for event in events:
        if event.id in failed_emails:
            items.append(
                TimelineItem(event.occurred_at, "email", "not sent (gave up)", f"{event.name} · event {event.id}", True)
            )
    for entry in db.session.execute(
        select(StaffAuditEntry)
        .where(StaffAuditEntry.organization_id == organization.id)
        .order_by(StaffAuditEntry.id.desc())
        .limit(staff_audit.LIMIT)
    ).scalars():
        items.append(
            TimelineItem(
                entry.occurred_at,
                "staff",
                f"{entry.action} by {entry.staff_email}",
                f"{entry.outcome} · reason: {entry.reason}",
            )
        )
    items.sort(key=lambda item: _aware(item.when), reverse=True)
    return items[:TIMELINE_LIMIT], failed_events, sorted(failed_emails)


def _failed_email_events(organization_id: int) -> set[int]:
    """Domain events of the organization whose outbox delivery failed for good (PostgreSQL's queue)."""
    if db.session.get_bind().dialect.name != "postgresql":
        return set()
    return {
        int(row[0])
        for row in db.session.execute(
            text(
                "SELECT d.id FROM procrastinate_jobs AS j JOIN domain_event AS d "
                "ON d.id = (j.args->>'domain_event_id')::bigint "
                "WHERE j.task_name = :task AND j.status = 'failed' AND d.organization_id = :org"
            ),
            {"org": organization_id, "task": outbox.TASK},
        )
    }


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- The queue ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResyncJobRow:
    id: int
    organization_id: int
    status: str  # todo, doing, succeeded, failed, ...
    attempts: int
    queued_at: datetime | None


def resync_jobs(organization_id: int | None = None, *, limit: int = 50) -> list[ResyncJobRow]:
    """The console's re-syncs as the worker's queue holds them, newest first (PostgreSQL's queue only:
    on the SQLite stand-in jobs run inside the app)."""
    if db.session.get_bind().dialect.name != "postgresql":
        return []
    try:
        rows = db.session.execute(
            text(
                "SELECT j.id, (j.args->>'organization_id')::bigint AS organization_id, j.status::text AS status, "
                "j.attempts, (SELECT min(e.at) FROM procrastinate_events AS e WHERE e.job_id = j.id) AS queued_at "
                "FROM procrastinate_jobs AS j WHERE j.task_name = :task "
                "AND (CAST(:org AS bigint) IS NULL OR (j.args->>'organization_id')::bigint = :org) "
                "ORDER BY j.id DESC LIMIT :limit"
            ),
            {"task": RESYNC_TASK, "org": organization_id, "limit": limit},
        ).all()
    finally:
        db.session.rollback()
    return [ResyncJobRow(r.id, r.organization_id, r.status, r.attempts, r.queued_at) for r in rows]


@dataclass
class QueueView:
    figures: queue_status.QueueFigures
    events: list[StripeEvent | WhopEvent]
    provider: str
    status: str
    failed_emails: list[outbox.FailedDelivery] = field(default_factory=list)


def queue_view(provider: str = "stripe", status: str = "failed") -> QueueView:
    """The figures of `flask billing status`, and the stored webhook events in one status (pending or
    failed), oldest first: the ones waiting longest at the top."""
    model: type[StripeEvent] | type[WhopEvent] = WhopEvent if provider == "whop" else StripeEvent
    status = status if status in ("pending", "failed") else "failed"
    figures = queue_status.queue_figures()
    try:
        events = cast(
            list[StripeEvent | WhopEvent],
            list(
                db.session.execute(
                    select(model).where(model.status == status).order_by(model.received_at, model.id).limit(200)
                ).scalars()
            ),
        )
        for event in events:
            db.session.expunge(event)
    finally:
        db.session.rollback()
    # Emails (outbox deliveries) that gave up: the queue keeps them only on PostgreSQL.
    on_postgresql = db.session.get_bind().dialect.name == "postgresql"
    failed_emails = outbox.failed_deliveries() if on_postgresql else []
    return QueueView(figures, events, "whop" if provider == "whop" else "stripe", status, failed_emails)
