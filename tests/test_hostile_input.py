"""Hostile input (issue 7): fuzzed webhook deliveries and forms, CSRF, cookies, session fixation, security
headers, rate limits, redirect targets, and secrets in logs. Real PostgreSQL and Redis; Stripe is
conftest's SandboxAccount. Hypothesis runs derandomized with a bounded number of examples and no example
database, so every run tries the same inputs."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from app import create_app
from app.extensions import db
from app.security import CONTENT_SECURITY_POLICY
from app.services.billing_service import HANDLED_STRIPE_EVENTS
from config import ProductionConfig
from tests.conftest import (
    OFFLINE_SECRET_KEY,
    OFFLINE_WEBHOOK_SECRET,
    PASSWORD,
    SandboxAccount,
    checkout_session_id,
    csrf_token,
    post_and_apply,
    post_webhook,
    query,
    sign_stripe_payload,
    sign_up,
    signup_form,
    start_signup,
    stripe_event,
)


def fuzz(max_examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def stored_state(app: Flask) -> tuple[int, ...]:
    """Row counts of everything a request could create."""
    [row] = query(
        app,
        "SELECT (SELECT count(*) FROM stripe_event), (SELECT count(*) FROM organization),"
        " (SELECT count(*) FROM user_account), (SELECT count(*) FROM pending_signup),"
        " (SELECT count(*) FROM domain_event)",
    )
    return tuple(row)


# --- Webhooks: arbitrary bodies, headers and signatures ---------------------------------------------

# What a WSGI server hands over as a header value: latin-1 characters, never CR or LF.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x09, max_codepoint=0xFF, exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85"),
    max_size=300,
)
header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,30}\Z").filter(
    lambda name: name.lower() not in {"content-length", "transfer-encoding", "host", "stripe-signature", "cookie"}
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def a_real_event() -> dict[str, Any]:
    return stripe_event("invoice.paid", {"id": "in_fuzz", "object": "invoice", "customer": "cus_nobody"})


@st.composite
def broken_events(draw: st.DrawFn) -> dict[str, Any]:
    """A Stripe event with one required field missing or of the wrong kind."""
    event = a_real_event()
    field = draw(st.sampled_from(["id", "object", "type", "created", "livemode", "data"]))
    wrong = {
        "id": st.none()
        | st.integers()
        | st.text(max_size=20).filter(lambda s: not s.startswith("evt_"))
        | st.sampled_from(["evt_", "evt_\x00", "evt_a b", "evt_a\n", "evt_\ud800", "evt_" + "a" * 252]),
        "object": st.none() | st.text(max_size=10).filter(lambda s: s != "event"),
        "type": st.none()
        | st.integers()
        | st.lists(st.text(max_size=5), max_size=2)
        | st.sampled_from(["", "invoice.paid\x00", "invoice paid", "a" * 101]),
        "created": st.none()
        | st.booleans()
        | st.floats(allow_nan=False)
        | st.text(max_size=10)
        | st.integers(max_value=-1)
        | st.integers(min_value=2**63),
        "livemode": st.none() | st.integers() | st.text(max_size=5),
        "data": json_values.filter(lambda value: not isinstance(value, dict))
        | st.dictionaries(st.just("object"), json_values.filter(lambda value: not isinstance(value, dict))),
    }[field]
    if draw(st.booleans()):
        del event[field]
    else:
        event[field] = draw(wrong)
    return event


garbage_bodies = st.one_of(
    st.binary(max_size=2000),
    st.binary(min_size=1, max_size=200).map(lambda b: b"\xff" + b),  # never UTF-8
    st.text(max_size=500).map(lambda s: s.encode("utf-8", "surrogatepass")),
    json_values.map(lambda value: json.dumps(value).encode()),
    broken_events().map(lambda event: json.dumps(event).encode()),
)


@st.composite
def forged_signatures(draw: st.DrawFn, body: bytes) -> str:
    """A Stripe-Signature header that is not a valid signature of body by our secret right now."""
    now = int(time.time())
    kind = draw(st.sampled_from(["text", "structured", "other secret", "stale", "huge", "many"]))
    if kind == "text":
        return draw(header_text)
    if kind == "structured":
        timestamp = draw(st.integers(-(2**70), 2**70).map(str) | header_text)
        v1 = draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64) | header_text)
        return f"t={timestamp},v1={v1}"
    if kind == "other secret":
        return sign_stripe_payload(body, draw(st.sampled_from(["whsec_someone_else", OFFLINE_SECRET_KEY, "x"])))
    if kind == "stale":
        return sign_stripe_payload(body, OFFLINE_WEBHOOK_SECRET, now - draw(st.integers(301, 10**10)))
    if kind == "huge":
        return "t=" + str(now) + ",v1=" + "0" * draw(st.integers(10_000, 60_000))
    return ",".join(["t=" + str(now)] + ["v1=" + "a" * 64] * draw(st.integers(100, 2000)))


@st.composite
def forged_deliveries(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    body = draw(garbage_bodies | st.just(json.dumps(a_real_event()).encode()))
    headers = draw(st.dictionaries(header_names, header_text, max_size=5))
    if draw(st.integers(0, 9)):  # mostly with a Stripe-Signature header, sometimes without
        return body, {**headers, "Stripe-Signature": draw(forged_signatures(body))}
    return body, headers


def test_forged_deliveries_are_refused_and_change_nothing(app: Flask) -> None:
    client = app.test_client()
    before = stored_state(app)

    @fuzz(250)
    @given(forged_deliveries())
    def deliver(delivery: tuple[bytes, dict[str, str]]) -> None:
        body, headers = delivery
        response = client.post("/billing/webhooks/stripe", data=body, headers=headers)
        assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
        assert response.is_json and list(response.get_json()) == ["error"]
        assert stored_state(app) == before

    deliver()


def test_validly_signed_garbage_is_refused_and_changes_nothing(app: Flask) -> None:
    client = app.test_client()
    before = stored_state(app)

    @fuzz(250)
    @given(garbage_bodies, st.dictionaries(header_names, header_text, max_size=3))
    def deliver(body: bytes, headers: dict[str, str]) -> None:
        signature = sign_stripe_payload(body, OFFLINE_WEBHOOK_SECRET)
        response = client.post(
            "/billing/webhooks/stripe", data=body, headers={**headers, "Stripe-Signature": signature}
        )
        assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
        assert response.get_json()["error"] in {
            "body is not UTF-8",
            "body is not JSON",
            "body is not a Stripe event",
        }
        assert stored_state(app) == before

    deliver()


@st.composite
def hostile_events(draw: st.DrawFn) -> dict[str, Any]:
    """Events signed with our secret whose values are hostile: ids, types and versions that are any text
    (control characters, NUL, lone surrogates through JSON escapes) or plausible, integers of any size,
    objects of anything. The types are ones this app does not act on, so nothing is ever applied."""
    plausible = st.from_regex(r"\A[A-Za-z0-9_]{1,40}\Z")
    return {
        "id": "evt_" + draw(plausible | st.text(max_size=60)),
        "object": "event",
        "api_version": draw(st.none() | st.integers() | st.text(max_size=80) | st.just("2026-10-28.endive")),
        "created": draw(st.integers(0, 2**31) | st.integers(-(2**80), 2**80)),
        "livemode": draw(st.booleans()),
        "type": draw(
            (st.from_regex(r"\A[a-z_.]{1,100}\Z") | st.text(max_size=110) | st.just("charge.dispute.created")).filter(
                lambda t: t not in HANDLED_STRIPE_EVENTS
            )
        ),
        "data": {"object": draw(st.dictionaries(st.text(max_size=12), json_values, max_size=5))},
        **draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in EVENT_FIELDS), json_values, max_size=3)),
    }


EVENT_FIELDS = {"id", "object", "api_version", "created", "livemode", "type", "data"}


def test_validly_signed_events_with_hostile_values_never_fail_and_never_touch_accounts(app: Flask) -> None:
    client = app.test_client()
    answers: Counter[int] = Counter()

    @fuzz(120)
    @given(hostile_events())
    def deliver(hostile: dict[str, Any]) -> None:
        response = post_webhook(client, json.dumps(hostile).encode())
        assert response.status_code in (200, 400), (response.status_code, response.get_data(as_text=True))
        answers[response.status_code] += 1
        if response.status_code == 200:
            # Stored and settled as ignored (a type or mode this app does not act on); nothing applied.
            stored = query(app, "SELECT status FROM stripe_event WHERE event_id = :id", id=hostile["id"])
            assert [row.status for row in stored] == ["ignored"]
            assert "ignored" in response.get_json() or response.get_json().get("duplicate")
        else:
            assert response.get_json()["error"] == "body is not a Stripe event"

    deliver()
    assert answers[200] and answers[400]  # both storable and unstorable events were tried
    stored = query(app, "SELECT status FROM stripe_event")
    assert {row.status for row in stored} == {"ignored"}  # stored, none applied
    assert stored_state(app)[1:] == (0, 0, 0, 0)  # no organization, user, signup or domain event


def test_an_oversized_delivery_is_refused_without_reading_it(app: Flask) -> None:
    body = b'{"id": "evt_big", "object": "event", "padding": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = post_webhook(app.test_client(), body)
    assert response.status_code == 413 and response.is_json
    assert stored_state(app) == (0, 0, 0, 0, 0)


# --- Forms: arbitrary field values with a valid CSRF token -------------------------------------------

hostile_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=300),  # any unicode, control chars and NUL
    st.text(st.characters(max_codepoint=0x1F), max_size=20),  # only control characters
    st.integers(100, 5000).map(lambda n: "é" * n),  # huge
    st.sampled_from(["", " ", "\x00", "a\x00b", "\u202eevil", "<script>alert(1)</script>", "' OR 1=1 --", "%00"]),
)


def field_choices(valid: str) -> st.SearchStrategy[list[str] | None]:
    """One form field: the valid value, missing (None), hostile, or sent more than once."""
    return st.one_of(
        st.just([valid]),
        st.none(),
        hostile_text.map(lambda value: [value]),
        st.lists(st.just(valid) | hostile_text, min_size=2, max_size=3),
    )


SIGNUP_VALID = {
    "email": "fuzz@example.com",
    "password": PASSWORD,
    "organization_name": "Fuzzing Ltd",
    "owner_name": "Fay Fuzz",
    "tier": "starter",
    "addon_extra_seats": "2",
}


def form_data(token: str, fields: dict[str, list[str] | None]) -> MultiDict[str, str]:
    data: MultiDict[str, str] = MultiDict([("csrf_token", token)])
    for name, values in fields.items():
        for value in values or []:
            data.add(name, value)
    return data


@st.composite
def signup_fields(draw: st.DrawFn) -> dict[str, list[str] | None]:
    """A valid signup with one to three of its fields made hostile (missing, odd, or sent twice), so that
    a hostile value often meets an otherwise valid form and reaches the service and the database."""
    hostile = draw(st.sets(st.sampled_from(sorted(SIGNUP_VALID)), min_size=1, max_size=3))
    fields: dict[str, list[str] | None] = {name: [value] for name, value in SIGNUP_VALID.items()}
    for name in sorted(hostile):
        fields[name] = draw(field_choices(SIGNUP_VALID[name]))
    return fields


@pytest.fixture
def unlimited_app(make_app: Callable[..., Flask]) -> Flask:
    limit = "100000/minute"
    return make_app(
        SIGNUP_RATE_LIMIT_PER_CLIENT=limit,
        SIGNUP_RATE_LIMIT_PER_EMAIL=limit,
        LOGIN_RATE_LIMIT_PER_CLIENT=limit,
        LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT=limit,
    )


def test_fuzzed_signup_forms_get_a_clear_answer_and_store_nothing_when_invalid(
    unlimited_app: Flask, offline_stripe: SandboxAccount
) -> None:
    app = unlimited_app
    client = app.test_client()
    token = csrf_token(client, "/auth/signup")
    answers: Counter[int] = Counter()
    last_checkout: list[str] = []

    @fuzz(150)
    @given(signup_fields())
    def submit(fields: dict[str, list[str] | None]) -> None:
        pending_before = len(query(app, "SELECT id FROM pending_signup"))
        checkouts_before = len(offline_stripe.calls_to("checkout.sessions.create"))
        response = client.post("/auth/signup", data=form_data(token, fields))
        page = response.get_data(as_text=True)
        answers[response.status_code] += 1
        assert response.status_code in (303, 422), (response.status_code, page[:2000])
        if response.status_code == 303:
            assert response.headers["Location"].startswith(f"{offline_stripe.url}/checkout/cs_test_")
            # The same choices sent again by this browser resume its open checkout; others start a new one.
            resumed = last_checkout[-1:] == [response.headers["Location"]]
            assert len(query(app, "SELECT id FROM pending_signup")) == pending_before + (0 if resumed else 1)
            last_checkout.append(response.headers["Location"])
        else:
            assert 'class="field-error"' in page or 'class="form-error"' in page
            assert len(query(app, "SELECT id FROM pending_signup")) == pending_before
            assert len(offline_stripe.calls_to("checkout.sessions.create")) == checkouts_before
        assert "Traceback" not in page

    submit()
    assert answers[303] and answers[422]  # both valid forms and refused ones were tried
    assert query(app, "SELECT id FROM organization") == []


def test_a_form_over_the_size_limit_gets_a_clear_page_and_stores_nothing(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = app.test_client()
    response = start_signup(client, organization_name="x" * (2 * 1024 * 1024))
    assert response.status_code == 413 and response.mimetype == "text/html"
    assert "That request is too large" in response.get_data(as_text=True)
    assert query(app, "SELECT id FROM pending_signup") == []
    assert offline_stripe.calls_to("checkout.sessions.create") == []


def test_fuzzed_login_forms_get_a_clear_answer(unlimited_app: Flask, offline_stripe: SandboxAccount) -> None:
    app = unlimited_app
    sign_up(app.test_client(), offline_stripe)
    state = stored_state(app)
    answers: Counter[int] = Counter()

    @fuzz(100)
    @given(
        st.fixed_dictionaries(
            {"email": field_choices("ada@example.com"), "password": field_choices("wrong password, surely")}
        )
    )
    def submit(fields: dict[str, list[str] | None]) -> None:
        client = app.test_client()
        response = client.post("/auth/login", data=form_data(csrf_token(client, "/auth/login"), fields))
        page = response.get_data(as_text=True)
        assert response.status_code in (401, 422), (response.status_code, page[:2000])
        answers[response.status_code] += 1
        if response.status_code == 401:
            assert "That email and password do not match an account." in page
        else:
            assert 'class="field-error"' in page
        assert "Traceback" not in page
        assert client.get("/app").status_code == 302  # not signed in
        assert stored_state(app) == state

    submit()
    assert answers[401] and answers[422]


# --- CSRF ----------------------------------------------------------------------------------------------

CSRF_MESSAGE = "This form has expired or was not sent from our site."


def test_every_form_refuses_a_post_without_a_valid_csrf_token(app: Flask, offline_stripe: SandboxAccount) -> None:
    owner = app.test_client()
    sign_up(owner, offline_stripe)
    stranger = app.test_client()
    strangers_token = csrf_token(stranger, "/auth/login")  # valid, but for another session
    request_token = "b" * 32
    forms: dict[str, dict[str, str]] = {
        "/auth/signup": {
            k: v for k, v in signup_form(app.test_client(), email="eve@example.com").items() if k != "csrf_token"
        },
        "/auth/login": {"email": "ada@example.com", "password": PASSWORD},
        "/billing/portal": {},
        "/billing/cancel": {"request_token": request_token, "when": "now", "confirmed": "yes"},
        "/billing/resume": {"request_token": request_token},
        "/billing/resubscribe": {"request_token": request_token, "tier": "pro"},
        "/auth/logout": {},
    }
    state = stored_state(app)
    for path, fields in forms.items():
        for token in (None, "", strangers_token, "not-a-token"):
            data = fields if token is None else {**fields, "csrf_token": token}
            response = owner.post(path, data=data)
            assert response.status_code == 400, (path, token, response.status_code)
            assert CSRF_MESSAGE in response.get_data(as_text=True)
    # Nothing happened: no signup, no Stripe call, still signed in, the subscription untouched.
    assert stored_state(app) == state
    assert len(offline_stripe.calls_to("checkout.sessions.create")) == 1  # the owner's own signup
    for method in ("billing_portal.sessions.create", "subscriptions.update", "subscriptions.cancel"):
        assert offline_stripe.calls_to(method) == [], method
    assert owner.get("/app").status_code == 200
    [organization] = query(app, "SELECT billing_status FROM organization")
    assert organization.billing_status == "active"

    # With the session's own token the same posts go through: the 400s were the token's doing.
    token = csrf_token(owner, "/billing/")
    answers = {
        path: owner.post(path, data={**fields, "csrf_token": token})
        for path, fields in forms.items()
        if path not in ("/auth/signup", "/auth/login", "/auth/logout")
    }
    assert {path: response.status_code for path, response in answers.items()} == dict.fromkeys(answers, 303)
    assert answers["/billing/portal"].headers["Location"].startswith(f"{offline_stripe.url}/portal/bps_")
    assert len(offline_stripe.calls_to("subscriptions.cancel")) == 1  # cancel "now" reached Stripe
    assert owner.post("/auth/logout", data={"csrf_token": token}).status_code == 303
    assert owner.get("/app").status_code == 302
    anonymous = app.test_client()
    signup = {**forms["/auth/signup"], "csrf_token": csrf_token(anonymous, "/auth/signup")}
    assert anonymous.post("/auth/signup", data=signup).status_code == 303
    login = {**forms["/auth/login"], "csrf_token": csrf_token(anonymous, "/auth/login")}
    assert anonymous.post("/auth/login", data=login).status_code == 303


def test_a_json_or_form_post_from_another_site_cannot_skip_the_token(
    app: Flask, offline_stripe: SandboxAccount
) -> None:
    owner = app.test_client()
    sign_up(owner, offline_stripe)
    for headers in ({"Content-Type": "application/json"}, {"Origin": "https://evil.example"}, {"X-CSRFToken": "x"}):
        response = owner.post("/billing/cancel", data=json.dumps({"when": "now"}), headers=headers)
        assert response.status_code == 400
    assert offline_stripe.calls_to("subscriptions.cancel") == []


# --- Production: cookies, HSTS, the Referer check, forged hosts ---------------------------------------

PRODUCTION_SECRET_KEY = "prod-Qm9zZSBpcyBhIHJvc2UgaXMgYSByb3NlIGlzIGEgcm9zZQ-7Hc2"
PUBLIC_URL = "https://billing.example.com"


@pytest.fixture
def production_app(
    make_app: Callable[..., Flask], database_url: str, redis_url: str, stripe_sandbox: SandboxAccount
) -> Iterator[Flask]:
    """The app as production builds it (ProductionConfig, start-up checks, ProxyFix for one proxy), on
    the test database and Redis that make_app has just cleaned."""
    config = ProductionConfig(
        environ={
            "SECRET_KEY": PRODUCTION_SECRET_KEY,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "STRIPE_SECRET_KEY": OFFLINE_SECRET_KEY,
            "STRIPE_ALLOW_TEST_KEY_IN_PRODUCTION": "1",
            "STRIPE_WEBHOOK_SECRET": OFFLINE_WEBHOOK_SECRET,
            "STRIPE_API_BASE": stripe_sandbox.url,
            "STRIPE_MAX_NETWORK_RETRIES": "0",
            "APP_BASE_URL": PUBLIC_URL,
            "TRUSTED_PROXY_COUNT": "1",
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_DEFAULT_SENDER": "Ledgerline Billing <billing@ledgerline.test>",
        }
    )
    app = create_app(config)
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def cookie_attributes(response: Any, name: str = "session") -> dict[str, str]:
    [header] = [value for value in response.headers.getlist("Set-Cookie") if value.startswith(f"{name}=")]
    attributes = {}
    for part in header.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        attributes[key.lower()] = value
    return attributes


def test_production_session_cookies_are_secure_httponly_and_samesite_lax(production_app: Flask) -> None:
    client = production_app.test_client()
    response = client.get("/auth/login", base_url="https://localhost")
    assert response.status_code == 200
    attributes = cookie_attributes(response, "__Host-session")
    assert {"secure", "httponly"} <= set(attributes)
    assert attributes["samesite"] == "Lax"
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"


def test_outside_production_the_cookie_is_httponly_and_lax_and_there_is_no_hsts(app: Flask) -> None:
    response = app.test_client().get("/auth/login")
    attributes = cookie_attributes(response)
    assert "httponly" in attributes and attributes["samesite"] == "Lax"
    assert "Strict-Transport-Security" not in response.headers


def test_production_refuses_a_form_posted_from_another_site_over_https(
    production_app: Flask, offline_stripe: SandboxAccount
) -> None:
    client = production_app.test_client()
    token = csrf_token(client, "/auth/login")
    form = {"csrf_token": token, "email": "ada@example.com", "password": PASSWORD}
    foreign = client.post(
        "/auth/login", data=form, base_url="https://localhost", headers={"Referer": "https://evil.example/login"}
    )
    assert foreign.status_code == 400 and CSRF_MESSAGE in foreign.get_data(as_text=True)
    own = client.post(
        "/auth/login", data=form, base_url="https://localhost", headers={"Referer": "https://localhost/auth/login"}
    )
    assert own.status_code == 401  # through the CSRF check; there is no such account


def test_forged_host_headers_never_reach_a_redirect_or_a_url_sent_to_stripe(
    production_app: Flask, offline_stripe: SandboxAccount
) -> None:
    # X-Forwarded-Host is not trusted, and a forged Host reaches no URL we build.
    forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    page = production_app.test_client().get("/auth/signup", base_url="https://localhost", headers=forged)
    assert page.status_code == 200 and "evil.example" not in page.get_data(as_text=True)
    client = production_app.test_client()
    smuggled = client.post(
        "/auth/signup",
        data=signup_form(client),
        base_url="https://localhost",
        headers={"X-Forwarded-Host": "evil.example", "Referer": "https://evil.example/auth/signup"},
    )
    assert smuggled.status_code == 400  # the forwarded host cannot make a foreign Referer look like ours
    response = client.post(
        "/auth/signup",
        data=signup_form(client),
        base_url="https://localhost",
        headers={"X-Forwarded-Host": "evil.example", "Referer": "https://localhost/auth/signup"},
    )
    assert response.status_code == 303, response.get_data(as_text=True)
    assert response.headers["Location"].startswith(f"{offline_stripe.url}/checkout/cs_test_")
    [(_, call)] = offline_stripe.calls_to("checkout.sessions.create")
    assert call["params"]["success_url"].startswith(f"{PUBLIC_URL}/billing/complete-signup-from-stripe?")
    assert call["params"]["cancel_url"].startswith(f"{PUBLIC_URL}/auth/signup")
    for path in ("/", "/app", "/billing/"):
        location = production_app.test_client().get(path, base_url="https://localhost", headers=forged)
        assert_on_site(location.headers["Location"])


# --- Sessions: a new id at sign-in ------------------------------------------------------------------------


def session_id(client: FlaskClient) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


def test_signing_in_rotates_the_session_id_and_drops_the_old_one(
    app: Flask, offline_stripe: SandboxAccount, redis_url: str
) -> None:
    store = redis.Redis.from_url(redis_url)
    owner = app.test_client()
    session = sign_up(owner, offline_stripe)
    assert session["status"] == "complete"
    assert owner.post("/auth/logout", data={"csrf_token": csrf_token(owner, "/app")}).status_code == 303

    client = app.test_client()
    token = csrf_token(client, "/auth/login")
    before = session_id(client)
    assert store.exists(f"session:{before}")
    response = client.post("/auth/login", data={"csrf_token": token, "email": "ada@example.com", "password": PASSWORD})
    assert response.status_code == 303
    after = session_id(client)
    assert after != before
    assert not store.exists(f"session:{before}") and store.exists(f"session:{after}")
    assert client.get("/app").status_code == 200
    # Whoever planted or saw the old id has nothing: it is an anonymous, unknown session.
    attacker = app.test_client()
    attacker.set_cookie("session", before)
    assert attacker.get("/app").status_code == 302

    # Signing out ends the session on the server too.
    assert client.post("/auth/logout", data={"csrf_token": csrf_token(client, "/app")}).status_code == 303
    assert not store.exists(f"session:{after}")
    thief = app.test_client()
    thief.set_cookie("session", after)
    assert thief.get("/app").status_code == 302


def test_the_success_page_signs_in_on_a_new_session_id(
    app: Flask, offline_stripe: SandboxAccount, redis_url: str
) -> None:
    store = redis.Redis.from_url(redis_url)
    client = app.test_client()
    checkout = checkout_session_id(start_signup(client))
    before = session_id(client)
    offline_stripe.pay(checkout)
    landing = client.get(f"/billing/complete-signup-from-stripe?session_id={checkout}")
    assert landing.headers["Location"] == "/app"
    assert session_id(client) != before and not store.exists(f"session:{before}")


# --- Security headers ---------------------------------------------------------------------------------------


def test_every_kind_of_response_carries_the_security_headers(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    responses = {
        "page": client.get("/auth/signup"),
        "redirect": client.get("/"),
        "not found": client.get("/no-such-page"),
        "form error": client.post("/auth/login", data={}),
        "webhook": client.post("/billing/webhooks/stripe", data=b"{}"),
        "health": client.get("/healthz"),
        "static": client.get("/static/app.css"),
    }
    for kind, response in responses.items():
        headers = response.headers
        assert headers["X-Frame-Options"] == "DENY", kind
        assert headers["X-Content-Type-Options"] == "nosniff", kind
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, kind
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "Strict-Transport-Security" not in headers, kind
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY


def test_production_sends_hsts_on_every_response(production_app: Flask) -> None:
    client = production_app.test_client()
    for path in ("/auth/login", "/", "/no-such-page", "/healthz"):
        response = client.get(path, base_url="https://localhost")
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains", path
        assert response.headers["X-Frame-Options"] == "DENY"


# --- Rate limits ------------------------------------------------------------------------------------------


def login(client: FlaskClient, email: str, password: str, **kwargs: Any) -> Any:
    return client.post(
        "/auth/login",
        data={"csrf_token": csrf_token(client, "/auth/login"), "email": email, "password": password},
        **kwargs,
    )


def test_the_per_account_and_client_login_limit_counts_only_failures(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    app = make_app(LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT="3/hour", LOGIN_RATE_LIMIT_PER_CLIENT="1000/hour")
    sign_up(app.test_client(), offline_stripe)
    # Successful sign-ins, however many, do not count.
    assert [login(app.test_client(), "ada@example.com", PASSWORD).status_code for _ in range(5)] == [303] * 5
    # Failures do, whatever the case or spacing of the email.
    statuses = [
        login(app.test_client(), email, "not the password").status_code
        for email in ("ada@example.com", "ADA@example.com", " ada@EXAMPLE.com ")
    ]
    assert statuses == [401, 401, 401]
    blocked = login(app.test_client(), "ada@example.com", PASSWORD)
    assert blocked.status_code == 429
    assert "Too many attempts" in blocked.get_data(as_text=True)
    assert int(blocked.headers["Retry-After"]) > 0
    # Another account is not affected.
    assert login(app.test_client(), "grace@example.com", "not the password").status_code == 401


def test_the_per_client_login_limit_counts_only_failures_and_ignores_forwarded_headers(
    make_app: Callable[..., Flask], offline_stripe: SandboxAccount
) -> None:
    app = make_app(LOGIN_RATE_LIMIT_PER_CLIENT="3/hour", LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT="1000/hour")
    sign_up(app.test_client(), offline_stripe)
    assert [login(app.test_client(), "ada@example.com", PASSWORD).status_code for _ in range(4)] == [303] * 4
    statuses = [login(app.test_client(), f"user{n}@example.com", "nope nope nope").status_code for n in range(3)]
    assert statuses == [401, 401, 401]
    assert login(app.test_client(), "user9@example.com", "nope nope nope").status_code == 429
    # No trusted proxy in front: a forged X-Forwarded-For does not make a new client...
    spoofed = login(app.test_client(), "user10@example.com", "nope", headers={"X-Forwarded-For": "203.0.113.7"})
    assert spoofed.status_code == 429
    # ...while a genuinely different address is its own client.
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "198.51.100.4"
    assert login(other, "user11@example.com", "nope nope nope").status_code == 401


# --- Redirect targets ---------------------------------------------------------------------------------------


def assert_on_site(location: str) -> None:
    parts = urlsplit(location)
    assert not location.startswith("//") and "\\" not in location, location
    assert parts.netloc in ("", "localhost", urlsplit(PUBLIC_URL).netloc), location
    assert "evil" not in parts.netloc, location


@pytest.mark.parametrize(
    "target",
    ["https://evil.example", "//evil.example/app", "/\\evil.example", "javascript:alert(1)", "http:evil.example"],
)
def test_redirects_after_sign_in_never_follow_a_target_from_the_request(
    app: Flask, offline_stripe: SandboxAccount, target: str
) -> None:
    sign_up(app.test_client(), offline_stripe)
    client = app.test_client()
    guarded = client.get("/app", query_string={"next": target})
    assert guarded.status_code == 302
    assert_on_site(guarded.headers["Location"])
    token = csrf_token(client, "/auth/login")
    response = client.post(
        "/auth/login",
        query_string={"next": target},
        data={"csrf_token": token, "email": "ada@example.com", "password": PASSWORD, "next": target},
        headers={"X-Forwarded-Host": "evil.example", "Referer": target},
    )
    assert response.status_code == 303 and response.headers["Location"] == "/app"
    for path in ("/auth/login", "/"):
        assert_on_site(client.get(path, query_string={"next": target}).headers["Location"])
    # A forged Host reaches no redirect either (signed out, so the guard and the front door redirect).
    forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    for path in ("/app", "/", "/billing/"):
        location = app.test_client().get(path, query_string={"next": target}, headers=forged).headers["Location"]
        assert_on_site(location)
    logout = client.post("/auth/logout", data={"csrf_token": csrf_token(client, "/app"), "next": target})
    assert logout.headers["Location"] == "/auth/login"


# --- Secrets never reach the logs -------------------------------------------------------------------------

LOG_SECRETS = {
    "SECRET_KEY": "k3y-Zq8Wv2Lr6Tn0Hs4Xp1Bc9Md7Fg5Jy3Ua8Re2",
    "STRIPE_SECRET_KEY": "sk_test_51LogCheckA9bC8dE7fG6hJ5kL4mN3pQ2rS1tU0vW",
    "STRIPE_WEBHOOK_SECRET": "whsec_LogCheck0123456789abcdefABCDEF",
    "STRIPE_PUBLISHABLE_KEY": "pk_test_51LogCheckZ9y8X7w6V5u4T3s2R1q0P",
}
CARD_NUMBER = "4242 4242 4242 4242"
CARD_PASSWORD = "4000056655665556 purple zebra"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_or_card_number_ever_reaches_the_logs(
    make_app: Callable[..., Flask],
    offline_stripe: SandboxAccount,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    log_format: str,
) -> None:
    caplog.set_level("DEBUG")
    app = make_app(**LOG_SECRETS, LOG_FORMAT=log_format, LOG_LEVEL="DEBUG")
    secret = LOG_SECRETS["STRIPE_WEBHOOK_SECRET"]
    owner = app.test_client()
    # A signup with a card number in a form field and a card-shaped password, completed by the webhook.
    checkout = checkout_session_id(start_signup(owner, owner_name=f"Ada {CARD_NUMBER}", password=CARD_PASSWORD))
    completed = stripe_event("checkout.session.completed", offline_stripe.pay(checkout))
    assert post_and_apply(owner, completed, secret=secret).status_code == 200
    # A webhook that fails, one with a bad signature, and a stale one.
    other = app.test_client()
    failing_checkout = checkout_session_id(start_signup(other, email="grace@example.com", password=CARD_PASSWORD))
    failing = stripe_event("checkout.session.completed", offline_stripe.pay(failing_checkout))
    offline_stripe.fail_next("subscriptions.retrieve", "server")
    assert post_and_apply(other, failing, secret=secret).status_code == 200  # the worker's attempt fails
    assert post_webhook(other, failing, secret="whsec_wrong").status_code == 400
    assert post_webhook(other, failing, secret=secret, timestamp=int(time.time()) - 3600).status_code == 400
    # Failed sign-ins, one with the card number as the password, and an invalid signup.
    for password in (CARD_NUMBER, "4000056655665556", LOG_SECRETS["SECRET_KEY"]):
        assert login(app.test_client(), "ada@example.com", password).status_code == 401
    assert start_signup(app.test_client(), email=CARD_NUMBER, owner_name=CARD_NUMBER).status_code == 422
    assert owner.get(f"/billing/complete-signup-from-stripe?session_id={checkout}").status_code == 303

    captured = capfd.readouterr()
    stream = captured.err + captured.out
    records = caplog.records
    assert "webhook event" in stream and "failed" in stream  # the failing webhook was logged...
    assert any(record.exc_info for record in records)  # ...with its traceback
    assert "/auth/login" in stream and "/billing/webhooks/stripe" in stream
    texts = [stream, caplog.text]
    for record in records:
        texts.append(record.getMessage())
        texts.append(str(record.__dict__))
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
    everything = "\n".join(texts)
    for name, value in LOG_SECRETS.items():
        assert value not in everything, name
    for value in (CARD_NUMBER, CARD_NUMBER.replace(" ", ""), CARD_PASSWORD, "4000056655665556", PASSWORD):
        assert value not in everything, value

    # Paths are the client's to choose and are logged: a secret or a card number in one is masked in
    # the app's log lines, the JSON "path" field included. (Pytest's own handler formats a record
    # before the app's handler masks it, so caplog.text is not what the app writes; the records are.)
    caplog.clear()
    assert app.test_client().get(f"/auth/signup/{CARD_NUMBER.replace(' ', '')}").status_code == 404
    assert app.test_client().get(f"/billing/webhooks/{secret}").status_code == 405
    assert app.test_client().post(f"/billing/webhooks/{LOG_SECRETS['SECRET_KEY']}").status_code == 404
    captured = capfd.readouterr()
    stream = captured.err + captured.out
    assert stream.count("[redacted]") >= 3
    masked = "\n".join([stream, *(f"{r.getMessage()} {getattr(r, 'path', '')}" for r in caplog.records)])
    for value in (secret, LOG_SECRETS["SECRET_KEY"], CARD_NUMBER.replace(" ", "")):
        assert value not in masked, value
