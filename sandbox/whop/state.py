"""The double's world: plans seeded from the catalogue, checkout configurations, members, memberships
and payments, in memory behind one lock, and the events each change emits. Object shapes follow the
types whop-sdk 2.6.0 declares (whop_sdk.types.Membership, Plan, Payment, Invoice and
whop_sdk.checkout_configurations.types.CreateCheckoutConfigurationsResponse)."""

from __future__ import annotations

import secrets
import threading
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

API_VERSION = "v1"
PERIOD_DAYS = 30
CARD_OK = "4242424242424242"
CARD_DECLINED = "4000000000000002"
Emit = Callable[[str, dict[str, Any], dict[str, Any] | None], None]


class WhopError(Exception):
    """An API error: HTTP status and Whop's error body {"error": {"type", "message"}}."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.error_type, "message": self.message}}


class CardDeclined(Exception):
    pass


FILTERS = ("membership_id", "member_id", "account_id")  # GET /payments' filters


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payment_instrument(card: str, expiry: str) -> dict[str, Any]:
    """Whop's `payment_instrument` for a card: its network, last four and expiry, shaped for display."""
    brand = {"4": "visa", "5": "mastercard", "3": "amex", "6": "discover"}.get(card[:1], "card")
    month, _, year = expiry.replace(" ", "").partition("/")
    card_details: dict[str, Any] = {
        "brand": brand,
        "last4": card[-4:],
        "exp_month": int(month) if month.isdigit() else None,
        "exp_year": 2000 + int(year) if year.isdigit() and len(year) == 2 else (int(year) if year.isdigit() else None),
        "issuer_identification_number": card[:6],
    }
    files = {
        "png_1x": f"https://sandbox.invalid/icons/{brand}.png",
        "png_2x": f"https://sandbox.invalid/icons/{brand}@2x.png",
        "png_4x": f"https://sandbox.invalid/icons/{brand}@4x.png",
        "svg": f"https://sandbox.invalid/icons/{brand}.svg",
    }
    icon = {"dark": files, "light": files}
    return {
        "card": card_details,
        "display_name": f"{brand.title()} •••• {card[-4:]}",
        "icons": {"card": icon, "square": icon},
        "installment_count": None,
        "payment_method_type": "card",
    }


def money(amount: Decimal, currency: str = "usd") -> dict[str, Any]:
    return {"amount": f"{amount:.2f}", "currency": currency, "decimals": 2, "display_decimals": 2}


