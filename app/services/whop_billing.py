"""Whop behind BillingService: the only module that uses Whop's SDKs (whop_sdk, standardwebhooks), and
imported only by app/services/billing_service.py (the spec's one-adapter rule; a test enforces it).

It builds the Whop client, translates Whop's errors into billing's, makes each Whop call as a thin
function that takes and returns plain data, and verifies Whop's webhooks. What the answers mean for
an organization is decided in whop_events.py."""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import standardwebhooks
from flask import current_app
from pydantic import ValidationError as PydanticValidationError
from whop_sdk import Whop
from whop_sdk.core.api_error import ApiError as WhopApiError
from whop_sdk.environment import WhopEnvironment

from app.extensions import db
from app.models import Organization, SignupStatus, WhopEvent
from app.services import reconcile_reads, whop_events
from app.services.billing_common import (
    STALE_FORM,
    BillingConfigurationError,
    BillingError,
    CheckoutRedirect,
    CheckoutSessionNotFound,
    EventOutcomes,
    PaymentProviderUnavailable,
    ProviderObjectMissing,
    StaleForm,
    SubscriptionActionNotAllowed,
    UnknownWebhookProvider,
    WebhookRejected,
    as_uuid,
    committed,
    delivery_text,
    found,
    webhook_secrets,
)
from app.services.plans import Tier
from app.services.reconcile import ReconcileReport, SubscriptionDrift
from app.services.signup_service import ProvisionOutcome, ProvisionState, SignupService
from app.services.webhook_store import VerifiedEvent
from app.services.whop_state import minor_units, money_currency

logger = logging.getLogger(__name__)

WHOP_SIGNATURE_TOLERANCE_SECONDS = 300  # standardwebhooks' fixed window: five minutes either way
WHOP_SETTINGS = ("WHOP_API_KEY", "WHOP_WEBHOOK_SECRET", "WHOP_COMPANY_ID")
UNREACHABLE = "We could not reach our payment provider. Nothing was charged; please try again."


def configured() -> bool:
    """Whether Whop is on: its key, webhook secret and account are all set."""
    config = current_app.config
    return all(config.get(name) for name in WHOP_SETTINGS)


def client() -> Whop:
    """The configured Whop client; a missing setting fails here, naming the variable."""
    whop: Whop | None = current_app.extensions.get("whop_client")
    if whop is not None:
        return whop
    config = current_app.config
    missing = [name for name in WHOP_SETTINGS if not config.get(name)]
    if missing:
        raise BillingConfigurationError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: Whop credentials "
            "come only from the environment (see .env.example)"
        )
    api = config.get("WHOP_API_BASE") or WhopEnvironment.PRODUCTION.api
    environment = (
        WhopEnvironment.PRODUCTION if api == WhopEnvironment.PRODUCTION.api else WhopEnvironment(api=api, vault=api)
    )
    whop = Whop(
        token=config["WHOP_API_KEY"],
        environment=environment,
        max_retries=config["WHOP_MAX_RETRIES"],
        timeout=config["WHOP_TIMEOUT_SECONDS"],
    )
    current_app.extensions["whop_client"] = whop
    return whop


@contextmanager
def calling_whop(action: str) -> Iterator[None]:
    """Whop's errors as ours, as BillingService._calling_stripe does for Stripe's."""
    try:
        yield
    except WhopApiError as exc:
        if exc.status_code in (401, 403):
            logger.error("Whop rejected our credentials while trying to %s: %s", action, exc.body)
            raise BillingConfigurationError("The payment provider rejected our credentials.") from exc
        logger.warning("Whop error while trying to %s: %s %s", action, exc.status_code, exc.body)
        if exc.status_code == 404:
            raise ProviderObjectMissing(UNREACHABLE) from exc
        raise PaymentProviderUnavailable(UNREACHABLE) from exc
    except (httpx.HTTPError, PydanticValidationError) as exc:
        logger.warning("Whop unreachable while trying to %s: %s", action, type(exc).__name__)
        raise PaymentProviderUnavailable(UNREACHABLE) from exc


