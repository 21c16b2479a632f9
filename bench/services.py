"""The benchmark's surroundings: its own PostgreSQL database (billing_bench, rebuilt by the migrations
on every run), and the servers it starts on free ports: its own redis-server (so nobody else's FLUSHDB
on the shared one can empty its sessions mid-run), the app and the anchors under gunicorn with
gunicorn.conf.py and the production configuration, the offline Stripe sandbox (`python -m sandbox`,
whose latency the queue benchmarks set), an SMTP sink, and the background worker when a measurement
needs it. Services.close() stops every process it started and drops the database."""

from __future__ import annotations

import http.client
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import redis

from bench import events

# BENCH_DATABASE moves it (two benchmarks at once on one PostgreSQL must not share it).
DATABASE = os.environ.get("BENCH_DATABASE", "billing_bench")
ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DATABASE_DSN = f"host=127.0.0.1 port=5432 user=postgres dbname={DATABASE}"
EVENT_TABLES = ("stripe_event_small", "stripe_event_large")
VENV_BIN = Path(sys.executable).parent
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


# BENCH_PORTS (e.g. 6300-6399) keeps every server the benchmark starts inside a range (a machine shared
# by several benchmarks gives each its own); otherwise the kernel picks free ports.
_PORTS = os.environ.get("BENCH_PORTS", "")
_next_port = int(_PORTS.partition("-")[0]) if _PORTS else 0


def free_port() -> int:
    global _next_port  # the next port of BENCH_PORTS to try
    if not _PORTS:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
            return port
    last = int(_PORTS.partition("-")[2])
    while _next_port <= last:
        candidate, _next_port = _next_port, _next_port + 1
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free port left in BENCH_PORTS={_PORTS}")


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): fields 3 onwards."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def in_turn(names: list[str], number: int) -> list[str]:
    """Round `number`'s order of a benchmark's runs: as given in odd rounds, reversed in even ones (a
    drift over the rounds weighs on every run alike)."""
    return names if number % 2 else names[::-1]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a server so far: the parent's own, its reaped children's (workers gunicorn recycled,
    backends PostgreSQL ended) and its live children's."""
    try:
        utime, stime, cutime, cstime = (int(value) for value in _stat_fields(pid)[11:15])
    except (FileNotFoundError, ProcessLookupError):  # the server went away (PostgreSQL restarted): no figure
        return 0.0
    total = utime + stime + cutime + cstime
    for child in children(pid):
        try:
            total += sum(int(value) for value in _stat_fields(child)[11:13])
        except (FileNotFoundError, ProcessLookupError):  # the child ended between listing and reading
            continue
    return total / TICKS_PER_SECOND


