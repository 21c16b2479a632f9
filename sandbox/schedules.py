"""Subscription schedules: enough for "change the plan when the period ends".

A schedule made `from_subscription` has one phase, the subscription's items over its current
period. Updating it replaces the phases (contiguous: each starts where the previous ends). When
a phase's start is reached, apply_due_phases() gives the subscription that phase's items
without prorations (a phase boundary at the period's end has nothing to prorate); after the
last phase the schedule is released (the subscription carries on as it is) or cancels the
subscription, per `end_behavior`. Whatever advances time calls apply_due_phases(now) before it
renews; the worker also runs it at each phase boundary in wall-clock time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from . import billing, changes, objects, simtime
from .billing import AUTOMATIC, ENDED, Origin, emit, load, merge_metadata
from .errors import StripeError, inactive_price
from .objects import Obj
from .store import Store

JOB_KIND = "subscription_schedule_phase"
END_BEHAVIORS = ("release", "cancel")


@dataclass(frozen=True)
class PhaseInput:
    items: list[tuple[str, int]]  # (price id, quantity)
    start_date: int | str | None  # a timestamp, "now", or None (where the previous one ends)
    end_date: int | None


def _phase(items: list[tuple[Obj, int]], start: int, end: int, currency: str) -> Obj:
    return {
        "add_invoice_items": [],
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": None,
        "billing_thresholds": None,
        "collection_method": None,
        "currency": currency,
        "default_payment_method": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "end_date": end,
        "invoice_settings": None,
        "items": [
            {
                "billing_thresholds": None,
                "discounts": [],
                "metadata": {},
                "plan": price["id"],
                "price": price["id"],
                "quantity": quantity,
                "tax_rates": [],
            }
            for price, quantity in items
        ],
        "metadata": {},
        "on_behalf_of": None,
        "proration_behavior": "create_prorations",
        "start_date": start,
        "transfer_data": None,
        "trial_end": None,
    }


def _current_phase(phase: Obj) -> Obj:
    return {"start_date": phase["start_date"], "end_date": phase["end_date"]}


def _schedule(subscription: Obj, phases: list[Obj], now: int) -> Obj:
    return {
        "id": objects.new_id("sub_sched_"),
        "object": "subscription_schedule",
        "application": None,
        "billing_mode": {"flexible": None, "type": "classic", "updated_at": None},
        "canceled_at": None,
        "completed_at": None,
        "created": now,
        "current_phase": _current_phase(phases[0]),
        "customer": subscription["customer"],
        "customer_account": None,
        "default_settings": {
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": "automatic",
            "billing_thresholds": None,
            "collection_method": "charge_automatically",
            "default_payment_method": None,
            "description": None,
            "invoice_settings": {
                "account_tax_ids": None,
                "custom_fields": None,
                "days_until_due": None,
                "description": None,
                "footer": None,
                "issuer": {"type": "self"},
            },
            "on_behalf_of": None,
            "transfer_data": None,
        },
        "end_behavior": "release",
        "livemode": False,
        "metadata": {},
        "phases": phases,
        "released_at": None,
        "released_subscription": None,
        "status": "active",
        "subscription": subscription["id"],
        "test_clock": subscription.get("test_clock"),
        "_phase_index": 0,
    }


def create_from_subscription(store: Store, subscription_id: str, origin: Origin = AUTOMATIC) -> Obj:
    subscription = load(store, "subscription", subscription_id, "from_subscription", 400)
    if subscription["status"] in ENDED:
        raise StripeError(
            "You cannot create a subscription schedule from a canceled subscription.", param="from_subscription"
        )
    if subscription["schedule"]:
        raise StripeError(
            f"You cannot migrate a subscription that is already attached to a schedule: `{subscription['schedule']}`.",
            param="from_subscription",
        )
    now = simtime.now()
    start, end = changes.period(subscription)
    items = [(item["price"], item["quantity"]) for item in subscription["items"]["data"]]
    schedule = _schedule(subscription, [_phase(items, start, end, subscription["currency"])], now)
    before = copy.deepcopy(subscription)
    subscription["schedule"] = schedule["id"]
    store.put(schedule)
    store.put(subscription)
    emit(store, "subscription_schedule.created", schedule, origin=origin)
    emit(
        store, "customer.subscription.updated", subscription, objects.previous_attributes(before, subscription), origin
    )
    return schedule


def _editable(store: Store, schedule_id: str) -> Obj:
    schedule = load(store, "subscription_schedule", schedule_id, "schedule")
    if schedule["status"] not in ("active", "not_started"):
        raise StripeError(
            f"You cannot update a subscription schedule that is currently in the `{schedule['status']}` status."
            " It must be in one of the following statuses: `not_started`, `active`."
        )
    return schedule


def update_schedule(
    store: Store,
    schedule_id: str,
    *,
    phases: list[PhaseInput] | None,
    end_behavior: str | None,
    metadata: dict[str, str] | None,
    origin: Origin = AUTOMATIC,
) -> Obj:
    schedule = _editable(store, schedule_id)
    before = copy.deepcopy(schedule)
    now = simtime.now()
    if end_behavior is not None:
        schedule["end_behavior"] = end_behavior
    merge_metadata(schedule, metadata)
    if phases is not None:
        schedule["phases"] = _build_phases(store, schedule, phases, now)
        schedule["_phase_index"] = 0
        schedule["current_phase"] = _current_phase(schedule["phases"][0])
        for phase in schedule["phases"][1:]:
            store.add_job(JOB_KIND, schedule["id"], phase["start_date"])
        store.add_job(JOB_KIND, schedule["id"], schedule["phases"][-1]["end_date"])
    changed = objects.previous_attributes(before, schedule)
    if changed:
        store.put(schedule)
        emit(store, "subscription_schedule.updated", schedule, changed, origin)
    return schedule


def _build_phases(store: Store, schedule: Obj, inputs: list[PhaseInput], now: int) -> list[Obj]:  # noqa: PLR0912
    if not inputs:
        raise StripeError("You must pass at least one phase.", param="phases")
    current = schedule["phases"][schedule["_phase_index"]]
    built: list[Obj] = []
    previous_end: int | None = None
    for index, phase in enumerate(inputs):
        path = f"phases[{index}]"
        if not phase.items:
            raise StripeError(
                f"Missing required param: {path}[items].", code="parameter_missing", param=f"{path}[items]"
            )
        prices = []
        for j, (price_id, quantity) in enumerate(phase.items):
            price = load(store, "price", price_id, f"{path}[items][{j}][price]", 400)
            if not price["active"]:
                raise inactive_price(f"{path}[items][{j}][price]")
            prices.append((price, quantity))
        intervals = {(p["recurring"]["interval"], p["recurring"]["interval_count"]) for p, _ in prices}
        if len(intervals) > 1:
            raise StripeError(
                "Currency and interval fields must match across all plans on a subscription.",
                param=f"{path}[items]",
            )
        if index == 0:
            start = now if phase.start_date == "now" else phase.start_date
            if start is None:
                start = current["start_date"]
            if start != current["start_date"]:
                raise StripeError(
                    "You can not modify the start date of the current phase.", param=f"{path}[start_date]"
                )
        else:
            start = previous_end if phase.start_date is None else phase.start_date
            if start != previous_end:
                raise StripeError(
                    "Phases must be contiguous: each phase starts where the previous one ends.",
                    param=f"{path}[start_date]",
                )
        assert isinstance(start, int)
        end = phase.end_date
        if end is None:
            if index < len(inputs) - 1:
                raise StripeError(
                    f"Missing required param: {path}[end_date] (only the last phase may omit it).",
                    code="parameter_missing",
                    param=f"{path}[end_date]",
                )
            end = changes.add_interval(start, *next(iter(intervals)))
        if end <= start:
            raise StripeError("The phase's end_date must be after its start_date.", param=f"{path}[end_date]")
        if end <= now:
            raise StripeError("A phase cannot end in the past.", param=f"{path}[end_date]")
        built.append(_phase(prices, start, end, prices[0][0]["currency"]))
        previous_end = end
    return built


def release(store: Store, schedule_id: str, origin: Origin = AUTOMATIC) -> Obj:
    schedule = _editable(store, schedule_id)
    _finish(store, schedule, "released", origin)
    return schedule


def cancel(store: Store, schedule_id: str, origin: Origin = AUTOMATIC) -> Obj:
    """Cancel the schedule and, as Stripe does, the subscription it manages."""
    schedule = _editable(store, schedule_id)
    subscription = store.get(schedule["subscription"] or "")
    _finish(store, schedule, "canceled", origin)
    if subscription is not None and subscription["status"] not in ENDED:
        billing.cancel_subscription(store, subscription["id"], origin=origin)
    return schedule


def _finish(store: Store, schedule: Obj, status: str, origin: Origin) -> None:
    now = simtime.now()
    subscription_id = schedule["subscription"]
    schedule.update(status=status, current_phase=None)
    if status == "released":
        schedule.update(released_at=now, released_subscription=subscription_id, subscription=None)
    elif status == "canceled":
        schedule["canceled_at"] = now
    else:
        schedule["completed_at"] = now
    store.put(schedule)
    emit(store, f"subscription_schedule.{status}", schedule, origin=origin)
    subscription = store.get(subscription_id or "")
    if subscription is not None and subscription["schedule"] == schedule["id"]:
        before = copy.deepcopy(subscription)
        subscription["schedule"] = None
        store.put(subscription)
        if status != "canceled":  # a canceled schedule cancels its subscription, whose event follows
            emit(
                store, "customer.subscription.updated", subscription, objects.previous_attributes(before, subscription)
            )


def apply_due_phases(store: Store, now: int, subscription_id: str | None = None, only: str | None = None) -> list[str]:
    """Bring every active schedule (or the one of `subscription_id`, or the schedule `only`) up
    to `now`: start the phase that is due (changing the subscription's items) and end schedules
    whose last phase is over. Returns the ids of the schedules that changed. Idempotent for the
    same `now`. Schedules of test-clock customers move only with their clock: the wall-clock
    job (neither argument given) leaves them alone."""
    changed = []
    for schedule in store.all("subscription_schedule"):
        if schedule["status"] != "active" or (only is not None and schedule["id"] != only):
            continue
        if subscription_id is not None and schedule["subscription"] != subscription_id:
            continue
        subscription = store.get(schedule["subscription"] or "")
        if subscription is None or subscription["status"] in ENDED:
            continue
        if only is None and subscription_id is None and subscription.get("test_clock"):
            continue
        phases = schedule["phases"]
        if now >= phases[-1]["end_date"]:
            if schedule["end_behavior"] == "cancel":
                _finish(store, schedule, "completed", AUTOMATIC)
                billing.cancel_subscription(store, subscription["id"])
            else:
                _finish(store, schedule, "released", AUTOMATIC)
            changed.append(schedule["id"])
            continue
        due = max(i for i, phase in enumerate(phases) if phase["start_date"] <= now)
        if due == schedule["_phase_index"]:
            continue
        _apply_phase(store, subscription, phases[due], now)
        before = copy.deepcopy(schedule)
        schedule["_phase_index"] = due
        schedule["current_phase"] = _current_phase(phases[due])
        store.put(schedule)
        emit(store, "subscription_schedule.updated", schedule, objects.previous_attributes(before, schedule))
        changed.append(schedule["id"])
    return changed


def phase_item_changes(subscription: Obj, phase: Obj) -> list[changes.ItemChange]:
    """The item changes that give the subscription a phase's items (additions first, so the
    subscription is never momentarily empty)."""
    by_price = {item["price"]["id"]: item for item in subscription["items"]["data"]}
    wanted = {item["price"]: item["quantity"] for item in phase["items"]}
    updates = [
        changes.ItemChange(index=i, id=item["id"], deleted=True)
        for i, item in enumerate(subscription["items"]["data"])
        if item["price"]["id"] not in wanted
    ]
    for price_id, quantity in wanted.items():
        index = len(updates)
        if price_id in by_price:
            updates.append(changes.ItemChange(index=index, id=by_price[price_id]["id"], quantity=quantity))
        else:
            updates.append(changes.ItemChange(index=index, price=price_id, quantity=quantity))
    updates.sort(key=lambda change: change.deleted)
    return updates


def _apply_phase(store: Store, subscription: Obj, phase: Obj, now: int) -> None:
    updates = phase_item_changes(subscription, phase)
    start, end = changes.period(subscription)
    changes.update_subscription(
        store,
        subscription["id"],
        changes.SubscriptionUpdate(
            items=updates,
            proration_behavior="none",
            proration_date=max(start, min(now, end)),
            given={"items", "proration_behavior", "proration_date"},
        ),
    )


def preview_invoice(
    store: Store,
    schedule_id: str,
    *,
    customer_id: str | None,
    phases: list[PhaseInput] | None,
    end_behavior: str | None,
) -> Obj:
    """`POST /v1/invoices/create_preview` with `schedule` (and `schedule_details`): the next invoice of
    the schedule's subscription, its renewal billing the items of the phase in effect when the current
    period ends (the schedule's phases, or those given, as an update would build them). A schedule that
    cancels its subscription at that moment has no upcoming invoice."""
    schedule = load(store, "subscription_schedule", schedule_id, "schedule", 400)
    if schedule["status"] not in ("active", "not_started") or not schedule["subscription"]:
        raise StripeError(
            f"No upcoming invoices for the subscription schedule {schedule_id}: it is {schedule['status']}.",
            code="invoice_upcoming_none",
        )
    subscription = load(store, "subscription", schedule["subscription"], "schedule", 400)
    built = _build_phases(store, schedule, phases, simtime.now()) if phases is not None else schedule["phases"]
    _, end = changes.period(subscription)
    if end >= built[-1]["end_date"] and (end_behavior or schedule["end_behavior"]) == "cancel":
        raise StripeError(
            "No upcoming invoices for customer: the subscription schedule cancels the subscription.",
            code="invoice_upcoming_none",
        )
    in_effect = next((phase for phase in built if phase["start_date"] <= end < phase["end_date"]), None)
    return changes.preview_invoice(
        store,
        customer_id=customer_id,
        subscription_id=subscription["id"],
        items=None,
        proration_date=None,
        proration_behavior=None,
        cancel_at_period_end=None,
        renewal=phase_item_changes(subscription, in_effect) if in_effect is not None else None,
    )


def run_job(store: Store, ref: str, now: int) -> None:
    """The worker's job at a phase boundary. A subscription on a test clock lives at the
    clock's time, so its phases wait for the clock to be advanced."""
    schedule = store.get(ref)
    if schedule is None or schedule["status"] != "active":
        return
    clock_time = simtime.clock_time_of(store, schedule["customer"])
    at = now if clock_time is None else clock_time
    with simtime.frozen_at(at):
        apply_due_phases(store, at, subscription_id=schedule["subscription"])


billing.JOB_HANDLERS[JOB_KIND] = run_job
