"""Signup and sign-in pages. They parse and validate, call a service, and render or redirect."""

from __future__ import annotations

from functools import partial

from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from app.access import (
    SECOND_STEP_KEY,
    await_second_factor,
    held_signup_id,
    remember_signup,
    sign_in,
    sign_out,
    user_awaiting_second_factor,
)
from app.account.forms import TwoFactorCodeForm
from app.auth.forms import ForgotPasswordForm, LoginForm, NewPasswordForm, SignupForm, signup_form
from app.errors import error_response, rate_limit_message, retry_after_header
from app.extensions import client_address, db, limiter
from app.models import User
from app.rate_limits import AttemptLimit, limit_attempts
from app.services import free_plan
from app.services.account_service import AccountService, InvalidLink
from app.services.auth_service import AuthService, normalise_email
from app.services.billing_service import BillingError, BillingService, PaymentProviderUnavailable, plan_catalogue
from app.services.checkout_return import CanceledCheckout, ReturnState, canceled_checkout
from app.services.signup_service import ProvisionState, SignupError
from app.services.two_factor_service import TwoFactorError, TwoFactorService

bp = Blueprint("auth", __name__)
SIGNUP_CHOICES_KEY = "signup_choices"


@bp.context_processor
def whop_choice() -> dict[str, object]:
    """The tiers that can be paid through Whop, names and keys (none unless Whop is configured): the
    signup page offers the choice for them and says up front what Whop cannot sell."""
    if not BillingService.whop_configured():
        return {"whop_tiers": [], "whop_tier_keys": []}
    on_whop = [tier for tier in plan_catalogue().tiers.values() if tier.whop_plan_id]
    return {"whop_tiers": [tier.name for tier in on_whop], "whop_tier_keys": [tier.key for tier in on_whop]}


def _form_email() -> str:
    return normalise_email(request.form.get("email", ""))[:254]


def _config_limit(name: str):  # type: ignore[no-untyped-def]
    return lambda: current_app.config[name]


def _signup_page(form: SignupForm) -> str:
    """The signup form with each plan's and add-on's price as Stripe has it (through the price cache);
    yearly billing is offered when Stripe has a yearly price for a tier."""
    prices = BillingService.catalogue_prices()
    catalogue = plan_catalogue()
    yearly = any(tier.yearly_lookup_key in prices for tier in catalogue.tiers.values() if tier.yearly_lookup_key)
    return render_template("auth/signup.html", form=form, catalogue=catalogue, prices=prices, offer_yearly=yearly)


@bp.errorhandler(429)
def rate_limited(error: HTTPException) -> tuple[str | Response, int, dict[str, str]]:
    """A rate limit met while sending a form answers that form again, with what was typed (never a
    password) and how long to wait, instead of a page that loses it."""
    message = rate_limit_message(error)
    headers = retry_after_header(error)
    form: SignupForm | LoginForm | ForgotPasswordForm
    if request.endpoint == "auth.signup_submit":
        form = signup_form(plan_catalogue())
        form.form_errors.append(message)
        return _signup_page(form), 429, headers
    if request.endpoint == "auth.login":
        form = LoginForm()
        form.form_errors.append(message)
        return render_template("auth/login.html", form=form), 429, headers
    if request.endpoint == "auth.forgot_password_submit":
        form = ForgotPasswordForm()
        form.form_errors.append(message)
        return render_template("auth/forgot_password.html", form=form), 429, headers
    body, status = error_response(429, message)
    return body, status, headers


