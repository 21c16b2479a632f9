"""Test clocks, and the engine that moves their customers' subscriptions through time.

A clock has a frozen time; its customers' objects live at that time (see simtime). Advancing a
clock answers at once with status "advancing" and queues a job; the worker then replays, in
order and each at its own simulated timestamp, everything that falls due up to the target time:
trial reminders and trial ends, renewals (a draft invoice, finalized an hour later and charged),
smart retries of failed payments with their final action, and scheduled cancellations. Then the
clock is "ready" and test_helpers.test_clock.ready is the last event. The whole replay runs in
one transaction, so months of simulated time take milliseconds.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from . import billing, changes, invoice_items, invoicing, lists, objects, schedules, simtime, tax
from .config import Dunning
from .errors import StripeError
from .objects import Obj
from .simtime import DAY
from .store import Store

TRIAL_WILL_END_NOTICE = 3 * DAY  # customer.subscription.trial_will_end: three days before
FINALIZE_AFTER = 3600  # a renewal invoice stays a draft for an hour, as on Stripe
MISSING_PAYMENT_METHOD = ("cancel", "pause", "create_invoice")
MAX_STEPS = 10_000  # a guard against a bug looping forever inside one transaction


# -- the clock API ------------------------------------------------------------------------------


def create(store: Store, frozen_time: int, name: str | None, origin: billing.Origin) -> Obj:
    now = int(time.time())
    clock = {
        "id": objects.new_id("clock_"),
        "object": "test_helpers.test_clock",
        "created": now,
        "deletes_after": now + 30 * DAY,
        "frozen_time": frozen_time,
        "livemode": False,
        "name": name,
        "status": "ready",
        "status_details": {"advancing": None},
    }
    store.put(clock)
    with simtime.frozen_at(frozen_time):
        billing.emit(store, "test_helpers.test_clock.created", clock, origin=origin)
    return clock


def load(store: Store, clock_id: str, param: str = "test_clock", status: int = 404) -> Obj:
    clock = billing.load(store, "test_helpers.test_clock", clock_id, param, status)
    if clock["status"] == "advancing" and not any(
        job["ref"] == clock_id for job in store.due_jobs(float("inf")) if job["kind"] == "advance_test_clock"
    ):
        # The advance job failed (and was dropped by the worker, its work rolled back).
        clock.update(status="internal_failure", status_details={"advancing": None})
        store.put(clock)
        billing.emit(store, "test_helpers.test_clock.internal_failure", clock)
    return clock


def list_clocks(store: Store, page: lists.Page) -> Obj:
    clocks = list(reversed(store.all("test_helpers.test_clock")))
    return lists.paginate(clocks, "/v1/test_helpers/test_clocks", page, "test_helpers.test_clock")


def delete(store: Store, clock_id: str, origin: billing.Origin) -> Obj:
    """Delete the clock and, as Stripe does, its customers and everything they own. Live
    subscriptions end first (customer.subscription.deleted), then customer.deleted."""
    clock = load(store, clock_id)
    with simtime.frozen_at(clock["frozen_time"]):
        for customer in _customers(store, clock_id):
            owned = [
                obj
                for kind in ("subscription", "invoice", "payment_method", "payment_intent", "charge")
                for obj in store.all_where(kind, "customer", [customer["id"]])
            ]
            for obj in owned:
                if obj["object"] == "subscription" and obj["status"] not in billing.ENDED:
                    obj.update(status="canceled", canceled_at=simtime.now(), ended_at=simtime.now())
                    billing.emit(store, "customer.subscription.deleted", obj, origin=origin)
                store.delete(obj["id"])
            store.delete(customer["id"])
            billing.emit(store, "customer.deleted", customer, origin=origin)
    store.delete(clock_id)
    return {"id": clock_id, "object": "test_helpers.test_clock", "deleted": True}


def advance(store: Store, clock_id: str, frozen_time: int, origin: billing.Origin) -> Obj:
    """Start moving the clock to frozen_time; the worker does the work (run_advance)."""
    clock = load(store, clock_id)
    if clock["status"] == "internal_failure":
        raise StripeError(f"The test clock {clock_id} failed to advance; delete it and start again.")
    if clock["status"] != "ready":
        raise StripeError(f"The test clock {clock_id} is currently advancing; wait until its status is ready.")
    if frozen_time <= clock["frozen_time"]:
        raise StripeError(
            f"The frozen_time must be after the test clock's current frozen_time ({clock['frozen_time']}).",
            param="frozen_time",
        )
    limit, why = _advance_limit(store, clock)
    if frozen_time > limit:
        raise StripeError(
            f"Cannot advance the test clock to {frozen_time}: it can move at most {why} ahead of"
            f" its current frozen_time, that is to {limit} or earlier.",
            param="frozen_time",
        )
    clock.update(status="advancing", status_details={"advancing": {"target_frozen_time": frozen_time}})
    store.put(clock)
    with simtime.frozen_at(clock["frozen_time"]):
        billing.emit(store, "test_helpers.test_clock.advancing", clock, origin=origin)
    store.add_job("advance_test_clock", clock_id, time.time())
    return clock


def _advance_limit(store: Store, clock: Obj) -> tuple[int, str]:
    """Stripe's rule: no more than two intervals of the shortest subscription on the clock, or
    two years if it has no live subscription."""
    frozen = clock["frozen_time"]
    limits = [
        (changes.add_interval(frozen, interval, 2 * count), f"two billing intervals (2 × {count} {interval})")
        for sub in _subscriptions(store, clock["id"])
        if sub["status"] not in billing.ENDED and sub["items"]["data"]
        for interval, count in [changes.interval_of(sub)]
    ]
    return min(limits) if limits else (changes.add_months(frozen, 24), "two years (it has no subscriptions)")


def _customers(store: Store, clock_id: str) -> list[Obj]:
    return store.all_where("customer", "test_clock", [clock_id])


def _subscriptions(store: Store, clock_id: str) -> list[Obj]:
    return store.all_where("subscription", "customer", [c["id"] for c in _customers(store, clock_id)])


# -- the advance engine -------------------------------------------------------------------------


Step = tuple[int, int, str, str]  # (when, priority at equal times, action, object id)


def run_advance(store: Store, clock_id: str) -> None:
    """The worker's job: replay every step due up to the target, then mark the clock ready."""
    clock = store.get(clock_id)
    if clock is None or clock["status"] != "advancing":
        return
    target = clock["status_details"]["advancing"]["target_frozen_time"]
    dunning = Dunning.from_env()
    for _ in range(MAX_STEPS):
        step = _next_step(store, clock_id, target)
        if step is None:
            break
        when, _, action, object_id = step
        clock["frozen_time"] = when  # so anything asking the clock's time sees the step's time
        store.put(clock)
        with simtime.frozen_at(when):
            ACTIONS[action](store, object_id, dunning)
    else:
        raise RuntimeError(f"advancing {clock_id} did not settle after {MAX_STEPS} steps")
    clock.update(frozen_time=target, status="ready", status_details={"advancing": None})
    store.put(clock)
    with simtime.frozen_at(target):
        tax.settle_pending_on_clock(store, [c["id"] for c in _customers(store, clock_id)])
        billing.emit(store, "test_helpers.test_clock.ready", clock)


