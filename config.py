"""Configuration: one class per environment, chosen by APP_ENV, every secret and address read from the
environment. Nothing here connects to anything; app/startup.py checks a production configuration before
the app serves a request."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def normalise_database_url(url: str) -> str:
    """Pin PostgreSQL URLs to psycopg2, the driver we ship and test with.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, and Heroku-style ``postgres://`` to
    nothing at all; ops hand us either, so both become ``postgresql+psycopg2://``. URLs that already
    name a driver are left alone.
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


class BaseConfig:
    """Settings shared by every environment. Subclasses decide the storage back-ends."""

    APP_ENV = "base"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.SECRET_KEY = env.get("SECRET_KEY", "")
        self.REDIS_URL = env.get("REDIS_URL", "")
        self.SQLALCHEMY_DATABASE_URI = normalise_database_url(env.get("DATABASE_URL", ""))
        self.SQLALCHEMY_ENGINE_OPTIONS = self._engine_options(
            self.SQLALCHEMY_DATABASE_URI, pre_ping=env.get("DATABASE_POOL_PRE_PING", "") in ("1", "true", "yes")
        )
        # How long a new connection waits for a PostgreSQL that is restarting (app/database.py).
        self.DATABASE_CONNECT_RETRY_SECONDS = float(env.get("DATABASE_CONNECT_RETRY_SECONDS", "30"))
        # Single reads outside any transaction (the webhook duplicate check): no BEGIN or ROLLBACK
        # round trips, and no per-use isolation switch on the main pool's connections.
        self.SQLALCHEMY_BINDS = {
            "autocommit": {
                "url": self.SQLALCHEMY_DATABASE_URI,
                "isolation_level": "AUTOCOMMIT",
                **self.SQLALCHEMY_ENGINE_OPTIONS,
            }
        }
        self.SQLALCHEMY_TRACK_MODIFICATIONS = False

        self.configure_stripe(env)
        self.APP_BASE_URL = env.get("APP_BASE_URL", "http://127.0.0.1:5000").rstrip("/")
        self.configure_whop(env)
        self.configure_accounts(env)

        self.PLAN_CATALOGUE_FILE = env.get("PLAN_CATALOGUE_FILE", str(PROJECT_ROOT / "plans.toml"))
        self.PRICE_CACHE_SECONDS = int(env.get("PRICE_CACHE_SECONDS", "300"))
        self.CHECKOUT_SESSION_TTL_MINUTES = int(env.get("CHECKOUT_SESSION_TTL_MINUTES", "60"))
        # Checkout shows its "Add promotion code" field (allow_promotion_codes) at signup and upgrade.
        self.PROMOTION_CODES_AT_CHECKOUT = env.get("PROMOTION_CODES_AT_CHECKOUT", "1") in ("1", "true", "yes")
        self.PAST_DUE_GRACE_DAYS = int(env.get("PAST_DUE_GRACE_DAYS", "7"))
        # The billing page's reads from Stripe (upcoming invoice, payment method, invoices) are cached
        # this long; a failed read is remembered for the shorter time, so a Stripe outage costs one
        # timeout per organization per that many seconds instead of one per page view.
        self.BILLING_READ_CACHE_SECONDS = int(env.get("BILLING_READ_CACHE_SECONDS", "60"))
        self.BILLING_READ_FAILURE_SECONDS = int(env.get("BILLING_READ_FAILURE_SECONDS", "15"))
        self.STRIPE_PAGE_READ_TIMEOUT_SECONDS = float(env.get("STRIPE_PAGE_READ_TIMEOUT_SECONDS", "3"))
        # A plan or seat change preview can be confirmed for this long; older ones are offered afresh.
        self.PLAN_CHANGE_PREVIEW_MINUTES = int(env.get("PLAN_CHANGE_PREVIEW_MINUTES", "15"))
        self.INVITATION_TTL_HOURS = int(env.get("INVITATION_TTL_HOURS", "72"))

        self.configure_rate_limits(env)

        # Number of reverse proxies in front of the app whose X-Forwarded-* headers are trusted. Production
        # has no default (app/startup.py refuses to boot without it); elsewhere it is 0.
        raw_proxies = env.get("TRUSTED_PROXY_COUNT", "").strip() or self.DEFAULT_TRUSTED_PROXIES
        self.TRUSTED_PROXY_COUNT_SETTING = raw_proxies
        self.TRUSTED_PROXY_COUNT = int(raw_proxies) if raw_proxies.isdigit() else 0

        # No form or Stripe event comes near this; anything bigger is refused before it is read.
        self.MAX_CONTENT_LENGTH = 1024 * 1024
        self.SESSION_COOKIE_NAME = "session"
        self.SESSION_COOKIE_HTTPONLY = True
        self.SESSION_COOKIE_SAMESITE = "Lax"
        self.SESSION_COOKIE_SECURE = False
        self.SESSION_PERMANENT = True
        # A session ends this long after sign-in however busy (absolute), and after SESSION_IDLE_MINUTES unused.
        self.PERMANENT_SESSION_LIFETIME = timedelta(hours=int(env.get("SESSION_LIFETIME_HOURS", "12")))
        self.SESSION_IDLE_MINUTES = int(env.get("SESSION_IDLE_MINUTES", "30"))
        # The checkout's success page signs the new owner in, in the browser that started the signup, once
        # and only this long after the account was created (afterwards: the sign-in page).
        self.SIGNUP_SIGN_IN_MINUTES = int(env.get("SIGNUP_SIGN_IN_MINUTES", "15"))
        self.REMEMBER_COOKIE_HTTPONLY = True
        self.REMEMBER_COOKIE_SAMESITE = "Lax"
        self.SESSION_KEY_PREFIX = "session:"
        self.WTF_CSRF_TIME_LIMIT = None  # the token lives as long as the server-side session
        self.RATELIMIT_KEY_PREFIX = "ratelimit"
        self.RATELIMIT_HEADERS_ENABLED = True
        # While Redis is down the limiter raises instead of letting requests through unlimited; the
        # error handler turns that into a 503 page (sessions are down anyway). See docs/system/BILLING.md.
        self.RATELIMIT_SWALLOW_ERRORS = False
        self.CACHE_DEFAULT_TIMEOUT = self.PRICE_CACHE_SECONDS
        self.CACHE_KEY_PREFIX = "cache:"
        self.configure_mail_and_jobs(env)
        # Production with Redis reached without a password, or SMTP without TLS: "warn" (logged at start-up)
        # or "refuse" (the app does not start).
        self.INSECURE_BACKENDS = env.get("INSECURE_BACKENDS", "warn").strip().lower()
        self.LOG_FORMAT = env.get("LOG_FORMAT", self.DEFAULT_LOG_FORMAT)
        self.LOG_LEVEL = env.get("LOG_LEVEL", "INFO")

        self.configure_storage(env)

    def configure_stripe(self, env: Mapping[str, str]) -> None:
        # Billing credentials come only from the environment; BillingService.ensure_stripe() names
        # whichever is missing when it is first needed.
        self.STRIPE_SECRET_KEY = env.get("STRIPE_SECRET_KEY", "")
        self.STRIPE_WEBHOOK_SECRET = env.get("STRIPE_WEBHOOK_SECRET", "")
        self.STRIPE_PUBLISHABLE_KEY = env.get("STRIPE_PUBLISHABLE_KEY", "")
        self.STRIPE_API_BASE = env.get("STRIPE_API_BASE", "")
        self.STRIPE_MAX_NETWORK_RETRIES = int(env.get("STRIPE_MAX_NETWORK_RETRIES", "2"))
        self.STRIPE_TIMEOUT_SECONDS = float(env.get("STRIPE_TIMEOUT_SECONDS", "20"))
        # Requests per second to Stripe from all processes together (a token bucket in Redis). Empty: 80
        # with a live key, 20 with a test key (Stripe allows 100 and 25); 0: no cap.
        self.STRIPE_REQUESTS_PER_SECOND = env.get("STRIPE_REQUESTS_PER_SECOND", "").strip()
        # How long a request waits for its turn in that budget (or for Stripe's Retry-After) before it
        # is treated as throttled: the worker then retries the object later without spending an attempt.
        self.STRIPE_RATE_WAIT_SECONDS = float(env.get("STRIPE_RATE_WAIT_SECONDS", "5"))
        # A usage reporting run with more pending reports than this sends them through Stripe's v2 meter
        # event stream (100 a request) instead of v1 meter events (one a request); 0: always v1.
        self.USAGE_STREAM_THRESHOLD = int(env.get("USAGE_STREAM_THRESHOLD", "1000"))
        # A stream request that fails in a way that may pass (connection, timeout, 5xx, 429) is tried
        # again this many times in the run, after 1, 2, 4... x USAGE_STREAM_RETRY_SECONDS (jittered).
        self.USAGE_STREAM_RETRIES = int(env.get("USAGE_STREAM_RETRIES", "2"))
        self.USAGE_STREAM_RETRY_SECONDS = float(env.get("USAGE_STREAM_RETRY_SECONDS", "1"))
        # Test mode only: each signup's customer is created on a Stripe test clock of its own, so time can
        # be moved through its whole subscription (renewals, dunning, trial ends). Refused with a live key.
        self.STRIPE_TEST_CLOCKS = env.get("STRIPE_TEST_CLOCKS", "").strip().lower() in TRUE_WORDS
        # Stripe Tax: automatic_tax on Checkout (which then collects the billing address and tax IDs),
        # subscriptions, invoices and previews. Off by default: Stripe Tax must be set up in the account.
        self.STRIPE_AUTOMATIC_TAX = env.get("STRIPE_AUTOMATIC_TAX", "").strip().lower() in TRUE_WORDS
        # How the catalogue's prices are meant and shown: "exclusive" (tax added on top) or "inclusive".
        self.PRICES_SHOWN_WITH_TAX = env.get("PRICES_SHOWN_WITH_TAX", "").strip().lower() or "exclusive"
        if self.PRICES_SHOWN_WITH_TAX not in ("exclusive", "inclusive"):
            raise ValueError(f"PRICES_SHOWN_WITH_TAX is exclusive or inclusive, not {self.PRICES_SHOWN_WITH_TAX!r}")
        # Production refuses a test-mode key (sk_test_/rk_test_) unless this says it is meant (a staging
        # deployment built with the production configuration).
        self.STRIPE_ALLOW_TEST_KEY_IN_PRODUCTION = (
            env.get("STRIPE_ALLOW_TEST_KEY_IN_PRODUCTION", "").strip().lower() in TRUE_WORDS
        )

    def configure_mail_and_jobs(self, env: Mapping[str, str]) -> None:
        # Outgoing email over SMTP (Flask-Mailman). Production refuses to start without MAIL_SERVER and
        # MAIL_DEFAULT_SENDER; development without MAIL_SERVER prints messages to the console instead.
        self.MAIL_SERVER = env.get("MAIL_SERVER", "")
        self.MAIL_PORT = int(env.get("MAIL_PORT", "25"))
        self.MAIL_USE_TLS = env.get("MAIL_USE_TLS", "false").strip().lower() in TRUE_WORDS
        self.MAIL_USE_SSL = env.get("MAIL_USE_SSL", "false").strip().lower() in TRUE_WORDS
        self.MAIL_USERNAME = env.get("MAIL_USERNAME") or None
        self.MAIL_PASSWORD = env.get("MAIL_PASSWORD") or None
        self.MAIL_DEFAULT_SENDER = env.get("MAIL_DEFAULT_SENDER", "")
        # Where invitation emails tell an unwilling recipient to report abuse (default: the sender's address).
        self.ABUSE_REPORT_EMAIL = env.get("ABUSE_REPORT_EMAIL", "")
        self.MAIL_TIMEOUT = float(env.get("MAIL_TIMEOUT_SECONDS", "10"))
        self.MAIL_BACKEND = "smtp" if self.MAIL_SERVER else self.DEFAULT_MAIL_BACKEND

        # The job queue (procrastinate, in the same PostgreSQL database). A failing job is retried with
        # exponential backoff (JOB_RETRY_BASE_SECONDS ** attempt, capped at JOB_RETRY_MAX_WAIT_SECONDS)
        # until JOB_MAX_ATTEMPTS attempts have failed.
        self.JOB_MAX_ATTEMPTS = int(env.get("JOB_MAX_ATTEMPTS", "8"))
        self.JOB_RETRY_BASE_SECONDS = int(env.get("JOB_RETRY_BASE_SECONDS", "2"))
        self.JOB_RETRY_MAX_WAIT_SECONDS = int(env.get("JOB_RETRY_MAX_WAIT_SECONDS", "3600"))
        # Outbox deliveries (emails) retry longer: with the defaults above, 36 attempts span about 26
        # hours, so an SMTP outage of a day loses nothing; then the delivery fails and is listed by
        # `flask billing emails --failed` (and counted by `flask billing status` and /metrics).
        self.OUTBOX_MAX_ATTEMPTS = int(env.get("OUTBOX_MAX_ATTEMPTS", "36"))
        self.WORKER_CONCURRENCY = int(env.get("WORKER_CONCURRENCY", "4"))
        # How often a worker looks for jobs whose time has come (a retry, a throttled object, a coalescing
        # wait); new jobs wake it at once (NOTIFY).
        self.WORKER_POLL_SECONDS = float(env.get("WORKER_POLL_SECONDS", "5"))
        # A running job is a lease: its worker beats a heartbeat every WORKER_HEARTBEAT_SECONDS; a worker
        # silent for WORKER_STALLED_SECONDS is dead (SIGKILL, a lost host), and every worker looks for
        # such jobs every WORKER_RECOVERY_SECONDS and runs them again: a dead worker's objects are
        # applied by another within about STALLED + HEARTBEAT + RECOVERY seconds (17 by default).
        self.WORKER_HEARTBEAT_SECONDS = float(env.get("WORKER_HEARTBEAT_SECONDS", "2"))
        self.WORKER_STALLED_SECONDS = float(env.get("WORKER_STALLED_SECONDS", "10"))
        self.WORKER_RECOVERY_SECONDS = float(env.get("WORKER_RECOVERY_SECONDS", "5"))
        if not 0 < 3 * self.WORKER_HEARTBEAT_SECONDS <= self.WORKER_STALLED_SECONDS:
            # Shorter, and a worker that is only slow to beat would have its running jobs run twice.
            raise SystemExit("WORKER_STALLED_SECONDS must be at least 3 times WORKER_HEARTBEAT_SECONDS")
        if self.WORKER_RECOVERY_SECONDS <= 0:
            raise SystemExit("WORKER_RECOVERY_SECONDS must be positive")
        # A webhook's job waits this long before it applies, so a burst of events about one subscription
        # costs one or two Stripe reads; acknowledgement is not delayed.
        self.WEBHOOK_COALESCE_SECONDS = float(env.get("WEBHOOK_COALESCE_SECONDS", "2"))
        # Intake only stores an event: every worker looks this often for objects with events stored
        # pending at least WEBHOOK_COALESCE_SECONDS ago and no job, and queues one job per object. So a
        # stored event is taken up within COALESCE + DISPATCH seconds while a worker runs (plus the
        # running job's own time, when one was applying its object as it arrived).
        self.WORKER_DISPATCH_SECONDS = float(env.get("WORKER_DISPATCH_SECONDS", "1"))
        if self.WORKER_DISPATCH_SECONDS <= 0:
            raise SystemExit("WORKER_DISPATCH_SECONDS must be positive")
        # The backstop, every minute: a pending event with no job this long after it was stored is logged
        # (a warning: no worker was dispatching) and queued.
        self.WEBHOOK_SWEEP_AFTER_SECONDS = float(env.get("WEBHOOK_SWEEP_AFTER_SECONDS", "60"))
        # Each web process remembers this many ids of events it saw settled (processed or ignored), so a
        # redelivery of one is answered after its signature check with no database round trip; 0: none.
        self.WEBHOOK_SETTLED_CACHE_SIZE = int(env.get("WEBHOOK_SETTLED_CACHE_SIZE", "10000"))
        # Stored webhook payloads older than this are dropped by a daily job (the row and outcome stay).
        self.EVENT_PAYLOAD_RETENTION_DAYS = int(env.get("EVENT_PAYLOAD_RETENTION_DAYS", "90"))
        # /metrics answers only with "Authorization: Bearer $METRICS_TOKEN"; unset, it is a 404. Production
        # refuses a weak one (under 32 characters, or few distinct ones).
        self.METRICS_TOKEN = env.get("METRICS_TOKEN", "")

    DEFAULT_TRUSTED_PROXIES = "0"
    DEFAULT_LOG_FORMAT = "text"
    DEFAULT_MAIL_BACKEND = "smtp"

    # Rate limits (Flask-Limiter notation), each overridable by the environment variable of its name.
    # Failed sign-ins only count against the login limits.
    RATE_LIMIT_DEFAULTS: Mapping[str, str] = {
        "SIGNUP_RATE_LIMIT_PER_CLIENT": "20/hour;5/minute",
        "SIGNUP_RATE_LIMIT_PER_EMAIL": "5/hour",
        "LOGIN_RATE_LIMIT_PER_CLIENT": "30/hour;10/minute",
        # Per account *and* client address: failures from elsewhere never lock the owner out (BILLING.md).
        "LOGIN_RATE_LIMIT_PER_ACCOUNT_AND_CLIENT": "10/hour;5/minute",
        "PASSWORD_RESET_RATE_LIMIT_PER_CLIENT": "10/hour;3/minute",
        "PASSWORD_RESET_RATE_LIMIT_PER_EMAIL": "3/hour",
        "EMAIL_VERIFICATION_RATE_LIMIT": "3/hour",
        # Teammate invitations (each one an email to an address the owner chose).
        "INVITATION_RATE_LIMIT_PER_ORGANIZATION": "20/hour;50/day",
        "INVITATION_RATE_LIMIT_PER_CLIENT": "30/hour",
        "CHECKOUT_RETURN_RATE_LIMIT": "60/minute",
    }

    def configure_rate_limits(self, env: Mapping[str, str]) -> None:
        # Limits key on the client's address; an IPv6 client is its network of this many leading bits (one
        # subscriber holds a whole /64, and would otherwise have 2**64 fresh addresses to spend).
        self.RATELIMIT_IPV6_PREFIX_LENGTH = int(env.get("RATELIMIT_IPV6_PREFIX_LENGTH", "64"))
        if not 8 <= self.RATELIMIT_IPV6_PREFIX_LENGTH <= 128:
            raise SystemExit("RATELIMIT_IPV6_PREFIX_LENGTH must be a prefix length from 8 to 128 (64 is usual)")
        for name, default in self.RATE_LIMIT_DEFAULTS.items():
            setattr(self, name, env.get(name, default))

    def configure_accounts(self, env: Mapping[str, str]) -> None:
        """Passwords and two-factor sign-in (docs/system/SECURITY.md, "Two-factor sign-in and passwords")."""
        # scrypt's cost N (a power of two; r=8, p=1): OWASP's recommendation, 2**17. A hash made with a
        # smaller N is replaced at the user's next sign-in.
        self.PASSWORD_SCRYPT_N = int(env.get("PASSWORD_SCRYPT_N", str(2**17)))
        # Changing the plan, cancelling, removing a teammate, changing the password and turning two-factor
        # sign-in off ask for the password (or a code) again unless the user proved it this recently.
        self.REAUTH_MINUTES = int(env.get("REAUTH_MINUTES", "10"))
        # The name authenticator apps show beside the account.
        self.TWO_FACTOR_ISSUER = env.get("TWO_FACTOR_ISSUER", "Ledgerline")
        # Wrong codes at sign-in's second step, per account; wrong answers on the confirm-it's-you page,
        # per user; password change attempts and email change requests, per user.
        self.TWO_FACTOR_RATE_LIMIT = env.get("TWO_FACTOR_RATE_LIMIT", "5/minute;20/hour")
        self.REAUTH_RATE_LIMIT = env.get("REAUTH_RATE_LIMIT", "5/minute;20/hour")
        self.PASSWORD_CHANGE_RATE_LIMIT = env.get("PASSWORD_CHANGE_RATE_LIMIT", "5/hour")
        self.EMAIL_CHANGE_RATE_LIMIT = env.get("EMAIL_CHANGE_RATE_LIMIT", "3/hour")

    @staticmethod
    def _engine_options(url: str, *, pre_ping: bool = False) -> dict[str, object]:
        if url.startswith("postgresql"):
            return {
                # No pre-ping by default: it would cost every checkout a round trip. A request whose
                # connection died with a restarting database is run again once instead, and new
                # connections wait for the server to come back (app/database.py). Recycling keeps
                # idle connections under server timeouts.
                "pool_pre_ping": pre_ping,
                "pool_recycle": 1800,
                "pool_size": 10,
                "max_overflow": 5,
                "connect_args": {"connect_timeout": 5, "application_name": "billing-web"},
            }
        return {}

    def configure_whop(self, env: Mapping[str, str]) -> None:
        """Whop, the second provider: off unless key, secret and account are all set
        (BillingService.whop_configured()). WHOP_WEBHOOK_SECRET may list several, comma-separated,
        while one is rotated. WHOP_API_BASE points the SDK at another address (the offline double);
        production refuses it."""
        self.WHOP_API_KEY = env.get("WHOP_API_KEY", "")
        self.WHOP_WEBHOOK_SECRET = env.get("WHOP_WEBHOOK_SECRET", "")
        self.WHOP_COMPANY_ID = env.get("WHOP_COMPANY_ID", "")
        self.WHOP_API_BASE = env.get("WHOP_API_BASE", "").rstrip("/")
        self.WHOP_MAX_RETRIES = int(env.get("WHOP_MAX_RETRIES", "2"))
        self.WHOP_TIMEOUT_SECONDS = float(env.get("WHOP_TIMEOUT_SECONDS", "20"))

    def configure_storage(self, env: Mapping[str, str]) -> None:
        """Sessions, cache and rate-limit storage on Redis at REDIS_URL."""
        self.SESSION_TYPE = "redis"
        self.CACHE_TYPE = "RedisCache"
        self.CACHE_REDIS_URL = self.REDIS_URL
        self.RATELIMIT_STORAGE_URI = self.REDIS_URL


