"""Billing pages and endpoints. Each parses the request, calls BillingService, and renders or
redirects; who may do what is decided here (owner only) and what it does is decided there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, abort, current_app, flash, g, jsonify, redirect, render_template, request, url_for
from flask_login import current_user
from werkzeug.wrappers import Response

from app import clock
from app.access import current_access, recent_auth_required, require_signed_in, sign_in, take_signup_sign_in
from app.billing.forms import (
    BillingAddressForm,
    BillingEmailForm,
    CancelForm,
    ChangeSeatsForm,
    ConfirmChangeForm,
    DowngradeToFreeForm,
    KeepPlanForm,
    OrganizationNameForm,
    PortalForm,
    RemoveTaxIdForm,
    ResumeForm,
    TaxIdForm,
    change_plan_form,
    resubscribe_form,
)
from app.extensions import client_address, csrf, db, limiter
from app.features import current_entitlements
from app.models import Organization, User
from app.services import free_plan, organization_profile, receipts, tax, usage_page
from app.services.billing_common import ChangeOutcome
from app.services.billing_service import (
    BillingError,
    BillingService,
    CheckoutSessionNotFound,
    PaymentProviderUnavailable,
    StalePreview,
    UnknownWebhookProvider,
    WebhookRejected,
    plan_catalogue,
)
from app.services.entitlements import entitlements_for, seat_addon_key
from app.services.plan_change import PlanChangeError, Preview, PreviewExpired, When, preview_from_ticket, preview_ticket
from app.services.pricing import PriceInfo
from app.services.signup_service import ProvisionOutcome, ProvisionState
from app.services.team_service import TeamService
from app.templating import money

bp = Blueprint("billing", __name__)
# Reached without a session: Stripe's webhooks (signed) and its success URL (which finds the browser
# that started the signup itself). Every other billing page needs a signed-in user.
PUBLIC_ENDPOINTS = frozenset(
    {"billing.webhook", "billing.complete_signup_from_stripe", "billing.complete_signup_from_whop"}
)


@bp.before_request
def signed_in_pages() -> Response | None:
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    return require_signed_in()


def _owned_organization() -> Organization:
    """The signed-in owner's organization. Routes take no organization id from the request, so nobody
    reaches another organization's subscription by changing one."""
    if not current_user.is_owner:
        abort(403, "Only the organization's owner can change its billing.")
    organization: Organization = current_user.organization
    return organization


@bp.get("/")
def overview() -> str | tuple[str, int]:
    if not current_user.is_owner:
        # Members use the app but never see billing: not the plan, not the amounts, not the invoices.
        g.access = current_access()
        return render_template("billing/members.html", access=g.access), 403
    organization = current_user.organization
    catalogue = plan_catalogue()
    g.access = current_access()
    # A new subscription is offered with each plan's price (through the price cache); nothing else needs them.
    # A free organization is offered the paid plans too (an upgrade is a new subscription).
    on_free_plan = free_plan.on_free_plan(organization)
    prices = BillingService.catalogue_prices() if g.access.remedy == "resubscribe" or on_free_plan else {}
    usage: list[usage_page.MeterUsage] = []
    metered: Mapping[str, PriceInfo] = {}
    if any(meter.allowance(organization.tier) for meter in catalogue.meters.values()):
        metered = usage_page.metered_prices(
            catalogue, lambda keys: BillingService.prices_for_lookup_keys(keys, required=False)
        )
        usage = usage_page.meters_for(catalogue, organization, metered, clock.utcnow())
    return render_template(
        "billing/overview.html",
        prices=prices,
        usage=usage,
        metered_price_ids=[price.id for price in metered.values()],
        organization=organization,
        catalogue=catalogue,
        access=g.access,
        details=BillingService.billing_details(organization),
        seats=TeamService.seat_use(organization),
        entitlements=current_entitlements(),
        portal_form=PortalForm(),
        cancel_form=CancelForm(),
        resume_form=ResumeForm(),
        resubscribe_form=resubscribe_form(catalogue),
        keep_plan_form=KeepPlanForm(),
        on_free_plan=on_free_plan,
        free_tier=catalogue.free_tier(),
        downgrade_form=DowngradeToFreeForm(),
        billing_email_form=BillingEmailForm(billing_email=organization.billing_email or ""),
        organization_name_form=OrganizationNameForm(name=organization.name),
        tax_forms=(BillingAddressForm(), TaxIdForm(), RemoveTaxIdForm()),
        tax_setting={"automatic": tax.enabled(), "inclusive": tax.prices_include_tax()},
    )


