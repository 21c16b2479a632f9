"""BillingService: the one billing authority, and the only module that uses the Stripe SDK. Whop's SDKs
are behind one adapter (whop_billing.py) that only this module imports.

Read it as billing's table of contents: every Stripe call as a thin method, the public entry points
(signup checkouts, provisioning, the owner's actions, settlement, reconcile, the billing page, plan
changes, webhooks of every provider through handle_webhook_event), and the registration tables. Each
entry point reads, decides through a sibling and writes through a sibling; siblings reach Stripe only
through the protocols this class implements (StripeReads, PageReads, ReconcileOperations). The map of
the billing modules is in docs/system/SERVICES.md; the behaviour in docs/system/BILLING.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

import stripe
from flask import current_app
from stripe.params import InvoiceCreatePreviewParams
from stripe.params.checkout import SessionCreateParamsLineItem

from app import clock
from app.extensions import db
from app.models import Organization
from app.services import (
    billing_page,
    cancel_refund,
    checkout_completion,
    free_plan,
    outbox,
    owner_actions,
    plan_change_flow,
    price_lookup,
    promotions,
    provisioning,
    reconcile_run,
    reconcile_scope,
    settlement,
    signup_checkout,
    staff_actions,
    staff_console,
    stripe_pace,
    stripe_webhooks,
    tax,
    usage,
    usage_reconcile,
    usage_reports,
    usage_tally,
    webhook_intake,
    whop_billing,
)
from app.services import reconcile as reconciliation
from app.services.billing_common import (
    REQUEST_TOKEN,
    STALE_FORM,
    BillingConfigurationError,
    BillingError,
    ChangeOutcome,
    CheckoutRedirect,
    CheckoutSessionNotFound,
    PaymentProviderUnavailable,
    ProviderObjectMissing,
    ProviderThrottled,
    StaleForm,
    StalePreview,
    SubscriptionActionNotAllowed,
    UnknownTierError,
    UnknownWebhookProvider,
    WebhookProvider,
    WebhookRejected,
    WebhookResult,
    id_of,
    plan_catalogue,
)
from app.services.billing_details import BillingDetails
from app.services.plan_change import CurrentPlan, Preview, payment_problem, schedule_phases, update_items
from app.services.plans import Tier
from app.services.pricing import PriceInfo
from app.services.signup_service import ProvisionOutcome, SignupService
from app.services.stripe_events import HANDLED_STRIPE_EVENTS
from app.services.webhook_intake import WEBHOOK_QUEUE

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
# The SDK resolves stripe.WebhookSignature through import_module on every access: read once here.
_VERIFY_STRIPE_SIGNATURE = stripe.WebhookSignature.verify_header
# The billing page's reads: no retries (the page would rather say "not available" than wait).
PAGE_READ: stripe.RequestOptions = {"max_network_retries": 0}


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
        client = cls._new_client(
            config["STRIPE_MAX_NETWORK_RETRIES"], config["STRIPE_RATE_WAIT_SECONDS"], config["STRIPE_TIMEOUT_SECONDS"]
        )
        current_app.extensions["stripe_client"] = client
        return client

    @classmethod
    def _stripe_for_page_reads(cls) -> stripe.StripeClient:
        """A client for the billing page's reads: a short timeout (STRIPE_PAGE_READ_TIMEOUT_SECONDS) and
        no retries, so a slow Stripe costs the page seconds, not minutes; the page says what is missing."""
        client: stripe.StripeClient | None = current_app.extensions.get("stripe_read_client")
        if client is None:
            cls.ensure_stripe()  # the same credentials check
            timeout = current_app.config["STRIPE_PAGE_READ_TIMEOUT_SECONDS"]
            client = cls._new_client(0, min(current_app.config["STRIPE_RATE_WAIT_SECONDS"], timeout), timeout)
            current_app.extensions["stripe_read_client"] = client
        return client

    @staticmethod
    def _new_client(retries: int, max_wait: float, timeout: float) -> stripe.StripeClient:
        """Every request takes a turn from the shared budget (stripe_pace.py)."""
        config, api_base = current_app.config, current_app.config.get("STRIPE_API_BASE")
        return stripe.StripeClient(
            config["STRIPE_SECRET_KEY"],
            stripe_version=STRIPE_API_VERSION,
            base_addresses={"api": api_base, "meter_events": api_base} if api_base else None,
            max_network_retries=retries,
            http_client=stripe_pace.paced_client(
                stripe.RequestsClient, stripe_pace.for_app(current_app), max_wait=max_wait, timeout=timeout
            ),
        )

    @staticmethod
    @contextmanager
    def _calling_stripe(action: str) -> Iterator[None]:
        """Stripe's errors as ours: the customer is told to try again, the log keeps Stripe's words."""
        try:
            yield
        except stripe.AuthenticationError as exc:
            logger.error("Stripe rejected our credentials while trying to %s: %s", action, exc.user_message)
            raise BillingConfigurationError("The payment provider rejected our credentials.") from exc
        except stripe.RateLimitError as exc:  # 429: slow down (every process pauses: stripe_pace.py)
            logger.warning("Stripe throttled us while trying to %s: %s", action, exc.user_message)
            raise ProviderThrottled(stripe_pace.retry_after(exc.headers)) from exc
        except stripe.StripeError as exc:
            logger.warning("Stripe error while trying to %s: %s", action, exc.user_message or type(exc).__name__)
            if isinstance(exc, stripe.InvalidRequestError) and exc.code == "resource_missing":
                raise ProviderObjectMissing(
                    "We could not reach our payment provider. Nothing was charged; please try again."
                ) from exc
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
        cache or one lookup at Stripe for those not cached (price_lookup.py). required: a key with no
        active price raises PriceUnavailableError; otherwise it is left out."""
        return price_lookup.prices_for_lookup_keys(lookup_keys, cls._fetch_prices, required=required)

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
            price_lookup.remember_listed_prices([price.to_dict() for price in prices.data])
        return found

    @classmethod
    def active_promotion_code(cls, code: str) -> dict[str, Any] | None:
        """The active promotion code with this code at Stripe (its coupon included), or None."""
        with cls._calling_stripe("look up a promotion code"):
            found = cls.ensure_stripe().v1.promotion_codes.list(
                params={"code": code, "active": True, "limit": 1, "expand": ["data.promotion.coupon"]}
            )
        return found.data[0].to_dict() if found.data else None

    @classmethod
    def catalogue_prices(cls) -> dict[str, PriceInfo]:
        """Every price the catalogue sells, for pages that show them (signup, change plan). Never raises:
        a price Stripe does not have, or a Stripe that does not answer, is simply not shown."""
        try:
            return cls.prices_for_lookup_keys(plan_catalogue().priced_lookup_keys(), required=False)
        except (BillingError, BillingConfigurationError) as exc:
            logger.warning("catalogue prices not shown: %s", exc)
            return {}

    @staticmethod
    def tier(tier_key: str) -> Tier:
        tier = plan_catalogue().tier(tier_key)
        if tier is None:
            raise UnknownTierError(f"There is no plan called {tier_key!r}.")
        return tier

    @classmethod
    def _line_items(
        cls, tier: Tier, addons: Mapping[str, int], interval: str = "month"
    ) -> list[SessionCreateParamsLineItem]:
        return price_lookup.line_items(tier, addons, interval, cls.price_ids_for_lookup_keys)

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
        resume_signup_id: str | None = None,
    ) -> CheckoutRedirect:
        """Store the signup (SignupService) and open a subscription-mode Checkout Session for it, billed
        every `interval` (month, or year where the catalogue sells the tier yearly). The same choices sent
        again by the browser that holds `resume_signup_id` go back to its open session instead."""
        client = cls.ensure_stripe()
        tier = cls.tier(tier_key)
        line_items = cls._line_items(tier, addons or {}, interval)
        open_signup = SignupService.open_signup_to_resume(
            resume_signup_id, email=email, tier=tier.key, addons=dict(addons or {})
        )
        if open_signup is not None:
            with contextlib.suppress(BillingError):  # unreadable: a new checkout is made, as before
                with cls._calling_stripe("read the open checkout session"):
                    session = client.v1.checkout.sessions.retrieve(open_signup[1], params={"expand": ["line_items"]})
                if price_lookup.checkout_sells(session, line_items) and SignupService.resume_open_signup(
                    *open_signup, organization_name=organization_name, owner_name=owner_name, password=password
                ):
                    return CheckoutRedirect(str(session.url), open_signup[0], open_signup[1])
        signup = signup_checkout.store_signup(
            tier,
            addons or {},
            email=email,
            organization_name=organization_name,
            owner_name=owner_name,
            password=password,
        )
        cls._expire_checkout_sessions(signup.superseded_checkout_session_ids)
        reference = str(signup.pending_signup_id)
        try:
            with cls._calling_stripe("create a checkout session"):
                payer: dict[str, Any] = {"customer_email": email.strip().lower()}
                if current_app.config["STRIPE_TEST_CLOCKS"]:
                    who = {
                        "email": email.strip().lower(),
                        "name": owner_name,
                        "metadata": signup_checkout.metadata(reference),
                    }
                    payer = {"customer": cls._new_customer(f"signup-customer-{reference}", who, f"signup {reference}")}
                params: Any = signup_checkout.session_params(tier, line_items, reference, payer)
                # Derived from the signup: a retried request returns the same session.
                session = client.v1.checkout.sessions.create(
                    params=params, options={"idempotency_key": f"signup-checkout-{reference}"}
                )
        except BillingError as exc:
            signup_checkout.checkout_failed(signup, exc, tier, addons or {}, interval)
            raise
        SignupService.attach_checkout_session(signup.pending_signup_id, session.id)
        return CheckoutRedirect(
            url=str(session.url), pending_signup_id=signup.pending_signup_id, checkout_session_id=session.id
        )

    @classmethod
    def _new_customer(cls, key: str, params: dict[str, Any], clock_name: str | None) -> str:
        """A customer (a free organization upgrading; a signup's with STRIPE_TEST_CLOCKS), on a test clock of
        its own frozen at now given clock_name (test mode only); the keys make a retry the same customer."""
        client = cls.ensure_stripe()
        with cls._calling_stripe("create a customer"):
            if clock_name:
                params["test_clock"] = client.v1.test_helpers.test_clocks.create(
                    params={"frozen_time": clock.now(), "name": clock_name}, options={"idempotency_key": f"{key}-clock"}
                ).id
            return client.v1.customers.create(params=params, options={"idempotency_key": key}).id  # type: ignore[arg-type]

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
        before the answer, so the page can say what happened (checkout_completion.py)."""
        return checkout_completion.signup(cls, session_id)

    @classmethod
    def _provision_checkout_session(
        cls, session: str | Mapping[str, Any], *, source: str, release_before_stripe: bool = False
    ) -> ProvisionOutcome:
        """Provision a completed checkout exactly once, whoever asks first: the success redirect (with
        the session id), a webhook (with the session object) or reconcile; in the caller's transaction,
        Stripe read before any row is locked (provisioning.py)."""
        return provisioning.provision_checkout_session(
            session, cls, source=source, release_before_stripe=release_before_stripe
        )

    @classmethod
    def retrieve_checkout_session(cls, session_id: str, *, expand_subscription: bool) -> dict[str, Any]:
        client = cls.ensure_stripe()
        try:
            with cls._calling_stripe("read a checkout session"):
                session = client.v1.checkout.sessions.retrieve(
                    session_id, params={"expand": ["subscription"]} if expand_subscription else None
                )
        except ProviderObjectMissing as exc:
            raise CheckoutSessionNotFound("We could not find that checkout.") from exc
        return session.to_dict()

    @classmethod
    def retrieve_subscription(cls, subscription_id: str) -> dict[str, Any]:
        with cls._calling_stripe("read a subscription"):
            return cls.ensure_stripe().v1.subscriptions.retrieve(subscription_id).to_dict()

    @classmethod
    def retrieve_event(cls, event_id: str) -> dict[str, Any]:  # a thin event, read back with its data
        with cls._calling_stripe("read an event"):
            return cls.ensure_stripe().v2.core.events.retrieve(event_id).to_dict()

    # --- The owner's actions ----------------------------------------------------------------------
    # None of them holds a transaction, row lock or pooled connection while Stripe answers: they read
    # what they need, end the transaction, call Stripe with an idempotency key derived from our ids
    # (and the form's one-time token), then apply Stripe's answer in a short transaction.

    @classmethod
    def create_customer_portal_session(cls, organization: Organization, *, return_url: str) -> str:
        """A Stripe customer-portal session for the organization's customer; returns its URL. For a
        Whop-billed organization: the membership's own management page on Whop."""
        if organization.billed_by_whop:
            return whop_billing.manage_url(organization)
        customer_id, organization_id = organization.billing_customer_id, organization.id
        if not customer_id:
            raise SubscriptionActionNotAllowed("This organization has no billing account yet.")
        db.session.rollback()  # release the connection while Stripe answers
        with cls._calling_stripe("open the customer portal"):
            portal = cls.ensure_stripe().v1.billing_portal.sessions.create(
                params={"customer": customer_id, "return_url": return_url}
            )
        cls.forget_billing_reads(organization_id)  # what the owner changes there (a card) shows on return
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

        allowed = owner_actions.cancel_refusal(at_period_end)
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
                # A downgrade to free is a scheduled cancellation too: resuming withdraws it.
                params={"cancel_at_period_end": False, "cancel_at": "", "metadata": {free_plan.DOWNGRADE_TO: ""}},
                options={"idempotency_key": key},
            )

        allowed = owner_actions.resume_refusal
        return cls._owner_subscription_change(organization_id, "resume", request_token, actor_user_id, allowed, call)

    @classmethod
    def downgrade_to_free(cls, organization_id: int, *, request_token: str, actor_user_id: int) -> list[str]:
        """Downgrade a paid plan to the free one: the subscription is canceled at the period's end and
        notes the free tier (free_plan.DOWNGRADE_TO), so its end moves the organization to it."""
        tier = free_plan.free_tier()

        def call(client: stripe.StripeClient, subscription_id: str, key: str) -> stripe.Subscription:
            params: Any = {"cancel_at_period_end": True, "metadata": {free_plan.DOWNGRADE_TO: tier.key if tier else ""}}
            return client.v1.subscriptions.update(subscription_id, params=params, options={"idempotency_key": key})

        allowed = owner_actions.downgrade_refusal(tier)
        return cls._owner_subscription_change(
            organization_id, "downgrade-free", request_token, actor_user_id, allowed, call
        )

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
        owner_actions.check_form(request_token)
        client = cls.ensure_stripe()
        subscription_id, whop = owner_actions.subscription_to_change(organization_id, allowed)
        key = f"org-{organization_id}-{action}-{request_token}"
        if whop:
            return whop_billing.owner_change(organization_id, subscription_id, action, key, actor_user_id)
        # The same form submitted twice is one Stripe call; two different actions are serialized by
        # Stripe, and each applies the subscription Stripe answered with. A form submitted again later
        # (the back button, a second tab) gets Stripe's cached answer for its key, which may be older
        # than the subscription: then the subscription is read as it is now, applied, and the owner told.
        with cls._calling_stripe(action.replace("-", " ") + " a subscription"):
            answer = call(client, subscription_id, key)
        replayed = (
            answer.last_response is not None and answer.last_response.headers.get("Idempotent-Replayed") == "true"
        )
        subscription = cls.retrieve_subscription(subscription_id) if replayed else answer.to_dict()
        changes = owner_actions.apply_answer(organization_id, subscription, actor_user_id)
        if replayed:
            raise StaleForm(STALE_FORM)
        return changes

    @classmethod
    def create_checkout_session_for_organization(
        cls, organization_id: int, tier_key: str, *, request_token: str, actor_user_id: int
    ) -> str:
        """A new subscription for an organization whose last one ended; returns the checkout URL. The
        organization's other open resubscribe checkouts are expired, so two tabs cannot both pay."""
        owner_actions.check_form(request_token)
        client = cls.ensure_stripe()
        customer_id, name, owner_email = owner_actions.resubscriber(organization_id, actor_user_id)
        tier = cls.tier(tier_key)
        if customer_id is None:  # a free organization upgrading: its Stripe customer is made now
            customer_id = provisioning.remember_customer(
                organization_id,
                cls._new_customer(
                    f"org-{organization_id}-customer",
                    {"email": owner_email, "name": name, "metadata": {"organization_id": str(organization_id)}},
                    f"organization {organization_id}" if current_app.config["STRIPE_TEST_CLOCKS"] else None,
                ),
            )
        params: Any = owner_actions.resubscribe_params(organization_id, customer_id, cls._line_items(tier, {}))
        with cls._calling_stripe("create a checkout session"):
            session = client.v1.checkout.sessions.create(
                params=params,
                options={"idempotency_key": f"org-{organization_id}-resubscribe-{tier.key}-{request_token}"},
            )
        superseded = provisioning.record_resubscribe_checkout(organization_id, tier.key, session.id, actor_user_id)
        cls._expire_checkout_sessions(superseded)
        return str(session.url)

    @classmethod
    def complete_resubscription_from_redirect(cls, organization_id: int, session_id: str) -> ProvisionOutcome:
        """The resubscription's success URL: provision it, a surplus settled at once (checkout_completion.py)."""
        return checkout_completion.resubscription(cls, organization_id, session_id)

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
        return cls._settle(settlement.signup_conflict(pending_signup_id), source)

    @classmethod
    def settle_surplus_subscription(cls, checkout_session_id: str, *, source: str) -> dict[str, Any] | None:
        """Cancel and refund a resubscription paid while the organization already had a live one."""
        db.session.rollback()
        return cls._settle(settlement.surplus_subscription(checkout_session_id), source)

    @classmethod
    def _settle(cls, to_settle: settlement.ToSettle | dict[str, Any] | None, source: str) -> dict[str, Any] | None:
        if not isinstance(to_settle, settlement.ToSettle):
            return to_settle  # nothing to settle, or settled already
        if to_settle.subscription_id.startswith("mem_"):  # a Whop membership is settled at Whop
            settled = whop_billing.cancel_and_refund(to_settle.subscription_id, key=to_settle.key)
        else:
            settled = cls._cancel_and_refund(to_settle.subscription_id, key=to_settle.key)
        to_settle.record(settled, source)
        return settled

    @classmethod
    def _cancel_and_refund(cls, subscription_id: str, *, key: str) -> dict[str, Any]:
        """Cancel the subscription now and refund what its first invoice took (cancel_refund.py)."""
        return cancel_refund.cancel_and_refund(cls, subscription_id, key=key)

    @classmethod
    def _cancel_now(cls, subscription_id: str, *, key: str) -> dict[str, Any]:
        client = cls.ensure_stripe()
        with cls._calling_stripe("cancel a subscription"):
            try:
                return client.v1.subscriptions.cancel(subscription_id, options={"idempotency_key": key}).to_dict()
            except stripe.InvalidRequestError as exc:
                if exc.code != "resource_missing":
                    raise
                return client.v1.subscriptions.retrieve(subscription_id).to_dict()  # already ended

    @classmethod
    def _read_invoice_with_payments(cls, invoice_id: str) -> dict[str, Any]:
        with cls._calling_stripe("read an invoice"):
            return cls.ensure_stripe().v1.invoices.retrieve(invoice_id, params={"expand": ["payments"]}).to_dict()

    @classmethod
    def _refund(cls, target: Any, *, key: str) -> dict[str, Any]:
        with cls._calling_stripe("refund a payment"):
            return cls.ensure_stripe().v1.refunds.create(params=target, options={"idempotency_key": key}).to_dict()

    # --- Reconcile --------------------------------------------------------------------------------

    @classmethod
    def reconcile(
        cls, *, apply: bool = False, since_days: int = 3, organization_id: int | None = None, drain: bool = True
    ) -> reconciliation.ReconcileReport:
        """Compare Stripe and Whop with the database (`flask billing reconcile`; the worker runs it daily):
        what is read is reconcile_scope.py's; with apply, repairs go through the delivery paths and the
        worker's jobs (reconcile_run.py); drain runs those jobs here. No transaction is open while a
        provider answers."""
        reconcile_scope.check_window(since_days)
        return reconcile_run.run(
            lambda: reconcile_scope.read_all(
                cls,
                since_days,
                organization_id,
                HANDLED_STRIPE_EVENTS,
                cls.whop_configured,
                whop_billing.reconcile_read,
            ),
            cls,
            cls._webhook_providers["stripe"],
            cls._webhook_providers["whop"],
            apply=apply,
            drain=drain,
        )

    @classmethod
    def list_subscriptions_for_reconcile(cls) -> dict[str, dict[str, Any]]:
        with cls._calling_stripe("list subscriptions for reconcile"):
            listing = cls.ensure_stripe().v1.subscriptions.list(params={"status": "all", "limit": 100})
            return {sub.id: sub.to_dict() for sub in listing.auto_paging_iter()}

    @classmethod
    def list_events_for_reconcile(cls, since: int, types: list[str]) -> list[dict[str, Any]]:
        with cls._calling_stripe("list events for reconcile"):
            listing = cls.ensure_stripe().v1.events.list(
                params={"created": {"gte": since}, "types": types, "limit": 100}
            )
            return [event.to_dict() for event in listing.auto_paging_iter()]

    @classmethod
    def read_event_for_reconcile(cls, event_id: str) -> str:
        """An event exactly as Stripe sends it (the raw body; a dict round trip would turn amounts like
        unit_amount_decimal into Decimals), to be stored and queued as a delivery is."""
        with cls._calling_stripe("read an event for reconcile"):
            event = cls.ensure_stripe().v1.events.retrieve(event_id)
        return event.last_response.body if event.last_response else json.dumps(event.to_dict(), default=str)

    @classmethod
    def checkout_session_for_subscription(cls, subscription_id: str) -> str | None:
        with cls._calling_stripe("find the checkout of a subscription"):
            sessions = cls.ensure_stripe().v1.checkout.sessions.list(
                params={"subscription": subscription_id, "limit": 1}
            )
        return sessions.data[0].id if sessions.data else None

    # --- The billing page's reads -------------------------------------------------------------------

    @classmethod
    def billing_details(cls, organization: Organization) -> BillingDetails:
        """What the owner's billing page shows from Stripe, or from Whop for a Whop-billed organization
        (billing_page.py); never raises for their sake: a part not given in time is named in `unavailable`."""
        return billing_page.billing_details(organization, cls, whop_billing.calls)

    @staticmethod
    def forget_billing_reads(organization_id: int) -> None:
        """Drop the billing page's cached reads, after a change made from the app."""
        billing_page.forget_reads(organization_id)

    @classmethod
    def read_subscription_for_page(cls, subscription_id: str) -> dict[str, Any]:
        with cls._calling_stripe("read a subscription"):
            return (
                cls._stripe_for_page_reads()
                .v1.subscriptions.retrieve(
                    subscription_id,
                    params={"expand": ["discounts.promotion_code", "discounts.source.coupon"]},
                    options=PAGE_READ,
                )
                .to_dict()
            )

    @classmethod
    def read_upcoming(cls, subscription_id: str, schedule_id: str | None = None) -> dict[str, Any] | None:
        """Stripe's preview of the next invoice; of the schedule when one manages the subscription."""
        params: InvoiceCreatePreviewParams = {"subscription": subscription_id}
        if schedule_id:
            params = {"schedule": schedule_id}
        try:
            with cls._calling_stripe("preview the next invoice"):
                preview = cls._stripe_for_page_reads().v1.invoices.create_preview(params=params, options=PAGE_READ)
        except PaymentProviderUnavailable as exc:
            if isinstance(exc.__cause__, stripe.InvalidRequestError):
                return None  # Stripe says there is no next invoice (the subscription ends, say)
            raise
        return preview.to_dict()

    @classmethod
    def read_schedule(cls, schedule_id: str) -> dict[str, Any]:
        with cls._calling_stripe("read a subscription schedule"):
            client = cls._stripe_for_page_reads()
            return client.v1.subscription_schedules.retrieve(schedule_id, options=PAGE_READ).to_dict()

    @classmethod
    def read_payment_method(cls, customer_id: str, default_method: str | None) -> dict[str, Any] | None:
        client = cls._stripe_for_page_reads()
        method_id = default_method
        if method_id is None:
            with cls._calling_stripe("read a customer"):
                customer = client.v1.customers.retrieve(customer_id, options=PAGE_READ).to_dict()
            method_id = id_of((customer.get("invoice_settings") or {}).get("default_payment_method"))
        if method_id is None:
            return None
        with cls._calling_stripe("read a payment method"):
            return client.v1.payment_methods.retrieve(method_id, options=PAGE_READ).to_dict()

    @classmethod
    def read_invoice_for_receipt(cls, invoice_id: str) -> dict[str, Any]:
        """An invoice as a receipt shows it (the worker's read: retried, then the outbox retries)."""
        with cls._calling_stripe("read an invoice"):
            return cls.ensure_stripe().v1.invoices.retrieve(invoice_id).to_dict()

    @classmethod
    def update_customer(cls, customer_id: str, fields: Mapping[str, Any], *, key: str) -> None:
        """Stripe's customer gets our details (the worker's customer sync; the owner's billing address)."""
        params: Any = dict(fields)
        with cls._calling_stripe("update a customer"):
            cls.ensure_stripe().v1.customers.update(customer_id, params=params, options={"idempotency_key": key})

    @classmethod
    def read_customer_tax(cls, customer_id: str) -> dict[str, Any]:
        """The customer with its tax IDs, for the billing page and reconcile (tax.py)."""
        client = cls._stripe_for_page_reads()
        with cls._calling_stripe("read a customer"):
            customer = client.v1.customers.retrieve(customer_id, params={"expand": ["tax_ids"]}, options=PAGE_READ)
        return customer.to_dict()

    @classmethod
    def change_customer_tax_id(cls, customer_id: str, *, add: Any, remove: str | None, key: str) -> None:
        client, options = cls.ensure_stripe(), stripe.RequestOptions(idempotency_key=key)
        with cls._calling_stripe("change a tax ID"):
            if add is not None:
                client.v1.customers.tax_ids.create(
                    customer_id, params={"type": add[0], "value": add[1]}, options=options
                )
            if remove is not None:
                client.v1.customers.tax_ids.delete(customer_id, remove)

    @classmethod
    def change_tax_details(cls, organization_id: int, change: tax.TaxChange, *, actor_user_id: int) -> None:
        """The owner edits the billing address or tax IDs (tax.py); Stripe keeps them."""
        tax.change_details(organization_id, change, cls, actor_user_id=actor_user_id)

    @classmethod
    def read_list_for_page(cls, resource: billing_page.PageList, params: Any) -> list[dict[str, Any]]:
        """A page's read of one of Stripe's lists: the page-read timeout, no retries."""
        with cls._calling_stripe(f"list {resource}"):
            found = getattr(cls._stripe_for_page_reads().v1, resource).list(params=params, options=PAGE_READ)
        return [item.to_dict() for item in found.data]

    # --- Plan and seat changes --------------------------------------------------------------------

    @classmethod
    def preview_subscription_change(cls, organization_id: int, *, kind: str, members: int, **asked: Any) -> Preview:
        """A preview of changing the plan or the extra seats (tier, interval, extra_seats, promotion_code
        asked), read fresh from Stripe (plan_change_flow.py)."""
        return plan_change_flow.preview(cls, organization_id, kind=kind, members=members, **asked)

    @classmethod
    def preview_change_invoice(cls, params: Any) -> dict[str, Any]:
        with cls._calling_stripe("preview the change"):
            return cls.ensure_stripe().v1.invoices.create_preview(params=params).to_dict()

    @classmethod
    def confirm_subscription_change(cls, preview: Preview, *, actor_user_id: int) -> ChangeOutcome:
        """Make the previewed change at Stripe, exactly once however often it is submitted
        (plan_change_flow.py: claimed, re-read, refused as stale, made now or scheduled)."""
        return plan_change_flow.confirm(cls, preview, actor_user_id=actor_user_id)

    @classmethod
    def _apply_change_now(
        cls, current: CurrentPlan, preview: Preview, prices: Mapping[str, PriceInfo], key: str
    ) -> tuple[dict[str, Any], str | None, str | None]:
        """An upgrade or seat change, invoiced at once with pending_if_incomplete: Stripe makes the
        change only if that invoice is paid; otherwise it waits in the subscription's pending_update
        (23 hours) and the old plan stays. Returns the subscription, the invoice to pay and why."""
        client = cls.ensure_stripe()
        if current.schedule_id:  # a downgrade was waiting for the period's end: this change replaces it
            cls._release_schedule(current.schedule_id, f"{key}-release")
        items: Any = update_items(current, prices, preview.quantities, plan_catalogue())
        with cls._calling_stripe("change a subscription"):
            subscription = client.v1.subscriptions.update(
                current.subscription_id,
                params=cast(
                    Any,
                    {
                        "items": items,
                        "proration_behavior": "always_invoice",
                        "proration_date": preview.proration_date,
                        "payment_behavior": "pending_if_incomplete",
                        "expand": ["latest_invoice.payments"],
                        **promotions.change_discounts(preview.promotion_code_id),  # the code entered, if any
                    },
                ),
                options={"idempotency_key": key},
            ).to_dict()
        invoice = subscription.get("latest_invoice")
        subscription["latest_invoice"] = id_of(invoice)
        if not subscription.get("pending_update") or not isinstance(invoice, dict):
            return subscription, None, None
        return subscription, invoice.get("hosted_invoice_url"), payment_problem(cls._invoice_intent(invoice))

    @classmethod
    def _invoice_intent(cls, invoice: Mapping[str, Any]) -> dict[str, Any] | None:
        """The PaymentIntent of an invoice's (first) payment, or None if none was attempted."""
        payments = (invoice.get("payments") or {}).get("data") or []
        intent_id = id_of((payments[0].get("payment") or {}).get("payment_intent")) if payments else None
        if intent_id is None:
            return None
        with cls._calling_stripe("read a payment"):
            return cls.ensure_stripe().v1.payment_intents.retrieve(intent_id).to_dict()

    @classmethod
    def _schedule_change(
        cls, current: CurrentPlan, preview: Preview, prices: Mapping[str, PriceInfo], key: str
    ) -> dict[str, Any]:
        """A downgrade at the period's end: a subscription schedule made from the subscription, whose
        current phase ends with the period and whose next phase carries the new prices; when it is
        done it releases the subscription, which renews on those prices."""
        client = cls.ensure_stripe()
        phases: Any = schedule_phases(current, prices, preview.quantities, plan_catalogue())
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
    def _release_schedule(cls, schedule_id: str, key: str) -> None:
        with cls._calling_stripe("release a subscription schedule"):
            cls.ensure_stripe().v1.subscription_schedules.release(schedule_id, options={"idempotency_key": key})

    @classmethod
    def cancel_scheduled_change(cls, organization_id: int, *, actor_user_id: int) -> None:
        """Keep the current plan: release the schedule that would downgrade it (plan_change_flow.py)."""
        plan_change_flow.withdraw_scheduled(cls, organization_id, actor_user_id=actor_user_id)

    # --- Webhooks ---------------------------------------------------------------------------------

    @staticmethod
    def _stripe_signature_error(text: str, header: str, secret: str) -> str | None:
        """None when Stripe-Signature verifies with this secret; else Stripe's words for why not."""
        try:
            _VERIFY_STRIPE_SIGNATURE(text, header, secret, STRIPE_SIGNATURE_TOLERANCE_SECONDS)
        except stripe.SignatureVerificationError as exc:
            return str(exc.user_message or "")
        return None

    @classmethod
    def register_webhook_provider(cls, provider: WebhookProvider) -> None:
        cls._webhook_providers[provider.name] = provider

    @classmethod
    def handle_webhook_event(cls, provider_name: str, payload: bytes, headers: Mapping[str, str]) -> WebhookResult:
        """Verify and store one webhook delivery; answer at once (webhook_intake.receive). A duplicate of
        an event this process saw settled is answered from its id alone; of another, one statement. A new
        event is read into typed objects (stripe_objects.py) and stored in one statement, keyed on its
        object: `pending` (the stored event is the work: a worker's dispatch pass gives it a job), or
        `ignored` (not ours, other mode, unhandled type) or `failed` (malformed, with the reason;
        replayable). Every stored event is answered 2xx. Nothing here calls the provider's API."""
        provider = cls._webhook_providers.get(provider_name)
        if provider is None:
            raise UnknownWebhookProvider(provider_name)
        return webhook_intake.receive(provider, payload, headers)

    @classmethod
    def queue_unclaimed_events(cls, *, older_than_seconds: float, lost: bool = True, drain: bool = False) -> list[str]:
        """The sweep: every object with pending events and no job waiting or running gets one."""
        providers = cls._webhook_providers.values()
        return webhook_intake.queue_unclaimed(providers, older_than_seconds, lost=lost, drain=drain)

    @classmethod
    def replay_stored_event(cls, event_id: str) -> WebhookResult:
        """Queue a stored event again (ops: `flask billing replay`): a failed one goes back to pending,
        read afresh (so a fix to the reading code applies), and the worker applies it."""
        return webhook_intake.replay(cls._webhook_providers.values(), event_id)

    @classmethod
    def apply_queued_events(
        cls, provider_name: str, object_key: str, *, final_attempt: bool = True, resync: bool = False
    ) -> str:
        """The worker's half: apply every pending event about one object, together, from the object's
        current state at the provider, in one transaction that also settles the events
        (webhook_intake.py)."""
        provider = cls._webhook_providers[provider_name]
        return webhook_intake.apply_queued(provider, object_key, final_attempt=final_attempt, resync=resync)

    # --- Usage-based billing: recording (app/services/usage.py) -----------------------------------
    @staticmethod
    def record_usage(
        organization_id: int, meter: str, quantity: int, *, idempotency_key: str, occurred_at: datetime | None = None
    ) -> usage.RecordedUsage:
        """One usage event, stored once per idempotency key; usage.UsageRejected: nothing stored."""
        return usage.record(
            plan_catalogue(), organization_id, meter, quantity, idempotency_key=idempotency_key, occurred_at=occurred_at
        )

    @staticmethod
    def record_usage_batch(organization_id: int, events: list[dict[str, Any]], **kw: Any) -> list[usage.Recorded]:
        """Events stored set-based in one transaction (usage_store.py); a refused one: a UsageRejected in its place."""
        return usage.record_batch(plan_catalogue(), organization_id, events, **kw)  # kw: account (usage.record_batch)

    @staticmethod
    def tally_usage(*, once: bool = False) -> int:
        """Count stored events into their periods' totals and bill what passes the tier (usage_tally.py)."""
        return usage_tally.tally(plan_catalogue(), once=once)

    # --- Usage-based billing: reporting to Stripe's meter events (app/services/usage_reports.py) ------
    @classmethod
    def report_usage(cls) -> usage_reports.ReportRun:
        """Tally, gather billable usage into reports, then send the pending ones (the worker's usage:report)."""
        cls.tally_usage()
        run = usage_reports.ReportRun(gathered=usage_reports.gather())
        v2 = (lambda: cls.ensure_stripe().v2.billing.meter_event_session.create(), cls._stream_meter_events)  # noqa: PLW0108
        return usage_reports.send_pending(plan_catalogue(), cls._send_meter_event, run, v2)

    @classmethod
    def _send_meter_event(cls, event: usage_reports.MeterEventToSend) -> None:
        try:
            cls.ensure_stripe().v1.billing.meter_events.create(usage_reports.v1_params(event))
        except stripe.InvalidRequestError as exc:  # a 4xx other than 429: settled, one way or the other
            raise usage_reports.refusal(exc.user_message or str(exc)) from exc

    @classmethod
    def _stream_meter_events(cls, token: str, events: list[Any]) -> None:
        try:  # the session's token authenticates the v2 stream (usage_stream.py)
            cls.ensure_stripe().v2.billing.meter_event_stream.create({"events": events}, {"api_key": token})
        except (stripe.TemporarySessionExpiredError, stripe.AuthenticationError, stripe.InvalidRequestError) as exc:
            raise usage_reports.stream_refusal(exc, stripe.InvalidRequestError) from exc  # (usage_stream.py)

    @classmethod
    def meter_ids(cls) -> dict[str, str]:
        """Stripe's active meters by event_name (mtr_ ids)."""
        with cls._calling_stripe("list meters"):
            meters = cls.ensure_stripe().v1.billing.meters.list({"status": "active", "limit": 100}).data
        return {meter.event_name: meter.id for meter in meters}

    @classmethod
    def reconcile_usage(cls, *, apply: bool = False, org: int | None = None) -> usage_reconcile.UsageReconcile:
        """Our billed usage per period against Stripe's meter event summaries; `apply` re-sends what Stripe lacks."""
        meters = cls.meter_ids()

        def at_stripe(period: usage_reconcile.PeriodToCheck) -> int:
            start, end = usage_reconcile.summary_window(period)
            summaries = cls.ensure_stripe().v1.billing.meters.event_summaries.list(
                meters[period.event_name], {"customer": period.customer_id, "start_time": start, "end_time": end}
            )
            return round(sum(summary.aggregated_value for summary in summaries.data))

        send, now = cls._send_meter_event, clock.utcnow()
        return usage_reconcile.run(plan_catalogue(), now, at_stripe, send, apply=apply, organization_id=org)

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
        return signup_checkout.whop_payable(cls.tier(tier_key), cls.whop_configured())

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
        """Store the signup (SignupService, as for Stripe) and open a Whop checkout for the tier's Whop
        plan (whop_billing.py). Whop sells the tier alone, monthly: add-ons are bought by card."""
        tier = cls.whop_tier(tier_key)
        signup_checkout.check_whop_choices(addons or {}, interval)
        signup = signup_checkout.store_signup(
            tier, {}, email=email, organization_name=organization_name, owner_name=owner_name, password=password
        )
        cls._expire_checkout_sessions([s for s in signup.superseded_checkout_session_ids if s.startswith("cs_")])
        return whop_billing.open_signup_checkout(tier, signup.pending_signup_id)

    @classmethod
    def complete_whop_signup_from_redirect(cls, pending_signup_id: str, membership_id: str) -> ProvisionOutcome:
        """Whop's redirect after payment: provision (or find provisioned) the signup, from the membership
        as Whop has it now (whop_billing.py); a conflict is settled at Whop at once, as for Stripe."""
        outcome = whop_billing.complete_signup_from_redirect(pending_signup_id, membership_id)
        return checkout_completion.settle_conflict(cls, outcome)

    # --- The operations console (app/admin/): its reads are staff_console.py's, its actions staff_actions.py's

    @classmethod
    def staff_organization(cls, organization_id: int) -> staff_console.OrganizationView | None:
        return staff_console.organization_view(organization_id, cls, whop_billing.calls.retrieve_membership_for_page)

    @classmethod
    def staff_action(cls, request: staff_actions.StaffRequest | staff_actions.ResyncJob) -> staff_actions.StaffOutcome:
        return staff_actions.perform(request, cls)

    @classmethod
    def staff_update_subscription(cls, change: staff_actions.SubscriptionEdit, *, actor_user_id: int) -> list[str]:
        """Staff: the subscription updated by `change.params` (a later trial end, a coupon), if allowed."""

        def call(client: stripe.StripeClient, subscription_id: str, key: str) -> stripe.Subscription:
            params: Any = change.params
            return client.v1.subscriptions.update(subscription_id, params=params, options={"idempotency_key": key})

        org, kind, token, allowed = change.organization_id, change.kind, change.request_token, change.refusal
        return cls._owner_subscription_change(org, kind, token, actor_user_id, allowed, call)

    @classmethod
    def refund_invoice(cls, invoice_id: str, *, amount: int | None, key: str) -> dict[str, Any]:
        """Refund what a paid invoice took, whole or `amount` of it (staff, from the console)."""
        client = cls.ensure_stripe()
        with cls._calling_stripe("refund a payment"):
            invoice = client.v1.invoices.retrieve(invoice_id, params={"expand": ["payments"]}).to_dict()
            target: Any = {**settlement.refund_target(invoice, key), **({"amount": amount} if amount else {})}
            return client.v1.refunds.create(params=target, options={"idempotency_key": key}).to_dict()


@outbox.consumer("signup.conflict", name="settle_signup_conflict")
def _settle_signup_conflict(event: outbox.OutboxEvent) -> None:
    """The worker cancels and refunds a conflicting signup recorded by a webhook (the success page
    does it at once when the customer comes back; whichever runs second finds it settled)."""
    BillingService.settle_signup_conflict(event.data["pending_signup_id"], source="worker")


@outbox.consumer("organization.surplus_subscription", name="settle_surplus_subscription")
def _settle_surplus_subscription(event: outbox.OutboxEvent) -> None:
    BillingService.settle_surplus_subscription(event.data["checkout_session_id"], source="worker")


BillingService.register_webhook_provider(
    stripe_webhooks.StripeWebhooks(BillingService._stripe_signature_error, BillingService)
)
BillingService.register_webhook_provider(whop_billing.WhopWebhooks())
