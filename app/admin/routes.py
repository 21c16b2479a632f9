"""The operations console's pages, for staff only: every route answers 404 to anyone else (signed out,
a customer, staff without two-factor sign-in), so the console's existence is not revealed. Each view
parses, calls a service (BillingService for anything about billing), and renders or redirects."""

from __future__ import annotations

from decimal import Decimal

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from werkzeug.wrappers import Response

from app.access import recent_auth_required
from app.admin import view_as
from app.admin.forms import SearchForm, StaffActionForm, ViewAsForm
from app.extensions import csrf
from app.services import staff_access, staff_audit, staff_console
from app.services.billing_service import BillingService
from app.services.staff_actions import ACTIONS, StaffActionRefused, StaffRequest
from app.services.two_factor_service import TwoFactorError, TwoFactorService

bp = Blueprint("admin", __name__)


@bp.before_app_request
def read_only_while_viewing_as_owner() -> None:
    view_as.refuse_writes_while_viewing()


@bp.before_request
def staff_only() -> None:
    if request.endpoint == "admin.stop_viewing":
        return  # reached while the session shows the owner; it checks the session itself
    if not (current_user.is_authenticated and staff_access.console_allowed(current_user)):
        abort(404)
    if request.method == "POST":
        csrf.protect()  # after the staff check: to anyone else a console form is a 404 like the rest


csrf.exempt(bp)  # only from the app-wide check, which would answer 400 before the 404 above


@bp.after_request
def never_cached(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/")
def index() -> str:
    form = SearchForm(request.args)
    term = (form.q.data or "").strip() if form.validate() else ""
    hits = staff_console.search(term) if term else []
    return render_template("admin/index.html", form=form, term=term, hits=hits)


@bp.get("/organizations/<int:organization_id>")
def organization(organization_id: int) -> str:
    view = BillingService.staff_organization(organization_id)
    if view is None:
        abort(404)
    return render_template(
        "admin/organization.html",
        view=view,
        actions=ACTIONS,
        audit=staff_audit.entries(organization_id),
        resync_jobs=staff_console.resync_jobs(organization_id, limit=10),
    )


@bp.route("/organizations/<int:organization_id>/actions/<action>", methods=["GET", "POST"])
@recent_auth_required
def action(organization_id: int, action: str) -> Response | tuple[str, int] | str:
    chosen = ACTIONS.get(action)
    if chosen is None:
        abort(404)
    form = StaffActionForm(target=request.args.get("target"))
    page = {"organization_id": organization_id, "action": action, "chosen": chosen, "form": form}
    if request.method == "GET":
        return render_template("admin/action.html", **page)
    if not form.validate_on_submit():
        return render_template("admin/action.html", **page), 422
    if chosen.moves_money:
        try:
            TwoFactorService.verify(current_user, form.code.data or "")
        except TwoFactorError as exc:
            form.code.errors = [*form.code.errors, f"This action moves money: type a current code. {exc}"]
            return render_template("admin/action.html", **page), 401
    amount = int(Decimal(form.amount.data) * 100) if action == "refund" and form.amount.data else None
    try:
        outcome = BillingService.staff_action(
            StaffRequest(
                action=action,
                organization_id=organization_id,
                staff_user_id=int(current_user.id),
                reason=form.reason.data or "",
                request_token=form.request_token.data or "",
                target=(form.coupon.data if action == "apply_coupon" else form.target.data) or None,
                amount=amount,
                days=int(form.days.data) if action == "extend_trial" and form.days.data else None,
            )
        )
    except StaffActionRefused as exc:
        form.form_errors.append(str(exc))
        return render_template("admin/action.html", **page), 409
    flash(outcome.message, "info" if outcome.repeated else "success")
    return redirect(url_for("admin.organization", organization_id=organization_id), 303)


@bp.get("/queue")
def queue() -> str:
    view = staff_console.queue_view(request.args.get("provider", "stripe"), request.args.get("status", "failed"))
    return render_template("admin/queue.html", view=view, resync_jobs=staff_console.resync_jobs())


@bp.get("/audit")
def audit() -> str:
    return render_template("admin/audit.html", entries=staff_audit.entries())


@bp.route("/organizations/<int:organization_id>/view-as-owner", methods=["GET", "POST"])
@recent_auth_required
def view_as_owner(organization_id: int) -> Response | tuple[str, int] | str:
    form = ViewAsForm()
    if request.method == "GET" or not form.validate_on_submit():
        status = 200 if request.method == "GET" else 422
        return render_template("admin/view_as.html", form=form, organization_id=organization_id), status
    try:
        owner = staff_access.start_viewing_as_owner(current_user, organization_id, reason=form.reason.data or "")
    except staff_access.StaffGrantRefused as exc:
        form.form_errors.append(str(exc))
        return render_template("admin/view_as.html", form=form, organization_id=organization_id), 409
    view_as.begin(current_user, owner)
    flash(f"You are viewing as {owner.email}, read-only, for {view_as.VIEW_AS_SECONDS // 60} minutes.", "info")
    return redirect(url_for("main.dashboard"), 303)


@bp.post("/view-as/stop")
def stop_viewing() -> Response:
    if not view_as.viewing():
        abort(404)  # like every console route, to anyone not viewing as an owner
    csrf.protect()
    held = view_as.end()
    if held is None:
        abort(404)
    staff_access.stop_viewing_as_owner(int(held["staff"]), int(held["organization"]), int(held["owner"]))
    return redirect(url_for("admin.organization", organization_id=int(held["organization"])), 303)