class WhopCalls:
    """Whop's API as billing uses it (the WhopReads the appliers are handed, and the writes)."""

    def retrieve_membership(self, membership_id: str) -> dict[str, Any]:
        with calling_whop("read a membership"):
            membership = client().memberships.retrieve(membership_id)
        dumped: dict[str, Any] = membership.model_dump(mode="json")
        return dumped

    def retrieve_membership_for_page(self, membership_id: str) -> dict[str, Any]:
        """A page's read of a membership (the operations console's comparison): bounded like Stripe's
        page reads, by STRIPE_PAGE_READ_TIMEOUT_SECONDS and no retries, so a slow Whop costs the page
        its live column, not the page."""
        options: Any = {"timeout": current_app.config["STRIPE_PAGE_READ_TIMEOUT_SECONDS"], "max_retries": 0}
        with calling_whop("read a membership for a page"):
            membership = client().memberships.retrieve(membership_id, request_options=options)
        dumped: dict[str, Any] = membership.model_dump(mode="json")
        return dumped

    def list_memberships(self) -> dict[str, dict[str, Any]]:
        """Every membership of our Whop account, by id (reconcile)."""
        with calling_whop("list memberships for reconcile"):
            return {
                membership.id: membership.model_dump(mode="json")
                for membership in client().memberships.list(account_id=current_app.config["WHOP_COMPANY_ID"], first=100)
            }

    def list_payments(self, membership_id: str, *, limit: int) -> list[dict[str, Any]]:
        """A membership's payments, newest first, at most `limit` (the billing page's history and card)."""
        found: list[dict[str, Any]] = []
        with calling_whop("list a membership's payments"):
            pager = client().payments.list(
                account_id=current_app.config["WHOP_COMPANY_ID"], membership_id=membership_id, first=limit
            )
            for payment in pager:
                found.append(payment.model_dump(mode="json"))
                if len(found) >= limit:
                    break
        return found

    def create_checkout(self, plan_id: str, *, reference: str, redirect_url: str) -> tuple[str, str | None]:
        """A checkout configuration for the plan carrying the pending signup's id in its metadata (copied
        by Whop onto the membership); its id and purchase URL."""
        with calling_whop("create a checkout"):
            checkout = client().checkout_configurations.create(
                plan_id=plan_id,
                account_id=current_app.config["WHOP_COMPANY_ID"],
                metadata={"purpose": "signup", "pending_signup_id": reference},
                redirect_url=redirect_url,
                # Derived from the signup: a retried request returns the same checkout.
                request_options={"additional_headers": {"Idempotency-Key": f"signup-whop-checkout-{reference}"}},
            )
        return checkout.id, checkout.purchase_url

    def change_membership(
        self, membership_id: str, action: str, *, idempotency_key: str
    ) -> tuple[dict[str, Any], bool]:
        """Cancel at period end, cancel now, or resume a membership: Whop's answer, and whether it is
        a replay of an earlier request with this key (Whop's Idempotent-Replayed header)."""
        options: Any = {"additional_headers": {"Idempotency-Key": idempotency_key}}
        memberships = client().memberships.with_raw_response
        with calling_whop(action.replace("-", " ") + " a membership"):
            if action == "cancel-period-end":
                answer = memberships.cancel(membership_id, cancel_at_period_end=True, request_options=options)
            elif action == "cancel-now":
                answer = memberships.cancel(membership_id, request_options=options)
            elif action == "resume":
                answer = memberships.update(membership_id, cancel_at_period_end=False, request_options=options)
            else:  # pragma: no cover - the actions above are the only callers
                raise SubscriptionActionNotAllowed("Whop does not support that change.")
        replayed = {k.lower(): v for k, v in answer.headers.items()}.get("idempotent-replayed") == "true"
        dumped: dict[str, Any] = answer.data.model_dump(mode="json")
        return dumped, replayed

    def cancel_now(self, membership_id: str, *, idempotency_key: str) -> dict[str, Any]:
        """End a membership at once (a conflict's settlement); one that already ended is read as it is."""
        options: Any = {"additional_headers": {"Idempotency-Key": idempotency_key}}
        membership = self.retrieve_membership(membership_id)
        if membership.get("status") in ("canceled", "expired", "completed"):
            return membership
        with calling_whop("cancel a membership"):
            answer = client().memberships.cancel(membership_id, request_options=options)
        dumped: dict[str, Any] = answer.model_dump(mode="json")
        return dumped

    def refund(self, payment_id: str, *, idempotency_key: str) -> dict[str, Any]:
        options: Any = {"additional_headers": {"Idempotency-Key": idempotency_key}}
        with calling_whop("refund a payment"):
            payment = client().payments.refund(payment_id, request_options=options)
        dumped: dict[str, Any] = payment.model_dump(mode="json")
        return dumped


calls = WhopCalls()


