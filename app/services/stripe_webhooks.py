"""Stripe as a webhook provider: the Stripe-Signature header checked against each webhook secret (the
signature itself verified by the SDK call BillingService hands in), the livemode guard, and the event
types this product acts on (stripe_events.py), applied through the StripeReads BillingService implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from app.models import StripeEvent
from app.services import stripe_events
from app.services.billing_common import EventOutcomes, StripeReads, WebhookRejected, delivery_text, webhook_secrets
from app.services.webhook_store import VerifiedEvent

# (body, Stripe-Signature header, secret) -> None when the signature verifies, else Stripe's words why not.
SignatureCheck = Callable[[str, str, str], str | None]


class StripeWebhooks:
    name = "stripe"
    event_model = StripeEvent
    paced_reads = ("subscription", "checkout")  # kinds read from Stripe: a turn is taken before collecting

    def __init__(self, check_signature: SignatureCheck, reads: StripeReads) -> None:
        self._check_signature = check_signature
        self._reads = reads

    def authenticate(self, payload: bytes, headers: Mapping[str, str]) -> str:
        secrets = webhook_secrets("STRIPE_WEBHOOK_SECRET", "webhooks")
        header = headers.get("Stripe-Signature")
        if not header:
            raise WebhookRejected("missing Stripe-Signature header")
        if not header.isascii():  # the SDK's compare_digest raises TypeError on non-ASCII signatures
            raise WebhookRejected("malformed Stripe-Signature header")
        text = delivery_text(payload)
        reason = "signature does not match"
        for secret in secrets:
            error = self._check_signature(text, header, secret)
            if error is None:
                break
            if error.startswith("Timestamp outside the tolerance zone"):
                reason = "timestamp outside the tolerance zone"
            elif error.startswith(("Unable to extract", "No signatures found with expected")):
                reason = "malformed Stripe-Signature header"
        else:
            raise WebhookRejected(reason)
        return text

    def event_id(self, text: str, headers: Mapping[str, str]) -> str | None:
        return stripe_events.event_id_of(text)

    def parse(self, text: str, headers: Mapping[str, str]) -> VerifiedEvent:
        return stripe_events.parse_event(text)

    def ignore_reason(self, event: VerifiedEvent) -> str | None:
        return stripe_events.ignore_reason(event)

    def object_key(self, event: VerifiedEvent) -> str:
        return stripe_events.object_key(event)

    def apply_batch(self, object_key: str, events: list[VerifiedEvent]) -> EventOutcomes:
        return stripe_events.apply_batch(object_key, events, self._reads)
