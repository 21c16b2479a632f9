"""The organization's name, which its owner changes from the billing page. Recorded as
`organization.renamed` (in the audit log); the worker's outbox consumer `sync_customer_name` then gives
Stripe's customer the new name (customer_sync.push_name decides where: its metadata always, its `name`
unless the customer keeps a business name of its own)."""

from __future__ import annotations

import unicodedata

from app.extensions import db
from app.models import Organization
from app.services import domain_events
from app.services.customer_sync import RENAMED

NAME_LENGTH = (2, 100)  # as at signup


class OrganizationNameError(ValueError):
    """The name given cannot be used; the message says why."""


def clean_name(name: str | None) -> str:
    """The name as kept: one line, runs of spaces made one, 2 to 100 characters; else why not."""
    text = name or ""
    if any(unicodedata.category(character) == "Cc" for character in text):
        raise OrganizationNameError("Remove the control characters (such as tabs or line breaks) from the name.")
    text = " ".join(text.split())
    low, high = NAME_LENGTH
    if not text:
        raise OrganizationNameError("Enter the organization's name.")
    if not low <= len(text) <= high:
        raise OrganizationNameError(f"The organization's name must be {low} to {high} characters long.")
    return text


def rename(organization_id: int, name: str | None, *, actor_user_id: int) -> tuple[str, bool]:
    """The owner renames the organization. Returns the name kept and whether it changed (the same name
    again records nothing and syncs nothing)."""
    kept = clean_name(name)
    organization = db.session.get(Organization, organization_id, with_for_update=True)
    if organization is None:
        raise OrganizationNameError("This organization does not exist.")
    changed = organization.name != kept
    if changed:
        domain_events.record(
            RENAMED,
            organization_id=organization_id,
            user_id=actor_user_id,
            source=f"user:{actor_user_id}",
            name=kept,
            previous=organization.name,
        )
        organization.name = kept
    db.session.commit()
    return kept, changed
