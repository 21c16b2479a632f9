"""The hosted pages: Checkout (/checkout/<cs_…>) and the customer portal (/portal/<bps_…>).

Form fields use the element ids of Stripe's hosted Checkout page (#email, #cardNumber, …) so a
single browser script can drive both this page and the real one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flask import Blueprint, redirect, render_template, request
from werkzeug.wrappers import Response

from . import billing, checkout, customers, invoicing, objects, portal_changes, simtime
from .context import current_settings, current_store
from .errors import StripeError
from .objects import Obj

bp = Blueprint("pages", __name__, template_folder="templates")

FIELDS = ("email", "cardNumber", "cardExpiry", "cardCvc", "billingName", "promotionCode", *checkout.TAX_FIELDS)
EXPIRY = re.compile(r"(\d{1,2})\s*/?\s*(\d{2})")  # "MM / YY", "MM/YY" or "MMYY"

PORTAL_ACTIONS = {
    "cancel-at-period-end": "Your subscription will be canceled at the end of the billing period.",
    "renew": "Your subscription will renew.",
    "cancel-now": "Your subscription has been canceled.",
    "switch-plan": "Your plan has been changed.",
    "update-quantity": "Your subscription has been updated.",
}
CARD_NOTICES = {"update-card": "Your payment method has been updated."}  # shown back on the portal
INFORMATION_NOTICE = {"update-information": "Your billing information has been updated."}


bp.add_app_template_filter(objects.money, "money")


@bp.app_template_filter("day")
def day(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%-d %B %Y")


def _not_found(what: str) -> tuple[str, int]:
    return render_template("message.html", title="Not found", message=f"No such {what}."), 404


def _find(kind: str, object_id: str) -> Obj | None:
    """The stored object if it is of this kind; None (the page answers 404) otherwise."""
    obj = current_store().get(object_id)
    return obj if obj is not None and obj["object"] == kind else None


def _blank_form(email: str) -> dict[str, str]:
    """The card form's fields before anything is typed: only the email is prefilled."""
    return {field: "" for field in FIELDS} | {"email": email}


def _posted_form() -> dict[str, str]:
    return {field: request.form.get(field, "").strip() for field in FIELDS}


# -- Checkout ---------------------------------------------------------------------------------


@bp.route("/checkout/<session_id>", methods=["GET", "POST"])
def checkout_page(session_id: str) -> Response | tuple[str, int]:
    store = current_store()
    try:
        with store.transaction():  # reading may expire the session
            session = checkout.get_checkout_session(store, session_id)
    except StripeError:
        return _not_found("Checkout Session")
    customer = store.get(session["customer"]) if session["customer"] else None
    values = _blank_form(session["customer_email"] or (customer["email"] if customer else ""))
    errors: list[str] = []
    if request.method == "POST":
        values = _posted_form()
        errors = validate_payment_form(values, card_optional=checkout.card_optional(session))
        if not errors:
            try:
                with store.transaction():
                    session = checkout.pay_checkout_session(
                        store,
                        session_id,
                        card_number=re.sub(r"\s", "", values["cardNumber"]),
                        email=values["email"],
                        name=values["billingName"],
                        async_delay=current_settings().async_delay,
                        card_expiry=card_expiry(values),
                        promotion_code=values["promotionCode"] if session["allow_promotion_codes"] else "",
                        tax_details=checkout.TaxDetails.from_form(session, values),
                    )
            except billing.PaymentError as exc:
                errors = [str(exc)]
            else:
                target = (session["success_url"] or "").replace("{CHECKOUT_SESSION_ID}", session_id)
                return redirect(target or request.path, 303)
    page = render_template(
        "checkout.html",
        session=session,
        trial_days=session["_subscription_data"]["trial_period_days"],
        card_optional=checkout.card_optional(session),
        promotion_codes=bool(session["allow_promotion_codes"]),
        collect_address=checkout.collects_address(session),
        collect_tax_id=bool((session.get("tax_id_collection") or {}).get("enabled")),
        values=values,
        errors=errors,
        cards=billing.SANDBOX_CARDS,
    )
    return page, 400 if errors else 200


