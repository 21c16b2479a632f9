"""Column types shared by the models: portable between PostgreSQL (tests, production) and the SQLite
stand-in of a newcomer's development run."""

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Integer
from sqlalchemy.dialects.postgresql import JSONB

from app import clock

# BIGINT identities on PostgreSQL; SQLite only auto-increments a column declared INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonDocument = JSON().with_variant(JSONB(), "postgresql")
Timestamp = DateTime(timezone=True)


def utcnow() -> datetime:
    return clock.utcnow()  # the one clock (app/clock.py), which tests patch
