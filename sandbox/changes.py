"""Changing a subscription: items, prorations, cancellation dates, pausing, previews.

A proration is Stripe's: for each item whose price or quantity changes, a credit for the unused
time of the old price and quantity and a charge for the remaining time of the new one, each
`unit_amount * quantity * (period_end - proration_date) / (period_end - period_start)` rounded
to the cent, by the second. Prorations become pending invoice items that the next invoice
collects (`create_prorations`), or an invoice at once that is charged (`always_invoice`), or
nothing (`none`). A change of billing interval restarts the period now and always invoices at
once (credit for the unused time, the whole new period charged), as Stripe does.

What happens when that invoice cannot be paid depends on `payment_behavior`:
- `allow_incomplete` (the default): the change applies, the invoice stays open and the
  subscription becomes `past_due`.
- `error_if_incomplete`: nothing changes (no invoice either); the call fails with 402 `card_declined`.
- `pending_if_incomplete`: the items stay as they were; the change waits in `pending_update`
  (23 hours) and applies when its invoice is paid (invoicing.paid()). `discounts` may come with
  it (API 2026-05-27.dahlia on): the change's invoice carries them, and unpaid they wait in
  `pending_update.discounts` too.
- `default_incomplete`: the change applies and the invoice is left open for the customer to
  pay (no charge is attempted); the subscription becomes `past_due`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import discounts, invoicing, meters, objects, simtime, tax
from .billing import AUTOMATIC, ENDED, Origin, apply_cancellation_details, emit, load, merge_metadata
from .config import Dunning
from .errors import StripeError, exclusive, inactive_price
from .invoice_items import build_invoice, invoice_item, line_from_invoice_item, pending_invoice_items, recurring_line
from .objects import Obj
from .simtime import DAY
from .store import Store

PRORATION_BEHAVIORS = ("create_prorations", "none", "always_invoice")
PAYMENT_BEHAVIORS = ("allow_incomplete", "error_if_incomplete", "pending_if_incomplete", "default_incomplete")
PAUSE_BEHAVIORS = ("keep_as_draft", "mark_uncollectible", "void")
PENDING_UPDATE_SECONDS = 23 * 3600
UNSET: Any = object()  # "parameter not given", as opposed to "" (cleared)


@dataclass
class ItemChange:
    """One items[i] entry of an update."""

    index: int
    id: str | None = None
    price: str | None = None
    quantity: int | None = None
    deleted: bool = False


@dataclass
class SubscriptionUpdate:
    items: list[ItemChange] | None = None
    proration_behavior: str | None = None
    proration_date: int | None = None
    payment_behavior: str | None = None
    cancel_at: Any = UNSET  # int, None ("" clears) or UNSET
    cancel_at_period_end: bool | None = None
    pause_collection: Any = UNSET  # dict, None ("" clears) or UNSET
    default_payment_method: Any = UNSET  # str, None or UNSET
    metadata: dict[str, str] | None = None
    cancellation_details: dict[str, str] | None = None
    trial_end: int | None = None
    discounts: list[Obj] | None = None  # the discounts the subscription is to have (see discounts.py)
    automatic_tax: bool | None = None  # automatic_tax[enabled]: Stripe Tax on its invoices (sandbox/tax.py)
    given: set[str] = field(default_factory=set)  # the parameters sent, for Stripe's "only X may be sent" rules


def period(subscription: Obj) -> tuple[int, int]:
    items = subscription["items"]["data"]
    return (
        min(item["current_period_start"] for item in items),
        max(item["current_period_end"] for item in items),
    )


def _day(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%-d %b %Y")


# -- items --------------------------------------------------------------------------------------


def _planned_items(store: Store, subscription: Obj, changes: list[ItemChange]) -> list[Obj]:  # noqa: PLR0912
    """The subscription's items after the given changes (new items get fresh ids), validated
    the way Stripe validates them."""
    current = {item["id"]: item for item in subscription["items"]["data"]}
    planned = {item_id: copy.deepcopy(item) for item_id, item in current.items()}
    start, end = period(subscription)
    now = simtime.now()
    for change in changes:
        path = f"items[{change.index}]"
        if change.id is not None and change.id not in current:
            raise StripeError(
                f"Invalid subscription_item: {change.id} does not belong to subscription {subscription['id']}.",
                code="resource_missing",
                param=f"{path}[id]",
            )
        if change.deleted:
            if change.id is None:
                raise StripeError("You must pass an id with deleted=true.", param=f"{path}[deleted]")
            planned.pop(change.id, None)
            continue
        price = None
        if change.price is not None:
            price = load(store, "price", change.price, f"{path}[price]", 400)
            if not price["active"]:
                raise inactive_price(f"{path}[price]")
            if price["type"] != "recurring":
                raise StripeError(
                    "The price specified is set to `type=one_time` but this field only accepts prices"
                    " with `type=recurring`.",
                    param=f"{path}[price]",
                )
        if change.id is None:
            if price is None:
                raise StripeError(
                    "Missing required param: items[][price] (or an existing item id).",
                    code="parameter_missing",
                    param=f"{path}[price]",
                )
            quantity = 1 if change.quantity is None else change.quantity
            added = objects.subscription_item(subscription["id"], price, quantity, (start, end), now)
            planned[added["id"]] = added
            continue
        item = planned[change.id]
        if price is not None:
            item.update(price=price, plan=objects.plan(price))
        if change.quantity is not None and not objects.metered(item["price"]):
            item["quantity"] = change.quantity
    items = list(planned.values())
    if not items:
        raise StripeError(
            "A subscription must have at least one active item. Cancel the subscription instead.",
            param="items",
        )
    seen: set[str] = set()
    for item in items:
        if item["price"]["id"] in seen:
            raise StripeError(
                f"Cannot add multiple subscription items with the same price: {item['price']['id']}",
                param="items",
            )
        seen.add(item["price"]["id"])
    intervals = {(i["price"]["recurring"]["interval"], i["price"]["recurring"]["interval_count"]) for i in items}
    currencies = {i["price"]["currency"] for i in items}
    if len(intervals) > 1 or len(currencies) > 1:
        raise StripeError("Currency and interval fields must match across all plans on a subscription.", param="items")
    return items


def _interval(items: list[Obj]) -> tuple[str, int]:
    """The billing interval of subscription items, as (interval, interval_count)."""
    recurring = items[0]["price"]["recurring"]
    return recurring["interval"], recurring["interval_count"]


def interval_of(subscription: Obj) -> tuple[str, int]:
    return _interval(subscription["items"]["data"])


def add_interval(timestamp: int, interval: str, count: int) -> int:
    if interval == "year":
        return add_months(timestamp, 12 * count)
    if interval == "month":
        return add_months(timestamp, count)
    return timestamp + count * (7 if interval == "week" else 1) * 86400


def add_months(timestamp: int, months: int) -> int:
    for _ in range(months):
        timestamp = objects.add_month(timestamp)
    return timestamp


def _fraction_amount(amount: int, remaining: int, total: int) -> int:
    """amount * remaining / total, rounded half up, for a non-negative amount."""
    return (2 * amount * remaining + total) // (2 * total) if total > 0 else 0


@dataclass
class Plan:
    """What an items change amounts to: the new items, the proration lines, whether the
    period restarts, and the resulting period."""

    items: list[Obj]
    prorations: list[Obj]
    resets_period: bool
    period_start: int
    period_end: int


def plan_items_change(
    store: Store, subscription: Obj, changes: list[ItemChange], proration_date: int, behavior: str
) -> Plan:
    items = _planned_items(store, subscription, changes)
    start, end = period(subscription)
    resets = _interval(items) != interval_of(subscription)
    new_start, new_end = start, end
    if resets:
        new_start = proration_date
        new_end = add_interval(new_start, *_interval(items))
        for item in items:
            item.update(current_period_start=new_start, current_period_end=new_end)
    prorations: list[Obj] = []
    if behavior != "none" and subscription["status"] != "trialing":
        prorations = proration_lines(subscription, items, proration_date, resets)
    return Plan(items, prorations, resets, new_start, new_end)


def proration_lines(subscription: Obj, new_items: list[Obj], proration_date: int, resets: bool) -> list[Obj]:
    """Stripe's proration invoice items (as dicts with amount, description, period, price,
    quantity, item id, proration flag), credits first: a credit for the unused time of each item
    removed or repriced and a charge for the remaining time of each item added or repriced. When
    the period restarts (an interval change) every item is credited and there are no charges:
    the invoice bills the new period whole, in its recurring lines."""
    start, end = period(subscription)
    total = end - start
    remaining = max(0, end - proration_date)
    old = {item["id"]: item for item in subscription["items"]["data"]}
    new = {item["id"]: item for item in new_items}
    credits, debits = [], []

    def changed(before: Obj | None, after: Obj | None) -> bool:
        """An item is prorated when it is added, removed or repriced, or the period restarts."""
        if before is None or after is None or resets:
            return True
        return bool((after["price"]["id"], after["quantity"]) != (before["price"]["id"], before["quantity"]))

    for item_id, before in old.items():
        if changed(before, new.get(item_id)):
            amount = _fraction_amount(before["price"]["unit_amount"] * (before["quantity"] or 0), remaining, total)
            credits.append(
                {
                    "amount": -amount,
                    "description": f"Unused time on {_label(before)} after {_day(proration_date)}",
                    "period": {"start": proration_date, "end": end},
                    "price": before["price"],
                    "quantity": before["quantity"],
                    "subscription_item": item_id,
                    "proration": True,
                }
            )
    for item_id, after in new.items():
        if resets or not changed(old.get(item_id), after):
            continue
        debits.append(
            {
                "amount": _fraction_amount(after["price"]["unit_amount"] * (after["quantity"] or 0), remaining, total),
                "description": f"Remaining time on {_label(after)} after {_day(proration_date)}",
                "period": {"start": proration_date, "end": end},
                "price": after["price"],
                "quantity": after["quantity"],
                "subscription_item": item_id,
                "proration": True,
            }
        )
    return credits + debits


def _label(item: Obj) -> str:
    name = item["price"]["nickname"] or item["price"]["id"]
    return f"{item['quantity']} × {name}" if item["quantity"] != 1 else name


# -- invoices an update creates ------------------------------------------------------------------


def _lines_billed_now(plan: Plan, subscription_id: str, invoice_items: list[Obj], invoice_id: str | None) -> list[Obj]:
    """The lines of the invoice an update creates at once: its invoice items (prorations), then,
    when the period restarts, the whole new period."""
    lines = [line_from_invoice_item(ii, invoice_id) for ii in invoice_items]
    if plan.resets_period:
        start, end = plan.period_start, plan.period_end
        lines += [recurring_line(item, subscription_id, invoice_id, start, end) for item in plan.items]
    return lines


# -- the update itself --------------------------------------------------------------------------------


def _refuse_update(subscription: Obj, req: SubscriptionUpdate) -> None:
    """Stripe's refusals of an update, before anything changes."""
    ended = subscription["status"] in ENDED
    structural = req.given - {"metadata", "cancellation_details"}
    if ended and structural:
        raise StripeError(
            "A canceled subscription can only update its cancellation_details and metadata.",
            param=sorted(structural)[0],
        )
    if req.payment_behavior == "pending_if_incomplete":
        allowed = {"items", "proration_behavior", "proration_date", "payment_behavior", "discounts"}
        extra = req.given - allowed
        if extra:
            raise StripeError(
                "When using payment_behavior=pending_if_incomplete you can only pass the supported"
                f" parameters (items, proration_behavior, proration_date); you passed {sorted(extra)[0]}.",
                param=sorted(extra)[0],
            )
    if subscription.get("pending_update") and req.items is not None:
        raise StripeError(
            "This subscription has a pending update. Pay or void the invoice that carries it, or"
            " wait for it to expire, before changing items again.",
            param="items",
        )


