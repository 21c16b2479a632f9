"""The operations console's actions, each reached through BillingService.staff_action: re-sync an
organization from its provider (reconcile of that one organization, with its repairs, run by the worker
as a durable job that writes its own audit row when done: RESYNC_TASK, finish_resync), replay a failed
webhook event, send a failed email again, refund an invoice (whole or in part), extend a free trial,
apply a coupon, cancel now or at the period's end, and undo a scheduled cancellation.

Every action:
- is refused unless staff typed a reason (and, for those that move money, a fresh two-factor code,
  checked by the route before this module is called);
- is idempotent on a double submit: the confirmation form carries a one-time token; the provider is
  called with an idempotency key made from it, and the staff audit row it ends with is unique on it, so
  the second submit does nothing and is told what the first did;
- is written to the staff audit log with the organization's billing before and after, and a refusal
  is written too (without the token, so the form can be sent again once the cause is fixed)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select

from app.extensions import db
from app.models import DomainEvent, Organization, StripeEvent, User, WhopEvent
from app.services import outbox, queue, staff_audit
from app.services import reconcile as reconciliation
from app.services.billing_common import REQUEST_TOKEN, BillingError, StaleForm, WebhookResult, committed
from app.services.pricing import format_money
from app.services.webhook_intake import WEBHOOK_QUEUE


class StaffActionRefused(BillingError):
    """The action was not taken; the message says why, for staff."""


class StaffOperations(Protocol):
    """What the actions need from the billing authority (BillingService implements it)."""

    def reconcile(
        self, *, apply: bool = False, since_days: int = 3, organization_id: int | None = None, drain: bool = True
    ) -> reconciliation.ReconcileReport: ...

    def replay_stored_event(self, event_id: str) -> WebhookResult: ...

    def apply_queued_events(
        self, provider_name: str, object_key: str, *, final_attempt: bool = True, resync: bool = False
    ) -> str: ...

    def cancel_subscription(
        self, organization_id: int, *, at_period_end: bool, request_token: str, actor_user_id: int
    ) -> list[str]: ...

    def resume_subscription(self, organization_id: int, *, request_token: str, actor_user_id: int) -> list[str]: ...

    def refund_invoice(self, invoice_id: str, *, amount: int | None, key: str) -> dict[str, Any]: ...

    def staff_update_subscription(self, change: SubscriptionEdit, *, actor_user_id: int) -> list[str]: ...

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    def forget_billing_reads(self, organization_id: int) -> None: ...


@dataclass(frozen=True)
class SubscriptionEdit:
    """A staff change to a Stripe subscription: the update's parameters, once `refusal` (given the
    organization as held) says nothing against it. `kind` names it in the idempotency key."""

    organization_id: int
    kind: str
    params: dict[str, Any]
    refusal: Callable[[Organization], str | None]
    request_token: str


@dataclass(frozen=True)
class StaffRequest:
    action: str
    organization_id: int
    staff_user_id: int
    reason: str
    request_token: str
    target: str | None = None  # the event id, domain event id, invoice id or coupon id the action is about
    amount: int | None = None  # a partial refund, in the currency's smallest unit
    days: int | None = None  # how many days a trial is extended by


@dataclass(frozen=True)
class StaffOutcome:
    message: str
    repeated: bool = False  # the same form was submitted before: nothing was done again


@dataclass(frozen=True)
class Action:
    label: str
    moves_money: bool
    needs_target: bool
    run: Callable[[StaffRequest, StaffOperations, str], str]


RESYNC_TASK = "staff:resync"  # app/services/jobs.py runs it


@dataclass(frozen=True)
class ResyncJob:
    """The worker's half of a re-sync (the job's arguments), and whether this is its last attempt."""

    organization_id: int
    staff_user_id: int
    reason: str
    request_key: str
    final_attempt: bool = True


def _object_of(organization_id: int) -> tuple[str, str] | None:
    """The provider and object key the organization's subscription (or membership) is applied under."""
    try:
        organization = db.session.get(Organization, organization_id, populate_existing=True)
        if organization is None or not organization.billing_subscription_id:
            return None
        if organization.billed_by_whop:
            return "whop", f"membership:{organization.billing_subscription_id}"
        return "stripe", f"subscription:{organization.billing_subscription_id}"
    finally:
        db.session.rollback()


