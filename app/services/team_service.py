"""Teammates: an organization's members and the owner's invitations, within the seats the plan pays for.

An invitation is a row; the link sent by email carries a token signed with the app's secret over the
row's id and email (itsdangerous), so the database holds nothing that opens it. It works once (a
conditional update pending -> accepted), until it expires, and not after it is revoked or replaced.
Seats are counted under the organization's row lock (no Stripe call is ever made while it is held):
members plus open invitations never exceed the seats paid for. Billing stays the owner's; members never
see it (app/billing/routes.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from app.extensions import db
from app.models import Invitation, InvitationStatus, Organization, User, UserRole
from app.models.types import utcnow
from app.services import domain_events
from app.services.auth_service import hash_password, normalise_email, release_removed_address
from app.services.entitlements import Entitlements, SeatUse, for_organization

INVITATION_SALT = "team-invitation"


class TeamError(Exception):
    """A team action was refused; the message is for the person who asked."""


class EmailNotVerified(TeamError):
    """The inviter has not confirmed their email address yet."""


class SeatLimitReached(TeamError):
    """No seat is free: the owner is offered to buy seats."""


class InvitationInvalid(TeamError):
    pass


@dataclass(frozen=True)
class Team:
    members: list[User]
    invitations: list[Invitation]  # open ones, newest first
    seats: SeatUse
    entitlements: Entitlements


@dataclass(frozen=True)
class InvitationSent:
    invitation_id: int
    email: str
    expires_at: datetime  # the link itself goes to the mailbox only (team_notifications)


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=INVITATION_SALT)


def invitation_token(invitation_id: int, email: str) -> str:
    return _serializer().dumps({"invitation": invitation_id, "email": email})


def accept_url(invitation_id: int, email: str) -> str:
    return f"{current_app.config['APP_BASE_URL']}/team/join/{invitation_token(invitation_id, email)}"


def _ttl() -> timedelta:
    return timedelta(hours=current_app.config["INVITATION_TTL_HOURS"])


class TeamService:
    @staticmethod
    def seat_use(organization: Organization) -> SeatUse:
        entitlements = _entitlements(organization)
        members = db.session.execute(
            select(func.count(User.id)).where(User.organization_id == organization.id, User.removed_at.is_(None))
        ).scalar_one()
        invitations = db.session.execute(
            select(func.count(Invitation.id)).where(
                Invitation.organization_id == organization.id,
                Invitation.status == InvitationStatus.PENDING,
                Invitation.expires_at > utcnow(),
            )
        ).scalar_one()
        return SeatUse(members=members, pending_invitations=invitations, seats=entitlements.seats)

    @classmethod
    def team(cls, organization: Organization) -> Team:
        members = list(
            db.session.execute(
                select(User)
                .where(User.organization_id == organization.id, User.removed_at.is_(None))
                .order_by(User.role.desc(), User.created_at)
            ).scalars()
        )
        invitations = list(
            db.session.execute(
                select(Invitation)
                .where(
                    Invitation.organization_id == organization.id,
                    Invitation.status == InvitationStatus.PENDING,
                    Invitation.expires_at > utcnow(),
                )
                .order_by(Invitation.created_at.desc())
            ).scalars()
        )
        return Team(members, invitations, cls.seat_use(organization), _entitlements(organization))

    @classmethod
    def invite(cls, organization_id: int, email: str, *, actor_user_id: int) -> InvitationSent:
        """Invite a teammate, replacing an open invitation to the same email. Refused beyond the seats."""
        email = normalise_email(email)
        try:
            inviter = db.session.get(User, actor_user_id)
            if inviter is None or not inviter.email_verified:
                # Invitations go out in the owner's name: the address must be shown to be theirs first.
                raise EmailNotVerified(
                    "Confirm your email address first (use the link we sent you, or send a new one from your "
                    "account page); then you can invite teammates."
                )
            organization = _lock_organization(organization_id)
            existing = db.session.execute(select(User).where(User.email == email)).scalar_one_or_none()
            # The owner knows their own members; whether an address has an account elsewhere is not theirs
            # to learn: that invitation is made and answered like any other, and its email tells the
            # mailbox instead (team_notifications.invitation_email).
            if existing is not None and existing.organization_id == organization_id and not existing.removed_at:
                raise TeamError("That email already belongs to a member of this organization.")
            replaced = db.session.execute(
                update(Invitation)
                .where(
                    Invitation.organization_id == organization_id,
                    Invitation.email == email,
                    Invitation.status == InvitationStatus.PENDING,
                )
                .values(status=InvitationStatus.REVOKED, finished_at=utcnow())
                .returning(Invitation.id)
            ).all()
            seats = cls.seat_use(organization)
            if seats.over_limit:
                raise SeatLimitReached(
                    f"Your organization has {seats.members} members but {seats.seats} seats. Buy seats or remove "
                    "members before inviting anyone."
                )
            if not seats.can_invite:
                raise SeatLimitReached(
                    f"All {seats.seats} seats are taken ({seats.members} members, {seats.pending_invitations} "
                    "open invitations). Buy more seats to invite another teammate."
                )
            invitation = Invitation(
                organization_id=organization_id,
                email=email,
                status=InvitationStatus.PENDING,
                invited_by_user_id=actor_user_id,
                expires_at=utcnow() + _ttl(),
            )
            db.session.add(invitation)
            db.session.flush()
            domain_events.record(
                "team.invitation_sent",
                organization_id=organization_id,
                user_id=actor_user_id,
                source=f"user:{actor_user_id}",
                invitation_id=invitation.id,
                email=email,
                expires_at=invitation.expires_at.isoformat(),
                replaced_invitation_ids=[row.id for row in replaced],
            )
            sent = InvitationSent(invitation.id, email, invitation.expires_at)
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise
        return sent

    @staticmethod
    def read_invitation(token: str) -> Invitation:
        """The open invitation a link stands for, or InvitationInvalid saying why not."""
        try:
            payload: Any = _serializer().loads(token, max_age=int(_ttl().total_seconds()))
        except SignatureExpired:
            raise InvitationInvalid("This invitation has expired. Ask for a new one.") from None
        except BadSignature:
            raise InvitationInvalid("This invitation link is not valid.") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("invitation"), int):
            raise InvitationInvalid("This invitation link is not valid.")
        invitation = db.session.get(Invitation, payload["invitation"])
        if invitation is None or invitation.email != payload.get("email"):
            raise InvitationInvalid("This invitation link is not valid.")
        if invitation.status == InvitationStatus.ACCEPTED:
            raise InvitationInvalid("This invitation has already been used. Sign in instead.")
        if invitation.status == InvitationStatus.REVOKED:
            raise InvitationInvalid("This invitation was withdrawn. Ask for a new one.")
        if invitation.expires_at <= utcnow():
            raise InvitationInvalid("This invitation has expired. Ask for a new one.")
        return invitation

    @classmethod
    def accept(cls, token: str, *, name: str, password: str) -> User:
        """The invitee joins as a member with this name and password; the link is spent."""
        invitation = cls.read_invitation(token)
        try:
            organization = _lock_organization(invitation.organization_id)
            seats = cls.seat_use(organization)
            # The open invitation is counted in seats.in_use; accepting turns it into a member.
            if seats.members >= seats.seats:
                raise SeatLimitReached(
                    "Your organization has no free seat right now. Ask its owner to add seats, then open this "
                    "link again."
                )
            spent = db.session.execute(
                update(Invitation)
                .where(
                    Invitation.id == invitation.id,
                    Invitation.status == InvitationStatus.PENDING,
                    Invitation.expires_at > utcnow(),
                )
                .values(status=InvitationStatus.ACCEPTED, finished_at=utcnow())
            )
            if spent.rowcount != 1:  # type: ignore[attr-defined]
                raise InvitationInvalid("This invitation has already been used. Sign in instead.")
            user = db.session.execute(select(User).where(User.email == invitation.email)).scalar_one_or_none()
            if user is not None and user.organization_id == organization.id and user.removed_at is not None:
                user.removed_at = None  # a removed member invited back: new password and role, old sessions end
                user.name, user.password_hash, user.role = name, hash_password(password), UserRole.MEMBER
                user.session_epoch = User.session_epoch + 1
            elif user is not None and user.removed_at is None:
                raise InvitationInvalid("That email already has an account. Sign in instead.")
            else:
                if user is not None:  # removed from another organization: the address is its mailbox's again
                    release_removed_address(invitation.email, source="web")
                user = User(
                    organization_id=organization.id,
                    email=invitation.email,
                    name=name,
                    password_hash=hash_password(password),
                    role=UserRole.MEMBER,
                )
                db.session.add(user)
            # The invitation was emailed to this address and its link binds it: opening it proves the
            # mailbox, as a verification or password-reset link does, so no separate confirmation is due.
            user.email_verified_at = user.email_verified_at or utcnow()
            db.session.flush()
            invitation.accepted_user_id = user.id
            domain_events.record(
                "team.invitation_accepted",
                organization_id=organization.id,
                user_id=user.id,
                source=f"user:{user.id}",
                invitation_id=invitation.id,
            )
            domain_events.record(
                "user.created",
                organization_id=organization.id,
                user_id=user.id,
                source=f"user:{user.id}",
                role="member",
            )
            db.session.commit()
        except IntegrityError:
            db.session.rollback()  # the email was registered meanwhile
            raise InvitationInvalid("That email already has an account. Sign in instead.") from None
        except BaseException:
            db.session.rollback()
            raise
        return user

    @staticmethod
    def revoke(organization_id: int, invitation_id: int, *, actor_user_id: int) -> None:
        try:
            revoked = db.session.execute(
                update(Invitation)
                .where(
                    Invitation.id == invitation_id,
                    Invitation.organization_id == organization_id,
                    Invitation.status == InvitationStatus.PENDING,
                )
                .values(status=InvitationStatus.REVOKED, finished_at=utcnow())
            )
            if revoked.rowcount != 1:  # type: ignore[attr-defined]
                raise TeamError("That invitation is no longer open.")
            domain_events.record(
                "team.invitation_revoked",
                organization_id=organization_id,
                user_id=actor_user_id,
                source=f"user:{actor_user_id}",
                invitation_id=invitation_id,
            )
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise

    @staticmethod
    def remove_member(organization_id: int, user_id: int, *, actor_user_id: int) -> None:
        """The member can no longer sign in and every session of theirs ends; their seat is free."""
        try:
            removed = db.session.execute(
                update(User)
                .where(
                    User.id == user_id,
                    User.organization_id == organization_id,
                    User.role == UserRole.MEMBER,
                    User.removed_at.is_(None),
                )
                # Every session of theirs ends, and stays ended if they are ever invited back.
                .values(removed_at=utcnow(), session_epoch=User.session_epoch + 1)
            )
            if removed.rowcount != 1:  # type: ignore[attr-defined]
                raise TeamError("That person is not a member of this organization.")
            domain_events.record(
                "team.member_removed",
                organization_id=organization_id,
                user_id=actor_user_id,
                source=f"user:{actor_user_id}",
                removed_user_id=user_id,
            )
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise


def _entitlements(organization: Organization) -> Entitlements:
    return for_organization(
        current_app.extensions["plan_catalogue"], organization, grace_days=current_app.config["PAST_DUE_GRACE_DAYS"]
    )


def _lock_organization(organization_id: int) -> Organization:
    organization = db.session.get(Organization, organization_id, with_for_update=True, populate_existing=True)
    if organization is None:
        raise TeamError("That organization does not exist.")
    return organization
