"""`flask users ...`: the only way to make someone staff (the operations console has no such page)."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from app.services import staff_access

users_cli = AppGroup("users", help="User administration: who is staff.")
reason_option = click.option("--reason", default="", help="Why (kept in the staff audit log).")


@users_cli.command("grant-staff")
@click.argument("email")
@reason_option
def grant_staff(email: str, reason: str) -> None:
    """Let EMAIL use the operations console (/admin). They must have two-factor sign-in on."""
    try:
        click.echo(staff_access.grant(email, reason=reason or "granted from the command line"))
    except staff_access.StaffGrantRefused as exc:
        raise click.ClickException(str(exc)) from None


@users_cli.command("revoke-staff")
@click.argument("email")
@reason_option
def revoke_staff(email: str, reason: str) -> None:
    """Close the operations console to EMAIL."""
    try:
        click.echo(staff_access.revoke(email, reason=reason or "revoked from the command line"))
    except staff_access.StaffGrantRefused as exc:
        raise click.ClickException(str(exc)) from None