def _resync(request: StaffRequest, ops: StaffOperations, key: str) -> str:
    """Queue the re-sync for the worker: a durable job, retried like the others, under the lock of the
    organization's subscription (never beside the worker's other writes to it). Its row in the queue
    (`flask billing status`, the console's Queue) is visible until it is done; it writes `resync.done`."""
    held = _object_of(request.organization_id)
    with committed():
        queue.defer(
            RESYNC_TASK,
            queue=WEBHOOK_QUEUE,
            lock=f"{held[0]}:{held[1]}" if held else None,
            queueing_lock=f"{RESYNC_TASK}:{key}",
            organization_id=request.organization_id,
            staff_user_id=request.staff_user_id,
            reason=request.reason.strip(),
            request_key=key,
        )
    return "Re-sync queued for the worker; its result is written to this log as resync.done when it is done."


def finish_resync(job: ResyncJob, ops: StaffOperations) -> StaffOutcome:
    """The worker's re-sync: reconcile of this one organization with its repairs, then its subscription
    (or membership) re-read and applied here, so the row written at the end holds the billing after it.
    A provider that does not answer raises (the job is retried); the last attempt's failure is audited."""
    request = StaffRequest("resync", job.organization_id, job.staff_user_id, job.reason, "", None)
    staff, before = _staff_and_snapshot(request)
    try:
        report = ops.reconcile(apply=True, organization_id=job.organization_id, drain=False)
        if (held := _object_of(job.organization_id)) is not None:
            ops.apply_queued_events(held[0], held[1], resync=True)
    except BillingError as exc:
        if job.final_attempt:
            staff_audit.record(
                staff,
                "resync.done",
                reason=job.reason,
                outcome=f"failed, not retried again: {exc}",
                organization_id=job.organization_id,
                before=before,
                request_key=f"{job.request_key}:done",
            )
        raise
    ops.forget_billing_reads(job.organization_id)
    _, after = _staff_and_snapshot(request)
    outcome = "; ".join(report.applied) or "The provider and the database agreed: nothing to re-read."
    if after != before:
        changed = ", ".join(
            f"{name} {before.get(name)} -> {value}" for name, value in after.items() if before.get(name) != value
        )
        outcome = f"{outcome}; applied: {changed}"
    entry = staff_audit.record(
        staff,
        "resync.done",
        reason=job.reason,
        outcome=outcome,
        organization_id=job.organization_id,
        before=before,
        after=after,
        request_key=f"{job.request_key}:done",
    )
    return StaffOutcome(outcome, repeated=entry is None)


def _replay(request: StaffRequest, ops: StaffOperations, key: str) -> str:
    event_id = str(request.target)
    if not _event_concerns(event_id, request.organization_id):
        raise StaffActionRefused(f"Event {event_id} is not about this organization.")
    result = ops.replay_stored_event(event_id)
    if result.body.get("duplicate"):
        return f"Event {event_id} was already applied: nothing to replay."
    if "queued" in result.body:
        return f"Event {event_id} queued for the worker again ({result.body['queued']})."
    raise StaffActionRefused(f"Event {event_id} could not be read again: {result.body.get('failed')}")


def _resend(request: StaffRequest, ops: StaffOperations, key: str) -> str:
    domain_event_id = int(str(request.target)) if str(request.target).isdigit() else 0
    try:
        owner = db.session.execute(
            select(DomainEvent.organization_id).where(DomainEvent.id == domain_event_id)
        ).scalar_one_or_none()
    finally:
        db.session.rollback()
    if owner != request.organization_id:
        raise StaffActionRefused(f"Event {request.target} is not this organization's.")
    queued = outbox.replay_failed([domain_event_id])
    if not queued:
        raise StaffActionRefused(f"Event {domain_event_id} has no failed email to send again.")
    return f"The emails of event {domain_event_id} that were not sent are queued again."


def _refund(request: StaffRequest, ops: StaffOperations, key: str) -> str:
    invoice_id = str(request.target or "")
    if not invoice_id.startswith("in_"):
        raise StaffActionRefused("Choose an invoice to refund.")
    if request.amount is not None and request.amount <= 0:
        raise StaffActionRefused("A partial refund is a positive amount.")
    try:
        refund = ops.refund_invoice(invoice_id, amount=request.amount, key=key)
    except BillingError as exc:
        raise StaffActionRefused(f"Stripe refused the refund: {exc.__cause__ or exc}") from exc
    amount = format_money(int(refund.get("amount") or 0), str(refund.get("currency") or "usd"))
    return f"Refunded {amount} of invoice {invoice_id} ({refund.get('id')}, {refund.get('status')})."


