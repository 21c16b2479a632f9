"""The owner's API keys page (/api-keys/): create a named key (shown once), see each key's prefix,
creation and last use, revoke one. Each view parses, calls app/services/api_keys.py, and renders."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, url_for
from flask_login import current_user
from werkzeug.wrappers import Response

from app.access import recent_auth_required, require_billing_access
from app.api.forms import ActionForm, NewKeyForm
from app.services import api_keys

bp = Blueprint("api_keys", __name__)


@bp.before_request
def guard() -> Response | None:
    if (response := require_billing_access()) is not None:
        return response
    if not current_user.is_owner:
        abort(403, "Only the organization's owner manages API keys.")
    return None


def _page(form: NewKeyForm, new_key: api_keys.NewApiKey | None = None, status: int = 200) -> tuple[str, int]:
    organization_id = int(current_user.organization_id)
    return render_template(
        "api_keys/index.html",
        keys=api_keys.keys(organization_id),
        form=form,
        action_form=ActionForm(),
        new_key=new_key,
    ), status


@bp.get("/")
def index() -> tuple[str, int]:
    return _page(NewKeyForm())


@bp.post("/")
@recent_auth_required
def create() -> tuple[str, int]:
    form = NewKeyForm()
    if not form.validate_on_submit():
        return _page(form, status=422)
    try:
        organization_id = int(current_user.organization_id)
        new_key = api_keys.create(organization_id, form.name.data or "", actor_user_id=current_user.id)
    except api_keys.ApiKeyError as exc:
        flash(str(exc), "error")
        return _page(form, status=422)
    # The key is rendered into this response only: never stored, never put in the session.
    return _page(NewKeyForm(formdata=None), new_key=new_key, status=201)


@bp.post("/<int:key_id>/revoke")
def revoke(key_id: int) -> Response:
    if not ActionForm().validate_on_submit():
        abort(400, "The form expired. Try again.")
    try:
        key = api_keys.revoke(int(current_user.organization_id), key_id, actor_user_id=current_user.id)
    except api_keys.ApiKeyError as exc:
        abort(404, str(exc))
    flash(f"The key “{key.name}” is revoked: requests with it are refused from now on.", "success")
    return redirect(url_for("api_keys.index"), 303)
