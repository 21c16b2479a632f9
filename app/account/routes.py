"""The signed-in user's account page: email address and its confirmation, password, sessions. Open to
every signed-in user whatever the organization's billing status (fixing one's account never waits on
billing)."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, url_for
from flask_login import current_user
from werkzeug.wrappers import Response

from app.access import require_signed_in, sign_out, stay_signed_in_at
from app.auth.forms import ChangePasswordForm
from app.extensions import limiter
from app.services.account_service import AccountError, AccountService

bp = Blueprint("account", __name__)
bp.before_request(require_signed_in)


def _page(form: ChangePasswordForm | None = None, status: int = 200) -> tuple[str, int]:
    form = form or ChangePasswordForm(email=current_user.email)
    return render_template("account/overview.html", form=form), status


@bp.get("/")
def overview() -> tuple[str, int]:
    return _page()


@bp.post("/password")
@limiter.limit(
    lambda: current_app.config["PASSWORD_CHANGE_RATE_LIMIT"], key_func=lambda: f"password-change:{current_user.id}"
)
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
    flash("Your password is changed. Every other session is signed out.", "success")
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
