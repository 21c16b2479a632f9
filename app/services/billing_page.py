"""What the owner's billing page shows from Stripe, assembled: the subscription's prices, the next
invoice, a scheduled change, the card on file and the invoice history. Each part is read through the
PageReads BillingService hands in (short timeout, no retries), cached per organization version, and a
part Stripe does not give in time is named in `unavailable` while the page shows the rest."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal, Protocol

from flask import current_app

from app import clock
from app.extensions import cache, db
from app.models import BillingStatus, Organization
from app.services import tax
from app.services.billing_common import BillingConfigurationError, BillingError
from app.services.billing_details import (
    BillingDetails,
    CardOnFile,
    InvoiceRow,
    ScheduledChange,
    SubscriptionFacts,
    UpcomingInvoice,
    scheduled_change_from_stripe,
)
from app.services.pricing import PriceInfo

logger = logging.getLogger(__name__)

BILLING_READ_PARTS = ("subscription", "upcoming", "schedule", "payment_method", "invoices", "tax")
INVOICE_HISTORY_LENGTH = 12
PageList = Literal["invoices", "charges", "refunds"]  # the Stripe lists pages read


class PageReads(Protocol):
    """The billing page's Stripe reads, implemented by BillingService; each raises BillingError (or
    BillingConfigurationError) when Stripe does not answer in time."""

    def read_subscription_for_page(self, subscription_id: str) -> dict[str, Any]: ...

    def read_upcoming(self, subscription_id: str, schedule_id: str | None = None) -> dict[str, Any] | None: ...

    def read_schedule(self, schedule_id: str) -> dict[str, Any]: ...

    def read_payment_method(self, customer_id: str, default_method: str | None) -> dict[str, Any] | None: ...

    def read_list_for_page(self, resource: PageList, params: Any) -> list[dict[str, Any]]: ...

    def read_customer_tax(self, customer_id: str) -> dict[str, Any]: ...

    def catalogue_prices(self) -> dict[str, PriceInfo]: ...


class WhopPageReads(Protocol):
    """The billing page's Whop reads, implemented by the Whop adapter BillingService holds."""

    def retrieve_membership(self, membership_id: str) -> dict[str, Any]: ...

    def list_payments(self, membership_id: str, *, limit: int) -> list[dict[str, Any]]: ...


WHOP_PAYMENT_HISTORY = 12


def billing_details(organization: Organization, stripe: PageReads, whop: WhopPageReads) -> BillingDetails:
    """What the owner's billing page shows from Stripe: the subscription's prices, the next invoice
    (Stripe's preview), the payment method on file, a scheduled downgrade and the invoice history.
    Each part is cached for BILLING_READ_CACHE_SECONDS; a part Stripe does not give in time is None
    and named in `unavailable` (remembered for BILLING_READ_FAILURE_SECONDS), and the page shows the
    rest. Never raises for Stripe's sake."""
    details = BillingDetails()
    if organization.billed_by_whop:
        return whop_details(organization, whop)
    subscription_id, customer_id = organization.billing_subscription_id, organization.billing_customer_id
    live = organization.billing_status not in (BillingStatus.CANCELED, BillingStatus.INCOMPLETE_EXPIRED)
    ending = organization.cancel_at_period_end
    # The cache is keyed by the Stripe state the organization holds: an applied webhook or change
    # (billing_as_of, payment_as_of) makes the page read Stripe afresh.
    organization_id = f"{organization.id}:{organization.billing_as_of or 0}:{organization.payment_as_of or 0}"
    db.session.rollback()  # no transaction is held while Stripe is asked (the page reloads what it shows)
    if subscription_id:
        facts = cached_read(
            organization_id,
            "subscription",
            lambda: SubscriptionFacts.from_stripe(stripe.read_subscription_for_page(subscription_id)),
            details,
        )
        details.subscription = facts if isinstance(facts, SubscriptionFacts) else None
    if subscription_id and live and not ending:
        # A scheduled change (a downgrade at the period's end) is in the next invoice: Stripe previews
        # the schedule, not the subscription's current items.
        schedule_id = details.subscription.schedule_id if details.subscription is not None else None
        upcoming = cached_read(
            organization_id,
            "upcoming",
            lambda: upcoming_invoice(stripe.read_upcoming(subscription_id, schedule_id)),
            details,
        )
        details.upcoming = upcoming if isinstance(upcoming, UpcomingInvoice) else None
    if details.subscription is not None and details.subscription.schedule_id and live:
        schedule_id = details.subscription.schedule_id
        change = cached_read(
            organization_id,
            "schedule",
            lambda: scheduled_change(stripe.read_schedule(schedule_id), stripe.catalogue_prices()),
            details,
        )
        details.scheduled_change = change if isinstance(change, ScheduledChange) else None
    if customer_id:
        default_method = details.subscription.default_payment_method if details.subscription else None
        method = cached_read(
            organization_id,
            "payment_method",
            lambda: card_on_file(stripe.read_payment_method(customer_id, default_method)),
            details,
        )
        details.payment_method = method if isinstance(method, CardOnFile) else None
        invoices = cached_read(
            organization_id,
            "invoices",
            lambda: [
                InvoiceRow.from_stripe(invoice)
                for invoice in stripe.read_list_for_page(
                    "invoices", {"customer": customer_id, "limit": INVOICE_HISTORY_LENGTH}
                )
            ],
            details,
        )
        details.invoices = invoices if isinstance(invoices, list) else None
        found = cached_read(
            organization_id, "tax", lambda: tax.CustomerTax.from_stripe(stripe.read_customer_tax(customer_id)), details
        )
        details.tax = found if isinstance(found, tax.CustomerTax) else None
    return details


