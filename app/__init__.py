"""The application factory: the only way an app is made."""

from __future__ import annotations

import logging
from typing import Any

from cachelib import FileSystemCache
from flask import Flask
from redis import Redis
from werkzeug.middleware.proxy_fix import ProxyFix

from app.database import ResilientFlask, close_session_despite_a_dead_connection, install_connect_retry
from app.extensions import cache, csrf, db, limiter, login_manager, mail, migrate, server_session
from app.machine_routes import MachineRoutes
from app.services import password_policy
from app.services.plans import PlanCatalogue
from app.startup import check_production_settings, development_standins, production_warnings
from config import PROJECT_ROOT, BaseConfig, config_for

logger = logging.getLogger(__name__)
REDIS_TIMEOUTS = {"socket_connect_timeout": 2, "socket_timeout": 2}


def create_app(config: BaseConfig | None = None, **overrides: Any) -> Flask:
    """Build the app for ``config`` (default: the class APP_ENV names), with ``overrides`` on top."""
    app = ResilientFlask(__name__)
    app.config.from_object(config or config_for())
    app.config.update(overrides)

    from app.request_log import SecretConverter, configure_logging

    configure_logging(app)
    # Route arguments that are credentials are declared <secret:...>; the request log masks them.
    app.url_map.converters["secret"] = SecretConverter
    if app.config["APP_ENV"] == "production":
        check_production_settings(app.config)  # raises, naming every problem, before anything starts
        for warning in production_warnings(app.config):
            logger.warning("Insecure production setting: %s", warning)
    app.extensions["plan_catalogue"] = PlanCatalogue.load(app.config["PLAN_CATALOGUE_FILE"])
    password_policy.common_passwords()  # the common-password list, read once per process, before any request

    register_extensions(app)
    register_blueprints(app)
    register_request_hooks(app)
    register_error_handlers(app)
    register_commands(app)
    register_services()

    standins = development_standins(app.config)
    if standins:
        logger.warning("Development stand-ins in use: %s. Production never accepts them.", "; ".join(standins))
    return app


def register_extensions(app: Flask) -> None:
    redis_url = app.config.get("REDIS_URL")
    app.extensions["redis"] = (
        Redis.from_url(redis_url, health_check_interval=30, **REDIS_TIMEOUTS) if redis_url else None
    )
    if app.config["SESSION_TYPE"] == "redis":
        app.config["SESSION_REDIS"] = app.extensions["redis"]
    elif app.config["SESSION_TYPE"] == "cachelib":
        app.config["SESSION_CACHELIB"] = FileSystemCache(app.config["SESSION_FILE_DIR"], threshold=5000)
    app.config.setdefault("CACHE_OPTIONS", REDIS_TIMEOUTS if app.config["CACHE_TYPE"] == "RedisCache" else {})
    if str(app.config.get("RATELIMIT_STORAGE_URI", "")).startswith("redis"):
        app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", REDIS_TIMEOUTS)

    db.init_app(app)
    with app.app_context():
        for engine in db.engines.values():
            install_connect_retry(engine, app.config["DATABASE_CONNECT_RETRY_SECONDS"])
    # Runs before Flask-SQLAlchemy's own teardown (teardowns run in reverse order), which then finds
    # nothing left to close.
    app.teardown_appcontext(close_session_despite_a_dead_connection)
    migrate.init_app(app, db, directory=str(PROJECT_ROOT / "migrations"))
    server_session.init_app(app)
    cache.init_app(app)
    limiter.init_app(app)
    csrf.init_app(app)
    mail.init_app(app)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Sign in to continue."
    login_manager.login_message_category = "info"
    login_manager.session_protection = "basic"

    from app import machine_entry

    machine_entry.install(app)  # webhooks and usage requests skip Flask's request machinery (app/machine_entry.py)
    if app.config["TRUSTED_PROXY_COUNT"]:
        hops = app.config["TRUSTED_PROXY_COUNT"]
        # Before anything keyed on the client's address (rate limits, logs). X-Forwarded-Host is not
        # trusted: absolute URLs come from APP_BASE_URL, and a client-chosen host helps nobody.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]


def register_blueprints(app: Flask) -> None:
    from app.account.routes import bp as account_bp
    from app.admin.routes import bp as admin_bp
    from app.api.keys import bp as api_keys_bp
    from app.api.routes import bp as api_bp
    from app.auth.routes import bp as auth_bp
    from app.billing.routes import bp as billing_bp
    from app.main.routes import bp as main_bp
    from app.team.routes import bp as team_bp

    app.register_blueprint(main_bp)
    app.register_blueprint(auth_bp, url_prefix="/auth")
    app.register_blueprint(account_bp, url_prefix="/account")
    app.register_blueprint(billing_bp, url_prefix="/billing")
    app.register_blueprint(team_bp, url_prefix="/team")
    app.register_blueprint(admin_bp, url_prefix="/admin")
    app.register_blueprint(api_keys_bp, url_prefix="/api-keys")
    app.register_blueprint(api_bp, url_prefix="/api/v1")


# Machine routes (app/machine_routes.py): signed provider webhooks and the usage API (an API key in
# each request), served without session, CSRF, rate-limit, sign-in or template machinery.
MACHINE_ENDPOINTS = frozenset({"billing.webhook", "api.record_usage"})
MACHINE_PATH_PREFIXES = ("/billing/webhooks/", "/api/v1/")


def register_request_hooks(app: Flask) -> None:
    if isinstance(app, MachineRoutes):
        app.machine_endpoints = MACHINE_ENDPOINTS
        app.machine_path_prefixes = MACHINE_PATH_PREFIXES
    from app.features import init_feature_guard
    from app.request_log import init_request_logging
    from app.security import init_security_headers
    from app.templating import init_templating

    init_request_logging(app)
    init_feature_guard(app)
    init_security_headers(app)
    init_templating(app)


def register_error_handlers(app: Flask) -> None:
    from app.errors import init_error_handlers

    init_error_handlers(app)


def register_commands(app: Flask) -> None:
    from app.admin.cli import users_cli
    from app.cli import billing_cli

    app.cli.add_command(billing_cli)
    app.cli.add_command(users_cli)


def register_services() -> None:
    # Modules register what they offer when imported: jobs its worker tasks (and, through
    # billing_service, the webhook providers and the settlement consumers); notifications,
    # team_notifications, account_emails and security_emails their outbox consumers. Nothing below
    # fetches them back by name, so this is the one place that imports them (tests/test_layout.py).
    from app.services import (  # noqa: F401
        account_emails,
        domain_events,
        jobs,
        notifications,
        security_emails,
        team_notifications,
    )

    if domain_events.log_announcement not in domain_events.subscribers("*"):
        domain_events.subscribe("*", domain_events.log_announcement)


@login_manager.user_loader
def load_user(user_id: str) -> Any:
    from app.access import forget_stale_sign_in, session_is_current
    from app.models import User

    user = db.session.get(User, int(user_id)) if user_id.isdigit() else None
    # A member the owner removed is signed out of every session at its next request.
    if user is not None and user.removed_at is None and session_is_current(user):
        from app.admin.view_as import viewed_owner

        return viewed_owner(user) or user  # staff viewing as an owner see the owner's pages, read-only
    forget_stale_sign_in()  # removed, signed out everywhere, or the password changed, since this session began
    return None
