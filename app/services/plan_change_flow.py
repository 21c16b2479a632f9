"""The owner's plan and seat changes, orchestrated: the preview (read fresh from Stripe, decided by
plan_change.py), the confirmation (claimed in plan_change_claims.py, refused as stale when Stripe moved,
made now or scheduled) and withdrawing a scheduled change. Stripe is reached only through the
PlanChangeCalls BillingService implements; no transaction is held while Stripe answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from flask import current_app

from app import clock
from app.extensions import cache, db
from app.models import Organization, SubscriptionChangeStatus
from app.services import domain_events, plan_change_claims
from app.services.billing_common import (
    ChangeOutcome,
    StalePreview,
    SubscriptionActionNotAllowed,
    describe_failure,
    plan_catalogue,
)
from app.services.plan_change import (
    CurrentPlan,
    PlanChangeError,
    Preview,
    When,
    build_preview,
    check_against_schedule,
    new_recurring,
    read_current,
    resolve_target,
    timing,
    update_items,
)
from app.services.pricing import PriceInfo
from app.services.promotions import change_discounts, refusal_for_change


class PlanChangeCalls(Protocol):
    """What a plan change asks Stripe, implemented by BillingService."""

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    def prices_for_lookup_keys(self, lookup_keys: list[str], *, required: bool = True) -> dict[str, PriceInfo]: ...

    def _fetch_prices(self, lookup_keys: list[str]) -> dict[str, PriceInfo]: ...

    def preview_change_invoice(self, params: Any) -> dict[str, Any]: ...

    def _apply_change_now(
        self, current: CurrentPlan, preview: Preview, prices: Mapping[str, PriceInfo], key: str
    ) -> tuple[dict[str, Any], str | None, str | None]: ...

    def _schedule_change(
        self, current: CurrentPlan, preview: Preview, prices: Mapping[str, PriceInfo], key: str
    ) -> dict[str, Any]: ...

    def _release_schedule(self, schedule_id: str, key: str) -> None: ...

    def forget_billing_reads(self, organization_id: int) -> None: ...

    def active_promotion_code(self, code: str) -> dict[str, Any] | None: ...


def preview(
    calls: PlanChangeCalls,
    organization_id: int,
    *,
    kind: str,
    tier: str | None,
    interval: str | None,
    extra_seats: int | None,
    members: int,
    promotion_code: str | None = None,
) -> Preview:
    """A preview of changing the plan (tier, interval) or the extra seats, read fresh from Stripe:
    when it happens, what is charged or credited today (Stripe's invoice preview with the proration
    date the confirmation will use) and the new recurring amount. Changes nothing.

    A promotion code entered with a change made now is looked up at Stripe and checked (unknown,
    inactive, expired, used up, another customer's, first-time only, below its minimum amount: a
    SubscriptionActionNotAllowed saying so); the preview then shows the change with its discount in
    place of the subscription's. Without one, the subscription's discounts carry on as they are."""
    organization = db.session.get(Organization, organization_id)
    if organization is None or not organization.billing_subscription_id:
        raise SubscriptionActionNotAllowed("This organization has no subscription to change.")
    if organization.billed_by_whop:
        raise SubscriptionActionNotAllowed("Plans and seats billed through Whop are changed on Whop.")
    subscription_id, held_tier = organization.billing_subscription_id, organization.tier
    customer_id = organization.billing_customer_id
    db.session.rollback()  # no transaction is held while Stripe is asked
    catalogue = plan_catalogue()
    current = read_current(calls.retrieve_subscription(subscription_id), catalogue)
    try:
        target, quantities = resolve_target(
            current,
            catalogue,
            held_tier=held_tier,
            tier=tier,
            interval=interval,
            extra_seats=extra_seats,
            members=members,
        )
    except PlanChangeError as exc:
        raise SubscriptionActionNotAllowed(str(exc)) from exc
    prices = calls.prices_for_lookup_keys(list(quantities))
    proration_date, invoice = clock.now(), None
    when = timing(current, target, new_recurring(prices, quantities)[1])
    try:
        check_against_schedule(kind, current, when)
    except PlanChangeError as exc:
        raise SubscriptionActionNotAllowed(str(exc)) from exc
    promotion = None
    if promotion_code and promotion_code.strip():
        if when != When.NOW:
            raise SubscriptionActionNotAllowed(
                "A promotion code applies to a change made now; a cheaper plan starts at the end of the "
                "billing period: choose it without a code. Nothing was changed."
            )
        promotion = calls.active_promotion_code(promotion_code.strip())
        amount = new_recurring(prices, quantities)[0]
        currency = prices[next(iter(quantities))].currency
        refused = refusal_for_change(
            promotion, promotion_code, customer_id=customer_id, amount=amount, currency=currency, now=clock.now()
        )
        if refused:
            raise SubscriptionActionNotAllowed(f"{refused} Nothing was changed.")
    if when == When.NOW:
        params: Any = {
            "subscription": current.subscription_id,
            "subscription_details": {
                "items": update_items(current, prices, quantities, catalogue),
                "proration_date": proration_date,
                "proration_behavior": "always_invoice",
            },
            **change_discounts(promotion["id"] if promotion else None),
        }
        invoice = calls.preview_change_invoice(params)
    return build_preview(
        kind,
        organization_id,
        current,
        target,
        prices,
        quantities,
        proration_date=proration_date,
        invoice_preview=invoice,
        promotion=promotion,
    )


def confirm(calls: PlanChangeCalls, preview: Preview, *, actor_user_id: int) -> ChangeOutcome:
    """Make the previewed change at Stripe, exactly once however often it is submitted.

    The change is claimed first (a subscription_change row: one pending per organization, the
    idempotency key unique), then Stripe is re-read: a subscription or price that moved since the
    preview refuses it as stale (StalePreview). Upgrades update the subscription's items with the
    preview's proration date and invoice at once; downgrades go on a subscription schedule that
    switches the prices when the period ends. The organization is updated from Stripe's answer."""
    age = clock.now() - preview.proration_date
    if age > current_app.config["PLAN_CHANGE_PREVIEW_MINUTES"] * 60:
        raise StalePreview(f"This preview is {age // 60} minutes old.")
    key = preview.idempotency_key()
    claim = plan_change_claims.claim(preview, key, actor_user_id)
    if claim is not None:
        return claim
    try:
        current = read_current(calls.retrieve_subscription(preview.subscription_id), plan_catalogue())
        if current.fingerprint != preview.base_fingerprint:
            raise StalePreview("Your subscription changed since this preview.")
        fresh = calls._fetch_prices(list(preview.quantities))
        if {k: p.id for k, p in fresh.items()} != preview.price_ids:
            cache.delete_many(*(f"stripe-price:{k}" for k in preview.quantities))
            raise StalePreview("A price changed since this preview.")
        prices = {k: fresh[k] for k in preview.quantities}
        action_url = awaiting = None
        if preview.when == When.NOW:
            subscription, action_url, awaiting = calls._apply_change_now(current, preview, prices, key)
        else:
            subscription = calls._schedule_change(current, preview, prices, key)
    except StalePreview as exc:
        plan_change_claims.finish(key, SubscriptionChangeStatus.REFUSED, f"stale: {exc}")
        raise
    except BaseException as exc:
        # A retry of this same preview reuses the key, so Stripe makes the change at most once.
        plan_change_claims.finish(key, SubscriptionChangeStatus.FAILED, describe_failure(exc)[:500])
        raise
    calls.forget_billing_reads(preview.organization_id)
    plan_change_claims.record_applied(
        preview, key, subscription, actor_user_id=actor_user_id, awaiting_payment=awaiting
    )
    return ChangeOutcome(applied=True, when=preview.when, action_url=action_url, awaiting_payment=awaiting)


def withdraw_scheduled(calls: PlanChangeCalls, organization_id: int, *, actor_user_id: int) -> None:
    """Keep the current plan: release the schedule that would downgrade it at the period's end."""
    organization = db.session.get(Organization, organization_id)
    if organization is None or not organization.billing_subscription_id or organization.billed_by_whop:
        raise SubscriptionActionNotAllowed("This organization has no subscription.")
    subscription_id = organization.billing_subscription_id
    db.session.rollback()  # no transaction is held while Stripe is asked
    current = read_current(calls.retrieve_subscription(subscription_id), plan_catalogue())
    if current.schedule_id is None:
        raise SubscriptionActionNotAllowed("There is no scheduled plan change to undo.")
    calls._release_schedule(current.schedule_id, f"org-{organization_id}-release-{current.schedule_id}")
    calls.forget_billing_reads(organization_id)
    domain_events.record(
        "subscription.change_withdrawn",
        organization_id=organization_id,
        user_id=actor_user_id,
        source=f"user:{actor_user_id}",
        schedule_id=current.schedule_id,
    )
    db.session.commit()
