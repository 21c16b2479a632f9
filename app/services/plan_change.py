"""Plan and seat changes, decided without Stripe: what the subscription holds now, what the owner asks
for, the subscription items that turn one into the other, whether it is an upgrade (at once, prorated
and invoiced now) or a downgrade (at the end of the period, through a subscription schedule), and the
preview's summary. BillingService reads Stripe and calls these; the billing pages render the results.

A preview is handed to the browser as a signed ticket (itsdangerous, the app's secret): it names the
subscription's state it was computed from (a fingerprint of its prices, quantities and schedule), the
target and the proration date. Confirming re-reads Stripe; a ticket whose state no longer matches, or
whose prices moved, or that is older than PLAN_CHANGE_PREVIEW_MINUTES, is stale and refused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.services.entitlements import entitlements_for, seat_addon_key
from app.services.plans import PlanCatalogue
from app.services.pricing import InvoiceTax, PriceInfo, format_money
from app.services.promotions import describe_code
from app.services.wording import counted


class PlanChangeError(ValueError):
    """The change asked for cannot be made; the message is for the owner."""


class When(StrEnum):
    NOW = "now"  # upgrades and seat changes: prorated, invoiced at once
    PERIOD_END = "period_end"  # downgrades: a subscription schedule switches the prices at renewal


@dataclass(frozen=True)
class Line:
    item_id: str
    price: PriceInfo
    quantity: int


@dataclass(frozen=True)
class CurrentPlan:
    """A subscription as a plan change sees it."""

    subscription_id: str
    status: str
    tier: str | None
    interval: str | None
    extra_seats: int
    tier_line: Line | None
    seat_line: Line | None
    other_lines: tuple[Line, ...]
    period_start: int | None
    period_end: int | None
    schedule_id: str | None
    fingerprint: str
    # An earlier upgrade waiting for its invoice to be paid (Stripe's pending_update): its expiry.
    pending_update_expires_at: int | None = None

    def lines(self) -> list[Line]:
        return [line for line in (self.tier_line, self.seat_line) if line] + list(self.other_lines)

    def monthly_total(self) -> Decimal:
        return sum((line.price.monthly_equivalent(line.quantity) for line in self.lines()), Decimal(0))

    def recurring_total(self) -> int:
        return sum((line.price.unit_amount or 0) * line.quantity for line in self.lines())

    @property
    def currency(self) -> str:
        return self.tier_line.price.currency if self.tier_line else "usd"


def read_current(subscription: Mapping[str, Any], catalogue: PlanCatalogue) -> CurrentPlan:
    seat_key = seat_addon_key(catalogue)
    tier_line = seat_line = None
    others: list[Line] = []
    starts, ends = [], []
    for item in (subscription.get("items") or {}).get("data") or []:
        price = PriceInfo.from_stripe(item.get("price") or {})
        line = Line(str(item["id"]), price, int(item.get("quantity") or 0))
        tier = catalogue.tier_for_lookup_key(price.lookup_key)
        addon = catalogue.addon_for_lookup_key(price.lookup_key)
        if tier is not None and tier_line is None:
            tier_line = line
        elif addon is not None and addon.key == seat_key and seat_line is None:
            seat_line = line
        else:
            others.append(line)
        if item.get("current_period_start"):
            starts.append(int(item["current_period_start"]))
        if item.get("current_period_end"):
            ends.append(int(item["current_period_end"]))
    tier = catalogue.tier_for_lookup_key(tier_line.price.lookup_key) if tier_line else None
    schedule = subscription.get("schedule")
    schedule_id = schedule if isinstance(schedule, str) or schedule is None else schedule.get("id")
    state = {
        "id": subscription.get("id"),
        "status": subscription.get("status"),
        "items": sorted((line.price.id, line.quantity) for line in [tier_line, seat_line, *others] if line),
        "schedule": schedule_id,
        "cancel_at_period_end": bool(subscription.get("cancel_at_period_end")),
        "pending_update": bool(subscription.get("pending_update")),
        # The period and the discounts decide the proration a preview showed: a preview confirmed
        # after the period turned over, or a coupon came or went, is stale.
        "period": [min(starts) if starts else None, max(ends) if ends else None],
        "tax": [
            bool((subscription.get("automatic_tax") or {}).get("enabled")),
            sorted(
                str(r if isinstance(r, str) else (r or {}).get("id"))
                for r in subscription.get("default_tax_rates") or []
            ),
        ],
        "discounts": sorted(
            str(d if isinstance(d, str) else (d or {}).get("id")) for d in subscription.get("discounts") or []
        ),
    }
    return CurrentPlan(
        subscription_id=str(subscription["id"]),
        status=str(subscription.get("status")),
        tier=tier.key if tier else None,
        interval=tier_line.price.interval if tier_line else None,
        extra_seats=seat_line.quantity if seat_line else 0,
        tier_line=tier_line,
        seat_line=seat_line,
        other_lines=tuple(others),
        period_start=min(starts) if starts else subscription.get("current_period_start"),
        period_end=max(ends) if ends else subscription.get("current_period_end"),
        schedule_id=schedule_id,
        fingerprint=hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32],
        pending_update_expires_at=(subscription.get("pending_update") or {}).get("expires_at"),
    )


@dataclass(frozen=True)
class Target:
    tier: str
    interval: str
    extra_seats: int

    def lookup_keys(self, catalogue: PlanCatalogue) -> dict[str, int]:
        """The lookup key and quantity of each price the target sells; a metered price's is METERED."""
        tier = catalogue.tier(self.tier)
        if tier is None:
            raise PlanChangeError(f"There is no plan called {self.tier!r}.")
        key = tier.lookup_key_for(self.interval)
        if key is None:
            raise PlanChangeError(f"{tier.name} is not sold {'yearly' if self.interval == 'year' else 'monthly'}.")
        keys = {key: 1}
        if self.extra_seats:
            seat_key = seat_addon_key(catalogue)
            addon = catalogue.addons[seat_key] if seat_key else None
            if addon is None:
                raise PlanChangeError("Extra seats are not sold.")
            if self.extra_seats > addon.max_quantity:
                raise PlanChangeError(f"{addon.name}: choose between 0 and {addon.max_quantity}.")
            addon_key = addon.lookup_key_for(self.interval)
            if addon_key is None:
                raise PlanChangeError(
                    f"{addon.name} are not sold {'yearly' if self.interval == 'year' else 'monthly'}."
                )
            keys[addon_key] = self.extra_seats
        # The metered prices the target carries (no quantity: billed from the meters), on its interval:
        # a change gains them at once (yearly to monthly, or to a tier that bills overage).
        return keys | dict.fromkeys(catalogue.billed_meter_lookup_keys(tier.key, self.interval), METERED)


