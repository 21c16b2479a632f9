"""The customer portal: switching plan and changing an add-on's quantity."""

from __future__ import annotations

import re
import time

import requests

from sandbox.tests.conftest import Receiver, Sandbox, paid_subscription


def test_portal_switches_plan_and_changes_quantity(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    session, sub = paid_subscription(sandbox, prices)  # starter × 1 + extra seats × 2
    portal = sandbox.client.v1.billing_portal.sessions.create(params={"customer": session.customer})
    page = requests.get(portal.url, timeout=5).text
    assert 'id="plan-select"' in page and 'id="switch-plan"' in page
    options = re.findall(r'<option value="(price_\w+)" data-lookup-key="(\w*)"', page)
    assert [key for _, key in options] == ["pro_monthly"]  # other tiers, same interval
    assert 'id="quantity-extra_seat_monthly"' in page and 'id="update-quantity-extra_seat_monthly"' in page

    switched = requests.post(
        f"{portal.url}/subscriptions/{sub.id}/switch-plan", data={"price": prices["pro_monthly"]}, timeout=5
    )
    assert switched.status_code == 200 and switched.history[0].status_code == 303
    assert "Your plan has been changed." in switched.text
    after = sandbox.client.v1.subscriptions.retrieve(sub.id)
    tier = after["items"].data[0]
    assert tier.id == sub["items"].data[0].id and tier.price.lookup_key == "pro_monthly"
    # Prorated for the next invoice, as the portal does by default.
    preview = sandbox.client.v1.invoices.create_preview(params={"subscription": sub.id})
    prorations = [line for line in preview.lines.data if line.parent.subscription_item_details.proration]
    assert [line.amount < 0 for line in prorations] == [True, False]

    seats = next(i for i in after["items"].data if i.price.lookup_key == "extra_seat_monthly")
    changed = requests.post(
        f"{portal.url}/subscriptions/{sub.id}/update-quantity", data={"item": seats.id, "quantity": "7"}, timeout=5
    )
    assert changed.status_code == 200 and "Your subscription has been updated." in changed.text
    assert 'id="quantity-extra_seat_monthly"' in changed.text and 'value="7"' in changed.text
    seats = next(i for i in sandbox.client.v1.subscriptions.retrieve(sub.id)["items"].data if i.id == seats.id)
    assert seats.quantity == 7

    for data in ({"item": seats.id, "quantity": "-1"}, {"item": "si_nope", "quantity": "1"}):
        refused = requests.post(f"{portal.url}/subscriptions/{sub.id}/update-quantity", data=data, timeout=5)
        assert refused.status_code == 400 and 'role="alert"' in refused.text
    refused = requests.post(f"{portal.url}/subscriptions/{sub.id}/switch-plan", data={"price": "price_x"}, timeout=5)
    assert refused.status_code == 400 and "Choose one of the plans offered." in refused.text

    events = receiver.wait_for({sub.id}, 3)
    assert [e["type"] for e in events[1:]] == ["customer.subscription.updated"] * 2
    assert events[1]["request"]["id"] is None  # the portal's changes are not API requests
    assert events[2]["data"]["previous_attributes"]["items"]["data"][1]["quantity"] == 2


def test_portal_updates_the_customers_billing_name_and_email(
    sandbox: Sandbox, receiver: Receiver, prices: dict[str, str]
) -> None:
    session, _sub = paid_subscription(sandbox, prices)
    portal = sandbox.client.v1.billing_portal.sessions.create(params={"customer": session.customer})
    page = requests.get(portal.url, timeout=5).text
    assert 'id="information-name"' in page and 'id="information-email"' in page and 'id="update-information"' in page
    saved = requests.post(
        f"{portal.url}/information", data={"name": "Ada GmbH", "email": "billing@example.com"}, timeout=5
    )
    assert saved.status_code == 200 and saved.history[0].status_code == 303
    assert "Your billing information has been updated." in saved.text and 'value="Ada GmbH"' in saved.text
    customer = sandbox.client.v1.customers.retrieve(session.customer)
    assert (customer.name, customer.email) == ("Ada GmbH", "billing@example.com")
    deadline, updated = time.monotonic() + 10, []
    while not updated and time.monotonic() < deadline:
        updated = [
            e
            for e in receiver.events({session.customer})
            if e["type"] == "customer.updated" and "name" in e["data"].get("previous_attributes", {})
        ]
        time.sleep(0.05)
    [event] = updated
    assert event["request"]["id"] is None  # the portal's changes are not API requests
    assert set(event["data"]["previous_attributes"]) == {"name", "email"}
    # The same again is accepted and changes nothing; an address without @ is refused.
    requests.post(f"{portal.url}/information", data={"name": "Ada GmbH", "email": "billing@example.com"}, timeout=5)
    refused = requests.post(f"{portal.url}/information", data={"name": "Ada", "email": "nope"}, timeout=5)
    assert refused.status_code == 400 and 'role="alert"' in refused.text
    assert sandbox.client.v1.customers.retrieve(session.customer).name == "Ada GmbH"
