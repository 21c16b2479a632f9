"""What an organization's plan entitles it to: the features of its tier and its limits (seats included
plus the extra seats it pays for). Pure decisions from the catalogue and the organization's billing
facts; no database and no Stripe. The feature guard (app/features.py), the team service and the plan
and seat changes all ask here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.models import Organization
from app.services.access_policy import decide_access
from app.services.plans import PlanCatalogue, Tier

SEATS = "seats"
# A tier that says nothing about seats includes this many (the catalogue should say).
DEFAULT_INCLUDED_SEATS = 1


@dataclass(frozen=True)
class Entitlements:
    tier: str
    features: frozenset[str]
    limits: Mapping[str, int]  # included by the tier plus what add-ons raise
    included: Mapping[str, int]  # included by the tier alone
    billing_allows_use: bool  # the billing status lets the organization use the app (access policy)

    def has(self, feature: str) -> bool:
        """The feature is in the plan and the organization's billing lets it use the plan."""
        return self.billing_allows_use and feature in self.features

    def limit(self, name: str) -> int:
        return self.limits.get(name, 0)

    @property
    def seats(self) -> int:
        return self.limit(SEATS)

    @property
    def included_seats(self) -> int:
        return self.included.get(SEATS, DEFAULT_INCLUDED_SEATS)


def entitlements_for(
    catalogue: PlanCatalogue, tier_key: str, addons: Mapping[str, int], *, billing_allows_use: bool
) -> Entitlements:
    """The entitlements of a tier with these add-on quantities. A tier the catalogue no longer sells
    keeps its limits at what its add-ons pay for and includes no features (an upgrade prompt says so)."""
    tier = catalogue.tier(tier_key)
    included = dict(tier.limits) if tier else {}
    included.setdefault(SEATS, DEFAULT_INCLUDED_SEATS)
    limits = dict(included)
    for key, quantity in addons.items():
        addon = catalogue.addons.get(key)
        if addon is not None and addon.adds_to_limit:
            limits[addon.adds_to_limit] = limits.get(addon.adds_to_limit, 0) + max(0, quantity)
    return Entitlements(
        tier=tier_key,
        features=tier.features if tier else frozenset(),
        limits=limits,
        included=included,
        billing_allows_use=billing_allows_use,
    )


def seat_addon_key(catalogue: PlanCatalogue) -> str | None:
    """The add-on that sells extra seats, if the catalogue has one."""
    addons = catalogue.limit_addons(SEATS)
    return addons[0].key if addons else None


def seats_after(catalogue: PlanCatalogue, tier_key: str, addons: Mapping[str, int]) -> int:
    return entitlements_for(catalogue, tier_key, addons, billing_allows_use=True).seats


def minimum_extra_seats(catalogue: PlanCatalogue, tier_key: str, members: int) -> int:
    """The fewest extra seats that keep `members` seated on this tier."""
    included = entitlements_for(catalogue, tier_key, {}, billing_allows_use=True).seats
    return max(0, members - included)


def upgrade_tiers(catalogue: PlanCatalogue, feature: str) -> list[Tier]:
    """The tiers that include a feature, for an upgrade prompt."""
    return catalogue.tiers_with_feature(feature)


@dataclass(frozen=True)
class SeatUse:
    members: int
    pending_invitations: int
    seats: int

    @property
    def in_use(self) -> int:
        return self.members + self.pending_invitations

    @property
    def over_limit(self) -> bool:
        """More members than seats (after a downgrade or a seat decrease at Stripe): nobody is
        removed, but no new invitation goes out until it is resolved."""
        return self.members > self.seats

    @property
    def can_invite(self) -> bool:
        return self.in_use < self.seats

    @property
    def free(self) -> int:
        return max(0, self.seats - self.in_use)


def for_organization(catalogue: PlanCatalogue, organization: Organization, *, grace_days: int) -> Entitlements:
    """An organization's entitlements: its tier, its add-ons as held, and what its billing status allows."""
    return entitlements_for(
        catalogue,
        organization.tier,
        organization.addon_quantities(),
        billing_allows_use=decide_access(organization, grace_days=grace_days).allowed,
    )
