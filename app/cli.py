"""Operations commands: `flask billing ...`."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import select

from app.extensions import db
from app.models import StripeEvent, StripeEventStatus, WhopEvent
from app.services import outbox, promotions, queue, queue_status, tax, usage_reports
from app.services.billing_service import BillingConfigurationError, BillingError, BillingService, plan_catalogue
from app.services.reconcile_names import names_for

# What `make run` (scripts/dev) exports for the offline sandboxes when no real keys are set: a second
# shell has none of it, so a command that needs them says what to export.
MAKE_RUN_SETTINGS = {
    "STRIPE": "STRIPE_SECRET_KEY=sk_test_sandbox_development STRIPE_WEBHOOK_SECRET=whsec_sandbox_development_only "
    "STRIPE_API_BASE=http://127.0.0.1:12111",
    "WHOP": "WHOP_API_KEY=apik_sandbox_development WHOP_WEBHOOK_SECRET=ws_sandbox_development_only "
    "WHOP_COMPANY_ID=biz_sandbox WHOP_API_BASE=http://127.0.0.1:12113/whop/api/v1",
}


def missing_settings_message(error: BillingConfigurationError) -> str:
    """One line: what is missing (the error names it) and how `make run` sets it."""
    provider = "WHOP" if "WHOP_" in str(error) else "STRIPE"
    return (
        f"{error}. `make run` sets them only for the processes it starts (scripts/dev); to reach its offline "
        f"sandbox from another shell, export {MAKE_RUN_SETTINGS[provider]}"
    )


class BillingGroup(AppGroup):
    """`flask billing`: a missing or refused billing setting ends any command with one line naming it,
    not a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BillingConfigurationError as exc:
            raise click.ClickException(missing_settings_message(exc)) from None


billing_cli = BillingGroup("billing", help="Billing operations: stored webhook events, replays, prices.")
# Each provider's stored webhook deliveries (the tables share one shape; see webhook_store).
EVENT_TABLES: dict[str, type[StripeEvent] | type[WhopEvent]] = {"stripe": StripeEvent, "whop": WhopEvent}
provider_option = click.option(
    "--provider",
    type=click.Choice(["all", *sorted(EVENT_TABLES)]),
    default="all",
    show_default=True,
    help="Whose events (every provider's by default).",
)


def _models(provider: str) -> list[tuple[str, type[StripeEvent] | type[WhopEvent]]]:
    return [(name, model) for name, model in EVENT_TABLES.items() if provider in ("all", name)]


@billing_cli.command("events")
@click.option("--status", type=click.Choice([s.value for s in StripeEventStatus]), help="Only events in this status.")
@click.option("--limit", default=50, show_default=True, help="How many, newest first.")
@provider_option
def list_events(status: str | None, limit: int, provider: str) -> None:
    """List stored webhook events, every provider's (newest first) unless --provider names one."""
    rows = sorted(
        ((name, row) for name, model in _models(provider) for row in _recent(model, status, limit)),
        key=lambda found: found[1].received_at,
        reverse=True,
    )[:limit]
    if not rows:
        click.echo("no events")
    for name, row in rows:
        detail = row.last_error if row.status == StripeEventStatus.FAILED else row.outcome
        click.echo(
            f"{row.received_at:%Y-%m-%d %H:%M:%S}  {name:<6}  {row.event_id}  {row.type:<40}  {row.status:<9}  "
            f"attempts={row.attempts}  {detail or ''}"
        )


def _recent(model: type[StripeEvent] | type[WhopEvent], status: str | None, limit: int) -> list[Any]:
    query = select(model).order_by(model.received_at.desc()).limit(limit)
    if status:
        query = query.where(model.status == status)
    return list(db.session.execute(query).scalars().all())