@bp.get("/signup")
def signup() -> str | Response:
    form = signup_form(plan_catalogue())
    if request.args.get("checkout") == "canceled":
        returned = canceled_checkout(_signup_started_here(), BillingService)
        if returned.state in (ReturnState.PROVISIONED, ReturnState.PAID):
            return _paid_checkout_returned(returned)
        pending = returned.pending
        if pending is not None:
            # The pending signup holds who and what; the billing interval and the provider are this
            # browser's choices, kept beside it in the session when the checkout was started.
            choices = session.get(SIGNUP_CHOICES_KEY) or {}
            kept = choices if choices.get("signup_id") == str(pending.id) else {}
            form.process(
                data={
                    "email": pending.email,
                    "organization_name": pending.organization_name,
                    "owner_name": pending.owner_name,
                    "tier": pending.tier,
                    "interval": kept.get("interval", "month"),
                    "payment_provider": kept.get("provider", "stripe"),
                    **{f"addon_{key}": quantity for key, quantity in (pending.addons or {}).items()},
                }
            )
        if returned.state == ReturnState.UNKNOWN:
            flash(
                "Checkout was left, and we could not ask our payment provider just now whether it was paid. If you "
                "paid, do not pay again: your account is made automatically, so sign in again in a few minutes. "
                "Your details are kept.",
                "info",
            )
        else:
            flash(
                "Checkout was canceled and nothing was charged. Your details are kept: continue when you are ready.",
                "info",
            )
    elif request.args.get("plan") in plan_catalogue().tiers:
        form.tier.data = request.args["plan"]
    return _signup_page(form)


def _signup_started_here() -> str | None:
    """The signup this browser started: held until its success page signs the owner in, and named
    beside the browser's choices afterwards (a customer may come back to Checkout after paying)."""
    held = held_signup_id()
    if held:
        return held
    choices = session.get(SIGNUP_CHOICES_KEY)
    return str(choices["signup_id"]) if isinstance(choices, dict) and choices.get("signup_id") else None


def _paid_checkout_returned(returned: CanceledCheckout) -> Response:
    """ "Cancel and return" followed from a checkout that was already paid (Back after paying): nothing
    was canceled; say so, and send the customer where the account is."""
    pending = returned.pending
    assert pending is not None
    if current_user.is_authenticated and pending.organization_id is not None:
        if current_user.organization_id == pending.organization_id:
            flash(
                f"This checkout was already paid, so nothing was canceled: {pending.organization_name} is "
                "subscribed. Your billing page shows the plan and its invoices.",
                "info",
            )
            return redirect(url_for("billing.overview"), 303)
        flash(
            f"This checkout was already paid, so nothing was canceled: the account for {pending.email} is ready. "
            f"You are signed in as {current_user.email}; sign out and sign in as {pending.email} to use it.",
            "info",
        )
        return redirect(url_for("main.dashboard"), 303)
    # The success page makes the account if it is not made yet, and signs in the browser that started it.
    flash("This checkout was already completed, so nothing was canceled.", "info")
    return redirect(url_for("billing.complete_signup_from_stripe", session_id=returned.checkout_session_id), 303)


@bp.post("/signup")
@limiter.limit(_config_limit("SIGNUP_RATE_LIMIT_PER_CLIENT"), key_func=client_address)
@limiter.limit(
    _config_limit("SIGNUP_RATE_LIMIT_PER_EMAIL"),
    key_func=lambda: f"signup-email:{_form_email()}",
    exempt_when=lambda: not _form_email(),
)
def signup_submit() -> Response | tuple[str, int]:
    catalogue = plan_catalogue()
    form = signup_form(catalogue)
    if not form.validate_on_submit():
        return _signup_page(form), 422
    if form.tier.data == form.free_tier_key:
        return _free_signup(form)
    start_checkout = (
        BillingService.create_whop_checkout_for_tier
        if form.provider() == "whop"
        # The same form sent again from this browser (a double click, Back and submit) resumes its checkout.
        else partial(BillingService.create_checkout_session_for_tier, resume_signup_id=held_signup_id())
    )
    try:
        checkout = start_checkout(
            form.tier.data,
            email=form.email.data,
            organization_name=form.organization_name.data,
            owner_name=form.owner_name.data,
            password=form.password.data,
            addons=form.addon_quantities(),
            interval=form.interval.data or "month",
        )
    except (SignupError, BillingError) as exc:
        form.form_errors.append(str(exc))
        status = 503 if isinstance(exc, PaymentProviderUnavailable) else 422
        return _signup_page(form), status
    # Only this browser session may be signed in by the success page of this checkout.
    remember_signup(str(checkout.pending_signup_id))
    session[SIGNUP_CHOICES_KEY] = {
        "signup_id": str(checkout.pending_signup_id),
        "interval": form.interval.data or "month",
        "provider": form.provider(),
    }
    return redirect(checkout.url, 303)


