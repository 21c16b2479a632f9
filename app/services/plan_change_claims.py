"""Plan and seat changes, on the database side: a confirmed preview is claimed before Stripe is asked
(a subscription_change row: one pending per organization, the idempotency key unique, so a double
submit is one change), settled as applied, refused or failed, and the applied change recorded on the
organization. Stripe is called by BillingService between the claim and the record."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from app.extensions import db
from app.models import Organization, SubscriptionChange, SubscriptionChangeStatus
from app.models.types import utcnow
from app.services import domain_events, provisioning
from app.services.billing_common import ChangeOutcome, StalePreview, SubscriptionActionNotAllowed, committed
from app.services.plan_change import Preview, When


def claim(preview: Preview, key: str, actor_user_id: int) -> ChangeOutcome | None:
    """Claim the change, or say what became of an earlier submit of the same preview."""
    stale_before = utcnow() - timedelta(minutes=5)
    try:
        # A claim abandoned by a crashed worker does not block the organization for ever.
        db.session.execute(
            update(SubscriptionChange)
            .where(
                SubscriptionChange.organization_id == preview.organization_id,
                SubscriptionChange.status == SubscriptionChangeStatus.PENDING,
                SubscriptionChange.created_at < stale_before,
            )
            .values(status=SubscriptionChangeStatus.FAILED, outcome="abandoned", finished_at=utcnow())
        )
        retried = db.session.execute(
            update(SubscriptionChange)
            .where(
                SubscriptionChange.idempotency_key == key,
                SubscriptionChange.status == SubscriptionChangeStatus.FAILED,
            )
            .values(status=SubscriptionChangeStatus.PENDING, outcome=None, finished_at=None, created_at=utcnow())
            .returning(SubscriptionChange.id)
        ).first()
        if retried is None:
            db.session.add(
                SubscriptionChange(
                    organization_id=preview.organization_id,
                    idempotency_key=key,
                    kind=preview.kind,
                    summary=json.dumps(preview.target.__dict__)[:500],
                    status=SubscriptionChangeStatus.PENDING,
                    actor_user_id=actor_user_id,
                )
            )
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        earlier = db.session.execute(
            select(SubscriptionChange).where(SubscriptionChange.idempotency_key == key)
        ).scalar_one_or_none()
        db.session.rollback()
        if earlier is not None and earlier.status == SubscriptionChangeStatus.APPLIED:
            return ChangeOutcome(applied=True, when=preview.when, action_url=None, duplicate=True)
        if earlier is not None and earlier.status == SubscriptionChangeStatus.PENDING:
            return ChangeOutcome(applied=False, when=preview.when, action_url=None, duplicate=True)
        if earlier is not None and earlier.status == SubscriptionChangeStatus.REFUSED:
            raise StalePreview("This preview is out of date.") from None
        raise StalePreview("Another change to your subscription is being made.") from None
    except BaseException:
        db.session.rollback()
        raise
    return None


def finish(key: str, status: SubscriptionChangeStatus, outcome: str) -> None:
    """Settle a claim (refused, failed) in a transaction of its own."""
    db.session.rollback()
    with committed():
        finish_in_transaction(key, status, outcome)


def finish_in_transaction(key: str, status: SubscriptionChangeStatus, outcome: str) -> None:
    db.session.execute(
        update(SubscriptionChange)
        .where(SubscriptionChange.idempotency_key == key)
        .values(status=status, outcome=outcome[:500], finished_at=utcnow())
    )


def record_applied(
    preview: Preview,
    key: str,
    subscription: dict[str, Any],
    *,
    actor_user_id: int,
    awaiting_payment: str | None = None,
) -> None:
    """The organization takes Stripe's answer to the change, the change is recorded, and the claim is
    settled as applied, in one short transaction. awaiting_payment: Stripe kept the change pending
    until its invoice is paid, so the organization keeps its plan (the answer's items are the old
    ones) and the webhook of the paid invoice brings the new plan."""
    name = "subscription.change_scheduled" if preview.when == When.PERIOD_END else "subscription.changed"
    with committed():
        organization = db.session.get(
            Organization, preview.organization_id, with_for_update=True, populate_existing=True
        )
        if organization is None:
            raise SubscriptionActionNotAllowed("This organization no longer exists.")
        provisioning.apply_subscription_read(organization, subscription, source=f"user:{actor_user_id}")
        domain_events.record(
            "subscription.change_awaiting_payment" if awaiting_payment else name,
            organization_id=organization.id,
            user_id=actor_user_id,
            source=f"user:{actor_user_id}",
            kind=preview.kind,
            tier=preview.target.tier,
            interval=preview.target.interval,
            extra_seats=preview.target.extra_seats,
            charged_today=preview.today if preview.when == When.NOW else 0,
            effective_at=preview.effective_at,
            replaced_scheduled_change=preview.replaces_scheduled_at,
            **({"payment_problem": awaiting_payment} if awaiting_payment else {}),
        )
        outcome = f"awaiting payment: {awaiting_payment}" if awaiting_payment else "applied"
        finish_in_transaction(key, SubscriptionChangeStatus.APPLIED, outcome)
