"""The usage API (POST /api/v1/usage) and the owner's API keys page: keys shown once, stored hashed,
revocable; single events and batches, each event answered on its own; no session, no CSRF token."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.api import routes
from app.services.billing_service import BillingService
from app.services.plans import PlanCatalogue
from tests.conftest import SandboxAccount, csrf_token, query, sign_up

SECRET = re.compile(r'<code id="new-key-secret"[^>]*>(llk_[\w-]+)</code>')


class Owner:
    def __init__(self, app: Flask, stripe_api: SandboxAccount) -> None:
        self.app = app
        self.client = app.test_client()
        sign_up(self.client, stripe_api)
        [row] = query(app, "SELECT id FROM organization")
        self.organization_id: int = row.id

    def create_key(self, name: str) -> str:
        return create_api_key(self.client, name)


def create_api_key(client: FlaskClient, name: str) -> str:
    """The signed-in owner creates an API key on the keys page; returns the secret, shown once."""
    token = csrf_token(client, "/api-keys/")
    response = client.post("/api-keys/", data={"csrf_token": token, "name": name})
    assert response.status_code == 201, response.text
    match = SECRET.search(response.text)
    assert match, response.text
    return match.group(1)


@pytest.fixture
def owner(app: Flask, offline_stripe: SandboxAccount) -> Owner:
    return Owner(app, offline_stripe)


def post_usage(app: Flask, key: str | None, body: Any, **headers: str) -> Any:
    """From a client of its own, with no cookies: what a customer's service sends."""
    client: FlaskClient = app.test_client(use_cookies=False)
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return client.post("/api/v1/usage", json=body, headers=headers)


def test_an_owner_creates_a_key_shown_once_and_stored_hashed(owner: Owner) -> None:
    key = owner.create_key("Billing exporter")
    assert key.startswith("llk_") and len(key) >= 40
    [row] = query(owner.app, "SELECT name, prefix, key_hash, last_used_at, revoked_at FROM api_key")
    assert row.name == "Billing exporter" and row.prefix == key[:12]
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.last_used_at is None and row.revoked_at is None
    page = owner.client.get("/api-keys/").text
    assert key not in page and f"{key[:12]}…" in page and "never" in page
    assert post_usage(owner.app, key, {"meter": "api_calls", "quantity": 1, "idempotency_key": "a"}).status_code == 201
    assert query(owner.app, "SELECT last_used_at FROM api_key")[0].last_used_at is not None
    assert "never" not in owner.client.get("/api-keys/").text


def test_the_api_refuses_missing_wrong_and_revoked_keys(owner: Owner) -> None:
    event = {"meter": "api_calls", "quantity": 1, "idempotency_key": "a"}
    missing = post_usage(owner.app, None, event)
    assert missing.status_code == 401 and missing.json["error"]["code"] == "invalid_api_key"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert post_usage(owner.app, "llk_" + "x" * 43, event).status_code == 401
    key = owner.create_key("Worker")
    [key_id] = [row.id for row in query(owner.app, "SELECT id FROM api_key")]
    revoke = owner.client.post(
        f"/api-keys/{key_id}/revoke", data={"csrf_token": csrf_token(owner.client, "/api-keys/")}
    )
    assert revoke.status_code == 303
    assert post_usage(owner.app, key, event).status_code == 401
    assert query(owner.app, "SELECT id FROM usage_event") == []
    assert "revoked" in owner.client.get("/api-keys/").text


def tallied_totals(app: Flask) -> list[Any]:
    """The periods' rows once the worker's tally has counted what was stored."""
    with app.app_context():
        BillingService.tally_usage()
    return query(app, "SELECT total FROM usage_period_total")


def test_one_event_is_recorded_once_without_session_or_csrf(owner: Owner) -> None:
    key = owner.create_key("Worker")
    event = {"meter": "api_calls", "quantity": 40, "idempotency_key": "req-1"}
    first = post_usage(owner.app, key, event)
    assert first.status_code == 201 and first.json["outcome"] == "recorded" and first.json["quantity"] == 40
    assert "Set-Cookie" not in first.headers  # no session is made for an API request
    again = post_usage(owner.app, key, event)
    assert again.status_code == 200 and again.json["outcome"] == "duplicate" and again.json["id"] == first.json["id"]
    by_header = post_usage(owner.app, key, {"meter": "api_calls", "quantity": 2}, **{"Idempotency-Key": "req-2"})
    assert by_header.status_code == 201
    reused = post_usage(owner.app, key, {**event, "quantity": 41})
    assert reused.status_code == 409 and reused.json["error"]["code"] == "idempotency_key_reused"
    [total] = tallied_totals(owner.app)
    assert total.total == 42


