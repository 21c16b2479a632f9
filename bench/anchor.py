"""The two anchors the webhook endpoint is measured against, served under the same gunicorn.conf.py
(`gunicorn -c gunicorn.conf.py bench.anchor:app`) with the app's production database settings:

- POST /verify-only: verify the Stripe-Signature with the SDK call the app uses, answer 200. The ceiling.
- POST /store-only: verify, then one INSERT ... ON CONFLICT DO NOTHING into anchor_event (shaped like
  stripe_event) and a commit, through Flask-SQLAlchemy and psycopg2 as the app does. The least a handler
  that never loses a delivery does.
- POST /usage-store-only: the usage API's anchor (bench/usage.py). The organization is read from the
  bench's API key itself (`llk_bench_<organization>_...`, no lookup), then one INSERT ... ON CONFLICT DO
  NOTHING of the event (or of the batch's events, from one jsonb_to_recordset) into anchor_usage (shaped
  like usage_event, its indexes and foreign keys included) and a commit.
"""

from __future__ import annotations

import json
import os

import stripe
from flask import Flask, jsonify, request
from sqlalchemy import text
from werkzeug.wrappers import Response

from app.extensions import db  # gunicorn.conf.py's post_fork resets this engine in each worker
from app.services.billing_service import STRIPE_SIGNATURE_TOLERANCE_SECONDS
from config import ProductionConfig

STORE = text(
    "INSERT INTO anchor_event (event_id, type, api_version, livemode, stripe_created, payload, status, attempts, "
    "received_at) VALUES (:event_id, :type, :api_version, :livemode, :created, :payload, 'processed', 1, now()) "
    "ON CONFLICT (event_id) DO NOTHING"
)

# As the app stores usage: not tallied yet (billable_quantity NULL, in the untallied index).
STORE_USAGE = text(
    "INSERT INTO anchor_usage (organization_id, meter, quantity, billable_quantity, idempotency_key, occurred_at, "
    "period_start, period_end, recorded_at) VALUES (:organization_id, :meter, :quantity, NULL, :idempotency_key, "
    "now(), date_trunc('month', now()), date_trunc('month', now()) + interval '1 month', now()) "
    "ON CONFLICT (organization_id, idempotency_key) DO NOTHING"
)
STORE_USAGE_BATCH = text(
    "INSERT INTO anchor_usage (organization_id, meter, quantity, billable_quantity, idempotency_key, occurred_at, "
    "period_start, period_end, recorded_at) SELECT :organization_id, e.meter, e.quantity, NULL, e.idempotency_key, "
    "now(), date_trunc('month', now()), date_trunc('month', now()) + interval '1 month', now() "
    "FROM jsonb_to_recordset(CAST(:events AS jsonb)) AS e(meter text, quantity bigint, idempotency_key text) "
    "ON CONFLICT (organization_id, idempotency_key) DO NOTHING"
)

app = Flask(__name__)
_config = ProductionConfig()
app.config.update(
    SQLALCHEMY_DATABASE_URI=_config.SQLALCHEMY_DATABASE_URI,
    SQLALCHEMY_ENGINE_OPTIONS=_config.SQLALCHEMY_ENGINE_OPTIONS,
    SQLALCHEMY_TRACK_MODIFICATIONS=False,
)
db.init_app(app)
WEBHOOK_SECRET = os.environ["STRIPE_WEBHOOK_SECRET"]


def _verified_body() -> str | None:
    body = request.get_data(cache=False).decode("utf-8")
    try:
        stripe.WebhookSignature.verify_header(
            body, request.headers.get("Stripe-Signature", ""), WEBHOOK_SECRET, STRIPE_SIGNATURE_TOLERANCE_SECONDS
        )
    except stripe.SignatureVerificationError:
        return None
    return body


@app.post("/verify-only")
def verify_only() -> Response | tuple[Response, int]:
    if _verified_body() is None:
        return jsonify(error="signature does not match"), 400
    return jsonify(received=True)


@app.post("/store-only")
def store_only() -> Response | tuple[Response, int]:
    body = _verified_body()
    if body is None:
        return jsonify(error="signature does not match"), 400
    event = json.loads(body)
    db.session.execute(
        STORE,
        {
            "event_id": event["id"],
            "type": event["type"],
            "api_version": event.get("api_version"),
            "livemode": event["livemode"],
            "created": event["created"],
            "payload": body,
        },
    )
    db.session.commit()
    return jsonify(received=True)


@app.post("/usage-store-only")
def usage_store_only() -> tuple[Response, int]:
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if not key.startswith("llk_bench_"):
        return jsonify(error="not a bench key"), 401
    organization_id = int(key.split("_")[2])
    body = request.get_json()
    if "events" in body:
        events = body["events"]
        db.session.execute(STORE_USAGE_BATCH, {"organization_id": organization_id, "events": json.dumps(events)})
        db.session.commit()
        return jsonify(recorded=len(events)), 200
    db.session.execute(
        STORE_USAGE,
        {
            "organization_id": organization_id,
            "meter": body["meter"],
            "quantity": body["quantity"],
            "idempotency_key": body["idempotency_key"],
        },
    )
    db.session.commit()
    return jsonify(recorded=1), 201
