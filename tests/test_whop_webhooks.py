"""Whop webhooks through the HTTP endpoint, signed as Whop signs them (Standard Webhooks, the HMAC
keyed with the secret's own bytes), on real PostgreSQL; plus Whop's configuration, catalogue and
production checks."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import standardwebhooks
from flask import Flask
from flask.testing import FlaskClient

from app.services.plans import CatalogueError, PlanCatalogue
from config import ProductionConfig
from tests.conftest import query

SECRET = "ws_whop_suite_0123456789abcdef"
ACCOUNT = "biz_suite"
WHOP = {"WHOP_API_KEY": "apik_suite_key", "WHOP_WEBHOOK_SECRET": SECRET, "WHOP_COMPANY_ID": ACCOUNT}


def envelope(event_type: str = "membership.activated", data: dict[str, Any] | None = None, **fields: Any) -> bytes:
    body = {
        "id": fields.pop("id", "msg_envelope"),
        "api_version": "v1",
        "type": event_type,
        "timestamp": "2026-11-28T12:00:00.000Z",
        "account_id": ACCOUNT,
        "data": data if data is not None else {"id": "mem_1", "status": "active", "metadata": {}},
        **fields,
    }
    return json.dumps(body).encode()


def whop_headers(body: bytes, msg_id: str, *secrets: str, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers, one v1 signature per secret, as Whop sends them."""
    moment = datetime.fromtimestamp(timestamp if timestamp is not None else int(time.time()), UTC)
    signatures = [
        standardwebhooks.Webhook(base64.b64encode(secret.encode()).decode()).sign(msg_id, moment, body.decode())
        for secret in (secrets or (SECRET,))
    ]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


def deliver(client: FlaskClient, body: bytes, headers: dict[str, str]) -> Any:
    return client.post("/billing/webhooks/whop", data=body, headers={"Content-Type": "application/json", **headers})


def stored(app: Flask) -> list[Any]:
    return query(app, "SELECT * FROM whop_event ORDER BY id")


@pytest.fixture
def whop_app(make_app: Any) -> Flask:
    app: Flask = make_app(**WHOP)
    return app


@pytest.fixture
def whop_client(whop_app: Flask) -> FlaskClient:
    return whop_app.test_client()


# --- Verification ------------------------------------------------------------------------------


def test_a_good_delivery_is_stored_once_under_its_webhook_id(whop_client: FlaskClient, whop_app: Flask) -> None:
    body = envelope()
    response = deliver(whop_client, body, whop_headers(body, "msg_good_1"))
    assert response.status_code == 200
    assert response.get_json() == {"received": True}
    [row] = stored(whop_app)
    # Stored and queued for the worker, keyed on the membership it is about.
    assert (row.event_id, row.type, row.api_version, row.status, row.attempts, row.object_key) == (
        "msg_good_1",
        "membership.activated",
        "v1",
        "pending",
        1,
        "membership:mem_1",
    )
    assert row.whop_created == int(datetime(2026, 11, 28, 12, tzinfo=UTC).timestamp())
    assert row.payload == body.decode()  # exactly as received
    assert row.livemode is True  # no WHOP_API_BASE: Whop itself
    assert query(whop_app, "SELECT * FROM stripe_event") == []


def test_the_whop_sdk_helper_accepts_what_the_app_accepts(whop_client: FlaskClient) -> None:
    """The signing this suite uses is the one whop-sdk's own verifier expects."""
    from whop_sdk.lib.verify_webhook import unwrap

    body = envelope()
    headers = whop_headers(body, "msg_sdk_1")
    assert unwrap(body, headers=headers, key=SECRET)["type"] == "membership.activated"
    assert deliver(whop_client, body, headers).status_code == 200


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing webhook-id, webhook-timestamp or webhook-signature header"),
        (
            {"webhook-id": "msg_1", "webhook-timestamp": "{now}"},
            "missing webhook-id, webhook-timestamp or webhook-signature header",
        ),
        (
            {"webhook-id": "msg_1", "webhook-timestamp": "{now}", "webhook-signature": "v1,AAAA"},
            "signature does not match",
        ),
        (
            {"webhook-id": "msg_1", "webhook-timestamp": "{now}", "webhook-signature": "garbage"},
            "malformed webhook-signature header",
        ),
        (
            {"webhook-id": "msg_1", "webhook-timestamp": "{now}", "webhook-signature": "v1,A"},
            "malformed webhook-signature header",
        ),
        (
            {"webhook-id": "msg_1", "webhook-timestamp": "soon", "webhook-signature": "v1,AAAA"},
            "malformed webhook-timestamp header",
        ),
    ],
)
def test_missing_or_bad_signatures_are_refused_and_nothing_is_stored(
    whop_client: FlaskClient, whop_app: Flask, headers: dict[str, str], reason: str
) -> None:
    now = str(int(time.time()))
    response = deliver(whop_client, envelope(), {k: v.format(now=now) for k, v in headers.items()})
    assert response.status_code == 400 and response.get_json() == {"error": reason}
    assert stored(whop_app) == []