# --- Plan and seat changes: choose, preview, confirm -----------------------------------------------


def _members_in_use(organization: Organization) -> int:
    return TeamService.seat_use(organization).members


def _changed_on_whop(organization: Organization) -> str:
    """A Whop-billed organization's plan and seats are changed on Whop: the page says what Whop bills
    and offers the one thing that can be done, managing the membership there."""
    return render_template(
        "billing/changed_on_whop.html",
        organization=organization,
        details=BillingService.billing_details(organization),
        portal_form=PortalForm(),
    )


@bp.get("/plan")
def change_plan() -> str:
    organization = _owned_organization()
    if organization.billed_by_whop:
        return _changed_on_whop(organization)
    catalogue = plan_catalogue()
    details = BillingService.billing_details(organization)
    interval = details.subscription.interval if details.subscription else None
    form = change_plan_form(catalogue, tier=organization.tier, interval=interval or "month")
    prices = BillingService.catalogue_prices()
    return render_template(
        "billing/change_plan.html", form=form, catalogue=catalogue, prices=prices, organization=organization
    )


@bp.get("/seats")
def change_seats() -> str:
    organization = _owned_organization()
    if organization.billed_by_whop:
        return _changed_on_whop(organization)
    catalogue = plan_catalogue()
    seat_key = seat_addon_key(catalogue)
    current_extra = organization.addon_quantities().get(seat_key or "", 0)
    return render_template(
        "billing/change_seats.html",
        form=ChangeSeatsForm(extra_seats=current_extra + (1 if request.args.get("add") else 0)),
        seats=TeamService.seat_use(organization),
        included=entitlements_for(catalogue, organization.tier, {}, billing_allows_use=True).seats,
        addon=catalogue.addons.get(seat_key or ""),
        prices=BillingService.catalogue_prices(),
    )


@bp.post("/plan/preview")
def preview_plan() -> Response | tuple[str, int]:
    organization = _owned_organization()
    form = change_plan_form(plan_catalogue())
    if not form.validate_on_submit():
        flash("Choose a plan and how often to pay.", "error")
        return redirect(url_for("billing.change_plan"), 303)
    return _preview(
        organization,
        kind="plan",
        tier=form.tier.data,
        interval=form.interval.data,
        promotion_code=(form.promotion_code.data or "").strip() or None,
    )


@bp.post("/seats/preview")
def preview_seats() -> Response | tuple[str, int]:
    organization = _owned_organization()
    form = ChangeSeatsForm()
    if not form.validate_on_submit():
        flash("Say how many extra seats, a whole number of at least 0.", "error")
        return redirect(url_for("billing.change_seats"), 303)
    return _preview(organization, kind="seats", extra_seats=form.extra_seats.data)


def _preview(
    organization: Organization,
    *,
    kind: str,
    tier: str | None = None,
    interval: str | None = None,
    extra_seats: int | None = None,
    notice: str | None = None,
    promotion_code: str | None = None,
) -> Response | tuple[str, int]:
    back = "billing.change_plan" if kind == "plan" else "billing.change_seats"
    try:
        preview = BillingService.preview_subscription_change(
            organization.id,
            kind=kind,
            tier=tier,
            interval=interval,
            extra_seats=extra_seats,
            members=_members_in_use(organization),
            promotion_code=promotion_code,
        )
    except BillingError as exc:
        flash(str(exc), "error")
        return redirect(url_for(back), 303)
    # Never the submitted ticket (a stale one is being replaced): the form is built from the new preview only.
    form = ConfirmChangeForm(formdata=None, ticket=preview_ticket(preview, current_app.config["SECRET_KEY"]))
    return render_template(
        "billing/preview.html",
        preview=preview,
        form=form,
        catalogue=plan_catalogue(),
        notice=notice,
        back=back,
    ), (409 if notice else 200)


@bp.post("/change/confirm")
@recent_auth_required
def confirm_change() -> Response | tuple[str, int]:
    organization = _owned_organization()
    form = ConfirmChangeForm()
    if not form.validate_on_submit():
        abort(400, "That form was incomplete. Start the change again from the billing page.")
    max_age = current_app.config["PLAN_CHANGE_PREVIEW_MINUTES"] * 60
    try:
        preview = preview_from_ticket(form.ticket.data, current_app.config["SECRET_KEY"], max_age_seconds=max_age)
    except PreviewExpired:
        preview = None
    except PlanChangeError as exc:
        abort(400, str(exc))
    if preview is None:
        return _fresh_preview_after(organization, None, "This preview has expired.")
    if preview.organization_id != organization.id:
        abort(400, "That preview belongs to another organization.")
    try:
        outcome = BillingService.confirm_subscription_change(preview, actor_user_id=current_user.id)
    except StalePreview as exc:
        return _fresh_preview_after(organization, preview, str(exc))
    except BillingError as exc:
        flash(str(exc), "error")
        return redirect(url_for("billing.overview"), 303)
    _flash_outcome(outcome)
    return redirect(url_for("billing.overview"), 303)


