"""Statements PostgreSQL parses and plans once per connection instead of once per execution.

psycopg2 sends every statement as text, and PostgreSQL plans it each time. For a hot statement with
a CTE and a join (the usage API's insert, which also checks the API key) planning costs more than
running it: 0.47 ms of planning against 0.04 ms of execution, measured with EXPLAIN (ANALYZE,
SUMMARY); the store-only anchor's plain INSERT plans in 0.02 ms. A `PreparedStatement` is PREPAREd
on a pooled connection the first time it runs there (remembered in the DBAPI connection's `info`,
which lives exactly as long as that connection: a reconnect after a restart prepares again), then
run with EXECUTE. PostgreSQL keeps a prepared statement until the connection closes (a rolled-back
transaction does not remove it) and re-plans it by itself after DDL on its tables.

PostgreSQL only; callers use their portable statement elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, CursorResult

_NAMED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_PREPARED_KEY = "prepared_statements"


class PreparedStatement:
    """`sql` with `:name` parameters, each given a PostgreSQL type in `types` (in any order)."""

    def __init__(self, name: str, sql: str, types: Mapping[str, str]) -> None:
        order: list[str] = []

        def positional(match: re.Match[str]) -> str:
            parameter = match.group(1)
            if parameter not in types:
                raise ValueError(f"{name}: no type for :{parameter}")
            if parameter not in order:
                order.append(parameter)
            return f"${order.index(parameter) + 1}"

        body = _NAMED.sub(positional, sql)
        self.name = name
        self.prepare = f"PREPARE {name} ({', '.join(types[p] for p in order)}) AS {body}"
        self.order = tuple(order)
        # Run as the driver's own SQL with positional values: no textual statement to compile and no
        # bind processing on each run (about 70 µs of CPU less per run than a text() construct, measured
        # on the usage API's batch insert), and still through the Connection: its events, its
        # transaction, and its handling of a lost connection.
        self.run = f"EXECUTE {name} ({', '.join('%s' for _ in order)})"

    def execute(self, connection: Connection, parameters: Mapping[str, Any]) -> CursorResult[Any]:
        """Run it on `connection` (in its transaction), preparing it there first if need be."""
        prepared: set[str] = connection.connection.info.setdefault(_PREPARED_KEY, set())
        if self.name not in prepared:
            connection.exec_driver_sql(self.prepare)
            prepared.add(self.name)
        return connection.exec_driver_sql(self.run, tuple(parameters[name] for name in self.order))
