"""The audit log as the owner reads it: each domain event of the organization as a time, a sentence and
who (or what) did it, by name. The events keep their machine form (name, data, `source` such as
`user:7` or `stripe:evt_…`); this module only words them, with the people and plans they name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from app.extensions import db
from app.models import DomainEvent, User
from app.services.access_policy import STATUS_WORDS
from app.services.plans import PlanCatalogue
from app.services.pricing import format_money
from app.services.wording import counted

LIMIT = 200


@dataclass(frozen=True)
class AuditEntry:
    when: datetime
    what: str
    by: str


@dataclass(frozen=True)
class _Context:
    people: Mapping[int, str]  # user id -> "Ada Lovelace (ada@example.com)"
    catalogue: PlanCatalogue

    def person(self, user_id: Any) -> str:
        return self.people.get(user_id, "a former member") if isinstance(user_id, int) else "someone"

    def tier(self, key: Any) -> str:
        tier = self.catalogue.tier(str(key)) if key else None
        return tier.name if tier else str(key or "no plan")

    def addons(self, quantities: Any) -> str:
        if not isinstance(quantities, Mapping) or not any(quantities.values()):
            return "none"
        parts = []
        for key, quantity in sorted(quantities.items()):
            addon = self.catalogue.addons.get(key)
            name = addon.name.lower() if addon else str(key)
            parts.append(f"{name} × {quantity}")
        return ", ".join(parts)


def entries(organization_id: int, catalogue: PlanCatalogue) -> list[AuditEntry]:
    """The organization's latest events, newest first, in words."""
    try:
        events = list(
            db.session.execute(
                select(DomainEvent)
                .where(DomainEvent.organization_id == organization_id)
                .order_by(DomainEvent.id.desc())
                .limit(LIMIT)
            ).scalars()
        )
        people = {
            user.id: f"{user.name} ({user.email})"
            for user in db.session.execute(select(User).where(User.organization_id == organization_id)).scalars()
        }
        # Actions staff took from the operations console name them as Ledgerline's support, not by name.
        outsiders = {int(ref) for ref in _user_references(events) if int(ref) not in people}
        if outsiders:
            people.update(
                (user_id, "Ledgerline support")
                for user_id in db.session.execute(
                    select(User.id).where(User.id.in_(outsiders), User.is_staff.is_(True))
                ).scalars()
            )
    finally:
        db.session.rollback()
    context = _Context(people, catalogue)
    return [AuditEntry(event.occurred_at, sentence(event, context), actor(event.source, context)) for event in events]


def _user_references(events: list[DomainEvent]) -> set[str]:
    return {
        reference
        for kind, _, reference in (str(event.source or "").partition(":") for event in events)
        if kind == "user" and reference.isdigit()
    }


def actor(source: str | None, context: _Context) -> str:
    """Who or what caused an event, from its `source`."""
    if not source:
        return "Ledgerline"
    kind, _, reference = source.partition(":")
    if kind == "user" and reference.isdigit():
        return context.person(int(reference))
    if kind == "stripe":
        return "Stripe (payment provider)"
    if kind == "whop":
        return "Whop (payment provider)"
    if kind == "reconcile":
        return "Ledgerline (daily check against the payment provider)"
    if kind == "web":
        return "Ledgerline (return from checkout)"
    return "Ledgerline (automatic)"


def _date(value: Any) -> str:
    if not value:
        return "an unknown date"
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(UTC):%d %B %Y}".lstrip("0")


def _status(value: Any) -> str:
    return str(STATUS_WORDS.get(value, value)).lower() if value else "none"


def _money(data: Mapping[str, Any], key: str) -> str:
    amount = data.get(key)
    return format_money(int(amount), data.get("currency") or "usd") if isinstance(amount, int) else "a payment"


def _interval(value: Any) -> str:
    return "yearly" if value == "year" else "monthly"


def _change(data: Mapping[str, Any], c: _Context) -> str:
    seats = data.get("extra_seats")
    extra = f", {counted(int(seats), 'extra seat')}" if isinstance(seats, int) and seats else ""
    return f"{c.tier(data.get('tier'))} ({_interval(data.get('interval'))}{extra})"