def _free_signup(form: SignupForm) -> Response | tuple[str, int]:
    """The free plan: the organization is created at once (free_plan.py), no checkout; the new owner
    is signed in. An email that already has an account gets none; its mailbox is told, as for a paid
    signup, and the page says to sign in."""
    try:
        outcome = free_plan.sign_up(
            email=form.email.data,
            organization_name=form.organization_name.data,
            owner_name=form.owner_name.data,
            password=form.password.data,
            tier=plan_catalogue().tiers[form.tier.data],
        )
    except SignupError as exc:
        form.form_errors.append(str(exc))
        return _signup_page(form), 422
    owner = db.session.get(User, outcome.owner_user_id) if outcome.owner_user_id is not None else None
    if outcome.state != ProvisionState.PROVISIONED or owner is None:
        flash("This email already has an account: sign in to it, or use another email.", "info")
        return redirect(url_for("auth.login"), 303)
    sign_in(owner)
    flash("Welcome! Your organization is ready on the free plan.", "success")
    return redirect(url_for("main.dashboard"), 303)


@bp.route("/login", methods=["GET", "POST"])
# Failed sign-ins (401s) only count, and never per account alone: a limit on an account that anyone can
# exhaust from anywhere would let an attacker lock its owner out. Per client address, and per account
# and client address together, so failures from other addresses never stop the owner's right password.
# Each attempt takes its place before the password is checked (app/rate_limits.py): a parallel burst
# gets no more guesses than the limit.
@limit_attempts(
    AttemptLimit("LOGIN_RATE_LIMIT_PER_CLIENT", lambda: f"login-client:{client_address()}"),
    AttemptLimit(
        "LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT",
        lambda: f"login-account-client:{email}:{client_address()}" if (email := _form_email()) else None,
    ),
    counts=lambda response: response.status_code == 401,
)
def login() -> Response | str | tuple[str, int]:
    if current_user.is_authenticated:
        return redirect(url_for("main.dashboard"))
    form = LoginForm()
    if request.method == "GET":
        return render_template("auth/login.html", form=form)
    if not form.validate_on_submit():
        return render_template("auth/login.html", form=form), 422
    user = AuthService.authenticate(form.email.data, form.password.data)
    if user is None:
        # The same words whether or not the email has an account.
        form.form_errors.append("That email and password do not match an account.")
        return render_template("auth/login.html", form=form), 401
    if user.two_factor_enabled:
        await_second_factor(user)
        return redirect(url_for("auth.second_factor"), 303)
    sign_in(user)
    # Never a redirect target taken from the request: always the app's front page.
    return redirect(url_for("main.dashboard"), 303)


def _second_step_user_key() -> str:
    pending = session.get(SECOND_STEP_KEY)
    return f"two-factor:{pending.get('user') if isinstance(pending, dict) else 'none'}"