def _next_step(store: Store, clock_id: str, target: int) -> Step | None:
    steps: list[Step] = []
    customers = [c["id"] for c in _customers(store, clock_id)]
    for sub in store.all_where("subscription", "customer", customers):
        if sub["status"] in billing.ENDED:
            continue
        if sub["cancel_at"] is not None:
            steps.append((sub["cancel_at"], 0, "cancel", sub["id"]))
        if sub["status"] == "trialing":
            reminder = sub["trial_end"] - TRIAL_WILL_END_NOTICE
            if not sub.get("_trial_will_end_sent") and reminder >= sub["created"]:
                steps.append((reminder, 1, "trial_will_end", sub["id"]))
            steps.append((sub["trial_end"], 2, "trial_end", sub["id"]))
        elif sub["status"] in ("active", "past_due", "unpaid"):
            steps.append((_period_end(sub), 3, "renew", sub["id"]))
    for schedule in store.all_where("subscription_schedule", "customer", customers):
        subscription = store.get(schedule["subscription"] or "")
        if schedule["status"] == "active" and subscription and subscription["status"] not in billing.ENDED:
            phases, index = schedule["phases"], schedule["_phase_index"]
            boundary = phases[index + 1]["start_date"] if index + 1 < len(phases) else phases[-1]["end_date"]
            steps.append((boundary, 0, "schedule", schedule["id"]))
    for invoice in store.all_where("invoice", "customer", customers):
        if invoice["status"] == "draft" and invoice.get("automatically_finalizes_at"):
            steps.append((invoice["automatically_finalizes_at"], 4, "finalize", invoice["id"]))
        elif invoice["status"] == "open" and invoice.get("next_payment_attempt"):
            steps.append((invoice["next_payment_attempt"], 5, "retry", invoice["id"]))
    due = [step for step in steps if step[0] <= target]
    return min(due) if due else None