def _flash_outcome(outcome: ChangeOutcome) -> None:
    """What became of a confirmed change, and the invoice to pay when the payment needs the owner."""
    if outcome.duplicate and not outcome.applied:
        flash("This change is already being made. The page shows it once Stripe confirms it.", "info")
    elif outcome.duplicate:
        flash("This change was already made.", "info")
    elif outcome.awaiting_payment:
        flash(
            f"The payment for this change did not go through: {outcome.awaiting_payment} Your plan stays as it "
            "was until the invoice is paid; paying it makes the change.",
            "error",
        )
    elif outcome.when == When.PERIOD_END:
        flash("Your plan will change at the end of the billing period.", "success")
    else:
        flash("Your subscription is changed.", "success")
    if outcome.action_url:
        flash(outcome.action_url, "payment-action")


def _fresh_preview_after(organization: Organization, stale: Preview | None, reason: str) -> Response | tuple[str, int]:
    """A stale preview is refused and a fresh one for the same change is offered in its place."""
    notice = (
        f"{reason} Nothing was changed. Here is the change as it stands now; confirm it again if you still want it."
    )
    if stale is None:
        flash(f"{reason} Nothing was changed. Start the change again.", "error")
        return redirect(url_for("billing.overview"), 303)
    target = stale.target
    if stale.kind == "seats":
        return _preview(organization, kind="seats", extra_seats=target.extra_seats, notice=notice)
    return _preview(
        organization,
        kind="plan",
        tier=target.tier,
        interval=target.interval,
        notice=notice,
        promotion_code=stale.promotion_code,
    )


@bp.post("/plan/keep")
def keep_plan() -> Response:
    organization_id = _owned_organization().id
    if not KeepPlanForm().validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    try:
        BillingService.cancel_scheduled_change(organization_id, actor_user_id=current_user.id)
    except BillingError as exc:
        flash(str(exc), "error")
    else:
        flash("Your plan stays as it is; the scheduled change is withdrawn.", "success")
    return redirect(url_for("billing.overview"), 303)


@bp.post("/portal")
@recent_auth_required
def portal() -> Response:
    organization = _owned_organization()
    if not PortalForm().validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    try:
        url = BillingService.create_customer_portal_session(
            organization, return_url=f"{current_app.config['APP_BASE_URL']}{url_for('billing.overview')}"
        )
    except BillingError as exc:
        flash(str(exc), "error")
        return redirect(url_for("billing.overview"), 303)
    return redirect(url, 303)


@bp.post("/cancel")
@recent_auth_required
def cancel() -> Response | str:
    organization = _owned_organization()
    organization_id = organization.id
    form = CancelForm()
    if not form.validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    if form.needs_confirmation():
        # The same form again, with its request token, and the facts the owner is agreeing to.
        return render_template(
            "billing/cancel_now.html", form=form, organization=organization, seats=TeamService.seat_use(organization)
        )
    at_period_end = not form.ends_now()
    try:
        BillingService.cancel_subscription(
            organization_id,
            at_period_end=at_period_end,
            request_token=form.request_token.data,
            actor_user_id=current_user.id,
        )
    except BillingError as exc:
        flash(str(exc), "error")
    else:
        flash(
            "Your plan will end at the end of the billing period. You can resume it until then."
            if at_period_end
            else "Your subscription is canceled.",
            "success",
        )
    return redirect(url_for("billing.overview"), 303)


@bp.post("/resume")
def resume() -> Response:
    organization_id = _owned_organization().id
    form = ResumeForm()
    if not form.validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    try:
        BillingService.resume_subscription(
            organization_id, request_token=form.request_token.data, actor_user_id=current_user.id
        )
    except BillingError as exc:
        flash(str(exc), "error")
    else:
        flash("Your plan will renew as usual.", "success")
    return redirect(url_for("billing.overview"), 303)