def validate_payment_form(values: dict[str, str], card_optional: bool = False) -> list[str]:
    """Stripe Checkout's own messages for what it would refuse before trying the card. With
    card_optional (a trial that needs no payment method) the card fields may all be empty."""
    errors = []
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", values["email"]):
        errors.append("Your email address is invalid." if values["email"] else "Your email is incomplete.")
    card_fields = ("cardNumber", "cardExpiry", "cardCvc")
    if card_optional and not any(values[field] for field in card_fields):
        if not values["billingName"]:
            errors.append("Your name is incomplete.")
        return errors
    number = re.sub(r"\s", "", values["cardNumber"])
    if not number:
        errors.append("Your card number is incomplete.")
    elif not (number.isdigit() and 12 <= len(number) <= 19 and _luhn_ok(number)):
        errors.append("Your card number is invalid.")
    expiry = EXPIRY.fullmatch(values["cardExpiry"])
    if not expiry or not 1 <= int(expiry.group(1)) <= 12:
        errors.append("Your card's expiration date is incomplete.")
    else:
        today = datetime.now(UTC)
        if (2000 + int(expiry.group(2)), int(expiry.group(1))) < (
            today.year,
            today.month,
        ):
            errors.append("Your card's expiration year is in the past.")
    if not re.fullmatch(r"\d{3,4}", values["cardCvc"]):
        errors.append("Your card's security code is incomplete.")
    if not values["billingName"]:
        errors.append("Your name is incomplete.")
    return errors


def card_expiry(values: dict[str, str]) -> tuple[int, int]:
    """(month, year) of a validated "MM / YY" expiry, or a far-off default when none was typed."""
    expiry = EXPIRY.fullmatch(values.get("cardExpiry", ""))
    return (int(expiry.group(1)), 2000 + int(expiry.group(2))) if expiry else (12, 2034)


def _luhn_ok(number: str) -> bool:
    digits = [int(d) for d in reversed(number)]
    total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
    return total % 10 == 0


# -- customer portal --------------------------------------------------------------------------


def _portal_page(portal: Obj, notice: str | None = None, error: str | None = None) -> str:
    store = current_store()
    subscriptions = billing.customer_subscriptions(store, portal["customer"])
    live = [s for s in subscriptions if s["status"] not in billing.ENDED]
    return render_template(
        "portal.html",
        portal=portal,
        customer=store.get(portal["customer"]),
        subscriptions=subscriptions,
        # Button ids are for scripted browsers; they go on the customer's newest live subscription.
        primary_id=live[0]["id"] if live else None,
        ended=billing.ENDED,
        plan_choices=portal_changes.plan_choices(store),
        roles=portal_changes.item_roles(store, subscriptions),
        notice=notice,
        error=error,
    )


@bp.get("/portal/<portal_id>")
def portal(portal_id: str) -> str | tuple[str, int]:
    found = _find("billing_portal.session", portal_id)
    if found is None:
        return _not_found("portal session")
    done = request.args.get("done", "")
    return _portal_page(
        found, notice=PORTAL_ACTIONS.get(done) or CARD_NOTICES.get(done) or INFORMATION_NOTICE.get(done)
    )


@bp.post("/portal/<portal_id>/information")
def portal_update_information(portal_id: str) -> Response | tuple[str, int]:
    """The portal's billing information (Stripe's `customer_update.allowed_updates` name and email):
    saved on the customer as the API's update would, with its customer.updated."""
    store = current_store()
    found = _find("billing_portal.session", portal_id)
    if found is None:
        return _not_found("portal session")
    name, email = (request.form.get(field, "").strip() for field in ("name", "email"))
    if not email or "@" not in email or len(email) > 512 or len(name) > 256:
        return _portal_page(found, error="Enter a valid email address and a name of at most 256 characters."), 400
    with store.transaction(), simtime.time_of(store, found["customer"]):
        customers.update(
            store,
            found["customer"],
            email=email,
            name=name,
            metadata=None,
            default_payment_method=None,
            origin=billing.AUTOMATIC,
        )
    return redirect(f"/portal/{portal_id}?done=update-information", 303)


@bp.post("/portal/<portal_id>/subscriptions/<subscription_id>/<action>")
def portal_action(portal_id: str, subscription_id: str, action: str) -> Response | tuple[str, int]:
    store = current_store()
    found = _find("billing_portal.session", portal_id)
    subscription = store.get(subscription_id)
    if (
        found is None
        or subscription is None
        or subscription.get("customer") != found["customer"]
        or action not in PORTAL_ACTIONS
    ):
        return _not_found("subscription in this portal session")
    try:
        with store.transaction(), simtime.time_of(store, subscription_id):  # a clock's customer: its time
            if action == "cancel-now":
                billing.cancel_subscription(store, subscription_id)
            elif action in portal_changes.ACTIONS:
                portal_changes.apply(store, subscription_id, action, request.form)
            else:
                portal_changes.update_subscription(
                    store,
                    subscription_id,
                    cancel_at_period_end=action == "cancel-at-period-end",
                )
    except StripeError as exc:
        return _portal_page(found, error=exc.message), 400
    return redirect(f"/portal/{portal_id}?done={action}", 303)