@billing_cli.command("replay")
@click.argument("event_id", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Replay every event whose processing failed.")
@provider_option
def replay(event_id: str | None, all_failed: bool, provider: str) -> None:
    """Queue one stored event, or all failed ones (every provider's unless --provider names one), for
    the worker to apply again (read afresh, so a fix to the code applies). Events already processed or
    ignored are left as they are."""
    if bool(event_id) == all_failed:
        raise click.UsageError("give an EVENT_ID or --failed, not both")
    event_ids = (
        [event_id]
        if event_id
        else [
            failed_id
            for _, model in _models(provider)
            for failed_id in db.session.execute(
                select(model.event_id)
                .where(model.status == StripeEventStatus.FAILED)
                .order_by(getattr(model, model.created_column), model.id)
            ).scalars()
        ]
    )
    failures = 0
    for replayed_id in event_ids:
        try:
            result = BillingService.replay_stored_event(replayed_id)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
        if result.body.get("duplicate"):
            outcome = "duplicate: already settled"
        elif "queued" in result.body:
            outcome = f"queued ({result.body['queued']})"
        else:
            outcome = f"failed again: {result.body.get('failed')}"
        click.echo(f"{replayed_id}: {outcome}")
        failures += result.status_code >= 400
    if failures:
        raise click.ClickException(f"{failures} event(s) failed again; see `flask billing events --status failed`")


@billing_cli.command("emails")
@click.option("--failed", "list_failed", is_flag=True, help="List the emails (outbox deliveries) that gave up.")
@click.option("--replay", "replay_ids", type=int, multiple=True, help="Send this domain event's emails again.")
@click.option("--replay-failed", is_flag=True, help="Send every failed delivery again.")
def emails(list_failed: bool, replay_ids: tuple[int, ...], replay_failed: bool) -> None:
    """Emails and other outbox deliveries that failed for good (after OUTBOX_MAX_ATTEMPTS), and sending
    them again. A consumer that already succeeded for an event is not run again."""
    if not (list_failed or replay_ids or replay_failed):
        raise click.UsageError("give --failed, --replay DOMAIN_EVENT_ID or --replay-failed")
    failed = outbox.failed_deliveries()
    if list_failed:
        if not failed:
            click.echo("no failed deliveries")
        for delivery in failed:
            click.echo(
                f"{delivery.occurred_at:%Y-%m-%d %H:%M:%S}  event {delivery.domain_event_id}  {delivery.name:<40}  "
                f"attempts={delivery.attempts}  not sent: {', '.join(delivery.undelivered) or '-'}"
            )
    wanted = [delivery.domain_event_id for delivery in failed] if replay_failed else list(replay_ids)
    if wanted:
        queued = outbox.replay_failed(wanted)
        for domain_event_id in wanted:
            click.echo(
                f"event {domain_event_id}: {'queued again' if domain_event_id in queued else 'no failed delivery'}"
            )


@billing_cli.command("check-prices")
def check_prices() -> None:
    """Resolve every lookup key in the plan catalogue against Stripe; with STRIPE_AUTOMATIC_TAX, check
    that each price's tax_behavior is what PRICES_SHOWN_WITH_TAX says (app/services/tax.py)."""
    catalogue = plan_catalogue()
    entries = [
        (f"{kind} {entry.key}", lookup_key)
        for kind, entries_of_kind in (("tier", catalogue.tiers), ("add-on", catalogue.addons))
        for entry in entries_of_kind.values()
        for lookup_key in (entry.lookup_key, entry.yearly_lookup_key)
        if lookup_key
    ]
    try:
        prices = BillingService.prices_for_lookup_keys([lookup_key for _, lookup_key in entries])
    except BillingError as exc:
        raise click.ClickException(str(exc)) from None
    taxed = []
    for label, lookup_key in entries:
        price = prices[lookup_key]
        click.echo(f"{label:<24} {lookup_key:<24} {price.id}  {price.describe()}  tax_behavior={price.tax_behavior}")
        if problem := tax.price_problem(price):
            taxed.append(f"{label}: {problem}")
    missing = []
    for code, named_on in catalogue.promotion_codes.items():
        try:
            found = BillingService.active_promotion_code(code)
        except BillingError as exc:
            raise click.ClickException(str(exc)) from None
        if found is None:
            missing.append(f"{code} ({named_on})" if named_on else code)
            continue
        click.echo(f"{'promotion code':<24} {code:<24} {found['id']}  {promotions.describe_code(found)}")
    if missing:
        raise click.ClickException(f"No active promotion code at Stripe for: {', '.join(missing)}")
    _check_meters(taxed)
    if taxed:
        raise click.ClickException("Prices that do not fit the tax settings:\n  " + "\n  ".join(taxed))


def _check_meters(taxed: list[str]) -> None:
    """Each [meters.*] needs an active Stripe meter with its event_name and a price with its lookup key
    (whose tax_behavior problems, if any, are added to `taxed`)."""
    meters = plan_catalogue().meters
    if not meters:
        return
    try:
        meter_ids = BillingService.meter_ids()
        prices = BillingService.prices_for_lookup_keys(plan_catalogue().meter_lookup_keys(), required=False)
    except BillingError as exc:
        raise click.ClickException(str(exc)) from None
    missing = []
    for meter in meters.values():
        meter_id = meter_ids.get(meter.event_name)
        if meter_id is None:
            missing.append(f"no active Stripe meter has the event_name {meter.event_name!r} (meter {meter.key})")
        for lookup_key in filter(None, (meter.lookup_key, meter.yearly_lookup_key)):
            price = prices.get(lookup_key)
            if price is None:
                missing.append(f"no active Stripe price has the lookup key {lookup_key!r} (meter {meter.key})")
            elif price.meter not in (None, meter_id):
                missing.append(f"the price {lookup_key!r} bills another meter ({price.meter}), not {meter.key}'s")
            elif meter_id:
                click.echo(f"{'meter ' + meter.key:<24} {lookup_key:<24} {price.id}  {meter_id} {meter.event_name}")
                if problem := tax.price_problem(price):
                    taxed.append(f"meter {meter.key}: {problem}")
    if missing:
        raise click.ClickException("; ".join(missing))


@billing_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
def status(as_json: bool) -> None:
    """The queue by state, the oldest waiting job's age, failed jobs, webhook events not yet applied."""
    figures = queue_status.queue_figures()
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(figures), sort_keys=True))
        return
    if figures.jobs:
        click.echo("jobs:            " + "  ".join(f"{state}={count}" for state, count in figures.jobs.items()))
        click.echo(f"oldest waiting:  {figures.oldest_waiting_seconds:.1f} s")
        failed = "  ".join(f"{task}={count}" for task, count in figures.failed_jobs_by_task.items()) or "none"
        click.echo(f"failed jobs:     {failed}")
    else:
        click.echo("jobs:            no queue: on the SQLite stand-in jobs run inside the app as they are made")
        click.echo("                 (set DATABASE_URL to a PostgreSQL database for the queue and its figures)")
    click.echo("webhook events:  " + "  ".join(f"{state}={count}" for state, count in figures.webhook_events.items()))
    for provider, counts in figures.webhook_events_by_provider.items():
        click.echo(f"  {provider + ':':<15}" + "  ".join(f"{state}={count}" for state, count in counts.items()))
    click.echo(f"oldest pending:  {figures.oldest_pending_event_seconds:.1f} s")
    usage = usage_reports.counts()
    click.echo(
        f"usage reports:   pending={usage.pending}  sent={usage.sent}  failed={usage.failed}"
        f"  meter error reports={len(usage.error_reports)}  events not tallied={usage.untallied_events}"
        + ("  (flask billing usage lists them)" * bool(usage.failed))
    )


