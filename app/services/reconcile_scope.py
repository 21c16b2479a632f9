"""What one reconcile run reads: the window of events checked (`--since`), Stripe's side (unless the
one organization asked for is Whop-billed) and, when Whop is configured, Whop's memberships for
Whop-billed organizations (Whop retries a delivery only three times, so a missed membership event is
found here). The providers are reached through what BillingService hands in."""

from __future__ import annotations

from collections.abc import Callable

from app.services import reconcile as reconciliation
from app.services import reconcile_reads
from app.services.billing_common import BillingError
from app.services.reconcile_reads import StripeReconcileReads

WhopRead = Callable[[int | None, reconciliation.ReconcileReport], list[reconciliation.SubscriptionDrift]]


def check_window(since_days: int) -> None:
    if not 1 <= since_days <= reconciliation.MAX_SINCE_DAYS:
        raise BillingError(
            f"--since must be between 1 and {reconciliation.MAX_SINCE_DAYS} days (Stripe keeps events for 30)."
        )


def read_all(
    stripe: StripeReconcileReads,
    since_days: int,
    organization_id: int | None,
    handled_events: frozenset[str],
    whop_configured: Callable[[], bool],
    whop_read: WhopRead,
) -> reconciliation.ReconcileReport:
    """Stripe's side, then Whop's, as one report."""
    whop_only = organization_id is not None and reconcile_reads.billed_by_whop(organization_id)
    report = (
        reconciliation.ReconcileReport()
        if whop_only
        else reconcile_reads.read_stripe_side(stripe, since_days, organization_id, handled_events)
    )
    if whop_configured() and (organization_id is None or whop_only):
        report.subscriptions += whop_read(organization_id, report)
    return report