def own_cpu_seconds() -> float:
    """This process and its finished children (wrk): the load generator's CPU."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy so far, all processes and the kernel (/proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_SECOND


def _kilobytes(path: str, *names: str) -> int:
    total = 0
    for line in Path(path).read_text().splitlines():
        name, _, value = line.partition(":")
        if name in names:
            total += int(value.split()[0])
    return total


@dataclass(frozen=True)
class WorkerMemory:
    pid: int
    rss_mb: float
    private_mb: float


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def workers(self) -> list[WorkerMemory]:
        memory = []
        for pid in children(self.process.pid):
            rss = _kilobytes(f"/proc/{pid}/status", "VmRSS")
            private = _kilobytes(f"/proc/{pid}/smaps_rollup", "Private_Clean", "Private_Dirty")
            memory.append(WorkerMemory(pid, rss / 1024, private / 1024))
        return sorted(memory, key=lambda worker: worker.pid)

    def recycled_workers(self) -> int:
        """Workers gunicorn replaced after max_requests, from its log."""
        return self.log.read_text(errors="replace").count("Autorestarting worker")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.process.pid)

    def wait_until_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/")
                connection.getresponse().read()
                connection.close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer on port {self.port}:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # gunicorn: graceful shutdown of its workers
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session, started below
                self.process.wait()


class Services:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        token = secrets.token_hex(16)
        self.webhook_secret = f"whsec_bench_{token}"
        self.servers: list[Server] = []
        sandbox_port, redis_port, mail_port = free_port(), free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.env = {
            **os.environ,
            "APP_ENV": "production",
            "SECRET_KEY": secrets.token_urlsafe(48),
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{DATABASE}",
            "REDIS_URL": self.redis_url,
            "STRIPE_SECRET_KEY": f"sk_test_bench_{token}",
            "STRIPE_ALLOW_TEST_KEY_IN_PRODUCTION": "1",  # the sandbox takes test keys only
            "STRIPE_WEBHOOK_SECRET": self.webhook_secret,
            "STRIPE_API_BASE": f"http://127.0.0.1:{sandbox_port}",
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_PORT": str(mail_port),
            "MAIL_DEFAULT_SENDER": "Ledgerline Billing <billing@bench.example>",
            "APP_BASE_URL": "https://billing.bench.example",
            # One TLS-terminating proxy in front, as in production; the generators send its headers.
            "TRUSTED_PROXY_COUNT": "1",
            "FLASK_APP": "wsgi.py",
        }
        self._redis_port, self._mail_port = redis_port, mail_port
        self.sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        self._sandbox_port = sandbox_port
        self.worker: Server | None = None
        self._event_table_in_place = "stripe_event_webhook_runs"  # the name the app's own table takes when moved

    def __enter__(self) -> Services:
        try:
            self._start_redis()
            self._create_database()
            self.sandbox = self._start(
                "sandbox",
                [sys.executable, "-m", "sandbox"],
                self._sandbox_port,
                SANDBOX_PORT=str(self._sandbox_port),
                SANDBOX_STATE_DIR=str(self.workdir / "sandbox"),
                SANDBOX_WEBHOOK_URL="http://127.0.0.1:9/unused",
                SANDBOX_WEBHOOK_SECRET=self.webhook_secret,
                SANDBOX_DELIVERY_MODE="hold",  # the benchmark delivers its own events
            )
            mail_sink = [sys.executable, "scripts/mail-sink", str(self._mail_port)]
            self._start("mail-sink", mail_sink, self._mail_port, MAIL_SINK_DIR=str(self.workdir / "mail"))
            self.app = self._start_gunicorn("app", "wsgi:app")
            self.anchor = self._start_gunicorn("anchor", "bench.anchor:app")
            for server in (self.sandbox, self.app, self.anchor):
                server.wait_until_serving()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()
        self._admin(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")

    # --- processes --------------------------------------------------------------------------------

    def _start(self, name: str, command: list[str], port: int, **env: str) -> Server:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as output:  # a server started again (restart_app) keeps its earlier lines
            process = subprocess.Popen(  # noqa: S603 (our own commands)
                command,
                env={**self.env, **env},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the benchmark, which stops these in order
            )
        server = Server(name, port, process, log)
        self.servers.append(server)
        return server

    def _start_redis(self) -> None:
        """A redis-server of the benchmark's own: the same binary as the shared one, no persistence."""
        command = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self._redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        server = self._start("redis", command, self._redis_port)
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server did not answer on port {self._redis_port}:\n{server.log_tail()}")

    def start_worker(self, concurrency: int) -> Server:
        """`flask billing worker`, as ops run it, beside the app."""
        command = [str(VENV_BIN / "flask"), "billing", "worker", "--concurrency", str(concurrency)]
        self.worker = self._start("worker", command, 0, WORKER_CONCURRENCY=str(concurrency))
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.servers.remove(self.worker)
            self.worker = None

    def set_stripe_latency(self, seconds: float) -> None:
        """Every Stripe API answer from now on takes this long (the sandbox's /_sandbox/latency)."""
        body = f'{{"seconds": {seconds}}}'.encode()
        connection = http.client.HTTPConnection("127.0.0.1", self._sandbox_port, timeout=10)
        connection.request("POST", "/_sandbox/latency", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        connection.close()
        if response.status != 200:
            raise RuntimeError(f"the sandbox refused latency {seconds}: {response.status}")

    def restart_app(self, **env: str) -> None:
        """The app again on the same port, with these settings on top (the anchors are left alone)."""
        port = self.app.port
        self.app.stop()
        self.servers.remove(self.app)
        self.app = self._start_gunicorn("app", "wsgi:app", port=port, **env)
        self.app.wait_until_serving()

    def _start_gunicorn(self, name: str, target: str, port: int | None = None, **env: str) -> Server:
        port = port or free_port()
        # Its own control socket, so it neither takes nor clobbers the default one of another gunicorn.
        control = self.workdir / f"{name}.ctl"
        command = [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", f"--control-socket={control}", target]
        return self._start(name, command, port, GUNICORN_BIND=f"127.0.0.1:{port}", **env)

    # --- PostgreSQL ---------------------------------------------------------------------------------

    @staticmethod
    def _admin(sql: str) -> None:
        connection = psycopg2.connect(ADMIN_DSN)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql)
        connection.close()

    def _create_database(self) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        self._admin(f"CREATE DATABASE {DATABASE}")
        migrate = [str(VENV_BIN / "flask"), "db", "upgrade"]
        result = subprocess.run(migrate, env=self.env, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode:
            raise RuntimeError(f"the migrations failed on {DATABASE}:\n{result.stderr}")
        with self.sql() as cursor:
            cursor.execute(
                "CREATE TABLE anchor_event (LIKE stripe_event INCLUDING ALL);"
                "ALTER TABLE anchor_event ALTER id DROP DEFAULT, ALTER id ADD GENERATED BY DEFAULT AS IDENTITY"
            )
            cursor.execute(
                "INSERT INTO organization (name, tier, billing_status, billing_customer_id, billing_subscription_id, "
                "cancel_at_period_end, created_at, updated_at) "
                "SELECT 'Bench organization ' || g, 'pro', 'active', 'cus_bench_' || g, 'sub_bench_' || g, false, "
                "now(), now() FROM generate_series(0, %s) AS g",
                (events.ORGANIZATIONS - 1,),
            )
        self.seed_duplicates()

    @contextmanager
    def sql(self) -> Iterator[Any]:
        """A cursor on the benchmark database, committed at the end of the block."""
        connection = psycopg2.connect(DATABASE_DSN)
        try:
            with connection, connection.cursor() as cursor:
                yield cursor
        finally:
            connection.close()

    def maintain(self) -> None:
        """What a quiet production table would have had: statistics, the visibility map, and no dirty
        pages left for a checkpoint to write during the next measurement: the whole database vacuumed
        and analyzed, then a CHECKPOINT, at once."""
        self.quiesce(None, timeout=0)

    def quiesce(self, tables: tuple[str, ...] | None = (), timeout: float = 60) -> None:
        """Before a measured run: the database as quiet as the previous run's work lets it be, so no run
        pays for another's. Waits (up to `timeout`) until no other client holds a statement or a
        transaction open and no autovacuum worker runs, vacuums `tables` (what the last runs inserted
        there would otherwise start an autovacuum during the next run; None: the whole database) and
        takes a CHECKPOINT (its dirty pages are written now, not during the next run). Every run then
        starts from the same state: right after a checkpoint, with nothing in the background."""
        connection = psycopg2.connect(DATABASE_DSN)
        connection.autocommit = True
        deadline = time.monotonic() + timeout
        try:
            with connection.cursor() as cursor:
                while time.monotonic() < deadline:
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND ("
                        "(datname = current_database() AND backend_type = 'client backend' AND state <> 'idle')"
                        " OR backend_type = 'autovacuum worker')"
                    )
                    if cursor.fetchone()[0] == 0:
                        break
                    time.sleep(0.25)
                for table in tables if tables is not None else [""]:  # "": VACUUM's whole database
                    cursor.execute(f"VACUUM (ANALYZE) {table}")
                cursor.execute("CHECKPOINT")
        finally:
            connection.close()

    def _store_processed_events(self, table: str, first: int, last: int) -> None:
        """Events first..last stored in table as the app leaves an event it applied, in one INSERT ... SELECT
        generate_series; each payload is the one events.fill() gives event k, filled by SQL replace()."""
        with self.sql() as cursor:
            cursor.execute(
                f"INSERT INTO {table} (event_id, type, api_version, livemode, stripe_created, payload, status, "  # noqa: S608
                "outcome, attempts, received_at, processed_at) "
                "SELECT 'evt_bench_' || k, 'customer.subscription.updated', %(version)s, false, created, "
                "replace(replace(replace(replace(%(template)s, '@K@', k::text), "
                "'@ORG@', (k %% %(organizations)s)::text), '@CREATED@', created::text), "
                "'@PERIOD_END@', (created + %(period)s)::text), "
                "'processed', 'applied: organization.billing_dates_changed', 1, now(), now() "
                "FROM generate_series(%(first)s::bigint, %(last)s) AS k, "
                "LATERAL (SELECT %(first_created)s + %(between)s * (k / %(organizations)s)) AS c(created)",
                {
                    "version": events.STRIPE_API_VERSION,
                    "template": events.subscription_updated_template(),
                    "organizations": events.ORGANIZATIONS,
                    "first_created": events.FIRST_CREATED,
                    "between": events.SECONDS_BETWEEN_PASSES,
                    "period": events.PERIOD_SECONDS,
                    "first": first,
                    "last": last,
                },
            )

    def seed_duplicates(self, table: str = "stripe_event") -> None:
        """Events 0 .. DUPLICATES-1, stored as processed: what the duplicate runs redeliver."""
        self._store_processed_events(table, 0, events.DUPLICATES - 1)

    def build_event_tables(self, large_rows: int) -> None:
        """Two more tables shaped like stripe_event, for the idempotency runs: stripe_event_small holds only
        the duplicates, stripe_event_large holds them and bulk-loaded events up to large_rows rows."""
        with self.sql() as cursor:
            for table in EVENT_TABLES:
                cursor.execute(f"CREATE TABLE {table} (LIKE stripe_event INCLUDING ALL)")
        for table in EVENT_TABLES:
            self.seed_duplicates(table)
        bulk_first = events.BULK_FIRST
        self._store_processed_events("stripe_event_large", bulk_first, bulk_first + large_rows - events.DUPLICATES - 1)

    def use_event_table(self, table: str) -> None:
        """Rename table to stripe_event, in one transaction, and give the one there its own name back, so
        the app's next statements run on table."""
        with self.sql() as cursor:
            cursor.execute(f"ALTER TABLE stripe_event RENAME TO {self._event_table_in_place}")
            cursor.execute(f"ALTER TABLE {table} RENAME TO stripe_event")
        self._event_table_in_place = table

    def dedupe_lookup(self) -> tuple[int, float, float]:
        """The app's duplicate check for one stored event: (buffers it touches, its execution time in
        ms, the size of the event_id index in MB)."""
        with self.sql() as cursor:
            cursor.execute(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT status FROM stripe_event WHERE event_id = %s",
                (f"evt_bench_{events.DUPLICATES // 2}",),
            )
            explained = cursor.fetchone()[0][0]
            cursor.execute(
                "SELECT pg_relation_size(indexrelid) FROM pg_index JOIN pg_attribute ON attrelid = indrelid "
                "AND attnum = indkey[0] WHERE indrelid = 'stripe_event'::regclass AND indisunique AND indnatts = 1 "
                "AND attname = 'event_id'"
            )
            index_bytes = cursor.fetchone()[0]
        plan = explained["Plan"]
        return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"], explained["Execution Time"], index_bytes / 2**20

    def event_outcomes(self) -> list[tuple[str, str, str, int, int]]:
        """What the app recorded: (type, status, outcome, events, deliveries) for every stored event."""
        with self.sql() as cursor:
            # One line per kind of outcome: the made-up subscription's number is left out.
            cursor.execute(
                "SELECT type, status, regexp_replace(coalesce(outcome, last_error, ''), 'sub_bench_[0-9]+', "
                "'sub_bench_…'), count(*), sum(attempts) FROM stripe_event GROUP BY 1, 2, 3 ORDER BY 4 DESC"
            )
            return [tuple(row) for row in cursor.fetchall()]

    def versions(self) -> str:
        with self.sql() as cursor:
            cursor.execute("SHOW server_version")
            postgresql = cursor.fetchone()[0]
        redis_version = redis.Redis.from_url(self.redis_url).info("server")["redis_version"]
        return f"PostgreSQL {postgresql}, Redis {redis_version}"

    def postmaster_pid(self) -> int:
        """PostgreSQL's postmaster: the parent of a backend, read while that backend is alive."""
        with self.sql() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend: int = cursor.fetchone()[0]
            return int(_stat_fields(backend)[1])
