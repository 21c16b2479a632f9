"""Usage-based billing: metered features in the catalogue, and recording usage durably (once per
idempotency key, validated per event, hard limits refused before storing, soft limits warned once per
period), on real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask

from app import clock
from app.extensions import db
from app.models import Organization, User, UserRole
from app.services import usage
from app.services.billing_service import BillingService
from app.services.plans import CatalogueError, PlanCatalogue
from tests.conftest import SmtpSink, email_text, query, run_jobs

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
PERIOD_END = datetime(2026, 12, 20, 9, 30, tzinfo=UTC)  # the subscription's current period: Nov 20 - Dec 20


def catalogue(overage: str = "billed", included: int = 100, aggregation: str = "sum") -> PlanCatalogue:
    return PlanCatalogue.from_mapping(
        {
            "tiers": {"starter": {"name": "Starter", "lookup_key": "starter_monthly"}},
            "meters": {
                "api_calls": {
                    "name": "API calls",
                    "event_name": "api_calls",
                    "aggregation": aggregation,
                    "lookup_key": "api_calls_overage",
                    "tiers": {"starter": {"included": included, "overage": overage}},
                }
            },
        }
    )


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "timestamp", NOW.timestamp)


def organization(app: Flask, *, with_owner: bool = False, status: str = "active", tier: str = "starter") -> int:
    with app.app_context():
        org = Organization(name="Acme", tier=tier, billing_status=status, current_period_end=PERIOD_END)
        db.session.add(org)
        db.session.flush()
        if with_owner:
            db.session.add(
                User(
                    organization_id=org.id,
                    email="ada@example.com",
                    name="Ada",
                    password_hash="x",
                    role=UserRole.OWNER,
                )
            )
        db.session.commit()
        return org.id


def record(app: Flask, org_id: int, quantity: Any = 1, key: str = "k1", **kwargs: Any) -> usage.RecordedUsage:
    with app.app_context():
        meter = kwargs.pop("meter", "api_calls")
        return BillingService.record_usage(org_id, meter, quantity, idempotency_key=key, **kwargs)


def totals(app: Flask, org_id: int) -> list[Any]:
    """The periods' rows once the worker's tally has counted what was stored."""
    with app.app_context():
        BillingService.tally_usage()
    return query(
        app,
        "SELECT period_start, period_end, total, billable FROM usage_period_total WHERE organization_id = :o"
        " ORDER BY period_start",
        o=org_id,
    )


# --- the catalogue ---------------------------------------------------------------------------------------


def test_the_shipped_catalogue_declares_a_billed_meter() -> None:
    shipped = PlanCatalogue.load("plans.toml")
    meter = shipped.meters["api_calls"]
    assert meter.aggregation == "sum" and meter.lookup_key == "api_calls_overage"
    assert meter.allowance("starter") is not None and meter.allowance("starter").billed  # type: ignore[union-attr]
    assert "api_calls_overage" in shipped.meter_lookup_keys()
    assert "api_calls_overage" not in shipped.lookup_keys()  # sells no tier


def meter_with(**changes: Any) -> dict[str, Any]:
    meter: dict[str, Any] = {
        "name": "X",
        "event_name": "x",
        "lookup_key": "x_price",
        "tiers": {"starter": {"included": 1, "overage": "billed"}},
    }
    return {name: value for name, value in {**meter, **changes}.items() if value is not None}


@pytest.mark.parametrize(
    ("meter", "problem"),
    [
        (meter_with(tiers=None), "tiers must give each tier"),
        (meter_with(event_name="x y"), "event_name must be"),
        (meter_with(aggregation="max"), "aggregation must be one of sum, count"),
        (meter_with(tiers={"gold": {"included": 1, "overage": "billed"}}), "tiers.gold is not a tier"),
        (meter_with(tiers={"starter": {"included": -1, "overage": "billed"}}), "included must be a whole number"),
        (meter_with(tiers={"starter": {"included": 1, "overage": "maybe"}}), "overage must be one of billed, soft_"),
        (meter_with(lookup_key="starter_monthly"), "lookup_key starter_monthly is used twice"),
        (meter_with(name=None), "needs name"),
        (meter_with(colour="red"), "unknown settings: colour"),
    ],
)
def test_a_bad_meter_is_a_clear_error_at_boot(meter: dict[str, Any], problem: str) -> None:
    raw = {"tiers": {"starter": {"name": "Starter", "lookup_key": "starter_monthly"}}, "meters": {"x": meter}}
    with pytest.raises(CatalogueError, match=problem):
        PlanCatalogue.from_mapping(raw)


def test_periods_follow_the_subscription_period_end() -> None:
    at = datetime(2026, 12, 6, tzinfo=UTC)
    before = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
    assert usage.period_containing(PERIOD_END, at) == usage.Period(before, PERIOD_END)
    after = usage.period_containing(PERIOD_END, datetime(2026, 12, 21, tzinfo=UTC))
    assert after == usage.Period(PERIOD_END, datetime(2027, 1, 20, 9, 30, tzinfo=UTC))
    month_end = datetime(2027, 1, 31, tzinfo=UTC)
    march = datetime(2027, 3, 1, tzinfo=UTC)
    assert usage.period_containing(month_end, march).start == datetime(2027, 2, 28, tzinfo=UTC)
    assert usage.period_containing(None, at) == usage.Period(
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    )


# --- recording -------------------------------------------------------------------------------------------


def test_usage_is_stored_once_per_idempotency_key(app: Flask, frozen: None) -> None:
    app.extensions["plan_catalogue"] = catalogue(included=100)
    org_id = organization(app)
    first = record(app, org_id, 60, "req-1")
    again = record(app, org_id, 60, "req-1")
    assert not first.duplicate and again.duplicate and again.event_id == first.event_id
    second = record(app, org_id, "70", "req-2")  # a string of digits is a number
    assert not second.duplicate
    [row] = totals(app, org_id)
    assert (row.total, row.billable) == (130, 30)  # 100 included; the second event's 30 past it are billed
    events = query(app, "SELECT quantity, billable_quantity FROM usage_event ORDER BY id")
    assert [(e.quantity, e.billable_quantity) for e in events] == [(60, 0), (70, 30)]
    with pytest.raises(usage.UsageRejected, match="already used for other usage") as reused:
        record(app, org_id, 61, "req-1")
    assert reused.value.status == 409
    assert len(query(app, "SELECT id FROM usage_event")) == 2


def test_concurrent_duplicates_are_counted_once(make_app: Any, frozen: None) -> None:
    app = make_app()
    app.extensions["plan_catalogue"] = catalogue(included=0)
    org_id = organization(app)
    results: list[usage.RecordedUsage] = []

    def send(key: str) -> None:
        results.append(record(app, org_id, 5, key))

    threads = [threading.Thread(target=send, args=(f"key-{i % 10}",)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 40 and sum(not r.duplicate for r in results) == 10
    [row] = totals(app, org_id)
    assert (row.total, row.billable) == (50, 50)


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"meter": "storage"}, "unknown_meter"),
        ({"quantity": -1}, "invalid_quantity"),
        ({"quantity": "ten"}, "invalid_quantity"),
        ({"quantity": 1.5}, "invalid_quantity"),
        ({"quantity": True}, "invalid_quantity"),
        ({"quantity": None}, "invalid_quantity"),
        ({"key": ""}, "invalid_idempotency_key"),
        ({"key": "has space"}, "invalid_idempotency_key"),
        ({"occurred_at": NOW - timedelta(days=35, seconds=1)}, "timestamp_too_old"),
        ({"occurred_at": NOW + timedelta(minutes=5, seconds=1)}, "timestamp_in_future"),
        ({"occurred_at": datetime(2026, 12, 6)}, "invalid_timestamp"),  # no time zone
        ({"occurred_at": "yesterday"}, "invalid_timestamp"),
    ],
)
def test_bad_usage_is_refused_with_a_clear_error_and_nothing_stored(
    app: Flask, frozen: None, kwargs: dict[str, Any], code: str
) -> None:
    app.extensions["plan_catalogue"] = catalogue()
    org_id = organization(app)
    with pytest.raises(usage.UsageRejected) as refused:
        record(app, org_id, **{"quantity": 1, **kwargs})
    assert refused.value.code == code and refused.value.status == 400
    assert query(app, "SELECT id FROM usage_event") == []


def test_timestamps_at_the_edges_stripe_accepts_are_recorded(app: Flask, frozen: None) -> None:
    app.extensions["plan_catalogue"] = catalogue()
    org_id = organization(app)
    assert record(app, org_id, 1, "old", occurred_at=NOW - timedelta(days=35)).occurred_at == NOW - timedelta(days=35)
    assert not record(app, org_id, 1, "ahead", occurred_at=(NOW + timedelta(minutes=5)).isoformat()).duplicate
    assert not record(app, org_id, 1, "unix", occurred_at=int(NOW.timestamp()) - 60).duplicate
    # 35 days back falls in the period before the current one: each period keeps its own total.
    assert [row.total for row in totals(app, org_id)] == [1, 2]


def test_count_meters_count_events(app: Flask, frozen: None) -> None:
    app.extensions["plan_catalogue"] = catalogue(aggregation="count")
    org_id = organization(app)
    assert record(app, org_id, None, "a").quantity == 1
    with pytest.raises(usage.UsageRejected, match="each event's quantity is 1"):
        record(app, org_id, 3, "b")


def test_a_plan_without_the_meter_or_an_ended_subscription_records_nothing(app: Flask, frozen: None) -> None:
    app.extensions["plan_catalogue"] = catalogue()
    with pytest.raises(usage.UsageRejected) as not_in_plan:
        record(app, organization(app, tier="pro"), 1)
    assert (not_in_plan.value.code, not_in_plan.value.status) == ("meter_not_in_plan", 403)
    with pytest.raises(usage.UsageRejected) as ended:
        record(app, organization(app, status="canceled"), 1)
    assert (ended.value.code, ended.value.status) == ("no_subscription", 402)
    assert query(app, "SELECT id FROM usage_event") == []


def test_a_hard_limit_refuses_before_recording_with_the_limit_and_reset(app: Flask, frozen: None) -> None:
    app.extensions["plan_catalogue"] = catalogue("hard_limit", included=10)
    org_id = organization(app)
    record(app, org_id, 8, "a")
    with pytest.raises(usage.UsageLimitReached) as refused:
        record(app, org_id, 3, "b")
    assert refused.value.status == 429 and refused.value.limit == 10 and refused.value.used == 8
    assert refused.value.resets_at == PERIOD_END
    assert "resets at 2026-12-20T09:30:00+00:00" in str(refused.value)
    record(app, org_id, 2, "c")  # exactly up to the limit is fine
    with pytest.raises(usage.UsageLimitReached):
        record(app, org_id, 1, "b")  # the refused key was not stored: trying it again is judged again
    [row] = totals(app, org_id)
    assert (row.total, row.billable) == (10, 0)
    assert [e.idempotency_key for e in query(app, "SELECT idempotency_key FROM usage_event ORDER BY id")] == ["a", "c"]


def test_concurrent_usage_never_passes_a_hard_limit(make_app: Any, frozen: None) -> None:
    app = make_app()
    app.extensions["plan_catalogue"] = catalogue("hard_limit", included=25)
    org_id = organization(app)
    outcomes: list[str] = []

    def send(i: int) -> None:
        try:
            record(app, org_id, 1, f"k{i}")
            outcomes.append("ok")
        except usage.UsageLimitReached:
            outcomes.append("refused")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("ok") == 25 and outcomes.count("refused") == 15
    assert [row.total for row in totals(app, org_id)] == [25]


def test_a_soft_limit_records_and_warns_the_owner_once_at_80_and_100_percent(
    app: Flask, frozen: None, smtp_server: SmtpSink
) -> None:
    app.extensions["plan_catalogue"] = catalogue("soft_limit", included=10)
    org_id = organization(app, with_owner=True)
    for i, quantity in enumerate([5, 2, 1, 1, 1, 3, 4]):  # 5, 7, 8 (80%), 9, 10 (100%), 13, 17
        record(app, org_id, quantity, f"k{i}")
    record(app, org_id, 1, "k3")  # a duplicate warns nobody
    run_jobs(app)
    subjects = sorted(str(message["Subject"]) for message in smtp_server.to("ada@example.com"))
    assert subjects == [
        "You have used 100% of your API calls this period",
        "You have used 80% of your API calls this period",
    ]
    texts = sorted(email_text(message) for message in smtp_server.to("ada@example.com"))
    assert "used 100% of the API calls" in texts[0] and "10 of 10" in texts[0]
    assert "used 80% of the API calls" in texts[1] and "8 of 10" in texts[1]
    [row] = totals(app, org_id)
    assert (row.total, row.billable) == (17, 0)  # recorded, not billed
