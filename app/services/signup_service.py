"""SignupService: a customer's signup, from the intent stored before they pay to the organization and
owner created once Stripe says the checkout is paid. It never talks to Stripe; BillingService does and
hands it what Stripe said. The states and who moves them are in docs/system/BILLING.md."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from app.extensions import db
from app.models import BillingProvider, BillingStatus, Organization, PendingSignup, SignupStatus, User, UserRole
from app.models.types import utcnow
from app.services import domain_events
from app.services.auth_service import active_account_id, hash_password, normalise_email, release_removed_address
from app.services.subscription_state import SubscriptionState, new_organization


class SignupError(Exception):
    """A signup cannot go ahead; the message is meant for the person signing up."""


# A resubmitted signup form reuses its open Checkout Session only if the session has this long left to be
# paid in; otherwise a new one is made (open_signup_to_resume).
RESUME_MIN_MINUTES = 10


class SignupInProgress(SignupError):
    def __init__(self) -> None:
        super().__init__("Another signup for this email is being started right now. Try again in a moment.")


class ProvisionState(StrEnum):
    PROVISIONED = "provisioned"
    ALREADY_PROVISIONED = "already_provisioned"
    AWAITING_PAYMENT = "awaiting_payment"
    CONFLICT = "conflict"  # paid, but the email got an account through another checkout
    SURPLUS = "surplus"  # a resubscription paid while the organization already had a live subscription


@dataclass(frozen=True)
class ProvisionOutcome:
    state: ProvisionState
    pending_signup_id: uuid.UUID | None = None
    organization_id: int | None = None
    owner_user_id: int | None = None
    # For CONFLICT and SURPLUS: what was done at Stripe (see BillingService._cancel_and_refund).
    settlement: dict[str, Any] | None = None


@dataclass(frozen=True)
class NewPendingSignup:
    pending_signup_id: uuid.UUID
    superseded_checkout_session_ids: list[str]


class SignupService:
    @staticmethod
    def email_has_account(email: str) -> bool:
        """Whether an account that can sign in holds the address (a removed teammate's does not)."""
        return active_account_id(email) is not None

    @staticmethod
    def create_pending_signup_record(
        *,
        email: str,
        organization_name: str,
        owner_name: str,
        password: str,
        tier: str,
        addons: dict[str, int],
        ttl: timedelta,
    ) -> NewPendingSignup:
        """Store the intent to sign up. A newer attempt by the same email supersedes any open one
        (it becomes expired and its checkout is expired at Stripe by the caller).

        An email that already has an account is answered exactly as a new one (the form must not tell
        anyone which addresses have accounts): the attempt goes on to checkout, and the address's mailbox
        is told it already has an account (``signup.started_for_existing_account``, emailed by the worker).
        Paying anyway ends in the conflict path: the checkout is canceled and refunded."""
        email = normalise_email(email)
        existing_user_id = active_account_id(email)
        superseded = db.session.execute(
            update(PendingSignup)
            .where(PendingSignup.email == email, PendingSignup.status == SignupStatus.PENDING)
            .values(
                status=SignupStatus.EXPIRED,
                failure_reason="superseded by a newer signup attempt",
                password_hash=None,  # retention: an attempt that ended keeps no password
                updated_at=utcnow(),
            )
            .returning(PendingSignup.id, PendingSignup.checkout_session_id)
        ).all()
        pending = PendingSignup(
            email=email,
            organization_name=organization_name.strip(),
            owner_name=owner_name.strip(),
            password_hash=hash_password(password),
            tier=tier,
            addons={key: quantity for key, quantity in addons.items() if quantity > 0},
            status=SignupStatus.PENDING,
            expires_at=utcnow() + ttl,
        )
        db.session.add(pending)
        try:
            db.session.flush()
        except IntegrityError:
            # The partial unique index on open attempts: a concurrent attempt won the race.
            db.session.rollback()
            raise SignupInProgress() from None
        for row in superseded:
            domain_events.record("signup.superseded", source="web", pending_signup_id=str(row.id))
        domain_events.record("signup.started", source="web", pending_signup_id=str(pending.id), tier=tier)
        if existing_user_id is not None:
            domain_events.record(
                "signup.started_for_existing_account",
                user_id=existing_user_id,
                source="web",
                pending_signup_id=str(pending.id),
            )
        db.session.commit()
        return NewPendingSignup(pending.id, [row.checkout_session_id for row in superseded if row.checkout_session_id])

    @staticmethod
    def open_signup_to_resume(
        pending_signup_id: str | None, *, email: str, tier: str, addons: dict[str, int]
    ) -> tuple[uuid.UUID, str] | None:
        """The open signup this browser started, if the form was sent again with the same email, tier and
        add-ons and its checkout has at least RESUME_MIN_MINUTES left: its Checkout Session is offered
        again instead of a new one (each costs a Stripe object). Only the browser that started it may
        resume it; anyone else's attempt supersedes it as before, so nobody can change another person's
        open signup. The caller still checks at Stripe that the session is open and sells the same items."""
        pending = SignupService.pending_signup(pending_signup_id)
        wanted = {key: quantity for key, quantity in addons.items() if quantity > 0}
        resumable = (
            pending is not None
            and pending.status == SignupStatus.PENDING
            and pending.checkout_session_id is not None
            and pending.checkout_session_id.startswith("cs_")
            and pending.email == normalise_email(email)
            and pending.tier == tier
            and (pending.addons or {}) == wanted
            and pending.expires_at > utcnow() + timedelta(minutes=RESUME_MIN_MINUTES)
        )
        found = (pending.id, str(pending.checkout_session_id)) if resumable and pending is not None else None
        db.session.rollback()  # nothing stays open while the caller asks Stripe
        return found

    @staticmethod
    def resume_open_signup(
        pending_signup_id: uuid.UUID,
        checkout_session_id: str,
        *,
        organization_name: str,
        owner_name: str,
        password: str,
    ) -> bool:
        """Keep the open signup with the form's latest answers (its checkout pays for the same items).
        False if it ended meanwhile (paid, superseded, expired): the caller starts a new one."""
        resumed = db.session.execute(
            update(PendingSignup)
            .where(
                PendingSignup.id == pending_signup_id,
                PendingSignup.status == SignupStatus.PENDING,
                PendingSignup.checkout_session_id == checkout_session_id,
            )
            .values(
                organization_name=organization_name.strip(),
                owner_name=owner_name.strip(),
                password_hash=hash_password(password),
                updated_at=utcnow(),
            )
        )
        if resumed.rowcount != 1:  # type: ignore[attr-defined]
            db.session.rollback()
            return False
        domain_events.record("signup.resumed", source="web", pending_signup_id=str(pending_signup_id))
        db.session.commit()
        return True

    @staticmethod
    def attach_checkout_session(pending_signup_id: uuid.UUID, checkout_session_id: str) -> None:
        db.session.execute(
            update(PendingSignup)
            .where(PendingSignup.id == pending_signup_id, PendingSignup.checkout_session_id.is_(None))
            .values(checkout_session_id=checkout_session_id, updated_at=utcnow())
        )
        db.session.commit()

    @staticmethod
    def mark_signup_failed(pending_signup_id: uuid.UUID, reason: str) -> None:
        """The checkout could not even be created; the customer sees the form again."""
        db.session.rollback()
        pending = SignupService.lock_pending_signup(pending_signup_id)
        if pending is not None and pending.status == SignupStatus.PENDING:
            SignupService._close(pending, SignupStatus.FAILED, reason, source="web")
        db.session.commit()

    @staticmethod
    def pending_signup(pending_signup_id: uuid.UUID | str | None) -> PendingSignup | None:
        try:
            key = uuid.UUID(str(pending_signup_id))
        except ValueError:
            return None
        return db.session.get(PendingSignup, key)

    @staticmethod
    def lock_pending_signup(pending_signup_id: uuid.UUID | str) -> PendingSignup | None:
        """The pending signup, locked until the transaction ends. Whoever completes a checkout
        (redirect or webhook, any number at once) takes this lock first, so one of them provisions
        and the rest find it done."""
        try:
            key = uuid.UUID(str(pending_signup_id))
        except ValueError:
            return None
        _write_lock_on_sqlite(PendingSignup.id == key)
        return db.session.get(PendingSignup, key, with_for_update=True, populate_existing=True)

    @staticmethod
    def find_pending_signup_for_checkout(
        checkout_session_id: str, *, reference_id: str | None = None
    ) -> PendingSignup | None:
        """The pending signup a checkout belongs to, read without a lock (before Stripe is asked)."""
        if reference_id:
            pending = SignupService.pending_signup(reference_id)
        else:
            pending = db.session.execute(
                select(PendingSignup)
                .where(PendingSignup.checkout_session_id == checkout_session_id)
                .execution_options(populate_existing=True)
            ).scalar_one_or_none()
        if pending is None or pending.checkout_session_id not in (None, checkout_session_id):
            return None
        return pending

    @staticmethod
    def note_subscription_event(pending_signup_id: str) -> None:
        """A subscription event arrived before the signup's organization exists: provisioning that read
        Stripe before now reads it again (a conditional counter, no lock held across Stripe)."""
        try:
            key = uuid.UUID(str(pending_signup_id))
        except ValueError:
            return
        db.session.execute(
            update(PendingSignup)
            .where(PendingSignup.id == key, PendingSignup.status != SignupStatus.COMPLETED)
            .values(subscription_events_seen=PendingSignup.subscription_events_seen + 1)
        )

    @staticmethod
    def lock_pending_signup_for_checkout(
        checkout_session_id: str, *, reference_id: str | None = None
    ) -> PendingSignup | None:
        """The locked pending signup a checkout belongs to, found by our own reference when Stripe
        hands it back, else by the checkout id we recorded."""
        if reference_id:
            pending = SignupService.lock_pending_signup(reference_id)
        else:
            _write_lock_on_sqlite(PendingSignup.checkout_session_id == checkout_session_id)
            pending = db.session.execute(
                select(PendingSignup)
                .where(PendingSignup.checkout_session_id == checkout_session_id)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one_or_none()
        if pending is None or pending.checkout_session_id not in (None, checkout_session_id):
            return None
        # The app may have stopped between creating the checkout and recording its id.
        pending.checkout_session_id = checkout_session_id
        return pending

    @staticmethod
    def complete_pending_signup_from_checkout(
        pending: PendingSignup,
        checkout_session: dict[str, Any],
        subscription: SubscriptionState,
        *,
        source: str,
        billing_provider: str = BillingProvider.STRIPE,
    ) -> ProvisionOutcome:
        """Create the organization and its owner from a paid checkout (a Stripe Checkout Session, or a
        Whop checkout and its membership), in the caller's transaction. The caller holds the lock from
        lock_pending_signup."""
        if pending.status == SignupStatus.COMPLETED:
            return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
        if SignupService.email_has_account(pending.email):
            return SignupService._conflict(pending, checkout_session, subscription, source=source)
        organization = new_organization(
            pending.organization_name,
            pending.tier,
            subscription,
            signup_checkout_session_id=checkout_session["id"],
            billing_provider=billing_provider,
            billing_as_of=int(utcnow().timestamp()),
            last_invoice_id=_id_of(checkout_session.get("invoice")),
            last_payment_status="paid" if checkout_session.get("payment_status") == "paid" else None,
            last_payment_at=utcnow() if checkout_session.get("payment_status") == "paid" else None,
        )
        if organization.billing_customer_id is None:
            organization.billing_customer_id = _id_of(checkout_session.get("customer"))
        outcome = SignupService._create_organization_and_owner(
            pending, organization, source=source, checkout_session=checkout_session, subscription=subscription
        )
        if (
            outcome.state == ProvisionState.PROVISIONED
            and organization.last_payment_status == "paid"
            and (organization.last_invoice_id)
        ):
            # The first invoice's payment, once: its invoice.paid, before or after this, finds it
            # recorded (the same invoice, paid) and records nothing (its receipt hangs on this).
            domain_events.record(
                "billing.payment_succeeded",
                organization_id=organization.id,
                source=source,
                invoice_id=organization.last_invoice_id,
                amount_paid=checkout_session.get("amount_total"),
                currency=checkout_session.get("currency"),
            )
        return outcome

    @staticmethod
    def complete_free_signup(pending_signup_id: uuid.UUID, *, source: str) -> ProvisionOutcome:
        """Create the organization and its owner for a signup to the free plan, at once: no checkout,
        no payment provider, no subscription. Exactly once: the pending signup is locked and completed
        here, in the caller's transaction; a second call finds it completed. An email that already has
        an account gets no second one (CONFLICT; the mailbox is told, as for a paid signup)."""
        pending = SignupService.lock_pending_signup(pending_signup_id)
        if pending is None:
            raise SignupError("That signup is no longer open. Please start again.")
        if pending.status == SignupStatus.COMPLETED:
            return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
        if pending.status != SignupStatus.PENDING:
            raise SignupError("That signup is no longer open. Please start again.")
        if SignupService.email_has_account(pending.email):
            SignupService._close(pending, SignupStatus.FAILED, "email already has an account", source=source)
            return ProvisionOutcome(ProvisionState.CONFLICT, pending.id)
        organization = Organization(
            name=pending.organization_name,
            tier=pending.tier,
            billing_status=BillingStatus.ACTIVE,
            billing_provider=BillingProvider.STRIPE,  # who will bill it once the owner upgrades
        )
        return SignupService._create_organization_and_owner(pending, organization, source=source)

    @staticmethod
    def _create_organization_and_owner(
        pending: PendingSignup,
        organization: Organization,
        *,
        source: str,
        checkout_session: dict[str, Any] | None = None,
        subscription: SubscriptionState | None = None,
    ) -> ProvisionOutcome:
        """The one place a signup becomes an organization and its owner (paid, with its checkout and
        subscription, or free), with the domain events every signup records; the pending signup is
        completed and its password erased."""
        release_removed_address(pending.email, source=source)
        owner = User(
            organization=organization,
            email=pending.email,
            name=pending.owner_name,
            password_hash=pending.password_hash or "",
            role=UserRole.OWNER,
        )
        try:
            with db.session.begin_nested():
                db.session.add_all([organization, owner])
                db.session.flush()
        except IntegrityError:
            # Another checkout of the same email (a superseded attempt paid anyway, a second tab)
            # created the account in a transaction that committed while this one waited on the
            # unique email: this payment is a conflict like any other, not an error.
            if checkout_session is None or subscription is None:  # a free signup: nothing to refund
                SignupService._close(pending, SignupStatus.FAILED, "email already has an account", source=source)
                return ProvisionOutcome(ProvisionState.CONFLICT, pending.id)
            return SignupService._conflict(pending, checkout_session, subscription, source=source)
        domain_events.record(
            "organization.created",
            organization_id=organization.id,
            source=source,
            name=organization.name,
            tier=organization.tier,
            billing_status=organization.billing_status,
            **_provider_ids(organization),
            addons=organization.addon_quantities(),
        )
        domain_events.record(
            "user.created", organization_id=organization.id, user_id=owner.id, source=source, role=owner.role
        )
        session = checkout_session or {}
        paid = session.get("payment_status") in ("paid", "no_payment_required")
        domain_events.record(
            "signup.completed",
            organization_id=organization.id,
            user_id=owner.id,
            source=source,
            pending_signup_id=str(pending.id),
            checkout_session_id=session.get("id"),
            # The receipt: what the checkout charged (None while an asynchronous payment settles).
            amount_paid=session.get("amount_total") if paid else None,
            currency=session.get("currency"),
        )
        pending.status = SignupStatus.COMPLETED
        pending.completed_at = utcnow()
        pending.organization_id = organization.id
        pending.password_hash = None  # the owner's account holds it now
        pending.failure_reason = None
        return ProvisionOutcome(ProvisionState.PROVISIONED, pending.id, organization.id, owner.id)

    @staticmethod
    def _conflict(
        pending: PendingSignup, checkout_session: dict[str, Any], subscription: SubscriptionState, *, source: str
    ) -> ProvisionOutcome:
        """A paid checkout for an email that has an account: closed as failed and recorded as a
        conflict, which the caller (or the worker's signup.conflict consumer) settles."""
        if pending.status != SignupStatus.FAILED or pending.stripe_subscription_id is None:
            SignupService._close(
                pending, SignupStatus.FAILED, "email already has an account; refund this checkout", source=source
            )
        pending.stripe_subscription_id = subscription.subscription_id
        if pending.settled_at is not None:
            return ProvisionOutcome(ProvisionState.CONFLICT, pending.id, settlement=pending.settlement)
        domain_events.record(
            "signup.conflict",
            source=source,
            pending_signup_id=str(pending.id),
            checkout_session_id=checkout_session["id"],
            stripe_subscription_id=subscription.subscription_id,
        )
        return ProvisionOutcome(ProvisionState.CONFLICT, pending.id)

    @staticmethod
    def outcome_for(pending: PendingSignup, state: ProvisionState) -> ProvisionOutcome:
        owner_id = db.session.execute(
            select(User.id).where(User.organization_id == pending.organization_id, User.role == UserRole.OWNER)
        ).scalar_one_or_none()
        return ProvisionOutcome(state, pending.id, pending.organization_id, owner_id)

    @staticmethod
    def close_pending_signup(
        *, checkout_session_id: str, reference_id: str | None, status: SignupStatus, reason: str, source: str
    ) -> str:
        """A checkout expired or its payment failed: an open signup for it ends. Returns what happened."""
        pending = SignupService.lock_pending_signup_for_checkout(checkout_session_id, reference_id=reference_id)
        if pending is None:
            return "no signup for this checkout"
        if pending.status != SignupStatus.PENDING:
            return f"signup already {pending.status}"
        SignupService._close(pending, status, reason, source=source)
        return f"signup {status}"

    @staticmethod
    def _close(pending: PendingSignup, status: SignupStatus, reason: str, *, source: str) -> None:
        pending.status = status
        pending.failure_reason = reason
        pending.password_hash = None  # retention: a signup that ended keeps no password
        domain_events.record(f"signup.{status}", source=source, pending_signup_id=str(pending.id), reason=reason)


def _write_lock_on_sqlite(where: Any) -> None:
    """SQLite (the development stand-in) ignores FOR UPDATE: a write first takes its one database write
    lock, so a second provisioning of the same signup (the redirect and a webhook at once) waits for
    this transaction and then reads the signup as it left it, as the row lock does on PostgreSQL."""
    if db.session.get_bind().dialect.name == "sqlite":
        db.session.execute(
            update(PendingSignup).where(where).values(updated_at=PendingSignup.updated_at),
            execution_options={"synchronize_session": False},
        )


def _id_of(value: str | dict[str, Any] | None) -> str | None:
    """An expandable Stripe field: an id, or the expanded object."""
    if isinstance(value, dict):
        return value.get("id")
    return value


def _provider_ids(organization: Organization) -> dict[str, Any]:
    """The provider's ids for organization.created: named as before for Stripe, neutrally otherwise."""
    if organization.billing_provider == BillingProvider.STRIPE:
        return {
            "stripe_customer_id": organization.billing_customer_id,
            "stripe_subscription_id": organization.billing_subscription_id,
        }
    return {
        "billing_provider": organization.billing_provider,
        "billing_customer_id": organization.billing_customer_id,
        "billing_subscription_id": organization.billing_subscription_id,
    }
