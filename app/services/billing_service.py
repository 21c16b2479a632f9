"""BillingService: the one billing authority, and the only module that uses a payment SDK (stripe,
whop_sdk, standardwebhooks).

It configures Stripe, resolves plans to prices, creates Checkout and customer-portal sessions, cancels
and resumes subscriptions, provisions completed checkouts (handing signups to SignupService) and
receives webhooks from every payment provider through handle_webhook_event. The behaviour is written
down in docs/system/BILLING.md; the callers are listed in docs/system/SERVICES.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import stripe
from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import joinedload
from stripe.params import RefundCreateParams
from stripe.params.checkout import (
    SessionCreateParams,
    SessionCreateParamsLineItem,
    SessionCreateParamsSubscriptionData,
)

from app.extensions import cache, db
from app.models import (
    BillingProvider,
    BillingStatus,
    CataloguePrice,
    Organization,
    PendingSignup,
    ResubscribeCheckout,
    ResubscribeStatus,
    SignupStatus,
    StripeEvent,
    StripeEventStatus,
    SubscriptionChange,
    SubscriptionChangeStatus,
    WhopEvent,
)
from app.models.types import utcnow
from app.services import domain_events, outbox, queue, stripe_objects, webhook_store, whop_billing, whop_events
from app.services import reconcile as reconciliation
from app.services.billing_common import (
    API_VERSION_FORMAT,
    CANCELLABLE,
    CHECKOUT_SESSION_ID,
    ENDED,
    EVENT_TYPE,
    REQUEST_TOKEN,
    BillingConfigurationError,
    BillingError,
    ChangeOutcome,
    CheckoutRedirect,
    CheckoutSessionNotFound,
    PaymentProviderUnavailable,
    PriceUnavailableError,
    ProviderObjectMissing,
    StalePreview,
    SubscriptionActionNotAllowed,
    UnknownTierError,
    UnknownWebhookProvider,
    WebhookProvider,
    WebhookRejected,
    WebhookResult,
    as_uuid,
    checkout_is_paid,
    committed,
    describe_failure,
    found,
    id_of,
    plan_catalogue,
    portable_insert,
)
from app.services.billing_details import (
    BillingDetails,
    CardOnFile,
    InvoiceRow,
    ScheduledChange,
    SubscriptionFacts,
    UpcomingInvoice,
    scheduled_change_from_stripe,
)
from app.services.billing_details import _id as billing_details_id
from app.services.catalogue_mapping import CatalogueEntry, KnownPrice, KnownPrices, entry_for_lookup_key
from app.services.entitlements import entitlements_for
from app.services.plan_change import (
    CurrentPlan,
    PlanChangeError,
    Preview,
    PreviewLine,
    Target,
    When,
    new_recurring,
    read_current,
    schedule_phases,
    summarize_invoice_preview,
    timing,
    update_items,
    validate_target,
)
from app.services.plans import Tier
from app.services.pricing import PriceInfo
from app.services.signup_service import NewPendingSignup, ProvisionOutcome, ProvisionState, SignupService
from app.services.stripe_objects import MalformedObject
from app.services.subscription_state import SubscriptionState, apply_subscription_state
from app.services.webhook_store import VerifiedEvent
from app.services.whop_state import subscription_state_from_whop

__all__ = [  # what routes, the CLI, the worker and tests import from the authority
    "HANDLED_STRIPE_EVENTS",
    "REQUEST_TOKEN",
    "STRIPE_API_VERSION",
    "STRIPE_SIGNATURE_TOLERANCE_SECONDS",
    "WEBHOOK_QUEUE",
    "BillingConfigurationError",
    "BillingError",
    "BillingService",
    "CheckoutSessionNotFound",
    "PaymentProviderUnavailable",
    "StalePreview",
    "UnknownWebhookProvider",
    "WebhookRejected",
    "new_request_token",
    "plan_catalogue",
]

logger = logging.getLogger(__name__)

# Pinned to the version stripe==16.1.0 is typed for; webhook endpoints should use the same version.
STRIPE_API_VERSION = "2026-10-28.endive"
STRIPE_SIGNATURE_TOLERANCE_SECONDS = 300
# Stripe timestamps are whole seconds and our clock is not Stripe's: an event this close to the state
# we hold cannot be ordered against it, so the subscription is read from Stripe instead.
# What a Stripe event's id looks like (its type and API version: billing_common).
STRIPE_EVENT_ID = re.compile(r"evt_[A-Za-z0-9_]{1,251}")
# The billing page's reads: no retries (the page would rather say "not available" than wait).
PAGE_READ: stripe.RequestOptions = {"max_network_retries": 0}
BILLING_READ_PARTS = ("subscription", "upcoming", "schedule", "payment_method", "invoices")
INVOICE_HISTORY_LENGTH = 12


def new_request_token() -> str:
    """A token rendered into an owner's action form; it makes a double-submitted form one Stripe call."""
    return uuid.uuid4().hex


