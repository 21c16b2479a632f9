"""Flask extensions, created once and unbound; create_app() binds them to an application."""

import ipaddress
from typing import TYPE_CHECKING

from flask import current_app, request
from flask_caching import Cache
from flask_limiter import Limiter
from flask_login import LoginManager
from flask_mailman import Mail
from flask_migrate import Migrate
from flask_session import Session
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


def client_bucket(address: str | None, ipv6_prefix: int) -> str:
    """The rate-limit identity of a client address: an IPv4 address is itself, an IPv6 address is its
    /ipv6_prefix network (one subscriber usually holds a whole /64, so its single addresses are free)."""
    if not address:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{parsed}/{ipv6_prefix}", strict=False))
    return str(parsed)


def client_address() -> str:
    """Who the client is for rate limits: its address as the trusted proxy reported it (ProxyFix runs
    first), an IPv6 one widened to its /RATELIMIT_IPV6_PREFIX_LENGTH network (64 by default)."""
    return client_bucket(request.remote_addr, current_app.config.get("RATELIMIT_IPV6_PREFIX_LENGTH", 64))


db = SQLAlchemy(model_class=Base)
# The models' base class. db.Model is built at run time, so type checkers are shown what it derives from.
if TYPE_CHECKING:
    Model = Base
else:
    Model = db.Model
migrate = Migrate()
login_manager = LoginManager()
server_session = Session()
limiter = Limiter(key_func=client_address)
# Machine endpoints carry no rate limit: webhooks are authenticated by signature and must not wait on
# Redis, health checks must answer while Redis is down; the usage API is authenticated by API key and
# must keep up with the customer's traffic (a hard limit, not a rate limit, bounds what it records).
# A request filter skips the limiter's per-request work outright (an exempt decorator would still
# resolve limits on every call).
UNLIMITED_ENDPOINTS = frozenset({"billing.webhook", "main.healthz", "main.readyz", "main.metrics", "api.record_usage"})


@limiter.request_filter
def _machine_endpoint() -> bool:
    return request.endpoint in UNLIMITED_ENDPOINTS


cache = Cache()
csrf = CSRFProtect()
mail = Mail()