def test_a_signature_with_another_secret_is_refused(whop_client: FlaskClient, whop_app: Flask) -> None:
    body = envelope()
    response = deliver(whop_client, body, whop_headers(body, "msg_wrong", "ws_someone_else"))
    assert response.status_code == 400 and response.get_json() == {"error": "signature does not match"}
    # Keyed the standardwebhooks way (the secret base64-decoded) is not how Whop signs: refused too.
    wrong_key = standardwebhooks.Webhook("whsec_" + base64.b64encode(b"ws_whop_suite").decode())
    moment = datetime.now(UTC)
    headers = {
        "webhook-id": "msg_wrong",
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": wrong_key.sign("msg_wrong", moment, body.decode()),
    }
    assert deliver(whop_client, body, headers).status_code == 400
    assert stored(whop_app) == []


def test_a_stale_or_future_timestamp_is_refused_beyond_five_minutes(whop_client: FlaskClient, whop_app: Flask) -> None:
    body = envelope()
    for offset in (-301, 301):
        response = deliver(whop_client, body, whop_headers(body, "msg_time", timestamp=int(time.time()) + offset))
        assert response.status_code == 400
        assert response.get_json() == {"error": "timestamp outside the tolerance zone"}
    assert stored(whop_app) == []
    assert (
        deliver(whop_client, body, whop_headers(body, "msg_time", timestamp=int(time.time()) - 290)).status_code == 200
    )


def test_a_signed_body_that_is_not_a_whop_event_is_refused(whop_client: FlaskClient, whop_app: Flask) -> None:
    for body, reason in (
        (b"not json", "body is not JSON"),
        (b"\xff\xfe", "body is not UTF-8"),
        (b"[1, 2]", "body is not a Whop event"),
        (json.dumps({"type": "membership.activated"}).encode(), "body is not a Whop event"),
        (json.dumps({"type": "bad type!", "data": {}}).encode(), "body is not a Whop event"),
    ):
        headers = (
            whop_headers(body, "msg_body")
            if body != b"\xff\xfe"
            else {"webhook-id": "msg_body", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,AAAA"}
        )
        response = deliver(whop_client, body, headers)
        assert response.status_code == 400 and response.get_json() == {"error": reason}, body
    body = envelope()
    response = deliver(whop_client, body, whop_headers(body, "msg bad id"))  # signed, but not an id we store
    assert response.status_code == 400 and response.get_json() == {"error": "body is not a Whop event"}
    assert stored(whop_app) == []


def test_the_secret_can_be_rotated_without_downtime(make_app: Any) -> None:
    app = make_app(**{**WHOP, "WHOP_WEBHOOK_SECRET": f"ws_new_secret_0123, {SECRET}"})
    client = app.test_client()
    body = envelope()
    assert deliver(client, body, whop_headers(body, "msg_rot_old", SECRET)).status_code == 200
    assert deliver(client, body, whop_headers(body, "msg_rot_new", "ws_new_secret_0123")).status_code == 200
    # While a secret is rotated one header carries a signature per secret: any match passes.
    both = whop_headers(body, "msg_rot_both", "ws_retired", "ws_new_secret_0123")
    assert len(both["webhook-signature"].split(" ")) == 2
    assert deliver(client, body, both).status_code == 200
    assert deliver(client, body, whop_headers(body, "msg_rot_gone", "ws_retired")).status_code == 400
    assert [row.event_id for row in stored(app)] == ["msg_rot_old", "msg_rot_new", "msg_rot_both"]


def test_without_whop_configured_the_endpoint_does_not_exist(make_app: Any) -> None:
    for missing in WHOP:
        app = make_app(**{**WHOP, missing: ""})
        body = envelope()
        response = deliver(app.test_client(), body, whop_headers(body, "msg_unconfigured"))
        assert response.status_code == 404 and response.get_json() == {"error": "unknown webhook provider"}
        assert stored(app) == []


# --- Storing -----------------------------------------------------------------------------------


def test_a_duplicate_delivery_changes_nothing(whop_client: FlaskClient, whop_app: Flask) -> None:
    body = envelope("payment.succeeded", {"id": "pay_1", "membership_id": "mem_1"})
    first = deliver(whop_client, body, whop_headers(body, "msg_dup"))
    assert first.status_code == 200 and "duplicate" not in first.get_json()
    for _ in range(3):  # Whop's retries keep the webhook-id and re-sign with a new timestamp
        again = deliver(whop_client, body, whop_headers(body, "msg_dup", timestamp=int(time.time()) + 2))
        assert again.status_code == 200 and again.get_json() == {"received": True, "duplicate": True}
    [row] = stored(whop_app)
    assert row.attempts == 1


def test_concurrent_deliveries_of_one_event_store_it_once(whop_app: Flask) -> None:
    body = envelope("membership.deactivated", {"id": "mem_2", "status": "canceled"})
    headers = whop_headers(body, "msg_concurrent")
    barrier = threading.Barrier(12)
    answers: list[tuple[int, Any]] = []

    def send() -> None:
        client = whop_app.test_client()
        barrier.wait()
        response = deliver(client, body, headers)
        answers.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in answers] == [200] * 12
    assert Counter("duplicate" in answer for _, answer in answers) == Counter({True: 11, False: 1})
    [row] = stored(whop_app)
    assert (row.event_id, row.attempts) == ("msg_concurrent", 1)


