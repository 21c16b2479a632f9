"""Start-up checks: a production configuration is checked as a whole and refused, naming every
problem at once, before anything serves; a development one says which stand-ins it runs on."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from redis import Redis
from redis.exceptions import RedisError

# Keys people paste from tutorials and .env examples; any of them is as good as none.
WELL_KNOWN_SECRET_KEYS = {
    "changeme",
    "change-me",
    "change-this",
    "default",
    "dev",
    "development",
    "development-only-not-secret",
    "secret",
    "secret-key",
    "supersecret",
    "test",
    "your-secret-key",
}
MIN_SECRET_KEY_LENGTH = 32
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
WHOP_SETTINGS = ("WHOP_API_KEY", "WHOP_WEBHOOK_SECRET", "WHOP_COMPANY_ID")
WHOP_PRODUCTION_API = "https://api.whop.com/api/v1"


class ConfigurationError(RuntimeError):
    """The configuration is unsafe to serve with. gunicorn prints a RuntimeError's message and exits 1."""


def check_production_settings(config: Mapping[str, Any]) -> None:
    problems = production_problems(config)
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigurationError(f"Refusing to start in production; fix these settings:\n{listing}")


def production_problems(config: Mapping[str, Any]) -> list[str]:
    insecure = insecure_backends(config)
    return [
        *_secret_key_problems(config.get("SECRET_KEY") or ""),
        *_stripe_test_key_problems(config),
        *_metrics_token_problems(str(config.get("METRICS_TOKEN") or "")),
        *(
            [f"INSECURE_BACKENDS must be warn or refuse, not {config.get('INSECURE_BACKENDS')!r}"]
            if config.get("INSECURE_BACKENDS") not in ("warn", "refuse")
            else []
        ),
        *(
            [f"{problem} (INSECURE_BACKENDS=refuse)" for problem in insecure]
            if config.get("INSECURE_BACKENDS") == "refuse"
            else []
        ),
        *_database_problems(config.get("SQLALCHEMY_DATABASE_URI") or ""),
        *_redis_problems(config),
        *[f"{name} is not set" for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET") if not config.get(name)],
        *_whop_problems(config),
        *_stripe_api_base_problems(config),
        *_proxy_problems(config),
        *[
            f"{name} is not set (billing emails are sent over SMTP)"
            for name in ("MAIL_SERVER", "MAIL_DEFAULT_SENDER")
            if not config.get(name)
        ],
        *(
            []
            if str(config.get("APP_BASE_URL") or "").startswith("https://")
            else ["APP_BASE_URL must be the public https:// address (Stripe sends customers back to it)"]
        ),
        *(
            ["STRIPE_TEST_CLOCKS is on with a live Stripe key (test clocks exist only in test mode)"]
            if config.get("STRIPE_TEST_CLOCKS")
            and str(config.get("STRIPE_SECRET_KEY") or "").startswith(("sk_live_", "rk_live_"))
            else []
        ),
    ]


def production_warnings(config: Mapping[str, Any]) -> list[str]:
    """What production starts with but should not (INSECURE_BACKENDS=warn): logged at start-up."""
    return insecure_backends(config) if config.get("INSECURE_BACKENDS", "warn") == "warn" else []


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def insecure_backends(config: Mapping[str, Any]) -> list[str]:
    """Redis reached without a password (anyone who reaches it reads every session), and SMTP to another
    host without TLS (invitation and reset links cross the network in clear)."""
    found = []
    redis_url = str(config.get("REDIS_URL") or "")
    if redis_url.startswith(REDIS_SCHEMES):
        parts = urlsplit(redis_url)
        if not parts.password and "password=" not in parts.query:
            found.append(
                f"REDIS_URL {redact_url(redis_url)} has no password (sessions are readable by anyone who reaches Redis)"
            )
    mail_server = str(config.get("MAIL_SERVER") or "")
    if (
        mail_server
        and mail_server not in LOCAL_HOSTS
        and not (config.get("MAIL_USE_TLS") or config.get("MAIL_USE_SSL"))
    ):
        found.append(
            f"MAIL_SERVER {mail_server} is used without TLS (set MAIL_USE_TLS or MAIL_USE_SSL): emailed links "
            "would cross the network in clear"
        )
    return found


TEST_KEY_PREFIXES = ("sk_test_", "rk_test_")


def _stripe_test_key_problems(config: Mapping[str, Any]) -> list[str]:
    if str(config.get("STRIPE_SECRET_KEY") or "").startswith(TEST_KEY_PREFIXES) and not config.get(
        "STRIPE_ALLOW_TEST_KEY_IN_PRODUCTION"
    ):
        return [
            "STRIPE_SECRET_KEY is a test-mode key: production takes live payments (set "
            "STRIPE_ALLOW_TEST_KEY_IN_PRODUCTION=1 only for a staging deployment meant to run on test mode)"
        ]
    return []


MIN_METRICS_TOKEN_LENGTH = 32


def _metrics_token_problems(token: str) -> list[str]:
    """Unset is fine (/metrics is a 404); set, it must be as hard to guess as the secret key."""
    if token and (
        len(token) < MIN_METRICS_TOKEN_LENGTH or len(set(token)) < 12 or token.strip().lower() in WELL_KNOWN_SECRET_KEYS
    ):
        return [
            "METRICS_TOKEN is too weak (use 32+ random characters, e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'; or unset it to turn /metrics off)"
        ]
    return []


def _whop_problems(config: Mapping[str, Any]) -> list[str]:
    """Whop is optional, but all or nothing; and a production key never talks to anything but Whop.
    Whop keys carry no test/live marking, so in production every key counts as live."""
    present = [name for name in WHOP_SETTINGS if config.get(name)]
    if not present:
        return []
    problems = [
        f"{name} is not set (Whop needs {', '.join(WHOP_SETTINGS)}, or none of them)"
        for name in WHOP_SETTINGS
        if name not in present
    ]
    api_base = str(config.get("WHOP_API_BASE") or "").rstrip("/")
    if config.get("WHOP_API_KEY") and api_base and api_base != WHOP_PRODUCTION_API:
        problems.append(
            f"WHOP_API_BASE is {api_base}: with live Whop credentials the app only talks to {WHOP_PRODUCTION_API} "
            "(unset WHOP_API_BASE; the offline double is for development and tests)"
        )
    company = str(config.get("WHOP_COMPANY_ID") or "")
    if company and not company.startswith("biz_"):
        problems.append("WHOP_COMPANY_ID must be a Whop account id (biz_...)")
    return problems


LIVE_KEY_PREFIXES = ("sk_live_", "rk_live_")


def _stripe_api_base_problems(config: Mapping[str, Any]) -> list[str]:
    """A live key goes only to Stripe: a stray STRIPE_API_BASE (left from a sandbox or a test) would hand
    it, and every customer's payment data, to another host."""
    if config.get("STRIPE_API_BASE") and str(config.get("STRIPE_SECRET_KEY") or "").startswith(LIVE_KEY_PREFIXES):
        return [
            "STRIPE_API_BASE is set together with a live Stripe key: a live key is only ever sent to Stripe "
            "itself; unset STRIPE_API_BASE (it is for the offline sandbox and test keys)"
        ]
    return []


def _proxy_problems(config: Mapping[str, Any]) -> list[str]:
    setting = str(config.get("TRUSTED_PROXY_COUNT_SETTING") or "")
    why = (
        "rate limits and request logs key on the client address it yields: too low and every client "
        "shares the proxy's address (one client's failed sign-ins limit everyone), too high and clients "
        "forge X-Forwarded-For to dodge the limits and falsify the logs"
    )
    if not setting:
        return [
            "TRUSTED_PROXY_COUNT is not set: set it to the number of reverse proxies in front of the app "
            f"(0 when clients connect directly); {why}"
        ]
    if not setting.isdigit():
        return [
            f"TRUSTED_PROXY_COUNT must be a whole number of proxies (0 when clients connect directly), "
            f"not {setting!r}; {why}"
        ]
    return []


def _database_problems(database_url: str) -> list[str]:
    if not database_url:
        return ["DATABASE_URL is not set (a postgresql:// URL)"]
    if not database_url.startswith("postgresql"):
        return [f"DATABASE_URL must be a PostgreSQL URL, not {urlsplit(database_url).scheme or 'this'}"]
    return []


def _redis_problems(config: Mapping[str, Any]) -> list[str]:
    redis_url = config.get("REDIS_URL") or ""
    if not redis_url:
        # Sessions, cache and limits cannot be on Redis either; this one line says why.
        return ["REDIS_URL is not set (sessions, cache and rate limits live in Redis)"]
    if not redis_url.startswith(REDIS_SCHEMES):
        return ["REDIS_URL must be a redis://, rediss:// or unix:// URL"]
    problems = []
    try:
        Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2).ping()
    except (RedisError, OSError) as exc:
        problems.append(f"REDIS_URL {redact_url(redis_url)} does not answer a ping ({type(exc).__name__})")
    if config.get("SESSION_TYPE") != "redis":
        problems.append(f"sessions must be Redis-backed (SESSION_TYPE is {config.get('SESSION_TYPE')!r})")
    if config.get("CACHE_TYPE") != "RedisCache":
        problems.append(f"the cache must be Redis-backed (CACHE_TYPE is {config.get('CACHE_TYPE')!r})")
    if not str(config.get("RATELIMIT_STORAGE_URI") or "").startswith(REDIS_SCHEMES):
        problems.append("rate-limit storage must be Redis-backed (RATELIMIT_STORAGE_URI is not a Redis URL)")
    return problems