def update_subscription(store: Store, subscription_id: str, req: SubscriptionUpdate, origin: Origin = AUTOMATIC) -> Obj:
    subscription = load(store, "subscription", subscription_id)
    before = copy.deepcopy(subscription)
    now = simtime.now()
    _refuse_update(subscription, req)
    taxed = subscription["automatic_tax"]["enabled"] if req.automatic_tax is None else req.automatic_tax
    if taxed and (req.items is not None or req.automatic_tax):
        kept = [item["price"]["id"] for item in subscription["items"]["data"]]
        tax.require_tax_behavior(store, kept + [c.price for c in req.items or [] if c.price], "items")

    merge_metadata(subscription, req.metadata)
    apply_cancellation_details(subscription, req.cancellation_details)
    _apply_cancellation(subscription, req, now)
    _apply_pause(subscription, req, now)
    if req.trial_end is not None:
        _move_trial_end(subscription, req.trial_end, now)
    discounts_before = list(subscription["discounts"])
    if req.discounts is not None:
        discounts.set_subscription_discounts(store, subscription, req.discounts, now)
    if req.automatic_tax is not None:
        subscription["automatic_tax"].update(enabled=req.automatic_tax, liability={"type": "self"})
    if req.default_payment_method is not UNSET:
        owner = load(store, "customer", subscription["customer"])
        subscription["default_payment_method"] = (
            invoicing.resolve_payment_method(store, req.default_payment_method, owner, "default_payment_method")["id"]
            if req.default_payment_method
            else None
        )

    invoice: Obj | None = None
    if req.items is not None:
        invoice = _apply_items(store, subscription, req, now)
    if req.discounts is not None and (subscription.get("pending_update") or {}).get("expires_at") and invoice:
        # The change waits for its invoice: so do its discounts (that invoice carries them already).
        subscription["pending_update"]["discounts"] = subscription["discounts"]
        subscription["discounts"] = discounts_before

    changes = objects.previous_attributes(before, subscription)
    if changes:
        store.put(subscription)
        emit(store, "customer.subscription.updated", subscription, changes, origin)
    if invoice is not None:
        emit(store, "invoice.created", invoice, origin=origin)
        emit(store, "invoice.finalized", invoice, origin=origin)
        if invoice["status"] == "paid":
            invoicing.paid(store, invoice, origin)
        elif invoice["attempted"]:
            emit(store, invoicing.failure_event(store, invoice), invoice, origin=origin)
    return subscription


