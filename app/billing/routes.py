"""Billing pages and endpoints. Each parses the request, calls BillingService, and renders or
redirects; who may do what is decided here (owner only) and what it does is decided there."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, current_app, flash, g, jsonify, redirect, render_template, request, session, url_for
from flask_login import current_user
from werkzeug.wrappers import Response

from app.access import current_access, require_signed_in, sign_in
from app.billing.forms import CancelForm, PortalForm, ResumeForm, resubscribe_form
from app.extensions import client_address, csrf, db, limiter
from app.models import Organization, User
from app.services.billing_service import (
    BillingError,
    BillingService,
    CheckoutSessionNotFound,
    UnknownWebhookProvider,
    WebhookRejected,
    plan_catalogue,
)
from app.services.signup_service import ProvisionState
from app.templating import money

bp = Blueprint("billing", __name__)
# Reached without a session: Stripe's webhooks (signed) and its success URL (which finds the browser
# that started the signup itself). Every other billing page needs a signed-in user.
PUBLIC_ENDPOINTS = frozenset({"billing.webhook", "billing.complete_signup_from_stripe"})


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
def overview() -> str:
    organization = current_user.organization
    catalogue = plan_catalogue()
    g.access = current_access()
    return render_template(
        "billing/overview.html",
        organization=organization,
        catalogue=catalogue,
        access=g.access,
        portal_form=PortalForm(),
        cancel_form=CancelForm(),
        resume_form=ResumeForm(),
        resubscribe_form=resubscribe_form(catalogue),
    )


@bp.post("/portal")
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
def cancel() -> Response:
    organization_id = _owned_organization().id
    form = CancelForm()
    if not form.validate_on_submit():
        abort(400, "That form was incomplete. Reload the billing page and try again.")
    at_period_end = form.when.data != "now"
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
    if outcome.state == ProvisionState.AWAITING_PAYMENT:
        return render_template("billing/processing.html"), 202
    if outcome.state == ProvisionState.CONFLICT:
        message = "This email already has an account, so this payment did not create another one. " + settlement_words(
            outcome.settlement
        )
        return render_template("billing/checkout_problem.html", message=message), 409
    if session.get("signup_id") == str(outcome.pending_signup_id) and outcome.owner_user_id is not None:
        session.pop("signup_id")
        sign_in(db.session.get_one(User, outcome.owner_user_id))
        flash("Welcome! Your organization is ready.", "success")
        return redirect(url_for("main.dashboard"), 303)
    if current_user.is_authenticated and current_user.id == outcome.owner_user_id:
        return redirect(url_for("main.dashboard"), 303)
    owner = db.session.get(User, outcome.owner_user_id) if outcome.owner_user_id is not None else None
    if owner is not None and not owner.password_hash:
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