class DevelopmentConfig(BaseConfig):
    """A newcomer's `flask run`: PostgreSQL and Redis when their URLs are set, embedded stand-ins
    (SQLite, filesystem sessions, in-process cache and limiter) when not. The stand-ins are named at
    start-up (app/startup.py) and refused in production."""

    APP_ENV = "development"
    DEFAULT_MAIL_BACKEND = "console"
    # A person trying the product corrects a form, signs in and out, asks for links again and again:
    # development limits are far above what anyone clicking around reaches (production keeps the
    # limits above). Set any of the variables to try a real limit.
    RATE_LIMIT_DEFAULTS: Mapping[str, str] = dict.fromkeys(BaseConfig.RATE_LIMIT_DEFAULTS, "1000/hour;200/minute")

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        instance = Path(env.get("APP_INSTANCE_DIR", str(PROJECT_ROOT / "instance")))
        env.setdefault("DATABASE_URL", f"sqlite:///{instance / 'development.sqlite3'}")
        # A development-only key: production refuses any key this short or this well known.
        env.setdefault("SECRET_KEY", "development-only-not-secret")
        self.INSTANCE_DIR = instance
        super().__init__(env)

    def configure_storage(self, env: Mapping[str, str]) -> None:
        if self.REDIS_URL:
            super().configure_storage(env)
            return
        self.SESSION_TYPE = "cachelib"
        self.SESSION_FILE_DIR = str(self.INSTANCE_DIR / "sessions")
        self.CACHE_TYPE = "SimpleCache"
        self.RATELIMIT_STORAGE_URI = "memory://"