def _period_end(sub: Obj) -> int:
    return changes.period(sub)[1]


def _start_period(sub: Obj, start: int) -> None:
    """Move every item to a new billing period beginning at `start`."""
    end = changes.next_period_end(sub, start)
    for item in sub["items"]["data"]:
        item.update(current_period_start=start, current_period_end=end)


def _updated(store: Store, sub: Obj, before: Obj) -> None:
    changes = objects.previous_attributes(before, sub)
    if changes:
        store.put(sub)
        billing.emit(store, "customer.subscription.updated", sub, changes)


def _end(store: Store, sub: Obj, reason: str | None) -> None:
    now = simtime.now()
    sub.update(status="canceled", ended_at=now, canceled_at=sub["canceled_at"] or now)
    if sub["cancellation_details"]["reason"] is None:
        sub["cancellation_details"]["reason"] = reason
    store.put(sub)
    billing.emit(store, "customer.subscription.deleted", sub)


def _cancel(store: Store, sub_id: str, dunning: Dunning) -> None:
    """cancel_at (or the period end, with cancel_at_period_end) has come: the subscription ends
    without a renewal invoice."""
    _end(store, billing.load(store, "subscription", sub_id), "cancellation_requested")


def _schedule(store: Store, schedule_id: str, dunning: Dunning) -> None:
    """A subscription schedule's next phase starts (or its last one ends), at the clock's time."""
    schedules.apply_due_phases(store, simtime.now(), only=schedule_id)


def _trial_will_end(store: Store, sub_id: str, dunning: Dunning) -> None:
    sub = billing.load(store, "subscription", sub_id)
    sub["_trial_will_end_sent"] = True
    store.put(sub)
    billing.emit(store, "customer.subscription.trial_will_end", sub)


def _trial_end(store: Store, sub_id: str, dunning: Dunning) -> None:
    """With a payment method the trial ends like a renewal; without one,
    trial_settings.end_behavior.missing_payment_method decides."""
    sub = billing.load(store, "subscription", sub_id)
    customer = billing.load(store, "customer", sub["customer"])
    behavior = sub["trial_settings"]["end_behavior"]["missing_payment_method"]
    if invoicing.default_payment_method(store, sub, customer) is None and behavior != "create_invoice":
        if behavior == "cancel":
            _end(store, sub, None)
        else:  # pause
            before = copy.deepcopy(sub)
            sub["status"] = "paused"
            _updated(store, sub, before)
            billing.emit(store, "customer.subscription.paused", sub)
        return
    _renew(store, sub_id, dunning)


def _renew(store: Store, sub_id: str, dunning: Dunning) -> None:
    """A period (or a trial) ends: the items move to the next month and a draft invoice bills
    it. Events: invoice.created, customer.subscription.updated (the new period)."""
    sub = billing.load(store, "subscription", sub_id)
    # A subscription schedule's next phase starts with the new period (and may end the subscription).
    schedules.apply_due_phases(store, _period_end(sub), subscription_id=sub_id)
    sub = billing.load(store, "subscription", sub_id)
    if sub["status"] in billing.ENDED:
        return
    customer = billing.load(store, "customer", sub["customer"])
    before = copy.deepcopy(sub)
    previous = changes.period(sub)
    _start_period(sub, previous[1])
    if sub["status"] == "trialing":
        sub["status"] = "active"
    invoice = invoicing.renewal_invoice(store, customer, sub, previous, "subscription_cycle")
    invoice_items.add_pending_items(store, invoice)  # prorations waiting for this invoice
    sub["latest_invoice"] = invoice["id"]
    store.put(sub)
    billing.emit(store, "invoice.created", invoice)
    _updated(store, sub, before)
    paused = sub.get("pause_collection")
    if paused and (paused.get("resumes_at") is None or paused["resumes_at"] > simtime.now()):
        _collection_paused(store, invoice, paused["behavior"])