class BillingService:
    _webhook_providers: dict[str, WebhookProvider] = {}

    # --- Stripe ---------------------------------------------------------------------------------

    @classmethod
    def ensure_stripe(cls) -> stripe.StripeClient:
        """The configured Stripe client; a missing credential fails here, naming the variable."""
        client: stripe.StripeClient | None = current_app.extensions.get("stripe_client")
        if client is not None:
            return client
        config = current_app.config
        missing = [name for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET") if not config.get(name)]
        if missing:
            raise BillingConfigurationError(
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: billing credentials "
                "come only from the environment (see .env.example)"
            )
        api_base = config.get("STRIPE_API_BASE")
        client = stripe.StripeClient(
            config["STRIPE_SECRET_KEY"],
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=config["STRIPE_MAX_NETWORK_RETRIES"],
            http_client=stripe.RequestsClient(timeout=config["STRIPE_TIMEOUT_SECONDS"]),
        )
        current_app.extensions["stripe_client"] = client
        return client

    @classmethod
    def _stripe_for_page_reads(cls) -> stripe.StripeClient:
        """A client for the billing page's reads: a short timeout (STRIPE_PAGE_READ_TIMEOUT_SECONDS) and
        no retries, so a slow Stripe costs the page seconds, not minutes; the page says what is missing."""
        client: stripe.StripeClient | None = current_app.extensions.get("stripe_read_client")
        if client is not None:
            return client
        cls.ensure_stripe()  # the same credentials check
        config = current_app.config
        api_base = config.get("STRIPE_API_BASE")
        client = stripe.StripeClient(
            config["STRIPE_SECRET_KEY"],
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=config["STRIPE_PAGE_READ_TIMEOUT_SECONDS"]),
        )
        current_app.extensions["stripe_read_client"] = client
        return client

    @staticmethod
    @contextmanager
    def _calling_stripe(action: str) -> Iterator[None]:
        """Stripe's errors as ours: the customer is told to try again, the log keeps Stripe's words."""
        try:
            yield
        except stripe.AuthenticationError as exc:
            logger.error("Stripe rejected our credentials while trying to %s: %s", action, exc.user_message)
            raise BillingConfigurationError("The payment provider rejected our credentials.") from exc
        except stripe.StripeError as exc:
            logger.warning("Stripe error while trying to %s: %s", action, exc.user_message or type(exc).__name__)
            raise PaymentProviderUnavailable(
                "We could not reach our payment provider. Nothing was charged; please try again."
            ) from exc

    @classmethod
    def price_ids_for_lookup_keys(cls, lookup_keys: list[str]) -> dict[str, str]:
        """Stripe price ids by lookup key, cached (PRICE_CACHE_SECONDS) so a signup costs no lookup."""
        prices = cls.prices_for_lookup_keys(lookup_keys)
        return {key: prices[key].id for key in lookup_keys}

    @classmethod
    def prices_for_lookup_keys(cls, lookup_keys: list[str], *, required: bool = True) -> dict[str, PriceInfo]:
        """Stripe's active price (id, amount, currency, interval) for each lookup key, from the Redis price
        cache (PRICE_CACHE_SECONDS) or one lookup at Stripe for those not cached. required: a key with no
        active price raises PriceUnavailableError; otherwise it is left out, and remembered as missing for
        BILLING_READ_FAILURE_SECONDS so pages that show prices do not ask again on every view."""
        keys = list(dict.fromkeys(lookup_keys))
        cached = {
            key: PriceInfo.from_cache(value)
            for key, value in zip(keys, cache.get_many(*(f"stripe-price:{key}" for key in keys)), strict=True)
        }
        missing = [key for key, price in cached.items() if price is None]
        if missing and not required:
            known_missing = cache.get_many(*(f"stripe-price-missing:{key}" for key in missing))
            missing = [key for key, flag in zip(missing, known_missing, strict=True) if not flag]
        found: dict[str, PriceInfo] = {}
        if missing:
            try:
                found = cls._fetch_prices(missing)
            except BillingError:
                if required:
                    raise
                cls._remember_missing_prices(missing)
                return {key: price for key, price in cached.items() if price is not None}
            cache.set_many({f"stripe-price:{key}": price.to_cache() for key, price in found.items()})
            cls._remember_missing_prices([key for key in missing if key not in found])
        prices = {key: price for key, price in cached.items() if price is not None} | found
        unknown = [key for key in keys if key not in prices]
        if unknown and required:
            raise PriceUnavailableError(
                f"No active Stripe price has the lookup key {', '.join(repr(k) for k in unknown)}."
            )
        return {key: prices[key] for key in keys if key in prices}

    @classmethod
    def _fetch_prices(cls, lookup_keys: list[str]) -> dict[str, PriceInfo]:
        """Active prices by lookup key, straight from Stripe (ten lookup keys per request, its limit)."""
        client = cls.ensure_stripe()
        found: dict[str, PriceInfo] = {}
        for start in range(0, len(lookup_keys), 10):
            chunk = lookup_keys[start : start + 10]
            with cls._calling_stripe("look up prices"):
                prices = client.v1.prices.list(params={"lookup_keys": chunk, "active": True, "limit": len(chunk)})
            for price in prices.data:
                if price.lookup_key:
                    found[price.lookup_key] = PriceInfo.from_stripe(price.to_dict())
            cls._remember_listed_prices(prices.data)
        return found

    @staticmethod
    def _remember_missing_prices(lookup_keys: list[str]) -> None:
        if lookup_keys:
            timeout = current_app.config["BILLING_READ_FAILURE_SECONDS"]
            cache.set_many({f"stripe-price-missing:{key}": 1 for key in lookup_keys}, timeout=timeout)

    @classmethod
    def catalogue_prices(cls) -> dict[str, PriceInfo]:
        """Every price the catalogue sells, for pages that show them (signup, change plan). Never raises:
        a price Stripe does not have, or a Stripe that does not answer, is simply not shown."""
        try:
            return cls.prices_for_lookup_keys(plan_catalogue().lookup_keys(), required=False)
        except (BillingError, BillingConfigurationError) as exc:
            logger.warning("catalogue prices not shown: %s", exc)
            return {}

    @staticmethod
    def _remember_listed_prices(prices: Iterable[stripe.Price]) -> None:
        """Prices resolved by lookup key are remembered (catalogue_price) on a connection of their own,
        so a later price migration cannot unmap the subscriptions sold at them."""
        catalogue = plan_catalogue()
        seen = [
            KnownPrice(price.id, id_of(price.to_dict().get("product")), str(price.lookup_key), entry)
            for price in prices
            if (entry := entry_for_lookup_key(catalogue, price.lookup_key)) is not None
        ]
        if seen:
            with db.engine.begin() as connection:
                connection.execute(_remember_prices_statement(seen))

    @staticmethod
    def tier(tier_key: str) -> Tier:
        tier = plan_catalogue().tier(tier_key)
        if tier is None:
            raise UnknownTierError(f"There is no plan called {tier_key!r}.")
        return tier

    @staticmethod
    def _lookup_keys(tier: Tier, addons: Mapping[str, int], interval: str = "month") -> dict[str, int]:
        """The quantity to buy of each price, by lookup key: the tier's, then each add-on's, billed every
        `interval` (month, or year where the catalogue sells it)."""
        catalogue = plan_catalogue()
        tier_key = tier.lookup_key_for(interval)
        if tier_key is None:
            raise UnknownTierError(f"{tier.name} is not sold {'yearly' if interval == 'year' else 'monthly'}.")
        quantities = {tier_key: 1}
        for key, quantity in addons.items():
            addon = catalogue.addons.get(key)
            if addon is None:
                raise UnknownTierError(f"There is no add-on called {key!r}.")
            if not 0 <= quantity <= addon.max_quantity:
                raise BillingError(f"{addon.name}: choose between 0 and {addon.max_quantity}.")
            if quantity:
                addon_key = addon.lookup_key_for(interval)
                if addon_key is None:
                    raise BillingError(f"{addon.name} are not sold {'yearly' if interval == 'year' else 'monthly'}.")
                quantities[addon_key] = quantity
        return quantities

    @classmethod
    def _line_items(
        cls, tier: Tier, addons: Mapping[str, int], interval: str = "month"
    ) -> list[SessionCreateParamsLineItem]:
        quantities = cls._lookup_keys(tier, addons, interval)
        prices = cls.price_ids_for_lookup_keys(list(quantities))
        return [{"price": prices[key], "quantity": quantity} for key, quantity in quantities.items()]

    # --- Signup ---------------------------------------------------------------------------------

    @classmethod
    def create_checkout_session_for_tier(
        cls,
        tier_key: str,
        *,
        email: str,
        organization_name: str,
        owner_name: str,
        password: str,
        addons: Mapping[str, int] | None = None,
        interval: str = "month",
    ) -> CheckoutRedirect:
        """Store the signup (SignupService) and open a subscription-mode Checkout Session for it, billed
        every `interval` (month, or year where the catalogue sells the tier yearly)."""
        client = cls.ensure_stripe()
        tier = cls.tier(tier_key)
        line_items = cls._line_items(tier, addons or {}, interval)
        config = current_app.config
        ttl = timedelta(minutes=config["CHECKOUT_SESSION_TTL_MINUTES"])
        signup = cls._store_signup(
            tier,
            addons or {},
            email=email,
            organization_name=organization_name,
            owner_name=owner_name,
            password=password,
        )
        cls._expire_checkout_sessions(signup.superseded_checkout_session_ids)
        reference = str(signup.pending_signup_id)
        metadata = {"purpose": "signup", "pending_signup_id": reference}
        subscription_data: SessionCreateParamsSubscriptionData = {"metadata": metadata}
        if tier.trial_days:
            subscription_data["trial_period_days"] = tier.trial_days
        try:
            with cls._calling_stripe("create a checkout session"):
                payer: SessionCreateParams = {"customer_email": email.strip().lower()}
                if config["STRIPE_TEST_CLOCKS"]:
                    payer = {"customer": cls._customer_on_a_test_clock(email, owner_name, reference)}
                session = client.v1.checkout.sessions.create(
                    params={
                        **payer,
                        "mode": "subscription",
                        "line_items": line_items,
                        "client_reference_id": reference,
                        "metadata": metadata,
                        "subscription_data": subscription_data,
                        "success_url": f"{config['APP_BASE_URL']}/billing/complete-signup-from-stripe"
                        "?session_id={CHECKOUT_SESSION_ID}",
                        "cancel_url": f"{config['APP_BASE_URL']}/auth/signup?checkout=canceled",
                        "expires_at": int(time.time() + ttl.total_seconds()),
                    },
                    # Derived from the signup: a retried request returns the same session.
                    options={"idempotency_key": f"signup-checkout-{reference}"},
                )
        except BillingError as exc:
            SignupService.mark_signup_failed(signup.pending_signup_id, f"checkout not created: {exc}")
            # A cached price Stripe no longer accepts must not fail the next attempt too.
            cache.delete_many(*(f"stripe-price:{key}" for key in cls._lookup_keys(tier, addons or {}, interval)))
            raise
        SignupService.attach_checkout_session(signup.pending_signup_id, session.id)
        return CheckoutRedirect(
            url=str(session.url), pending_signup_id=signup.pending_signup_id, checkout_session_id=session.id
        )

    @staticmethod
    def _store_signup(
        tier: Tier, addons: Mapping[str, int], *, email: str, organization_name: str, owner_name: str, password: str
    ) -> NewPendingSignup:
        """The pending signup a checkout pays for, whichever provider takes the payment (SignupService
        supersedes the email's open one); it is valid for CHECKOUT_SESSION_TTL_MINUTES."""
        return SignupService.create_pending_signup_record(
            email=email,
            organization_name=organization_name,
            owner_name=owner_name,
            password=password,
            tier=tier.key,
            addons=dict(addons),
            ttl=timedelta(minutes=current_app.config["CHECKOUT_SESSION_TTL_MINUTES"]),
        )

    @classmethod
    def _customer_on_a_test_clock(cls, email: str, name: str, reference: str) -> str:
        """STRIPE_TEST_CLOCKS (test mode only): the signup's customer lives on a test clock of its own,
        frozen at now, so tests can advance its subscription through renewals, dunning and its end."""
        client = cls.ensure_stripe()
        clock = client.v1.test_helpers.test_clocks.create(
            params={"frozen_time": int(time.time()), "name": f"signup {reference}"},
            options={"idempotency_key": f"signup-clock-{reference}"},
        )
        customer = client.v1.customers.create(
            params={
                "email": email.strip().lower(),
                "name": name,
                "test_clock": clock.id,
                "metadata": {"purpose": "signup", "pending_signup_id": reference},
            },
            options={"idempotency_key": f"signup-customer-{reference}"},
        )
        return customer.id

    @classmethod
    def _expire_checkout_sessions(cls, session_ids: list[str]) -> None:
        """Superseded checkouts are closed at Stripe so they cannot be paid; best effort, since one
        that is paid anyway is still honoured (see docs/system/BILLING.md)."""
        for session_id in session_ids:
            try:
                cls.ensure_stripe().v1.checkout.sessions.expire(session_id)
            except stripe.StripeError as exc:
                logger.info("superseded checkout %s not expired: %s", session_id, exc.user_message)

    @classmethod
    def complete_signup_from_redirect(cls, session_id: str) -> ProvisionOutcome:
        """The success URL: provision (or find provisioned) the signup behind this checkout. A paid
        checkout that cannot become an account (the email already has one) is canceled and refunded
        before the answer, so the page can say what happened."""
        if not CHECKOUT_SESSION_ID.match(session_id or ""):
            raise CheckoutSessionNotFound("That checkout link is not valid.")
        db.session.rollback()  # whatever the request read: no transaction is held while Stripe is asked
        with committed():
            outcome = cls._provision_checkout_session(session_id, source="web", release_before_stripe=True)
        if outcome.state == ProvisionState.CONFLICT and outcome.pending_signup_id is not None:
            try:
                settlement = cls.settle_signup_conflict(outcome.pending_signup_id, source="web")
            except PaymentProviderUnavailable:
                settlement = None  # the worker's consumer of signup.conflict retries it, then reconcile
            outcome = dataclasses.replace(outcome, settlement=settlement)
        return outcome

    @classmethod
    def _provision_checkout_session(
        cls, session: str | Mapping[str, Any], *, source: str, release_before_stripe: bool = False
    ) -> ProvisionOutcome:
        """Provision a completed checkout exactly once, whoever asks first: the success redirect (with
        the session id) or a webhook (with the session object). Writes in the caller's transaction.

        Stripe is read before any row is locked; the pending signup is then locked only for the few
        statements that create the account. release_before_stripe: the caller owns the transaction
        and nothing is written yet, so the connection goes back to the pool while Stripe answers. A
        subscription event that arrived in between bumps the signup's subscription_events_seen; the
        read is then done again, so the organization never starts older than an event already seen."""
        if isinstance(session, str):
            session_id, reference, given = session, None, None
        else:
            session_id, reference, given = session["id"], session.get("client_reference_id"), dict(session)
            if (given.get("metadata") or {}).get("purpose") == "resubscribe":
                return cls._provision_resubscription(given, source=source, release_before_stripe=release_before_stripe)
        for attempt in range(3):
            pending = found(SignupService.find_pending_signup_for_checkout(session_id, reference_id=reference))
            if pending.status == SignupStatus.COMPLETED:
                return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
            events_seen = pending.subscription_events_seen
            if release_before_stripe:
                db.session.rollback()
            checkout, subscription = cls._read_checkout(session_id, given if attempt == 0 else None)
            pending = found(SignupService.lock_pending_signup_for_checkout(session_id, reference_id=reference))
            if pending.status == SignupStatus.COMPLETED:
                return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
            if pending.subscription_events_seen == events_seen or attempt == 2:
                break
            if release_before_stripe:
                db.session.rollback()
        if pending is None:  # pragma: no cover - the loop returns or raises first
            raise CheckoutSessionNotFound("We could not find a signup for that checkout.")
        if not checkout_is_paid(checkout) or not isinstance(subscription, dict):
            return ProvisionOutcome(ProvisionState.AWAITING_PAYMENT, pending.id)
        state = cls._subscription_state(subscription)
        return SignupService.complete_pending_signup_from_checkout(pending, checkout, state, source=source)

    @classmethod
    def _read_checkout(
        cls, session_id: str, given: dict[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The checkout and its subscription, as Stripe has them now (a given session object whose
        subscription is already expanded is used as it is)."""
        if given is not None and isinstance(given.get("subscription"), dict):
            return given, given["subscription"]
        if given is None:
            checkout = cls.retrieve_checkout_session(session_id, expand_subscription=True)
            subscription = checkout.get("subscription")
            return checkout, subscription if isinstance(subscription, dict) else None
        if given.get("subscription"):
            return given, cls.retrieve_subscription(str(given["subscription"]))
        return given, None

    @classmethod
    def retrieve_checkout_session(cls, session_id: str, *, expand_subscription: bool) -> dict[str, Any]:
        client = cls.ensure_stripe()
        try:
            with cls._calling_stripe("read a checkout session"):
                session = client.v1.checkout.sessions.retrieve(
                    session_id, params={"expand": ["subscription"]} if expand_subscription else None
                )
        except PaymentProviderUnavailable as exc:
            if isinstance(exc.__cause__, stripe.InvalidRequestError) and exc.__cause__.code == "resource_missing":
                raise CheckoutSessionNotFound("We could not find that checkout.") from exc
            raise
        return session.to_dict()

    @classmethod
    def retrieve_subscription(cls, subscription_id: str) -> dict[str, Any]:
        with cls._calling_stripe("read a subscription"):
            return cls.ensure_stripe().v1.subscriptions.retrieve(subscription_id).to_dict()

    # --- The owner's actions ----------------------------------------------------------------------
    # None of them holds a transaction, row lock or pooled connection while Stripe answers: they read
    # what they need, end the transaction, call Stripe with an idempotency key derived from our ids
    # (and the form's one-time token), then apply Stripe's answer in a short transaction.

    @classmethod
    def create_customer_portal_session(cls, organization: Organization, *, return_url: str) -> str:
        """A Stripe customer-portal session for the organization's customer; returns its URL. For a
        Whop-billed organization: the membership's own management page on Whop."""
        if organization.billed_by_whop:
            return cls._whop_manage_url(organization)
        customer_id = organization.billing_customer_id
        if not customer_id:
            raise SubscriptionActionNotAllowed("This organization has no billing account yet.")
        db.session.rollback()  # release the connection while Stripe answers
        with cls._calling_stripe("open the customer portal"):
            portal = cls.ensure_stripe().v1.billing_portal.sessions.create(
                params={"customer": customer_id, "return_url": return_url}
            )
        return str(portal.url)

    @classmethod
    def cancel_subscription(
        cls, organization_id: int, *, at_period_end: bool, request_token: str, actor_user_id: int
    ) -> list[str]:
        """Cancel at the end of the period (default) or at once. The organization reflects Stripe's
        answer immediately; the webhook that follows finds nothing left to change."""
        when = "period-end" if at_period_end else "now"

        def call(client: stripe.StripeClient, subscription_id: str, key: str) -> stripe.Subscription:
            if at_period_end:
                return client.v1.subscriptions.update(
                    subscription_id, params={"cancel_at_period_end": True}, options={"idempotency_key": key}
                )
            return client.v1.subscriptions.cancel(subscription_id, options={"idempotency_key": key})

        def allowed(organization: Organization) -> str | None:
            if organization.billing_status not in CANCELLABLE:
                return "There is no active subscription to cancel."
            if at_period_end and organization.cancel_at_period_end:
                return "Your plan is already set to end at the end of the billing period."
            return None

        return cls._owner_subscription_change(
            organization_id, f"cancel-{when}", request_token, actor_user_id, allowed, call
        )

    @classmethod
    def resume_subscription(cls, organization_id: int, *, request_token: str, actor_user_id: int) -> list[str]:
        """Undo a scheduled cancellation, however it was scheduled: `cancel_at_period_end` (our cancel
        button, the portal) or a `cancel_at` date (the Dashboard, the API). Both are cleared."""

        def call(client: stripe.StripeClient, subscription_id: str, key: str) -> stripe.Subscription:
            return client.v1.subscriptions.update(
                subscription_id,
                params={"cancel_at_period_end": False, "cancel_at": ""},
                options={"idempotency_key": key},
            )

        def allowed(organization: Organization) -> str | None:
            if not organization.cancel_at_period_end or organization.billing_status not in CANCELLABLE:
                return "There is no scheduled cancellation to undo."
            return None

        return cls._owner_subscription_change(organization_id, "resume", request_token, actor_user_id, allowed, call)

    @classmethod
    def _owner_subscription_change(
        cls,
        organization_id: int,
        action: str,
        request_token: str,
        actor_user_id: int,
        allowed: Callable[[Organization], str | None],
        call: Callable[[stripe.StripeClient, str, str], stripe.Subscription],
    ) -> list[str]:
        if not REQUEST_TOKEN.match(request_token or ""):
            raise SubscriptionActionNotAllowed("That form has expired. Reload the page and try again.")
        client = cls.ensure_stripe()
        try:
            organization = db.session.get(Organization, organization_id, populate_existing=True)
            if organization is None or not organization.billing_subscription_id:
                raise SubscriptionActionNotAllowed("This organization has no subscription.")
            refusal = allowed(organization)
            if refusal:
                raise SubscriptionActionNotAllowed(refusal)
            subscription_id = organization.billing_subscription_id
            whop = organization.billed_by_whop
        finally:
            db.session.rollback()  # nothing written: the connection goes back before Stripe is asked
        if whop:
            return cls._whop_owner_change(organization_id, subscription_id, action, request_token, actor_user_id)
        # The same form submitted twice is one Stripe call; two different actions are serialized by
        # Stripe, and each applies the subscription Stripe answered with.
        key = f"org-{organization_id}-{action}-{request_token}"
        with cls._calling_stripe(action.replace("-", " ") + " a subscription"):
            subscription = call(client, subscription_id, key).to_dict()
        with committed():
            organization = cls._lock_organization(organization_id)
            changes: list[str] = []
            if organization is not None and organization.billing_subscription_id == subscription["id"]:
                changes = cls._apply_subscription_read(organization, subscription, source=f"user:{actor_user_id}")
        return changes

    @staticmethod
    def _lock_organization(organization_id: int) -> Organization | None:
        """The organization and its add-ons, locked for a few statements (never across a Stripe call)."""
        return (
            db.session.execute(
                select(Organization)
                .options(joinedload(Organization.addons))
                .where(Organization.id == organization_id)
                .with_for_update(of=Organization)
                .execution_options(populate_existing=True)
            )
            .unique()
            .scalar_one_or_none()
        )

    @classmethod
    def create_checkout_session_for_organization(
        cls, organization_id: int, tier_key: str, *, request_token: str, actor_user_id: int
    ) -> str:
        """A new subscription for an organization whose last one ended; returns the checkout URL. The
        organization's other open resubscribe checkouts are expired, so two tabs cannot both pay."""
        if not REQUEST_TOKEN.match(request_token or ""):
            raise SubscriptionActionNotAllowed("That form has expired. Reload the page and try again.")
        client = cls.ensure_stripe()
        try:
            organization = db.session.get(Organization, organization_id, populate_existing=True)
            if organization is None or organization.billing_status not in ENDED:
                raise SubscriptionActionNotAllowed("This organization already has a subscription.")
            customer_id = organization.billing_customer_id
        finally:
            db.session.rollback()
        tier = cls.tier(tier_key)
        metadata = {"purpose": "resubscribe", "organization_id": str(organization_id)}
        base = current_app.config["APP_BASE_URL"]
        params: SessionCreateParams = {
            "mode": "subscription",
            "line_items": cls._line_items(tier, {}),
            "client_reference_id": f"organization-{organization_id}",
            "metadata": metadata,
            "subscription_data": {"metadata": metadata},
            "success_url": f"{base}/billing/checkout-complete?session_id={{CHECKOUT_SESSION_ID}}",
            "cancel_url": f"{base}/billing/",
        }
        if customer_id:
            params["customer"] = customer_id
        with cls._calling_stripe("create a checkout session"):
            session = client.v1.checkout.sessions.create(
                params=params,
                options={"idempotency_key": f"org-{organization_id}-resubscribe-{tier.key}-{request_token}"},
            )
        with committed():
            inserted = db.session.execute(
                portable_insert(ResubscribeCheckout)
                .values(
                    checkout_session_id=session.id,
                    organization_id=organization_id,
                    tier=tier.key,
                    status=ResubscribeStatus.OPEN,
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["checkout_session_id"])
                .returning(ResubscribeCheckout.id)
            ).scalar_one_or_none()
            superseded: list[str] = []
            if inserted is not None:
                # Only older checkouts: of two created at once, the newer survives.
                superseded = list(
                    db.session.execute(
                        update(ResubscribeCheckout)
                        .where(
                            ResubscribeCheckout.organization_id == organization_id,
                            ResubscribeCheckout.status == ResubscribeStatus.OPEN,
                            ResubscribeCheckout.id < inserted,
                        )
                        .values(status=ResubscribeStatus.EXPIRED, updated_at=utcnow())
                        .returning(ResubscribeCheckout.checkout_session_id)
                    ).scalars()
                )
                domain_events.record(
                    "organization.resubscribe_started",
                    organization_id=organization_id,
                    user_id=actor_user_id,
                    source=f"user:{actor_user_id}",
                    tier=tier.key,
                    checkout_session_id=session.id,
                    superseded_checkout_session_ids=superseded,
                )
        cls._expire_checkout_sessions(superseded)
        return str(session.url)

    @classmethod
    def complete_resubscription_from_redirect(cls, organization_id: int, session_id: str) -> ProvisionOutcome:
        if not CHECKOUT_SESSION_ID.match(session_id or ""):
            raise CheckoutSessionNotFound("That checkout link is not valid.")
        db.session.rollback()
        checkout = cls.retrieve_checkout_session(session_id, expand_subscription=True)
        if (checkout.get("metadata") or {}).get("organization_id") != str(organization_id):
            raise CheckoutSessionNotFound("That checkout belongs to another organization.")
        with committed():
            outcome = cls._provision_checkout_session(checkout, source="web", release_before_stripe=True)
        if outcome.state == ProvisionState.SURPLUS:
            try:
                settlement = cls.settle_surplus_subscription(session_id, source="web")
            except PaymentProviderUnavailable:
                settlement = None  # the worker's consumer of organization.surplus_subscription retries it
            outcome = dataclasses.replace(outcome, settlement=settlement)
        return outcome

    @classmethod
    def _provision_resubscription(
        cls, checkout: dict[str, Any], *, source: str, release_before_stripe: bool = False
    ) -> ProvisionOutcome:
        """Attach a paid resubscribe checkout's subscription to its organization, if the organization
        is still without a live subscription. Otherwise the subscription is surplus: it is recorded
        (`organization.surplus_subscription`) to be canceled and refunded after the commit. Stripe is
        read first; the organization is locked only for the statements that decide."""
        organization_id = int((checkout.get("metadata") or {}).get("organization_id", "0") or 0)
        for attempt in range(3):
            organization = db.session.get(Organization, organization_id, populate_existing=True)
            if organization is None:
                raise CheckoutSessionNotFound("We could not find the organization for that checkout.")
            subscription_id = id_of(checkout.get("subscription"))
            if subscription_id and organization.billing_subscription_id == subscription_id:
                return ProvisionOutcome(ProvisionState.ALREADY_PROVISIONED, None, organization.id)
            if not checkout_is_paid(checkout) or not subscription_id:
                return ProvisionOutcome(ProvisionState.AWAITING_PAYMENT, None, organization.id)
            events_seen = organization.subscription_events_seen
            if release_before_stripe:
                db.session.rollback()
            given = checkout.get("subscription")
            subscription = (
                given if isinstance(given, dict) and attempt == 0 else cls.retrieve_subscription(subscription_id)
            )
            organization = cls._lock_organization(organization_id)
            if organization is None:
                raise CheckoutSessionNotFound("We could not find the organization for that checkout.")
            if organization.subscription_events_seen == events_seen or attempt == 2:
                break
            if release_before_stripe:
                db.session.rollback()
        if organization is None:  # pragma: no cover - the loop returns or raises first
            raise CheckoutSessionNotFound("We could not find the organization for that checkout.")
        if organization.billing_subscription_id == subscription_id:
            return ProvisionOutcome(ProvisionState.ALREADY_PROVISIONED, None, organization.id)
        record = cls._resubscribe_checkout_row(checkout, organization_id)
        if organization.billing_status not in ENDED or record.status in (
            ResubscribeStatus.SURPLUS,
            ResubscribeStatus.REFUNDED,
        ):
            if record.status not in (ResubscribeStatus.SURPLUS, ResubscribeStatus.REFUNDED):
                record.status = ResubscribeStatus.SURPLUS
                record.stripe_subscription_id = subscription_id
                domain_events.record(
                    "organization.surplus_subscription",
                    organization_id=organization.id,
                    source=source,
                    checkout_session_id=checkout["id"],
                    stripe_subscription_id=subscription_id,
                    live_subscription_id=organization.billing_subscription_id,
                )
            return ProvisionOutcome(ProvisionState.SURPLUS, None, organization.id, settlement=record.settlement)
        record.status = ResubscribeStatus.ATTACHED
        record.stripe_subscription_id = subscription_id
        _now_billed_by_stripe(organization, subscription)
        cls._apply_subscription_read(organization, subscription, source=source)
        return ProvisionOutcome(ProvisionState.PROVISIONED, None, organization.id)

    @staticmethod
    def _resubscribe_checkout_row(checkout: Mapping[str, Any], organization_id: int) -> ResubscribeCheckout:
        """The checkout's row, locked; created if the checkout was opened before rows were kept."""
        db.session.execute(
            portable_insert(ResubscribeCheckout)
            .values(
                checkout_session_id=checkout["id"],
                organization_id=organization_id,
                tier="unknown",
                status=ResubscribeStatus.OPEN,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["checkout_session_id"])
        )
        return db.session.execute(
            select(ResubscribeCheckout)
            .where(ResubscribeCheckout.checkout_session_id == checkout["id"])
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one()

    @classmethod
    def _apply_subscription_read(
        cls, organization: Organization, subscription: dict[str, Any], *, source: str
    ) -> list[str]:
        """Apply a subscription just read from Stripe: it is as new as our clock says it is now."""
        state = cls._subscription_state(subscription, organization)
        changes = apply_subscription_state(organization, state, source=source)
        organization.billing_as_of = max(organization.billing_as_of or 0, int(time.time()))
        return changes

    # --- Catalogue mapping ------------------------------------------------------------------------

    @classmethod
    def _subscription_state(
        cls, subscription: Mapping[str, Any], organization: Organization | None = None
    ) -> SubscriptionState:
        """A subscription mapped onto the catalogue with every price we remember (catalogue_price)
        and the add-on items the organization holds; prices seen with a catalogue lookup key are
        remembered in the caller's transaction."""
        held = (
            {row.provider_item_id: row.addon_key for row in organization.addons if row.provider_item_id}
            if organization is not None
            else {}
        )
        state = SubscriptionState.from_stripe(subscription, plan_catalogue(), cls._known_prices(), held)
        if state.seen_prices:
            db.session.execute(_remember_prices_statement(state.seen_prices))
        return state

    @staticmethod
    def _known_prices() -> KnownPrices:
        rows = db.session.execute(select(CataloguePrice)).scalars().all()
        return KnownPrices.from_rows(
            KnownPrice(row.price_id, row.product_id, row.lookup_key, CatalogueEntry(row.kind, row.catalogue_key))
            for row in rows
        )

    # --- Paid checkouts no organization may keep ---------------------------------------------------
    # A second paid signup for an email that already has an account (leak 1), and a resubscription
    # paid while the organization already has a live subscription (leak 2): the subscription is
    # canceled at once and its payment refunded, with idempotency keys derived from our ids, after the
    # transaction that recorded the decision has committed; a domain event records what was done.

    @classmethod
    def settle_signup_conflict(cls, pending_signup_id: uuid.UUID | str, *, source: str) -> dict[str, Any] | None:
        """Cancel and refund the subscription of a signup that could not become an account. Safe to
        run any number of times, concurrently: Stripe deduplicates by key, the database by a
        conditional write; `signup.conflict_refunded` is recorded once."""
        db.session.rollback()
        pending = SignupService.pending_signup(pending_signup_id)
        if pending is None or pending.stripe_subscription_id is None:
            return None
        if pending.settlement is not None:
            return pending.settlement
        pending_id, subscription_id = pending.id, pending.stripe_subscription_id
        checkout_session_id, email = pending.checkout_session_id, pending.email
        db.session.rollback()
        settlement = cls._cancel_and_refund(subscription_id, key=f"signup-{pending_id}-conflict")
        with committed():
            settled = db.session.execute(
                update(PendingSignup)
                .where(PendingSignup.id == pending_id, PendingSignup.settled_at.is_(None))
                .values(settled_at=utcnow(), settlement=settlement)
                .returning(PendingSignup.id)
            ).scalar_one_or_none()
            if settled is not None:
                domain_events.record(
                    "signup.conflict_refunded",
                    source=source,
                    pending_signup_id=str(pending_id),
                    email=email,
                    checkout_session_id=checkout_session_id,
                    **settlement,
                )
        return settlement

    @classmethod
    def settle_surplus_subscription(cls, checkout_session_id: str, *, source: str) -> dict[str, Any] | None:
        """Cancel and refund a resubscription paid while the organization already had a live one."""
        db.session.rollback()
        record = db.session.execute(
            select(ResubscribeCheckout).where(ResubscribeCheckout.checkout_session_id == checkout_session_id)
        ).scalar_one_or_none()
        if (
            record is None
            or record.stripe_subscription_id is None
            or record.status
            not in (
                ResubscribeStatus.SURPLUS,
                ResubscribeStatus.REFUNDED,
            )
        ):
            return None
        if record.settlement is not None:
            return record.settlement
        organization_id, subscription_id = record.organization_id, record.stripe_subscription_id
        db.session.rollback()
        settlement = cls._cancel_and_refund(subscription_id, key=f"org-{organization_id}-surplus-{checkout_session_id}")
        with committed():
            settled = db.session.execute(
                update(ResubscribeCheckout)
                .where(
                    ResubscribeCheckout.checkout_session_id == checkout_session_id,
                    ResubscribeCheckout.status == ResubscribeStatus.SURPLUS,
                )
                .values(status=ResubscribeStatus.REFUNDED, settlement=settlement, updated_at=utcnow())
                .returning(ResubscribeCheckout.id)
            ).scalar_one_or_none()
            if settled is not None:
                domain_events.record(
                    "organization.surplus_subscription_refunded",
                    organization_id=organization_id,
                    source=source,
                    checkout_session_id=checkout_session_id,
                    **settlement,
                )
        return settlement

    @classmethod
    def _cancel_and_refund(cls, subscription_id: str, *, key: str) -> dict[str, Any]:
        """Cancel the subscription now and refund what its first invoice took. No transaction is
        open. Idempotency keys `<key>-cancel` and `<key>-refund`: a retry is the same Stripe request."""
        client = cls.ensure_stripe()
        with cls._calling_stripe("cancel a subscription"):
            try:
                subscription = client.v1.subscriptions.cancel(
                    subscription_id, options={"idempotency_key": f"{key}-cancel"}
                ).to_dict()
            except stripe.InvalidRequestError as exc:
                if exc.code != "resource_missing":
                    raise
                subscription = client.v1.subscriptions.retrieve(subscription_id).to_dict()  # already ended
        settlement: dict[str, Any] = {
            "stripe_subscription_id": subscription_id,
            "subscription_status": subscription.get("status"),
            "refund_id": None,
            "amount_refunded": 0,
            "currency": None,
        }
        invoice_id = id_of(subscription.get("latest_invoice"))
        if not invoice_id:
            return settlement
        with cls._calling_stripe("read an invoice"):
            invoice = client.v1.invoices.retrieve(invoice_id, params={"expand": ["payments"]}).to_dict()
        settlement["currency"] = invoice.get("currency")
        if not invoice.get("amount_paid"):
            return settlement  # nothing was taken (a trial, or no payment yet)
        payment = next(
            (
                entry.get("payment") or {}
                for entry in (invoice.get("payments") or {}).get("data") or []
                if entry.get("status") in (None, "paid")
            ),
            {},
        )
        target: RefundCreateParams = {}
        if id_of(payment.get("payment_intent")):
            target["payment_intent"] = str(id_of(payment.get("payment_intent")))
        elif id_of(payment.get("charge")):
            target["charge"] = str(id_of(payment.get("charge")))
        else:
            raise PaymentProviderUnavailable(f"invoice {invoice_id} was paid but names no payment to refund")
        target["metadata"] = {"reason": key}
        with cls._calling_stripe("refund a payment"):
            refund = client.v1.refunds.create(params=target, options={"idempotency_key": f"{key}-refund"}).to_dict()
        settlement.update(
            refund_id=refund.get("id"),
            amount_refunded=refund.get("amount") or 0,
            currency=refund.get("currency") or invoice.get("currency"),
            refund_status=refund.get("status"),
        )
        return settlement

    # --- Reconcile --------------------------------------------------------------------------------

    @classmethod
    def reconcile(
        cls, *, apply: bool = False, since_days: int = 3, organization_id: int | None = None
    ) -> reconciliation.ReconcileReport:
        """Compare Stripe with the database (`flask billing reconcile`; the worker runs it daily).
        Dry run unless apply: then missing events run through the delivery path, organizations take
        Stripe's subscription through the path a webhook's re-read takes, and orphans are provisioned
        or canceled and refunded under the rules for conflicting signups and surplus resubscriptions;
        the returned report is read again afterwards. No transaction is open while Stripe answers."""
        if not 1 <= since_days <= reconciliation.MAX_SINCE_DAYS:
            raise BillingError(
                f"--since must be between 1 and {reconciliation.MAX_SINCE_DAYS} days (Stripe keeps events for 30)."
            )
        report = cls._reconcile_read_all(since_days, organization_id)
        applied: list[str] = []
        # Repairs make events of their own (a canceled orphan's customer.subscription.deleted, ...):
        # those are applied in the next round, like any other missing event.
        for _round in range(3 if apply else 0):
            if report.clean:
                break
            applied += cls._reconcile_apply(report)
            report = cls._reconcile_read_all(since_days, organization_id)
        report.applied = applied
        return report

    @classmethod
    def _reconcile_read_all(cls, since_days: int, organization_id: int | None) -> reconciliation.ReconcileReport:
        """Stripe's side (unless the one organization asked for is Whop-billed), then Whop's memberships
        for Whop-billed organizations when Whop is configured: Whop retries a delivery only three
        times, so a missed membership event is found here."""
        whop_only = organization_id is not None and cls._billed_by_whop(organization_id)
        report = reconciliation.ReconcileReport() if whop_only else cls._reconcile_read(since_days, organization_id)
        if cls.whop_configured() and (organization_id is None or whop_only):
            report.subscriptions += cls._whop_reconcile_read(organization_id, report)
        return report

    @staticmethod
    def _billed_by_whop(organization_id: int) -> bool:
        try:
            provider = db.session.execute(
                select(Organization.billing_provider).where(Organization.id == organization_id)
            ).scalar_one_or_none()
        finally:
            db.session.rollback()
        return provider == BillingProvider.WHOP

    @classmethod
    def _whop_reconcile_read(
        cls, organization_id: int | None, report: reconciliation.ReconcileReport
    ) -> list[reconciliation.SubscriptionDrift]:
        try:
            query = select(Organization.id, Organization.billing_subscription_id).where(
                Organization.billing_provider == BillingProvider.WHOP, Organization.billing_subscription_id.is_not(None)
            )
            if organization_id is not None:
                query = query.where(Organization.id == organization_id)
            held = {str(row.billing_subscription_id): row.id for row in db.session.execute(query)}
        finally:
            db.session.rollback()
        if not held:
            return []
        listed = whop_billing.calls.list_memberships() if organization_id is None else {}
        for membership_id in held:
            if membership_id not in listed:
                try:
                    listed[membership_id] = whop_billing.calls.retrieve_membership(membership_id)
                except PaymentProviderUnavailable as exc:
                    report.problems.append(f"Whop membership {membership_id}: {exc.__cause__ or exc}")
        drifts: list[reconciliation.SubscriptionDrift] = []
        try:
            for membership_id, org_id in held.items():
                organization = db.session.get(Organization, org_id)
                if organization is None or membership_id not in listed:
                    continue
                state = subscription_state_from_whop(listed[membership_id], plan_catalogue())
                fields = reconciliation.diff_subscription(
                    reconciliation.HeldBilling(
                        organization_id=organization.id,
                        subscription_id=membership_id,
                        status=organization.billing_status,
                        tier=organization.tier,
                        addons=organization.addon_quantities(),
                        cancel_at_period_end=organization.cancel_at_period_end,
                        current_period_end=organization.current_period_end,
                        collection_paused=organization.collection_paused,
                    ),
                    state,
                )
                if fields:
                    drifts.append(reconciliation.SubscriptionDrift(organization.id, membership_id, fields, "Whop"))
        finally:
            db.session.rollback()
        return drifts

    @classmethod
    def _reconcile_read(cls, since_days: int, organization_id: int | None) -> reconciliation.ReconcileReport:
        client = cls.ensure_stripe()
        since = int(time.time()) - since_days * 86400
        report = reconciliation.ReconcileReport()
        try:
            query = select(Organization).where(
                Organization.billing_provider == BillingProvider.STRIPE,
                Organization.billing_subscription_id.is_not(None),
            )
            if organization_id is not None:
                query = query.where(Organization.id == organization_id)
            organizations = {str(org.billing_subscription_id): org.id for org in db.session.execute(query).scalars()}
            if organization_id is not None and not organizations:
                raise BillingError(f"organization {organization_id} has no subscription to reconcile")
            held_ids = {
                str(subscription_id)
                for subscription_id in db.session.execute(
                    select(Organization.billing_subscription_id).where(
                        Organization.billing_provider == BillingProvider.STRIPE,
                        Organization.billing_subscription_id.is_not(None),
                    )
                ).scalars()
            }
            stored_events = set(
                db.session.execute(select(StripeEvent.event_id).where(StripeEvent.stripe_created >= since)).scalars()
            )
            customer_ids = {
                str(customer_id)
                for customer_id in db.session.execute(
                    select(Organization.billing_customer_id).where(Organization.id == organization_id)
                ).scalars()
                if customer_id and organization_id is not None
            }
        finally:
            db.session.rollback()
        related = set(organizations) | customer_ids
        # Stripe, with no transaction open.
        with cls._calling_stripe("list subscriptions for reconcile"):
            listed = {
                sub.id: sub.to_dict()
                for sub in (
                    client.v1.subscriptions.list(params={"status": "all", "limit": 100}).auto_paging_iter()
                    if organization_id is None
                    else ()
                )
            }
            for subscription_id in organizations:
                if subscription_id not in listed:
                    listed[subscription_id] = client.v1.subscriptions.retrieve(subscription_id).to_dict()
            events = [
                event.to_dict()
                for event in client.v1.events.list(
                    params={"created": {"gte": since}, "types": sorted(HANDLED_STRIPE_EVENTS), "limit": 100}
                ).auto_paging_iter()
            ]
        events = [event for event in events if organization_id is None or _event_references(event) & related]
        orphan_candidates = [sub for sub_id, sub in listed.items() if sub_id not in held_ids]
        try:
            for subscription_id, org_id in organizations.items():
                organization = db.session.get(Organization, org_id)
                if organization is None:
                    continue
                state = cls._subscription_state(listed[subscription_id], organization)
                held = reconciliation.HeldBilling(
                    organization_id=organization.id,
                    subscription_id=subscription_id,
                    status=organization.billing_status,
                    tier=organization.tier,
                    addons=organization.addon_quantities(),
                    cancel_at_period_end=organization.cancel_at_period_end,
                    current_period_end=organization.current_period_end,
                    collection_paused=organization.collection_paused,
                )
                drift = reconciliation.diff_subscription(held, state)
                if drift:
                    report.subscriptions.append(
                        reconciliation.SubscriptionDrift(organization.id, subscription_id, drift)
                    )
            pending_ids = [
                str((sub.get("metadata") or {}).get("pending_signup_id"))
                for sub in orphan_candidates
                if (sub.get("metadata") or {}).get("pending_signup_id")
            ]
            pending = {
                str(row.id): row.status
                for row in db.session.execute(
                    select(PendingSignup.id, PendingSignup.status).where(
                        PendingSignup.id.in_([key for key in (as_uuid(p) for p in pending_ids) if key])
                    )
                )
            }
            resubscribes = {
                str(row.stripe_subscription_id): row.checkout_session_id
                for row in db.session.execute(
                    select(ResubscribeCheckout).where(
                        ResubscribeCheckout.stripe_subscription_id.in_([sub["id"] for sub in orphan_candidates])
                    )
                ).scalars()
            }
            db.session.commit()  # the prices the states remembered
        except BaseException:
            db.session.rollback()
            raise
        unexplained = [
            sub
            for sub in orphan_candidates
            if (sub.get("metadata") or {}).get("purpose") == "resubscribe" and sub["id"] not in resubscribes
        ]
        if unexplained and organization_id is None:
            resubscribes.update(cls._resubscribe_checkouts_for(unexplained))
        report.orphans = reconciliation.find_orphans(orphan_candidates, held_ids, pending, resubscribes)
        report.unsettled = cls._unsettled(organization_id)
        report.missing_events = reconciliation.find_missing_events(events, stored_events, HANDLED_STRIPE_EVENTS)
        return report

    @staticmethod
    def _unsettled(organization_id: int | None) -> list[reconciliation.Unsettled]:
        """Conflicting signups and surplus resubscriptions whose cancel and refund are not both done."""
        try:
            found = []
            if organization_id is None:
                found += [
                    reconciliation.Unsettled("signup", str(row.id), str(row.stripe_subscription_id))
                    for row in db.session.execute(
                        select(PendingSignup.id, PendingSignup.stripe_subscription_id).where(
                            PendingSignup.stripe_subscription_id.is_not(None), PendingSignup.settled_at.is_(None)
                        )
                    )
                ]
            query = select(ResubscribeCheckout.checkout_session_id, ResubscribeCheckout.stripe_subscription_id).where(
                ResubscribeCheckout.status == ResubscribeStatus.SURPLUS
            )
            if organization_id is not None:
                query = query.where(ResubscribeCheckout.organization_id == organization_id)
            found += [
                reconciliation.Unsettled("resubscribe", row.checkout_session_id, str(row.stripe_subscription_id))
                for row in db.session.execute(query)
            ]
            return found
        finally:
            db.session.rollback()

    @classmethod
    def _resubscribe_checkouts_for(cls, subscriptions: list[dict[str, Any]]) -> dict[str, str]:
        """Our resubscribe checkouts behind subscriptions we do not hold yet (the checkout row is ours
        before its subscription is known)."""
        found: dict[str, str] = {}
        for subscription in subscriptions:
            with cls._calling_stripe("list checkout sessions for reconcile"):
                sessions = cls.ensure_stripe().v1.checkout.sessions.list(
                    params={"subscription": subscription["id"], "limit": 1}
                )
            for session in sessions.data:
                ours = db.session.execute(
                    select(ResubscribeCheckout.id).where(ResubscribeCheckout.checkout_session_id == session.id)
                ).scalar_one_or_none()
                db.session.rollback()
                if ours is not None:
                    found[subscription["id"]] = session.id
        return found

    @classmethod
    def _reconcile_apply(cls, report: reconciliation.ReconcileReport) -> list[str]:
        applied: list[str] = []
        provider = cls._webhook_providers["stripe"]
        client = cls.ensure_stripe()
        objects: list[str] = []
        for missing in report.missing_events:
            db.session.rollback()
            with cls._calling_stripe("read an event for reconcile"):
                event = client.v1.events.retrieve(missing.event_id)
            # The event exactly as Stripe sends it (the raw body; a dict round trip would turn amounts
            # like unit_amount_decimal into Decimals), stored and queued as a delivery is.
            raw = event.last_response.body if event.last_response else json.dumps(event.to_dict(), default=str)
            verified = _parse_stripe_event(raw)
            result = cls._store_event(provider, verified)
            applied.append(f"event {missing.event_id} {missing.type}: stored {result.body}")
            if not {"ignored", "failed", "duplicate"} & set(result.body):
                key = provider.object_key(verified)
                objects += [key] if key not in objects else []
        # Then applied at once, as the worker would (its queued job later finds nothing pending).
        for key in objects:
            applied.append(f"{key}: {cls.apply_queued_events(provider.name, key)}")
        for drift in report.subscriptions:
            if drift.provider == "Whop":
                applied.append(cls._reconcile_whop_membership(drift))
                continue
            # As the worker applies a subscription event: read now, checked, applied under a short lock.
            subscription = stripe_objects.subscription_for_state(cls.retrieve_subscription(drift.subscription_id))
            with committed():
                organization = cls._lock_organization_for_subscription(subscription)
                changes: list[str] = []
                if organization is not None:
                    changes = cls._apply_subscription_read(organization, subscription, source="reconcile")
            what = ", ".join(changes) or "no change"
            applied.append(f"organization {drift.organization_id} follows {drift.subscription_id}: {what}")
        return applied + cls._reconcile_settle(report)

    @classmethod
    def _reconcile_settle(cls, report: reconciliation.ReconcileReport) -> list[str]:
        """Orphans and unsettled checkouts; one failing does not stop the others."""
        applied: list[str] = []
        for orphan in report.orphans:
            if orphan.kind == "unknown":
                continue
            try:
                applied.append(cls._settle_orphan(orphan))
            except BillingError as exc:  # the others still get repaired; the next run tries again
                applied.append(f"orphan {orphan.subscription_id}: not settled: {describe_failure(exc)}")
        for entry in report.unsettled:
            try:
                if entry.kind == "signup":
                    settlement = cls.settle_signup_conflict(entry.reference, source="reconcile")
                else:
                    settlement = cls.settle_surplus_subscription(entry.reference, source="reconcile")
                refunded = (settlement or {}).get("amount_refunded")
                applied.append(f"{entry.kind} {entry.reference}: canceled and refunded {refunded}")
            except BillingError as exc:
                applied.append(f"{entry.kind} {entry.reference}: not settled: {describe_failure(exc)}")
        return applied

    @classmethod
    def _reconcile_whop_membership(cls, drift: reconciliation.SubscriptionDrift) -> str:
        """The organization takes the membership as Whop has it now (read with no transaction open)."""
        membership = whop_billing.calls.retrieve_membership(drift.subscription_id)
        with committed():
            organization = whop_events.lock_organization(drift.subscription_id)
            changes: list[str] = []
            if organization is not None:
                changes = whop_events.apply_membership_read(organization, membership, source="reconcile")
        what = ", ".join(changes) or "no change"
        return f"organization {drift.organization_id} follows Whop membership {drift.subscription_id}: {what}"

    @classmethod
    def _settle_orphan(cls, orphan: reconciliation.Orphan) -> str:
        """An orphan runs through the same path as its checkout's delivery: provisioned if it may be,
        otherwise canceled and refunded (conflicting signup, surplus resubscription)."""
        if orphan.kind == "resubscribe" and orphan.reference:
            checkout = cls.retrieve_checkout_session(orphan.reference, expand_subscription=True)
        else:
            with cls._calling_stripe("find the checkout of a subscription"):
                sessions = cls.ensure_stripe().v1.checkout.sessions.list(
                    params={"subscription": orphan.subscription_id, "limit": 1}
                )
            if not sessions.data:
                return f"orphan {orphan.subscription_id}: no checkout found; left for a person"
            checkout = cls.retrieve_checkout_session(sessions.data[0].id, expand_subscription=True)
        db.session.rollback()
        with committed():
            outcome = cls._provision_checkout_session(checkout, source="reconcile", release_before_stripe=True)
        settlement: dict[str, Any] | None = None
        if outcome.state == ProvisionState.CONFLICT and outcome.pending_signup_id is not None:
            settlement = cls.settle_signup_conflict(outcome.pending_signup_id, source="reconcile")
        elif outcome.state == ProvisionState.SURPLUS:
            settlement = cls.settle_surplus_subscription(checkout["id"], source="reconcile")
        detail = f", canceled and refunded {settlement.get('amount_refunded')}" if settlement else ""
        return f"orphan {orphan.subscription_id}: {outcome.state}{detail}"

    # --- The billing page's reads -------------------------------------------------------------------

    @classmethod
    def billing_details(cls, organization: Organization) -> BillingDetails:
        """What the owner's billing page shows from Stripe: the subscription's prices, the next invoice
        (Stripe's preview), the payment method on file, a scheduled downgrade and the invoice history.
        Each part is cached for BILLING_READ_CACHE_SECONDS; a part Stripe does not give in time is None
        and named in `unavailable` (remembered for BILLING_READ_FAILURE_SECONDS), and the page shows the
        rest. Never raises for Stripe's sake."""
        details = BillingDetails()
        if organization.billed_by_whop:
            return details  # Stripe has nothing to say about a Whop membership; the page shows what we hold
        subscription_id, customer_id = organization.billing_subscription_id, organization.billing_customer_id
        live = organization.billing_status not in (BillingStatus.CANCELED, BillingStatus.INCOMPLETE_EXPIRED)
        ending = organization.cancel_at_period_end
        # The cache is keyed by the Stripe state the organization holds: an applied webhook or change
        # (billing_as_of, payment_as_of) makes the page read Stripe afresh.
        organization_id = f"{organization.id}:{organization.billing_as_of or 0}:{organization.payment_as_of or 0}"
        db.session.rollback()  # no transaction is held while Stripe is asked (the page reloads what it shows)
        if subscription_id:
            facts = cls._cached_read(
                organization_id,
                "subscription",
                lambda: SubscriptionFacts.from_stripe(cls._read_subscription_for_page(subscription_id)),
                details,
            )
            details.subscription = facts if isinstance(facts, SubscriptionFacts) else None
        if subscription_id and live and not ending:
            upcoming = cls._cached_read(
                organization_id, "upcoming", lambda: cls._read_upcoming(subscription_id), details
            )
            details.upcoming = upcoming if isinstance(upcoming, UpcomingInvoice) else None
        if details.subscription is not None and details.subscription.schedule_id and live:
            schedule_id = details.subscription.schedule_id
            change = cls._cached_read(organization_id, "schedule", lambda: cls._read_schedule(schedule_id), details)
            details.scheduled_change = change if isinstance(change, ScheduledChange) else None
        if customer_id:
            default_method = details.subscription.default_payment_method if details.subscription else None
            method = cls._cached_read(
                organization_id,
                "payment_method",
                lambda: cls._read_payment_method(customer_id, default_method),
                details,
            )
            details.payment_method = method if isinstance(method, CardOnFile) else None
            invoices = cls._cached_read(organization_id, "invoices", lambda: cls._read_invoices(customer_id), details)
            details.invoices = invoices if isinstance(invoices, list) else None
        return details

    @classmethod
    def forget_billing_reads(cls, organization_id: int) -> None:
        """Drop the billing page's cached reads, after a change made from the app."""
        organization = db.session.get(Organization, organization_id)
        if organization is None:
            return
        version = f"{organization_id}:{organization.billing_as_of or 0}:{organization.payment_as_of or 0}"
        cache.delete_many(*(f"billing-read:{version}:{part}" for part in BILLING_READ_PARTS))

    @staticmethod
    def _cached_read(organization_id: str, part: str, read: Callable[[], Any], details: BillingDetails) -> Any:
        key = f"billing-read:{organization_id}:{part}"
        try:
            cached = cache.get(key)
        except Exception:  # the cache is a convenience here: a Redis hiccup must not fail the page
            cached = None
        if isinstance(cached, dict) and cached.get("unavailable"):
            details.unavailable.append(part)
            return None
        if cached is not None:
            return cached.get("value") if isinstance(cached, dict) else None
        config = current_app.config
        try:
            value = read()
        except (BillingError, BillingConfigurationError) as exc:
            logger.info("billing page: %s not read from Stripe: %s", part, exc)
            details.unavailable.append(part)
            _cache_quietly(key, {"unavailable": True}, config["BILLING_READ_FAILURE_SECONDS"])
            return None
        except Exception:  # an answer we could not read: the page still shows everything else
            logger.exception("billing page: %s could not be read", part)
            details.unavailable.append(part)
            _cache_quietly(key, {"unavailable": True}, config["BILLING_READ_FAILURE_SECONDS"])
            return None
        _cache_quietly(key, {"value": value}, config["BILLING_READ_CACHE_SECONDS"])
        return value

    @classmethod
    def _read_subscription_for_page(cls, subscription_id: str) -> dict[str, Any]:
        with cls._calling_stripe("read a subscription"):
            return cls._stripe_for_page_reads().v1.subscriptions.retrieve(subscription_id, options=PAGE_READ).to_dict()

    @classmethod
    def _read_upcoming(cls, subscription_id: str) -> UpcomingInvoice | None:
        try:
            with cls._calling_stripe("preview the next invoice"):
                preview = cls._stripe_for_page_reads().v1.invoices.create_preview(
                    params={"subscription": subscription_id}, options=PAGE_READ
                )
        except PaymentProviderUnavailable as exc:
            if isinstance(exc.__cause__, stripe.InvalidRequestError):
                return None  # Stripe says there is no next invoice (the subscription ends, say)
            raise
        return UpcomingInvoice.from_stripe(preview.to_dict())

    @classmethod
    def _read_schedule(cls, schedule_id: str) -> ScheduledChange | None:
        with cls._calling_stripe("read a subscription schedule"):
            schedule = (
                cls._stripe_for_page_reads()
                .v1.subscription_schedules.retrieve(schedule_id, options=PAGE_READ)
                .to_dict()
            )
        change = scheduled_change_from_stripe(schedule, int(time.time()))
        if change is None:
            return None
        # Phases name prices by id: say them as the catalogue does.
        by_id = {price.id: key for key, price in cls.catalogue_prices().items()}
        keys = [by_id.get(price_id, price_id) for price_id in change.lookup_keys]
        quantities = {by_id.get(price_id, price_id): quantity for price_id, quantity in change.quantities.items()}
        return replace(change, lookup_keys=keys, quantities=quantities)

    @classmethod
    def _read_payment_method(cls, customer_id: str, default_method: str | None) -> CardOnFile | None:
        client = cls._stripe_for_page_reads()
        method_id = default_method
        if method_id is None:
            with cls._calling_stripe("read a customer"):
                customer = client.v1.customers.retrieve(customer_id, options=PAGE_READ).to_dict()
            method_id = billing_details_id((customer.get("invoice_settings") or {}).get("default_payment_method"))
        if method_id is None:
            return None
        with cls._calling_stripe("read a payment method"):
            method = client.v1.payment_methods.retrieve(method_id, options=PAGE_READ).to_dict()
        return CardOnFile.from_stripe(method)

    @classmethod
    def _read_invoices(cls, customer_id: str) -> list[InvoiceRow]:
        with cls._calling_stripe("list invoices"):
            invoices = cls._stripe_for_page_reads().v1.invoices.list(
                params={"customer": customer_id, "limit": INVOICE_HISTORY_LENGTH}, options=PAGE_READ
            )
        return [InvoiceRow.from_stripe(invoice.to_dict()) for invoice in invoices.data]

    # --- Plan and seat changes --------------------------------------------------------------------

    @classmethod
    def preview_subscription_change(
        cls,
        organization_id: int,
        *,
        kind: str,
        tier: str | None = None,
        interval: str | None = None,
        extra_seats: int | None = None,
        members: int,
    ) -> Preview:
        """A preview of changing the plan (tier, interval) or the extra seats, read fresh from Stripe:
        when it happens, what is charged or credited today (Stripe's invoice preview with the proration
        date the confirmation will use) and the new recurring amount. Changes nothing."""
        organization = db.session.get(Organization, organization_id)
        if organization is None or not organization.billing_subscription_id:
            raise SubscriptionActionNotAllowed("This organization has no subscription to change.")
        if organization.billed_by_whop:
            raise SubscriptionActionNotAllowed("Plans and seats billed through Whop are changed on Whop.")
        subscription_id, held_tier = organization.billing_subscription_id, organization.tier
        db.session.rollback()  # no transaction is held while Stripe is asked
        catalogue = plan_catalogue()
        current = read_current(cls.retrieve_subscription(subscription_id), catalogue)
        target = Target(
            tier=tier or current.tier or held_tier,
            interval=interval or current.interval or "month",
            extra_seats=current.extra_seats if extra_seats is None else extra_seats,
        )
        included = entitlements_for(catalogue, target.tier, {}, billing_allows_use=True).seats
        try:
            validate_target(current, target, members=members, included_seats=included)
            quantities = target.lookup_keys(catalogue)
        except PlanChangeError as exc:
            raise SubscriptionActionNotAllowed(str(exc)) from exc
        prices = cls.prices_for_lookup_keys(list(quantities))
        new_amount, new_monthly = new_recurring(prices, quantities)
        when = timing(current, target, new_monthly)
        proration_date = int(time.time())
        today, lines = 0, list[PreviewLine]()
        if when == When.NOW:
            preview_params: Any = {
                "subscription": current.subscription_id,
                "subscription_details": {
                    "items": update_items(current, prices, quantities, catalogue),
                    "proration_date": proration_date,
                    "proration_behavior": "always_invoice",
                },
            }
            with cls._calling_stripe("preview the change"):
                invoice = cls.ensure_stripe().v1.invoices.create_preview(params=preview_params)
            today, lines = summarize_invoice_preview(invoice.to_dict())
        target_interval = prices[next(iter(quantities))].interval or target.interval
        return Preview(
            kind=kind,
            organization_id=organization_id,
            subscription_id=current.subscription_id,
            base_fingerprint=current.fingerprint,
            target=target,
            price_ids={key: prices[key].id for key in quantities},
            quantities=quantities,
            when=when,
            proration_date=proration_date,
            today=today,
            currency=prices[next(iter(quantities))].currency,
            new_recurring=new_amount,
            new_interval=target_interval,
            effective_at=current.period_end if when == When.PERIOD_END else None,
            lines=lines,
        )

    @classmethod
    def confirm_subscription_change(cls, preview: Preview, *, actor_user_id: int) -> ChangeOutcome:
        """Make the previewed change at Stripe, exactly once however often it is submitted.

        The change is claimed first (a subscription_change row: one pending per organization, the
        idempotency key unique), then Stripe is re-read: a subscription or price that moved since the
        preview refuses it as stale (StalePreview). Upgrades update the subscription's items with the
        preview's proration date and invoice at once; downgrades go on a subscription schedule that
        switches the prices when the period ends. The organization is updated from Stripe's answer."""
        age = int(time.time()) - preview.proration_date
        if age > current_app.config["PLAN_CHANGE_PREVIEW_MINUTES"] * 60:
            raise StalePreview(f"This preview is {age // 60} minutes old.")
        key = preview.idempotency_key()
        claim = cls._claim_change(preview, key, actor_user_id)
        if claim is not None:
            return claim
        try:
            current = read_current(cls.retrieve_subscription(preview.subscription_id), plan_catalogue())
            if current.fingerprint != preview.base_fingerprint:
                raise StalePreview("Your subscription changed since this preview.")
            fresh = cls._fetch_prices(list(preview.quantities))
            if {k: p.id for k, p in fresh.items()} != preview.price_ids:
                cache.delete_many(*(f"stripe-price:{k}" for k in preview.quantities))
                raise StalePreview("A price changed since this preview.")
            prices = {k: fresh[k] for k in preview.quantities}
            if preview.when == When.NOW:
                subscription, action_url = cls._apply_change_now(current, preview, prices, key)
            else:
                subscription, action_url = cls._schedule_change(current, preview, prices, key), None
        except StalePreview as exc:
            cls._finish_change(key, SubscriptionChangeStatus.REFUSED, f"stale: {exc}")
            raise
        except BaseException as exc:
            # A retry of this same preview reuses the key, so Stripe makes the change at most once.
            cls._finish_change(key, SubscriptionChangeStatus.FAILED, describe_failure(exc)[:500])
            raise
        cls.forget_billing_reads(preview.organization_id)
        with committed():
            organization = db.session.get(
                Organization, preview.organization_id, with_for_update=True, populate_existing=True
            )
            if organization is None:
                raise SubscriptionActionNotAllowed("This organization no longer exists.")
            cls._apply_subscription_read(organization, subscription, source=f"user:{actor_user_id}")
            domain_events.record(
                "subscription.change_scheduled" if preview.when == When.PERIOD_END else "subscription.changed",
                organization_id=organization.id,
                user_id=actor_user_id,
                source=f"user:{actor_user_id}",
                kind=preview.kind,
                tier=preview.target.tier,
                interval=preview.target.interval,
                extra_seats=preview.target.extra_seats,
                charged_today=preview.today if preview.when == When.NOW else 0,
                effective_at=preview.effective_at,
            )
            _finish_claim(key, SubscriptionChangeStatus.APPLIED, "applied")
        return ChangeOutcome(applied=True, when=preview.when, action_url=action_url)

    @classmethod
    def _claim_change(cls, preview: Preview, key: str, actor_user_id: int) -> ChangeOutcome | None:
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

    @staticmethod
    def _finish_change(key: str, status: SubscriptionChangeStatus, outcome: str) -> None:
        db.session.rollback()
        with committed():
            _finish_claim(key, status, outcome)

    @classmethod
    def _apply_change_now(
        cls, current: CurrentPlan, preview: Preview, prices: Mapping[str, PriceInfo], key: str
    ) -> tuple[dict[str, Any], str | None]:
        client = cls.ensure_stripe()
        if current.schedule_id:
            # A downgrade was waiting for the period's end: this change replaces it.
            with cls._calling_stripe("release a subscription schedule"):
                client.v1.subscription_schedules.release(
                    current.schedule_id, options={"idempotency_key": f"{key}-release"}
                )
        items: Any = update_items(current, prices, preview.quantities, plan_catalogue())
        with cls._calling_stripe("change a subscription"):
            subscription = client.v1.subscriptions.update(
                current.subscription_id,
                params={
                    "items": items,
                    "proration_behavior": "always_invoice",
                    "proration_date": preview.proration_date,
                    "payment_behavior": "allow_incomplete",
                    "expand": ["latest_invoice"],
                },
                options={"idempotency_key": key},
            ).to_dict()
        invoice = subscription.get("latest_invoice")
        action_url = None
        if isinstance(invoice, dict) and invoice.get("status") == "open" and invoice.get("amount_due", 0) > 0:
            action_url = invoice.get("hosted_invoice_url")  # the payment needs the customer
        subscription["latest_invoice"] = invoice.get("id") if isinstance(invoice, dict) else invoice
        return subscription, action_url

    @classmethod
    def _schedule_change(
        cls, current: CurrentPlan, preview: Preview, prices: Mapping[str, PriceInfo], key: str
    ) -> dict[str, Any]:
        """A downgrade at the period's end: a subscription schedule made from the subscription, whose
        current phase ends with the period and whose next phase carries the new prices; when it is
        done it releases the subscription, which renews on those prices."""
        client = cls.ensure_stripe()
        phases: Any = schedule_phases(current, prices, preview.quantities)
        schedule_id = current.schedule_id
        with cls._calling_stripe("schedule a plan change"):
            if schedule_id is None:
                schedule_id = client.v1.subscription_schedules.create(
                    params={"from_subscription": current.subscription_id},
                    options={"idempotency_key": f"{key}-schedule"},
                ).id
            client.v1.subscription_schedules.update(
                schedule_id,
                params={"phases": phases, "end_behavior": "release", "proration_behavior": "none"},
                options={"idempotency_key": f"{key}-phases"},
            )
        return cls.retrieve_subscription(current.subscription_id)

    @classmethod
    def cancel_scheduled_change(cls, organization_id: int, *, actor_user_id: int) -> None:
        """Keep the current plan: release the schedule that would downgrade it at the period's end."""
        organization = db.session.get(Organization, organization_id)
        if organization is None or not organization.billing_subscription_id or organization.billed_by_whop:
            raise SubscriptionActionNotAllowed("This organization has no subscription.")
        subscription_id = organization.billing_subscription_id
        db.session.rollback()  # no transaction is held while Stripe is asked
        current = read_current(cls.retrieve_subscription(subscription_id), plan_catalogue())
        if current.schedule_id is None:
            raise SubscriptionActionNotAllowed("There is no scheduled plan change to undo.")
        with cls._calling_stripe("release a subscription schedule"):
            cls.ensure_stripe().v1.subscription_schedules.release(
                current.schedule_id, options={"idempotency_key": f"org-{organization_id}-release-{current.schedule_id}"}
            )
        cls.forget_billing_reads(organization_id)
        domain_events.record(
            "subscription.change_withdrawn",
            organization_id=organization_id,
            user_id=actor_user_id,
            source=f"user:{actor_user_id}",
            schedule_id=current.schedule_id,
        )
        db.session.commit()

    # --- Webhooks ---------------------------------------------------------------------------------

    @classmethod
    def register_webhook_provider(cls, provider: WebhookProvider) -> None:
        cls._webhook_providers[provider.name] = provider

    @classmethod
    def handle_webhook_event(cls, provider_name: str, payload: bytes, headers: Mapping[str, str]) -> WebhookResult:
        """Verify and store one webhook delivery and queue its application; answer at once.

        A duplicate of a stored event costs one indexed read. A new event is read into typed objects
        (stripe_objects.py) and stored in one transaction with the job that will apply it, keyed on
        the object it is about: `pending`, or already `ignored` (not ours, other mode, unhandled
        type) or `failed` (a malformed object, with the reason; replayable). Every stored event is
        answered 2xx: retrying would not change it. Nothing here calls the provider's API."""
        provider = cls._webhook_providers.get(provider_name)
        if provider is None:
            raise UnknownWebhookProvider(provider_name)
        return cls._store_event(provider, provider.verify(payload, headers))

    @classmethod
    def replay_stored_event(cls, event_id: str) -> WebhookResult:
        """Queue a stored event again (ops: `flask billing replay`): a failed one goes back to pending,
        read afresh (so a fix to the reading code applies), and the worker applies it."""
        for provider in cls._webhook_providers.values():
            model = provider.event_model
            row = webhook_store.row_for(model, event_id)
            if row is None:
                continue
            try:
                if row.status in (StripeEventStatus.PROCESSED, StripeEventStatus.IGNORED):
                    return WebhookResult(200, {"received": True, "duplicate": True})
                try:
                    object_key = provider.object_key(cls._stored_event(provider, row))
                except (MalformedObject, ValueError) as exc:
                    return WebhookResult(422, {"received": True, "failed": str(exc)})
                if row.status == StripeEventStatus.FAILED:
                    webhook_store.requeue(model, row.id, object_key)
                cls._queue_application(provider, object_key)
                db.session.commit()
                return WebhookResult(202, {"received": True, "queued": object_key})
            finally:
                db.session.rollback()
        raise LookupError(f"no stored event {event_id}")

    @staticmethod
    def _stored_event(provider: WebhookProvider, row: StripeEvent | WhopEvent) -> VerifiedEvent:
        if not row.payload:
            raise ValueError(f"the payload of {row.event_id} is no longer stored")
        return VerifiedEvent(
            provider=provider.name,
            event_id=row.event_id,
            type=row.type,
            created=getattr(row, provider.event_model.created_column),
            livemode=row.livemode,
            api_version=row.api_version,
            raw=row.payload,
            body=json.loads(row.payload),
        )

    @staticmethod
    def _queue_application(provider: WebhookProvider, object_key: str) -> None:
        """One job per object: while one waits (at least WEBHOOK_COALESCE_SECONDS), later events about
        the object join it (queueing lock), and the lock runs one object's jobs one at a time."""
        wait = float(current_app.config["WEBHOOK_COALESCE_SECONDS"])
        queue.defer(
            WEBHOOK_TASK,
            queue=WEBHOOK_QUEUE,
            lock=f"{provider.name}:{object_key}",
            queueing_lock=f"{provider.name}:{object_key}",
            # The job waits this long before it runs, so a burst about one object joins it.
            scheduled_at=utcnow() + timedelta(seconds=wait) if wait > 0 else None,
            provider=provider.name,
            object_key=object_key,
        )

    @classmethod
    def _store_event(cls, provider: WebhookProvider, event: VerifiedEvent) -> WebhookResult:
        model = provider.event_model
        if webhook_store.is_recorded(model, event.event_id):
            return WebhookResult(200, {"received": True, "duplicate": True})
        ignored = provider.ignore_reason(event)
        object_key = error = None
        if not ignored:
            try:
                object_key = provider.object_key(event)
            except MalformedObject as exc:
                error = str(exc)
                logger.warning("webhook event %s (%s) is malformed: %s", event.event_id, event.type, error)
        status = (
            StripeEventStatus.IGNORED if ignored else StripeEventStatus.FAILED if error else StripeEventStatus.PENDING
        )
        with committed():  # on an error nothing is stored; the provider redelivers after a 5xx
            row_id = webhook_store.claim(model, event, status, outcome=ignored, error=error, object_key=object_key)
            if row_id is not None and object_key is not None:
                cls._queue_application(provider, object_key)
        if row_id is None:  # stored by a concurrent delivery we waited for
            return WebhookResult(200, {"received": True, "duplicate": True})
        if ignored:
            return WebhookResult(200, {"received": True, "ignored": ignored})
        if error:
            return WebhookResult(200, {"received": True, "failed": error})
        return WebhookResult(200, {"received": True})

    @classmethod
    def apply_queued_events(cls, provider_name: str, object_key: str, *, final_attempt: bool = True) -> str:
        """The worker's half: apply every pending event about one object, together, from the object's
        current state at the provider (re-read once, with no transaction open), in one transaction
        that also settles the events. A failure keeps the events pending with the error (the job is
        retried with backoff) and, on the last attempt or for a malformed object, marks them failed."""
        provider = cls._webhook_providers[provider_name]
        model = provider.event_model
        rows = webhook_store.pending_rows(model, object_key)
        events = [cls._stored_event(provider, row) for row in rows]
        row_ids = {row.event_id: row.id for row in rows}
        db.session.rollback()  # nothing is held while the provider is read
        if not events:
            return "nothing pending"
        try:
            outcomes = provider.apply_batch(object_key, events)
            for event in events:
                status, outcome = outcomes[event.event_id]
                webhook_store.settle(model, row_ids[event.event_id], status, outcome)
            db.session.commit()
        except Exception as exc:
            db.session.rollback()  # the batch's changes and its domain events go; its rows stay pending
            if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                raise
            permanent = isinstance(exc, MalformedObject)
            logger.log(
                logging.WARNING if permanent else logging.ERROR,
                "applying %d webhook event(s) about %s failed",
                len(events),
                object_key,
                exc_info=not permanent,
            )
            with committed():
                webhook_store.record_attempt_failure(
                    model, list(row_ids.values()), describe_failure(exc), final=permanent or final_attempt
                )
            if permanent:
                return f"failed: {exc}"
            raise
        return f"applied {len(events)} event(s) about {object_key}"

    # --- Stripe events, applied -------------------------------------------------------------------

    @classmethod
    def _apply_subscription_events(
        cls, subscription_id: str, events: list[VerifiedEvent]
    ) -> dict[str, tuple[StripeEventStatus, str]]:
        """customer.subscription.* events: the organization follows Stripe's current subscription,
        read now, whatever order the events came in and whatever their timestamps say (so neither
        ordering nor either clock matters); the events only say when to look."""
        for _read in range(3):
            # What the organization looked like before Stripe is read: if an owner's action or
            # provisioning changes it while the read is in flight, the read may be older than what it
            # holds, so it is read again (compare-and-swap; no clock involved).
            seen = cls._organization_version(subscription_id)
            db.session.rollback()
            try:
                subscription = cls.retrieve_subscription(subscription_id)
            except PaymentProviderUnavailable as exc:
                if _is_missing(exc):
                    reason = f"not ours: this Stripe account has no subscription {subscription_id}"
                    return {event.event_id: (StripeEventStatus.IGNORED, reason) for event in events}
                raise
            subscription = stripe_objects.subscription_for_state(subscription)
            organization = cls._lock_organization_for_subscription(subscription)
            now_held = (organization.id, organization.updated_at) if organization else None
            if now_held == seen:
                break
            db.session.rollback()
        else:
            raise PaymentProviderUnavailable("the organization kept changing while Stripe was read; retrying later")
        if organization is None:
            metadata = subscription.get("metadata") or {}
            if metadata.get("pending_signup_id") or metadata.get("purpose") == "resubscribe":
                waiting = "no organization for this subscription yet; provisioning reads it from Stripe"
                return {event.event_id: (StripeEventStatus.PROCESSED, waiting) for event in events}
            reason = "not ours: no organization holds this subscription and it carries no signup of this app"
            return {event.event_id: (StripeEventStatus.IGNORED, reason) for event in events}
        last = events[-1]
        changes = cls._apply_subscription_read(organization, subscription, source=last.source)
        summary = "applied Stripe's current subscription: " + (", ".join(changes) or "no change")
        outcomes: dict[str, tuple[StripeEventStatus, str]] = {}
        for event in events:
            if event.type == "customer.subscription.trial_will_end":
                outcome = cls._record_trial_will_end(event.body["data"]["object"], event)
            elif event is last:
                outcome = summary
            else:
                outcome = f"coalesced into {last.event_id}: {summary}"
            outcomes[event.event_id] = (StripeEventStatus.PROCESSED, outcome)
        return outcomes

    @classmethod
    def _apply_checkout_events(
        cls, session_id: str, events: list[VerifiedEvent]
    ) -> dict[str, tuple[StripeEventStatus, str]]:
        """checkout.session.* events: Stripe's current Checkout Session decides (paid: provision through
        the same code as the success redirect; expired or failed: close the signup)."""

        def every(status: StripeEventStatus, outcome: str) -> dict[str, tuple[StripeEventStatus, str]]:
            return {event.event_id: (status, outcome) for event in events}

        try:
            checkout = cls.retrieve_checkout_session(session_id, expand_subscription=False)
        except CheckoutSessionNotFound:
            return every(StripeEventStatus.IGNORED, f"not ours: this Stripe account has no checkout {session_id}")
        session = stripe_objects.read(stripe_objects.CheckoutSession, checkout)
        if session.purpose not in ("signup", "resubscribe"):
            return every(StripeEventStatus.IGNORED, "not ours: not a checkout this app created")
        source = events[-1].source
        if checkout_is_paid(checkout):
            try:
                # Nothing is written yet: the connection goes back to the pool while Stripe is read.
                outcome = cls._provision_checkout_session(checkout, source=source, release_before_stripe=True)
            except CheckoutSessionNotFound as exc:
                return every(StripeEventStatus.IGNORED, f"not ours: {exc}")
            return every(StripeEventStatus.PROCESSED, f"{outcome.state} (organization {outcome.organization_id})")
        # An expiry is final at Stripe: the event says so even if a read raced ahead of it.
        if checkout.get("status") == "expired" or any(event.type == "checkout.session.expired" for event in events):
            return every(
                StripeEventStatus.PROCESSED, _close_checkout(checkout, SignupStatus.EXPIRED, "checkout expired", source)
            )
        if any(event.type == "checkout.session.async_payment_failed" for event in events):
            return every(
                StripeEventStatus.PROCESSED, _close_checkout(checkout, SignupStatus.FAILED, "payment failed", source)
            )
        return every(StripeEventStatus.PROCESSED, "awaiting payment")

    @staticmethod
    def _organization_version(subscription_id: str) -> tuple[int, Any] | None:
        row = db.session.execute(
            select(Organization.id, Organization.updated_at).where(
                Organization.billing_provider == BillingProvider.STRIPE,
                Organization.billing_subscription_id == subscription_id,
            )
        ).first()
        return (row[0], row[1]) if row else None

    @staticmethod
    def _lock_organization_for_subscription(subscription: dict[str, Any]) -> Organization | None:
        def find() -> Organization | None:
            # The add-ons come in the same query: applying the subscription compares them.
            return (
                db.session.execute(
                    select(Organization)
                    .options(joinedload(Organization.addons))
                    .where(
                        Organization.billing_provider == BillingProvider.STRIPE,
                        Organization.billing_subscription_id == subscription["id"],
                    )
                    .with_for_update(of=Organization)
                    .execution_options(populate_existing=True)
                )
                .unique()
                .scalar_one_or_none()
            )

        organization = find()
        if organization is not None:
            return organization
        # Not ours yet: wait for any provisioning of it in flight by taking the same lock it holds,
        # then look again. If there is none, provisioning will read the subscription itself later.
        # Provisioning reads Stripe before it locks, so an event in that window bumps a counter that
        # makes it read again.
        metadata = subscription.get("metadata") or {}
        if metadata.get("purpose") == "resubscribe" and str(metadata.get("organization_id") or "").isdigit():
            db.session.execute(
                update(Organization)
                .where(Organization.id == int(metadata["organization_id"]))
                .values(subscription_events_seen=Organization.subscription_events_seen + 1)
            )
        elif metadata.get("pending_signup_id"):
            SignupService.lock_pending_signup(metadata["pending_signup_id"])
            SignupService.note_subscription_event(metadata["pending_signup_id"])
        return find()

    @classmethod
    def _record_invoice(cls, invoice: dict[str, Any], event: VerifiedEvent) -> str:
        """invoice.paid / invoice.payment_failed / invoice.payment_action_required: the payment state,
        and a domain event that dunning notices hang on."""
        organization = db.session.execute(
            select(Organization)
            .where(
                Organization.billing_provider == BillingProvider.STRIPE,
                Organization.billing_customer_id == invoice.get("customer"),
            )
            .with_for_update()
        ).scalar_one_or_none()
        if organization is None:
            return "no organization for this customer yet"
        payment_status = INVOICE_PAYMENT_STATUS[event.type]
        if organization.last_invoice_id == invoice["id"] and organization.last_payment_status == "paid":
            return "stale: this invoice is already paid"
        if organization.payment_as_of is not None and event.created < organization.payment_as_of:
            return "stale: a newer invoice event was applied"
        organization.last_invoice_id = invoice["id"]
        organization.last_payment_status = payment_status
        organization.payment_as_of = event.created
        if payment_status == "paid":
            organization.last_payment_at = utcnow()
        domain_events.record(
            f"billing.payment_{'succeeded' if payment_status == 'paid' else payment_status}",
            organization_id=organization.id,
            source=event.source,
            invoice_id=invoice["id"],
            amount_due=invoice.get("amount_due"),
            amount_paid=invoice.get("amount_paid"),
            currency=invoice.get("currency"),
            attempt_count=invoice.get("attempt_count"),
            next_payment_attempt=invoice.get("next_payment_attempt"),
            hosted_invoice_url=invoice.get("hosted_invoice_url"),
        )
        return f"payment {payment_status} recorded"

    @classmethod
    def _record_trial_will_end(cls, subscription: dict[str, Any], event: VerifiedEvent) -> str:
        organization_id = db.session.execute(
            select(Organization.id).where(
                Organization.billing_provider == BillingProvider.STRIPE,
                Organization.billing_subscription_id == subscription["id"],
            )
        ).scalar_one_or_none()
        if organization_id is None:
            return "no organization for this subscription"
        domain_events.record(
            "subscription.trial_will_end",
            organization_id=organization_id,
            source=event.source,
            trial_end=subscription.get("trial_end"),
        )
        return "trial ending recorded"

    # --- Whop -----------------------------------------------------------------------------------

    @staticmethod
    def whop_configured() -> bool:
        """Whether Whop is on: its key, webhook secret and account are all set."""
        return whop_billing.configured()

    @staticmethod
    def ensure_whop() -> whop_billing.WhopClient:
        """The configured Whop client (whop_billing.py); a missing setting fails here, naming the variable."""
        return whop_billing.client()

    @classmethod
    def whop_tier(cls, tier_key: str) -> Tier:
        """A tier that can be paid through Whop right now."""
        tier = cls.tier(tier_key)
        if not cls.whop_configured() or not tier.whop_plan_id:
            raise UnknownTierError(f"{tier.name} cannot be paid through Whop; choose card payment.")
        return tier

    @classmethod
    def create_whop_checkout_for_tier(
        cls,
        tier_key: str,
        *,
        email: str,
        organization_name: str,
        owner_name: str,
        password: str,
        addons: Mapping[str, int] | None = None,
        interval: str = "month",
    ) -> CheckoutRedirect:
        """Store the signup (SignupService, as for Stripe) and open a Whop checkout configuration for
        the tier's Whop plan, carrying the pending signup's id in its metadata (copied by Whop onto the
        membership). Whop sells the tier alone: add-ons are bought by card."""
        tier = cls.whop_tier(tier_key)
        if any(quantity for quantity in (addons or {}).values()):
            raise BillingError("Add-ons can only be bought with card payment; remove them to pay through Whop.")
        if interval != "month":
            raise BillingError("Whop plans are billed monthly; choose monthly billing to pay through Whop.")
        config = current_app.config
        signup = cls._store_signup(
            tier, {}, email=email, organization_name=organization_name, owner_name=owner_name, password=password
        )
        cls._expire_checkout_sessions([s for s in signup.superseded_checkout_session_ids if s.startswith("cs_")])
        reference = str(signup.pending_signup_id)
        try:
            checkout_id, purchase_url = whop_billing.calls.create_checkout(
                str(tier.whop_plan_id),
                reference=reference,
                redirect_url=f"{config['APP_BASE_URL']}/billing/complete-signup-from-whop?signup={reference}",
            )
        except BillingError as exc:
            SignupService.mark_signup_failed(signup.pending_signup_id, f"Whop checkout not created: {exc}")
            raise
        if not purchase_url:
            SignupService.mark_signup_failed(signup.pending_signup_id, "Whop checkout has no purchase URL")
            raise PaymentProviderUnavailable("We could not reach our payment provider. Nothing was charged.")
        SignupService.attach_checkout_session(signup.pending_signup_id, checkout_id)
        return CheckoutRedirect(
            url=purchase_url, pending_signup_id=signup.pending_signup_id, checkout_session_id=checkout_id
        )

    @classmethod
    def complete_whop_signup_from_redirect(cls, pending_signup_id: str, membership_id: str) -> ProvisionOutcome:
        """Whop's redirect after payment: provision (or find provisioned) the signup. The membership is
        read from Whop (no transaction open meanwhile) and must carry this signup's id."""
        if as_uuid(pending_signup_id or "") is None or not whop_events.WHOP_MEMBERSHIP_ID.fullmatch(
            membership_id or ""
        ):
            raise CheckoutSessionNotFound("That checkout link is not valid.")
        try:
            pending = found(SignupService.pending_signup(pending_signup_id))
            if pending.status == SignupStatus.COMPLETED:
                return SignupService.outcome_for(pending, ProvisionState.ALREADY_PROVISIONED)
        finally:
            db.session.rollback()
        try:
            membership = whop_billing.calls.retrieve_membership(membership_id)
        except ProviderObjectMissing as exc:
            raise CheckoutSessionNotFound("We could not find a signup for that checkout.") from exc
        if str((membership.get("metadata") or {}).get("pending_signup_id")) != pending_signup_id:
            raise CheckoutSessionNotFound("We could not find a signup for that checkout.")
        with committed():
            outcome = whop_events.provision_membership(membership, source="web")
        return outcome

    # --- Whop: the owner's actions ----------------------------------------------------------------

    @classmethod
    def _whop_manage_url(cls, organization: Organization) -> str:
        membership_id = organization.billing_subscription_id
        if not membership_id:
            raise SubscriptionActionNotAllowed("This organization has no billing account yet.")
        db.session.rollback()  # release the connection while Whop answers
        manage_url = whop_billing.calls.retrieve_membership(membership_id).get("manage_url")
        if not manage_url:
            raise PaymentProviderUnavailable("Whop did not give a management page for this membership.")
        return str(manage_url)

    @classmethod
    def _whop_owner_change(
        cls, organization_id: int, membership_id: str, action: str, request_token: str, actor_user_id: int
    ) -> list[str]:
        """Cancel at period end, cancel now, or resume a Whop membership (the same checks as for
        Stripe have passed); the organization takes Whop's answer in a short transaction."""
        key = f"org-{organization_id}-{action}-{request_token}"
        membership = whop_billing.calls.change_membership(membership_id, action, idempotency_key=key)
        with committed():
            organization = whop_events.lock_organization(membership_id)
            changes: list[str] = []
            if organization is not None and organization.id == organization_id:
                changes = whop_events.apply_membership_read(organization, membership, source=f"user:{actor_user_id}")
        return changes


def _event_references(event: Mapping[str, Any]) -> set[str]:
    """The subscription and customer ids an event's object names."""
    obj = (event.get("data") or {}).get("object") or {}
    references = {id_of(obj.get(name)) for name in ("subscription", "customer")}
    if obj.get("object") == "subscription":
        references.add(id_of(obj.get("id")))
    return {reference for reference in references if reference}


def _remember_prices_statement(prices: Iterable[KnownPrice]) -> Any:
    """Remember prices seen with a catalogue lookup key; a price already known stays as first seen."""
    now = utcnow()
    rows = {
        price.price_id: {
            "price_id": price.price_id,
            "product_id": price.product_id,
            "lookup_key": price.lookup_key,
            "kind": price.entry.kind,
            "catalogue_key": price.entry.key,
            "first_seen_at": now,
        }
        for price in prices
    }
    statement = portable_insert(CataloguePrice).values(list(rows.values()))
    return statement.on_conflict_do_nothing(index_elements=["price_id"])


@outbox.consumer("signup.conflict", name="settle_signup_conflict")
def _settle_signup_conflict(event: outbox.OutboxEvent) -> None:
    """The worker cancels and refunds a conflicting signup recorded by a webhook (the success page
    does it at once when the customer comes back; whichever runs second finds it settled)."""
    BillingService.settle_signup_conflict(event.data["pending_signup_id"], source="worker")


@outbox.consumer("organization.surplus_subscription", name="settle_surplus_subscription")
def _settle_surplus_subscription(event: outbox.OutboxEvent) -> None:
    BillingService.settle_surplus_subscription(event.data["checkout_session_id"], source="worker")


INVOICE_PAYMENT_STATUS = {
    "invoice.paid": "paid",
    "invoice.payment_failed": "failed",
    "invoice.payment_action_required": "action_required",
}


def _finish_claim(key: str, status: SubscriptionChangeStatus, outcome: str) -> None:
    db.session.execute(
        update(SubscriptionChange)
        .where(SubscriptionChange.idempotency_key == key)
        .values(status=status, outcome=outcome[:500], finished_at=utcnow())
    )


def _cache_quietly(key: str, value: Any, timeout: int) -> None:
    try:
        cache.set(key, value, timeout=timeout)
    except Exception:
        logger.info("billing page: %s not cached", key)


class StripeWebhooks:
    """Stripe as a webhook provider: Stripe-Signature verification, the livemode guard, and the event
    types this product acts on."""

    name = "stripe"
    event_model = StripeEvent

    def verify(self, payload: bytes, headers: Mapping[str, str]) -> VerifiedEvent:
        secrets = _webhook_secrets()
        header = headers.get("Stripe-Signature")
        if not header:
            raise WebhookRejected("missing Stripe-Signature header")
        if not header.isascii():  # the SDK's compare_digest raises TypeError on non-ASCII signatures
            raise WebhookRejected("malformed Stripe-Signature header")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise WebhookRejected("body is not UTF-8") from None
        reason = "signature does not match"
        for secret in secrets:
            try:
                stripe.WebhookSignature.verify_header(text, header, secret, STRIPE_SIGNATURE_TOLERANCE_SECONDS)
                break
            except stripe.SignatureVerificationError as exc:
                if str(exc.user_message or "").startswith("Timestamp outside the tolerance zone"):
                    reason = "timestamp outside the tolerance zone"
                elif str(exc.user_message or "").startswith(("Unable to extract", "No signatures found with expected")):
                    reason = "malformed Stripe-Signature header"
        else:
            raise WebhookRejected(reason)
        return _parse_stripe_event(text)

    def ignore_reason(self, event: VerifiedEvent) -> str | None:
        expected_livemode = str(current_app.config["STRIPE_SECRET_KEY"]).startswith(("sk_live_", "rk_live_"))
        if event.livemode != expected_livemode:
            return f"livemode mismatch: event is {'live' if event.livemode else 'test'} mode, our key is not"
        if event.type not in HANDLED_STRIPE_EVENTS:
            return f"unhandled event type {event.type}"
        if event.type.startswith("checkout.session."):
            metadata = event.body["data"]["object"].get("metadata")
            # Metadata that is not an object is left for the typed reading to refuse (failed, with why).
            if isinstance(metadata, dict | None) and (metadata or {}).get("purpose") not in ("signup", "resubscribe"):
                return "not ours: not a checkout this app created"
        return None

    def object_key(self, event: VerifiedEvent) -> str:
        obj = stripe_objects.read_for_event(event.type, event.body["data"]["object"])
        if isinstance(obj, stripe_objects.CheckoutSession):
            return f"checkout:{obj.id}"
        if isinstance(obj, stripe_objects.Subscription):
            return f"subscription:{obj.id}"
        customer = stripe_objects.id_of(obj.customer)
        if customer is None:
            raise MalformedObject("malformed Invoice object: it names no customer")
        return f"customer:{customer}"

    def apply_batch(self, object_key: str, events: list[VerifiedEvent]) -> dict[str, tuple[StripeEventStatus, str]]:
        kind, _, object_id = object_key.partition(":")
        if kind == "subscription":
            return BillingService._apply_subscription_events(object_id, events)
        if kind == "checkout":
            return BillingService._apply_checkout_events(object_id, events)
        if kind == "customer":
            # Payments are facts with their own invoice ids: each event is recorded in turn (no read).
            return {
                event.event_id: (
                    StripeEventStatus.PROCESSED,
                    BillingService._record_invoice(event.body["data"]["object"], event),
                )
                for event in events
            }
        raise MalformedObject(f"no object kind {kind!r}")


def _webhook_secrets() -> list[str]:
    secrets = [s.strip() for s in str(current_app.config.get("STRIPE_WEBHOOK_SECRET") or "").split(",") if s.strip()]
    if not secrets:
        raise BillingConfigurationError("STRIPE_WEBHOOK_SECRET is not set: webhooks cannot be verified")
    return secrets


def _parse_stripe_event(text: str) -> VerifiedEvent:
    try:
        body = json.loads(text)
    except ValueError:
        raise WebhookRejected("body is not JSON") from None
    if not (
        isinstance(body, dict)
        and body.get("object") == "event"
        and isinstance(body.get("id"), str)
        and STRIPE_EVENT_ID.fullmatch(body["id"])
        and isinstance(body.get("type"), str)
        and EVENT_TYPE.fullmatch(body["type"])
        and type(body.get("created")) is int
        and 0 <= body["created"] < 2**63
        and isinstance(body.get("livemode"), bool)
        and isinstance(body.get("data"), dict)
        and isinstance(body["data"].get("object"), dict)
    ):
        raise WebhookRejected("body is not a Stripe event")
    api_version = body.get("api_version")
    return VerifiedEvent(
        provider="stripe",
        event_id=body["id"],
        type=body["type"],
        created=body["created"],
        livemode=body["livemode"],
        api_version=api_version if isinstance(api_version, str) and API_VERSION_FORMAT.fullmatch(api_version) else None,
        raw=text,
        body=body,
    )


def _close_checkout(checkout: dict[str, Any], status: SignupStatus, reason: str, source: str) -> str:
    if (checkout.get("metadata") or {}).get("purpose") == "resubscribe":
        return f"resubscribe checkout {reason}"
    return SignupService.close_pending_signup(
        checkout_session_id=checkout["id"],
        reference_id=checkout.get("client_reference_id"),
        status=status,
        reason=reason,
        source=source,
    )


def _is_missing(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, stripe.InvalidRequestError) and cause.code == "resource_missing"


WEBHOOK_TASK = "webhooks:apply"
WEBHOOK_QUEUE = "webhooks"
HANDLED_STRIPE_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
        "invoice.paid",
        "invoice.payment_failed",
        "invoice.payment_action_required",
    }
)


def _now_billed_by_stripe(organization: Organization, subscription: Mapping[str, Any]) -> None:
    """An organization whose Whop membership ended comes back by card: Stripe bills it from now on."""
    if organization.billed_by_whop:
        organization.billing_provider = BillingProvider.STRIPE
        organization.billing_customer_id = id_of(subscription.get("customer"))
        organization.billing_as_of = None


BillingService.register_webhook_provider(StripeWebhooks())
BillingService.register_webhook_provider(whop_billing.WhopWebhooks())
