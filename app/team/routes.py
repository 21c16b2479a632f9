"""Teammates: the team page (everyone sees who is in; the owner invites, revokes and removes) and the
invitation link, reached signed out. Each view parses, calls TeamService, and renders or redirects."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from werkzeug.wrappers import Response

from app.access import recent_auth_required, require_billing_access, sign_in
from app.extensions import client_address, limiter
from app.services.team_service import InvitationInvalid, SeatLimitReached, TeamError, TeamService
from app.team.forms import ActionForm, InviteForm, JoinForm

bp = Blueprint("team", __name__)
PUBLIC_ENDPOINTS = frozenset({"team.join"})


@bp.before_request
def guard() -> Response | None:
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    return require_billing_access()


def _owner_only() -> int:
    if not current_user.is_owner:
        abort(403, "Only the organization's owner can invite or remove teammates.")
    return int(current_user.organization_id)


@bp.get("/")
def index() -> str:
    team = TeamService.team(current_user.organization)
    return render_template(
        "team/index.html",
        team=team,
        invite_form=InviteForm(),
        action_form=ActionForm(),
        organization=current_user.organization,
    )


def _organization_key() -> str:
    return f"invite-organization:{getattr(current_user, 'organization_id', None)}"


@bp.post("/invite")
# Every invitation is an email to an address the owner chose: limited per organization and per client.
@limiter.limit(lambda: current_app.config["INVITATION_RATE_LIMIT_PER_ORGANIZATION"], key_func=_organization_key)
@limiter.limit(lambda: current_app.config["INVITATION_RATE_LIMIT_PER_CLIENT"], key_func=client_address)
def invite() -> Response | tuple[str, int]:
    organization_id = _owner_only()
    form = InviteForm()
    if not form.validate_on_submit():
        team = TeamService.team(current_user.organization)
        return render_template(
            "team/index.html",
            team=team,
            invite_form=form,
            action_form=ActionForm(),
            organization=current_user.organization,
        ), 422
    try:
        sent = TeamService.invite(organization_id, form.email.data, actor_user_id=current_user.id)
    except SeatLimitReached as exc:
        flash(str(exc), "error")
        return redirect(url_for("team.index", seats="full"), 303)
    except TeamError as exc:
        flash(str(exc), "error")
        return redirect(url_for("team.index"), 303)
    # The link goes to the mailbox only: accepting it is what proves the invitee controls the address
    # (the account is made verified from it), so the owner is never shown it.
    flash(f"Invitation sent to {sent.email}.", "success")
    return redirect(url_for("team.index"), 303)


@bp.post("/invitations/<int:invitation_id>/revoke")
def revoke(invitation_id: int) -> Response:
    organization_id = _owner_only()
    if not ActionForm().validate_on_submit():
        abort(400, "That form was incomplete. Reload the team page and try again.")
    try:
        TeamService.revoke(organization_id, invitation_id, actor_user_id=current_user.id)
    except TeamError as exc:
        flash(str(exc), "error")
    else:
        flash("The invitation is withdrawn; its link no longer works.", "success")
    return redirect(url_for("team.index"), 303)


@bp.post("/members/<int:user_id>/remove")
@recent_auth_required
def remove(user_id: int) -> Response:
    organization_id = _owner_only()
    if not ActionForm().validate_on_submit():
        abort(400, "That form was incomplete. Reload the team page and try again.")
    try:
        TeamService.remove_member(organization_id, user_id, actor_user_id=current_user.id)
    except TeamError as exc:
        flash(str(exc), "error")
    else:
        flash("The member is removed and signed out; their seat is free.", "success")
    return redirect(url_for("team.index"), 303)


@bp.route("/join/<secret:token>", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT_PER_CLIENT"], key_func=client_address, methods=["POST"])
def join(token: str) -> Response | str | tuple[str, int]:
    try:
        invitation = TeamService.read_invitation(token)
    except InvitationInvalid as exc:
        return render_template("team/join_problem.html", message=str(exc)), 410
    form = JoinForm(email=invitation.email)
    if request.method == "GET" or not form.validate_on_submit():
        status = 200 if request.method == "GET" else 422
        return render_template("team/join.html", form=form, invitation=invitation), status
    try:
        user = TeamService.accept(token, name=form.name.data, password=form.password.data)
    except SeatLimitReached as exc:
        form.form_errors.append(str(exc))
        return render_template("team/join.html", form=form, invitation=invitation), 409
    except InvitationInvalid as exc:
        return render_template("team/join_problem.html", message=str(exc)), 410
    sign_in(user)
    flash(f"Welcome to {user.organization.name}!", "success")
    return redirect(url_for("main.dashboard"), 303)