@bp.post("/billing-email")
def billing_email() -> Response:
    """Where receipts go: another address, or (empty) the owner's own."""
    organization_id = _owned_organization().id
    form = BillingEmailForm()
    if not form.validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    try:
        kept = receipts.set_billing_email(organization_id, form.billing_email.data or "", actor_user_id=current_user.id)
    except receipts.BillingEmailError as exc:
        flash(str(exc), "error")
    else:
        flash(f"Receipts will be sent to {kept or current_user.email}.", "success")
    return redirect(url_for("billing.overview"), 303)


@bp.post("/organization-name")
def organization_name() -> Response:
    """The owner renames the organization (Stripe's customer follows through the worker)."""
    organization_id = _owned_organization().id
    form = OrganizationNameForm()
    if not form.validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    try:
        name, changed = organization_profile.rename(organization_id, form.name.data, actor_user_id=current_user.id)
    except organization_profile.OrganizationNameError as exc:
        flash(str(exc), "error")
    else:
        flash(f"The organization is now called {name}." if changed else f"The name is already {name}.", "success")
    return redirect(url_for("billing.overview", _anchor="organization-name"), 303)


@bp.post("/tax-details")
def tax_details() -> Response:
    """The owner edits the billing address, adds a tax ID or removes one (kept at Stripe: tax.py)."""
    organization_id = _owned_organization().id
    action = request.form.get("action", "")
    forms = {"address": BillingAddressForm, "add_tax_id": TaxIdForm, "remove_tax_id": RemoveTaxIdForm}
    if action not in forms or not (form := forms[action]()).validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    try:
        if isinstance(form, BillingAddressForm):
            change = tax.TaxChange.address_from_form(form.data, form.request_token.data)
        elif isinstance(form, TaxIdForm):
            change = tax.TaxChange.tax_id_from_form(form.type.data, form.value.data, form.request_token.data)
        else:
            change = tax.TaxChange(remove_tax_id=form.tax_id.data, request_token=form.request_token.data)
        BillingService.change_tax_details(organization_id, change, actor_user_id=current_user.id)
    except BillingError as exc:
        flash(str(exc), "error")
    else:
        flash(
            {"address": "Billing address saved.", "add_tax_id": "Tax ID added."}.get(action, "Tax ID removed."),
            "success",
        )
    return redirect(url_for("billing.overview", _anchor="tax-details"), 303)


@bp.post("/downgrade-to-free")
@recent_auth_required
def downgrade_to_free() -> Response:
    """A paid plan moves to the free plan when its period ends (the subscription is canceled then)."""
    organization_id = _owned_organization().id
    form = DowngradeToFreeForm()
    if not form.validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    try:
        BillingService.downgrade_to_free(
            organization_id, request_token=form.request_token.data, actor_user_id=current_user.id
        )
    except BillingError as exc:
        flash(str(exc), "error")
    else:
        flash(
            "Your plan moves to the free plan at the end of the billing period; nothing more is charged. "
            "You can keep your plan until then.",
            "success",
        )
    return redirect(url_for("billing.overview"), 303)


@bp.post("/resubscribe")
def resubscribe() -> Response:
    organization_id = _owned_organization().id
    form = resubscribe_form(plan_catalogue())
    if not form.validate_on_submit():
        abort(400, "Choose a plan, then try again.")
    try:
        url = BillingService.create_checkout_session_for_organization(
            organization_id, form.tier.data, request_token=form.request_token.data, actor_user_id=current_user.id
        )
    except BillingError as exc:
        flash(str(exc), "error")
        return redirect(url_for("billing.overview"), 303)
    return redirect(url, 303)


@bp.get("/checkout-complete")
def checkout_complete() -> Response | tuple[str, int]:
    organization_id = _owned_organization().id
    try:
        outcome = BillingService.complete_resubscription_from_redirect(
            organization_id, request.args.get("session_id", "")
        )
    except CheckoutSessionNotFound as exc:
        return render_template("billing/checkout_problem.html", message=str(exc)), 404
    except PaymentProviderUnavailable:
        return _confirming_payment()
    if outcome.state == ProvisionState.AWAITING_PAYMENT:
        return render_template("billing/processing.html"), 202
    if outcome.state == ProvisionState.SURPLUS:
        message = "Your organization already has a subscription, so this checkout did not start another one. " + (
            settlement_words(outcome.settlement)
        )
        return render_template("billing/checkout_problem.html", message=message), 409
    flash("Welcome back: your new subscription is active.", "success")
    return redirect(url_for("billing.overview"), 303)