def _apply_cancellation(subscription: Obj, req: SubscriptionUpdate, now: int) -> None:
    _, end = period(subscription)
    if req.cancel_at not in (UNSET, None) and req.cancel_at_period_end:
        raise exclusive("cancel_at", "cancel_at_period_end", "cancel_at")
    if req.cancel_at is not UNSET:
        if req.cancel_at is None:
            _clear_cancellation(subscription)
        else:
            if req.cancel_at <= now:
                raise StripeError("cancel_at must be in the future.", param="cancel_at")
            subscription.update(cancel_at=req.cancel_at, cancel_at_period_end=False, canceled_at=now)
            subscription["cancellation_details"]["reason"] = "cancellation_requested"
    if req.cancel_at_period_end is not None:
        if req.cancel_at_period_end:
            if not subscription["cancel_at_period_end"]:
                subscription.update(cancel_at_period_end=True, cancel_at=end, canceled_at=now)
                subscription["cancellation_details"]["reason"] = "cancellation_requested"
        elif req.cancel_at is UNSET or req.cancel_at is None:
            # cancel_at_period_end=false undoes a scheduled cancellation, whichever way it was set.
            _clear_cancellation(subscription)


MAX_TRIAL_SECONDS = 730 * DAY  # Stripe: a trial ends at most two years ahead


