"""API keys: what an organization's own services present to the usage API (POST /api/v1/usage). The
owner creates (names), lists and revokes them on /api-keys/. A key is `llk_` and 43 characters of
256 random bits, shown once; only its SHA-256 is stored, with its first 12 characters (the prefix)
for telling keys apart. Checking a key is one indexed read (joined with its organization's billing
state, which recording needs). A process remembers what it read for a minute, and a request with a
remembered key skips that read: the recording's own statement checks that the key is still live and
the organization unchanged, so a revocation still takes effect at once (`remembered`). The last-used
time is written at most once a minute (a conditional UPDATE), so a busy key does not write on every
request."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import BigInteger, String, column, select, text, update

from app import clock
from app.extensions import db
from app.models import ApiKey
from app.models.types import Timestamp
from app.services import domain_events, usage_store
from app.services.billing_common import committed

KEY_PREFIX = "llk_"
PREFIX_LENGTH = 12
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_KEYS = 20  # live keys per organization
REMEMBERED_KEYS = 10_000  # callers a process remembers (all forgotten when full)


class ApiKeyError(ValueError):
    """The owner's request about a key cannot be done (the message says why)."""


@dataclass(frozen=True)
class NewApiKey:
    id: int
    name: str
    prefix: str
    secret: str  # the whole key: shown once, never stored


@dataclass(frozen=True)
class ApiCaller:
    organization_id: int
    key_id: int
    account: usage_store.Account  # the organization as read with the key


CALLER = text(
    "SELECT k.id, k.organization_id, k.last_used_at, o.tier, o.billing_status, o.current_period_end"
    " FROM api_key k JOIN organization o ON o.id = k.organization_id"
    " WHERE k.key_hash = :key_hash AND k.revoked_at IS NULL"
).columns(
    column("id", BigInteger),
    column("organization_id", BigInteger),
    column("last_used_at", Timestamp),
    column("tier", String),
    column("billing_status", String),
    column("current_period_end", Timestamp),
)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(organization_id: int, name: str, *, actor_user_id: int) -> NewApiKey:
    name = " ".join(name.split())
    if not name or len(name) > 100:
        raise ApiKeyError("Name the key (up to 100 characters), e.g. after the service that uses it.")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with committed():
        live = db.session.execute(
            select(ApiKey.id).where(ApiKey.organization_id == organization_id, ApiKey.revoked_at.is_(None))
        ).all()
        if len(live) >= MAX_KEYS:
            raise ApiKeyError(f"An organization can have {MAX_KEYS} keys at once: revoke one you no longer use.")
        key = ApiKey(
            organization_id=organization_id,
            name=name,
            prefix=secret[:PREFIX_LENGTH],
            key_hash=_digest(secret),
            created_by_user_id=actor_user_id,
        )
        db.session.add(key)
        db.session.flush()
        domain_events.record(
            "api_key.created",
            organization_id=organization_id,
            user_id=actor_user_id,
            source=f"user:{actor_user_id}",
            api_key_id=key.id,
            name=name,
            prefix=key.prefix,
        )
        created = NewApiKey(key.id, name, key.prefix, secret)
    return created


def keys(organization_id: int) -> list[ApiKey]:
    """The organization's keys, live ones first, newest first."""
    rows = db.session.execute(
        select(ApiKey)
        .where(ApiKey.organization_id == organization_id)
        .order_by(ApiKey.revoked_at.is_not(None), ApiKey.created_at.desc(), ApiKey.id.desc())
    ).scalars()
    return list(rows)


def revoke(organization_id: int, key_id: int, *, actor_user_id: int) -> ApiKey:
    with committed():
        key = db.session.execute(
            select(ApiKey).where(ApiKey.id == key_id, ApiKey.organization_id == organization_id).with_for_update()
        ).scalar_one_or_none()
        if key is None:
            raise ApiKeyError("That key does not exist.")
        if key.revoked_at is None:
            key.revoked_at = clock.utcnow()
            domain_events.record(
                "api_key.revoked",
                organization_id=organization_id,
                user_id=actor_user_id,
                source=f"user:{actor_user_id}",
                api_key_id=key.id,
                name=key.name,
                prefix=key.prefix,
            )
    return key


def authenticate(secret: str | None) -> ApiCaller | None:
    """The organization a presented key belongs to, or None (unknown, malformed or revoked): read with
    the organization's tier, status and period (what recording needs) in one statement. A live key
    leaves its read's transaction open for the recording that follows (which commits it), and is
    remembered for the next requests (see `remembered`)."""
    if not secret or not secret.startswith(KEY_PREFIX) or len(secret) > 100:
        return None
    digest = _digest(secret)
    callers = _remembered_callers()
    callers.pop(digest, None)
    row = db.session.connection().execute(CALLER, {"key_hash": digest}).first()
    if row is None:
        db.session.rollback()
        return None
    now = clock.utcnow()
    if row.last_used_at is None or row.last_used_at < now - LAST_USED_RESOLUTION:
        _mark_used(row.id, now)
    account = usage_store.Account(row.tier, row.billing_status, row.current_period_end)
    if db.session.get_bind().dialect.name == "postgresql":  # the check of a remembered key is PostgreSQL's
        if len(callers) >= REMEMBERED_KEYS:
            callers.clear()
        remembered_account = account._replace(key_id=row.id)
        callers[digest] = (time.monotonic(), ApiCaller(row.organization_id, row.id, remembered_account))
    return ApiCaller(organization_id=row.organization_id, key_id=row.id, account=account)


def remembered(secret: str | None) -> ApiCaller | None:
    """The caller this process read for this key less than LAST_USED_RESOLUTION ago, without a round
    trip; None when there is none. Its account carries the key's id, so the recording's own statement
    checks that the key is still live and the organization unchanged (usage_store.AccountChanged when
    not: then `authenticate` reads them again). A revoked key therefore records nothing from its
    revocation's commit on, as with a fresh read (a request refused before recording anything, a
    malformed body, may still get its 400 rather than the 401). Its last use is written when it is
    read again: a minute or two late at most."""
    if not secret or len(secret) > 100:
        return None
    entry = _remembered_callers().get(_digest(secret))
    if entry is None or time.monotonic() - entry[0] >= LAST_USED_RESOLUTION.total_seconds():
        return None
    return entry[1]


def _remembered_callers() -> dict[str, tuple[float, ApiCaller]]:
    callers: dict[str, tuple[float, ApiCaller]] = current_app.extensions.setdefault("api_key_callers", {})
    return callers


def _mark_used(key_id: int, now: datetime) -> None:
    stale = now - LAST_USED_RESOLUTION
    with committed():
        db.session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, (ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < stale))
            .values(last_used_at=now)
        )
