"""The plan catalogue: which tiers and add-ons are sold, the Stripe price lookup key of each (and a
yearly one where the tier is also sold yearly), what each tier includes (its features and limits), and
for tiers that can also be paid through Whop, the Whop plan id (`whop_plan_id`; tiers without one are
Stripe-only). It is read from a TOML file (plans.toml by default) so the catalogue changes without a
code change.

Metered features ([meters.<key>]) name a Stripe Billing Meter (its event_name and aggregation), the
metered price that bills it (lookup key; `yearly_lookup_key`, a yearly metered price on the same
meter, bills yearly subscriptions' overage with their yearly renewal) and, per tier, the quantity
included each billing period and what happens past it: "billed" (the overage is reported to Stripe
and invoiced), "soft_limit" (usage is recorded, not billed, and the owner is warned at 80% and 100%)
or "hard_limit" (usage past the included quantity is refused until the period resets). A tier a meter
does not list cannot use it."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
PROMOTION_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,49}$")
WHOP_PLAN_ID = re.compile(r"^plan_[A-Za-z0-9_]{1,100}$")


class CatalogueError(ValueError):
    """The catalogue file is missing or malformed."""


@dataclass(frozen=True)
class Tier:
    key: str
    name: str
    lookup_key: str = ""  # none: the free plan, which Stripe never sees (see is_free)
    description: str = ""
    trial_days: int = 0
    yearly_lookup_key: str | None = None
    features: frozenset[str] = frozenset()
    limits: dict[str, int] = field(default_factory=dict)
    whop_plan_id: str = ""
    # The trial starts without a card (Checkout asks for one only if required); app/services/trials.py.
    trial_without_card: bool = False

    @property
    def is_free(self) -> bool:
        """A tier with no price: signup creates the organization at once, with no checkout and no
        subscription; the owner upgrades from the billing page (app/services/free_plan.py)."""
        return not self.lookup_key

    def lookup_key_for(self, interval: str) -> str | None:
        """The lookup key of this tier's price billed every `interval` ("month" or "year")."""
        if self.is_free:
            return None
        return self.lookup_key if interval == "month" else self.yearly_lookup_key if interval == "year" else None


@dataclass(frozen=True)
class Addon:
    key: str
    name: str
    lookup_key: str
    description: str = ""
    max_quantity: int = 100
    yearly_lookup_key: str | None = None
    adds_to_limit: str | None = None  # each unit bought raises this limit by one ("seats")

    def lookup_key_for(self, interval: str) -> str | None:
        return self.lookup_key if interval == "month" else self.yearly_lookup_key if interval == "year" else None


OVERAGE_BEHAVIOURS = ("billed", "soft_limit", "hard_limit")
AGGREGATIONS = ("sum", "count")
# Stripe's meter event_name: letters, digits, _ and - (at most 100 characters).
EVENT_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")


@dataclass(frozen=True)
class MeterAllowance:
    """What one tier includes of a meter each billing period, and what happens past it."""

    included: int
    overage: str  # one of OVERAGE_BEHAVIOURS

    @property
    def billed(self) -> bool:
        return self.overage == "billed"


@dataclass(frozen=True)
class Meter:
    key: str
    name: str
    event_name: str  # the Stripe meter's event_name
    aggregation: str  # "sum" (each event carries a quantity) or "count" (each event is one)
    lookup_key: str  # the metered price billing the overage (monthly)
    unit: str = "unit"
    tiers: dict[str, MeterAllowance] = field(default_factory=dict)
    # The yearly metered price on the same meter: a yearly subscription carries it, and Stripe bills the
    # year's reported overage with the yearly renewal, in arrears (None: yearly plans bill no overage).
    yearly_lookup_key: str | None = None

    def allowance(self, tier_key: str) -> MeterAllowance | None:
        return self.tiers.get(tier_key)

    def lookup_key_for(self, interval: str) -> str | None:
        """The metered price a subscription billed every `interval` (month or year) carries."""
        return self.yearly_lookup_key if interval == "year" else self.lookup_key


