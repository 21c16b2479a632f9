"""Column types shared by the models: portable between PostgreSQL (tests, production) and the SQLite
stand-in of a newcomer's development run."""

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Integer, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB

from app import clock

# BIGINT identities on PostgreSQL; SQLite only auto-increments a column declared INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class AwareDateTime(TypeDecorator[datetime]):
    """A point in time, always timezone-aware in Python, on every database.

    PostgreSQL's ``timestamptz`` keeps the instant and psycopg2 returns it aware. SQLite has no such type:
    SQLAlchemy stores the wall-clock digits without an offset and reads them back naive, and comparing
    those with ``utcnow()`` raises TypeError. So values are written as UTC (a naive value is taken to be
    UTC already, the app's convention) and a naive value read back is UTC, made aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value


Timestamp = AwareDateTime()


def utcnow() -> datetime:
    return clock.utcnow()  # the one clock (app/clock.py), which tests patch