class TestConfig(BaseConfig):
    """The test suite: real PostgreSQL and Redis, always."""

    APP_ENV = "test"
    __test__ = False  # a configuration, not a pytest test class

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        env["DATABASE_URL"] = env.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/billing_test")
        env["REDIS_URL"] = env.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
        env.setdefault("SECRET_KEY", "test-secret-key-that-is-long-enough-0123456789")
        # Real SMTP: the suite's fixtures point MAIL_PORT at an aiosmtpd server they run.
        env.setdefault("MAIL_SERVER", "127.0.0.1")
        env.setdefault("MAIL_DEFAULT_SENDER", "Ledgerline Billing <billing@ledgerline.test>")
        env.setdefault("WEBHOOK_COALESCE_SECONDS", "0")  # tests run due jobs inline, at once
        # A cheaper scrypt (each hash ~0.01 s instead of ~0.5 s): the suite hashes hundreds of passwords.
        # tests/test_passwords.py proves the production default (2**17) and the rehash on sign-in.
        env.setdefault("PASSWORD_SCRYPT_N", str(2**12))
        super().__init__(env)
        self.TESTING = True
        self.PAST_DUE_GRACE_DAYS = 7


class ProductionConfig(BaseConfig):
    """Production: Redis-backed sessions, cache and limits, secure cookies, JSON logs. The settings
    are checked as a whole by app.startup.check_production_settings before anything serves."""

    APP_ENV = "production"
    DEFAULT_TRUSTED_PROXIES = ""  # must be said explicitly: see app/startup.py
    DEFAULT_LOG_FORMAT = "json"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(environ)
        self.SESSION_COOKIE_SECURE = True
        self.REMEMBER_COOKIE_SECURE = True
        # __Host-: the browser keeps the cookie only if it is Secure, for Path=/ and without a Domain, so
        # no subdomain (or plain-http page) can set or overwrite it.
        self.SESSION_COOKIE_NAME = "__Host-session"
        self.SESSION_COOKIE_PATH = "/"
        self.SESSION_COOKIE_DOMAIN = None
        self.REMEMBER_COOKIE_NAME = "__Host-remember_token"
        self.REMEMBER_COOKIE_PATH = "/"
        self.REMEMBER_COOKIE_DOMAIN = None
        self.PREFERRED_URL_SCHEME = "https"


CONFIGS: dict[str, type[BaseConfig]] = {
    "development": DevelopmentConfig,
    "test": TestConfig,
    "production": ProductionConfig,
}


def config_for(app_env: str | None = None, environ: Mapping[str, str] | None = None) -> BaseConfig:
    """The configuration for APP_ENV (default: development)."""
    env = os.environ if environ is None else environ
    name = (app_env or env.get("APP_ENV") or "development").strip().lower()
    try:
        return CONFIGS[name](environ)
    except KeyError:
        known = ", ".join(sorted(CONFIGS))
        raise SystemExit(f"APP_ENV={name!r} is not one of: {known}") from None
