"""A Stripe subscription, read into the few facts an organization keeps, and applied to an
organization with one domain event per kind of change. Plain dicts in, no Stripe SDK: webhook payloads
and API answers (converted with to_dict()) take the same path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.models import BillingStatus, Organization, OrganizationAddon
from app.models.types import utcnow
from app.services import domain_events
from app.services.catalogue_mapping import KnownPrice, KnownPrices, map_items
from app.services.catalogue_mapping import MappedAddon as AddonLine
from app.services.plans import PlanCatalogue


@dataclass(frozen=True)
class SubscriptionState:
    subscription_id: str
    customer_id: str | None
    status: BillingStatus
    tier: str | None  # None when no item carries a tier's price (the organization keeps its tier)
    addons: dict[str, AddonLine]
    cancel_at_period_end: bool
    current_period_end: datetime | None
    trial_end: datetime | None
    canceled_at: datetime | None
    ended_at: datetime | None
    metadata: dict[str, str]
    # Items that map to no tier or add-on (see catalogue_mapping): reported, and they never remove one.
    unmapped: tuple[dict[str, Any], ...] = ()
    # Stripe's pause_collection: the behavior while paused (None when collecting) and when it resumes.
    collection_paused: str | None = None
    collection_resumes_at: datetime | None = None
    # Prices seen carrying a catalogue lookup key, for BillingService to remember.
    seen_prices: tuple[KnownPrice, ...] = ()

    @classmethod
    def from_stripe(
        cls,
        subscription: Mapping[str, Any],
        catalogue: PlanCatalogue,
        known: KnownPrices | None = None,
        held_addon_items: Mapping[str, str] | None = None,
    ) -> SubscriptionState:
        try:
            status = BillingStatus(subscription["status"])
        except ValueError:
            raise ValueError(f"unknown subscription status {subscription['status']!r}") from None
        items = (subscription.get("items") or {}).get("data") or []
        mapping = map_items(items, catalogue, known, held_addon_items)
        period_ends = [item["current_period_end"] for item in items if item.get("current_period_end")]
        pause = subscription.get("pause_collection")
        pause = pause if isinstance(pause, Mapping) else {}
        # Current API versions keep the period on the items; older payloads on the subscription.
        period_end = max(period_ends) if period_ends else subscription.get("current_period_end")
        customer = subscription.get("customer")
        return cls(
            subscription_id=subscription["id"],
            customer_id=customer if isinstance(customer, str) or customer is None else customer["id"],
            status=status,
            tier=mapping.tier,
            addons=mapping.addons,
            # A cancellation can be scheduled either way; both mean "ends at cancel_at / period end".
            cancel_at_period_end=bool(subscription.get("cancel_at_period_end") or subscription.get("cancel_at"))
            and status not in (BillingStatus.CANCELED, BillingStatus.INCOMPLETE_EXPIRED),
            current_period_end=from_unix(subscription.get("cancel_at") or period_end),
            trial_end=from_unix(subscription.get("trial_end")),
            canceled_at=from_unix(subscription.get("canceled_at")),
            ended_at=from_unix(subscription.get("ended_at")),
            metadata=dict(subscription.get("metadata") or {}),
            unmapped=tuple(mapping.unmapped),
            collection_paused=str(pause["behavior"]) if pause.get("behavior") else None,
            collection_resumes_at=from_unix(pause.get("resumes_at")) if pause.get("behavior") else None,
            seen_prices=tuple(mapping.seen),
        )


def from_unix(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _as_utc(value: datetime | None) -> datetime | None:
    """SQLite (the development stand-in) hands back naive datetimes; they were stored as UTC."""
    return value.replace(tzinfo=UTC) if value and value.tzinfo is None else value


def new_organization(name: str, fallback_tier: str, state: SubscriptionState, **fields: Any) -> Organization:
    """An organization holding the subscription's state, as at signup."""
    organization = Organization(
        name=name,
        tier=state.tier or fallback_tier,
        billing_status=state.status,
        stripe_customer_id=state.customer_id,
        stripe_subscription_id=state.subscription_id,
        cancel_at_period_end=state.cancel_at_period_end,
        current_period_end=state.current_period_end,
        trial_end=state.trial_end,
        canceled_at=state.canceled_at,
        ended_at=state.ended_at,
        past_due_since=utcnow() if state.status == BillingStatus.PAST_DUE else None,
        collection_paused=state.collection_paused,
        collection_resumes_at=state.collection_resumes_at,
        unmapped_items=list(state.unmapped) or None,
        **fields,
    )
    organization.addons = [
        OrganizationAddon(addon_key=key, quantity=line.quantity, stripe_subscription_item_id=line.subscription_item_id)
        for key, line in state.addons.items()
    ]
    return organization