def validate_target(current: CurrentPlan, target: Target, *, members: int, included_seats: int) -> None:
    if current.status not in ("active", "trialing", "past_due"):
        raise PlanChangeError("Only an active subscription can change plan or seats.")
    if current.pending_update_expires_at is not None:
        raise PlanChangeError(
            "Your last change is waiting for its payment: pay its invoice (the billing page links to it) to "
            "finish it, or wait until the day after it was made, when it lapses, before making another."
        )
    if target.extra_seats < 0:
        raise PlanChangeError("The number of extra seats cannot be negative.")
    if (current.tier, current.interval, current.extra_seats) == (target.tier, target.interval, target.extra_seats):
        raise PlanChangeError("That is the plan you already have.")
    if (
        target.tier == current.tier
        and target.interval == current.interval
        and included_seats + target.extra_seats < members
    ):
        raise PlanChangeError(
            f"Your organization has {counted(members, 'member')}: keep at least "
            f"{counted(max(0, members - included_seats), 'extra seat')}, or remove members first."
        )


def check_against_schedule(kind: str, current: CurrentPlan, when: When) -> None:
    """A plan change waiting for the period's end (a downgrade on a schedule) and a change made now.
    Seats: refused, since changing them at once would withdraw the scheduled change behind the
    owner's back; the owner withdraws it first, or changes seats once it took effect. A plan
    chosen again replaces it, which its preview says (Preview.replaces_scheduled_at)."""
    if current.schedule_id is None or when != When.NOW or kind != "seats":
        return
    on = format_date(current.period_end)
    raise PlanChangeError(
        f"Your plan is set to change at the end of this billing period{on}. Changing seats now would withdraw "
        'that change, so nothing was changed: choose "Keep my current plan" on the billing page first and '
        "then change seats, or change them once the new plan has started."
    )