def _collection_paused(store: Store, invoice: Obj, behavior: str) -> None:
    """pause_collection: the renewal invoice is kept as a draft, or finalized and then voided or
    marked uncollectible at once, and never charged."""
    invoice.update(auto_advance=False, automatically_finalizes_at=None)
    store.put(invoice)
    if behavior == "keep_as_draft":
        return
    invoicing.finalize(store, invoice)
    now = simtime.now()
    if behavior == "void":
        invoice.update(status="void", amount_remaining=0)
        invoice["status_transitions"]["voided_at"] = now
        store.put(invoice)
        billing.emit(store, "invoice.voided", invoice)
    else:
        invoice["status"] = "uncollectible"
        invoice["status_transitions"]["marked_uncollectible_at"] = now
        store.put(invoice)
        billing.emit(store, "invoice.marked_uncollectible", invoice)


def _finalize(store: Store, invoice_id: str, dunning: Dunning) -> None:
    """An hour after a renewal invoice was drafted: finalize it and charge it."""
    invoice = billing.load(store, "invoice", invoice_id)
    invoicing.finalize(store, invoice)
    _attempt(store, invoice, dunning)


def _retry(store: Store, invoice_id: str, dunning: Dunning) -> None:
    _attempt(store, billing.load(store, "invoice", invoice_id), dunning)


def _attempt(store: Store, invoice: Obj, dunning: Dunning) -> None:
    """Charge the default payment method. Paid: invoice.paid (and a past_due subscription is
    active again). Failed: invoice.payment_failed with the next smart retry, the subscription
    past_due; after the last retry, unpaid or canceled per SANDBOX_DUNNING_FINAL_ACTION."""
    customer = billing.load(store, "customer", invoice["customer"])
    sub_id = invoicing.invoice_subscription(invoice)
    sub = store.get(sub_id) if sub_id else None
    method = invoicing.default_payment_method(store, sub, customer)
    if invoicing.charge(store, invoice, method):
        invoicing.paid(store, invoice)
        return
    now = simtime.now()
    first_failure = invoice.setdefault("_first_failed_at", now)
    retries_done = invoice["attempt_count"] - 1
    exhausted = retries_done >= len(dunning.retry_days)
    invoice["next_payment_attempt"] = None if exhausted else first_failure + dunning.retry_days[retries_done] * DAY
    store.put(invoice)
    billing.emit(store, invoicing.failure_event(store, invoice), invoice)
    if sub is None or sub["status"] in billing.ENDED:
        return
    before = copy.deepcopy(sub)
    if not exhausted:
        if sub["status"] in ("active", "trialing"):
            sub["status"] = "past_due"
            _updated(store, sub, before)
    elif dunning.final_action == "cancel":
        _end(store, sub, "payment_failed")
    else:
        sub["status"] = "unpaid"
        _updated(store, sub, before)


ACTIONS: dict[str, Callable[[Store, str, Dunning], None]] = {
    "cancel": _cancel,
    "schedule": _schedule,
    "trial_will_end": _trial_will_end,
    "trial_end": _trial_end,
    "renew": _renew,
    "finalize": _finalize,
    "retry": _retry,
}

billing.JOB_HANDLERS["advance_test_clock"] = lambda store, ref, now: run_advance(store, ref)


def resume(store: Store, sub_id: str, origin: billing.Origin) -> Obj:
    """POST /v1/subscriptions/:id/resume (billing_cycle_anchor=now): a paused subscription starts
    a new period now and is invoiced and charged at once. Events: customer.subscription.resumed,
    customer.subscription.updated, invoice.created, invoice.finalized, then invoice.paid; or
    invoice.payment_failed and customer.subscription.updated to past_due (smart retries follow)."""
    sub = billing.load(store, "subscription", sub_id)
    if sub["status"] != "paused":
        raise StripeError(
            f"Only a paused subscription can be resumed; this one is {sub['status']}.",
            code="subscription_not_paused" if sub["status"] not in billing.ENDED else "resource_missing",
        )
    customer = billing.load(store, "customer", sub["customer"])
    now = simtime.now()
    before = copy.deepcopy(sub)
    _start_period(sub, now)
    sub.update(status="active", billing_cycle_anchor=now)
    invoice = invoicing.renewal_invoice(store, customer, sub, (now, now), "subscription_update")
    sub["latest_invoice"] = invoice["id"]
    store.put(sub)
    billing.emit(store, "customer.subscription.resumed", sub, origin=origin)
    billing.emit(store, "customer.subscription.updated", sub, objects.previous_attributes(before, sub), origin)
    billing.emit(store, "invoice.created", invoice, origin=origin)
    invoicing.finalize(store, invoice)
    _attempt(store, invoice, Dunning.from_env())
    return billing.load(store, "subscription", sub_id)
