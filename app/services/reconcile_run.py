"""Reconcile's repairs (`flask billing reconcile --apply`, and the worker's daily run): what the read
found is put right through the same paths a delivery takes. Missing events are stored as deliveries
are; a drifted organization gets a job that re-reads its subscription or membership; orphans are
provisioned, or canceled and refunded like conflicting signups and surplus resubscriptions; unsettled
ones are settled. One repair failing does not stop the others.

The provider is reached only through the operations BillingService hands in; organizations are written
only by the worker's jobs (webhook_intake), under each object's lock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from flask import current_app

from app.extensions import db
from app.services import billing_page, customer_sync, queue, stripe_events, webhook_intake
from app.services import reconcile as reconciliation
from app.services.billing_common import BillingError, WebhookProvider, WebhookRejected, committed, describe_failure
from app.services.signup_service import ProvisionOutcome, ProvisionState


class ReconcileOperations(Protocol):
    """What repairing needs from the billing authority (BillingService implements it)."""

    def read_event_for_reconcile(self, event_id: str) -> str: ...

    def retrieve_checkout_session(self, session_id: str, *, expand_subscription: bool) -> dict[str, Any]: ...

    def checkout_session_for_subscription(self, subscription_id: str) -> str | None: ...

    def _provision_checkout_session(
        self, session: str | dict[str, Any], *, source: str, release_before_stripe: bool = False
    ) -> ProvisionOutcome: ...

    def settle_signup_conflict(self, pending_signup_id: str, *, source: str) -> dict[str, Any] | None: ...

    def settle_surplus_subscription(self, checkout_session_id: str, *, source: str) -> dict[str, Any] | None: ...


def run(
    read: Callable[[], reconciliation.ReconcileReport],
    billing: ReconcileOperations,
    stripe: WebhookProvider,
    whop: WebhookProvider,
    *,
    apply: bool,
    drain: bool,
) -> reconciliation.ReconcileReport:
    """Read; with apply, repair and read again until clean, for up to three rounds (repairs make events
    of their own, a canceled orphan's customer.subscription.deleted, which the next round applies like
    any other missing event). drain: run the queued webhook jobs here before reading again (the command
    line); the worker's daily run leaves them to the other workers."""
    report = read()
    applied: list[str] = []
    for _round in range((3 if drain else 1) if apply else 0):
        if report.clean:
            break
        applied += repair(report, billing, stripe, whop)
        if drain:
            queue.run_pending_jobs_now(current_app, queues=[webhook_intake.WEBHOOK_QUEUE])
        report = read()
    report.applied = applied
    return report


def repair(
    report: reconciliation.ReconcileReport, billing: ReconcileOperations, stripe: WebhookProvider, whop: WebhookProvider
) -> list[str]:
    """Missing events are stored as deliveries are (each queues its object's job); each drifted
    organization gets a re-read job for its subscription or membership. The worker's jobs apply them,
    one object at a time under its lock, so nothing here writes an organization beside the worker.
    One event or object failing does not stop the others."""
    applied: list[str] = []
    for missing in report.missing_events:
        try:
            db.session.rollback()
            verified = stripe_events.parse_event(billing.read_event_for_reconcile(missing.event_id))
            result = webhook_intake.store(stripe, verified)
            applied.append(f"event {missing.event_id} {missing.type}: stored {result.body}")
        except (BillingError, WebhookRejected) as exc:
            applied.append(f"event {missing.event_id} {missing.type}: not stored: {describe_failure(exc)}")
    for drift in report.subscriptions:
        whop_billed = drift.provider == "Whop"
        provider, key = (
            (whop, f"membership:{drift.subscription_id}")
            if whop_billed
            else (stripe, f"subscription:{drift.subscription_id}")
        )
        with committed():
            webhook_intake.queue_resync(provider, key)
        followed = f"Whop membership {drift.subscription_id}" if whop_billed else drift.subscription_id
        applied.append(f"organization {drift.organization_id} follows {followed}: re-read queued for the worker")
    return applied + customers(report) + settle(report, billing)


def customers(report: reconciliation.ReconcileReport) -> list[str]:
    """A customer lacking the account's email or name gets the worker's customer-sync job (one waiting
    job per organization; it reads the customer afresh and sends only what is missing, so a repeated
    run sends nothing twice). While a customer.updated is missing, customers wait for the next round:
    that event (a change made at Stripe) is applied first, so ours never overwrites it. A billing page
    showing stale discounts or tax IDs has its cached reads dropped. One failing does not stop the rest."""
    applied: list[str] = []
    if any(missing.type == "customer.updated" for missing in report.missing_events):
        waiting = len(report.customer_drifts)
        if waiting:
            applied.append(f"{waiting} customer(s) left for the next round: a customer.updated is applied first")
    else:
        for drift in report.customer_drifts:
            try:
                with committed():
                    queued = customer_sync.queue_sync(drift.organization_id, drift.customer_id)
                fields = ", ".join(change.field for change in drift.fields)
                state = "customer sync queued for the worker" if queued else "customer sync already queued"
                applied.append(f"organization {drift.organization_id} ({drift.customer_id}) {fields}: {state}")
            except Exception as exc:  # the others are still repaired; the next run tries again
                db.session.rollback()
                applied.append(f"organization {drift.organization_id}: customer sync not queued: {exc}")
    for page in report.page_drifts:
        try:
            billing_page.forget_reads(page.organization_id)
            db.session.rollback()
            applied.append(f"organization {page.organization_id}: the billing page reads {page.part} from Stripe again")
        except Exception as exc:  # the cache did not answer: the next run tries again
            db.session.rollback()
            applied.append(f"organization {page.organization_id}: billing page reads not dropped: {exc}")
    return applied


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