def test_a_batch_answers_each_event_and_loses_none_for_a_bad_one(owner: Owner) -> None:
    key = owner.create_key("Worker")
    events = [
        {"meter": "api_calls", "quantity": 5, "idempotency_key": "b-0"},
        {"meter": "storage", "quantity": 5, "idempotency_key": "b-1"},
        {"meter": "api_calls", "quantity": -3, "idempotency_key": "b-2"},
        {"meter": "api_calls", "quantity": "lots", "idempotency_key": "b-3"},
        {"meter": "api_calls", "quantity": 7, "idempotency_key": "b-4", "timestamp": 1},
        "not an object",
        {"meter": "api_calls", "quantity": 5, "idempotency_key": "b-0"},
        {"meter": "api_calls", "quantity": 11, "idempotency_key": "b-7"},
    ]
    response = post_usage(owner.app, key, {"events": events})
    assert response.status_code == 200
    results = response.json["results"]
    assert [(r["index"], r["status"], r["outcome"]) for r in results] == [
        (0, 201, "recorded"),
        (1, 400, "rejected"),
        (2, 400, "rejected"),
        (3, 400, "rejected"),
        (4, 400, "rejected"),
        (5, 400, "rejected"),
        (6, 200, "duplicate"),
        (7, 201, "recorded"),
    ]
    assert [r["error"]["code"] for r in results if "error" in r] == [
        "unknown_meter",
        "invalid_quantity",
        "invalid_quantity",
        "timestamp_too_old",
        "invalid_usage",
    ]
    assert (response.json["recorded"], response.json["duplicates"], response.json["rejected"]) == (2, 1, 5)
    [total] = tallied_totals(owner.app)
    assert total.total == 16
    too_many = post_usage(owner.app, key, {"events": [events[0]] * 101})
    assert too_many.status_code == 400 and too_many.json["error"]["code"] == "invalid_batch"
    assert post_usage(owner.app, key, ["not", "an", "object"]).status_code == 400


def test_a_hard_limit_answers_429_with_the_limit_and_reset(owner: Owner) -> None:
    key = owner.create_key("Worker")
    owner.app.extensions["plan_catalogue"] = PlanCatalogue.from_mapping(
        {
            "tiers": {"starter": {"name": "Starter", "lookup_key": "starter_monthly"}},
            "meters": {
                "api_calls": {
                    "name": "API calls",
                    "event_name": "api_calls",
                    "lookup_key": "api_calls_overage",
                    "tiers": {"starter": {"included": 10, "overage": "hard_limit"}},
                }
            },
        }
    )
    assert post_usage(owner.app, key, {"meter": "api_calls", "quantity": 10, "idempotency_key": "a"}).status_code == 201
    refused = post_usage(owner.app, key, {"meter": "api_calls", "quantity": 1, "idempotency_key": "b"})
    assert refused.status_code == 429
    error = refused.json["error"]
    assert error["code"] == "usage_limit_reached" and error["limit"] == 10 and error["used"] == 10
    [org] = query(owner.app, "SELECT current_period_end FROM organization")
    assert error["resets_at"] == org.current_period_end.isoformat()
    assert int(refused.headers["Retry-After"]) > 0
    assert len(query(owner.app, "SELECT id FROM usage_event")) == 1


def test_only_the_owner_reaches_the_keys_page(app: Flask) -> None:
    assert app.test_client().get("/api-keys/").status_code in (302, 303)  # signed out: to sign-in