# --- Signup and the owner's actions through Whop (BillingService's entry points call these) -----------


def open_signup_checkout(tier: Tier, pending_signup_id: uuid.UUID) -> CheckoutRedirect:
    """A Whop checkout for a stored pending signup, carrying its id in the metadata (copied by Whop
    onto the membership); a checkout Whop does not open fails the signup."""
    reference = str(pending_signup_id)
    try:
        checkout_id, purchase_url = calls.create_checkout(
            str(tier.whop_plan_id),
            reference=reference,
            redirect_url=f"{current_app.config['APP_BASE_URL']}/billing/complete-signup-from-whop?signup={reference}",
        )
    except BillingError as exc:
        SignupService.mark_signup_failed(pending_signup_id, f"Whop checkout not created: {exc}")
        raise
    if not purchase_url:
        SignupService.mark_signup_failed(pending_signup_id, "Whop checkout has no purchase URL")
        raise PaymentProviderUnavailable("We could not reach our payment provider. Nothing was charged.")
    SignupService.attach_checkout_session(pending_signup_id, checkout_id)
    return CheckoutRedirect(url=purchase_url, pending_signup_id=pending_signup_id, checkout_session_id=checkout_id)


def complete_signup_from_redirect(pending_signup_id: str, membership_id: str) -> ProvisionOutcome:
    """Whop's redirect after payment: provision (or find provisioned) the signup. The membership is
    read from Whop (no transaction open meanwhile) and must carry this signup's id."""
    if as_uuid(pending_signup_id or "") is None or not whop_events.WHOP_MEMBERSHIP_ID.fullmatch(membership_id or ""):
        raise CheckoutSessionNotFound("That checkout link is not valid.")
    try:
        pending = found(SignupService.pending_signup(pending_signup_id))
        if pending.status == SignupStatus.COMPLETED:
            return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
    finally:
        db.session.rollback()
    try:
        membership = calls.retrieve_membership(membership_id)
    except ProviderObjectMissing as exc:
        raise CheckoutSessionNotFound("We could not find a signup for that checkout.") from exc
    if str((membership.get("metadata") or {}).get("pending_signup_id")) != pending_signup_id:
        raise CheckoutSessionNotFound("We could not find a signup for that checkout.")
    with committed():
        outcome = whop_events.provision_membership(membership, source="web")
    return outcome


def reconcile_read(organization_id: int | None, report: ReconcileReport) -> list[SubscriptionDrift]:
    """Whop's memberships against the Whop-billed organizations (one, or all): listed at once for all,
    else read one by one; a membership Whop does not answer for is a problem in the report."""
    held = reconcile_reads.held_whop_memberships(organization_id)
    if not held:
        return []
    listed = calls.list_memberships() if organization_id is None else {}
    for membership_id in held:
        if membership_id not in listed:
            try:
                listed[membership_id] = calls.retrieve_membership(membership_id)
            except PaymentProviderUnavailable as exc:
                report.problems.append(f"Whop membership {membership_id}: {exc.__cause__ or exc}")
    return reconcile_reads.compare_with_whop(held, listed)


def manage_url(organization: Organization) -> str:
    """The membership's own management page on Whop (a Whop-billed organization's "manage billing")."""
    membership_id = organization.billing_subscription_id
    if not membership_id:
        raise SubscriptionActionNotAllowed("This organization has no billing account yet.")
    db.session.rollback()  # release the connection while Whop answers
    url = calls.retrieve_membership(membership_id).get("manage_url")
    if not url:
        raise PaymentProviderUnavailable("Whop did not give a management page for this membership.")
    return str(url)


def owner_change(organization_id: int, membership_id: str, action: str, key: str, actor_user_id: int) -> list[str]:
    """Cancel at period end, cancel now, or resume a Whop membership (BillingService's checks have
    passed); the organization takes Whop's answer in a short transaction. A form submitted again
    later (the back button, a second tab) gets Whop's stored answer for its key, which may be older
    than the membership: then the membership is read as it is now, applied, and StaleForm says so."""
    membership, replayed = calls.change_membership(membership_id, action, idempotency_key=key)
    if replayed:
        membership = calls.retrieve_membership(membership_id)
    with committed():
        organization = whop_events.lock_organization(membership_id)
        changes: list[str] = []
        if organization is not None and organization.id == organization_id:
            changes = whop_events.apply_membership_read(organization, membership, source=f"user:{actor_user_id}")
    if replayed:
        raise StaleForm(STALE_FORM)
    return changes