def whop_details(organization: Organization, whop: WhopPageReads) -> BillingDetails:
    """What Whop knows, for a Whop-billed organization: the membership's renewal price and date (the
    plan's price and the next charge) and its payments (the card Whop charged, as Whop reports it, and
    the history). Cached and degraded as Stripe's parts are."""
    details = BillingDetails()
    membership_id = organization.billing_subscription_id
    if not membership_id:
        return details
    live = organization.billing_status not in (BillingStatus.CANCELED, BillingStatus.INCOMPLETE_EXPIRED)
    version = f"{organization.id}:{organization.billing_as_of or 0}:{organization.payment_as_of or 0}"
    ending = organization.cancel_at_period_end
    db.session.rollback()  # no transaction is held while Whop is asked
    membership = cached_read(version, "subscription", lambda: whop.retrieve_membership(membership_id), details)
    if isinstance(membership, dict):
        details.subscription = SubscriptionFacts.from_whop(membership)
        if live and not ending:
            details.upcoming = UpcomingInvoice.from_whop(membership)
    elif "subscription" in details.unavailable and live and not ending:
        details.unavailable.append("upcoming")
    payments = cached_read(
        version, "invoices", lambda: whop.list_payments(membership_id, limit=WHOP_PAYMENT_HISTORY), details
    )
    if isinstance(payments, list):
        details.invoices = [InvoiceRow.from_whop(payment) for payment in payments]
        if details.subscription is not None and payments:
            details.subscription = replace(details.subscription, latest_invoice=str(payments[0].get("id")))
        charged = next((p for p in payments if p.get("payment_instrument")), None)
        details.payment_method = CardOnFile.from_whop(charged) if charged else None
    elif "invoices" in details.unavailable:
        details.unavailable.append("payment_method")
    return details


def forget_reads(organization_id: int) -> None:
    """Drop the billing page's cached reads, after a change made from the app."""
    organization = db.session.get(Organization, organization_id)
    if organization is None:
        return
    version = f"{organization_id}:{organization.billing_as_of or 0}:{organization.payment_as_of or 0}"
    cache.delete_many(*(f"billing-read:{version}:{part}" for part in BILLING_READ_PARTS))


def shown(organization: Organization, part: str) -> Any:
    """What the page would show of one part without asking Stripe: its cached read, or None (reconcile
    compares it with Stripe: the database keeps no copy of discounts or tax IDs)."""
    version = f"{organization.id}:{organization.billing_as_of or 0}:{organization.payment_as_of or 0}"
    try:
        cached = cache.get(f"billing-read:{version}:{part}")
    except Exception:  # a Redis hiccup: nothing is shown from the cache
        return None
    return cached.get("value") if isinstance(cached, dict) else None


def cached_read(organization_id: str, part: str, read: Callable[[], Any], details: BillingDetails) -> Any:
    key = f"billing-read:{organization_id}:{part}"
    try:
        cached = cache.get(key)
    except Exception:  # the cache is a convenience here: a Redis hiccup must not fail the page
        cached = None
    if isinstance(cached, dict) and cached.get("unavailable"):
        details.unavailable.append(part)
        return None
    if cached is not None:
        return cached.get("value") if isinstance(cached, dict) else None
    config = current_app.config
    try:
        value = read()
    except (BillingError, BillingConfigurationError) as exc:
        logger.info("billing page: %s not read from Stripe: %s", part, exc)
        details.unavailable.append(part)
        _cache_quietly(key, {"unavailable": True}, config["BILLING_READ_FAILURE_SECONDS"])
        return None
    except Exception:  # an answer we could not read: the page still shows everything else
        logger.exception("billing page: %s could not be read", part)
        details.unavailable.append(part)
        _cache_quietly(key, {"unavailable": True}, config["BILLING_READ_FAILURE_SECONDS"])
        return None
    _cache_quietly(key, {"value": value}, config["BILLING_READ_CACHE_SECONDS"])
    return value


def upcoming_invoice(preview: dict[str, Any] | None) -> UpcomingInvoice | None:
    return UpcomingInvoice.from_stripe(preview) if preview is not None else None


def card_on_file(method: dict[str, Any] | None) -> CardOnFile | None:
    return CardOnFile.from_stripe(method) if method is not None else None


def scheduled_change(schedule: dict[str, Any], prices: dict[str, PriceInfo]) -> ScheduledChange | None:
    """A schedule's next phase, its prices said as the catalogue says them (phases name prices by id)."""
    change = scheduled_change_from_stripe(schedule, clock.now())
    if change is None:
        return None
    by_id = {price.id: key for key, price in prices.items()}
    keys = [by_id.get(price_id, price_id) for price_id in change.lookup_keys]
    quantities = {by_id.get(price_id, price_id): quantity for price_id, quantity in change.quantities.items()}
    return replace(change, lookup_keys=keys, quantities=quantities)


def _cache_quietly(key: str, value: Any, timeout: int) -> None:
    try:
        cache.set(key, value, timeout=timeout)
    except Exception:
        logger.info("billing page: %s not cached", key)