def _cancel(at_period_end: bool) -> Callable[[StaffRequest, StaffOperations, str], str]:
    def run(request: StaffRequest, ops: StaffOperations, key: str) -> str:
        changes = ops.cancel_subscription(
            request.organization_id,
            at_period_end=at_period_end,
            request_token=request.request_token,
            actor_user_id=request.staff_user_id,
        )
        done = "Cancellation at the end of the period scheduled" if at_period_end else "Subscription canceled now"
        return f"{done}; the organization now holds: {', '.join(changes) or 'no change'}."

    return run


def _resume(request: StaffRequest, ops: StaffOperations, key: str) -> str:
    changes = ops.resume_subscription(
        request.organization_id, request_token=request.request_token, actor_user_id=request.staff_user_id
    )
    return f"Scheduled cancellation withdrawn; the organization now holds: {', '.join(changes) or 'no change'}."


MAX_TRIAL_EXTENSION_DAYS = 90


def trial_refusal(organization: Organization) -> str | None:
    if organization.billed_by_whop:
        return "A Whop membership's trial is changed on Whop."
    if organization.billing_status != "trialing" or organization.trial_end is None:
        return "Only a subscription in its free trial can have its trial extended."
    return None


def _extend_trial(request: StaffRequest, ops: StaffOperations, key: str) -> str:
    days = request.days or 0
    if not 1 <= days <= MAX_TRIAL_EXTENSION_DAYS:
        raise StaffActionRefused(f"Extend a trial by 1 to {MAX_TRIAL_EXTENSION_DAYS} days.")
    try:
        organization = db.session.get(Organization, request.organization_id, populate_existing=True)
        refusal = trial_refusal(organization) if organization is not None else "There is no such organization."
        if refusal or organization is None or organization.trial_end is None:
            raise StaffActionRefused(refusal or "There is no trial to extend.")
        trial_end = int(organization.trial_end.timestamp()) + days * 86400
    finally:
        db.session.rollback()
    edit = SubscriptionEdit(
        request.organization_id, "trial", {"trial_end": trial_end}, trial_refusal, request.request_token
    )
    changes = ops.staff_update_subscription(edit, actor_user_id=request.staff_user_id)
    return f"Trial extended by {days} days; the organization now holds: {', '.join(changes) or 'no change'}."


COUPON_ID = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


def coupon_refusal(organization: Organization) -> str | None:
    if organization.billed_by_whop:
        return "A Whop membership's price is changed on Whop."
    if not organization.billing_subscription_id or organization.billing_status in ("canceled", "incomplete_expired"):
        return "Only a live subscription can have a coupon applied."
    return None


def _apply_coupon(request: StaffRequest, ops: StaffOperations, key: str) -> str:
    """The coupon (its Stripe id) starts a discount on the subscription, beside the discounts it has."""
    coupon_id = (request.target or "").strip()
    if not COUPON_ID.match(coupon_id):
        raise StaffActionRefused("Type the coupon's id as Stripe shows it (letters, digits, - and _).")
    try:
        organization = db.session.get(Organization, request.organization_id, populate_existing=True)
        refusal = coupon_refusal(organization) if organization is not None else "There is no such organization."
        subscription_id = organization.billing_subscription_id if organization is not None else None
    finally:
        db.session.rollback()
    if refusal or not subscription_id:
        raise StaffActionRefused(refusal or "There is no subscription.")
    held = ops.retrieve_subscription(subscription_id).get("discounts") or []
    kept = [{"discount": d if isinstance(d, str) else d.get("id")} for d in held]
    params = {"discounts": [*kept, {"coupon": coupon_id}]}
    edit = SubscriptionEdit(request.organization_id, "coupon", params, coupon_refusal, request.request_token)
    try:
        changes = ops.staff_update_subscription(edit, actor_user_id=request.staff_user_id)
    except BillingError as exc:
        if isinstance(exc, StaleForm):
            raise
        raise StaffActionRefused(f"Stripe refused the coupon: {exc.__cause__ or exc}") from exc
    return f"Coupon {coupon_id} applied; the organization now holds: {', '.join(changes) or 'no change'}."