# -- cards: the portal's "update card", hosted invoice pages and invoice PDFs ---------------------


@bp.app_template_filter("card_summary")
def card_summary(customer: Obj) -> str:
    method_id = customer["invoice_settings"]["default_payment_method"]
    method = current_store().get(method_id) if method_id else None
    if method is None:
        return "No card on file."
    card = method["card"]
    return f"{card['brand'].title()} ending in {card['last4']}, expires {card['exp_month']:02d}/{card['exp_year']}"


@bp.app_template_filter("open_invoices")
def open_invoices(customer: Obj) -> list[Obj]:
    return [i for i in current_store().all("invoice") if i["customer"] == customer["id"] and i["status"] == "open"]


def _card_from_form(values: dict[str, str]) -> billing.SandboxCard:
    """The sandbox card typed into a card form (already validated), refusing declined ones."""
    card = billing.sandbox_card(re.sub(r"\s", "", values["cardNumber"]))
    if card is None:
        raise billing.PaymentError(billing.UNKNOWN_CARD)
    if card.outcome == "declined":
        raise billing.PaymentError(invoicing.DECLINED)
    return card


def _card_page(status: int, **context: object) -> tuple[str, int]:
    return render_template("card.html", cards=billing.SANDBOX_CARDS, **context), status


@bp.route("/portal/<portal_id>/payment-method", methods=["GET", "POST"])
def portal_update_card(portal_id: str) -> Response | tuple[str, int]:
    """The portal's card form: the new card is attached and becomes the default of the customer
    and of its subscriptions that have not ended."""
    store = current_store()
    portal = _find("billing_portal.session", portal_id)
    if portal is None:
        return _not_found("portal session")
    customer = store.get(portal["customer"])
    assert customer is not None
    values = _blank_form(customer["email"] or "")
    errors: list[str] = []
    if request.method == "POST":
        values = _posted_form()
        errors = validate_payment_form(values)
        if not errors:
            try:
                card = _card_from_form(values)
                with store.transaction(), simtime.time_of(store, customer["id"]):
                    customers.use_new_card(
                        store,
                        customer["id"],
                        card.number,
                        name=values["billingName"],
                        email=values["email"],
                        expiry=card_expiry(values),
                    )
            except billing.PaymentError as exc:
                errors = [str(exc)]
            else:
                return redirect(f"/portal/{portal_id}?done=update-card", 303)
    return _card_page(
        400 if errors else 200,
        title="Update your card",
        current=card_summary(customer),
        values=values,
        errors=errors,
        show_form=True,
        submit="Save card",
        back_url=f"/portal/{portal_id}",
        invoice=None,
    )


@bp.route("/invoice/<invoice_id>", methods=["GET", "POST"])
def hosted_invoice(invoice_id: str) -> Response | tuple[str, int]:
    """The hosted invoice page (hosted_invoice_url): pay an open invoice by card."""
    store = current_store()
    invoice = _find("invoice", invoice_id)
    if invoice is None or invoice["status"] == "draft":
        return _not_found("invoice")
    customer = store.get(invoice["customer"])
    values = _blank_form((customer or {}).get("email") or "")
    errors: list[str] = []
    if request.method == "POST" and invoice["status"] == "open":
        values = _posted_form()
        errors = validate_payment_form(values)
        if not errors:
            try:
                card = _card_from_form(values)
                with store.transaction(), simtime.time_of(store, invoice_id):
                    invoicing.pay_by_card(
                        store,
                        invoice_id,
                        card.number,
                        name=values["billingName"],
                        email=values["email"],
                        expiry=card_expiry(values),
                    )
            except (billing.PaymentError, StripeError) as exc:
                errors = [exc.message if isinstance(exc, StripeError) else str(exc)]
            else:
                return redirect(f"/invoice/{invoice_id}", 303)
        invoice = store.get(invoice_id) or invoice
    notice = {"paid": "This invoice has been paid. Thank you!", "void": "This invoice was voided."}
    return _card_page(
        400 if errors else 200,
        title="Pay invoice",
        invoice=invoice,
        values=values,
        errors=errors,
        notice=notice.get(invoice["status"]),
        show_form=invoice["status"] == "open",
        submit="Pay",
        back_url=None,
    )


@bp.get("/invoice/<invoice_id>/pdf")
def invoice_pdf(invoice_id: str) -> Response | tuple[str, int]:
    invoice = _find("invoice", invoice_id)
    if invoice is None or invoice["status"] == "draft":
        return _not_found("invoice")
    pdf = invoicing.pdf(invoice)
    return Response(
        pdf, mimetype="application/pdf", headers={"Content-Disposition": f'inline; filename="{invoice["number"]}.pdf"'}
    )
