"""Billing Meters in the sandbox: meters, v1 meter events deduplicated by identifier, Stripe's
synchronous validation errors, meter event summaries; every object in stripe-python's shape."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
import stripe
from stripe._stripe_object import StripeObject

from sandbox.tests.conftest import SECRET, Receiver, Sandbox
from sandbox.tests.test_contract import _module_namespace
from sandbox.tests.test_contract import check_object as _check_object


def check_object(obj: dict[str, Any], cls: type, path: str) -> list[str]:
    """The contract test's check. stripe-python's billing modules do not import StripeObject, which
    their base classes' hints name: it is added to the namespace the hints are resolved in."""
    _module_namespace(cls.__module__).setdefault("StripeObject", StripeObject)
    return _check_object(obj, cls, path)


@pytest.fixture(scope="module")
def meter(sandbox: Sandbox) -> Any:
    return sandbox.client.v1.billing.meters.create(
        params={"display_name": "Tokens", "event_name": "tokens_used", "default_aggregation": {"formula": "sum"}}
    )


def test_meter_events_are_counted_once_per_identifier_and_summarised(sandbox: Sandbox, meter: Any) -> None:
    customer = sandbox.client.v1.customers.create(params={"email": "meter@example.com"})
    now = int(time.time())
    events = sandbox.client.v1.billing.meter_events
    first = events.create(
        params={
            "event_name": "tokens_used",
            "payload": {"stripe_customer_id": customer.id, "value": "25"},
            "identifier": "report-1",
            "timestamp": now - 60,
        }
    )
    assert (first.identifier, first.payload["value"], first.timestamp) == ("report-1", "25", now - 60)
    assert check_object(first.to_dict(), stripe.billing.MeterEvent, "billing.meter_event") == []
    with pytest.raises(stripe.InvalidRequestError, match="An event already exists with identifier report-1"):
        events.create(
            params={
                "event_name": "tokens_used",
                "payload": {"stripe_customer_id": customer.id, "value": "25"},
                "identifier": "report-1",
            }
        )
    events.create(params={"event_name": "tokens_used", "payload": {"stripe_customer_id": customer.id, "value": "5"}})
    summaries = sandbox.client.v1.billing.meters.event_summaries.list(
        meter.id, params={"customer": customer.id, "start_time": now - 3600, "end_time": now + 3600}
    )
    [summary] = summaries.data
    assert summary.aggregated_value == 30
    assert check_object(summary.to_dict(), stripe.billing.MeterEventSummary, "billing.meter_event_summary") == []
    before = sandbox.client.v1.billing.meters.event_summaries.list(
        meter.id, params={"customer": customer.id, "start_time": now - 3600, "end_time": now - 60}
    )
    assert before.data[0].aggregated_value == 0  # end_time is exclusive


def test_meters_are_listed_and_retrieved_in_stripes_shape(sandbox: Sandbox, meter: Any) -> None:
    assert check_object(meter.to_dict(), stripe.billing.Meter, "billing.meter") == []
    assert sandbox.client.v1.billing.meters.retrieve(meter.id).event_name == "tokens_used"
    assert meter.id in [m.id for m in sandbox.client.v1.billing.meters.list().data]
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        sandbox.client.v1.billing.meters.create(
            params={"display_name": "Again", "event_name": "tokens_used", "default_aggregation": {"formula": "sum"}}
        )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"event_name": "nothing_meters_this"}, "No active meter was found with event_name"),
        ({"payload": {"stripe_customer_id": "cus_missing", "value": "1"}}, "No such customer: 'cus_missing'"),
        ({"payload": {"value": "1"}}, "payload\\[stripe_customer_id\\]"),
        ({"value": "lots"}, "the value must be a number"),
        ({"timestamp": int(time.time()) - 36 * 86400}, "within the past 35 calendar days"),
        ({"timestamp": int(time.time()) + 3600}, "more than 5 minutes in the future"),
    ],
)
def test_meter_events_stripe_would_refuse_are_refused(
    sandbox: Sandbox, meter: Any, params: dict[str, Any], message: str
) -> None:
    customer = sandbox.client.v1.customers.create(params={"email": "refused@example.com"})
    payload = {"stripe_customer_id": customer.id, "value": params.pop("value", "1")}
    request = {"event_name": "tokens_used", "payload": payload, **params}
    with pytest.raises(stripe.InvalidRequestError, match=message):
        sandbox.client.v1.billing.meter_events.create(params=request)


def test_an_asynchronous_rejection_is_a_thin_event_read_back_from_v2(
    sandbox: Sandbox, receiver: Receiver, meter: Any
) -> None:
    """POST /_sandbox/meters/error_report: the events leave the meter's usage, and
    v1.billing.meter.error_report_triggered is delivered thin (signed, no data); stripe-python parses
    it and fetches the event with its data from GET /v2/core/events/:id."""
    customer = sandbox.client.v1.customers.create(params={"email": "rejected@example.com"})
    now = int(time.time())
    params = {"event_name": "tokens_used", "payload": {"stripe_customer_id": customer.id, "value": "7"}}
    sandbox.client.v1.billing.meter_events.create(params={**params, "identifier": "to-reject", "timestamp": now})
    body = {"identifiers": ["to-reject"], "code": "timestamp_too_far_in_past", "message": "Too old."}
    event_id = requests.post(f"{sandbox.url}/_sandbox/meters/error_report", json=body, timeout=10).json()["id"]
    deadline = time.monotonic() + 10
    while not (attempts := [a for a in receiver.attempts if f'"{event_id}"' in a["body"] and a["status"] == 200]):
        assert time.monotonic() < deadline, "the error report was not delivered"
        time.sleep(0.05)
    delivered = attempts[0]
    assert "data" not in json.loads(delivered["body"])
    notification = sandbox.client.parse_event_notification(
        delivered["body"], delivered["headers"]["Stripe-Signature"], SECRET
    )
    assert notification.type == "v1.billing.meter.error_report_triggered"
    assert notification.related_object.id == meter.id
    event = notification.fetch_event()
    [error_type] = event.data.reason.error_types
    assert (error_type.code, error_type.error_count, event.data.reason.error_count) == (
        "timestamp_too_far_in_past",
        1,
        1,
    )
    assert [(s.error_message, s.request.identifier) for s in error_type.sample_errors] == [("Too old.", "to-reject")]
    summaries = sandbox.client.v1.billing.meters.event_summaries.list(
        meter.id, params={"customer": customer.id, "start_time": now - 3600, "end_time": now + 3600}
    )
    assert [s.aggregated_value for s in summaries.data] == [0]
    missing = requests.get(f"{sandbox.url}/v2/core/events/evt_test_nope", auth=("sk_test_sandbox", ""), timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
