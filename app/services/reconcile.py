"""Reconcile: what differs between Stripe and the database. Pure: BillingService.reconcile reads both
sides (the database in short transactions, Stripe with none open), hands them here, and applies the
repairs through the paths the webhooks use. Nothing here talks to Stripe or the database.

Six kinds of drift:
- an organization's subscription whose status, tier, add-ons, period end, scheduled cancellation or
  paused collection differ from Stripe's (`SubscriptionDrift`);
- a live subscription carrying this app's metadata that no organization holds (`Orphan`): a signup
  never provisioned, a second paid signup for a registered email, a surplus resubscription;
- an event Stripe sent in the window that `stripe_event` does not hold (`MissingEvent`);
- a conflicting signup or surplus resubscription not yet canceled and refunded (`Unsettled`);
- a Stripe customer without the email or organization name the account gives it (`CustomerDrift`);
- a billing page showing discounts or tax IDs Stripe no longer holds (`PageDrift`): the database keeps
  no copy of either, so what the page shows (its cached reads) is what is compared.
Tax IDs Stripe could not verify are reported (`customers`), not drift: the customer corrects them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.services.subscription_state import SubscriptionState

LIVE_STATUSES = frozenset({"trialing", "active", "past_due", "unpaid", "paused", "incomplete"})
MAX_SINCE_DAYS = 30  # Stripe keeps events for 30 days


@dataclass(frozen=True)
class HeldBilling:
    """What the database holds for one organization's subscription."""

    organization_id: int
    subscription_id: str
    status: str
    tier: str
    addons: dict[str, int]
    cancel_at_period_end: bool
    current_period_end: datetime | None
    collection_paused: str | None


@dataclass(frozen=True)
class FieldDrift:
    field: str
    ours: Any
    stripe: Any


@dataclass(frozen=True)
class SubscriptionDrift:
    organization_id: int
    subscription_id: str  # a Stripe subscription, or a Whop membership
    fields: list[FieldDrift]
    provider: str = "Stripe"


@dataclass(frozen=True)
class Orphan:
    """A live subscription with our metadata that no organization holds. `kind`: `signup` (its pending
    signup is ours: provision it, or cancel and refund it if the email already has an account),
    `resubscribe` (its checkout is ours: attach it, or cancel and refund it as surplus) or `unknown`
    (our metadata, but no row of ours explains it: reported, never touched, since another
    environment sharing the Stripe account may own it)."""

    subscription_id: str
    kind: str
    status: str
    reference: str | None  # the pending signup id or the resubscribe checkout id
    detail: str


@dataclass(frozen=True)
class Unsettled:
    """A paid checkout recorded as one no organization may keep (a conflicting signup, a surplus
    resubscription) whose cancel and refund at Stripe have not both been done yet."""

    kind: str  # "signup" or "resubscribe"
    reference: str  # the pending signup id or the resubscribe checkout id
    subscription_id: str


@dataclass(frozen=True)
class CustomerDrift:
    """What Stripe's customer lacks of the account (customer_sync.customer_drift): repaired by the
    worker's customer-sync job (ours is the source of truth for the email and the name)."""

    organization_id: int
    customer_id: str
    fields: list[FieldDrift]


@dataclass(frozen=True)
class PageDrift:
    """The billing page's cached view of Stripe's discounts or tax IDs no longer matching Stripe:
    repaired by dropping the page's reads (the next view reads Stripe)."""

    organization_id: int
    part: str  # "discounts" or "tax IDs"
    shown: Any
    stripe: Any


@dataclass(frozen=True)
class MissingEvent:
    event_id: str
    type: str
    created: int


@dataclass(frozen=True)
class Names:
    """How the report names what it is about, for people: "Analytical Engines <ada@example.com>" for
    an organization (its owner's email) or a signup (the email it was started with). Read from the
    database by reconcile_names.names_for; an id with no name is shown as the id alone."""

    organizations: Mapping[int, str] = field(default_factory=dict)
    signups: Mapping[str, str] = field(default_factory=dict)  # pending signup id -> name
    resubscribes: Mapping[str, str] = field(default_factory=dict)  # resubscribe checkout id -> organization


