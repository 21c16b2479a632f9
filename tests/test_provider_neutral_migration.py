"""The provider-neutral billing migration, both ways, on a database of its own holding organizations in
every billing status: nothing is lost going up, and going down restores every row and constraint."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError

from app import create_app
from app.models import BillingStatus
from config import PROJECT_ROOT, TestConfig

NEUTRAL = "0008_provider_neutral_billing"


def _previous_revision() -> str:
    path = PROJECT_ROOT / "migrations" / "versions" / f"{NEUTRAL}.py"
    spec = importlib.util.spec_from_file_location("neutral_migration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    previous: str = module.down_revision
    return previous


@pytest.fixture
def scratch(database_url: str) -> Iterator[tuple[Any, Engine]]:
    """A database of its own (named after this worktree's test database), migrated to just before the
    provider-neutral revision."""
    name = database_url.rsplit("/", 1)[1] + "_neutral"
    admin = create_engine(database_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = database_url.rsplit("/", 1)[0] + f"/{name}"
    app = create_app(TestConfig({**os.environ, "TEST_DATABASE_URL": url}))
    engine = create_engine(url)
    try:
        from flask_migrate import upgrade

        with app.app_context():
            upgrade(revision=_previous_revision())
        yield app, engine
    finally:
        engine.dispose()
        with app.app_context():
            from app.extensions import db

            for bound in db.engines.values():
                bound.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def _migrate(app: Any, direction: str, revision: str) -> None:
    from flask_migrate import downgrade, upgrade

    with app.app_context():
        (upgrade if direction == "up" else downgrade)(revision=revision)
        from app.extensions import db

        for bound in db.engines.values():
            bound.dispose()


def _seed(engine: Engine) -> None:
    """One organization per billing status, with ids, dates, cancellations and add-ons, plus one that
    never got a subscription."""
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    with engine.begin() as connection:
        for number, status in enumerate(BillingStatus, start=1):
            ended = status in (BillingStatus.CANCELED, BillingStatus.INCOMPLETE_EXPIRED)
            connection.execute(
                text(
                    "INSERT INTO organization (name, tier, billing_status, stripe_customer_id, stripe_subscription_id,"
                    " signup_checkout_session_id, cancel_at_period_end, current_period_end, trial_end, canceled_at,"
                    " ended_at, past_due_since, billing_as_of, last_invoice_id, last_payment_status,"
                    " last_payment_at, payment_as_of, created_at, updated_at) VALUES (:name, :tier, :status,"
                    " :customer, :subscription, :session, :cancel, :period_end, :trial_end, :canceled_at,"
                    " :ended_at, :past_due_since, :as_of, :invoice, :payment, :paid_at, :as_of, :now, :now)"
                ),
                {
                    "name": f"Org {status}",
                    "tier": "pro" if number % 2 else "starter",
                    "status": status.value,
                    "customer": f"cus_{number:04d}",
                    "subscription": f"sub_{number:04d}",
                    "session": f"cs_test_{number:04d}",
                    "cancel": status == BillingStatus.ACTIVE,
                    "period_end": now + timedelta(days=number),
                    "trial_end": now + timedelta(days=14) if status == BillingStatus.TRIALING else None,
                    "canceled_at": now if ended else None,
                    "ended_at": now if ended else None,
                    "past_due_since": now if status == BillingStatus.PAST_DUE else None,
                    "as_of": 1_790_000_000 + number,
                    "invoice": f"in_{number:04d}",
                    "payment": "failed" if status == BillingStatus.PAST_DUE else "paid",
                    "paid_at": now,
                    "now": now,
                },
            )
        connection.execute(
            text(
                "INSERT INTO organization (name, tier, billing_status, cancel_at_period_end, created_at, updated_at)"
                " VALUES ('No subscription', 'starter', 'incomplete', false, now(), now())"
            )
        )
        connection.execute(
            text(
                "INSERT INTO organization_addon (organization_id, addon_key, quantity, stripe_subscription_item_id)"
                " SELECT id, 'extra_seats', id, 'si_' || id FROM organization WHERE stripe_subscription_id IS NOT NULL"
            )
        )


def _rows(engine: Engine, table: str) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(text(f"SELECT * FROM {table} ORDER BY id"))]  # noqa: S608


def _constraints(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        constraints = connection.execute(
            text("SELECT conname FROM pg_constraint WHERE conrelid = 'organization'::regclass")
        ).scalars()
        indexes = connection.execute(
            text("SELECT indexname FROM pg_indexes WHERE tablename = 'organization'")
        ).scalars()
        return set(constraints) | set(indexes)


def test_the_migration_moves_every_organization_and_back_without_loss(scratch: tuple[Any, Engine]) -> None:
    app, engine = scratch
    _seed(engine)
    before, addons_before, constraints_before = (
        _rows(engine, "organization"),
        _rows(engine, "organization_addon"),
        (_constraints(engine)),
    )
    assert {row["billing_status"] for row in before} == {status.value for status in BillingStatus}

    _migrate(app, "up", NEUTRAL)
    after = _rows(engine, "organization")
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        assert new["billing_provider"] == "stripe"
        assert new["billing_customer_id"] == old["stripe_customer_id"]
        assert new["billing_subscription_id"] == old["stripe_subscription_id"]
        unchanged = {k: v for k, v in old.items() if k not in ("stripe_customer_id", "stripe_subscription_id")}
        assert {k: new[k] for k in unchanged} == unchanged
        assert not any(column.startswith("stripe_") for column in new)
    addons_after = _rows(engine, "organization_addon")
    assert [row["provider_item_id"] for row in addons_after] == [
        row["stripe_subscription_item_id"] for row in addons_before
    ]

    _migrate(app, "down", _previous_revision())
    assert _rows(engine, "organization") == before
    assert _rows(engine, "organization_addon") == addons_before
    assert _constraints(engine) == constraints_before

    _migrate(app, "up", NEUTRAL)  # and up again: the round trip is repeatable
    assert [row["billing_customer_id"] for row in _rows(engine, "organization")] == [
        row["stripe_customer_id"] for row in before
    ]


def test_the_neutral_schema_keeps_stripe_customers_unique_and_lets_a_whop_member_own_two(
    scratch: tuple[Any, Engine],
) -> None:
    app, engine = scratch
    _migrate(app, "up", NEUTRAL)
    insert = text(
        "INSERT INTO organization (name, tier, billing_status, billing_provider, billing_customer_id,"
        " billing_subscription_id, cancel_at_period_end, created_at, updated_at)"
        " VALUES ('o', 'starter', 'active', :provider, :customer, :subscription, false, now(), now())"
    )
    with engine.begin() as connection:
        connection.execute(insert, {"provider": "stripe", "customer": "cus_1", "subscription": "sub_1"})
        connection.execute(insert, {"provider": "whop", "customer": "mber_1", "subscription": "mem_1"})
        connection.execute(insert, {"provider": "whop", "customer": "mber_1", "subscription": "mem_2"})
    for provider, customer, subscription in (
        ("stripe", "cus_1", "sub_2"),  # a Stripe customer belongs to one organization
        ("whop", "mber_9", "mem_1"),  # a membership to one organization
        ("paddle", "ctm_1", "sub_3"),  # only known providers
    ):
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(insert, {"provider": provider, "customer": customer, "subscription": subscription})


def test_whop_billed_organizations_survive_a_downgrade_and_the_next_upgrade(scratch: tuple[Any, Engine]) -> None:
    app, engine = scratch
    _seed(engine)
    _migrate(app, "up", NEUTRAL)
    with engine.begin() as connection:
        for name, membership in (("Whop one", "mem_1"), ("Whop two", "mem_2")):  # one member, two organizations
            connection.execute(
                text(
                    "INSERT INTO organization (name, tier, billing_status, billing_provider, billing_customer_id,"
                    " billing_subscription_id, cancel_at_period_end, created_at, updated_at)"
                    " VALUES (:name, 'starter', 'active', 'whop', 'mber_1', :membership, false, now(), now())"
                ),
                {"name": name, "membership": membership},
            )
    before = _rows(engine, "organization")

    _migrate(app, "down", _previous_revision())
    down = {row["name"]: row for row in _rows(engine, "organization")}
    assert (down["Whop one"]["stripe_customer_id"], down["Whop one"]["stripe_subscription_id"]) == (None, "mem_1")
    with engine.connect() as connection:
        parked = connection.execute(text("SELECT * FROM organization_billing_provider ORDER BY organization_id")).all()
    assert [(row.billing_provider, row.billing_customer_id) for row in parked] == [("whop", "mber_1")] * 2

    _migrate(app, "up", NEUTRAL)
    assert _rows(engine, "organization") == before  # every row as it was, providers included
    with engine.connect() as connection:
        tables = connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
        assert "organization_billing_provider" not in set(tables)