@dataclass(frozen=True)
class PlanCatalogue:
    tiers: dict[str, Tier]
    addons: dict[str, Addon]
    features: dict[str, str] = field(default_factory=dict)  # key -> the words pages use for it
    meters: dict[str, Meter] = field(default_factory=dict)
    # Promotion codes the marketing pages name (code -> where), checked by `flask billing check-prices`.
    promotion_codes: dict[str, str] = field(default_factory=dict)

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
        features = _features(raw, problems, source)
        tiers = {
            key: Tier(key=key, **fields) for key, fields in _entries(raw, "tiers", ("name",), Tier, problems, source)
        }
        addons = {
            key: Addon(key=key, **fields)
            for key, fields in _entries(raw, "addons", ("name", "lookup_key"), Addon, problems, source)
        }
        if not tiers:
            problems.append(f"{source}: at least one [tiers.<key>] is required")
        for tier in tiers.values():
            unknown = sorted(set(tier.features) - set(features))
            if unknown:
                problems.append(f"{source}: [tiers.{tier.key}] features not listed in [features]: {', '.join(unknown)}")
        free = [tier for tier in tiers.values() if tier.is_free]
        if len(free) > 1:
            problems.append(
                f"{source}: only one tier may be free (have no lookup_key): {', '.join(t.key for t in free)}"
            )
        for tier in tiers.values():
            if not isinstance(tier.trial_without_card, bool) or (tier.trial_without_card and not tier.trial_days):
                problems.append(
                    f"{source}: [tiers.{tier.key}] trial_without_card must be true or false, with trial_days"
                )
        for tier in free:
            sold = [name for name in ("yearly_lookup_key", "whop_plan_id", "trial_days") if getattr(tier, name)]
            if sold:
                problems.append(f"{source}: [tiers.{tier.key}] has no lookup_key (free) but sets {', '.join(sold)}")
        lookup_keys = [k for entry in _entries_of(tiers, addons) for k in _keys(entry)]
        duplicates = sorted({k for k in lookup_keys if lookup_keys.count(k) > 1})
        if duplicates:
            problems.append(f"{source}: lookup keys used twice: {', '.join(duplicates)}")
        whop_plans = [t.whop_plan_id for t in tiers.values() if t.whop_plan_id]
        shared = sorted({p for p in whop_plans if whop_plans.count(p) > 1})
        if shared:
            problems.append(f"{source}: Whop plan ids used by two tiers: {', '.join(shared)}")
        promotion_codes = _promotion_codes(raw, problems, source)
        meters = _meters(raw, set(tiers), problems, source)
        _check_meters_apart(meters, set(lookup_keys), problems, source)
        if problems:
            raise CatalogueError("; ".join(problems))
        return cls(tiers=tiers, addons=addons, features=features, meters=meters, promotion_codes=promotion_codes)

    def meter(self, key: str) -> Meter | None:
        return self.meters.get(key)

    def meter_lookup_keys(self) -> list[str]:
        """The lookup keys of the metered prices, monthly and yearly (apart from lookup_keys(): they sell
        no tier)."""
        return [key for meter in self.meters.values() for key in (meter.lookup_key, meter.yearly_lookup_key) if key]

    def priced_lookup_keys(self) -> list[str]:
        """Every price the catalogue names: the tiers' and add-ons' (lookup_keys()), then the meters'."""
        return [*self.lookup_keys(), *self.meter_lookup_keys()]

    def billed_meter_lookup_keys(self, tier_key: str, interval: str = "month") -> list[str]:
        """The metered prices a subscription to the tier billed every `interval` carries: those of meters
        whose overage the tier bills (a soft or hard limit bills nothing, so needs no price), on that
        interval (a meter without a yearly price bills no overage to yearly subscriptions)."""
        return [
            key
            for m in self.meters.values()
            if (a := m.allowance(tier_key)) is not None and a.billed and (key := m.lookup_key_for(interval))
        ]

    def tier(self, key: str) -> Tier | None:
        return self.tiers.get(key)

    def free_tier(self) -> Tier | None:
        """The tier with no price, if the catalogue has one."""
        return next((t for t in self.tiers.values() if t.is_free), None)

    def paid_tiers(self) -> list[Tier]:
        return [t for t in self.tiers.values() if not t.is_free]

    def tier_for_lookup_key(self, lookup_key: str | None) -> Tier | None:
        return next((t for t in self.tiers.values() if lookup_key is not None and lookup_key in _keys(t)), None)

    def tier_for_whop_plan_id(self, plan_id: str | None) -> Tier | None:
        return next((t for t in self.tiers.values() if plan_id and t.whop_plan_id == plan_id), None)

    def addon_for_lookup_key(self, lookup_key: str | None) -> Addon | None:
        return next((a for a in self.addons.values() if lookup_key is not None and lookup_key in _keys(a)), None)

    def interval_of_lookup_key(self, lookup_key: str | None) -> str | None:
        """ "year" for a yearly lookup key, "month" for a tier's or add-on's first one, else None."""
        for entry in _entries_of(self.tiers, self.addons):
            if lookup_key and lookup_key == entry.yearly_lookup_key:
                return "year"
            if lookup_key and lookup_key == entry.lookup_key:
                return "month"
        return None

    def lookup_keys(self) -> list[str]:
        """Every lookup key the catalogue sells, tiers first."""
        return [k for entry in _entries_of(self.tiers, self.addons) for k in _keys(entry)]

    def tiers_with_feature(self, feature: str) -> list[Tier]:
        return [tier for tier in self.tiers.values() if feature in tier.features]

    def limit_addons(self, limit: str) -> list[Addon]:
        """The add-ons that raise `limit` (extra seats raise "seats")."""
        return [addon for addon in self.addons.values() if addon.adds_to_limit == limit]