class World:
    """Every object the double holds, and the operations that change them. Each public method takes the
    lock, changes state and emits events in the order Whop sends them."""

    def __init__(self, *, account_id: str, public_url: str, emit: Emit) -> None:
        self.lock = threading.RLock()
        self.account_id = account_id
        self.public_url = public_url
        self.emit = emit
        self.plans: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.checkouts: dict[str, dict[str, Any]] = {}
        self.memberships: dict[str, dict[str, Any]] = {}
        self.payments: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.members_by_email: dict[str, str] = {}
        self.idempotency: dict[tuple[str, str], tuple[str, int, dict[str, Any]]] = {}
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)

    # --- catalogue ------------------------------------------------------------------------------

    def seed_plans(self, catalogue_file: Path) -> list[dict[str, Any]]:
        """One renewal plan (30 days, USD) per tier that names a `whop_plan_id`, priced at
        `sandbox_unit_amount` cents (1000 if absent), with the tier's `trial_days`."""
        with catalogue_file.open("rb") as handle:
            catalogue = tomllib.load(handle)
        seeded = []
        with self.lock:
            for key, tier in (catalogue.get("tiers") or {}).items():
                plan_id = tier.get("whop_plan_id")
                if not plan_id:
                    continue
                if not str(plan_id).startswith("plan_"):
                    raise ValueError(f"tiers.{key}.whop_plan_id must start with plan_, not {plan_id!r}")
                price = Decimal(int(tier.get("sandbox_unit_amount", 1000))) / 100
                product = self.products.get(f"prod_{key}") or {
                    "id": f"prod_{key}",
                    "title": str(tier.get("name", key)),
                    "logo_url": None,
                }
                self.products[product["id"]] = product
                self.plans[plan_id] = self._plan(plan_id, product, price, tier)
                seeded.append(self.plans[plan_id])
        return seeded

    def _plan(self, plan_id: str, product: dict[str, Any], price: Decimal, tier: dict[str, Any]) -> dict[str, Any]:
        now = iso(self.now())
        trial = tier.get("trial_days")
        return {
            "id": plan_id,
            "account": {"id": self.account_id, "title": "Sandbox account", "route": "sandbox"},
            "adaptive_pricing_enabled": False,
            "billing_period": PERIOD_DAYS,
            "collect_tax": False,
            "created_at": now,
            "updated_at": now,
            "currency": "usd",
            "custom_fields": [],
            "description": tier.get("description"),
            "formatted_price": f"${price:.2f} / month",
            "initial_price": 0.0,
            "initial_price_due": money(Decimal(0)),
            "metadata": {},
            "plan_type": "renewal",
            "product": {"id": product["id"], "title": product["title"]},
            "purchase_url": f"{self.public_url}/whop/checkout/{plan_id}",
            "release_method": "buy_now",
            "renewal_price": float(price),
            "tax_type": "unspecified",
            "title": product["title"],
            "trial_period_days": float(trial) if trial else None,
            "unlimited_stock": True,
            "visibility": "visible",
        }

    def plan(self, plan_id: str) -> dict[str, Any]:
        plan = self.plans.get(plan_id)
        if plan is None:
            raise WhopError(404, "not_found", f"Plan {plan_id} not found")
        return plan

    # --- checkout -------------------------------------------------------------------------------

    def create_checkout(self, body: dict[str, Any]) -> dict[str, Any]:
        known = {"plan_id", "metadata", "redirect_url", "account_id", "mode", "affiliate_code", "currency"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise WhopError(400, "invalid_request_error", f"Unsupported parameters: {', '.join(unknown)}")
        if body.get("mode") not in (None, "payment"):
            raise WhopError(400, "invalid_request_error", "Only mode=payment is supported by the sandbox")
        plan_id = body.get("plan_id")
        if not isinstance(plan_id, str) or not plan_id:
            raise WhopError(400, "invalid_request_error", "plan_id is required")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
            raise WhopError(400, "invalid_request_error", "metadata must be an object")
        redirect = body.get("redirect_url")
        if redirect is not None and not (isinstance(redirect, str) and redirect.startswith(("http://", "https://"))):
            raise WhopError(400, "invalid_request_error", "redirect_url must be an http(s) URL")
        if body.get("account_id") not in (None, self.account_id):
            raise WhopError(403, "forbidden", "This API key cannot act for that account")
        with self.lock:
            plan = self.plan(plan_id)
            now = iso(self.now())
            checkout_id = new_id("ch")
            checkout = {
                "id": checkout_id,
                "account_id": self.account_id,
                "affiliate_code": body.get("affiliate_code"),
                "created_at": now,
                "updated_at": now,
                "currency": body.get("currency"),
                "effective_payment_method_configuration": None,
                "metadata": dict(metadata),
                "mode": "payment",
                "payment_method_configuration": None,
                "plan": {
                    "id": plan["id"],
                    "adaptive_pricing_enabled": False,
                    "billing_period": plan["billing_period"],
                    "currency": plan["currency"],
                    "expiration_days": None,
                    "initial_price": plan["initial_price"],
                    "plan_type": plan["plan_type"],
                    "release_method": plan["release_method"],
                    "renewal_price": plan["renewal_price"],
                    "three_ds_level": None,
                    "trial_period_days": int(plan["trial_period_days"]) if plan["trial_period_days"] else None,
                    "visibility": plan["visibility"],
                },
                "purchase_url": f"{self.public_url}/whop/checkout/{checkout_id}",
                "redirect_url": redirect,
                "three_ds_level": None,
            }
            self.checkouts[checkout_id] = checkout
            return checkout

    def checkout(self, checkout_id: str) -> dict[str, Any]:
        checkout = self.checkouts.get(checkout_id)
        if checkout is None:
            raise WhopError(404, "not_found", f"Checkout configuration {checkout_id} not found")
        return checkout

    def pay_checkout(self, checkout_id: str, *, email: str, name: str, card: str, expiry: str = "") -> dict[str, Any]:
        """The customer pays on the hosted page. A good card makes a member (one per email), a
        membership carrying the checkout's metadata and, unless the plan has a trial, a paid payment.
        Events: payment.succeeded (no trial), membership.activated. A declined card: payment.failed.
        Payments show the card as Whop's `payment_instrument` does (brand, last four, expiry); renewals
        charge the same card."""
        instrument = payment_instrument(card, expiry)
        with self.lock:
            checkout = self.checkout(checkout_id)
            plan = self.plan(checkout["plan"]["id"])
            now = self.now()
            member_id = self.members_by_email.setdefault(email, new_id("mber"))
            user_id = "user_" + member_id.removeprefix("mber_")
            if card == CARD_DECLINED:
                payment = self._payment(
                    membership=None,
                    plan=plan,
                    checkout=checkout,
                    member_id=member_id,
                    email=email,
                    paid=False,
                    reason="subscription_create",
                    instrument=instrument,
                )
                self.emit("payment.failed", payment, None)
                raise CardDeclined("Your card was declined.")
            trial_days = int(plan["trial_period_days"] or 0)
            membership_id = new_id("mem")
            price = Decimal(str(plan["renewal_price"]))
            membership = {
                "id": membership_id,
                "account": {"id": self.account_id, "title": "Sandbox account", "route": "sandbox", "logo_url": None},
                "affiliate": None,
                "billing_period_days": PERIOD_DAYS,
                "cancel_at_period_end": False,
                "cancel_option": None,
                "canceled_at": None,
                "cancellation_reason": None,
                "collection_method": "charge_automatically",
                "created_at": iso(now),
                "current_period_start": iso(now),
                "current_period_end": iso(now + timedelta(days=trial_days or PERIOD_DAYS)),
                "expires_at": None,
                "feedback_option": None,
                "initial_price": money(Decimal(str(plan["initial_price"]))),
                "license_key": None,
                "manage_url": f"{self.public_url}/whop/manage/{membership_id}",
                "member": None,
                "member_id": member_id,
                "metadata": dict(checkout["metadata"]),
                "most_recent_action": "trial_ends_at" if trial_days else "renewing_on",
                "most_recent_action_at": iso(now + timedelta(days=trial_days or PERIOD_DAYS)),
                "phone_number": None,
                "plan_id": plan["id"],
                "product": {"id": plan["product"]["id"], "title": plan["product"]["title"], "logo_url": None},
                "product_id": plan["product"]["id"],
                "promo_code_id": None,
                "renewal_price": money(price),
                "split_pay_current_payments": None,
                "split_pay_required_payments": None,
                "status": "trialing" if trial_days else "active",
                "updated_at": iso(now),
                "user_id": user_id,
                "_email": email,
                "_name": name,
                "_checkout_configuration_id": checkout_id,
                "_instrument": instrument,
            }
            self.memberships[membership_id] = membership
            if not trial_days:
                payment = self._payment(
                    membership=membership,
                    plan=plan,
                    checkout=checkout,
                    member_id=member_id,
                    email=email,
                    paid=True,
                    reason="subscription_create",
                    instrument=instrument,
                )
                self.emit("payment.succeeded", payment, None)
            self.emit("membership.activated", self.public_membership(membership), None)
            return membership

    def _payment(
        self,
        *,
        membership: dict[str, Any] | None,
        plan: dict[str, Any],
        checkout: dict[str, Any] | None,
        member_id: str,
        email: str,
        paid: bool,
        reason: str,
        instrument: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        now = iso(self.now())
        total = money(Decimal(str(plan["renewal_price"])))
        payment = {
            "id": new_id("pay"),
            "account_id": self.account_id,
            "amount_after_fees": total,
            "auto_refunded": False,
            "billing_address": None,
            "billing_reason": reason,
            "checkout_configuration_id": checkout["id"] if checkout else None,
            "created_at": now,
            "updated_at": now,
            "currency": "usd",
            "customer_email": email,
            "decline_code": None if paid else "generic_decline",
            "failure_message": None if paid else "Your card was declined.",
            "holds": [],
            "last_payment_attempt_at": now,
            "line_items": [],
            "member_id": member_id,
            "membership_id": membership["id"] if membership else None,
            "metadata": dict((membership or checkout or {}).get("metadata") or {}),
            "next_payment_attempt_at": None,
            "paid_at": now if paid else None,
            "payment_instrument": instrument,
            "payment_method_type": "card",
            "payment_rule_matches": [],
            "payments_failed": 0 if paid else 1,
            "plan_id": plan["id"],
            "product_id": plan["product"]["id"],
            "refundable": paid,
            "retryable": not paid,
            "status": "paid" if paid else "open",
            "substatus": "succeeded" if paid else "failed",
            "subtotal": total,
            "tax_refunded_amount": money(Decimal(0)),
            "three_ds_verified": False,
            "total": total,
            "usd_total": total,
            "voidable": False,
        }
        self.payments[payment["id"]] = payment
        return payment

    def _invoice(self, membership: dict[str, Any], payment: dict[str, Any], status: str) -> dict[str, Any]:
        now = iso(self.now())
        plan = self.plans[membership["plan_id"]]
        invoice = {
            "id": new_id("inv"),
            "charge_buyer_fee": False,
            "collection_method": "charge_automatically",
            "company": {"id": self.account_id},
            "created_at": now,
            "updated_at": now,
            "current_plan": {"id": plan["id"], "currency": "usd", "formatted_price": plan["formatted_price"]},
            "due_date": now,
            "email_address": membership["_email"],
            "fetch_invoice_token": secrets.token_hex(12),
            "line_items": [
                {
                    "label": plan["title"],
                    "position": 0,
                    "quantity": 1.0,
                    "total": plan["renewal_price"],
                    "unit_price": plan["renewal_price"],
                }
            ],
            "member": {"id": membership["member_id"]},
            "number": f"SBX-{len(self.invoices) + 1:05d}",
            "pay_online_url": membership["manage_url"],
            "payment": {"id": payment["id"]},
            "payment_processing": False,
            "product": {"id": plan["product"]["id"], "title": plan["product"]["title"]},
            "status": status,
        }
        self.invoices[invoice["id"]] = invoice
        return invoice

    # --- memberships ----------------------------------------------------------------------------

    def membership(self, membership_id: str) -> dict[str, Any]:
        membership = self.memberships.get(membership_id)
        if membership is None:
            raise WhopError(404, "not_found", f"Membership {membership_id} not found")
        return membership

    @staticmethod
    def public_membership(membership: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in membership.items() if not key.startswith("_")}

    def list_memberships(self, args: dict[str, list[str]]) -> dict[str, Any]:
        known = {"account_id", "status", "statuses", "plan_id", "plan_ids", "first", "after", "user_id", "member_id"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise WhopError(400, "invalid_request_error", f"Unsupported parameters: {', '.join(unknown)}")
        if args.get("account_id", [self.account_id])[0] != self.account_id:
            return {"data": [], "page_info": {"has_next_page": False, "has_previous_page": False}}
        statuses = set(args.get("status", [])) | set(args.get("statuses", []))
        plans = set(args.get("plan_id", [])) | set(args.get("plan_ids", []))
        try:
            first = int(args.get("first", ["25"])[0])
        except ValueError:
            raise WhopError(400, "invalid_request_error", "first must be an integer") from None
        if not 1 <= first <= 100:
            raise WhopError(400, "invalid_request_error", "first must be between 1 and 100")
        with self.lock:
            rows = sorted(self.memberships.values(), key=lambda m: (m["created_at"], m["id"]))
            rows = [m for m in rows if not plans or m["plan_id"] in plans]
            rows = [m for m in rows if not statuses or _status_bucket(m) & statuses]
            for key in ("user_id", "member_id"):
                if key in args:
                    rows = [m for m in rows if m[key] == args[key][0]]
            return _page(rows, args, first, self.public_membership)

    def list_payments(self, args: dict[str, list[str]]) -> dict[str, Any]:
        """GET /payments: newest first, by account, membership, member or status; `first` and `after`."""
        known = {"account_id", "membership_id", "member_id", "status", "first", "after", "order", "direction"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise WhopError(400, "invalid_request_error", f"Unsupported parameters: {', '.join(unknown)}")
        if args.get("account_id", [self.account_id])[0] != self.account_id:
            return {"data": [], "page_info": {"has_next_page": False, "has_previous_page": False}}
        try:
            first = int(args.get("first", ["25"])[0])
        except ValueError:
            raise WhopError(400, "invalid_request_error", "first must be an integer") from None
        if not 1 <= first <= 100:
            raise WhopError(400, "invalid_request_error", "first must be between 1 and 100")
        with self.lock:
            rows = list(reversed(self.payments.values()))  # newest first
            for key in ("membership_id", "member_id", "status"):
                if key in args:
                    rows = [p for p in rows if p[key] == args[key][0]]
            return _page(rows, args, first, lambda payment: payment)

    def update_membership(self, membership_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """PATCH /memberships/{id}: cancel_at_period_end (false reverses a pending cancellation) and
        metadata (merged)."""
        unknown = sorted(set(body) - {"cancel_at_period_end", "metadata"})
        if unknown:
            raise WhopError(400, "invalid_request_error", f"Unsupported parameters: {', '.join(unknown)}")
        with self.lock:
            membership = self.membership(membership_id)
            if "metadata" in body and body["metadata"] is not None:
                if not isinstance(body["metadata"], dict):
                    raise WhopError(400, "invalid_request_error", "metadata must be an object")
                previous = dict(membership["metadata"])
                membership["metadata"] = {} if not body["metadata"] else {**previous, **body["metadata"]}
                if membership["metadata"] != previous:
                    self._touch(membership)
                    self.emit("membership.updated", self.public_membership(membership), {"metadata": previous})
            flag = body.get("cancel_at_period_end")
            if flag is not None:
                if not isinstance(flag, bool):
                    raise WhopError(400, "invalid_request_error", "cancel_at_period_end must be a boolean")
                self._set_cancel_at_period_end(membership, flag, reason=None)
            return membership

    # --- payments ------------------------------------------------------------------------------

    def refund_payment(self, payment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /payments/{id}/refund: the whole payment (partial_amount is refused); a payment already
        refunded, or not paid, is a 400 as on Whop."""
        unknown = sorted(set(body) - {"metadata"})
        if unknown:
            raise WhopError(400, "invalid_request_error", f"Unsupported parameters: {', '.join(unknown)}")
        with self.lock:
            payment = self.payments.get(payment_id)
            if payment is None:
                raise WhopError(404, "not_found", f"Payment {payment_id} not found")
            if payment["status"] != "paid" or not payment["refundable"]:
                raise WhopError(400, "invalid_request_error", "This payment cannot be refunded")
            now = iso(self.now())
            payment.update(
                refundable=False,
                refunded_amount=payment["total"],
                refunded_at=now,
                substatus="refunded",
                updated_at=now,
            )
            refund = {
                "id": new_id("rfnd"),
                "amount": payment["total"]["amount"],
                "currency": payment["currency"],
                "created_at": now,
                "payment": {"id": payment["id"]},
                "metadata": dict(body.get("metadata") or {}),
                "status": "succeeded",
            }
            self.emit("refund.created", refund, None)
            return dict(payment)

    def cancel_membership(self, membership_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /memberships/{id}/cancel: at period end (access kept) or now (membership.deactivated)."""
        unknown = sorted(set(body) - {"cancel_at_period_end", "reason", "feedback_option_id"})
        if unknown:
            raise WhopError(400, "invalid_request_error", f"Unsupported parameters: {', '.join(unknown)}")
        with self.lock:
            membership = self.membership(membership_id)
            if membership["status"] in ("canceled", "expired"):
                raise WhopError(400, "invalid_request_error", "This membership has already ended")
            if body.get("cancel_at_period_end"):
                self._set_cancel_at_period_end(membership, True, reason=body.get("reason"))
            else:
                self.deactivate(membership_id, status="canceled", reason=body.get("reason"))
            return membership

    def _set_cancel_at_period_end(self, membership: dict[str, Any], flag: bool, *, reason: str | None) -> None:
        if membership["status"] in ("canceled", "expired"):
            raise WhopError(400, "invalid_request_error", "This membership has already ended")
        if membership["cancel_at_period_end"] == flag:
            return
        previous = {
            "cancel_at_period_end": membership["cancel_at_period_end"],
            "canceled_at": membership["canceled_at"],
            "most_recent_action": membership["most_recent_action"],
        }
        membership["cancel_at_period_end"] = flag
        membership["canceled_at"] = iso(self.now()) if flag else None
        membership["cancellation_reason"] = reason if flag else None
        membership["most_recent_action"] = "canceling_on" if flag else "renewing_on"
        self._touch(membership)
        self.emit("membership.cancel_at_period_end_changed", self.public_membership(membership), previous)
        self.emit("membership.updated", self.public_membership(membership), previous)

    def deactivate(self, membership_id: str, *, status: str = "canceled", reason: str | None = None) -> dict[str, Any]:
        with self.lock:
            membership = self.membership(membership_id)
            if membership["status"] in ("canceled", "expired"):
                return membership
            previous = {"status": membership["status"]}
            now = self.now()
            membership["status"] = status
            membership["canceled_at"] = membership["canceled_at"] or iso(now)
            membership["cancellation_reason"] = membership["cancellation_reason"] or reason
            membership["current_period_end"] = iso(now) if status == "canceled" else membership["current_period_end"]
            membership["most_recent_action"] = "canceled_on"
            membership["most_recent_action_at"] = iso(now)
            self._touch(membership)
            self.emit("membership.deactivated", self.public_membership(membership), previous)
            return membership

    def end_period(self, membership_id: str, outcome: str) -> dict[str, Any]:
        """Time passes to the period's end (a sandbox control, not a Whop endpoint). A membership set to
        cancel ends (`expired`, membership.deactivated); otherwise it renews: `paid` charges the card
        (payment.succeeded, invoice.paid, membership.updated with the new period, active), `failed`
        does not (payment.failed, invoice.past_due, membership.updated to past_due)."""
        if outcome not in ("paid", "failed"):
            raise WhopError(400, "invalid_request_error", "outcome must be paid or failed")
        with self.lock:
            membership = self.membership(membership_id)
            if membership["status"] in ("canceled", "expired"):
                raise WhopError(400, "invalid_request_error", "This membership has already ended")
            if membership["cancel_at_period_end"]:
                return self.deactivate(membership_id, status="expired")
            plan = self.plans[membership["plan_id"]]
            paid = outcome == "paid"
            payment = self._payment(
                membership=membership,
                plan=plan,
                checkout=None,
                member_id=membership["member_id"],
                email=membership["_email"],
                paid=paid,
                reason="subscription_cycle",
                instrument=membership.get("_instrument"),
            )
            invoice = self._invoice(membership, payment, "paid" if paid else "past_due")
            previous = {
                "status": membership["status"],
                "current_period_start": membership["current_period_start"],
                "current_period_end": membership["current_period_end"],
            }
            if paid:
                start = datetime.fromisoformat(membership["current_period_end"])
                start = max(start, self.now())
                membership["current_period_start"] = iso(start)
                membership["current_period_end"] = iso(start + timedelta(days=PERIOD_DAYS))
                membership["status"] = "active"
                membership["most_recent_action"] = "renewing_on"
                membership["most_recent_action_at"] = membership["current_period_end"]
            else:
                membership["status"] = "past_due"
                membership["most_recent_action"] = "past_due"
                membership["most_recent_action_at"] = iso(self.now())
            self._touch(membership)
            self.emit("payment.succeeded" if paid else "payment.failed", payment, None)
            self.emit("invoice.paid" if paid else "invoice.past_due", invoice, None)
            self.emit("membership.updated", self.public_membership(membership), previous)
            return membership

    def _touch(self, membership: dict[str, Any]) -> None:
        membership["updated_at"] = iso(self.now())


def _status_bucket(membership: dict[str, Any]) -> set[str]:
    """The filter buckets a membership falls in: its status, except that `active`, `trialing` and
    `past_due` exclude memberships set to cancel at period end, which match `canceling` instead."""
    if membership["cancel_at_period_end"] and membership["status"] in ("active", "trialing", "past_due"):
        return {"canceling"}
    return {membership["status"]}


def _page(
    rows: list[dict[str, Any]], args: dict[str, list[str]], first: int, public: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """One page of a Whop list, as Whop pages (`first` rows after the cursor `after`, and page_info)."""
    start = 0
    if "after" in args:
        ids = [row["id"] for row in rows]
        if args["after"][0] not in ids:
            raise WhopError(400, "invalid_request_error", "after is not a cursor from this list")
        start = ids.index(args["after"][0]) + 1
    page = rows[start : start + first]
    has_next = start + first < len(rows)
    return {
        "data": [public(row) for row in page],
        "page_info": {
            "end_cursor": page[-1]["id"] if page and has_next else None,
            "start_cursor": page[0]["id"] if page else None,
            "has_next_page": has_next,
            "has_previous_page": start > 0,
        },
    }
