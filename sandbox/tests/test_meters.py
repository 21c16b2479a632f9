"""Billing Meters in the sandbox: meters, v1 meter events deduplicated by identifier, Stripe's
synchronous validation errors, meter event summaries; every object in stripe-python's shape."""

from __future__ import annotations

import time
from typing import Any

import pytest
import stripe
from stripe._stripe_object import StripeObject

from sandbox.tests.conftest import Sandbox
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