def _check_fields(fields: dict[str, Any], where: str, problems: list[str]) -> None:
    """Check (and normalise) the optional fields; an invalid one is dropped after its problem is noted."""
    for name in ("yearly_lookup_key", "adds_to_limit"):
        if name in fields and (not isinstance(fields[name], str) or not fields[name]):
            problems.append(f"{where} {name} must be a non-empty string")
            fields.pop(name)
    if "features" in fields:
        features = fields["features"]
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            problems.append(f"{where} features must be a list of feature keys")
            fields.pop("features")
        else:
            fields["features"] = frozenset(features)
    if "limits" in fields:
        limits = fields["limits"]
        if not isinstance(limits, dict) or not all(
            KEY_PATTERN.match(str(k)) and type(v) is int and v >= 0 for k, v in limits.items()
        ):
            problems.append(f"{where} limits must map names to whole numbers of at least 0")
            fields.pop("limits")
        else:
            fields["limits"] = dict(limits)


def _entries_of(tiers: dict[str, Tier], addons: dict[str, Addon]) -> list[Tier | Addon]:
    return [*tiers.values(), *addons.values()]


def _keys(entry: Tier | Addon) -> list[str]:
    if not entry.lookup_key:
        return []  # the free tier sells nothing
    return [entry.lookup_key, *([entry.yearly_lookup_key] if entry.yearly_lookup_key else [])]


def _features(raw: dict[str, Any], problems: list[str], source: str) -> dict[str, str]:
    section = raw.get("features") or {}
    if not isinstance(section, dict):
        problems.append(f'{source}: [features] must be a table of key = "what it is called"')
        return {}
    features = {}
    for key, label in section.items():
        if not KEY_PATTERN.match(key) or not isinstance(label, str) or not label:
            problems.append(
                f"{source}: [features] {key} must be named with lowercase letters, digits and _ and say what it is"
            )
            continue
        features[key] = label
    return features


def _promotion_codes(raw: dict[str, Any], problems: list[str], source: str) -> dict[str, str]:
    """[promotion_codes.<CODE>] named_on = "the launch page": codes managed in Stripe that pages name."""
    section = raw.get("promotion_codes") or {}
    codes: dict[str, str] = {}
    for code, entry in section.items() if isinstance(section, dict) else ():
        if not PROMOTION_CODE.match(code) or not isinstance(entry, dict):
            problems.append(f"{source}: [promotion_codes.{code}] must be a table named by the code (letters, digits)")
            continue
        codes[code] = str(entry.get("named_on") or "")
    if not isinstance(section, dict):
        problems.append(f"{source}: [promotion_codes] must be a table of codes")
    return codes


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
        if "lookup_key" in value and (not isinstance(value["lookup_key"], str) or not value["lookup_key"]):
            missing.append("lookup_key")
        if missing:
            problems.append(f"{where} needs {', '.join(missing)}")
            continue
        fields = {name: v for name, v in value.items() if name in known}
        for name in ("trial_days", "max_quantity"):
            if name in fields and (not isinstance(fields[name], int) or fields[name] < 0):
                problems.append(f"{where} {name} must be a whole number of at least 0")
        _check_fields(fields, where, problems)
        if "whop_plan_id" in fields and not (
            isinstance(fields["whop_plan_id"], str) and WHOP_PLAN_ID.match(fields["whop_plan_id"])
        ):
            problems.append(f"{where} whop_plan_id must be a Whop plan id (plan_...)")
        entries.append((key, fields))
    return entries