def test_unknown_types_and_other_accounts_are_recorded_and_ignored(whop_client: FlaskClient, whop_app: Flask) -> None:
    body = envelope("course.created", {"id": "crs_1"})
    assert deliver(whop_client, body, whop_headers(body, "msg_unknown")).get_json()["ignored"] == (
        "unhandled event type course.created"
    )
    body = envelope(account_id="biz_elsewhere")
    assert deliver(whop_client, body, whop_headers(body, "msg_elsewhere")).get_json()["ignored"] == (
        "event for another Whop account (biz_elsewhere)"
    )
    assert [(row.event_id, row.status) for row in stored(whop_app)] == [
        ("msg_unknown", "ignored"),
        ("msg_elsewhere", "ignored"),
    ]


def test_events_naming_no_object_are_stored_as_failed(whop_client: FlaskClient, whop_app: Flask) -> None:
    cases = (
        ("membership.updated", {"status": "active"}, "malformed Whop membership: it names no membership"),
        ("payment.failed", {"membership_id": None}, "malformed Whop payment: it names no membership"),
        ("invoice.paid", {"id": "inv_1"}, "malformed Whop invoice: it names no member"),
    )
    for number, (event_type, data, reason) in enumerate(cases):
        body = envelope(event_type, data)
        response = deliver(whop_client, body, whop_headers(body, f"msg_malformed_{number}"))
        assert response.status_code == 200 and response.get_json() == {"received": True, "failed": reason}
    assert [(row.status, row.last_error) for row in stored(whop_app)] == [("failed", reason) for *_, reason in cases]


def test_stored_whop_events_can_be_replayed_by_id(whop_client: FlaskClient, whop_app: Flask) -> None:
    from app.services.billing_service import BillingService

    body = envelope()
    deliver(whop_client, body, whop_headers(body, "msg_replay"))
    with whop_app.app_context():
        replayed = BillingService.replay_stored_event("msg_replay")  # still pending: queued again
        assert (replayed.status_code, replayed.body) == (202, {"received": True, "queued": "membership:mem_1"})
        with pytest.raises(LookupError):
            BillingService.replay_stored_event("msg_never")


# --- Configuration -----------------------------------------------------------------------------


