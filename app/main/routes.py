"""The signed-in app pages, and the health endpoints ops and load balancers use."""

from __future__ import annotations

import hmac

from flask import Blueprint, abort, current_app, jsonify, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import text
from werkzeug.wrappers import Response

from app.access import require_billing_access
from app.extensions import db
from app.features import requires_feature
from app.services.audit_log import entries as audit_log_entries
from app.services.queue_status import prometheus_text, queue_figures

bp = Blueprint("main", __name__)


@bp.get("/")
def index() -> Response:
    return redirect(url_for("main.dashboard" if current_user.is_authenticated else "auth.signup"))


@bp.get("/app")
def dashboard() -> str:
    return render_template("main/dashboard.html", organization=current_user.organization)


@bp.get("/app/audit-log")
@requires_feature("audit_log")
def audit_log() -> str:
    """What happened to the organization (billing and team changes), newest first. The owner's only:
    it shows billing."""
    if not current_user.is_owner:
        abort(403, "Only the organization's owner can read its audit log.")
    entries = audit_log_entries(current_user.organization_id, current_app.extensions["plan_catalogue"])
    return render_template("main/audit_log.html", entries=entries)


# Every page of this blueprint except the health checks and the front door goes through the guard.
@bp.before_request
def guard() -> Response | None:
    if request.endpoint in ("main.index", "main.healthz", "main.readyz", "main.metrics"):
        return None
    return require_billing_access()


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    checks: dict[str, str] = {}
    try:
        db.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
    finally:
        db.session.rollback()
    redis_client = current_app.extensions.get("redis")
    if redis_client is None:
        checks["redis"] = "not configured (development stand-ins)"
    else:
        try:
            redis_client.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"unreachable ({type(exc).__name__})"
    failed = [name for name, result in checks.items() if result.startswith("unreachable")]
    if failed:
        return jsonify(status="unavailable", failed=failed, checks=checks), 503
    return jsonify(status="ready", checks=checks), 200


@bp.get("/metrics")
def metrics() -> Response:
    """The queue's figures for Prometheus, only for "Authorization: Bearer $METRICS_TOKEN" (404 while
    METRICS_TOKEN is unset, 401 for any other caller)."""
    token = str(current_app.config.get("METRICS_TOKEN") or "")
    if not token:
        abort(404)
    offered = request.headers.get("Authorization", "")
    if not hmac.compare_digest(offered.encode(), f"Bearer {token}".encode()):
        return Response("unauthorized\n", status=401, mimetype="text/plain", headers={"WWW-Authenticate": "Bearer"})
    return Response(prometheus_text(queue_figures()), mimetype="text/plain; version=0.0.4; charset=utf-8")
