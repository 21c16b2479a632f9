"""The billing layout holds (docs/system/SERVICES.md, "Billing modules"): the Stripe SDK is used only by
the authority, Whop's only by its adapter, which only the authority imports; no billing sibling imports
the authority; and everything that exists because a module was imported (worker tasks, outbox consumers,
webhook providers, whose names are stored in the database) is registered by the app factory."""

from __future__ import annotations

import ast
from pathlib import Path

from flask import Flask

from app.services import outbox, queue
from app.services.billing_service import BillingService
from sandbox.tests.test_layout import import_cycles

ROOT = Path(__file__).resolve().parent.parent
AUTHORITY = "app/services/billing_service.py"
WHOP_ADAPTER = "app/services/whop_billing.py"
# Callers of the authority that live in app/services/: the worker's tasks, like a route or the CLI.
AUTHORITY_CALLERS_IN_SERVICES = {"app/services/jobs.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (inside functions and TYPE_CHECKING blocks too), with
    `from a import b` counted as both a and a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def importers_of(prefixes: tuple[str, ...]) -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "app").rglob("*.py"))
        if any(
            module == prefix or module.startswith(prefix + ".")
            for module in imported_modules(path)
            for prefix in prefixes
        )
    }


def test_the_app_has_no_import_cycle() -> None:
    """Imports inside functions and TYPE_CHECKING blocks count: a cycle hidden in a function is one."""
    assert import_cycles(ROOT / "app", "app") == []


def test_the_stripe_sdk_is_used_only_by_the_billing_authority() -> None:
    assert importers_of(("stripe",)) == {AUTHORITY}


def test_whops_sdks_are_used_only_by_its_adapter_which_only_the_authority_imports() -> None:
    assert importers_of(("whop_sdk", "standardwebhooks")) == {WHOP_ADAPTER}
    assert importers_of(("app.services.whop_billing",)) == {AUTHORITY}


def test_no_billing_sibling_imports_the_authority() -> None:
    callers = importers_of(("app.services.billing_service",))
    assert {path for path in callers if path.startswith("app/services/")} == AUTHORITY_CALLERS_IN_SERVICES


def test_the_authority_reads_as_a_table_of_contents_over_siblings_of_a_readable_size() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in (ROOT / "app/services").glob("*.py")
    }
    assert sizes[AUTHORITY] <= 1040
    assert {path: lines for path, lines in sizes.items() if path != AUTHORITY and lines > 600} == {}


def test_the_factory_registers_every_task_consumer_and_webhook_provider(app: Flask) -> None:
    with app.app_context():
        tasks = set(queue.job_app(app).tasks)
    assert {
        "webhooks:apply",
        "outbox:deliver",
        "maintenance:recover_stalled_jobs",
        "maintenance:apply_unclaimed_events",
        "maintenance:expire_pending_signups",
        "maintenance:drop_old_event_payloads",
        "maintenance:reconcile_daily",
    } <= tasks
    # Consumers the suite's own tests register (events named test.*) are not the product's.
    registered = {
        event: names for event, names in outbox.registered_consumers().items() if not event.startswith("test.")
    }
    assert registered == {
        "billing.payment_action_required": ["payment_action_required_email"],
        "billing.payment_failed": ["payment_failed_email"],
        "billing.payment_succeeded": ["receipt_email"],
        "organization.billing_email_changed": ["sync_customer_email"],
        "organization.billing_status_changed": ["subscription_ended_email"],
        "organization.renamed": ["sync_customer_name"],
        "organization.surplus_subscription": ["settle_surplus_subscription"],
        "signup.completed": ["verify_email_after_signup", "welcome_email"],
        "signup.conflict": ["settle_signup_conflict"],
        "signup.conflict_refunded": ["conflict_refund_email"],
        "signup.started_for_existing_account": ["existing_account_signup_email"],
        "subscription.cancellation_scheduled": ["cancellation_scheduled_email"],
        "subscription.trial_will_end": ["trial_ending_email"],
        "team.invitation_sent": ["invitation_email"],
        "usage.threshold_reached": ["usage_warning_email"],
        "user.email_verification_requested": ["verify_email_again"],
        "user.password_changed": ["password_changed_email"],
        "user.password_reset": ["password_reset_done_email"],
        "user.email_change_requested": ["email_change_link"],
        "user.email_changed": ["email_changed_notice", "sync_customer_email_of_owner"],
        "user.password_reset_requested": ["password_reset_email"],
    }
    assert sorted(BillingService._webhook_providers) == ["stripe", "whop"]
