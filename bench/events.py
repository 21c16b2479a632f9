"""Webhook payloads, shaped like Stripe's, with every delivery a distinct, numbered event.

Event number k is `evt_bench_<k>`. A subscription event k is for organization k % ORGANIZATIONS (its
subscription `sub_bench_<org>`), created FIRST_CREATED + 10 s per pass over the organizations, so each
organization sees strictly newer events 10 s apart and the app applies them without asking Stripe
(anything within 5 s of the state it holds is re-read from Stripe instead). Each one moves the
subscription's period end, so each one changes its organization.

A template holds @K@, @ORG@, @CREATED@ and @PERIOD_END@; fill() here and fill() in webhook.lua compute
the same values, so wrk and the Python generators send byte-identical bodies for the same k.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any

from app.services.billing_service import STRIPE_API_VERSION

ORGANIZATIONS = 20_000
# Events 0 .. DUPLICATES-1 are stored as already processed; they are what the duplicate runs redeliver.
DUPLICATES = 1_000
# Events numbered from here on are only ever bulk-loaded (the 1,000,000-row table), never sent.
BULK_FIRST = 100_000_000
FIRST_CREATED = 1_700_000_000
SECONDS_BETWEEN_PASSES = 10
PERIOD_SECONDS = 30 * 86_400
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


def fields(k: int) -> dict[str, int]:
    created = FIRST_CREATED + SECONDS_BETWEEN_PASSES * (k // ORGANIZATIONS)
    return {"K": k, "ORG": k % ORGANIZATIONS, "CREATED": created, "PERIOD_END": created + PERIOD_SECONDS}


def fill(template: str, k: int) -> str:
    values = fields(k)
    return PLACEHOLDER.sub(lambda match: str(values[match[1]]), template)


def sign(body: str, secret: str) -> str:
    """The Stripe-Signature header for body, timestamped now: HMAC-SHA256 over "{t}.{body}"."""
    timestamp = int(time.time())
    digest = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _template(event_type: str, data: dict[str, Any]) -> str:
    event = {
        "id": "evt_bench_@K@",
        "object": "event",
        "api_version": STRIPE_API_VERSION,
        "created": "@CREATED@",
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }
    # Numbers are numbers in the filled body.
    return json.dumps(event).replace('"@CREATED@"', "@CREATED@").replace('"@PERIOD_END@"', "@PERIOD_END@")


def subscription_updated_template() -> str:
    """customer.subscription.updated for a Pro subscription renewed to a new period."""
    subscription = {
        "id": "sub_bench_@ORG@",
        "object": "subscription",
        "application": None,
        "billing_cycle_anchor": FIRST_CREATED,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "collection_method": "charge_automatically",
        "created": FIRST_CREATED,
        "currency": "usd",
        "customer": "cus_bench_@ORG@",
        "default_payment_method": "pm_bench_@ORG@",
        "ended_at": None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_bench_@ORG@",
                    "object": "subscription_item",
                    "created": FIRST_CREATED,
                    "current_period_start": "@CREATED@",
                    "current_period_end": "@PERIOD_END@",
                    "metadata": {},
                    "price": {
                        "id": "price_bench_pro_monthly",
                        "object": "price",
                        "active": True,
                        "currency": "usd",
                        "lookup_key": "pro_monthly",
                        "nickname": "Pro",
                        "product": "prod_bench_pro",
                        "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
                        "type": "recurring",
                        "unit_amount": 4900,
                    },
                    "quantity": 1,
                    "subscription": "sub_bench_@ORG@",
                }
            ],
            "has_more": False,
            "total_count": 1,
            "url": "/v1/subscription_items?subscription=sub_bench_@ORG@",
        },
        "latest_invoice": "in_bench_@K@",
        "livemode": False,
        "metadata": {},
        "start_date": FIRST_CREATED,
        "status": "active",
        "trial_end": None,
        "trial_start": None,
    }
    return _template(
        "customer.subscription.updated",
        {"object": subscription, "previous_attributes": {"latest_invoice": "in_bench_previous"}},
    )


def charge_refunded_template() -> str:
    """charge.refunded: a type this product does not act on."""
    charge = {
        "id": "ch_bench_@K@",
        "object": "charge",
        "amount": 4900,
        "amount_refunded": 4900,
        "captured": True,
        "created": FIRST_CREATED,
        "currency": "usd",
        "customer": "cus_bench_@ORG@",
        "invoice": "in_bench_@K@",
        "livemode": False,
        "paid": True,
        "payment_intent": "pi_bench_@K@",
        "refunded": True,
        "status": "succeeded",
    }
    return _template("charge.refunded", {"object": charge, "previous_attributes": {"amount_refunded": 0}})
