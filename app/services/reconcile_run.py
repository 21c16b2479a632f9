"""Reconcile's repairs (`flask billing reconcile --apply`, and the worker's daily run): what the read
found is put right through the same paths a delivery takes. Missing events are stored and applied as
the worker would; a drifted organization takes its subscription or membership as the provider holds it
now; orphans are provisioned, or canceled and refunded like conflicting signups and surplus
resubscriptions; unsettled ones are settled. One repair failing does not stop the others.

The provider is reached only through the operations BillingService hands in."""

from __future__ import annotations

from typing import Any, Protocol

from app.extensions import db
from app.services import provisioning, stripe_events, stripe_objects, webhook_intake, whop_events
from app.services import reconcile as reconciliation
from app.services.billing_common import BillingError, WebhookProvider, WhopReads, committed, describe_failure
from app.services.signup_service import ProvisionOutcome, ProvisionState


class ReconcileOperations(Protocol):
    """What repairing needs from the billing authority (BillingService implements it)."""

    def read_event_for_reconcile(self, event_id: str) -> str: ...

    def apply_queued_events(self, provider_name: str, object_key: str, *, final_attempt: bool = True) -> str: ...

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    def retrieve_checkout_session(self, session_id: str, *, expand_subscription: bool) -> dict[str, Any]: ...

    def checkout_session_for_subscription(self, subscription_id: str) -> str | None: ...

    def _provision_checkout_session(
        self, session: str | dict[str, Any], *, source: str, release_before_stripe: bool = False
    ) -> ProvisionOutcome: ...

    def settle_signup_conflict(self, pending_signup_id: str, *, source: str) -> dict[str, Any] | None: ...

    def settle_surplus_subscription(self, checkout_session_id: str, *, source: str) -> dict[str, Any] | None: ...


def repair(
    report: reconciliation.ReconcileReport, billing: ReconcileOperations, stripe: WebhookProvider, whop: WhopReads
) -> list[str]:
    applied: list[str] = []
    objects: list[str] = []
    for missing in report.missing_events:
        db.session.rollback()
        verified = stripe_events.parse_event(billing.read_event_for_reconcile(missing.event_id))
        result = webhook_intake.store(stripe, verified)
        applied.append(f"event {missing.event_id} {missing.type}: stored {result.body}")
        if not {"ignored", "failed", "duplicate"} & set(result.body):
            key = stripe.object_key(verified)
            objects += [key] if key not in objects else []
    # Then applied at once, as the worker would (its queued job later finds nothing pending).
    for key in objects:
        applied.append(f"{key}: {billing.apply_queued_events(stripe.name, key)}")
    for drift in report.subscriptions:
        if drift.provider == "Whop":
            applied.append(follow_whop_membership(drift, whop))
            continue
        # As the worker applies a subscription event: read now, checked, applied under a short lock.
        subscription = stripe_objects.subscription_for_state(billing.retrieve_subscription(drift.subscription_id))
        with committed():
            organization = stripe_events.lock_organization_for_subscription(subscription)
            changes: list[str] = []
            if organization is not None:
                changes = provisioning.apply_subscription_read(organization, subscription, source="reconcile")
        what = ", ".join(changes) or "no change"
        applied.append(f"organization {drift.organization_id} follows {drift.subscription_id}: {what}")
    return applied + settle(report, billing)


def settle(report: reconciliation.ReconcileReport, billing: ReconcileOperations) -> list[str]:
    """Orphans and unsettled checkouts; one failing does not stop the others."""
    applied: list[str] = []
    for orphan in report.orphans:
        if orphan.kind == "unknown":
            continue
        try:
            applied.append(settle_orphan(orphan, billing))
        except BillingError as exc:  # the others still get repaired; the next run tries again
            applied.append(f"orphan {orphan.subscription_id}: not settled: {describe_failure(exc)}")
    for entry in report.unsettled:
        try:
            if entry.kind == "signup":
                result = billing.settle_signup_conflict(entry.reference, source="reconcile")
            else:
                result = billing.settle_surplus_subscription(entry.reference, source="reconcile")
            refunded = (result or {}).get("amount_refunded")
            applied.append(f"{entry.kind} {entry.reference}: canceled and refunded {refunded}")
        except BillingError as exc:
            applied.append(f"{entry.kind} {entry.reference}: not settled: {describe_failure(exc)}")
    return applied


def follow_whop_membership(drift: reconciliation.SubscriptionDrift, whop: WhopReads) -> str:
    """The organization takes the membership as Whop has it now (read with no transaction open)."""
    membership = whop.retrieve_membership(drift.subscription_id)
    with committed():
        organization = whop_events.lock_organization(drift.subscription_id)
        changes: list[str] = []
        if organization is not None:
            changes = whop_events.apply_membership_read(organization, membership, source="reconcile")
    what = ", ".join(changes) or "no change"
    return f"organization {drift.organization_id} follows Whop membership {drift.subscription_id}: {what}"


def settle_orphan(orphan: reconciliation.Orphan, billing: ReconcileOperations) -> str:
    """An orphan runs through the same path as its checkout's delivery: provisioned if it may be,
    otherwise canceled and refunded (conflicting signup, surplus resubscription)."""
    session_id = orphan.reference if orphan.kind == "resubscribe" and orphan.reference else None
    session_id = session_id or billing.checkout_session_for_subscription(orphan.subscription_id)
    if session_id is None:
        return f"orphan {orphan.subscription_id}: no checkout found; left for a person"
    checkout = billing.retrieve_checkout_session(session_id, expand_subscription=True)
    db.session.rollback()
    with committed():
        outcome = billing._provision_checkout_session(checkout, source="reconcile", release_before_stripe=True)
    result: dict[str, Any] | None = None
    if outcome.state == ProvisionState.CONFLICT and outcome.pending_signup_id is not None:
        result = billing.settle_signup_conflict(str(outcome.pending_signup_id), source="reconcile")
    elif outcome.state == ProvisionState.SURPLUS:
        result = billing.settle_surplus_subscription(checkout["id"], source="reconcile")
    detail = f", canceled and refunded {result.get('amount_refunded')}" if result else ""
    return f"orphan {orphan.subscription_id}: {outcome.state}{detail}"