def _move_trial_end(subscription: Obj, trial_end: int, now: int) -> None:
    """Move a trialing subscription's trial end: the trial, the current period and the billing cycle
    anchor end at the new time, where the first invoice will be made (Stripe prorates nothing during a
    trial). Starting a trial on a subscription that is not trialing is not simulated."""
    if trial_end <= now:
        raise StripeError("Invalid timestamp: must be in the future.", param="trial_end")
    if trial_end > now + MAX_TRIAL_SECONDS:
        raise StripeError("Invalid timestamp: can be no more than 730 days in the future.", param="trial_end")
    if subscription["status"] != "trialing":
        raise StripeError(
            "The sandbox moves trial_end only on a trialing subscription (starting a new trial is not simulated).",
            param="trial_end",
        )
    subscription.update(trial_end=trial_end, billing_cycle_anchor=trial_end)
    for item in subscription["items"]["data"]:
        item["current_period_end"] = trial_end
    if subscription.get("cancel_at_period_end"):
        subscription["cancel_at"] = trial_end


def _clear_cancellation(subscription: Obj) -> None:
    subscription.update(cancel_at=None, cancel_at_period_end=False, canceled_at=None)
    subscription["cancellation_details"]["reason"] = None


def _apply_pause(subscription: Obj, req: SubscriptionUpdate, now: int) -> None:
    if req.pause_collection is UNSET:
        return
    if not req.pause_collection:
        subscription["pause_collection"] = None
        return
    behavior = req.pause_collection.get("behavior")
    if behavior not in PAUSE_BEHAVIORS:
        raise StripeError(
            f"Invalid pause_collection[behavior]: must be one of {', '.join(PAUSE_BEHAVIORS)}",
            param="pause_collection[behavior]",
        )
    resumes_at = req.pause_collection.get("resumes_at")
    if resumes_at is not None and resumes_at <= now:
        raise StripeError("pause_collection[resumes_at] must be in the future.", param="pause_collection[resumes_at]")
    subscription["pause_collection"] = {"behavior": behavior, "resumes_at": resumes_at}