def test_a_batch_is_one_transaction_whose_refused_events_are_undone_alone(owner: Owner) -> None:
    key = owner.create_key("Worker")
    owner.app.extensions["plan_catalogue"] = PlanCatalogue.from_mapping(
        {
            "tiers": {"starter": {"name": "Starter", "lookup_key": "starter_monthly"}},
            "meters": {
                "api_calls": {
                    "name": "API calls",
                    "event_name": "api_calls",
                    "lookup_key": "api_calls_overage",
                    "tiers": {"starter": {"included": 10, "overage": "hard_limit"}},
                }
            },
        }
    )
    events = [
        {"meter": "api_calls", "quantity": 6, "idempotency_key": "a"},
        {"meter": "api_calls", "quantity": 6, "idempotency_key": "b"},  # would pass the limit of 10
        {"meter": "api_calls", "quantity": 4, "idempotency_key": "c"},  # fits: 6 + 4
        {"meter": "api_calls", "quantity": 6, "idempotency_key": "a"},  # the batch's own first event again
    ]
    response = post_usage(owner.app, key, {"events": events})
    assert [(r["outcome"], r["status"]) for r in response.json["results"]] == [
        ("recorded", 201),
        ("rejected", 429),
        ("recorded", 201),
        ("duplicate", 200),
    ]
    assert response.json["results"][1]["error"]["used"] == 6
    keys = [row.idempotency_key for row in query(owner.app, "SELECT idempotency_key FROM usage_event ORDER BY id")]
    assert keys == ["a", "c"]
    assert [row.total for row in tallied_totals(owner.app)] == [10]


def test_the_usage_entry_answers_without_flasks_request_machinery(
    owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = owner.create_key("Worker")
    event = {"meter": "api_calls", "quantity": 3, "idempotency_key": "fast"}

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a usage request reached Flask's request machinery")

    monkeypatch.setattr(owner.app, "request_context", refuse)
    recorded = post_usage(owner.app, key, event, **{"X-Request-ID": "usage-request-1"})
    assert recorded.status_code == 201 and recorded.json["outcome"] == "recorded"
    assert recorded.headers["X-Request-ID"] == "usage-request-1"
    assert recorded.headers["X-Content-Type-Options"] == "nosniff" and recorded.headers["Cache-Control"] == "no-store"
    assert recorded.headers["Content-Type"] == "application/json"
    not_json = owner.app.test_client().post(
        "/api/v1/usage", data="meter=api_calls", headers={"Authorization": f"Bearer {key}"}
    )
    assert not_json.status_code == 400 and not_json.json["error"]["code"] == "invalid_request"
    unknown = post_usage(owner.app, "llk_" + "y" * 43, event)
    assert unknown.status_code == 401 and unknown.headers["WWW-Authenticate"] == 'Bearer realm="usage"'


def test_the_usage_entry_hands_a_request_it_failed_to_the_flask_route_with_its_body(
    owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = owner.create_key("Worker")
    real_answer = routes.answer
    calls: list[str] = []

    def fail_once(*args: Any) -> Any:
        calls.append("answer")
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return real_answer(*args)

    monkeypatch.setattr(routes, "answer", fail_once)
    response = post_usage(owner.app, key, {"meter": "api_calls", "quantity": 4, "idempotency_key": "retried"})
    assert response.status_code == 201, response.get_data(as_text=True)  # the Flask route read the same body
    assert calls == ["answer", "answer"]
    assert [row.quantity for row in query(owner.app, "SELECT quantity FROM usage_event")] == [4]


def test_the_usage_entry_reads_what_json_reads_and_answers_sorted_compact_utf8(owner: Owner) -> None:
    """The entry reads bodies with msgspec and writes answers with it. A body msgspec refuses but json
    reads (NaN) is still read, so its events are answered one by one as the Flask route answers them
    (NaN refused as not a whole number, the batch's other event recorded), not refused whole as not
    JSON; the answer's text is Flask's (keys sorted, compact, a final newline) with text beyond ASCII
    sent as UTF-8."""
    key = owner.create_key("Worker")
    client = owner.app.test_client(use_cookies=False)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    nan = b'{"events": [{"meter": "api_calls", "quantity": NaN, "idempotency_key": "nan"},'
    nan += b' {"meter": "api_calls", "quantity": 2, "idempotency_key": "ok-1"}]}'
    answered = client.post("/api/v1/usage", data=nan, headers=headers)
    assert answered.status_code == 200, answered.get_data(as_text=True)
    first, second = answered.json["results"]
    assert (first["outcome"], first["error"]["code"]) == ("rejected", "invalid_quantity")
    assert second["outcome"] == "recorded" and answered.json["recorded"] == 1
    assert [row.quantity for row in query(owner.app, "SELECT quantity FROM usage_event")] == [2]

    unknown = post_usage(owner.app, key, {"meter": "appels_é", "quantity": 1, "idempotency_key": "utf8"})
    assert unknown.status_code == 400 and "'appels_é'" in unknown.json["error"]["message"]
    for response in (answered, unknown):
        text = json.dumps(response.json, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
        assert response.get_data() == text.encode()