@billing_cli.command("worker")
@click.option("--queue", "queues", multiple=True, help="Only these queues (default: all).")
@click.option("--concurrency", type=int, default=None, help="Jobs run at once (default: WORKER_CONCURRENCY).")
@click.option("--once", is_flag=True, help="Run the jobs that are due now, then exit.")
def worker(queues: tuple[str, ...], concurrency: int | None, once: bool) -> None:
    """Run a background worker until SIGTERM: webhook application, emails, schedules. Any number of
    workers may run, on any hosts, against the same database."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if once:
        queue.run_pending_jobs(app, queues=list(queues) or None, concurrency=concurrency or 1)
    else:
        queue.run_worker(app, queues=list(queues) or None, concurrency=concurrency)


@billing_cli.command("reconcile")
@click.option("--apply", "apply_repairs", is_flag=True, help="Repair what differs (default: only report it).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--since",
    "since_days",
    default=3,
    show_default=True,
    type=click.IntRange(1, 30),
    help="Look for missing events this many days back (Stripe keeps events for 30).",
)
@click.option("--org", "organization_id", type=int, help="Only this organization.")
def reconcile(apply_repairs: bool, as_json: bool, since_days: int, organization_id: int | None) -> None:
    """Compare Stripe with the database: subscriptions, orphans, missing events. Exit status 0 when
    they agree (or were repaired), 1 when drift remains."""
    try:
        report = BillingService.reconcile(apply=apply_repairs, since_days=since_days, organization_id=organization_id)
    except BillingError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), default=str, indent=2))
    else:
        for line in report.lines(names_for(report)):
            click.echo(line)
    sys.exit(0 if report.clean else 1)


@billing_cli.command("usage")
@click.option("--report", "report_now", is_flag=True, help="Gather and send pending usage reports now.")
@click.option("--reconcile", "compare", is_flag=True, help="Compare billed usage with Stripe's meter event summaries.")
@click.option("--apply", "apply_repairs", is_flag=True, help="With --reconcile: re-send what Stripe lacks.")
@click.option("--org", "organization_id", type=int, help="With --reconcile: only this organization.")
def usage(report_now: bool, compare: bool, apply_repairs: bool, organization_id: int | None) -> None:
    """Usage reports to Stripe's meter events: pending, sent, failed (with Stripe's words); --reconcile
    compares each period's billed usage with Stripe's summary (exit status 1 while they differ)."""
    if compare:
        try:
            result = BillingService.reconcile_usage(apply=apply_repairs, org=organization_id)
        except BillingConfigurationError as exc:
            raise click.ClickException(missing_settings_message(exc)) from None
        except BillingError as exc:
            raise click.ClickException(str(exc)) from None
        for line in result.lines():
            click.echo(line)
        sys.exit(0 if result.clean or (apply_repairs and not result.problems and result.resent) else 1)
    if report_now:
        try:
            run = BillingService.report_usage()
        except BillingConfigurationError as exc:
            raise click.ClickException(missing_settings_message(exc)) from None
        click.echo(
            f"Gathered {run.gathered} reports; sent {run.sent}, failed {run.failed}, pending {run.still_pending}."
        )
        for error in run.errors:
            click.echo(f"  {error}")
    counts = usage_reports.counts()
    click.echo(
        f"Usage reports: {counts.pending} pending, {counts.sent} sent, {counts.failed} failed;"
        f" {counts.unreported_events} billable events not yet in a report;"
        f" {counts.untallied_events} events not yet tallied."
    )
    for identifier, error in counts.failures:
        click.echo(f"  failed {identifier}: {error}")
    for outcome in counts.error_reports:
        click.echo(f"  Stripe {outcome}")
    if counts.failed:
        sys.exit(1)
