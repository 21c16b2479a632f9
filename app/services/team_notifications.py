"""Teammate emails, sent by outbox consumers (app/services/outbox.py) from the worker. The invitation
email carries the signed accept link, made here from the invitation's row: the domain event and the
database hold no usable token."""

from __future__ import annotations

from email.utils import parseaddr

from flask import current_app
from sqlalchemy import select

from app.extensions import db
from app.models import Invitation, InvitationStatus, Organization, User
from app.models.types import utcnow
from app.services import outbox
from app.services.mailer import send_event_email
from app.services.outbox import OutboxEvent
from app.services.team_service import accept_url


@outbox.consumer("team.invitation_sent", name="invitation_email")
def invitation_email(event: OutboxEvent) -> None:
    invitation = db.session.get(Invitation, event.data.get("invitation_id") or 0)
    organization = db.session.get(Organization, event.organization_id or 0)
    inviter = db.session.get(User, event.user_id or 0)
    db.session.rollback()  # read; no transaction stays open while SMTP answers
    if invitation is None or organization is None:
        current_app.logger.warning("team.invitation_sent %s: the invitation is gone", event.id)
        return
    if invitation.status != InvitationStatus.PENDING or invitation.expires_at <= utcnow():
        return  # withdrawn, replaced, used or expired before the worker got to it: nothing to send
    account = db.session.execute(
        # A removed teammate's account does not count: accepting gives the address back (TeamService.accept).
        select(User.organization_id).where(User.email == invitation.email, User.removed_at.is_(None))
    ).scalar_one_or_none()
    db.session.rollback()
    if account is not None and account != organization.id:
        # The address has an account with another organization, which the inviter was not told: the
        # mailbox learns it, with no link (an address belongs to one organization).
        send_event_email(
            event,
            invitation.email,
            "invitation_existing_account",
            subject=f"Invitation to {organization.name} on Ledgerline",
            organization=organization,
            inviter=inviter,
            report_to=abuse_report_address(),
        )
        return
    send_event_email(
        event,
        invitation.email,
        "invitation",
        subject=f"Join {organization.name} on Ledgerline",
        organization=organization,
        inviter=inviter,
        accept_url=accept_url(invitation.id, invitation.email),
        expires_at=invitation.expires_at,
        report_to=abuse_report_address(),
    )


def abuse_report_address() -> str:
    """Where a recipient reports an invitation they did not want: ABUSE_REPORT_EMAIL, else the address
    the emails come from."""
    return str(current_app.config.get("ABUSE_REPORT_EMAIL") or parseaddr(current_app.config["MAIL_DEFAULT_SENDER"])[1])