SENTENCES: dict[str, Callable[[Mapping[str, Any], DomainEvent, _Context], str]] = {
    "organization.created": lambda d, e, c: (
        f"Organization {d.get('name') or ''} created on the {c.tier(d.get('tier'))} plan".replace("  ", " ")
    ),
    "organization.renamed": lambda d, e, c: f"Organization renamed from {d.get('previous')} to {d.get('name')}",
    "organization.billing_status_changed": lambda d, e, c: (
        f"Billing status changed from {_status(d.get('previous'))} to {_status(d.get('status'))}"
    ),
    "organization.plan_changed": lambda d, e, c: (
        f"Plan changed from {c.tier(d.get('previous'))} to {c.tier(d.get('tier'))}"
    ),
    "organization.addons_changed": lambda d, e, c: (
        f"Add-ons changed from {c.addons(d.get('previous'))} to {c.addons(d.get('addons'))}"
    ),
    "organization.billing_dates_changed": lambda d, e, c: (
        f"Billing period now ends on {_date(d['current_period_end'])}"
        if d.get("current_period_end")
        else "Billing dates updated"
    ),
    "organization.resubscribe_started": lambda d, e, c: (
        f"Checkout opened for a new {c.tier(d.get('tier'))} subscription"
    ),
    "organization.subscription_replaced": lambda d, e, c: "A new subscription replaced the previous one",
    "organization.surplus_subscription": lambda d, e, c: (
        "A second paid subscription was found; it is canceled and refunded"
    ),
    "organization.surplus_subscription_refunded": lambda d, e, c: "The second subscription was canceled and refunded",
    "signup.completed": lambda d, e, c: "Signed up and paid",
    "subscription.cancellation_scheduled": lambda d, e, c: (
        f"Cancellation scheduled: the plan ends on {_date(d.get('ends_at'))}"
    ),
    "subscription.cancellation_withdrawn": lambda d, e, c: "Cancellation withdrawn: the plan renews as usual",
    "subscription.change_scheduled": lambda d, e, c: (
        f"Change to {_change(d, c)} scheduled for {_date(d.get('effective_at'))}"
    ),
    "subscription.changed": lambda d, e, c: f"Changed to {_change(d, c)}",
    "subscription.change_withdrawn": lambda d, e, c: "Scheduled plan change withdrawn",
    "subscription.collection_paused": lambda d, e, c: "Payment collection paused",
    "subscription.collection_resumed": lambda d, e, c: "Payment collection resumed",
    "subscription.items_unmapped": lambda d, e, c: "The subscription holds items this app does not sell",
    "subscription.trial_will_end": lambda d, e, c: f"The free trial ends on {_date(d.get('trial_end'))}",
    "billing.payment_succeeded": lambda d, e, c: f"Payment of {_money(d, 'amount_paid')} received",
    "billing.payment_failed": lambda d, e, c: f"Payment of {_money(d, 'amount_due')} failed",
    "billing.payment_action_required": lambda d, e, c: (
        f"Payment of {_money(d, 'amount_due')} waits for the card holder's confirmation"
    ),
    "team.invitation_sent": lambda d, e, c: f"{d.get('email') or 'Someone'} invited to join",
    "team.invitation_revoked": lambda d, e, c: "Invitation withdrawn",
    "team.invitation_accepted": lambda d, e, c: f"{c.person(e.user_id)} joined the team",
    "team.member_removed": lambda d, e, c: f"{c.person(d.get('removed_user_id'))} removed from the team",
    "api_key.created": lambda d, e, c: f"API key “{d.get('name')}” ({d.get('prefix')}…) created",
    "api_key.revoked": lambda d, e, c: f"API key “{d.get('name')}” ({d.get('prefix')}…) revoked",
    "usage.threshold_reached": lambda d, e, c: (
        f"{d.get('percent')}% of the {d.get('meter_name')} the plan includes used this period"
    ),
    "user.created": lambda d, e, c: f"Account of {c.person(e.user_id)} created ({d.get('role') or 'member'})",
    "user.signed_in": lambda d, e, c: f"{c.person(e.user_id)} signed in",
    "user.signed_out_everywhere": lambda d, e, c: f"{c.person(e.user_id)} signed out on every device",
    "user.email_verified": lambda d, e, c: f"{c.person(e.user_id)} confirmed their email address",
    "user.email_verification_requested": lambda d, e, c: f"{c.person(e.user_id)} asked for a new confirmation link",
    "user.password_changed": lambda d, e, c: f"{c.person(e.user_id)} changed their password",
    "user.password_reset_requested": lambda d, e, c: f"Password reset link sent to {c.person(e.user_id)}",
    "user.password_reset": lambda d, e, c: f"{c.person(e.user_id)} chose a new password through a reset link",
}


def sentence(event: DomainEvent, context: _Context) -> str:
    """The event in words; an event without its own sentence still reads as words, not a key."""
    data = event.data or {}
    words = SENTENCES.get(event.name)
    if words is not None:
        return words(data, event, context)
    area, _, what = event.name.partition(".")
    return f"{(what or area).replace('_', ' ').capitalize()} ({area})"
