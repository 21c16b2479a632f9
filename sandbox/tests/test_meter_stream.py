"""The v2 meter event stream in the sandbox: a session's token (15 minutes), up to 100 events a
request, identifiers deduplicated across v1 and v2, Stripe's v2 errors; through stripe-python."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import stripe

from sandbox.tests.conftest import Receiver, Sandbox


@pytest.fixture(scope="module")
def meter(sandbox: Sandbox) -> Any:
    return sandbox.client.v1.billing.meters.create(
        params={"display_name": "Streamed", "event_name": "streamed_units", "default_aggregation": {"formula": "sum"}}
    )


@pytest.fixture
def client(sandbox: Sandbox) -> Any:
    # The SDK sends the stream to its meter events base address: the sandbox serves both.
    return stripe.StripeClient("sk_test_sandbox", base_addresses={"api": sandbox.url, "meter_events": sandbox.url})


def _event(customer: str, identifier: str, value: str = "1", **extra: Any) -> dict[str, Any]:
    stamp = datetime.now(UTC).isoformat()
    return {
        "event_name": "streamed_units",
        "identifier": identifier,
        "timestamp": stamp,
        "payload": {"stripe_customer_id": customer, "value": value},
        **extra,
    }


def _total(client: Any, meter: Any, customer: str) -> float:
    now = int(time.time())
    summaries = client.v1.billing.meters.event_summaries.list(
        meter.id, params={"customer": customer, "start_time": now - 3600, "end_time": now + 3600}
    )
    return float(sum(s.aggregated_value for s in summaries.data))


def test_a_session_token_streams_events_counted_once_across_v1_and_v2(client: Any, meter: Any) -> None:
    customer = client.v1.customers.create(params={"email": "stream@example.com"}).id
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    created = datetime.fromisoformat(session.created)
    assert (datetime.fromisoformat(session.expires_at) - created).total_seconds() == 15 * 60
    token = {"api_key": session.authentication_token}
    batch = [_event(customer, f"s-{i}", "2") for i in range(100)]
    client.v2.billing.meter_event_stream.create({"events": batch}, token)
    assert _total(client, meter, customer) == 200
    client.v2.billing.meter_event_stream.create({"events": batch[:10]}, token)  # a retry: counted once
    client.v1.billing.meter_events.create(params={**_event(customer, "v1-a", "5"), "timestamp": int(time.time())})
    client.v2.billing.meter_event_stream.create({"events": [_event(customer, "v1-a", "5")]}, token)
    assert _total(client, meter, customer) == 205
    with pytest.raises(stripe.InvalidRequestError, match="already exists with identifier s-3"):
        client.v1.billing.meter_events.create(params={**_event(customer, "s-3"), "timestamp": int(time.time())})


def test_the_streams_refusals_are_stripes_v2_errors(sandbox: Sandbox, client: Any, meter: Any) -> None:
    customer = client.v1.customers.create(params={"email": "refused@example.com"}).id
    token = {"api_key": client.v2.billing.meter_event_session.create().authentication_token}
    stream = client.v2.billing.meter_event_stream
    with pytest.raises(stripe.InvalidRequestError, match="at most 100") as too_many:
        stream.create({"events": [_event(customer, f"m-{i}") for i in range(101)]}, token)
    assert too_many.value.http_status == 400 and too_many.value.code == "invalid_request"
    with pytest.raises(stripe.InvalidRequestError, match="event_name is required"):
        stream.create({"events": [{"payload": {"stripe_customer_id": customer, "value": "1"}}]}, token)
    with pytest.raises(stripe.InvalidRequestError, match="RFC 3339"):
        stream.create({"events": [_event(customer, "bad-time", timestamp="yesterday")]}, token)
    with pytest.raises(stripe.AuthenticationError):
        stream.create({"events": [_event(customer, "no-session")]}, {"api_key": "mes_tok_unknown"})
    assert _total(client, meter, customer) == 0
    expired = requests.post(f"{sandbox.url}/_sandbox/meters/expire_sessions", timeout=10).json()["expired"]
    assert expired >= 1
    with pytest.raises(stripe.TemporarySessionExpiredError):
        stream.create({"events": [_event(customer, "late")]}, token)
    fresh = {"api_key": client.v2.billing.meter_event_session.create().authentication_token}
    stream.create({"events": [_event(customer, "late", "3")]}, fresh)
    assert _total(client, meter, customer) == 3


def test_an_invalid_event_is_refused_asynchronously_by_an_error_report(
    sandbox: Sandbox, receiver: Receiver, client: Any, meter: Any
) -> None:
    """A well-formed request is accepted; an event v1 would refuse (here: a value that is not a number)
    leaves the meter's usage and is named by v1.billing.meter.error_report_triggered."""
    customer = client.v1.customers.create(params={"email": "async@example.com"}).id
    token = {"api_key": client.v2.billing.meter_event_session.create().authentication_token}
    events = [_event(customer, "good", "4"), _event(customer, "not-a-number", "four")]
    client.v2.billing.meter_event_stream.create({"events": events}, token)
    assert _total(client, meter, customer) == 4
    deadline = time.monotonic() + 10
    while True:
        thin = [json.loads(a["body"]) for a in receiver.attempts if "error_report_triggered" in a["body"]]
        found = [
            event
            for event in (client.v2.core.events.retrieve(t["id"]) for t in thin)
            if event.data.reason.error_types[0].sample_errors[0].request.identifier == "not-a-number"
        ]
        if found:
            break
        assert time.monotonic() < deadline, "no error report named the invalid event"
        time.sleep(0.05)
    assert "payload[value]" in found[0].data.reason.error_types[0].sample_errors[0].error_message


def test_an_event_for_no_meter_is_named_by_no_meter_found(
    sandbox: Sandbox, receiver: Receiver, client: Any, meter: Any
) -> None:
    """An event_name no active meter has is not counted; one thin v1.billing.meter.no_meter_found (no
    related_object) names the request's such events; once a meter exists the same identifier counts."""
    customer = client.v1.customers.create(params={"email": "nometer@example.com"}).id
    token = {"api_key": client.v2.billing.meter_event_session.create().authentication_token}
    lost = [_event(customer, f"lost-{i}", "2", event_name="not_a_meter") for i in range(2)]
    client.v2.billing.meter_event_stream.create({"events": [*lost, _event(customer, "kept", "4")]}, token)
    assert _total(client, meter, customer) == 4
    deadline = time.monotonic() + 10
    while True:
        thin = [json.loads(a["body"]) for a in receiver.attempts if "no_meter_found" in a["body"]]
        found = [t for t in thin if "related_object" not in t]
        events = [client.v2.core.events.retrieve(t["id"]) for t in found]
        events = [e for e in events if e.data.reason.error_types[0].sample_errors[0].request.identifier == "lost-0"]
        if events:
            break
        assert time.monotonic() < deadline, "no no_meter_found event named the events"
        time.sleep(0.05)
    [error_type] = events[0].data.reason.error_types
    assert (error_type.code, error_type.error_count) == ("no_meter", 2)
    assert [s.request.identifier for s in error_type.sample_errors] == ["lost-0", "lost-1"]
    assert "not_a_meter" in error_type.sample_errors[0].error_message
    client.v1.billing.meters.create(
        params={"display_name": "Late", "event_name": "not_a_meter", "default_aggregation": {"formula": "sum"}}
    )
    client.v2.billing.meter_event_stream.create({"events": lost[:1]}, token)  # not kept: counted now
    late = next(m for m in client.v1.billing.meters.list().data if m.event_name == "not_a_meter")
    assert _total(client, late, customer) == 2