def test_the_whop_client_uses_the_configured_api_base_and_names_missing_settings(make_app: Any) -> None:
    from app.services.billing_service import BillingConfigurationError, BillingService

    app = make_app(**WHOP, WHOP_API_BASE="http://127.0.0.1:12113/whop/api/v1")
    with app.app_context():
        client = BillingService.ensure_whop()
        assert client._client_wrapper.get_environment().api == "http://127.0.0.1:12113/whop/api/v1"
        assert BillingService.ensure_whop() is client
        assert BillingService.whop_configured()
    with make_app(**WHOP).app_context():
        assert BillingService.ensure_whop()._client_wrapper.get_environment().api == "https://api.whop.com/api/v1"
    with make_app(**{**WHOP, "WHOP_COMPANY_ID": ""}).app_context():
        assert not BillingService.whop_configured()
        with pytest.raises(BillingConfigurationError, match=r"^WHOP_COMPANY_ID is not set"):
            BillingService.ensure_whop()


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({**WHOP, "WHOP_API_BASE": "http://127.0.0.1:12113/whop/api/v1"}, "WHOP_API_BASE is http://127.0.0.1:12113"),
        ({**WHOP, "WHOP_API_BASE": "https://sandbox-api.whop.com/api/v1"}, "only talks to https://api.whop.com"),
        ({"WHOP_API_KEY": "apik_x"}, "WHOP_WEBHOOK_SECRET is not set (Whop needs"),
        ({**WHOP, "WHOP_COMPANY_ID": "acme"}, "WHOP_COMPANY_ID must be a Whop account id"),
    ],
)
def test_production_refuses_unsafe_whop_settings(settings: dict[str, str], problem: str) -> None:
    from app.startup import production_problems

    config = ProductionConfig({**settings})
    assert any(problem in line for line in production_problems(vars(config)))


def test_production_accepts_whop_itself_or_no_whop() -> None:
    from app.startup import _whop_problems

    assert _whop_problems(vars(ProductionConfig({}))) == []
    assert _whop_problems(vars(ProductionConfig(WHOP))) == []
    assert _whop_problems(vars(ProductionConfig({**WHOP, "WHOP_API_BASE": "https://api.whop.com/api/v1/"}))) == []


def test_the_catalogue_gives_tiers_their_whop_plan_ids() -> None:
    catalogue = PlanCatalogue.load("plans.toml")
    assert catalogue.tiers["starter"].whop_plan_id.startswith("plan_")
    assert catalogue.tiers["business"].whop_plan_id == ""  # Stripe-only
    assert catalogue.tier_for_whop_plan_id(catalogue.tiers["pro"].whop_plan_id) is catalogue.tiers["pro"]
    assert catalogue.tier_for_whop_plan_id("plan_unknown") is None
    assert catalogue.tier_for_whop_plan_id("") is None
    for tiers, problem in (
        ({"a": {"name": "A", "lookup_key": "a", "whop_plan_id": "prod_x"}}, "whop_plan_id must be a Whop plan id"),
        ({"a": {"name": "A", "lookup_key": "a", "whop_plan_id": 7}}, "whop_plan_id must be a Whop plan id"),
        (
            {
                "a": {"name": "A", "lookup_key": "a", "whop_plan_id": "plan_x"},
                "b": {"name": "B", "lookup_key": "b", "whop_plan_id": "plan_x"},
            },
            "Whop plan ids used by two tiers: plan_x",
        ),
    ):
        with pytest.raises(CatalogueError, match=problem):
            PlanCatalogue.from_mapping({"tiers": tiers})


def test_the_cli_lists_whop_events(whop_client: FlaskClient, whop_app: Flask) -> None:
    body = envelope("course.created", {"id": "crs_1"})
    deliver(whop_client, body, whop_headers(body, "msg_cli"))
    runner = whop_app.test_cli_runner()
    listing = runner.invoke(args=["billing", "events", "--provider", "whop"])
    assert listing.exit_code == 0 and "msg_cli" in listing.output and "unhandled event type" in listing.output
    everyone = runner.invoke(args=["billing", "events"])  # every provider's by default
    assert "whop" in everyone.output and "msg_cli" in everyone.output, everyone.output
    assert runner.invoke(args=["billing", "events", "--provider", "stripe"]).output.strip() == "no events"
    replay = runner.invoke(args=["billing", "replay", "msg_cli"])
    assert replay.exit_code == 0 and "duplicate: already settled" in replay.output
    nothing_failed = runner.invoke(args=["billing", "replay", "--failed", "--provider", "whop"])
    assert nothing_failed.exit_code == 0 and nothing_failed.output == ""
