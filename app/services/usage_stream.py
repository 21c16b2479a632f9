"""Sending a large reporting run through Stripe's v2 meter event stream.

Stripe's v1 meter events take one event a request (1,000 requests/s live); the v2 stream takes up to
100 events a request (10,000 requests/s live), authenticated by a meter event session's token, valid
for 15 minutes. usage_reports.send_pending hands a run here when it has more pending reports than
USAGE_STREAM_THRESHOLD (0: never); below it, v1 stays (it validates synchronously, so a refusal is
known at once).

- The reports go in requests of up to 100, each event with the report's deterministic identifier,
  the same one v1 would send: Stripe counts an identifier once within 24 hours whichever API carried
  it, so a request whose answer was lost, sent again, is counted once.
- A request Stripe accepted marks its reports `sent`. Stripe validates streamed events later: a refused
  one comes back as v1.billing.meter.error_report_triggered, which fails its report
  (usage_reports.apply_error_report).
- The session is kept in process (the app's extensions) and reused until a minute before it expires
  (its lifetime counted on our clock from when it was opened, so a skewed clock does not matter), then
  renewed; a request refused for an expired or unknown token renews it once and is sent again.
  Not in Redis: the token is a bearer credential for our account's usage, one reporter runs at a time,
  and a worker process that opens its own session costs one request per 15 minutes.
- A request Stripe refuses as a whole (a 400: Stripe checks a request's shape at once and each event
  later) took none of its events. It is split in halves, each sent on its own, until the event that
  makes it refused stands alone: that report becomes `failed` with Stripe's words (`flask billing
  usage`, `flask billing status`), the others are sent, each once. One bad event in 100 costs at most
  14 more requests; a refusal that does not come back (Stripe's own hiccup) costs one.
- A failure that may pass (connection, timeout, 5xx, 429) is tried again in the run, up to
  USAGE_STREAM_RETRIES times (default 2), after 1, 2, 4... x USAGE_STREAM_RETRY_SECONDS (jittered),
  every try taking its turn from the shared pace (a 429 pauses every process for its Retry-After).
  Still failing, the request's reports and the rest stay `pending` with the error noted and the run
  stops, as v1's does; the next run (a minute later) tries again, within the 20-hour bound.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from flask import current_app
from sqlalchemy import update

from app import clock
from app.extensions import db
from app.models import UsageReport, UsageReportStatus
from app.services.billing_common import committed

BATCH = 100  # Stripe's most events in one stream request
RENEW_BEFORE = timedelta(seconds=60)  # a session this close to its end is renewed before use
SESSION_KEY = "stripe_meter_event_session"


class NewSession(Protocol):  # Stripe's v2.billing.meter_event_session
    authentication_token: str
    created: str
    expires_at: str


OpenSession = Callable[[], NewSession]
Stream = Callable[[str, list[Any]], None]  # (token, events); raises SessionExpired, RequestRefused


@dataclass(frozen=True)
class MeterEventToSend:
    """One usage report on its way to Stripe (usage_reports.pending gathers them; v1 or the stream sends)."""

    report_id: int
    identifier: str
    event_name: str
    customer_id: str
    quantity: int
    timestamp: int
    created_at: datetime


class ReportRun(Protocol):  # usage_reports.ReportRun
    sent: int
    failed: int
    still_pending: int
    errors: list[str]


class SessionExpired(Exception):
    """Stripe refused the session's token (expired or unknown): open a new session."""


class RequestRefused(Exception):
    """Stripe refused the request as a whole, for good (a 400): it took none of its events."""


def refusal(exc: Exception, whole: type[Exception]) -> Exception:
    """A stream request's 4xx as the stream sees it: of the `whole` kind (the SDK's 400), a refusal of
    the request for good; otherwise (401: the token expired or unknown) a session to renew."""
    words = getattr(exc, "user_message", None) or str(exc)
    return RequestRefused(words) if isinstance(exc, whole) else SessionExpired(words)


@dataclass(frozen=True)
class Session:
    token: str
    expires_at: datetime


def threshold() -> int:
    return int(current_app.config.get("USAGE_STREAM_THRESHOLD", 0) or 0)


def wanted(count: int) -> bool:
    """Whether a run with `count` reports to send goes through the stream."""
    limit = threshold()
    return limit > 0 and count > limit