def _apply_items(store: Store, subscription: Obj, req: SubscriptionUpdate, now: int) -> Obj | None:  # noqa: PLR0912
    assert req.items is not None
    behavior = req.proration_behavior or "create_prorations"
    start, end = period(subscription)
    proration_date = req.proration_date if req.proration_date is not None else now
    if not start <= proration_date <= end:
        raise StripeError(
            f"proration_date must be within the subscription's current billing period ({start} to {end}).",
            param="proration_date",
        )
    plan = plan_items_change(store, subscription, req.items, proration_date, behavior)
    customer = load(store, "customer", subscription["customer"])
    new_items = objects.list_object(plan.items, subscription["items"]["url"])
    invoice_now = behavior == "always_invoice" or plan.resets_period
    payment_behavior = req.payment_behavior or "allow_incomplete"

    pending_items = [invoice_item(customer, subscription, line, now) for line in plan.prorations]
    if not invoice_now:
        for ii in pending_items:
            store.put(ii)
        subscription["items"] = new_items
        return None

    # Invoice now: the prorations plus anything already pending for this subscription.
    waiting = pending_invoice_items(store, subscription["id"])
    collected = [*waiting, *pending_items]
    if not collected and not plan.resets_period:
        subscription["items"] = new_items  # nothing to bill (say, the same quantity again)
        return None
    invoice_id = objects.new_id("in_")
    for ii in collected:
        ii["invoice"] = invoice_id
    lines = _lines_billed_now(plan, subscription["id"], collected, invoice_id)
    invoice = build_invoice(customer, subscription, lines, "subscription_update", now, invoice_id, store=store)
    invoice["parent"]["subscription_details"]["subscription_proration_date"] = proration_date
    customer["next_invoice_sequence"] += 1
    store.put(customer)

    if payment_behavior == "default_incomplete" and invoice["amount_due"] > 0:
        paid = False
    else:
        # The charge uses the payment method as it stands after this update.
        paid = invoicing.charge(store, invoice, invoicing.default_payment_method(store, subscription, customer))
    if not paid and payment_behavior == "error_if_incomplete":
        # The transaction is rolled back: no invoice, no items change.
        raise StripeError(
            invoicing.DECLINED,
            status=402,
            type="card_error",
            code="card_declined",
            param="",
        )
    for ii in collected:
        store.put(ii)
    store.put(invoice)  # stored again below if a failed charge schedules its retry
    subscription["latest_invoice"] = invoice["id"]
    if not paid and payment_behavior == "pending_if_incomplete":
        subscription["pending_update"] = {
            "billing_cycle_anchor": plan.period_start if plan.resets_period else None,
            "expires_at": now + PENDING_UPDATE_SECONDS,
            "subscription_items": plan.items,
            "discount": None,
            "discounts": None,
            "trial_end": None,
            "trial_from_plan": None,
        }
        subscription["_pending_invoice"] = invoice["id"]
        return invoice
    subscription["items"] = new_items
    if plan.resets_period:
        subscription["billing_cycle_anchor"] = plan.period_start
    if not paid:
        if payment_behavior != "default_incomplete":
            # Smart retries follow, as for a failed renewal (the test clock engine runs them).
            invoice["_first_failed_at"] = now
            invoice["next_payment_attempt"] = now + clock_retry_delay()
            store.put(invoice)
        if subscription["status"] in ("active", "trialing"):
            subscription["status"] = "past_due"
    return invoice


def clock_retry_delay() -> int:
    """When a failed update invoice is first retried: the first smart-retry day."""
    retry_days = Dunning.from_env().retry_days
    return retry_days[0] * DAY if retry_days else DAY


def next_period_end(subscription: Obj, start: int) -> int:
    """Where a period starting at `start` ends, by the subscription's billing interval."""
    return add_interval(start, *interval_of(subscription))


# -- the upcoming invoice --------------------------------------------------------------------------------