UNTOUCHED = (
    "left untouched: it carries this app's metadata, but no signup or checkout in this database explains "
    "it, so another environment sharing the Stripe account may own it; cancel it in the Stripe Dashboard "
    "if none does"
)


@dataclass
class ReconcileReport:
    subscriptions: list[SubscriptionDrift] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    missing_events: list[MissingEvent] = field(default_factory=list)
    unsettled: list[Unsettled] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be checked or repaired
    applied: list[str] = field(default_factory=list)  # what --apply did
    # What is reported of customers and never repaired: tax IDs Stripe could not verify, a customer
    # that could not be read.
    customers: list[str] = field(default_factory=list)
    customer_drifts: list[CustomerDrift] = field(default_factory=list)
    page_drifts: list[PageDrift] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        actionable = [orphan for orphan in self.orphans if orphan.kind != "unknown"]
        return not (
            self.subscriptions
            or actionable
            or self.missing_events
            or self.unsettled
            or self.problems
            or self.customer_drifts
            or self.page_drifts
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "subscriptions": [asdict(drift) for drift in self.subscriptions],
            "orphans": [asdict(orphan) for orphan in self.orphans],
            "missing_events": [asdict(event) for event in self.missing_events],
            "unsettled": [asdict(entry) for entry in self.unsettled],
            "problems": list(self.problems),
            "applied": list(self.applied),
            "customers": list(self.customers),
            "customer_drifts": [asdict(drift) for drift in self.customer_drifts],
            "page_drifts": [asdict(drift) for drift in self.page_drifts],
        }

    def untouched(self) -> list[Orphan]:
        """Orphans reconcile reports and never acts on: no row of ours explains them."""
        return [orphan for orphan in self.orphans if orphan.kind == "unknown"]

    def lines(self, names: Names | None = None) -> list[str]:
        """The report for people, one difference a line; organizations and signups by name and email
        when `names` has them."""
        names = names or Names()
        out = [f"applied: {entry}" for entry in self.applied]
        for drift in self.subscriptions:
            organization = _named(
                names.organizations.get(drift.organization_id), f"organization {drift.organization_id}"
            )
            for change in drift.fields:
                out.append(
                    f"{organization} ({drift.subscription_id}): {change.field} "
                    f"is {_show(change.ours)} here, {_show(change.stripe)} at {drift.provider}"
                )
        for orphan in self.orphans:
            if orphan.kind == "unknown":
                out.append(f"orphan subscription {orphan.subscription_id} ({orphan.status}): {UNTOUCHED}")
                continue
            whose = _whose(orphan.kind, orphan.reference, names)
            out.append(
                f"orphan subscription {orphan.subscription_id}{whose} ({orphan.kind}, {orphan.status}): {orphan.detail}"
            )
        for event in self.missing_events:
            created = datetime.fromtimestamp(event.created, UTC).strftime("%Y-%m-%d %H:%M:%S")
            out.append(f"missing event {event.event_id} {event.type} (created {created} UTC)")
        for entry in self.unsettled:
            whose = _whose(entry.kind, entry.reference, names)
            subscription = entry.subscription_id
            out.append(f"not yet canceled and refunded: {entry.kind} {entry.reference}{whose} ({subscription})")
        for customer in self.customer_drifts:
            organization = _named(
                names.organizations.get(customer.organization_id), f"organization {customer.organization_id}"
            )
            for change in customer.fields:
                out.append(
                    f"{organization} (customer {customer.customer_id}): {change.field} "
                    f"is {_show(change.ours)} here, {_show(change.stripe)} at Stripe"
                )
        for page in self.page_drifts:
            organization = _named(names.organizations.get(page.organization_id), f"organization {page.organization_id}")
            shown, held = _show(page.shown), _show(page.stripe)
            out.append(f"{organization}: the billing page shows {page.part} {shown}, Stripe holds {held}")
        out.extend(f"problem: {problem}" for problem in self.problems)
        out.extend(f"customer: {difference}" for difference in self.customers)
        if not self.clean:
            out.append("Drift remains.")
        elif self.untouched():
            count = len(self.untouched())
            out.append(
                f"Stripe and the database agree on everything this app holds. Left as they are: {count} "
                f"subscription{'s' if count != 1 else ''} with this app's metadata that nothing here explains "
                "(listed above, with why)."
            )
        else:
            out.append("Stripe and the database agree.")
        return out


