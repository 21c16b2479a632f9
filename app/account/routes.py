"""The signed-in user's account page: email address and its confirmation, password, two-factor sign-in,
sessions, and confirming it's them before a sensitive action. Open to every signed-in user whatever the
organization's billing status (fixing one's account never waits on billing)."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, make_response, redirect, render_template, request, session, url_for
from flask_login import current_user
from werkzeug.wrappers import Response

from app.access import (
    mark_recently_authenticated,
    recent_auth_required,
    require_signed_in,
    safe_next_path,
    sign_out,
    stay_signed_in_at,
)
from app.account.forms import ActionForm, ChangeEmailForm, ConfirmAccessForm, RequireTwoFactorForm, TwoFactorCodeForm
from app.auth.forms import ChangePasswordForm
from app.extensions import limiter
from app.services.account_service import AccountError, AccountService
from app.services.auth_service import AuthService
from app.services.two_factor_service import TwoFactorError, TwoFactorService

bp = Blueprint("account", __name__)
bp.before_request(require_signed_in)

# The secret being enrolled, kept in the (server-side) session until a code confirms it.
ENROLMENT_SECRET_KEY = "_totp_enrolment_secret"  # noqa: S105 (a session key, not a secret)


def _page(
    form: ChangePasswordForm | None = None, status: int = 200, *, email_form: ChangeEmailForm | None = None
) -> tuple[str, int]:
    form = form or ChangePasswordForm(email=current_user.email)
    return render_template(
        "account/overview.html",
        form=form,
        email_form=email_form or ChangeEmailForm(),
        action_form=ActionForm(),
        require_form=RequireTwoFactorForm(required=current_user.organization.require_two_factor),
    ), status


@bp.get("/")
def overview() -> tuple[str, int]:
    return _page()


@bp.post("/password")
@limiter.limit(
    lambda: current_app.config["PASSWORD_CHANGE_RATE_LIMIT"], key_func=lambda: f"password-change:{current_user.id}"
)
@recent_auth_required
def change_password() -> Response | tuple[str, int]:
    form = ChangePasswordForm(email=current_user.email)
    if not form.validate_on_submit():
        return _page(form, 422)
    try:
        epoch = AccountService.change_password(current_user, form.current_password.data, form.password.data)
    except AccountError as exc:
        form.current_password.errors = [*form.current_password.errors, str(exc)]
        return _page(form, 422)
    stay_signed_in_at(epoch)
    mark_recently_authenticated()
    flash("Your password is changed. Every other session is signed out.", "success")
    return redirect(url_for("account.overview"), 303)


@bp.post("/email")
@limiter.limit(
    lambda: current_app.config["EMAIL_CHANGE_RATE_LIMIT"], key_func=lambda: f"email-change:{current_user.id}"
)
@recent_auth_required
def change_email() -> Response | tuple[str, int]:
    form = ChangeEmailForm()
    if not form.validate_on_submit():
        return _page(status=422, email_form=form)
    try:
        new_email = AccountService.request_email_change(
            current_user, form.new_email.data, source=f"user:{current_user.id}"
        )
    except AccountError as exc:
        form.new_email.errors = [*form.new_email.errors, str(exc)]
        return _page(status=422, email_form=form)
    flash(
        f"We sent a link to {new_email}. Your address changes when you open it; until then it stays "
        f"{current_user.email}.",
        "info",
    )
    return redirect(url_for("account.overview"), 303)


@bp.post("/sign-out-everywhere")
def sign_out_everywhere() -> Response:
    AccountService.sign_out_everywhere(current_user, source=f"user:{current_user.id}")
    sign_out("You are signed out on every device, this one included.")
    return redirect(url_for("auth.login"), 303)


@bp.post("/verify-email")
@limiter.limit(
    lambda: current_app.config["EMAIL_VERIFICATION_RATE_LIMIT"], key_func=lambda: f"verify-email:{current_user.id}"
)
def resend_verification() -> Response:
    if current_user.email_verified:
        flash("Your email address is already confirmed.", "info")
    else:
        AccountService.request_email_verification(current_user, source=f"user:{current_user.id}")
        flash(f"We sent a new confirmation link to {current_user.email}.", "info")
    return redirect(url_for("account.overview"), 303)


# --- Two-factor sign-in --------------------------------------------------------------------------------


def _not_stored(page: str, status: int = 200) -> Response:
    """A page showing a secret or recovery codes: never kept by the browser or a proxy."""
    response = make_response(page, status)
    response.headers["Cache-Control"] = "no-store"
    return response


def _two_factor_page(form: TwoFactorCodeForm | None = None, status: int = 200) -> Response | tuple[str, int]:
    if current_user.two_factor_enabled:
        return render_template(
            "account/two_factor.html",
            enrolment=None,
            codes_left=TwoFactorService.recovery_codes_left(current_user),
            action_form=ActionForm(),
        ), status
    enrolment = TwoFactorService.new_enrolment(current_user, session.get(ENROLMENT_SECRET_KEY))
    session[ENROLMENT_SECRET_KEY] = enrolment.secret
    page = render_template(
        "account/two_factor.html", enrolment=enrolment, form=form or TwoFactorCodeForm(), action_form=ActionForm()
    )
    return _not_stored(page, status)


@bp.get("/two-factor")
def two_factor() -> Response | tuple[str, int]:
    """Set up two-factor sign-in (QR code, the secret as text, a code to confirm), or manage it."""
    return _two_factor_page()


@bp.post("/two-factor")
def enable_two_factor() -> Response | tuple[str, int]:
    form = TwoFactorCodeForm()
    secret = session.get(ENROLMENT_SECRET_KEY)
    if current_user.two_factor_enabled or not secret:
        return redirect(url_for("account.two_factor"), 303)
    if not form.validate_on_submit():
        return _two_factor_page(form, 422)
    try:
        codes = TwoFactorService.enable(current_user, secret, form.code.data)
    except TwoFactorError as exc:
        form.code.errors = [*form.code.errors, str(exc)]
        return _two_factor_page(form, 422)
    session.pop(ENROLMENT_SECRET_KEY, None)
    mark_recently_authenticated()  # a code from the app was just given
    flash("Two-factor sign-in is on. From now on, signing in asks for a code from your app.", "success")
    return _not_stored(render_template("account/recovery_codes.html", codes=codes))


@bp.post("/two-factor/recovery-codes")
@recent_auth_required
def new_recovery_codes() -> Response | tuple[str, int]:
    if not ActionForm().validate_on_submit():
        return redirect(url_for("account.two_factor"), 303)
    try:
        codes = TwoFactorService.regenerate_recovery_codes(current_user)
    except TwoFactorError as exc:
        flash(str(exc), "error")
        return redirect(url_for("account.two_factor"), 303)
    flash("New recovery codes are made; the old ones no longer work.", "success")
    return _not_stored(render_template("account/recovery_codes.html", codes=codes))


@bp.post("/two-factor/disable")
@recent_auth_required
def disable_two_factor() -> Response:
    if not ActionForm().validate_on_submit():
        return redirect(url_for("account.two_factor"), 303)
    try:
        TwoFactorService.disable(current_user)
    except TwoFactorError as exc:
        flash(str(exc), "error")
    else:
        flash("Two-factor sign-in is off. Your password alone signs you in.", "success")
    return redirect(url_for("account.two_factor"), 303)


@bp.post("/two-factor/requirement")
@recent_auth_required
def require_two_factor() -> Response:
    """The owner requires two-factor sign-in of every member of the organization (or stops)."""
    form = RequireTwoFactorForm()
    if not current_user.is_owner or not form.validate_on_submit():
        flash("Only the organization's owner can decide this.", "error")
        return redirect(url_for("account.overview"), 303)
    try:
        TwoFactorService.set_required(current_user, bool(form.required.data))
    except TwoFactorError as exc:
        flash(str(exc), "error")
    else:
        flash(
            "Every member now signs in with two factors; those without it set it up at their next page."
            if form.required.data
            else "Two-factor sign-in is no longer required of members.",
            "success",
        )
    return redirect(url_for("account.overview"), 303)


# --- Confirm it's you (recent authentication) ----------------------------------------------------------


def _next_path() -> str:
    return safe_next_path(request.args.get("next")) or url_for("account.overview")


@bp.route("/confirm-access", methods=["GET", "POST"])
@limiter.limit(
    lambda: current_app.config["REAUTH_RATE_LIMIT"],
    key_func=lambda: f"reauth:{current_user.id}",
    methods=["POST"],
    deduct_when=lambda response: response.status_code == 401,
)
def confirm_access() -> Response | tuple[str, int]:
    form = ConfirmAccessForm()
    page = "account/confirm_access.html"
    if request.method == "GET" or not form.validate_on_submit():
        return render_template(page, form=form, next=_next_path()), (200 if request.method == "GET" else 422)
    if form.password.data:
        proved = AuthService.check_password(current_user, form.password.data)
        if not proved:
            form.password.errors = [*form.password.errors, "That is not your password."]
    elif form.code.data and current_user.two_factor_enabled:
        try:
            TwoFactorService.verify(current_user, form.code.data)
            proved = True
        except TwoFactorError as exc:
            form.code.errors = [*form.code.errors, str(exc)]
            proved = False
    else:
        form.form_errors.append("Type your password" + (" or a code." if current_user.two_factor_enabled else "."))
        return render_template(page, form=form, next=_next_path()), 422
    if not proved:
        return render_template(page, form=form, next=_next_path()), 401
    mark_recently_authenticated()
    return redirect(_next_path(), 303)