def preview_invoice(
    store: Store,
    *,
    customer_id: str | None,
    subscription_id: str | None,
    items: list[ItemChange] | None,
    proration_date: int | None,
    proration_behavior: str | None,
    cancel_at_period_end: bool | None,
    renewal: list[ItemChange] | None = None,
    discount_entries: list[Obj] | None = None,
) -> Obj:
    """The invoice Stripe would create next for a subscription, with the given change applied:
    with always_invoice, the invoice the change itself creates; otherwise the next renewal,
    carrying the pending and new prorations. `renewal` (a schedule's next phase) changes the items
    the renewal bills. It has no id, as on Stripe."""
    if subscription_id is None:
        raise StripeError(
            "The sandbox previews invoices for an existing subscription: pass subscription.",
            code="parameter_missing",
            param="subscription",
        )
    subscription = load(store, "subscription", subscription_id, "subscription", 400)
    if customer_id is not None and customer_id != subscription["customer"]:
        raise StripeError(
            f"The subscription {subscription_id} does not belong to the customer {customer_id}.",
            param="customer",
        )
    if subscription["status"] in ENDED:
        raise StripeError(
            "No upcoming invoices for customer: the subscription has ended.",
            code="invoice_upcoming_none",
        )
    customer = load(store, "customer", subscription["customer"], "customer", 400)
    now = simtime.now()
    behavior = proration_behavior or "create_prorations"
    start, end = period(subscription)
    when = proration_date if proration_date is not None else now
    if not start <= when <= end:
        raise StripeError(
            "proration_date must be within the subscription's current billing period.",
            param="subscription_details[proration_date]",
        )
    plan = plan_items_change(store, subscription, items or [], when, behavior)
    new_prorations = [invoice_item(customer, subscription, line, now) for line in plan.prorations]
    waiting = pending_invoice_items(store, subscription["id"])
    previewed: list[str] = []
    if discount_entries is not None:
        # `discounts` replace the subscription's for this preview: made for it and gone after it.
        bought = sum((i["price"]["unit_amount"] or 0) * (i.get("quantity") or 0) for i in plan.items)
        previewed = discounts.preview_discounts(store, subscription, customer, discount_entries, (bought, now))
        subscription = {**subscription, "discounts": previewed}

    if behavior == "always_invoice" or plan.resets_period:
        lines = _lines_billed_now(plan, subscription["id"], [*waiting, *new_prorations], None)
        reason, created = "subscription_update", now
        next_attempt = now
    else:
        will_cancel = subscription["cancel_at_period_end"] if cancel_at_period_end is None else cancel_at_period_end
        cancel_at = subscription["cancel_at"]
        if will_cancel or (cancel_at is not None and cancel_at <= end and cancel_at_period_end is not False):
            raise StripeError(
                "No upcoming invoices for customer: the subscription is set to cancel at the end of the period.",
                code="invoice_upcoming_none",
            )
        renewed = _planned_items(store, subscription, renewal) if renewal else plan.items
        next_end = add_interval(end, *_interval(renewed))
        lines = [line_from_invoice_item(ii, None) for ii in [*waiting, *new_prorations]]
        # A metered item bills this period's usage so far (meters.with_usage), the others the next period.
        renewed = meters.with_usage(store, {**subscription, "items": {"data": renewed}}, (start, end))["items"]["data"]
        lines += [
            recurring_line(
                i, subscription["id"], None, *((start, end) if objects.metered(i["price"]) else (end, next_end))
            )
            for i in renewed
        ]
        reason, created = "upcoming", end
        next_attempt = end + 3600
    invoice = build_invoice(customer, subscription, lines, reason, created, store=store, preview=True)
    if reason == "upcoming":
        # A renewal invoice's period is the one that is ending (its lines bill the next one).
        invoice.update(period_start=start, period_end=end)
    # A preview's id is its own, prefixed upcoming_in (it cannot be retrieved or paid).
    invoice["id"] = "upcoming_" + invoice["id"]
    for line in invoice["lines"]["data"]:
        line["invoice"] = invoice["id"]
    invoice["lines"]["url"] = f"/v1/invoices/{invoice['id']}/lines"
    invoice.update(
        number=None,
        status="draft",
        status_transitions={"finalized_at": None, "marked_uncollectible_at": None, "paid_at": None, "voided_at": None},
        effective_at=None,
        hosted_invoice_url=None,
        invoice_pdf=None,
        next_payment_attempt=next_attempt if invoice["amount_due"] > 0 else None,
        created=created,
    )
    if proration_date is not None or items:
        invoice["parent"]["subscription_details"]["subscription_proration_date"] = when
    for discount_id in previewed:
        store.delete(discount_id)
    return invoice