def _secret_key_problems(secret_key: str) -> list[str]:
    hint = "use 32+ random characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))'"
    if not secret_key:
        return [f"SECRET_KEY is not set ({hint})"]
    if (
        len(secret_key) < MIN_SECRET_KEY_LENGTH
        or secret_key.strip().lower() in WELL_KNOWN_SECRET_KEYS
        or len(set(secret_key)) < 12
    ):
        return [f"SECRET_KEY is too weak ({hint})"]
    return []


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)


def development_standins(config: Mapping[str, Any]) -> list[str]:
    """The embedded stand-ins this configuration runs on (empty outside development)."""
    if config.get("APP_ENV") != "development":
        return []
    standins = []
    database_url = str(config.get("SQLALCHEMY_DATABASE_URI") or "")
    if database_url.startswith("sqlite"):
        standins.append(
            f"SQLite database at {database_url.removeprefix('sqlite:///')} (set DATABASE_URL for PostgreSQL)"
        )
    if config.get("SESSION_TYPE") != "redis":
        standins.append(f"filesystem sessions in {config.get('SESSION_FILE_DIR')}")
    if config.get("CACHE_TYPE") != "RedisCache":
        standins.append("in-process cache")
    if str(config.get("RATELIMIT_STORAGE_URI")).startswith("memory"):
        standins.append("in-memory rate limits (set REDIS_URL for Redis)")
    if config.get("MAIL_BACKEND") == "console":
        standins.append("emails printed to the console (set MAIL_SERVER for SMTP)")
    return standins
