"""Teammates: invitations by email (signed, single use, expiring, revocable), joining as a member,
removal, seats enforced, members kept away from billing; on real PostgreSQL, Redis and SMTP."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from app.extensions import db
from tests.conftest import (
    PASSWORD,
    SandboxAccount,
    SmtpSink,
    csrf_token,
    email_confirmation_path,
    email_text,
    query,
    run_jobs,
    sign_up,
)

INVITEE = "grace@example.com"
# The signup in conftest buys Starter (5 seats included) and 2 extra seats: 7 seats, the owner in one.
SEATS = 7


class Owner:
    def __init__(self, app: Flask, stripe_api: SandboxAccount) -> None:
        self.app = app
        self.client = app.test_client()
        sign_up(self.client, stripe_api)
        [row] = query(app, "SELECT id FROM organization")
        self.organization_id: int = row.id
        assert self.client.get(email_confirmation_path(app, "ada@example.com")).status_code == 303

    def invite(self, email: str) -> Any:
        return self.client.post("/team/invite", data={"csrf_token": csrf_token(self.client, "/team/"), "email": email})

    def post(self, path: str) -> Any:
        return self.client.post(path, data={"csrf_token": csrf_token(self.client, "/team/")})


@pytest.fixture
def owner(app: Flask, offline_stripe: SandboxAccount) -> Owner:
    return Owner(app, offline_stripe)


def invitation_link(smtp_server: SmtpSink, app: Flask, email: str = INVITEE) -> str:
    """Deliver the outbox and return the accept link from the one invitation email to `email`."""
    run_jobs(app)
    [message] = smtp_server.to(email)
    match = re.search(r"http://localhost(/team/join/[\w.\-]+)", email_text(message))
    assert match, email_text(message)
    return match.group(1)


def join(client: FlaskClient, path: str, name: str = "Grace Hopper", password: str = PASSWORD) -> Any:
    """Submit the join form (its CSRF token is the session's, read off the sign-in page, so a link that
    no longer shows the form can still be submitted to)."""
    token = csrf_token(client, "/auth/login")
    return client.post(path, data={"csrf_token": token, "name": name, "password": password})


def set_extra_seats(app: Flask, organization_id: int, quantity: int) -> None:
    with app.app_context():
        db.session.execute(
            text("UPDATE organization_addon SET quantity = :q WHERE organization_id = :o"),
            {"q": quantity, "o": organization_id},
        )
        db.session.commit()


def add_members(app: Flask, organization_id: int, count: int) -> None:
    with app.app_context():
        for index in range(count):
            db.session.execute(
                text(
                    "INSERT INTO user_account (organization_id, email, name, password_hash, role, created_at) "
                    "VALUES (:o, :e, 'Someone', 'x', 'member', now())"
                ),
                {"o": organization_id, "e": f"member{index}@example.com"},
            )
        db.session.commit()


def test_an_invited_teammate_joins_through_the_emailed_link_once(
    app: Flask, owner: Owner, smtp_server: SmtpSink
) -> None:
    response = owner.invite("Grace@Example.com")
    assert response.status_code == 303
    assert smtp_server.to(INVITEE) == []  # sent by the worker, not the request
    path = invitation_link(smtp_server, app)
    [message] = smtp_server.to(INVITEE)
    assert message["Subject"] == "Join Analytical Engines on Ledgerline"

    # The database holds nothing that opens the link: no token column, and the signed part is nowhere.
    token = path.rsplit("/", 1)[1]
    columns = {
        r.column_name
        for r in query(app, "SELECT column_name FROM information_schema.columns WHERE table_name = 'invitation'")
    }
    assert not any("token" in name or "hash" in name for name in columns)
    stored = " ".join(str(r) for r in query(app, "SELECT * FROM invitation")) + " ".join(
        str(r.data) for r in query(app, "SELECT data FROM domain_event")
    )
    assert token not in stored and token.split(".")[-1] not in stored

    teammate = app.test_client()
    page = teammate.get(path)
    assert page.status_code == 200 and INVITEE in page.get_data(as_text=True)
    response = join(teammate, path)
    assert response.status_code == 303 and response.headers["Location"] == "/app"
    dashboard = teammate.get("/app").get_data(as_text=True)
    assert "Grace Hopper (grace@example.com, member)" in dashboard
    [user] = query(app, "SELECT * FROM user_account WHERE email = :e", e=INVITEE)
    assert (user.role, user.organization_id, user.name) == ("member", owner.organization_id, "Grace Hopper")
    [invitation] = query(app, "SELECT * FROM invitation")
    assert (invitation.status, invitation.accepted_user_id) == ("accepted", user.id)
    # The link reached the teammate's mailbox: the address is confirmed, and no banner claims a
    # confirmation email that nobody sent.
    assert user.email_verified_at is not None
    assert 'id="verify-banner"' not in dashboard and "we sent a link" not in dashboard
    run_jobs(app)
    assert [m["Subject"] for m in smtp_server.to(INVITEE)] == ["Join Analytical Engines on Ledgerline"]

    # Single use: the same link, from any browser, is refused and creates nobody.
    again = join(app.test_client(), path, name="Mallory")
    assert again.status_code == 410 and "already been used" in again.get_data(as_text=True)
    assert len(query(app, "SELECT id FROM user_account")) == 2

    # The member uses the app but never sees billing.
    assert teammate.get("/billing/").status_code == 403
    assert "Grace Hopper" in owner.client.get("/team/").get_data(as_text=True)


def test_expired_revoked_replaced_and_forged_links_are_refused(app: Flask, owner: Owner, smtp_server: SmtpSink) -> None:
    owner.invite(INVITEE)
    first = invitation_link(smtp_server, app)
    # Inviting the same email again replaces the open invitation: the first link stops working.
    smtp_server.clear()
    owner.invite(INVITEE)
    second = invitation_link(smtp_server, app)
    response = app.test_client().get(first)
    assert response.status_code == 410 and "withdrawn" in response.get_data(as_text=True)
    assert [r.status for r in query(app, "SELECT status FROM invitation ORDER BY id")] == ["revoked", "pending"]

    # Expired (the row's deadline passed): refused, and joining creates nobody.
    with app.app_context():
        db.session.execute(text("UPDATE invitation SET expires_at = now() - interval '1 minute'"))
        db.session.commit()
    response = join(app.test_client(), second)
    assert response.status_code == 410 and "expired" in response.get_data(as_text=True)

    # Revoked by the owner.
    with app.app_context():
        db.session.execute(text("UPDATE invitation SET expires_at = now() + interval '1 day' WHERE status = 'pending'"))
        db.session.commit()
    [pending] = query(app, "SELECT id FROM invitation WHERE status = 'pending'")
    assert owner.post(f"/team/invitations/{pending.id}/revoke").status_code == 303
    response = app.test_client().get(second)
    assert response.status_code == 410 and "withdrawn" in response.get_data(as_text=True)

    # Forged: another id under the same signature, or a changed signature.
    forged = second[:-3] + ("aaa" if not second.endswith("aaa") else "bbb")
    assert app.test_client().get(forged).status_code == 410
    assert app.test_client().get("/team/join/not-a-token").status_code == 410
    assert query(app, "SELECT id FROM user_account WHERE role = 'member'") == []


def test_a_revoked_invitation_is_not_emailed(app: Flask, owner: Owner, smtp_server: SmtpSink) -> None:
    owner.invite(INVITEE)
    [invitation] = query(app, "SELECT id FROM invitation")
    owner.post(f"/team/invitations/{invitation.id}/revoke")
    run_jobs(app)
    assert smtp_server.to(INVITEE) == []


def test_invitations_beyond_the_paid_seats_are_refused_with_an_offer_to_buy_seats(
    app: Flask, owner: Owner, smtp_server: SmtpSink
) -> None:
    for index in range(SEATS - 1):  # the owner holds one seat
        assert owner.invite(f"teammate{index}@example.com").status_code == 303
    response = owner.invite("one-too-many@example.com")
    assert response.status_code == 303 and response.headers["Location"].startswith("/team/")
    page = owner.client.get(response.headers["Location"]).get_data(as_text=True)
    assert f"All {SEATS} seats are taken" in page and "Buy more seats" in page
    assert 'id="buy-seats-link"' in page and 'href="/billing/seats"' in page
    assert 'id="invite-form"' not in page
    assert len(query(app, "SELECT id FROM invitation WHERE status = 'pending'")) == SEATS - 1
    assert query(app, "SELECT id FROM invitation WHERE email = 'one-too-many@example.com'") == []

    # Withdrawing one frees its seat.
    [first] = query(app, "SELECT id FROM invitation ORDER BY id LIMIT 1")
    owner.post(f"/team/invitations/{first.id}/revoke")
    assert owner.invite("one-too-many@example.com").status_code == 303
    assert len(query(app, "SELECT id FROM invitation WHERE status = 'pending'")) == SEATS - 1


def test_accepting_when_no_seat_is_left_is_refused_and_the_link_stays_usable(
    app: Flask, owner: Owner, smtp_server: SmtpSink
) -> None:
    owner.invite(INVITEE)
    path = invitation_link(smtp_server, app)
    add_members(app, owner.organization_id, SEATS - 1)  # every seat taken meanwhile
    response = join(app.test_client(), path)
    assert response.status_code == 409 and "no free seat" in response.get_data(as_text=True)
    assert query(app, "SELECT id FROM user_account WHERE email = :e", e=INVITEE) == []
    assert [r.status for r in query(app, "SELECT status FROM invitation")] == ["pending"]
    set_extra_seats(app, owner.organization_id, 3)  # a seat bought
    assert join(app.test_client(), path).status_code == 303


def test_more_members_than_seats_removes_nobody_warns_and_blocks_invitations(app: Flask, owner: Owner) -> None:
    add_members(app, owner.organization_id, SEATS - 1)
    set_extra_seats(app, owner.organization_id, 1)  # as after a seat decrease at Stripe: 6 seats, 7 members
    page = owner.client.get("/team/").get_data(as_text=True)
    assert 'id="over-seats"' in page and "7 members but only 6 seats" in page
    billing = owner.client.get("/billing/").get_data(as_text=True)
    assert 'id="over-seats"' in billing
    response = owner.invite(INVITEE)
    assert "Buy seats or remove members" in owner.client.get(response.headers["Location"]).get_data(as_text=True)
    assert query(app, "SELECT id FROM invitation") == []
    assert len(query(app, "SELECT id FROM user_account WHERE removed_at IS NULL")) == SEATS


def test_the_owner_removes_a_member_who_is_signed_out_and_cannot_sign_in(
    app: Flask, owner: Owner, smtp_server: SmtpSink
) -> None:
    owner.invite(INVITEE)
    teammate = app.test_client()
    join(teammate, invitation_link(smtp_server, app))
    assert teammate.get("/app").status_code == 200
    [member] = query(app, "SELECT id FROM user_account WHERE email = :e", e=INVITEE)

    # A member cannot remove anyone, nor invite.
    token = csrf_token(teammate, "/team/")
    assert teammate.post("/team/invite", data={"csrf_token": token, "email": "x@example.com"}).status_code == 403
    assert teammate.post(f"/team/members/{member.id}/remove", data={"csrf_token": token}).status_code == 403
    # Nor rename the organization (an owner action, like billing).
    assert (
        teammate.post("/billing/organization-name", data={"csrf_token": token, "name": "Mallory Inc"}).status_code
        == 403
    )
    assert query(app, "SELECT name FROM organization")[0].name == "Analytical Engines"

    assert owner.post(f"/team/members/{member.id}/remove").status_code == 303
    assert teammate.get("/app").status_code == 302  # the session ends at its next request
    login = teammate.post(
        "/auth/login", data={"csrf_token": csrf_token(teammate, "/auth/login"), "email": INVITEE, "password": PASSWORD}
    )
    assert login.status_code == 401
    assert "team.member_removed" in {r.name for r in query(app, "SELECT name FROM domain_event")}
    # The owner cannot be removed.
    [owner_row] = query(app, "SELECT id FROM user_account WHERE role = 'owner'")
    owner.post(f"/team/members/{owner_row.id}/remove")
    assert query(app, "SELECT removed_at FROM user_account WHERE role = 'owner'")[0].removed_at is None


def test_inviting_an_email_with_an_account_is_refused(app: Flask, owner: Owner) -> None:
    response = owner.invite("ada@example.com")
    assert "already belongs to a member" in owner.client.get(response.headers["Location"]).get_data(as_text=True)
    assert query(app, "SELECT id FROM invitation") == []


def test_bad_team_input_gets_a_clear_answer(
    app: Flask, owner: Owner, smtp_server: SmtpSink, offline_stripe: SandboxAccount
) -> None:
    response = owner.invite("not an email")
    assert response.status_code == 422 and "Invalid email address." in response.get_data(as_text=True)
    assert owner.invite("a\u0000b@example.com").status_code == 422
    assert query(app, "SELECT id FROM invitation") == []
    owner.invite(INVITEE)
    path = invitation_link(smtp_server, app)
    teammate = app.test_client()
    short = join(teammate, path, password="short")
    assert short.status_code == 422 and "Use 12 to 128 characters." in short.get_data(as_text=True)
    nameless = join(teammate, path, name="")
    assert nameless.status_code == 422
    assert query(app, "SELECT id FROM user_account WHERE email = :e", e=INVITEE) == []
    assert [r.status for r in query(app, "SELECT status FROM invitation")] == ["pending"]
    # Another organization's owner cannot withdraw this invitation: ids in the path only reach one's own.
    [invitation] = query(app, "SELECT id FROM invitation")
    mallory = app.test_client()
    sign_up(mallory, offline_stripe, email="mallory@example.com", organization_name="Mallory Ltd")
    revoke = mallory.post(
        f"/team/invitations/{invitation.id}/revoke", data={"csrf_token": csrf_token(mallory, "/team/")}
    )
    assert revoke.status_code == 303
    assert "no longer open" in mallory.get("/team/").get_data(as_text=True)
    assert [r.status for r in query(app, "SELECT status FROM invitation")] == ["pending"]


def test_inviting_waits_for_the_owner_to_confirm_their_address(app: Flask, offline_stripe: SandboxAccount) -> None:
    client = app.test_client()
    sign_up(client, offline_stripe)
    response = client.post("/team/invite", data={"csrf_token": csrf_token(client, "/team/"), "email": INVITEE})
    assert response.status_code == 303
    assert "Confirm your email address first" in client.get("/team/").get_data(as_text=True)
    assert query(app, "SELECT id FROM invitation") == []
    assert client.get(email_confirmation_path(app, "ada@example.com")).status_code == 303
    client.post("/team/invite", data={"csrf_token": csrf_token(client, "/team/"), "email": INVITEE})
    assert [row.email for row in query(app, "SELECT email FROM invitation")] == [INVITEE]


def test_the_owner_never_sees_the_invitation_link_only_the_mailbox_gets_it(
    app: Flask, owner: Owner, smtp_server: SmtpSink
) -> None:
    """An owner who saw the link could accept it for an address they do not control (and so squat it)."""
    response = owner.invite(INVITEE)
    page = owner.client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Invitation sent to grace@example.com." in page
    path = invitation_link(smtp_server, app)  # the mailbox has it
    token = path.rsplit("/", 1)[1]
    assert "/team/join/" not in page and token not in page
    assert "/team/join/" not in owner.client.get("/team/").get_data(as_text=True)


def test_a_removed_teammates_account_does_not_keep_the_address_from_its_owner(
    app: Flask, owner: Owner, smtp_server: SmtpSink, offline_stripe: SandboxAccount
) -> None:
    owner.invite(INVITEE)
    join(app.test_client(), invitation_link(smtp_server, app))
    [member] = query(app, "SELECT id FROM user_account WHERE email = :e", e=INVITEE)
    assert owner.post(f"/team/members/{member.id}/remove").status_code == 303
    # Reset links are not sent for an account that can no longer sign in.
    smtp_server.clear()
    anonymous = app.test_client()
    anonymous.post(
        "/auth/forgot-password", data={"csrf_token": csrf_token(anonymous, "/auth/forgot-password"), "email": INVITEE}
    )
    run_jobs(app)
    assert smtp_server.to(INVITEE) == []

    # The address's owner signs up for an organization of their own: it is provisioned, not a conflict.
    grace = app.test_client()
    sign_up(grace, offline_stripe, email=INVITEE, organization_name="Hopper & Co")
    assert "Hopper &amp; Co" in grace.get("/app").get_data(as_text=True)
    rows = query(app, "SELECT id, email, organization_id, removed_at FROM user_account ORDER BY id")
    [removed] = [r for r in rows if r.id == member.id]
    assert removed.removed_at is not None and removed.email == f"removed-{member.id}@released.invalid"
    [current] = [r for r in rows if r.email == INVITEE]
    assert current.id != member.id and current.organization_id != owner.organization_id
    [released] = query(app, "SELECT user_id, data FROM domain_event WHERE name = 'user.address_released'")
    assert released.user_id == member.id and released.data["email"] == INVITEE
    statuses = {r.status for r in query(app, "SELECT status FROM pending_signup WHERE email = :e", e=INVITEE)}
    assert statuses == {"completed"}


def test_a_removed_teammate_can_join_another_organization(
    app: Flask, owner: Owner, smtp_server: SmtpSink, offline_stripe: SandboxAccount
) -> None:
    owner.invite(INVITEE)
    join(app.test_client(), invitation_link(smtp_server, app))
    [member] = query(app, "SELECT id FROM user_account WHERE email = :e", e=INVITEE)
    owner.post(f"/team/members/{member.id}/remove")

    other = app.test_client()
    sign_up(other, offline_stripe, email="linus@example.com", organization_name="Torvalds GmbH")
    assert other.get(email_confirmation_path(app, "linus@example.com")).status_code == 303
    other.post("/team/invite", data={"csrf_token": csrf_token(other, "/team/"), "email": INVITEE})
    smtp_server.clear()
    path = invitation_link(smtp_server, app)
    grace = app.test_client()
    assert join(grace, path).status_code == 303
    assert "Torvalds GmbH" in grace.get("/app").get_data(as_text=True)
    [current] = query(app, "SELECT id, email_verified_at FROM user_account WHERE email = :e", e=INVITEE)
    assert current.id != member.id and current.email_verified_at is not None