def cancel_and_refund(membership_id: str, *, key: str) -> dict[str, Any]:
    """Settle a Whop membership no organization may keep (a second paid signup of an email) at Whop:
    end it now and refund its paid payments, with idempotency keys `<key>-cancel` and
    `<key>-refund-<payment>`; the result has the shape of Stripe's settlement (amounts in cents)."""
    membership = calls.cancel_now(membership_id, idempotency_key=f"{key}-cancel")
    result: dict[str, Any] = {
        "whop_membership_id": membership_id,
        "subscription_status": membership.get("status"),
        "refund_id": None,
        "amount_refunded": 0,
        "currency": None,
    }
    for listed in calls.list_payments(membership_id, limit=100):
        if listed.get("status") != "paid":
            continue
        payment = listed
        if listed.get("refundable"):
            payment = calls.refund(str(listed["id"]), idempotency_key=f"{key}-refund-{listed['id']}")
        refunded = minor_units(payment.get("refunded_amount")) or 0
        if refunded:
            result["refund_id"] = result["refund_id"] or payment.get("id")
            result["amount_refunded"] += refunded
            result["currency"] = money_currency(payment.get("refunded_amount"), payment.get("currency"))
    return result


class WhopWebhooks:
    """Whop as a webhook provider: Standard Webhooks verification (webhook-id, webhook-timestamp,
    webhook-signature; ±5 minutes; any of the configured secrets), keyed as Whop keys it, with the
    secret's own bytes; stored in whop_event, idempotent on webhook-id."""

    name = "whop"
    event_model = WhopEvent

    def authenticate(self, payload: bytes, headers: Mapping[str, str]) -> str:
        if not configured():
            # Whop is off (WHOP_* unset): its endpoint does not exist, as for any unknown provider.
            raise UnknownWebhookProvider(self.name)
        secrets = webhook_secrets("WHOP_WEBHOOK_SECRET", "Whop webhooks")
        lowered = {key.lower(): value for key, value in headers.items()}
        signature_headers: dict[str, str] = {
            name: lowered[name] for name in ("webhook-id", "webhook-timestamp", "webhook-signature") if name in lowered
        }
        if len(signature_headers) < 3:
            raise WebhookRejected("missing webhook-id, webhook-timestamp or webhook-signature header")
        if not all(value.isascii() for value in signature_headers.values()):
            raise WebhookRejected("malformed webhook signature headers")
        text = delivery_text(payload)
        reason = "signature does not match"
        for secret in secrets:
            # Whop signs with the secret's own bytes; standardwebhooks base64-decodes its key, so it is
            # handed the secret base64-encoded (see the Whop section of docs/system/BILLING.md).
            key = base64.b64encode(secret.encode("utf-8")).decode("ascii")
            try:
                standardwebhooks.Webhook(key).verify(text, signature_headers, json_parse=False)
                break
            except standardwebhooks.WebhookVerificationError as exc:
                message = str(exc)
                if message.startswith("Message timestamp too"):
                    reason = "timestamp outside the tolerance zone"
                elif message == "Invalid Signature Headers":
                    reason = "malformed webhook-timestamp header"
            except (ValueError, binascii.Error):
                # standardwebhooks lets a malformed webhook-signature escape as one of these.
                reason = "malformed webhook-signature header"
        else:
            raise WebhookRejected(reason)
        return text

    def event_id(self, text: str, headers: Mapping[str, str]) -> str | None:
        return _header(headers, "webhook-id")  # the signed webhook-id is the event id

    def parse(self, text: str, headers: Mapping[str, str]) -> VerifiedEvent:
        sent_at = int(float(_header(headers, "webhook-timestamp") or ""))  # verified: a number
        return whop_events.parse_event(text, _header(headers, "webhook-id") or "", sent_at)

    def ignore_reason(self, event: VerifiedEvent) -> str | None:
        return whop_events.ignore_reason(event)

    def object_key(self, event: VerifiedEvent) -> str:
        return whop_events.object_key(event)

    def apply_batch(self, object_key: str, events: list[VerifiedEvent]) -> EventOutcomes:
        return whop_events.apply_batch(object_key, events, calls)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by its lower-case name, whatever case the delivery wrote it in."""
    return {key.lower(): value for key, value in headers.items()}.get(name)  # as authenticate reads them


WhopClient = Whop  # the client's type, for BillingService.ensure_whop's signature
