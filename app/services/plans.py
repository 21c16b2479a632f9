"""The plan catalogue: which tiers and add-ons are sold, the Stripe price lookup key of each, and for
tiers that can also be paid through Whop, the Whop plan id (`whop_plan_id`; tiers without one are
Stripe-only). It is read from a TOML file (plans.toml by default) so the catalogue changes without a
code change."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
WHOP_PLAN_ID = re.compile(r"^plan_[A-Za-z0-9_]{1,100}$")


class CatalogueError(ValueError):
    """The catalogue file is missing or malformed."""


@dataclass(frozen=True)
class Tier:
    key: str
    name: str
    lookup_key: str
    description: str = ""
    trial_days: int = 0
    whop_plan_id: str = ""


@dataclass(frozen=True)
class Addon:
    key: str
    name: str
    lookup_key: str
    description: str = ""
    max_quantity: int = 100


@dataclass(frozen=True)
class PlanCatalogue:
    tiers: dict[str, Tier]
    addons: dict[str, Addon]

    @classmethod
    def load(cls, path: str | Path) -> PlanCatalogue:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CatalogueError(f"plan catalogue {path} does not exist (PLAN_CATALOGUE_FILE)") from None
        except tomllib.TOMLDecodeError as exc:
            raise CatalogueError(f"plan catalogue {path} is not valid TOML: {exc}") from None
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: str = "catalogue") -> PlanCatalogue:
        problems: list[str] = []
        tiers = {
            key: Tier(key=key, **fields)
            for key, fields in _entries(raw, "tiers", ("name", "lookup_key"), Tier, problems, source)
        }
        addons = {
            key: Addon(key=key, **fields)
            for key, fields in _entries(raw, "addons", ("name", "lookup_key"), Addon, problems, source)
        }
        if not tiers:
            problems.append(f"{source}: at least one [tiers.<key>] is required")
        lookup_keys = [t.lookup_key for t in tiers.values()] + [a.lookup_key for a in addons.values()]
        duplicates = sorted({k for k in lookup_keys if lookup_keys.count(k) > 1})
        if duplicates:
            problems.append(f"{source}: lookup keys used twice: {', '.join(duplicates)}")
        whop_plans = [t.whop_plan_id for t in tiers.values() if t.whop_plan_id]
        shared = sorted({p for p in whop_plans if whop_plans.count(p) > 1})
        if shared:
            problems.append(f"{source}: Whop plan ids used by two tiers: {', '.join(shared)}")
        if problems:
            raise CatalogueError("; ".join(problems))
        return cls(tiers=tiers, addons=addons)

    def tier(self, key: str) -> Tier | None:
        return self.tiers.get(key)

    def tier_for_lookup_key(self, lookup_key: str | None) -> Tier | None:
        return next((t for t in self.tiers.values() if t.lookup_key == lookup_key), None)

    def tier_for_whop_plan_id(self, plan_id: str | None) -> Tier | None:
        return next((t for t in self.tiers.values() if plan_id and t.whop_plan_id == plan_id), None)

    def addon_for_lookup_key(self, lookup_key: str | None) -> Addon | None:
        return next((a for a in self.addons.values() if a.lookup_key == lookup_key), None)


def _entries(
    raw: dict[str, Any],
    section: str,
    required: tuple[str, ...],
    kind: type[Tier] | type[Addon],
    problems: list[str],
    source: str,
) -> list[tuple[str, dict[str, Any]]]:
    known = set(kind.__dataclass_fields__) - {"key"}
    entries = []
    for key, value in (raw.get(section) or {}).items():
        where = f"{source}: [{section}.{key}]"
        if not KEY_PATTERN.match(key) or not isinstance(value, dict):
            problems.append(f"{where} must be a table named with lowercase letters, digits and _")
            continue
        missing = [field for field in required if not isinstance(value.get(field), str) or not value[field]]
        if missing:
            problems.append(f"{where} needs {', '.join(missing)}")
            continue
        fields = {name: v for name, v in value.items() if name in known}
        for name in ("trial_days", "max_quantity"):
            if name in fields and (not isinstance(fields[name], int) or fields[name] < 0):
                problems.append(f"{where} {name} must be a whole number of at least 0")
        if "whop_plan_id" in fields and not (
            isinstance(fields["whop_plan_id"], str) and WHOP_PLAN_ID.match(fields["whop_plan_id"])
        ):
            problems.append(f"{where} whop_plan_id must be a Whop plan id (plan_...)")
        entries.append((key, fields))
    return entries
