"""Billing emails to an organization's owner, sent by outbox consumers (app/services/outbox.py) from
the worker, once per domain event. Each email is plain text and HTML, from
app/templates/email/<template>.txt and .html."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import current_app
from sqlalchemy import select

from app.extensions import db
from app.models import Organization, PendingSignup, User, UserRole
from app.services import outbox
from app.services.mailer import send_event_email
from app.services.outbox import OutboxEvent
from app.services.pricing import format_money


def organization_and_owner(organization_id: int | None) -> tuple[Organization, User] | None:
    """The organization and its owner, read; no transaction stays open afterwards (the callers then
    wait on SMTP or Stripe)."""
    if organization_id is None:
        return None
    row = db.session.execute(
        select(Organization, User)
        .join(User, User.organization_id == Organization.id)
        .where(Organization.id == organization_id, User.role == UserRole.OWNER)
    ).first()
    db.session.rollback()  # the rows are read; no transaction stays open while SMTP answers
    return (row[0], row[1]) if row else None


def _send_to_owner(event: OutboxEvent, template: str, subject: str, **context: Any) -> None:
    found = organization_and_owner(event.organization_id)
    if found is None:
        # Nobody to write to (the organization has no owner): nothing is owed, and retrying cannot help.
        current_app.logger.warning("no owner to email for %s (event %s)", event.name, event.id)
        return
    organization, owner = found
    send_event_email(
        event,
        owner.email,
        template,
        subject=subject,
        organization=organization,
        owner=owner,
        event=event,
        billing_url=f"{current_app.config['APP_BASE_URL']}/billing/",
        **context,
    )


def _date(value: Any) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _money(amount: Any, currency: Any) -> str:
    """The amount as the pages write it ($29.00): one formatter for pages and emails."""
    return format_money(amount if isinstance(amount, int) else None, currency if isinstance(currency, str) else None)


@outbox.consumer("signup.completed", name="welcome_email")
def welcome_email(event: OutboxEvent) -> None:
    """The welcome, with a receipt a person reads: what was charged and when, the plan and add-ons by
    name (never the provider's ids)."""
    found = organization_and_owner(event.organization_id)
    catalogue = current_app.extensions["plan_catalogue"]
    addons = {
        (catalogue.addons[key].name if key in catalogue.addons else key): quantity
        for key, quantity in (found[0].addon_quantities() if found else {}).items()
    }
    amount = event.data.get("amount_paid")
    _send_to_owner(
        event,
        "welcome",
        "Welcome to Ledgerline: your receipt",
        addons=addons,
        paid=_money(amount, event.data.get("currency")) if isinstance(amount, int) else None,
        paid_on=event.occurred_at,
    )


def _unpaid_invoice(event: OutboxEvent) -> dict[str, Any]:
    """What both unpaid-invoice emails show: the amount due and the page to pay it on."""
    return {
        "amount": _money(event.data.get("amount_due"), event.data.get("currency")),
        "pay_url": event.data.get("hosted_invoice_url"),
    }


@outbox.consumer("billing.payment_failed", name="payment_failed_email")
def payment_failed_email(event: OutboxEvent) -> None:
    _send_to_owner(
        event,
        "payment_failed",
        "Your payment failed",
        next_attempt=_date(event.data.get("next_payment_attempt")),
        **_unpaid_invoice(event),
    )


@outbox.consumer("billing.payment_action_required", name="payment_action_required_email")
def payment_action_required_email(event: OutboxEvent) -> None:
    _send_to_owner(
        event,
        "payment_action_required",
        "Your payment needs your confirmation",
        **_unpaid_invoice(event),
    )


@outbox.consumer("subscription.trial_will_end", name="trial_ending_email")
def trial_ending_email(event: OutboxEvent) -> None:
    _send_to_owner(
        event,
        "trial_ending",
        "Your trial ends in three days",
        trial_end=_date(event.data.get("trial_end")),
        ends_without_card=event.data.get("ends_without_card"),
    )


@outbox.consumer("subscription.cancellation_scheduled", name="cancellation_scheduled_email")
def cancellation_scheduled_email(event: OutboxEvent) -> None:
    _send_to_owner(
        event, "cancellation_scheduled", "Your subscription will end", ends_at=_date(event.data.get("ends_at"))
    )


@outbox.consumer("organization.billing_status_changed", name="subscription_ended_email")
def subscription_ended_email(event: OutboxEvent) -> None:
    if event.data.get("status") != "canceled":
        return  # only the end of a subscription is written about; the delivery is still recorded
    _send_to_owner(event, "subscription_ended", "Your subscription has ended")


@outbox.consumer("signup.conflict_refunded", name="conflict_refund_email")
def conflict_refund_email(event: OutboxEvent) -> None:
    """A second paid signup for an email that already has an account: its subscription was canceled
    and its payment refunded at Stripe (data: amount_refunded, currency, refund_id, ...)."""
    pending_id = event.data.get("pending_signup_id")
    pending = db.session.get(PendingSignup, pending_id) if pending_id else None
    db.session.rollback()
    if pending is None:
        current_app.logger.warning("signup.conflict %s: no pending signup to write to", event.id)
        return
    send_event_email(
        event,
        pending.email,
        "conflict_refund",
        subject="Your second signup was refunded",
        event=event,
        pending=pending,
        login_url=f"{current_app.config['APP_BASE_URL']}/auth/login",
    )


@outbox.consumer("usage.threshold_reached", name="usage_warning_email")
def usage_warning_email(event: OutboxEvent) -> None:
    """A soft-limited meter reached 80% or 100% of what the plan includes this period (once each)."""
    percent = event.data.get("percent")
    _send_to_owner(
        event,
        "usage_warning",
        f"You have used {percent}% of your {event.data.get('meter_name', 'usage')} this period",
        percent=percent,
        meter_name=event.data.get("meter_name"),
        included=event.data.get("included"),
        used=event.data.get("used"),
        period_end=_date(event.data.get("period_end")),
    )
