"""Outgoing email: one message, plain text and HTML, rendered from app/templates/email/<name>.txt and
<name>.html and sent over SMTP with Flask-Mailman's settings (MAIL_SERVER, MAIL_PORT, MAIL_USE_TLS,
MAIL_USE_SSL, MAIL_USERNAME, MAIL_PASSWORD, MAIL_DEFAULT_SENDER).

`send_email` returns only once the SMTP server has accepted the message and raises otherwise, so a
caller that records "sent" after it returns never records a message the server refused. Services do
not call it from a request: they record a domain event and an outbox consumer (app/services/outbox.py)
sends the email from the worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask import current_app, render_template
from flask_mailman import EmailMultiAlternatives

from app.services.domain_events import OutboxEvent


class EmailNotSent(RuntimeError):
    """The SMTP server did not accept the message (connection refused, rejected, timed out)."""


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def render_email(template: str, *, subject: str, **context: Any) -> RenderedEmail:
    """Render email/<template>.txt and email/<template>.html with ``context`` (and ``subject``)."""
    context = {"subject": subject, "base_url": current_app.config["APP_BASE_URL"], **context}
    return RenderedEmail(
        subject=subject,
        text=render_template(f"email/{template}.txt", **context),
        html=render_template(f"email/{template}.html", **context),
    )


def send_email(
    to: str | Sequence[str],
    template: str,
    *,
    subject: str,
    reply_to: Sequence[str] = (),
    headers: dict[str, str] | None = None,
    **context: Any,
) -> RenderedEmail:
    """Render ``template`` and send it to ``to``; returns what was sent once the server accepted it."""
    recipients = [to] if isinstance(to, str) else list(to)
    if not recipients or not all(recipients):
        raise ValueError("an email needs at least one recipient address")
    rendered = render_email(template, subject=subject, **context)
    message = EmailMultiAlternatives(
        subject=rendered.subject,
        body=rendered.text,
        to=recipients,
        reply_to=list(reply_to),
        headers=headers or {},
    )
    message.attach_alternative(rendered.html, "text/html")
    try:
        accepted = message.send(fail_silently=False)
    except (OSError, ValueError) as exc:  # smtplib's errors are OSErrors
        raise EmailNotSent(f"{template} to {', '.join(recipients)}: {type(exc).__name__}: {exc}") from exc
    if accepted != 1:
        raise EmailNotSent(f"{template} to {', '.join(recipients)}: the mail backend sent nothing")
    return rendered


def send_event_email(
    event: OutboxEvent, to: str | Sequence[str], template: str, /, *, subject: str, **context: Any
) -> RenderedEmail:
    """send_email for an outbox consumer: the message names the domain event it is sent for in its
    X-Ledgerline-Event header (<event name>:<event id>). ``context`` may hold the event itself too."""
    return send_email(
        to, template, subject=subject, headers={"X-Ledgerline-Event": f"{event.name}:{event.id}"}, **context
    )