def stream_event(event: MeterEventToSend) -> dict[str, Any]:
    return {
        "event_name": event.event_name,
        "identifier": event.identifier,
        "timestamp": datetime.fromtimestamp(event.timestamp, UTC).isoformat().replace("+00:00", "Z"),
        "payload": {"stripe_customer_id": event.customer_id, "value": str(event.quantity)},
    }


def _session(open_session: OpenSession, *, renew: bool = False) -> Session:
    held: Session | None = current_app.extensions.get(SESSION_KEY)
    if held is None or renew or held.expires_at - RENEW_BEFORE <= clock.utcnow():
        opened = open_session()
        lifetime = _moment(opened.expires_at) - _moment(opened.created)  # on our clock: skew does not matter
        held = Session(opened.authentication_token, clock.utcnow() + lifetime)
        current_app.extensions[SESSION_KEY] = held
    return held


def _moment(rfc3339: str) -> datetime:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))


def send(to_send: Sequence[MeterEventToSend], open_session: OpenSession, stream: Stream, run: ReportRun) -> None:
    """Stream the reports (no transaction open while Stripe answers); marks them as send_pending does.
    A request Stripe refuses whole is split in halves, each sent on its own, until the refused event
    stands alone: it fails with Stripe's words, every other event is sent (once: a refused request
    took none of them). Anything else still failing after the retries stops the run."""
    queue = [list(to_send[start : start + BATCH]) for start in range(0, len(to_send), BATCH)]
    while queue:
        batch = queue.pop(0)
        try:
            _request(batch, open_session, stream)
        except RequestRefused as exc:
            if len(batch) > 1:
                middle = len(batch) // 2
                queue[:0] = [batch[:middle], batch[middle:]]
                continue
            words = f"refused by Stripe's meter event stream: {exc}"[:2000]
            _mark_failed(batch[0].report_id, words)
            run.failed += 1
            run.errors.append(f"{batch[0].identifier}: {words}")
            continue
        except Exception as exc:  # connection, 5xx, 429 after the retries: the next run sends them again
            _note_attempts([event.report_id for event in batch], f"{type(exc).__name__}: {exc}")
            run.still_pending += len(batch) + sum(len(rest) for rest in queue)
            run.errors.append(f"stream request of {len(batch)} ({batch[0].identifier}...): {exc}")
            return
        _mark_sent([event.report_id for event in batch])
        run.sent += len(batch)


def _request(batch: list[MeterEventToSend], open_session: OpenSession, stream: Stream) -> None:
    """One stream request, renewing an expired session once; a failure that may pass (connection,
    timeout, 5xx, 429) is tried again up to USAGE_STREAM_RETRIES times, after a growing, jittered pause
    (USAGE_STREAM_RETRY_SECONDS x 1, 2, 4...). Each try takes its turn from the shared pace
    (stripe_pace.py), which also holds it while a 429's Retry-After pauses every process."""
    events = [stream_event(event) for event in batch]
    retries = int(current_app.config.get("USAGE_STREAM_RETRIES", 2))
    base = float(current_app.config.get("USAGE_STREAM_RETRY_SECONDS", 1.0))
    for attempt in range(retries + 1):
        try:
            try:
                stream(_session(open_session).token, events)
            except SessionExpired:
                stream(_session(open_session, renew=True).token, events)
            return
        except RequestRefused:
            raise  # for good: not worth a retry
        except Exception:
            if attempt >= retries:
                raise
            time.sleep(base * 2**attempt * (1 + random.random() / 2))  # noqa: S311  (jitter)


def _mark_sent(report_ids: list[int]) -> None:
    with committed():
        db.session.execute(
            update(UsageReport)
            .where(UsageReport.id.in_(report_ids), UsageReport.status == UsageReportStatus.PENDING)
            .values(status=UsageReportStatus.SENT, attempts=UsageReport.attempts + 1, last_error=None)
            .values(sent_at=clock.utcnow())
        )


def _mark_failed(report_id: int, error: str) -> None:
    with committed():
        db.session.execute(
            update(UsageReport)
            .where(UsageReport.id == report_id, UsageReport.status == UsageReportStatus.PENDING)
            .values(status=UsageReportStatus.FAILED, attempts=UsageReport.attempts + 1, last_error=error)
        )


def _note_attempts(report_ids: list[int], error: str) -> None:
    with committed():
        db.session.execute(
            update(UsageReport)
            .where(UsageReport.id.in_(report_ids))
            .values(attempts=UsageReport.attempts + 1, last_error=error[:2000])
        )