ACTIONS: dict[str, Action] = {
    "resync": Action("Re-sync from the provider", False, False, _resync),
    "replay": Action("Replay a failed webhook event", False, True, _replay),
    "resend": Action("Send failed emails again", False, True, _resend),
    "refund": Action("Refund an invoice", True, True, _refund),
    "cancel_now": Action("Cancel the subscription now", True, False, _cancel(at_period_end=False)),
    "cancel_at_period_end": Action("Cancel at the end of the period", True, False, _cancel(at_period_end=True)),
    "resume": Action("Undo the scheduled cancellation", True, False, _resume),
    "extend_trial": Action("Extend the free trial", True, False, _extend_trial),
    "apply_coupon": Action("Apply a coupon", True, True, _apply_coupon),
}


def perform(request: StaffRequest | ResyncJob, ops: StaffOperations) -> StaffOutcome:
    if isinstance(request, ResyncJob):
        return finish_resync(request, ops)
    action = ACTIONS.get(request.action)
    if action is None:
        raise StaffActionRefused("There is no such action.")
    if not REQUEST_TOKEN.match(request.request_token or ""):
        raise StaffActionRefused("That form has expired. Open the action again.")
    if not request.reason.strip():
        raise StaffActionRefused("Type the reason for this action: it is kept in the staff audit log.")
    if action.needs_target and not request.target:
        raise StaffActionRefused("Choose what the action is about.")
    key = f"staff-{request.organization_id}-{request.action}-{request.request_token}"
    if (earlier := staff_audit.done(key)) is not None:
        return StaffOutcome(f"Already done by this form: {earlier.outcome}", repeated=True)
    staff, before = _staff_and_snapshot(request)
    try:
        outcome = action.run(request, ops, key)
    except StaleForm:
        earlier = staff_audit.done(key)
        return StaffOutcome(f"Already done by this form: {earlier.outcome if earlier else 'see the audit log'}", True)
    except BillingError as exc:
        staff_audit.record(
            staff,
            request.action,
            reason=request.reason.strip(),
            outcome=f"refused: {exc}",
            organization_id=request.organization_id,
            target=request.target,
            before=before,
        )
        raise StaffActionRefused(str(exc)) from exc
    ops.forget_billing_reads(request.organization_id)
    _, after = _staff_and_snapshot(request)
    entry = staff_audit.record(
        staff,
        request.action,
        reason=request.reason.strip(),
        outcome=outcome,
        organization_id=request.organization_id,
        target=request.target,
        before=before,
        after=after,
        request_key=key,
    )
    if entry is None:  # a second submit of the same form raced this one: the first entry stands
        return StaffOutcome(f"Already done by this form: {outcome}", repeated=True)
    return StaffOutcome(outcome)


def _staff_and_snapshot(request: StaffRequest) -> tuple[User, dict[str, Any]]:
    """The staff member (detached) and the organization's billing as held now."""
    try:
        staff = db.session.get(User, request.staff_user_id)
        organization = db.session.get(Organization, request.organization_id, populate_existing=True)
        if staff is None or organization is None:
            raise StaffActionRefused("There is no such organization.")
        snapshot = billing_snapshot(organization)
        db.session.expunge(staff)
        return staff, snapshot
    finally:
        db.session.rollback()


def billing_snapshot(organization: Organization) -> dict[str, Any]:
    def moment(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "status": organization.billing_status,
        "tier": organization.tier,
        "addons": organization.addon_quantities(),
        "cancel_at_period_end": organization.cancel_at_period_end,
        "current_period_end": moment(organization.current_period_end),
        "trial_end": moment(organization.trial_end),
        "last_payment_status": organization.last_payment_status,
    }


def _event_concerns(event_id: str, organization_id: int) -> bool:
    """Whether a stored webhook event is about the organization's subscription, customer or membership."""
    try:
        organization = db.session.get(Organization, organization_id)
        if organization is None:
            return False
        keys = {
            f"{kind}:{value}"
            for kind, value in (
                ("subscription", organization.billing_subscription_id),
                ("customer", organization.billing_customer_id),
                ("membership", organization.billing_subscription_id),
            )
            if value
        }
        for model in (StripeEvent, WhopEvent):
            key = db.session.execute(select(model.object_key).where(model.event_id == event_id)).scalar_one_or_none()
            if key in keys:
                return True
        return False
    finally:
        db.session.rollback()