def _meters(raw: dict[str, Any], tier_keys: set[str], problems: list[str], source: str) -> dict[str, Meter]:
    section = raw.get("meters") or {}
    if not isinstance(section, dict):
        problems.append(f"{source}: [meters] must be a table of [meters.<key>]")
        return {}
    meters = {}
    for key, value in section.items():
        where = f"{source}: [meters.{key}]"
        if not KEY_PATTERN.match(key) or not isinstance(value, dict):
            problems.append(f"{where} must be a table named with lowercase letters, digits and _")
            continue
        missing = [f for f in ("name", "event_name", "lookup_key") if not isinstance(value.get(f), str) or not value[f]]
        if missing:
            problems.append(f"{where} needs {', '.join(missing)}")
            continue
        yearly = value.get("yearly_lookup_key")
        if yearly is not None and (not isinstance(yearly, str) or not yearly):
            problems.append(f"{where} yearly_lookup_key must be a lookup key")
            yearly = None
        if not EVENT_NAME.match(value["event_name"]):
            problems.append(f"{where} event_name must be letters, digits, _ and - (at most 100)")
        aggregation = value.get("aggregation", "sum")
        if aggregation not in AGGREGATIONS:
            problems.append(f"{where} aggregation must be one of {', '.join(AGGREGATIONS)}")
        known = {"name", "event_name", "aggregation", "lookup_key", "yearly_lookup_key", "unit", "tiers"}
        unknown = sorted(set(value) - known - SANDBOX)
        if unknown:
            problems.append(f"{where} has unknown settings: {', '.join(unknown)}")
        allowances = _allowances(value.get("tiers"), tier_keys, where, problems)
        meters[key] = Meter(
            key=key,
            name=value["name"],
            event_name=value["event_name"],
            aggregation=str(aggregation),
            lookup_key=value["lookup_key"],
            unit=str(value.get("unit") or "unit"),
            tiers=allowances,
            yearly_lookup_key=yearly,
        )
    return meters


SANDBOX = {"sandbox_unit_amount", "sandbox_yearly_unit_amount"}  # read by the offline Stripe only


def _allowances(raw: Any, tier_keys: set[str], where: str, problems: list[str]) -> dict[str, MeterAllowance]:
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{where} tiers must give each tier that uses the meter {{ included = N, overage = ... }}")
        return {}
    allowances = {}
    for tier, entry in raw.items():
        if tier not in tier_keys:
            problems.append(f"{where} tiers.{tier} is not a tier of the catalogue")
            continue
        included = entry.get("included") if isinstance(entry, dict) else None
        overage = entry.get("overage") if isinstance(entry, dict) else None
        if type(included) is not int or included < 0:
            problems.append(f"{where} tiers.{tier} included must be a whole number of at least 0")
            continue
        if overage not in OVERAGE_BEHAVIOURS:
            problems.append(f"{where} tiers.{tier} overage must be one of {', '.join(OVERAGE_BEHAVIOURS)}")
            continue
        allowances[tier] = MeterAllowance(included=included, overage=str(overage))
    return allowances


def _check_meters_apart(meters: dict[str, Meter], taken: set[str], problems: list[str], source: str) -> None:
    """Each meter's price has a lookup key of its own, and each meter an event name of its own."""
    for meter in meters.values():
        for key in (meter.lookup_key, meter.yearly_lookup_key):
            if key in taken:
                problems.append(f"{source}: [meters.{meter.key}] lookup_key {key} is used twice")
            if key:
                taken.add(key)
    events = [meter.event_name for meter in meters.values()]
    if len(set(events)) != len(events):
        problems.append(f"{source}: two meters share an event_name")
