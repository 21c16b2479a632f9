"""The feature guard: a decorator for views and a helper for templates, deciding by the organization's
tier (app/services/entitlements.py) and billing status. A page behind a feature the plan lacks shows an
upgrade prompt (HTTP 402 with the plans that include it), never a bare 403."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import Flask, current_app, g, render_template
from flask_login import current_user

from app.services.entitlements import Entitlements, for_organization, upgrade_tiers

F = TypeVar("F", bound=Callable[..., Any])


def current_entitlements() -> Entitlements | None:
    """The signed-in user's organization's entitlements, computed once per request."""
    if not current_user.is_authenticated:
        return None
    if "entitlements" not in g:
        g.entitlements = for_organization(
            current_app.extensions["plan_catalogue"],
            current_user.organization,
            grace_days=current_app.config["PAST_DUE_GRACE_DAYS"],
        )
    return cast(Entitlements, g.entitlements)


def has_feature(feature: str) -> bool:
    entitlements = current_entitlements()
    return entitlements is not None and entitlements.has(feature)


def upgrade_prompt(feature: str) -> tuple[str, int]:
    catalogue = current_app.extensions["plan_catalogue"]
    return (
        render_template(
            "main/upgrade.html",
            feature=feature,
            feature_name=catalogue.features.get(feature, feature),
            tiers=upgrade_tiers(catalogue, feature),
            entitlements=current_entitlements(),
        ),
        402,
    )


def requires_feature(feature: str) -> Callable[[F], F]:
    """A view behind a feature: without it, the upgrade prompt instead of the page. Put it under the
    blueprint's sign-in and billing guard, which decide first."""

    def decorate(view: F) -> F:
        @wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if not has_feature(feature):
                return upgrade_prompt(feature)
            return view(*args, **kwargs)

        return cast(F, guarded)

    return decorate


def init_feature_guard(app: Flask) -> None:
    app.jinja_env.globals["has_feature"] = has_feature