def _named(name: str | None, fallback: str) -> str:
    return f"{name} [{fallback}]" if name else fallback


def _whose(kind: str, reference: str | None, names: Names) -> str:
    """' of signup Analytical Engines <ada@example.com>' and the like, or '' when nothing names it."""
    if reference is None:
        return ""
    if kind == "signup" and reference in names.signups:
        return f" of signup {names.signups[reference]}"
    if kind == "resubscribe" and reference in names.resubscribes:
        return f" of {names.resubscribes[reference]}"
    return ""


def _show(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if value is None:
        return "none"
    return repr(value) if isinstance(value, str) else str(value)


def _second(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.replace(microsecond=0)


def diff_subscription(held: HeldBilling, state: SubscriptionState) -> list[FieldDrift]:
    """Each field the organization keeps that differs from Stripe's subscription."""
    stripe_addons = {key: line.quantity for key, line in state.addons.items()}
    if state.unmapped:  # items we cannot name are kept as held, so they are not drift
        stripe_addons = {**held.addons, **stripe_addons}
    pairs: list[tuple[str, Any, Any]] = [
        ("status", held.status, state.status.value),
        ("tier", held.tier, state.tier or held.tier),
        ("addons", held.addons, stripe_addons),
        ("cancel_at_period_end", held.cancel_at_period_end, state.cancel_at_period_end),
        ("current_period_end", _second(held.current_period_end), _second(state.current_period_end)),
        ("collection_paused", held.collection_paused, state.collection_paused),
    ]
    return [FieldDrift(name, ours, theirs) for name, ours, theirs in pairs if ours != theirs]


def find_orphans(
    subscriptions: Iterable[Mapping[str, Any]],
    held_subscription_ids: set[str],
    our_pending_signups: Mapping[str, str],
    our_resubscribe_checkouts: Mapping[str, str],
) -> list[Orphan]:
    """Live subscriptions with our metadata that no organization holds.

    our_pending_signups: pending signup id -> its status, for the signups the subscriptions name.
    our_resubscribe_checkouts: subscription id -> our resubscribe checkout id, for those we know."""
    found: list[Orphan] = []
    for subscription in subscriptions:
        subscription_id = str(subscription["id"])
        status = str(subscription.get("status"))
        metadata = subscription.get("metadata") or {}
        purpose = metadata.get("purpose")
        if subscription_id in held_subscription_ids or status not in LIVE_STATUSES:
            continue
        if purpose == "signup" or metadata.get("pending_signup_id"):
            pending_id = str(metadata.get("pending_signup_id") or "")
            if our_pending_signups.get(pending_id) == "pending" and status == "incomplete":
                continue  # a payment still being confirmed: provisioning will follow
            if pending_id in our_pending_signups:
                found.append(
                    Orphan(
                        subscription_id,
                        "signup",
                        status,
                        pending_id,
                        f"signup {pending_id} ({our_pending_signups[pending_id]}) has no organization with it",
                    )
                )
            else:
                found.append(Orphan(subscription_id, "unknown", status, pending_id or None, "no signup of ours"))
        elif purpose == "resubscribe":
            checkout_id = our_resubscribe_checkouts.get(subscription_id)
            if checkout_id:
                organization = metadata.get("organization_id")
                found.append(
                    Orphan(
                        subscription_id,
                        "resubscribe",
                        status,
                        checkout_id,
                        f"resubscription of organization {organization} not held by it",
                    )
                )
            else:
                found.append(Orphan(subscription_id, "unknown", status, None, "no resubscribe checkout of ours"))
    return found


def find_missing_events(
    events: Iterable[Mapping[str, Any]], stored_event_ids: set[str], handled_types: Iterable[str]
) -> list[MissingEvent]:
    handled = set(handled_types)
    return sorted(
        (
            MissingEvent(str(event["id"]), str(event["type"]), int(event["created"]))
            for event in events
            if event["type"] in handled and event["id"] not in stored_event_ids
        ),
        key=lambda missing: (missing.created, missing.event_id),
    )
