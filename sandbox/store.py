"""Durable state: Stripe objects, idempotency records, timed jobs and the webhook queue.

Everything lives in one SQLite file so a restart loses nothing. A single connection guarded by
a re-entrant lock serves every thread: the sandbox is a development server, and serialising all
access is simpler and safer than reasoning about concurrent writers.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id   TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- the Stripe "object" value, e.g. "checkout.session"
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_by_kind ON objects (kind);

CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT PRIMARY KEY,
    endpoint    TEXT NOT NULL,     -- "POST /v1/..."
    fingerprint TEXT NOT NULL,     -- hash of the request parameters
    request_id  TEXT NOT NULL,
    status      INTEGER NOT NULL,
    body        TEXT NOT NULL,
    created     REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS jobs (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    due_at REAL NOT NULL,
    kind   TEXT NOT NULL,
    ref    TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,   -- creation order
    event_id        TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL,                       -- pending | sending | delivered | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    delivered_at    REAL
);

-- Test controls (sandbox/control.py): every /v1 request, oldest first by seq.
CREATE TABLE IF NOT EXISTS request_log (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    at              REAL NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    params          TEXT NOT NULL,                       -- JSON
    idempotency_key TEXT,
    stripe_version  TEXT,                                -- the Stripe-Version header the client sent
    user_agent      TEXT,                                -- who called: an SDK, a script, a test
    status          INTEGER NOT NULL                     -- 0: connection closed without a response
);

-- Every webhook POST (or pull through /_sandbox/deliveries/take), duplicates included.
CREATE TABLE IF NOT EXISTS delivery_sends (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL,
    via         TEXT NOT NULL,                           -- push | take
    duplicate   INTEGER NOT NULL,                        -- 1 for the second copy of an event
    started_at  REAL NOT NULL,
    finished_at REAL NOT NULL,
    status      INTEGER,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS delivery_sends_by_event ON delivery_sends (event_id);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves in transaction().
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # A state directory from before the request log had these columns keeps working.
        logged = {row["name"] for row in self._db.execute("PRAGMA table_info(request_log)")}
        for column in ("stripe_version", "user_agent"):
            if column not in logged:
                self._db.execute(f"ALTER TABLE request_log ADD COLUMN {column} TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run a block atomically and alone. Entry points (an API request, a page action, a
        worker job) each use one, so an operation and the events it emits commit together."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    # -- Stripe objects -------------------------------------------------------------------

    def get(self, object_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT data FROM objects WHERE id = ?", (object_id,))
        return json.loads(rows[0]["data"]) if rows else None

    def put(self, obj: dict[str, Any]) -> None:
        # An upsert keeps the row's position, so all() stays in creation order.
        self._execute(
            "INSERT INTO objects (id, kind, data) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET data = excluded.data",
            (obj["id"], obj["object"], json.dumps(obj)),
        )

    def delete(self, object_id: str) -> None:
        self._execute("DELETE FROM objects WHERE id = ?", (object_id,))

    def all(self, kind: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT data FROM objects WHERE kind = ? ORDER BY rowid", (kind,))
        return [json.loads(row["data"]) for row in rows]

    def all_where(self, kind: str, field: str, values: list[str]) -> list[dict[str, Any]]:
        """Objects of a kind whose top-level `field` is one of `values`, in creation order,
        filtered in SQLite so callers need not decode every object of the kind."""
        if not values:
            return []
        marks = ", ".join("?" for _ in values)
        rows = self._query(
            f"SELECT data FROM objects WHERE kind = ? AND json_extract(data, ?) IN ({marks}) ORDER BY rowid",  # noqa: S608
            (kind, f"$.{field}", *values),
        )
        return [json.loads(row["data"]) for row in rows]

    # -- idempotency ----------------------------------------------------------------------

    def idempotent_result(self, key: str, not_before: float) -> sqlite3.Row | None:
        self._execute("DELETE FROM idempotency WHERE created < ?", (not_before,))
        rows = self._query("SELECT * FROM idempotency WHERE key = ?", (key,))
        return rows[0] if rows else None

    def save_idempotent_result(
        self,
        key: str,
        *,
        endpoint: str,
        fingerprint: str,
        request_id: str,
        status: int,
        body: str,
        created: float,
    ) -> None:
        self._execute(
            "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, endpoint, fingerprint, request_id, status, body, created),
        )

    # -- timed jobs -----------------------------------------------------------------------

    def add_job(self, kind: str, ref: str, due_at: float) -> None:
        self._execute("INSERT INTO jobs (due_at, kind, ref) VALUES (?, ?, ?)", (due_at, kind, ref))

    def due_jobs(self, now: float) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM jobs WHERE due_at <= ? ORDER BY due_at, id", (now,))

    def delete_job(self, job_id: int) -> None:
        self._execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # -- webhook deliveries ---------------------------------------------------------------

    def enqueue_delivery(self, event_id: str, now: float) -> None:
        self._execute(
            "INSERT INTO deliveries (event_id, state, next_attempt_at) VALUES (?, 'pending', ?)",
            (event_id, now),
        )

    def record_attempt(
        self,
        seq: int,
        *,
        state: str,
        next_attempt_at: float,
        status: int | None,
        error: str | None,
        delivered_at: float | None,
    ) -> None:
        self._execute(
            "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
            " last_status = ?, last_error = ?, delivered_at = ? WHERE seq = ?",
            (state, next_attempt_at, status, error, delivered_at, seq),
        )

    def deliveries(self, limit: int) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM deliveries ORDER BY seq DESC LIMIT ?", (limit,))

    def delivery_states(self) -> dict[str, str]:
        """Each queued event's delivery state (pending | sending | delivered | failed)."""
        return {row["event_id"]: row["state"] for row in self._query("SELECT event_id, state FROM deliveries")}

    # -- test controls: request log, delivery claims and sends ----------------------------

    def log_request(
        self,
        *,
        method: str,
        path: str,
        params: str,
        idempotency_key: str | None,
        status: int,
        at: float,
        keep: int,
        stripe_version: str | None = None,
        user_agent: str | None = None,
    ) -> int:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO request_log (at, method, path, params, idempotency_key, stripe_version, user_agent,"
                " status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (at, method, path, params, idempotency_key, stripe_version, user_agent, status),
            )
            seq = cursor.lastrowid
            assert seq is not None
            if seq % 500 == 0:  # prune now and then, not on every insert, down to the newest `keep`
                self._db.execute("DELETE FROM request_log WHERE seq <= ?", (seq - keep,))
            return seq

    def logged_requests(self, after: int, limit: int) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM request_log WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))

    def last_request_seq(self) -> int:
        rows = self._query("SELECT seq FROM sqlite_sequence WHERE name = 'request_log'")
        return int(rows[0]["seq"]) if rows else 0

    def release_claimed_deliveries(self, seq: int | None = None) -> None:
        """Put `sending` deliveries (all of them at start-up, or one) back in the queue."""
        if seq is None:
            self._execute("UPDATE deliveries SET state = 'pending' WHERE state = 'sending'")
        else:
            self._execute("UPDATE deliveries SET state = 'pending' WHERE state = 'sending' AND seq = ?", (seq,))

    def claim_due_delivery(self, now: float, first_delay: float, shuffled: bool) -> sqlite3.Row | None:
        """Mark one due pending delivery `sending` and return it: the oldest, or a random one
        when `shuffled`. A first attempt is due `first_delay` seconds after it was queued."""
        due = (
            "SELECT * FROM deliveries WHERE state = 'pending'"
            " AND next_attempt_at + CASE WHEN attempts = 0 THEN ? ELSE 0 END <= ?"
        )
        with self.transaction():
            rows = self._query(
                due + (" ORDER BY RANDOM() LIMIT 1" if shuffled else " ORDER BY seq LIMIT 1"),
                (first_delay, now),
            )
            if not rows:
                return None
            self._execute("UPDATE deliveries SET state = 'sending' WHERE seq = ?", (rows[0]["seq"],))
            return rows[0]

    def take_pending_deliveries(self, limit: int, now: float) -> list[sqlite3.Row]:
        """Oldest first, up to `limit` pending deliveries, marked delivered (call inside a transaction)."""
        rows = self._query("SELECT * FROM deliveries WHERE state = 'pending' ORDER BY seq LIMIT ?", (limit,))
        for row in rows:
            self._execute(
                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, last_status = NULL,"
                " last_error = NULL, delivered_at = ? WHERE seq = ?",
                (now, row["seq"]),
            )
        return rows

    def record_send(
        self,
        event_id: str,
        *,
        via: str,
        duplicate: bool,
        started_at: float,
        finished_at: float,
        status: int | None,
        error: str | None,
    ) -> None:
        self._execute(
            "INSERT INTO delivery_sends (event_id, via, duplicate, started_at, finished_at, status, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event_id, via, int(duplicate), started_at, finished_at, status, error),
        )

    def sends(self, event_ids: list[str]) -> list[sqlite3.Row]:
        """The sends of these events, oldest first (queried in chunks: SQLite caps bound values)."""
        rows: list[sqlite3.Row] = []
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self._query(f"SELECT * FROM delivery_sends WHERE event_id IN ({marks})", tuple(chunk))  # noqa: S608
        return sorted(rows, key=lambda row: row["id"])