def apply_subscription_state(organization: Organization, state: SubscriptionState, *, source: str) -> list[str]:
    """Bring the organization in line with the subscription; record a domain event for each kind of
    change and return their names. Applying the same state twice changes nothing and records nothing."""
    recorded: list[str] = []

    def record(name: str, **data: Any) -> None:
        domain_events.record(name, organization_id=organization.id, source=source, **data)
        recorded.append(name)

    if organization.stripe_subscription_id != state.subscription_id:
        record(
            "organization.subscription_replaced",
            previous_subscription_id=organization.stripe_subscription_id,
            subscription_id=state.subscription_id,
        )
        organization.stripe_subscription_id = state.subscription_id
    if organization.billing_status != state.status:
        record("organization.billing_status_changed", previous=organization.billing_status, status=state.status.value)
        if state.status == BillingStatus.PAST_DUE:
            organization.past_due_since = utcnow()
        elif organization.billing_status == BillingStatus.PAST_DUE:
            organization.past_due_since = None
        organization.billing_status = state.status
    if state.tier and organization.tier != state.tier:
        record("organization.plan_changed", previous=organization.tier, tier=state.tier)
        organization.tier = state.tier
    _apply_items(organization, state, record)
    _apply_collection_pause(organization, state, record)
    if organization.cancel_at_period_end != state.cancel_at_period_end:
        if state.cancel_at_period_end:
            record("subscription.cancellation_scheduled", ends_at=_iso(state.current_period_end))
        else:
            record("subscription.cancellation_withdrawn")
        organization.cancel_at_period_end = state.cancel_at_period_end
    dates = {
        "current_period_end": state.current_period_end,
        "trial_end": state.trial_end,
        "canceled_at": state.canceled_at,
        "ended_at": state.ended_at,
    }
    changed_dates = {
        name: _iso(value) for name, value in dates.items() if _as_utc(getattr(organization, name)) != value
    }
    if changed_dates:
        record("organization.billing_dates_changed", **changed_dates)
        for name in changed_dates:
            setattr(organization, name, dates[name])
    return recorded


def _apply_items(organization: Organization, state: SubscriptionState, record: Callable[..., None]) -> None:
    lines = dict(state.addons)
    if state.unmapped:
        # An item we cannot name may be an add-on we hold: keep it rather than guess it away.
        for row in organization.addons:
            lines.setdefault(row.addon_key, AddonLine(row.quantity, row.stripe_subscription_item_id or ""))
    wanted = {key: line.quantity for key, line in lines.items()}
    if organization.addon_quantities() != wanted:
        record("organization.addons_changed", previous=organization.addon_quantities(), addons=wanted)
    _sync_addon_rows(organization, lines)
    unmapped = list(state.unmapped) or None
    if (organization.unmapped_items or None) != unmapped:
        if unmapped:
            record("subscription.items_unmapped", items=unmapped)
        organization.unmapped_items = unmapped


def _apply_collection_pause(organization: Organization, state: SubscriptionState, record: Callable[..., None]) -> None:
    held = (organization.collection_paused, _as_utc(organization.collection_resumes_at))
    if held == (state.collection_paused, state.collection_resumes_at):
        return
    if state.collection_paused:
        record(
            "subscription.collection_paused",
            behavior=state.collection_paused,
            resumes_at=_iso(state.collection_resumes_at),
        )
    else:
        record("subscription.collection_resumed")
    organization.collection_paused = state.collection_paused
    organization.collection_resumes_at = state.collection_resumes_at


def _sync_addon_rows(organization: Organization, lines: dict[str, AddonLine]) -> None:
    rows = {addon.addon_key: addon for addon in organization.addons}
    for key, row in rows.items():
        if key not in lines:
            organization.addons.remove(row)
    for key, line in lines.items():
        row = rows.get(key) or OrganizationAddon(addon_key=key)
        row.quantity = line.quantity
        row.stripe_subscription_item_id = line.subscription_item_id
        if key not in rows:
            organization.addons.append(row)