@bp.route("/two-factor", methods=["GET", "POST"])
# Wrong codes count per account (whoever tries: they already have the password) and per client address.
@limiter.limit(
    _config_limit("TWO_FACTOR_RATE_LIMIT"),
    key_func=_second_step_user_key,
    methods=["POST"],
    deduct_when=lambda response: response.status_code == 401,
)
@limiter.limit(
    _config_limit("LOGIN_RATE_LIMIT_PER_CLIENT"),
    key_func=client_address,
    methods=["POST"],
    deduct_when=lambda response: response.status_code == 401,
)
def second_factor() -> Response | str | tuple[str, int]:
    """Sign-in's second step: a code from the authenticator app, or a recovery code."""
    user = user_awaiting_second_factor()
    if user is None:
        flash("Sign in again: the code must follow the password within five minutes.", "info")
        return redirect(url_for("auth.login"), 303)
    form = TwoFactorCodeForm()
    if request.method == "GET":
        return render_template("auth/two_factor.html", form=form)
    if not form.validate_on_submit():
        return render_template("auth/two_factor.html", form=form), 422
    try:
        kind = TwoFactorService.verify(user, form.code.data)
    except TwoFactorError as exc:
        form.code.errors = [*form.code.errors, str(exc)]
        return render_template("auth/two_factor.html", form=form), 401
    sign_in(user)
    if kind == "recovery_code":
        left = TwoFactorService.recovery_codes_left(user)
        flash(
            f"You signed in with a recovery code; it cannot be used again. {left} left: make new ones from "
            "your account page if you are running low.",
            "warning",
        )
    return redirect(url_for("main.dashboard"), 303)


@bp.post("/logout")
def logout() -> Response:
    sign_out()
    return redirect(url_for("auth.login"), 303)


# --- Forgotten passwords and email links ----------------------------------------------------------


@bp.get("/forgot-password")
def forgot_password() -> str:
    return render_template("auth/forgot_password.html", form=ForgotPasswordForm())


@bp.post("/forgot-password")
@limiter.limit(_config_limit("PASSWORD_RESET_RATE_LIMIT_PER_CLIENT"), key_func=client_address)
@limiter.limit(
    _config_limit("PASSWORD_RESET_RATE_LIMIT_PER_EMAIL"),
    key_func=lambda: f"password-reset-email:{_form_email()}",
    exempt_when=lambda: not _form_email(),
)
def forgot_password_submit() -> str | tuple[str, int]:
    form = ForgotPasswordForm()
    if not form.validate_on_submit():
        return render_template("auth/forgot_password.html", form=form), 422
    AccountService.request_password_reset(form.email.data)
    # The same page whether or not the address has an account; the worker sends the link.
    return render_template("auth/reset_requested.html", email=normalise_email(form.email.data))


@bp.route("/reset-password/<secret:token>", methods=["GET", "POST"])
def reset_password(token: str) -> Response | str | tuple[str, int]:
    try:
        user = AccountService.user_for_reset_token(token)
    except InvalidLink as exc:
        return render_template(
            "auth/link_problem.html", message=str(exc), retry_url=url_for("auth.forgot_password")
        ), 400
    form = NewPasswordForm(email=user.email)
    if request.method == "GET":
        return render_template("auth/reset_password.html", form=form, token=token)
    if not form.validate_on_submit():
        return render_template("auth/reset_password.html", form=form, token=token), 422
    try:
        AccountService.reset_password(token, form.password.data)
    except InvalidLink as exc:
        return render_template(
            "auth/link_problem.html", message=str(exc), retry_url=url_for("auth.forgot_password")
        ), 400
    flash("Your password is changed and every session is signed out. Sign in with the new password.", "success")
    return redirect(url_for("auth.login"), 303)


@bp.get("/change-email/<secret:token>")
def change_email(token: str) -> Response | tuple[str, int]:
    """The link sent to the new address (AccountService.change_email); open signed in or not."""
    try:
        user = AccountService.change_email(token)
    except InvalidLink as exc:
        return render_template("auth/link_problem.html", message=str(exc), retry_url=url_for("account.overview")), 400
    flash(f"Your email address is now {user.email}. Sign in with it from now on.", "success")
    return redirect(url_for("main.dashboard" if current_user.is_authenticated else "auth.login"), 303)


@bp.get("/verify-email/<secret:token>")
def verify_email(token: str) -> Response | tuple[str, int]:
    try:
        AccountService.verify_email(token)
    except InvalidLink as exc:
        return render_template("auth/link_problem.html", message=str(exc), retry_url=url_for("account.overview")), 400
    flash("Your email address is confirmed. Thank you.", "success")
    return redirect(url_for("main.dashboard" if current_user.is_authenticated else "auth.login"), 303)