def settlement_words(settlement: dict[str, Any] | None) -> str:
    """What was done at Stripe with a checkout no organization may keep, in the customer's words."""
    if settlement is None:
        return (
            "We could not reach our payment provider to cancel it just now; it will be canceled and any payment "
            "refunded automatically."
        )
    if settlement.get("refund_id"):
        return (
            "We canceled the new subscription and refunded "
            f"{money(settlement.get('amount_refunded'), settlement.get('currency'))} to your payment method."
        )
    return "We canceled the new subscription; nothing was charged."


@bp.get("/complete-signup-from-stripe")
@limiter.limit(lambda: current_app.config["CHECKOUT_RETURN_RATE_LIMIT"], key_func=client_address)
def complete_signup_from_stripe() -> Response | tuple[str, int]:
    """Stripe's success URL. Provisions (or finds provisioned) the account; signs the owner in only in
    the browser session that started this signup."""
    try:
        outcome = BillingService.complete_signup_from_redirect(request.args.get("session_id", ""))
    except CheckoutSessionNotFound as exc:
        return render_template("billing/checkout_problem.html", message=str(exc)), 404
    except PaymentProviderUnavailable:
        return _confirming_payment()
    return _signup_returned(outcome)


def _confirming_payment() -> tuple[str, int]:
    """Back from paying while Stripe does not answer: the payment is confirmed by its webhook (the
    worker) or by this page, which checks again every few seconds."""
    return render_template("billing/processing.html", confirming=True), 202


@bp.get("/complete-signup-from-whop")
@limiter.limit(lambda: current_app.config["CHECKOUT_RETURN_RATE_LIMIT"], key_func=client_address)
def complete_signup_from_whop() -> Response | tuple[str, int]:
    """Whop's redirect after payment (`?signup=` is ours, `membership_id` Whop's): as for Stripe."""
    try:
        outcome = BillingService.complete_whop_signup_from_redirect(
            request.args.get("signup", ""), request.args.get("membership_id", "")
        )
    except CheckoutSessionNotFound as exc:
        return render_template("billing/checkout_problem.html", message=str(exc)), 404
    except BillingError as exc:
        return render_template("billing/checkout_problem.html", message=str(exc)), 503
    return _signup_returned(outcome)


def _signup_returned(outcome: ProvisionOutcome, settled: str | None = None) -> Response | tuple[str, int]:
    """The customer is back from paying: sign the owner in, but only in the browser that started it."""
    if outcome.state == ProvisionState.AWAITING_PAYMENT:
        return render_template("billing/processing.html"), 202
    if outcome.state == ProvisionState.CONFLICT:
        message = "This email already has an account, so this payment did not create another one. " + (
            settled or settlement_words(outcome.settlement)
        )
        return render_template("billing/checkout_problem.html", message=message), 409
    new_owner = db.session.get(User, outcome.owner_user_id) if outcome.owner_user_id is not None else None
    if new_owner is not None and take_signup_sign_in(str(outcome.pending_signup_id), new_owner):
        sign_in(new_owner)
        flash("Welcome! Your organization is ready.", "success")
        return redirect(url_for("main.dashboard"), 303)
    if current_user.is_authenticated and current_user.id == outcome.owner_user_id:
        return redirect(url_for("main.dashboard"), 303)
    if current_user.is_authenticated and new_owner is not None:
        # An old success link opened while signed in as someone else: this page is signed in.
        flash(
            f"The account this checkout paid for ({new_owner.email}) is ready. You are signed in as "
            f"{current_user.email}: sign out and sign in as {new_owner.email} to use it.",
            "info",
        )
        return redirect(url_for("main.dashboard"), 303)
    if new_owner is not None and not new_owner.password_hash:
        # Paid through a signup attempt that had already ended, whose password was erased (retention).
        flash("Your account is ready. Choose a password to sign in: we will email you a link.", "info")
        return redirect(url_for("auth.forgot_password"), 303)
    flash("Your account is ready. Sign in to continue.", "info")
    return redirect(url_for("auth.login"), 303)


@bp.post("/webhooks/<provider>")
@csrf.exempt
def webhook(provider: str) -> tuple[Response, int]:
    """Webhook deliveries: the raw body and headers go to BillingService, nothing else happens here."""
    try:
        # The body stays cached for the request: a request run again after a database restart
        # (app/database.py) must see it again.
        result = BillingService.handle_webhook_event(provider, request.get_data(), dict(request.headers))
    except WebhookRejected as exc:
        return jsonify(error=str(exc)), 400
    except UnknownWebhookProvider:
        return jsonify(error="unknown webhook provider"), 404
    return jsonify(result.body), result.status_code