def format_date(timestamp: int | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime(", on %-d %B %Y")


def new_recurring(target_prices: Mapping[str, PriceInfo], quantities: Mapping[str, int]) -> tuple[int, Decimal]:
    """The target's recurring amount per its interval, and per month (for comparing)."""
    bought = licensed(quantities)
    amount = sum((target_prices[key].unit_amount or 0) * quantity for key, quantity in bought.items())
    monthly = sum((target_prices[key].monthly_equivalent(quantity) for key, quantity in bought.items()), Decimal(0))
    return amount, monthly


def timing(current: CurrentPlan, target: Target, new_monthly: Decimal) -> When:
    """Upgrades (more per month) and seat changes take effect at once; a cheaper plan at the period's end.
    A trial changes at once too: nothing has been paid to prorate."""
    if current.status == "trialing":
        return When.NOW
    if target.tier == current.tier and target.interval == current.interval:
        return When.NOW  # only the seats change
    return When.NOW if new_monthly >= current.monthly_total() else When.PERIOD_END


def update_items(
    current: CurrentPlan,
    target_prices: Mapping[str, PriceInfo],
    quantities: Mapping[str, int],
    catalogue: PlanCatalogue,
) -> list[dict[str, Any]]:
    """Stripe `items` turning the current subscription into the target: the tier's item takes the new
    price (same item, so Stripe prorates it), the seat item its new quantity (deleted at 0, added if
    new); a metered item of another interval than the target's goes, and each metered price the target
    carries that the subscription lacks is added (so a change gains it at once); other items are left
    alone."""
    seat_key = seat_addon_key(catalogue)
    items: list[dict[str, Any]] = []
    for lookup_key, quantity in licensed(quantities).items():
        price = target_prices[lookup_key]
        is_tier = catalogue.tier_for_lookup_key(lookup_key) is not None
        line = current.tier_line if is_tier else current.seat_line
        if line is not None:
            items.append({"id": line.item_id, "price": price.id, "quantity": quantity})
        else:
            items.append({"price": price.id, "quantity": quantity})
    seat_wanted = any(
        (addon := catalogue.addon_for_lookup_key(key)) is not None and addon.key == seat_key for key in quantities
    )
    if current.seat_line is not None and not seat_wanted:
        items.append({"id": current.seat_line.item_id, "deleted": True})
    kept = kept_lines(current, _target_interval(target_prices, catalogue))
    items += [{"id": line.item_id, "deleted": True} for line in current.other_lines if line not in kept]
    return items + [{"price": price_id} for price_id in metered_to_add(kept, target_prices, quantities)]


def metered_to_add(
    kept: list[Line], target_prices: Mapping[str, PriceInfo], quantities: Mapping[str, int]
) -> list[str]:
    """The target's metered prices the subscription does not keep already: not the same price, nor
    (where known) another price on the same meter, which would bill its usage twice."""
    held = {line.price.id for line in kept} | {line.price.meter for line in kept if line.price.meter}
    wanted = [target_prices[key] for key, quantity in quantities.items() if quantity == METERED]
    return [price.id for price in wanted if price.id not in held and price.meter not in held]


METERED = -1  # the "quantity" of a metered price in a target's lookup keys: it takes none


def licensed(quantities: Mapping[str, int]) -> dict[str, int]:
    """The prices bought in a quantity (all but the metered ones)."""
    return {key: quantity for key, quantity in quantities.items() if quantity != METERED}


def kept_lines(current: CurrentPlan, interval: str | None) -> list[Line]:
    """The items a plan change leaves alone: all but the metered ones billed on another interval than
    the target's (Stripe bills all of a classic subscription's items on one interval); the target's
    own metered prices are added beside them (metered_to_add)."""
    return [
        line
        for line in current.other_lines
        if not line.price.metered or interval is None or line.price.interval == interval
    ]


def _target_interval(target_prices: Mapping[str, PriceInfo], catalogue: PlanCatalogue) -> str | None:
    return next((p.interval for k, p in target_prices.items() if catalogue.tier_for_lookup_key(k)), None)


def _phase_item(line: Line) -> dict[str, Any]:
    """A schedule phase's item; a metered price takes no quantity."""
    if line.price.metered:
        return {"price": line.price.id}
    return {"price": line.price.id, "quantity": line.quantity}


def schedule_phases(
    current: CurrentPlan,
    target_prices: Mapping[str, PriceInfo],
    quantities: Mapping[str, int],
    catalogue: PlanCatalogue,
) -> list[dict[str, Any]]:
    """A schedule's phases for a downgrade: this period as it is, then the target from the period's end."""
    if current.period_start is None or current.period_end is None:
        raise PlanChangeError("The subscription's current period is not known; try again in a moment.")
    kept = kept_lines(current, _target_interval(target_prices, catalogue))
    return [
        {
            "items": [_phase_item(line) for line in current.lines()],
            "start_date": current.period_start,
            "end_date": current.period_end,
        },
        {
            # The last phase runs one billing period; then the schedule releases the subscription,
            # which renews on these prices (the target's metered ones without a quantity).
            "items": [{"price": target_prices[k].id, "quantity": q} for k, q in licensed(quantities).items()]
            + [_phase_item(line) for line in kept]
            + [{"price": price_id} for price_id in metered_to_add(kept, target_prices, quantities)],
        },
    ]


@dataclass(frozen=True)
class PreviewLine:
    description: str
    amount: int
    included: bool = False  # tax inside the amounts above (inclusive prices): shown, not added again


@dataclass(frozen=True)
class Preview:
    """What the owner confirms: when it happens, what is charged (or credited) today, and the new
    recurring amount. Carried to the confirm step inside the signed ticket."""

    kind: str  # "plan" or "seats"
    organization_id: int
    subscription_id: str
    base_fingerprint: str
    target: Target
    price_ids: dict[str, str]  # lookup key -> price id the preview used
    quantities: dict[str, int]
    when: When
    proration_date: int
    today: int  # charged (>0) or credited (<0) at once; 0 for a change at the period's end
    currency: str
    new_recurring: int
    new_interval: str
    effective_at: int | None  # the period's end, for a downgrade
    lines: list[PreviewLine] = field(default_factory=list)
    # A downgrade scheduled for this date that a plan change made now replaces (withdraws).
    replaces_scheduled_at: int | None = None
    # A promotion code the owner entered: its id at Stripe, as entered, and its coupon in words. The
    # change applies it in place of the subscription's discounts (promotions.change_discounts).
    promotion_code_id: str | None = None
    promotion_code: str | None = None
    promotion_words: str | None = None

    def to_ticket(self) -> dict[str, Any]:
        data = asdict(self)
        data["when"] = self.when.value
        return data

    @classmethod
    def from_ticket(cls, data: Mapping[str, Any]) -> Preview:
        try:
            return cls(
                kind=str(data["kind"]),
                organization_id=int(data["organization_id"]),
                subscription_id=str(data["subscription_id"]),
                base_fingerprint=str(data["base_fingerprint"]),
                target=Target(**data["target"]),
                price_ids={str(k): str(v) for k, v in data["price_ids"].items()},
                quantities={str(k): int(v) for k, v in data["quantities"].items()},
                when=When(data["when"]),
                proration_date=int(data["proration_date"]),
                today=int(data["today"]),
                currency=str(data["currency"]),
                new_recurring=int(data["new_recurring"]),
                new_interval=str(data["new_interval"]),
                effective_at=int(data["effective_at"]) if data.get("effective_at") is not None else None,
                lines=[PreviewLine(**line) for line in data.get("lines") or []],
                replaces_scheduled_at=(
                    int(data["replaces_scheduled_at"]) if data.get("replaces_scheduled_at") is not None else None
                ),
                promotion_code_id=_text_or_none(data.get("promotion_code_id")),
                promotion_code=_text_or_none(data.get("promotion_code")),
                promotion_words=_text_or_none(data.get("promotion_words")),
            )
        except (KeyError, TypeError, ValueError):
            raise PlanChangeError("That preview is not valid. Start the change again.") from None

    def idempotency_key(self) -> str:
        """Derived from the preview, so every submit of this preview (double clicks, a second tab, a
        retry after a timeout) is the same request at Stripe."""
        digest = hashlib.sha256(json.dumps(self.to_ticket(), sort_keys=True).encode()).hexdigest()[:40]
        return f"org-{self.organization_id}-change-{digest}"

    @property
    def today_words(self) -> str:
        if self.when == When.PERIOD_END or self.today == 0:
            return "Nothing is charged today."
        if self.today > 0:
            added = sum(line.amount for line in self.lines if line.description == "Tax" and not line.included)
            included = sum(line.amount for line in self.lines if line.included)
            taxed = InvoiceTax(added, included, self.currency).words(self.today)
            amount = format_money(self.today, self.currency) + (f" ({taxed})" if taxed else "")
            return f"{amount} is charged today for the rest of this period."
        return f"{format_money(-self.today, self.currency)} is credited to your account for the rest of this period."


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def resolve_target(
    current: CurrentPlan,
    catalogue: PlanCatalogue,
    *,
    held_tier: str,
    tier: str | None,
    interval: str | None,
    extra_seats: int | None,
    members: int,
) -> tuple[Target, dict[str, int]]:
    """What the owner asked for, completed from the current plan and checked (PlanChangeError says
    why not); the quantity to buy of each price, by lookup key."""
    target = Target(
        tier=tier or current.tier or held_tier,
        interval=interval or current.interval or "month",
        extra_seats=current.extra_seats if extra_seats is None else extra_seats,
    )
    included = entitlements_for(catalogue, target.tier, {}, billing_allows_use=True).seats
    validate_target(current, target, members=members, included_seats=included)
    return target, target.lookup_keys(catalogue)


def build_preview(
    kind: str,
    organization_id: int,
    current: CurrentPlan,
    target: Target,
    prices: Mapping[str, PriceInfo],
    quantities: dict[str, int],
    *,
    proration_date: int,
    invoice_preview: Mapping[str, Any] | None,
    promotion: Mapping[str, Any] | None = None,
) -> Preview:
    """The preview the owner confirms: Stripe's invoice preview (None for a period-end change) and the
    prices the change will use."""
    new_amount, new_monthly = new_recurring(prices, quantities)
    when = timing(current, target, new_monthly)
    today, lines = summarize_invoice_preview(invoice_preview) if invoice_preview is not None else (0, [])
    first = prices[next(iter(quantities))]
    return Preview(
        kind=kind,
        organization_id=organization_id,
        subscription_id=current.subscription_id,
        base_fingerprint=current.fingerprint,
        target=target,
        price_ids={key: prices[key].id for key in quantities},
        quantities=quantities,
        when=when,
        proration_date=proration_date,
        today=today,
        currency=first.currency,
        new_recurring=new_amount,
        new_interval=first.interval or target.interval,
        effective_at=current.period_end if when == When.PERIOD_END else None,
        lines=lines,
        replaces_scheduled_at=(current.period_end or 0) if current.schedule_id and when == When.NOW else None,
        promotion_code_id=str(promotion["id"]) if promotion else None,
        promotion_code=str(promotion["code"]) if promotion else None,
        promotion_words=describe_code(promotion) if promotion else None,
    )


def summarize_invoice_preview(invoice: Mapping[str, Any]) -> tuple[int, list[PreviewLine]]:
    """Stripe's preview of the invoice an immediate change makes (proration_behavior=always_invoice):
    its total is what is charged (or, negative, credited) today; its lines say why."""
    lines = [
        PreviewLine(str(line.get("description") or "Adjustment"), int(line.get("amount") or 0))
        for line in (invoice.get("lines") or {}).get("data") or []
    ]
    # A promotion code's discount on the subscription applies to this invoice too: it is shown as a line.
    discount = sum(int(share.get("amount") or 0) for share in invoice.get("total_discount_amounts") or [])
    if discount:
        lines.append(PreviewLine("Discount (promotion code)", -discount))
    # Stripe Tax on the change (reverse charge: none): added on top of exclusive prices; inside
    # inclusive ones, where it is shown for information and not added again (tax.py).
    taxed = InvoiceTax.of(invoice)
    if taxed.added:
        lines.append(PreviewLine("Tax", taxed.added))
    if taxed.included:
        lines.append(PreviewLine("Including tax", taxed.included, included=True))
    total = invoice.get("total")
    if total is None:
        total = invoice.get("amount_due", sum(line.amount for line in lines if not line.included))
    return int(total), lines


def payment_problem(intent: Mapping[str, Any] | None) -> str:
    """Why an upgrade's invoice was not paid, in the owner's words, from its PaymentIntent."""
    if intent is None:
        return "There is no card on file to pay it with."
    if intent.get("status") == "requires_action":
        return "Your bank asks you to confirm this payment (3-D Secure)."
    error = intent.get("last_payment_error") or {}
    message = str(error.get("message") or "The payment did not go through.")
    return message if message.endswith(".") else f"{message}."


def describe_change(current: CurrentPlan, target: Target, catalogue: PlanCatalogue) -> str:
    def words(tier: str | None, interval: str | None, seats: int) -> str:
        name = catalogue.tiers[tier].name if tier and tier in catalogue.tiers else "an unknown plan"
        every = "yearly" if interval == "year" else "monthly"
        extra = f" + {counted(seats, 'extra seat')}" if seats else ""
        return f"{name} ({every}){extra}"

    before = words(current.tier, current.interval, current.extra_seats)
    return f"{before} → {words(target.tier, target.interval, target.extra_seats)}"


TICKET_SALT = "subscription-change-preview"


def preview_ticket(preview: Preview, secret: str) -> str:
    """The preview, signed for the confirm form: the browser carries it, cannot alter it."""
    return URLSafeTimedSerializer(secret, salt=TICKET_SALT).dumps(preview.to_ticket())


def preview_from_ticket(ticket: str, secret: str, *, max_age_seconds: int) -> Preview:
    try:
        data = URLSafeTimedSerializer(secret, salt=TICKET_SALT).loads(ticket, max_age=max_age_seconds)
    except SignatureExpired:
        raise PreviewExpired("This preview has expired.") from None
    except BadSignature:
        raise PlanChangeError("That preview is not valid. Start the change again.") from None
    if not isinstance(data, dict):
        raise PlanChangeError("That preview is not valid. Start the change again.")
    return Preview.from_ticket(data)


class PreviewExpired(PlanChangeError):
    pass
